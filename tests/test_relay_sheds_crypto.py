"""
The relay path re-validates nothing (relay.md §9, §10): no platform crypto anywhere but the
channel credential module, auth.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import hermes_twisted.relay

RELAY_DIR = Path(hermes_twisted.relay.__file__).parent
FORBIDDEN = re.compile(
    r"ed25519|verify_key|verifykey|verify_signature|verify_ed25519|verify_webhook|bizmsg|hmac"
    r"|x[-_]signature", re.IGNORECASE)
FORBIDDEN_MODULES = ("wecom_crypto", "wecom_callback", "webhook")


def relay_modules() -> list[Path]:
    modules = sorted(RELAY_DIR.glob("*.py"))
    assert len(modules) >= 7
    return modules


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_relay_module_imports_platform_crypto():
    for path in relay_modules():
        for name in imported_names(path):
            assert not any(bad in name.lower() for bad in FORBIDDEN_MODULES), (path, name)


def test_no_crypto_outside_auth():
    for path in relay_modules():
        if path.name == "auth.py":
            continue
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if text.strip().startswith("#"):
                continue
            assert not FORBIDDEN.search(text), f"{path.name}:{number}: {text.strip()}"


def test_auth_uses_the_stdlib_primitives():
    names = imported_names(RELAY_DIR / "auth.py")
    assert {"hmac", "hashlib"} <= names


def test_the_scan_can_fail():
    assert FORBIDDEN.search("import HMAC")
    assert FORBIDDEN.search("headers['X-Signature-Ed25519']")
    assert not FORBIDDEN.search("verify_token(token, secrets)")
