# -*- test-case-name: tests.test_api_server -*-
"""
The HTTP-level rules of the API server platform, as pure functions: request validation and
session-id derivation (proxy.md §2.4), error bodies, CORS and security headers (§2.6).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

MAX_REQUEST_BYTES = 10_000_000
MAX_SESSION_ID = 256
MAX_TEXT = 65_536
MAX_PARTS = 1_000
_TRUE = {"true", "1", "yes", "on"}

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "X-XSS-Protection": "0",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


class ChatRequestError(Exception):
    def __init__(self, status: int, message: str, code: str,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


@dataclass(frozen=True)
class ChatRequest:
    text: str  # the last user message: this turn's input
    system: str  # system messages joined with newlines
    session_id: str
    stream: bool
    model: str | None


def error_body(message: str, kind: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def apply_common_headers(request: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)


def cors_rejects(origin: str, allowed: tuple[str, ...]) -> bool:
    return "*" not in allowed and origin not in allowed


def flatten_content(content: Any) -> str:
    """Text of a message's content: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content[:MAX_TEXT]
    if isinstance(content, list):
        if len(content) > MAX_PARTS:
            raise ChatRequestError(400, "Too many content parts", "too_many_parts")
        texts = []
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("file", "input_file"):
                raise ChatRequestError(400, "File content parts are not supported",
                                       "unsupported_content_type")
        return "\n".join(texts)[:MAX_TEXT]
    return ""


def session_id_problem(session_id: str) -> str | None:
    if len(session_id) > MAX_SESSION_ID:
        return "Session ID too long"
    if any(c in session_id for c in "\r\n\x00"):
        return "Invalid session ID"
    if ".." in session_id or session_id.startswith(("/", "\\")) or "/" in session_id \
            or "\\" in session_id:
        return "Invalid session ID"
    return None


def derive_session_id(system: str, first_user: str) -> str:
    """hermes's stateless-client session id: clients that resend history land together."""
    return "api-" + hashlib.sha256(f"{system}\n{first_user}".encode()).hexdigest()[:16]


def parse_chat_request(body: bytes, session_header: str | None) -> ChatRequest:
    """Validate a /v1/chat/completions body; raises L{ChatRequestError} with hermes's texts."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ChatRequestError(400, "Invalid JSON in request body", "invalid_json")
    if not isinstance(data, dict):
        raise ChatRequestError(400, "Invalid JSON in request body", "invalid_json")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError(400, "Missing or invalid 'messages' field", "invalid_messages")
    system_parts, users, last_text = [], [], None
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role in ("system", "developer"):
            system_parts.append(flatten_content(message.get("content")))
        elif role in ("user", "assistant"):
            text = flatten_content(message.get("content"))
            if role == "user":
                users.append(text)
            last_text = (role, text)
    if not users or last_text is None or last_text[0] != "user":
        raise ChatRequestError(400, "No user message found in messages", "no_user_message")
    system = "\n".join(p for p in system_parts if p)
    if session_header is not None:
        problem = session_id_problem(session_header)
        if problem:
            raise ChatRequestError(400, problem, "invalid_session_id")
        session_id = session_header
    else:
        session_id = derive_session_id(system, users[0])
    stream = data.get("stream")
    if isinstance(stream, str):
        stream = stream.strip().lower() in _TRUE
    model = data.get("model") if isinstance(data.get("model"), str) else None
    return ChatRequest(text=last_text[1], system=system, session_id=session_id,
                       stream=bool(stream), model=model)
