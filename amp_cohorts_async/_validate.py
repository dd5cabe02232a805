"""Argument checks shared by the endpoints: each raises InvalidRequestError before any I/O."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from ._exceptions import InvalidRequestError
from ._models import ExportOptions

__all__ = (
    "export_options",
    "path_segment",
    "require_bool",
    "require_encodable",
    "require_encodable_each",
    "require_id",
    "require_key",
    "require_text",
    "text_path",
    "text_sequence",
)

# Amplitude's ids are short; a longer one cannot be valid and would only make a URL too long.
MAX_ID_LENGTH = 1024


def require_text(value: Any, name: str) -> str:
    """Non-blank text that can be sent (see ``require_encodable``)."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequestError(f"{name} must not be empty")
    return require_encodable(value, name)


def _describe(character: str) -> str:
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:  # how surrogateescape keeps a byte that was not UTF-8
        return f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8"
    return f"a lone surrogate U+{code:04X}"


def require_encodable(text: str, name: str) -> str:
    """``text`` if it can be sent as UTF-8, in a URL, a header or a JSON body.

    Python keeps bytes that were not UTF-8 (in command-line arguments, environment variables,
    file names) as lone surrogates, which no request can carry. The message names the place,
    never the text: it may be a key.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{name} is not valid text: character {exc.start + 1} is {_describe(text[exc.start])}"
        ) from None
    return text


def require_encodable_each(values: Sequence[str], name: str) -> None:
    """``require_encodable`` for each of many strings (``name[i]``), at C speed when all pass:
    only the non-ASCII ones are encoded, and only a failure is looked for one by one."""
    try:
        "".join(itertools.filterfalse(str.isascii, values)).encode("utf-8")
    except UnicodeEncodeError:
        for position, value in enumerate(values):
            require_encodable(value, f"{name}[{position}]")


def require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a bool, got {value!r}")
    return value


def require_id(value: Any, name: str) -> str:
    """A cohort or request id: non-empty text that can travel as one path segment."""
    text = require_text(value, name)
    if text in (".", ".."):
        raise InvalidRequestError(f"{name} {text!r} is not a valid id")
    if len(text) > MAX_ID_LENGTH:
        raise InvalidRequestError(f"{name} is {len(text):,} characters; at most {MAX_ID_LENGTH}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidRequestError(f"{name} must not contain control characters")
    return text


def require_key(value: Any, name: str) -> str:
    """An API key or secret key. Messages name the key, never show it.

    A key copied with a line break or a space around it, or holding a control character, would
    only be refused by Amplitude as a bad key (401); a ``:`` in the API key would move the
    split of the Basic token (RFC 7617: the user-id part cannot hold one).
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{name} must be a non-empty string")
    require_encodable(value, name)
    if value != value.strip():
        raise InvalidRequestError(f"{name} has a space or line break around it (copied with "
                                  "it?); pass the key alone")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidRequestError(f"{name} must not contain control characters")
    if name == "api_key" and ":" in value:
        raise InvalidRequestError("api_key must not contain ':' (it separates the keys in the "
                                  "Basic token)")
    return value


def path_segment(text: str) -> str:
    """A validated id percent-encoded as exactly one path segment."""
    return quote(text, safe="")


def export_options(props: Any, prop_keys: Any) -> ExportOptions:
    require_bool(props, "props")
    keys = text_sequence(prop_keys, "prop_keys")
    if keys and not props:
        raise InvalidRequestError("prop_keys needs props=True")
    return ExportOptions(props=props, prop_keys=keys)


def text_sequence(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidRequestError(f"{name} must be a sequence of strings, got {value!r}")
    for item in value:
        require_text(item, f"each of {name}")
    return tuple(value)


def text_path(value: Any, name: str) -> str:
    """A filesystem path given as ``str`` or ``os.PathLike``: non-empty text, no NUL byte."""
    if not isinstance(value, str | os.PathLike):
        raise InvalidRequestError(f"{name} must be a path, got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidRequestError(f"{name} must be a non-empty text path without NUL bytes")
    return text
