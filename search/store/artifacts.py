"""Where trials keep their files (models, training logs, figures, resume checkpoints): an Optuna
artifact store named by a URL.

A URL is a folder (``runs/my-study/artifacts``, the default ``<out>/artifacts``) or
``s3://BUCKET/PREFIX`` on S3 or any S3-compatible server, through Optuna's
:class:`~optuna.artifacts.Boto3ArtifactStore`. The endpoint and the credentials come from the
usual AWS environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or ``AWS_PROFILE``), never from the URL: the
URL is recorded in the study and printed, so it must hold no secret.

Example::

    from search.store import artifacts

    location = artifacts.parse("s3://my-bucket/studies/ct-ich", where="--artifacts")
    assert location.url == "s3://my-bucket/studies/ct-ich"
    store = artifacts.open_store(artifacts.parse("/tmp/artifacts", where="--artifacts"), create=True)
    # store goes to optuna.artifacts.upload_artifact(artifact_store=store, ...), and
    # store.download(storage, trial, "best_model.keras", into=folder) fetches a trial's file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from flexunet.errors import ConfigError, FlexUNetError
from search import keys
from search.store.urls import mask

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

DEFAULT_FOLDER = "artifacts"  # inside the study's output folder
STUDY_ATTR = keys.STUDY_ARTIFACTS
_LEGACY_STUDY_ATTR = keys.STUDY_ARTIFACT_DIR
S3_SCHEME = "s3://"
HINT = "pass --artifacts FOLDER or s3://BUCKET/PREFIX"
# S3's rules for bucket names (the ones every S3-compatible server accepts).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Location:
    """An artifact store's address: a local folder, or a bucket and a key prefix on S3."""

    folder: Path | None = None
    bucket: str | None = None
    prefix: str = ""  # "" or "some/keys/" (ends with a slash)

    @property
    def url(self) -> str:
        """The URL as recorded in the study and printed: an absolute folder, or ``s3://...``."""
        if self.folder is not None:
            return str(self.folder)
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def public(self) -> str:
        """The URL as pages and exported files show it: a folder by its last two parts (an
        absolute path of the machine that wrote the page says nothing useful elsewhere)."""
        if self.folder is not None:
            return str(Path(*self.folder.parts[-2:]))
        return self.url

    def describe(self, public: bool = False) -> str:
        """``artifact folder X`` or ``bucket s3://...``, for messages."""
        where = self.public if public else self.url
        return f"artifact folder {where}" if self.folder is not None else f"bucket {where}"

    def __str__(self) -> str:
        return self.url


