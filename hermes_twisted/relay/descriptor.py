# -*- test-case-name: tests.test_relay_wire -*-
"""
The connector's C{CapabilityDescriptor} (relay.md §4): what one fronted platform can do.

Parsed the 0.19.0 way (unknown keys dropped, optional keys defaulted, a missing required key is
an error, C{max_message_length} <= 0 or unparsable becomes 4096) plus the later
C{supported_ops} discovery.  A bad descriptor raises L{BadDescriptor}; the caller logs it and
keeps the connection.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

#: The ops a connector supports when its descriptor lists none (relay.md §4.1).
LEGACY_OPS = frozenset({"send", "edit", "typing", "follow_up"})

DEFAULT_MAX_MESSAGE_LENGTH = 4096


class BadDescriptor(ValueError):
    """A descriptor frame that cannot be used (not an object, or a required key is missing)."""


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (what Discord and Telegram count)."""
    return len(text.encode("utf-16-le")) // 2


def codepoint_len(text: str) -> int:
    return len(text)


@dataclass(frozen=True)
class CapabilityDescriptor:
    contract_version: int
    platform: str
    label: str
    max_message_length: Any
    supports_draft_streaming: bool
    supports_edit: bool
    supports_threads: bool
    markdown_dialect: str
    len_unit: str
    emoji: str = "\U0001f50c"
    platform_hint: str = ""
    pii_safe: bool = False
    supports_context: bool = False
    supports_inchannel_continuable: bool = False
    supports_block_formatting: bool = False
    supported_ops: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> "CapabilityDescriptor":
        """Parse a wire descriptor; raises L{BadDescriptor} when it is unusable."""
        if not isinstance(data, Mapping):
            raise BadDescriptor(f"descriptor is a {type(data).__name__}, not an object")
        known = {f.name: f for f in fields(cls)}
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise BadDescriptor(f"descriptor lacks required keys {missing}")
        values = {k: v for k, v in data.items() if k in known}
        mml = values.get("max_message_length")
        try:
            if int(mml) <= 0:
                values["max_message_length"] = DEFAULT_MAX_MESSAGE_LENGTH
        except (TypeError, ValueError):
            values["max_message_length"] = DEFAULT_MAX_MESSAGE_LENGTH
        ops = values.get("supported_ops", ())
        if isinstance(ops, (list, tuple)):
            values["supported_ops"] = tuple(str(op) for op in ops
                                            if isinstance(op, str) and op.strip())
        else:
            values["supported_ops"] = ()
        return cls(**values)

    @property
    def max_length(self) -> int:
        """C{max_message_length} as an int (the wire may carry a numeric string)."""
        try:
            return int(self.max_message_length)
        except (TypeError, ValueError):
            return DEFAULT_MAX_MESSAGE_LENGTH

    @property
    def len_fn(self) -> Callable[[str], int]:
        return utf16_len if self.len_unit == "utf16" else codepoint_len

    @property
    def supports_code_blocks(self) -> bool:
        return self.markdown_dialect not in ("", "plain")

    def supports_op(self, op: str) -> bool:
        """Whether the connector advertised C{op} (an empty list means the legacy set)."""
        if not self.supported_ops:
            return op in LEGACY_OPS
        return op in self.supported_ops

    @property
    def lists_ops(self) -> bool:
        """True when the connector advertised its ops explicitly (a later connector)."""
        return bool(self.supported_ops)


REQUIRED_FIELDS = (
    "contract_version", "platform", "label", "max_message_length",
    "supports_draft_streaming", "supports_edit", "supports_threads",
    "markdown_dialect", "len_unit",
)


def placeholder_descriptor(platform: str = "relay") -> CapabilityDescriptor:
    """What the adapter assumes before the first handshake (0.19.0's registry placeholder)."""
    return CapabilityDescriptor(
        contract_version=1, platform=platform, label="Relay", max_message_length=4096,
        supports_draft_streaming=False, supports_edit=True, supports_threads=False,
        markdown_dialect="plain", len_unit="chars",
    )
