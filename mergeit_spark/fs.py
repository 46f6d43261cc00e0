"""Files outside Spark: one layer for local disk, object stores and HDFS.

Spark reaches a path through Hadoop's filesystems; everything the driver and the executors' Python
read or write themselves (state records, run logs, the lease, the merge ledger, saved models, the
report, exports, input listing and framing, the Delta logs delta-rs reads) goes through a
:class:`Location` made here by :func:`resolve`. One URI names a place for both: ``s3a://`` (and
``s3://``), ``gs://``, ``abfss://`` / ``abfs://``, ``hdfs://``, ``file://`` and plain paths (local,
qualified as ``file://`` for Spark). The Python side is ``pyarrow.fs``.

Credentials are never settings: S3 takes them the way every AWS SDK does (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, the shared credentials file, the instance
role); ``storage.endpoint_url`` (or ``AWS_ENDPOINT_URL``) points at an S3-compatible server, with
path-style addressing there; ``storage.region`` or ``AWS_REGION``. GCS, ADLS and HDFS take their
own SDK's environment (application default credentials, ``AZURE_STORAGE_*``, ``CLASSPATH`` and
``HADOOP_HOME`` for libhdfs).

Atomicity: :meth:`Location.write_bytes` replaces an object whole (a rename on POSIX, one PUT on an
object store); :meth:`Location.create` is exclusive (``O_EXCL`` on POSIX, ``If-None-Match: *`` on
S3): of two callers at once exactly one gets True.
"""
from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pyarrow import fs as pafs

S3_SCHEMES = ("s3a", "s3", "s3n")
AZURE_SCHEMES = ("abfss", "abfs")
SCHEMES = (*S3_SCHEMES, "gs", *AZURE_SCHEMES, "hdfs", "file")


class StorageError(RuntimeError):
    """A location this layer cannot reach (an unknown scheme, a store without a needed feature)."""


