"""Videos in object storage (``s3://``, ``gs://``, ``az://``...) through fsspec, under
the same rules as local files; shared by producer and worker.

- **Access.** A URI is parsed and checked against the object roots of
  ``VIDQ_MEDIA_ROOTS`` before any request is made: same scheme (aliases folded:
  ``s3a`` is ``s3``), same bucket, and a key under the root's prefix segment by
  segment, so ``s3://b/videos-evil/`` is not under ``s3://b/videos``. Keys with
  empty, ``.`` or ``..`` segments, backslashes, ``?`` or ``#`` are refused: stores
  and proxies disagree on what they mean.
- **Limits.** An object's size comes from its metadata (one HEAD) before a byte is
  read, and the reader refuses bytes past ``VIDQ_MAX_FILE_BYTES`` whatever the
  metadata said.
- **Streaming.** A worker hands FFmpeg a seekable fsspec file with a small block
  cache: range requests, never the whole object on disk. MP4s with the index at
  the end cost a few more requests (FFmpeg seeks there and back). Only a file
  that cannot seek is spooled to a temporary file, bounded by the size limit.
- **Identity.** ``content_hash`` is a real hash of the content: the object's
  full-object SHA-256 checksum or a local-style SHA-256 of its bytes (64 hex
  digits, the same form as a local file's, so both dedupe against each other),
  or, for an S3 single-part upload, its ETag, the MD5 of the content, as
  ``md5:<hex>``. Multipart ETags (``...-N``) and SSE-KMS/SSE-C ETags are not
  content hashes: those objects are hashed.

fsspec and its filesystems are imported only when a URI is used: a producer
that only sees local paths never loads them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import errno
import functools
import hashlib
import json
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from vidq.errors import ConfigError, InputError, TransientError, VidqError
from vidq.formats import VIDEO_EXTENSIONS

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from vidq.settings import Settings

SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az",
           "abfss": "az", "adl": "adl", "oss": "oss"}
"""Object stores accepted as inputs, to their canonical scheme. Others (``http:``,
``ftp:``, ``memory:``, fsspec's chained ``a::b``) would let a job make a worker fetch
anything, so they are refused like FFmpeg protocols."""

PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "az": "adlfs", "adl": "adlfs", "oss": "ossfs"}
"""The fsspec implementation each canonical scheme needs."""

READ_BLOCK_BYTES = 8 * 2**20
"""One range request. Video bitrates are far below what 8 MiB requests sustain."""

READ_CACHE_BLOCKS = 4
"""Blocks a reader keeps (at most 32 MiB per open video): an MP4's index at the end
and the media at the start both stay cached while FFmpeg seeks between them."""

WRITE_PART_BYTES = 8 * 2**20
"""One part of a multipart upload (exports): the most an export holds for the store."""

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,254}$")
_HEX_MD5 = re.compile(r"^[0-9a-f]{32}$")
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "ProfileNotFound", "DefaultCredentialsError", "ClientAuthenticationError"}


def is_uri(raw: str) -> bool:
    """Whether ``raw`` is written as a URI (``scheme://...``) rather than a local path."""
    return _URI.match(raw) is not None


@dataclass(frozen=True)
class ObjectURI:
    """A parsed, checked object-store URI: canonical scheme, bucket and key."""

    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, raw: str, *, prefix: bool = False) -> ObjectURI:
        """Parse ``raw`` or raise InputError (``refused_path``). ``prefix``: a listing or
        a media root, which may name a whole bucket and end with ``/``."""
        m = _URI.match(raw)
        if m is None:
            raise InputError(f"{raw}: not a URI.", kind="refused_path")
        scheme = SCHEMES.get(m.group(1).lower())
        if scheme is None:
            raise InputError(
                f"{raw}: refused: '{m.group(1)}://' is not an object store vidq reads "
                f"(it reads {', '.join(sorted(set(SCHEMES)))}:// and local paths).",
                kind="refused_path")
        rest = m.group(2)
        bucket, _, key = rest.partition("/")
        if any(ord(c) < 32 or ord(c) == 127 for c in raw) or "::" in raw:
            raise InputError(f"{raw!r}: refused: control characters or '::' in a URI.",
                             kind="refused_path")
        if not _BUCKET.match(bucket):
            raise InputError(f"{raw}: refused: {bucket!r} is not a valid bucket name.",
                             kind="refused_path")
        if prefix:
            key = key.rstrip("/")
        if any(c in key for c in "\\?#"):
            raise InputError(f"{raw}: refused: object keys with '\\', '?' or '#' are not "
                             "supported; rename the object.", kind="refused_path")
        if key and any(part in ("", ".", "..") for part in key.split("/")):
            raise InputError(f"{raw}: refused: empty, '.' or '..' segments in the key.",
                             kind="refused_path")
        if not key and not prefix:
            raise InputError(f"{raw}: names a bucket, not an object.", kind="not_a_file")
        return cls(scheme, bucket, key)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    @property
    def fs_path(self) -> str:
        """The path as fsspec filesystems take it (no scheme)."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def within(self, root: ObjectURI) -> bool:
        """Whether this URI is ``root`` or under it, segment by segment."""
        if (self.scheme, self.bucket) != (root.scheme, root.bucket):
            return False
        return not root.key or self.key == root.key or self.key.startswith(root.key + "/")


def split_roots(media_roots: tuple[str, ...]) -> tuple[list[str], list[ObjectURI]]:
    """``VIDQ_MEDIA_ROOTS`` as (local directories, object prefixes)."""
    local, objects = [], []
    for root in media_roots:
        if is_uri(root):
            try:
                objects.append(ObjectURI.parse(root, prefix=True))
            except InputError as exc:
                raise ConfigError(f"VIDQ_MEDIA_ROOTS: {exc.message}") from None
        else:
            local.append(root)
    return local, objects


def check_roots(uri: ObjectURI, raw: str, media_roots: tuple[str, ...]) -> None:
    """Refuse ``uri`` unless a media root holds it (no roots at all: anything goes)."""
    if not media_roots:
        return
    _local, roots = split_roots(media_roots)
    if not any(uri.within(root) for root in roots):
        shown = ", ".join(map(str, roots)) or "no object-store prefix"
        raise InputError(f"{raw}: refused: outside VIDQ_MEDIA_ROOTS ({shown}).",
                         kind="refused_path")


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object stores. Credentials are not here: each filesystem reads its
    own standard environment (for S3, botocore's: AWS_* variables, profiles, roles)."""

    s3_endpoint_url: str = ""
    options_json: str = ""
    """JSON object of fsspec options per scheme (``VIDQ_STORAGE_OPTIONS``)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageConfig:
        return cls(s3_endpoint_url=settings.s3_endpoint_url,
                   options_json=settings.storage_options)

    def options(self, scheme: str) -> dict[str, Any]:
        """The fsspec constructor options for ``scheme`` (canonical)."""
        if not self.options_json:
            parsed: Any = {}
        else:
            try:
                parsed = json.loads(self.options_json)
            except ValueError as exc:
                raise ConfigError(f"VIDQ_STORAGE_OPTIONS is not valid JSON ({exc}).") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
            raise ConfigError('VIDQ_STORAGE_OPTIONS must be a JSON object of objects per '
                              'scheme, e.g. {"s3": {"requester_pays": true}}.')
        found = {SCHEMES.get(k.lower(), k.lower()): v for k, v in parsed.items()}
        options = dict(found.get(scheme, {}))
        if scheme == "s3" and self.s3_endpoint_url:
            options.setdefault("endpoint_url", self.s3_endpoint_url)
        return options

    def filesystem(self, scheme: str) -> AbstractFileSystem:
        """The fsspec filesystem for ``scheme`` (fsspec keeps one instance per options)."""
        return _filesystem(scheme, json.dumps(self.options(scheme), sort_keys=True))


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, options: str) -> AbstractFileSystem:
    package = PACKAGES.get(scheme, scheme + "fs")
    hint = "pip install 'vidq[s3]'" if scheme == "s3" else f"pip install {package}"
    try:
        import fsspec
    except ImportError:
        raise ConfigError(f"reading {scheme}:// URIs needs fsspec and {package}: {hint}."
                          ) from None
    try:
        return fsspec.filesystem(scheme, **json.loads(options))
    except ImportError:
        raise ConfigError(f"reading {scheme}:// URIs needs the {package} package: {hint}."
                          ) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"VIDQ_STORAGE_OPTIONS for {scheme}: {exc}.") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


@contextlib.contextmanager
def storage_errors(raw: str) -> Iterator[None]:
    """Map what fsspec and the stores' SDKs raise to vidq's error taxonomy: a missing
    object or a refusal is the input's fault (permanent), missing credentials are the
    host's configuration (permanent until fixed), and the rest (an endpoint that does
    not answer, a 5xx, a timeout) may heal: transient."""
    try:
        yield
    except VidqError:
        raise
    except FileNotFoundError:
        raise InputError(f"{raw}: no such object.", kind="not_found") from None
    except PermissionError as exc:
        raise InputError(f"{raw}: access denied ({_first_line(exc)}); check that the "
                         "credentials may read it.", kind="unreadable") from None
    except IsADirectoryError:
        raise InputError(f"{raw}: is a prefix, not an object.", kind="not_a_file") from None
    except Exception as exc:  # noqa: BLE001  (every SDK has its own error types)
        name = type(exc).__name__
        if name in _NO_CREDENTIALS:
            raise ConfigError(
                f"{raw}: no credentials for {raw.split(':', 1)[0]}:// ({_first_line(exc)}); "
                "set them the standard way (for S3: AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role).",
                kind="no_credentials") from None
        if name == "FileExpired" or (getattr(exc, "errno", None) == errno.EINVAL
                                     and "recondition" in str(exc)):
            # s3fs reads every range with If-Match on the ETag it opened: fsspec's
            # FileExpired (or a bare 412) says the object changed under the reader.
            raise InputError(f"{raw}: the object was replaced while it was read; results "
                             "were not written.", kind="changed_since_submit") from None
        raise TransientError(f"{raw}: object store unreachable or failing ({name}: "
                             f"{_first_line(exc)}).", kind="storage_unavailable") from None


@dataclass(frozen=True)
class ObjectMeta:
    """What one HEAD of an object says, as vidq uses it."""

    uri: ObjectURI
    size: int
    modified_ns: int | None
    etag: str = ""
    sha256: str | None = None
    """The full-object SHA-256 checksum (hex) when the store keeps one."""
    md5: str | None = None
    """The content's MD5 (hex) when the ETag is one (S3 single-part, not SSE-KMS/C)."""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def known_hash(self) -> str | None:
        """A content hash from metadata alone, in ``jobs.content_sha256``'s forms."""
        if self.sha256:
            return self.sha256
        return f"md5:{self.md5}" if self.md5 else None


