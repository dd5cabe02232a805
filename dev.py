#!/usr/bin/env python3
"""Set up and run the project with nothing but Python 3.11+.

    python3 dev.py demo    the downloader against the embedded emulator
    python3 dev.py test    ruff, mypy --strict and the test suite (what CI runs)
    python3 dev.py bench   the benchmarks

Each creates .venv/ first and installs what it needs (again only when pyproject.toml
changed): the demo only the project with its cli extra, test and bench the dev extra.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# The extra that a task needs; dev holds everything cli has.
EXTRAS = {"demo": "cli", "test": "dev", "bench": "dev"}


def python() -> str:
    return str(BIN / "python")


def stamp(extra: str) -> pathlib.Path:
    return VENV / (".installed" if extra == "dev" else f".installed-{extra}")


def ensure_environment(extra: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script may be run by an older python3
        sys.exit(f"Python 3.11+ is required; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    for done in {stamp(extra), stamp("dev")}:
        if done.exists() and done.read_text() == wanted:
            return
    if not (BIN / "python").exists():
        print("creating .venv", flush=True)
        venv.create(VENV, with_pip=True)
    run(python(), "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(python(), "-m", "pip", "install", "--quiet", "-e", f".[{extra}]")
    stamp(extra).write_text(wanted)


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    completed = subprocess.run(command, cwd=ROOT)
    if completed.returncode:
        sys.exit(completed.returncode)


def main() -> None:
    task = sys.argv[1] if len(sys.argv) > 1 else ""
    if task not in ("demo", "test", "bench"):
        sys.exit(__doc__)
    ensure_environment(EXTRAS[task])
    if task == "demo":
        run(str(BIN / "amp-cohorts"), "demo", *sys.argv[2:])
    elif task == "test":
        run(str(BIN / "ruff"), "check", "amp_cohorts_async", "tests", "benchmarks", "examples",
            "dev.py")
        run(str(BIN / "mypy"), "amp_cohorts_async", "tests/typing", "benchmarks", "examples")
        run(str(BIN / "pytest"), "-q", *sys.argv[2:])
    else:
        for script in ("scheduler.py", "download.py", "upload.py", "distributed.py", "sync.py",
                       "diff.py", "telemetry.py"):
            run(python(), f"benchmarks/{script}", *sys.argv[2:])


if __name__ == "__main__":
    main()
