"""Output folders and files that appear whole or not at all.

A command that fails half-way must leave no half-written output behind: folders are built
beside their final place and renamed in when complete, files are written to a temporary name
and renamed over the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flexunet.errors import FlexUNetError

MARKER = ".flexunet-output"


def check_target(final: Path, *, replace: bool = False) -> None:
    """The FlexUNetError :func:`staged_dir` would raise for ``final``, if any: a command that
    computes for a while calls it first, so that a folder it may not replace is refused at once.

    Example::

        >>> check_target(Path("/nonexistent/out"))  # nothing there: fine
    """
    final = Path(final).absolute()
    if final.exists():
        if not final.is_dir():
            raise FlexUNetError(f"{final}: exists and is not a folder")
        if any(final.iterdir()) and not (replace and (final / MARKER).exists()):
            hint = "choose another folder" + (" or pass --force" if not replace else "")
            raise FlexUNetError(f"{final}: folder exists and is not empty; {hint}")


@contextlib.contextmanager
def staged_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh folder that becomes ``final`` when the block ends without error.

    An existing ``final`` is replaced only when ``replace`` is set and it is empty or was itself
    written by flexunet (it holds the marker file); anything else is refused.
    """
    final = Path(final).absolute()
    check_target(final, replace=replace)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700 folders; the output is for everyone
    try:
        (stage / MARKER).write_text("written by flexunet; safe to replace\n", encoding="utf-8")
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(stage, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, final)
    except OSError as exc:  # another process created ``final`` meanwhile
        shutil.rmtree(stage, ignore_errors=True)
        raise FlexUNetError(f"{final}: could not be put in place ({exc.strerror})") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write text so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