def _ns(value: Any) -> int | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return (value - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(
            microseconds=1) * 1000
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    return None


def _s3_head(fs: AbstractFileSystem, uri: ObjectURI) -> ObjectMeta:
    head = fs.call_s3("head_object", Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED")
    etag = str(head.get("ETag", "")).strip('"')
    sha256 = None
    checksum = head.get("ChecksumSHA256")
    # Multipart uploads carry a checksum of the parts' checksums ("...-N", COMPOSITE).
    full_object = head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    if checksum and "-" not in checksum and full_object:
        try:
            raw = base64.b64decode(checksum, validate=True)
            sha256 = raw.hex() if len(raw) == 32 else None
        except (binascii.Error, ValueError):
            sha256 = None
    # An ETag is the content's MD5 only for a single-part upload stored without
    # SSE-KMS or a customer key (S3's documented rule, followed by S3-compatible stores).
    encrypted = (str(head.get("ServerSideEncryption", "")).startswith("aws:kms")
                 or bool(head.get("SSECustomerAlgorithm")))
    md5 = etag if _HEX_MD5.match(etag) and not encrypted else None
    return ObjectMeta(uri=uri, size=int(head["ContentLength"]),
                      modified_ns=_ns(head.get("LastModified")), etag=etag, sha256=sha256,
                      md5=md5, extra={"VersionId": head.get("VersionId")})


def head(uri: ObjectURI, *, storage: StorageConfig, raw: str | None = None) -> ObjectMeta:
    """The object's metadata (one request); errors as ``storage_errors`` maps them."""
    shown = raw or str(uri)
    fs = storage.filesystem(uri.scheme)
    with storage_errors(shown):
        if uri.scheme == "s3":
            return _s3_head(fs, uri)
        info = fs.info(uri.fs_path)
        if info.get("type") != "file":
            raise InputError(f"{shown}: is a prefix, not an object.", kind="not_a_file")
        modified = next((info[k] for k in ("LastModified", "last_modified", "mtime", "updated")
                         if k in info), None)
        return ObjectMeta(uri=uri, size=int(info.get("size") or 0), modified_ns=_ns(modified),
                          etag=str(info.get("ETag") or info.get("etag") or "").strip('"'))


def check_object(
    raw: str, *, media_roots: tuple[str, ...] = (), max_file_bytes: int = 0,
    storage: StorageConfig,
) -> ObjectMeta:
    """Parse ``raw``, refuse it outside the media roots (before any request), then read
    its metadata and refuse an empty or over-limit object, or raise InputError.

    Error kinds as ``check_video_path``'s, plus ``no_credentials`` (ConfigError) and
    ``storage_unavailable`` (TransientError)."""
    # The roots first: a whole bucket outside them is refused as such.
    check_roots(ObjectURI.parse(raw, prefix=True), raw, media_roots)
    uri = ObjectURI.parse(raw)
    meta = head(uri, storage=storage, raw=raw)
    if meta.size == 0:
        raise InputError(f"{raw}: empty object (0 bytes).", kind="empty")
    if max_file_bytes and meta.size > max_file_bytes:
        raise InputError(f"{raw}: {meta.size} bytes is over the limit "
                         f"VIDQ_MAX_FILE_BYTES={max_file_bytes}.", kind="over_limit")
    return meta


def list_objects(
    raw: str, *, recursive: bool, pattern: str | None, storage: StorageConfig,
) -> list[str] | None:
    """The URIs of the video objects under prefix ``raw`` (sorted; by extension, or
    matching ``pattern``), or None when ``raw`` names a single object."""
    uri = ObjectURI.parse(raw, prefix=True)
    fs = storage.filesystem(uri.scheme)
    with storage_errors(raw):
        if uri.key and not raw.endswith("/") and not fs.isdir(uri.fs_path):
            return None
        found = fs.find(uri.fs_path, maxdepth=None if recursive else 1, detail=True)
    under = uri.fs_path + "/"
    out = []
    for name, info in found.items():
        if info.get("type", "file") != "file" or not name.startswith(under):
            continue
        key = PurePosixPath(name)
        if pattern:  # as a local directory's --glob: matched on the name
            if not key.match(pattern):
                continue
        elif key.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        out.append(f"{uri.scheme}://{name}")
    return sorted(out)


class BoundedReader:
    """A seekable, read-only view of an opened object for FFmpeg that refuses bytes past
    ``limit`` (whatever the metadata said) and maps storage errors to vidq's."""

    def __init__(self, fh: IO[bytes], *, raw: str, limit: int) -> None:
        self._fh = fh
        self._raw = raw
        self.limit = limit
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        with storage_errors(self._raw):
            pos = self._fh.tell()
            if self.limit:
                room = self.limit - pos
                n = room + 1 if n is None or n < 0 else min(n, room + 1)
            data = self._fh.read(n)
        self.bytes_read += len(data)
        if self.limit and pos + len(data) > self.limit:
            raise InputError(f"{self._raw}: more than {self.limit} bytes read, over the "
                             f"limit VIDQ_MAX_FILE_BYTES={self.limit}.", kind="over_limit")
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        with storage_errors(self._raw):
            return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._fh.close()


def spool(fh: IO[bytes], *, raw: str, limit: int) -> IO[bytes]:
    """Copy a non-seekable stream into an unnamed temporary file (deleted on close),
    refusing it once it passes ``limit`` bytes; returned at offset 0."""
    tmp = tempfile.TemporaryFile(prefix="vidq-")  # noqa: SIM115  (returned open)
    try:
        copied = 0
        with storage_errors(raw):
            while chunk := fh.read(READ_BLOCK_BYTES):
                copied += len(chunk)
                if limit and copied > limit:
                    raise InputError(f"{raw}: more than {limit} bytes, over the limit "
                                     f"VIDQ_MAX_FILE_BYTES={limit}.", kind="over_limit")
                tmp.write(chunk)
        tmp.seek(0)
        return tmp
    except BaseException:
        tmp.close()
        raise


@contextlib.contextmanager
def open_object(
    raw: str, *, media_roots: tuple[str, ...] = (), max_file_bytes: int = 0,
    storage: StorageConfig,
) -> Iterator[IO[bytes]]:
    """Check ``raw`` (roots, then size from its metadata) and yield a seekable binary
    file of it for FFmpeg: the object itself, read by ranges through a small block
    cache, or, where the filesystem cannot seek, a bounded temporary copy."""
    meta = check_object(raw, media_roots=media_roots, max_file_bytes=max_file_bytes,
                        storage=storage)
    fs = storage.filesystem(meta.uri.scheme)
    with storage_errors(raw):
        fh = fs.open(meta.uri.fs_path, "rb", block_size=READ_BLOCK_BYTES,
                     cache_type="blockcache", cache_options={"maxblocks": READ_CACHE_BLOCKS})
    try:
        if getattr(fh, "seekable", lambda: False)():
            yield BoundedReader(fh, raw=raw, limit=max_file_bytes)  # type: ignore[misc]
        else:
            with spool(fh, raw=raw, limit=max_file_bytes) as tmp:
                yield tmp
    finally:
        with contextlib.suppress(Exception):
            fh.close()


def hash_object(meta: ObjectMeta, *, storage: StorageConfig, algorithm: str = "sha256",
                max_file_bytes: int = 0) -> str:
    """Hash the object's bytes (one sequential read, streamed), as ``jobs.content_sha256``
    holds it: sha256 as 64 hex digits, md5 as ``md5:<hex>``."""
    digest = hashlib.new(algorithm)
    fs = storage.filesystem(meta.uri.scheme)
    with storage_errors(str(meta.uri)), fs.open(
            meta.uri.fs_path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead") as fh:
        reader = BoundedReader(fh, raw=str(meta.uri), limit=max_file_bytes)
        while chunk := reader.read(READ_BLOCK_BYTES):
            digest.update(chunk)
    return digest.hexdigest() if algorithm == "sha256" else f"{algorithm}:{digest.hexdigest()}"


def content_hash(meta: ObjectMeta, *, storage: StorageConfig, max_file_bytes: int = 0) -> str:
    """The object's content hash: from its metadata where that is one, else its bytes."""
    return meta.known_hash or hash_object(meta, storage=storage, max_file_bytes=max_file_bytes)


def object_changed(
    raw: str, *, size_bytes: int, modified_ns: int | None, content_hash: str,
    storage: StorageConfig,
) -> InputError | None:
    """Why the object at ``raw`` is not the one submitted, or None if it is: its size,
    then its ETag/checksum where the recorded hash came from one, then (like a local
    file's mtime) its LastModified; only when none settles it are the bytes hashed."""

    def changed(why: str) -> InputError:
        return InputError(f"{raw}: the object changed after it was submitted ({why}); "
                          "results were not written. Submit it again to classify the new "
                          "content.", kind="changed_since_submit")

    try:
        meta = head(ObjectURI.parse(raw), storage=storage, raw=raw)
    except InputError as exc:
        return _unreadable_now(raw, exc)
    if meta.size != size_bytes:
        return changed(f"{size_bytes} bytes then, {meta.size} now")
    if content_hash.startswith("md5:"):
        if meta.md5 is not None:
            return None if f"md5:{meta.md5}" == content_hash else changed("its ETag differs")
        algorithm = "md5"
    else:
        if meta.sha256 is not None:
            return None if meta.sha256 == content_hash else changed("its checksum differs")
        if modified_ns is not None and meta.modified_ns == modified_ns:
            return None
        algorithm = "sha256"
    try:
        now = hash_object(meta, storage=storage, algorithm=algorithm)
    except InputError as exc:
        return _unreadable_now(raw, exc)
    return None if now == content_hash else changed("its content hash differs")


_HOST_TROUBLE = ("not_found", "unreadable", "no_credentials")
"""Kinds of a read that failed which may be this host's alone (its credentials, its
view of the bucket): they pass through, for the worker to judge as host-local."""


def _unreadable_now(raw: str, exc: InputError) -> InputError:
    return InputError(f"{raw}: no longer readable since it was submitted ({exc.message}).",
                      kind=exc.kind if exc.kind in _HOST_TROUBLE else "changed_since_submit")
