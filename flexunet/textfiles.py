"""Reading a user's text file (config, study file, CSV) with one clear error for each way it can
be wrong: missing, a folder, unreadable, not UTF-8."""

from __future__ import annotations

from pathlib import Path

from flexunet.errors import FlexUNetError


def read_text(path: Path, kind: str, error: type[FlexUNetError], missing_hint: str = "") -> str:
    """The file's text (a UTF-8 byte-order mark, as Windows editors write, is accepted)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: {kind} not found{missing_hint}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {kind}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    if "\x00" in text:
        # UTF-16 without a byte-order mark decodes as "UTF-8" with a NUL in every other byte.
        raise error(f"{path}: not UTF-8 text (it holds NUL characters; UTF-16?)")
    return text
