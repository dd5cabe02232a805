"""Argument checks shared by the endpoints: each raises InvalidRequestError before any I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from ._exceptions import InvalidRequestError

__all__ = ("path_segment", "require_bool", "require_text", "text_sequence")


def require_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequestError(f"{name} must not be empty")
    return value


def require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a bool, got {value!r}")
    return value


def path_segment(value: Any, name: str) -> str:
    """``value`` percent-encoded as exactly one path segment."""
    text = require_text(value, name)
    if text in (".", ".."):
        raise InvalidRequestError(f"{name} {text!r} is not a valid id")
    return quote(text, safe="")


def text_sequence(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidRequestError(f"{name} must be a sequence of strings, got {value!r}")
    for item in value:
        require_text(item, f"each of {name}")
    return tuple(value)
