#!/usr/bin/env python3
"""
Set up a virtual environment and run the daemon or the tests, with nothing but python3.

    python3 scripts/dev.py run     # twistd -n hermes-gateway --config etc/hermes-gateway.yaml
    python3 scripts/dev.py test    # lint, the whole test suite, then the hermes-agent interop test

Extra arguments after "run" go to twistd's hermes-gateway subcommand; after "test", to pytest.
The venv lives in .venv (override with HERMES_DEV_VENV).  The package is installed
non-editable, exactly as users install it, so the twistd plugin is found the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("HERMES_DEV_VENV", ROOT / ".venv"))
BIN = VENV / "bin"


def sh(*cmd: object, check: bool = True, **kw) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)
    if check and rc != 0:
        sys.exit(rc)
    return rc


def setup(extras: str) -> None:
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
        sh(BIN / "python", "-m", "pip", "install", "-q", "--upgrade", "pip")
    # Non-editable, so twisted/plugins/hermes_gateway.py lands in site-packages (an editable
    # install hides it from twistd's plugin scan).
    sh(BIN / "python", "-m", "pip", "install", "-q", "--upgrade", f".[{extras}]")


def run(args: list[str]) -> None:
    setup("test")
    os.chdir(ROOT)
    cmd = [str(BIN / "twistd"), "-n", "--pidfile=", "hermes-gateway"]
    if not any(a.startswith("--config") or a == "-c" for a in args):
        cmd += ["--config", "etc/hermes-gateway.yaml"]
    os.execv(cmd[0], cmd + args)


def pytest(*args: str) -> int:
    rc = sh(BIN / "python", "-m", "pytest", *args, check=False)
    if rc == 5:  # pytest's "no tests collected" must not pass silently
        print("no tests were collected", file=sys.stderr)
        return 1
    return rc


def test(args: list[str]) -> None:
    setup("test,lint")
    sh(BIN / "ruff", "check", "hermes_twisted", "tests", "bench", "scripts",
       "twisted/plugins")
    # Tests import the working tree; the installed copy only provides the twistd plugin.
    rc = pytest("-p", "no:cacheprovider", "-m", "not interop", *args)
    if rc == 0 and not args:
        rc = pytest("-p", "no:cacheprovider", "-m", "interop", "tests/interop")
    sys.exit(rc)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in {"run", "test"}:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    {"run": run, "test": test}[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
