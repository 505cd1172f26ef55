"""Storage URLs: which is used, what kind it is, and how it is shown (masked) in logs, notes and files.

>>> normalize("postgresql://alice:s3cret@db:5432/optuna")
'postgresql+psycopg://alice:s3cret@db:5432/optuna'
>>> mask("postgresql+psycopg://alice:s3cret@db:5432/optuna")
'postgresql+psycopg://alice:***@db:5432/optuna'
>>> kind("redis://127.0.0.1:6379/0"), public("sqlite:////runs/demo/study.db")
('journal-redis', 'sqlite:///study.db')
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flexunet.errors import ConfigError
from search.paths import RunFolder

ENV_VAR = "FLEXUNET_STORAGE"


def resolve_url(cli_value: str | None, study_value: str | None, out_dir: Path) -> str:
    """``--storage``, then ``$FLEXUNET_STORAGE``, then the study file, then SQLite in ``out_dir``."""
    url = cli_value or os.environ.get(ENV_VAR) or study_value
    if not url:
        return RunFolder(out_dir).sqlite_url()
    return normalize(url)


def normalize(url: str) -> str:
    url = url.strip()
    if not url or any(c in url for c in "\x00\n\r"):
        raise ConfigError("storage URL: empty or holds control characters")
    for plain, driver in (("postgresql://", "postgresql+psycopg://"), ("postgres://", "postgresql+psycopg://"),
                          ("mysql://", "mysql+pymysql://"), ("mariadb://", "mysql+pymysql://")):
        if url.startswith(plain):
            return driver + url[len(plain):]
    return url


def kind(url: str) -> str:
    """'sqlite', 'postgresql', 'mysql', 'journal-file', 'journal-redis' (or the URL's scheme)."""
    if url.startswith("journal:"):
        return "journal-file"
    if url.startswith(("redis://", "rediss://", "unix://")):
        return "journal-redis"
    if url.startswith("grpc://"):
        return "grpc"
    scheme = url.split(":", 1)[0]
    return scheme.split("+", 1)[0]


def mask(url: str) -> str:
    """The URL with its password replaced by ***, safe for logs, notes and reports."""
    return re.sub(r"(//[^/@:]*:)[^@/]*@", r"\1***@", url) if "@" in url else url


def public(url: str) -> str:
    """The URL as exported files may show it: masked, and a local file reduced to its name (an
    absolute path of the machine that made the file says nothing useful elsewhere)."""
    what = kind(url)
    if what == "sqlite":
        return "sqlite:///" + sqlite_path(url).name
    if what == "journal-file":
        return "journal:" + journal_path(url).name
    return mask(url)


def sqlite_path(url: str) -> Path:
    return Path(url.split("///", 1)[-1])


def journal_path(url: str) -> Path:
    path = url[len("journal:"):]
    if path.startswith("///"):
        path = path[2:]
    if not path:
        raise ConfigError("storage URL journal:PATH: the path is missing")
    return Path(path)