@dataclass(frozen=True)
class Storage:
    """How to reach object stores: the ``storage.*`` settings, else what the environment says
    (never a credential: those stay with the SDKs, which read them themselves)."""

    endpoint_url: str = ""
    region: str = ""
    options: dict[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_settings(cls, settings: Any | None) -> "Storage":
        if settings is None:
            return cls()
        return cls(settings.endpoint_url, settings.region, dict(settings.options))

    @property
    def endpoint(self) -> str:
        """The S3 endpoint: the setting, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""
        return (self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or "")

    @property
    def configured_region(self) -> str:
        """``storage.region``, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; "" when none is."""
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""

    def region_of(self, bucket: str) -> str:
        """The region to address ``bucket`` in: the configured one; else, on AWS, the bucket's
        own (asked once); else (an S3-compatible server) us-east-1."""
        if self.configured_region:
            return self.configured_region
        return _bucket_region(bucket) if not self.endpoint else "us-east-1"

    def delta_options(self, uri: str) -> dict[str, str]:
        """delta-rs storage options for a table at ``uri`` (no credential: object_store reads
        the AWS variables itself)."""
        options: dict[str, str] = {}
        if _scheme(uri) in S3_SCHEMES:
            options["AWS_REGION"] = self.region_of(urlparse(uri).netloc)
            if self.endpoint:
                options["AWS_ENDPOINT_URL"] = self.endpoint
                options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false"
                if self.endpoint.startswith("http://"):
                    options["AWS_ALLOW_HTTP"] = "true"
        options.update({str(k): str(v) for k, v in self.options.items()})
        return options

    def hadoop_conf(self) -> dict[str, str]:
        """Hadoop s3a settings (without ``spark.hadoop.``) for the endpoint and region; the
        credentials come from s3a's own provider chain (environment, instance role)."""
        region = self.configured_region or ("us-east-1" if self.endpoint else "")
        conf = {"fs.s3a.endpoint.region": region} if region else {}  # else s3a finds each bucket's
        if self.endpoint:
            conf.update({"fs.s3a.endpoint": self.endpoint, "fs.s3a.path.style.access": "true",
                         "fs.s3a.connection.ssl.enabled": str(self.endpoint.startswith("https")).lower()})
        return conf


_default = Storage()


def use_storage(storage: Storage) -> None:
    """Make ``storage`` what :func:`resolve` uses when it is given none, in this process (the
    driver's store sets it from ``storage.*``; executors are handed Locations, storage and all)."""
    global _default
    _default = storage


def default_storage() -> Storage:
    """What :func:`resolve` uses when it is given no storage (see :func:`use_storage`)."""
    return _default


def _scheme(uri: str) -> str:
    scheme = urlparse(uri).scheme
    return scheme if len(scheme) > 1 else ""  # a one-letter scheme is a Windows drive


def qualify(uri: str | os.PathLike[str]) -> str:
    """``uri`` as Spark takes it: a plain or ``file:`` path becomes ``file://`` and its absolute
    path; another scheme's URI is kept, without a trailing slash. Hadoop-style: not
    percent-encoded (Hadoop's ``Path`` encodes what it is given)."""
    text = os.fspath(uri)
    scheme = _scheme(text)
    if scheme in ("", "file"):
        return "file://" + _local_path(text)
    if scheme not in SCHEMES:
        raise StorageError(f"{text}: unknown scheme {scheme}:// (known: {', '.join(SCHEMES)}, or a plain path)")
    return text.rstrip("/")


def _local_path(text: str) -> str:
    """The absolute local path of a plain path or a ``file:`` URI (``file:///p``, ``file:/p``)."""
    if _scheme(text) == "file":
        text = text[len("file://"):] if text.startswith("file://") else text[len("file:"):]
    return os.path.abspath(os.path.expanduser(text))


def resolve(uri: "str | os.PathLike[str] | Location", storage: Storage | None = None) -> "Location":
    """The :class:`Location` of ``uri`` (see :func:`qualify` for what is accepted)."""
    if isinstance(uri, Location):
        return uri if storage is None else resolve(uri.uri, storage)
    text = qualify(uri)
    storage = storage or _default
    scheme = _scheme(text)
    if scheme == "file":
        return Location(text, pafs.LocalFileSystem(), _local_path(text), storage)
    parsed = urlparse(text)
    if scheme in S3_SCHEMES:
        path = f"{parsed.netloc}{parsed.path}"
        region = storage.region_of(parsed.netloc)
        return Location(text, _s3(storage.endpoint, region), path.rstrip("/"), storage)
    if scheme in AZURE_SCHEMES:  # abfss://container@account.dfs.core.windows.net/path
        container, _, host = parsed.netloc.partition("@")
        return Location(text, _azure(host.split(".")[0]), f"{container}{parsed.path}".rstrip("/"), storage)
    filesystem, path = pafs.FileSystem.from_uri(text)  # gs://, hdfs://
    return Location(text, filesystem, path.rstrip("/"), storage)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    return pafs.resolve_s3_region(bucket)


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str, region: str) -> pafs.S3FileSystem:
    options: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc or endpoint, scheme=parsed.scheme or "https",
                       force_virtual_addressing=False)
    return pafs.S3FileSystem(**options)


@functools.lru_cache(maxsize=8)
def _azure(account: str) -> pafs.FileSystem:
    return pafs.AzureFileSystem(account_name=account)