def parse(text: str, *, where: str, base: Path | None = None) -> Location:
    """Check an artifact URL; ``where`` names it in errors (an option, a study-file key) and a
    relative folder is taken from ``base`` (default: the current folder)."""
    text = text.strip()
    if not text:
        raise ConfigError(f"{where}: expected a folder or s3://BUCKET/PREFIX, got an empty string")
    if "\x00" in text:
        raise ConfigError(f"{where}: holds a NUL character")
    if "://" not in text:
        return Location(folder=((base or Path.cwd()) / Path(text).expanduser()).absolute())
    if not text.lower().startswith(S3_SCHEME):
        raise ConfigError(f"{where}: {text.split('://', 1)[0]}:// is not a supported artifact store; "
                          "expected a folder or s3://BUCKET/PREFIX")
    rest = text[len(S3_SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or any(c in rest for c in "?#"):
        raise ConfigError(f"{where}: s3://BUCKET/PREFIX takes no credentials, query or endpoint; set "
                          "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL instead")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{where}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, "
                          "dots and hyphens)")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ConfigError(f"{where}: the prefix {prefix!r} holds '.' or '..'")
    return Location(bucket=bucket, prefix="".join(p + "/" for p in parts))


def resolve(cli_value: str | None, study_value: Location | None, out: Path) -> Location:
    """The store a run uses: ``--artifacts``, else the study file's ``[study] artifacts``, else
    ``<out>/artifacts``."""
    if cli_value:
        return parse(cli_value, where="--artifacts")
    if study_value is not None:
        return study_value
    return Location(folder=(out / DEFAULT_FOLDER).absolute())


def recorded(study: optuna.Study) -> Location | None:
    """The store the study recorded when it was created (None if it recorded none)."""
    attrs = study.user_attrs
    text = attrs.get(STUDY_ATTR) or attrs.get(_LEGACY_STUDY_ATTR)
    if not isinstance(text, str) or not text:
        return None
    try:
        return parse(text, where=f"study {study.study_name!r}: {STUDY_ATTR}")
    except ConfigError:
        return None


def mismatch_warning(study: optuna.Study, location: Location) -> str | None:
    """A warning when this launcher's trials keep their files somewhere else than the store the
    study recorded: report, export and the dashboard elsewhere would not find them."""
    theirs = recorded(study)
    if theirs is None or theirs == location:
        return None
    return (f"warning: study {study.study_name!r} keeps its trials' files in {theirs.describe()}; this "
            f"launcher's trials keep theirs in {location.describe()}, which other machines cannot read "
            f"(give every launcher the same --artifacts, e.g. s3://BUCKET/PREFIX)")


# ---------------------------------------------------------------------------------------------
# The store


class MissingArtifact(FlexUNetError):
    """A trial's file is not in (or cannot be read from) the store it was looked for in."""

    def __init__(self, trial: int, filename: str, location: Location, reason: str | None = None) -> None:
        self.trial, self.filename, self.location, self.reason = trial, filename, location, reason
        super().__init__(f"{self.fact(public=False)} ({HINT})")

    def fact(self, public: bool = True) -> str:
        """What is missing and where it was looked for, without the advice."""
        where = self.location.describe(public)
        if self.reason is None:
            return f"trial {self.trial}'s {self.filename} is not in the {where}"
        return f"trial {self.trial}'s {self.filename} cannot be read from the {where} ({self.reason})"


@dataclass(frozen=True)
class Store:
    """An opened artifact store: Optuna's store for ``location`` (it is itself one, for
    ``upload_artifact``, the objective's resume checkpoints and optuna-dashboard), and the
    location, to say where a missing file was looked for."""

    location: Location
    backend: Any  # optuna.artifacts.FileSystemArtifactStore or Boto3ArtifactStore

    def _key(self, artifact_id: str) -> str:
        return self.location.prefix + artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.backend.open_reader(self._key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.backend.write(self._key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self.backend.remove(self._key(artifact_id))

    def read(self, storage: optuna.storages.BaseStorage, trial: FrozenTrial, filename: str) -> bytes:
        """The trial's last upload named ``filename``; raises :class:`MissingArtifact` when the
        store does not have it or cannot give it (FlexUNetError when the trial uploaded none)."""
        from optuna.artifacts.exceptions import ArtifactNotFound

        artifact_id = find(storage, trial, filename)
        if artifact_id is None:  # nothing to look for: no store would have it
            raise FlexUNetError(f"trial {trial.number} has no {filename} artifact")
        try:
            with self.open_reader(artifact_id) as reader:
                return reader.read()
        except ArtifactNotFound:
            raise MissingArtifact(trial.number, filename, self.location) from None
        except Exception as exc:  # I/O and connection errors: name the store and the cause
            raise MissingArtifact(trial.number, filename, self.location, _first_line(exc)) from None

    def download(self, storage: optuna.storages.BaseStorage, trial: FrozenTrial, filename: str,
                 into: Path) -> Path:
        """:meth:`read` into the file ``into/filename``; returns its path."""
        path = into / filename
        path.write_bytes(self.read(storage, trial, filename))
        return path


def find(storage: optuna.storages.BaseStorage, trial: FrozenTrial, filename: str) -> str | None:
    """The artifact id of the trial's last upload named ``filename`` (None if there is none)."""
    from optuna.artifacts import get_all_artifact_meta

    metas = [m for m in get_all_artifact_meta(trial, storage=storage) if m.filename == filename]
    return metas[-1].artifact_id if metas else None


def open_store(location: Location, *, create: bool = False, check: bool = True) -> Store:
    """Open the store at ``location``. ``create`` makes a missing folder (workers); ``check``
    makes sure the folder or the bucket is there and reachable, so that a wrong URL fails once,
    in one line, instead of at every file."""
    if location.folder is not None:
        from optuna.artifacts import FileSystemArtifactStore

        if create:
            try:
                location.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FlexUNetError(f"{location.folder}: cannot create the artifact folder "
                                    f"({exc.strerror or exc})") from None
        elif check and not location.folder.is_dir():
            raise FlexUNetError(f"{location.folder}: artifact folder not found ({HINT})")
        return Store(location, FileSystemArtifactStore(str(location.folder)))
    client = _s3_client(location)
    if check:
        _check_bucket(client, location)
    from optuna.artifacts import Boto3ArtifactStore

    return Store(location, Boto3ArtifactStore(location.bucket or "", client=client))


def _s3_client(location: Location) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise FlexUNetError(f"{location.url}: an S3 artifact store needs boto3 "
                            "(pip install 'flexunet-search[s3]')") from None
    import logging

    logging.getLogger("botocore").setLevel(logging.WARNING)  # not "Found credentials in ..." on every start
    # Standard retries: a worker rides out a brief outage of the server instead of failing its
    # trial; a wrong endpoint still fails within seconds.
    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=120)
    try:
        return boto3.session.Session().client("s3", config=config)
    except Exception as exc:  # a malformed AWS_ENDPOINT_URL, an unknown AWS_PROFILE
        raise FlexUNetError(f"{location.url}: cannot set up the S3 client ({_first_line(exc)}; check the "
                            "AWS_* environment variables)") from None


def _check_bucket(client: Any, location: Location) -> None:
    from botocore.exceptions import ClientError, NoCredentialsError

    endpoint = mask(getattr(client.meta, "endpoint_url", "") or "")
    try:
        client.head_bucket(Bucket=location.bucket)
    except NoCredentialsError:
        raise FlexUNetError(f"{location.url}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise FlexUNetError(f"{location.url}: no bucket {location.bucket!r} on {endpoint} "
                                "(create it first)") from None
        if status in (401, 403):
            raise FlexUNetError(f"{location.url}: access denied by {endpoint} (check AWS_ACCESS_KEY_ID "
                                "and AWS_SECRET_ACCESS_KEY)") from None
        raise FlexUNetError(f"{location.url}: {endpoint} answered {_first_line(exc)}") from None
    except Exception as exc:  # connection refused, unknown host, timeouts
        raise FlexUNetError(f"{location.url}: cannot reach {endpoint} ({_first_line(exc)}; check "
                            "AWS_ENDPOINT_URL)") from None


def _first_line(exc: BaseException) -> str:
    return mask((str(exc).strip().splitlines() or [type(exc).__name__])[0])
