"""Copy the CLReg method into an OpenUnlearning checkout and register its trainers.

    python integrations/open_unlearning/install.py /path/to/open-unlearning

Copies ``src/``, ``configs/`` and ``community/`` of this folder into the checkout (the same
relative paths) and appends the import and ``_register_trainer`` lines for ``CLRegGradDiff``,
``CLRegNPO`` and ``CLRegSimNPO`` to ``src/trainer/__init__.py``. Running it again changes
nothing. A file of the checkout that differs from this folder's (edited there, or copied from
another clreg_fast version) is never overwritten silently: the command stops, writing nothing,
and names those files; ``--force`` overwrites them. clreg_fast itself must be installed in the
environment that runs OpenUnlearning (``pip install clreg-fast`` or ``pip install -e``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("src", "configs", "community")
CLASSES = ("CLRegGradDiff", "CLRegNPO", "CLRegSimNPO")
MARKER = "# CLReg (clreg_fast), added by integrations/open_unlearning/install.py"
REGISTRATION = "\n".join([
    "", MARKER,
    f"from trainer.unlearn.clreg import {', '.join(CLASSES)}  # noqa: E402",
    *(f"_register_trainer({name})" for name in CLASSES), ""])


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _copies(checkout: str) -> list:
    """(source, target) for every file of the folder's parts."""
    pairs = []
    for part in PARTS:
        for folder, _dirs, files in os.walk(os.path.join(HERE, part)):
            target_folder = os.path.join(checkout, os.path.relpath(folder, HERE))
            pairs += [(os.path.join(folder, name), os.path.join(target_folder, name))
                      for name in sorted(files) if not name.endswith((".pyc", ".pyo"))]
    return pairs


def install(checkout: str, force: bool = False) -> list:
    """Copies the files and registers the trainers; returns the paths written.

    Files already there with the same content are left alone; files that differ stop the
    install before anything is written, unless ``force``.
    """
    registry = os.path.join(checkout, "src", "trainer", "__init__.py")
    if not os.path.isfile(registry) or b"_register_trainer" not in _read(registry):
        raise SystemExit(f"{checkout} does not look like an OpenUnlearning checkout: no "
                         "src/trainer/__init__.py defining _register_trainer")
    copies = [(source, target) for source, target in _copies(checkout)
              if not (os.path.isfile(target) and _read(target) == _read(source))]
    differing = [target for _source, target in copies if os.path.lexists(target)]
    if differing and not force:
        raise SystemExit("these files of the checkout differ from integrations/open_unlearning's "
                         "(edited there, or from another clreg_fast version); nothing was "
                         "written. Rerun with --force to overwrite them:\n  "
                         + "\n  ".join(differing))
    written = []
    for source, target in copies:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    if MARKER.encode() not in _read(registry):
        with open(registry, "a") as f:
            f.write(REGISTRATION)
        written.append(registry)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="the OpenUnlearning repository root")
    parser.add_argument("--force", action="store_true",
                        help="overwrite checkout files that differ from this folder's")
    args = parser.parse_args(argv)
    for path in install(os.path.abspath(args.checkout), force=args.force):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