@dataclass(frozen=True)
class Location:
    """A file or folder reachable outside Spark: ``uri`` is what Spark and delta-rs are given,
    ``filesystem`` and ``path`` what pyarrow reads and writes."""

    uri: str
    filesystem: pafs.FileSystem = field(repr=False, compare=False)
    path: str
    storage: Storage = field(repr=False, compare=False)

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> "Location":
        return Location(f"{self.uri}/{name}", self.filesystem, f"{self.path}/{name}", self.storage)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return Location(self.uri.rsplit("/", 1)[0], self.filesystem, self.path.rsplit("/", 1)[0], self.storage)

    @property
    def local(self) -> str | None:
        """The local path, or None on an object store or HDFS."""
        return self.path if isinstance(self.filesystem, pafs.LocalFileSystem) else None

    @property
    def delta_uri(self) -> str:
        """What delta-rs is given: the local path, or the URI."""
        return self.local if self.local is not None else self.uri

    @property
    def s3(self) -> bool:
        return _scheme(self.uri) in S3_SCHEMES

    def delta_options(self) -> dict[str, str]:
        return self.storage.delta_options(self.uri)

    # -- reading ------------------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder: on an object store, a prefix holding at least one object."""
        return self.info().type == pafs.FileType.Directory

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes | None:
        """The whole file, or None when there is none."""
        try:
            with self.filesystem.open_input_stream(self.path) as stream:
                return stream.read()
        except FileNotFoundError:
            return None
        except OSError as exc:  # pyarrow's S3 says "Path does not exist" as a plain OSError
            if "does not exist" in str(exc) or "NoSuchKey" in str(exc) or not self.exists():
                return None
            raise

    def open_input(self):
        """A seekable binary file (pyarrow's ``NativeFile``); raises FileNotFoundError."""
        return self.filesystem.open_input_file(self.path)

    def _listing(self, recursive: bool) -> list[pafs.FileInfo]:
        """What is under this folder (empty when there is no such folder). pyarrow's local listing
        fails when the folder appears between its failed open and its existence check (another
        writer creating it): then it exists, and a second listing sees it."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        try:
            return self.filesystem.get_file_info(selector)
        except FileNotFoundError:
            return self.filesystem.get_file_info(selector)

    def files(self, recursive: bool = False) -> list["Location"]:
        """The files under this folder, by path; none when there is no such folder."""
        infos = self._listing(recursive)
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        return [self._below(p) for p in found]

    def children(self) -> list["Location"]:
        """Files and folders directly under this folder, by name."""
        return [child for child, _ in self.entries()]

    def entries(self) -> list[tuple["Location", pafs.FileType]]:
        """(location, File or Directory) of what is directly under this folder, by name: one
        listing, no request per entry."""
        infos = self._listing(False)
        return [(self._below(i.path), i.type) for i in sorted(infos, key=lambda i: i.path)]

    def _below(self, path: str) -> "Location":
        rel = path[len(self.path):].lstrip("/")
        return Location(f"{self.uri}/{rel}", self.filesystem, path, self.storage)

    # -- writing ------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Replace the file by ``data``, whole or not at all (folders above made as needed)."""
        if self.local is not None:
            folder = os.path.dirname(self.path)
            made = not os.path.isdir(folder)
            os.makedirs(folder, exist_ok=True)
            tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(folder)  # the new name survives a crash, not only the bytes
            if made:
                _fsync_dir(os.path.dirname(folder))
            return
        with self.filesystem.open_output_stream(self.path) as stream:  # one PUT at close
            stream.write(data)

    def create(self, data: bytes) -> bool:
        """Write ``data`` only where no file is (an exclusive create); False when one is there."""
        if self.local is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        if self.s3:
            return _s3_create(self, data)
        raise StorageError(f"{self.uri}: no exclusive create on {_scheme(self.uri)}:// in this build "
                           "(POSIX paths and S3 have one); put the run root on one of those")

    def delete(self) -> None:
        """Remove the file; nothing when there is none."""
        try:
            self.filesystem.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            if self.exists():
                raise

    def delete_tree(self) -> None:
        """Remove the folder and all below it; nothing when there is none."""
        if self.info().type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)

    def make_dirs(self) -> None:
        """The folder, made where a filesystem has folders (object stores need none)."""
        if not isinstance(self.filesystem, pafs.S3FileSystem):
            self.filesystem.create_dir(self.path, recursive=True)

    def upload(self, local: str | os.PathLike[str]) -> None:
        """Copy the local file or folder ``local`` here (a folder: every file below it)."""
        source = Path(local)
        if source.is_dir():
            pafs.copy_files(str(source.absolute()), self.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.filesystem)
        else:
            self.write_bytes(source.read_bytes())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _s3_create(location: Location, data: bytes) -> bool:
    """S3's conditional PUT (``If-None-Match: *``): AWS S3 and S3-compatible servers that have
    it refuse the second of two creates with 412 (or 409 while the first is in flight)."""
    from botocore.exceptions import ClientError

    bucket, _, key = location.path.partition("/")
    try:
        _boto_s3(location.storage.endpoint, location.storage.region_of(bucket)).put_object(
            Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412):
            return False
        raise
    return True


@functools.lru_cache(maxsize=4)
def _boto_s3(endpoint: str, region: str):
    import boto3
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"} if endpoint else {}, retries={"mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)
