"""Reading a user's file (config, study file, CSV, image) with one clear error for each way it
can be wrong: missing, a folder, unreadable, not UTF-8 text."""

from __future__ import annotations

from pathlib import Path

from flexunet.errors import FlexUNetError


def read_bytes(path: Path, kind: str, error: type[FlexUNetError], missing_hint: str = "") -> bytes:
    """The file's bytes; ``kind`` names it in the errors ("a folder, not an image")."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {kind} not found{missing_hint}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not {_article(kind)} {kind}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None


def read_text(path: Path, kind: str, error: type[FlexUNetError], missing_hint: str = "") -> str:
    """The file's text (a UTF-8 byte-order mark, as Windows editors write, is accepted)."""
    try:
        text = read_bytes(path, kind, error, missing_hint).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    if "\x00" in text:
        # UTF-16 without a byte-order mark decodes as "UTF-8" with a NUL in every other byte.
        raise error(f"{path}: not UTF-8 text (it holds NUL characters; UTF-16?)")
    return text


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"
