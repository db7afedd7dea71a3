"""Copy the CLReg method into an OpenUnlearning checkout and register its trainers.

    python integrations/open_unlearning/install.py /path/to/open-unlearning

Copies ``src/``, ``configs/`` and ``community/`` of this folder into the checkout (the same
relative paths) and appends the import and ``_register_trainer`` lines for ``CLRegGradDiff``,
``CLRegNPO`` and ``CLRegSimNPO`` to ``src/trainer/__init__.py``. Running it again refreshes the
copied files and leaves the registration as it is. clreg_fast itself must be installed in the
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


def install(checkout: str) -> list:
    """Copies the files and registers the trainers; returns the paths written."""
    registry = os.path.join(checkout, "src", "trainer", "__init__.py")
    if not os.path.isfile(registry) or "_register_trainer" not in open(registry).read():
        raise SystemExit(f"{checkout} does not look like an OpenUnlearning checkout: no "
                         "src/trainer/__init__.py defining _register_trainer")
    written = []
    for part in PARTS:
        for folder, _dirs, files in os.walk(os.path.join(HERE, part)):
            target_folder = os.path.join(checkout, os.path.relpath(folder, HERE))
            os.makedirs(target_folder, exist_ok=True)
            for name in files:
                if name.endswith((".pyc", ".pyo")):
                    continue
                shutil.copyfile(os.path.join(folder, name), os.path.join(target_folder, name))
                written.append(os.path.join(target_folder, name))
    with open(registry) as f:
        registered = MARKER in f.read()
    if not registered:
        with open(registry, "a") as f:
            f.write(REGISTRATION)
        written.append(registry)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="the OpenUnlearning repository root")
    args = parser.parse_args(argv)
    for path in install(os.path.abspath(args.checkout)):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
