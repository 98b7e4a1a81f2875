# -*- test-case-name: tests.test_config -*-
"""
C{$HERMES_HOME} and its C{.env} file: where the gateway's files live, and the variables the
file adds to the environment without ever overriding one already set (Hermes 0.19.0's rule).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Mapping, MutableMapping

from twisted.logger import Logger

from hermes_twisted.config.errors import ConfigError

# Shared with the rest of the loader, so operators filter every config warning by one name.
log = Logger(namespace="hermes_twisted.config")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def expand_user(path: str, environ: Mapping[str, str]) -> str:
    """C{path} with a leading C{~} expanded from C{environ["HOME"]} (the process's otherwise)."""
    if path.startswith("~") and (path == "~" or path[1] in "/\\") and environ.get("HOME"):
        return environ["HOME"] + path[1:]
    return os.path.expanduser(path)


def hermes_home(environ: Mapping[str, str]) -> str:
    """C{$HERMES_HOME} (C{~/.hermes} when unset or blank), with C{~} expanded."""
    home = (environ.get("HERMES_HOME") or "").strip() or "~/.hermes"
    # Absolute, so a later chdir (twistd's --rundir) cannot move the database.
    return os.path.abspath(expand_user(home, environ))


def _dotenv_value(raw: str) -> str | None:
    """The value of one C{KEY=} right-hand side; None when a quote is never closed."""
    if raw[:1] == "'":
        end = raw.find("'", 1)
        return None if end == -1 else raw[1:end]
    if raw[:1] == '"':
        out, i = [], 1
        while i < len(raw):
            ch = raw[i]
            if ch == "\\" and i + 1 < len(raw):
                out.append(_ESCAPES.get(raw[i + 1], "\\" + raw[i + 1]))
                i += 2
                continue
            if ch == '"':
                return "".join(out)
            out.append(ch)
            i += 1
        return None
    comment = re.search(r"\s#", raw)
    return (raw[:comment.start()] if comment else raw).strip()


def read_dotenv(path: str) -> dict[str, str]:
    """
    Parse a C{.env} file: C{KEY=VALUE} lines, C{#} comments (whole-line, or after whitespace
    in an unquoted value), an optional C{export } prefix, optional single or double quotes
    (double quotes understand C{\\n}, C{\\t}, C{\\"} and C{\\\\}).  A missing file is empty;
    malformed lines are logged by line number (never by content) and skipped.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"cannot read: {e.__class__.__name__}: "
                                f"{getattr(e, 'strerror', None) or e}")
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export "):].lstrip()
        key, sep, raw = stripped.partition("=")
        key = key.strip()
        if not sep or not _ENV_NAME.fullmatch(key):
            log.warn("{path}:{lineno}: not a KEY=VALUE line; ignored", path=path, lineno=lineno)
            continue
        value = _dotenv_value(raw.strip())
        if value is None:
            log.warn("{path}:{lineno}: {key} has an unterminated quote; ignored",
                     path=path, lineno=lineno, key=key)
            continue
        values[key] = value
    return values


def merged_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """C{environ} over C{$HERMES_HOME/.env}: the file never overrides a variable already set."""
    merged = read_dotenv(os.path.join(hermes_home(environ), ".env"))
    merged.update(environ)
    return merged


def apply_dotenv(target: MutableMapping[str, str]) -> list[str]:
    """
    Copy the variables of C{$HERMES_HOME/.env} that C{target} (e.g. C{os.environ}) lacks into
    it, for child processes; L{hermes_twisted.config.loader.load_config} does not need this.  Returns
    the names set.
    """
    added = []
    for key, value in read_dotenv(os.path.join(hermes_home(target), ".env")).items():
        if key not in target:
            target[key] = value
            added.append(key)
    return added


def _dotenv_line(key: str, value: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:@+,=-]*", value):
        return f"{key}={value}"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    escaped = escaped.replace("\t", "\\t").replace("\r", "\\r")
    return f'{key}="{escaped}"'


def update_dotenv(path: str, values: Mapping[str, str]) -> None:
    """
    Set C{values} in the C{.env} file at C{path}: a line already assigning a key is replaced
    in place, new keys are appended, every other line is kept as it was.  The file is written
    to a temporary file beside it with mode 0600 and renamed over the old one, so a reader sees
    the old file or the new one and a secret is never world-readable, not even for a moment.
    Raises C{OSError}.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    pending = dict(values)
    out = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("export "):
            stripped = stripped[len("export "):].lstrip()
        key = stripped.partition("=")[0].strip()
        if not stripped.startswith("#") and "=" in stripped and key in pending:
            out.append(_dotenv_line(key, pending.pop(key)))
        elif key in values and "=" in stripped and not stripped.startswith("#"):
            continue  # a second assignment of a key just written: drop it
        else:
            out.append(line)
    out.extend(_dotenv_line(k, v) for k, v in pending.items())
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def set_dotenv_value(path: str, key: str, value: str) -> None:
    """
    Set one C{key} in the C{.env} file at C{path} (hermes's C{save_env_value}, used by
    /sethome) with L{update_dotenv}.  Raises C{ValueError} for a name that is not a variable
    name or a value spanning lines, C{OSError} when the file cannot be written.  Blocks:
    call it in a thread.
    """
    if not _ENV_NAME.fullmatch(key) or "\n" in value or "\r" in value:
        raise ValueError(f"cannot write {key!r} to a .env file")
    update_dotenv(path, {key: value})
