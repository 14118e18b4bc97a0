"""Checks on a video path before anything opens it (shared by producer and worker).

FFmpeg treats many strings as protocols (``concat:``, ``pipe:``, ``http:``...),
so a path is only ever opened after it resolves to a regular file under one of
the configured media roots. Object-store URIs (``s3://...``) are not FFmpeg's to
open: they go through vidq/storage.py, under the same roots and limits.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from vidq import storage
from vidq.errors import InputError, OutsideRootsError, TransientError


class VideoSource(Protocol):
    """What FFmpeg reads a video from: a seekable binary file (PyAV calls these)."""

    def read(self, n: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


# "scheme:" at the start, as FFmpeg's protocol detection reads it (a Windows drive letter aside).
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def _local_roots(raw: str, media_roots: tuple[str, ...]) -> list[Path] | None:
    """The local media roots, resolved; None when nothing is restricted. Roots that are
    all object-store prefixes refuse every local path (an empty list is no escape)."""
    if not media_roots:
        return None
    local, _objects = storage.split_roots(media_roots)
    if not local:
        raise InputError(f"{raw}: refused: VIDQ_MEDIA_ROOTS lists only object-store "
                         "prefixes, no local directory.", kind="refused_path")
    return [Path(r).expanduser().resolve() for r in local]


def check_video_path(
    raw: str, *, media_roots: tuple[str, ...] = (), max_file_bytes: int = 0
) -> Path:
    """Resolve ``raw`` to a regular file under a media root, or raise InputError.

    Error kinds: ``refused_path`` (protocol string, outside the roots, device file,
    symlink escape), ``not_found``, ``not_a_file``, ``unreadable``, ``empty``,
    ``over_limit``.
    """
    if "\x00" in raw:
        raise InputError(f"{raw!r}: refused: path contains a NUL byte.", kind="refused_path")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        # A name of undecodable bytes (os.fsdecode's surrogates): no SQL text column can
        # hold it, so it is refused here rather than aborting a whole submission there.
        shown = os.fsencode(raw).decode("utf-8", "backslashreplace")
        raise InputError(
            f"{shown}: refused: the file name is not valid UTF-8; rename the file.",
            kind="bad_name",
        ) from None
    if _PROTOCOL.match(raw) and not (len(raw) > 1 and raw[1] == ":" and os.name == "nt"):
        scheme = raw.split(":", 1)[0]
        raise InputError(
            f"{raw}: refused: '{scheme}:' would be read as an FFmpeg protocol, not a file path.",
            kind="refused_path",
        )
    path = Path(raw).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise InputError(f"{raw}: no such file.", kind="not_found") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permission on a parent
        raise InputError(f"{raw}: cannot resolve path ({exc}).", kind="refused_path") from None
    roots = _local_roots(raw, media_roots)
    if roots is not None:
        if not any(resolved == r or r in resolved.parents for r in roots):
            raise OutsideRootsError(
                f"{raw}: refused: resolves outside VIDQ_MEDIA_ROOTS "
                f"({os.pathsep.join(media_roots)}).",
                kind="refused_path",
            )
    try:
        st = resolved.stat()
    except OSError as exc:
        raise InputError(f"{raw}: cannot stat ({exc.strerror}).", kind="unreadable") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{raw}: is a directory, not a video file.", kind="not_a_file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{raw}: refused: not a regular file (device, FIFO or socket).", kind="refused_path"
        )
    if not os.access(resolved, os.R_OK):
        raise InputError(f"{raw}: permission denied.", kind="unreadable")
    if st.st_size == 0:
        raise InputError(f"{raw}: empty file (0 bytes).", kind="empty")
    if max_file_bytes and st.st_size > max_file_bytes:
        raise InputError(
            f"{raw}: {st.st_size} bytes is over the limit VIDQ_MAX_FILE_BYTES={max_file_bytes}.",
            kind="over_limit",
        )
    return resolved


def check_input(
    raw: str, *, media_roots: tuple[str, ...] = (), max_file_bytes: int = 0,
    storage_config: storage.StorageConfig | None = None, read_metadata: bool = True,
) -> str:
    """``check_video_path`` for a local path, ``storage.check_object`` for a URI: the
    checked path, or the URI in its canonical form. ``read_metadata=False`` checks a
    URI against the roots only, with no request: for a caller that opens it next with
    ``open_video``, which reads the metadata (and refuses by it) anyway."""
    if storage.is_uri(raw):
        if not read_metadata:
            storage.check_roots(storage.ObjectURI.parse(raw, prefix=True), raw, media_roots)
            return str(storage.ObjectURI.parse(raw))
        return str(storage.check_object(raw, media_roots=media_roots,
                                        max_file_bytes=max_file_bytes,
                                        storage=storage_config or storage.StorageConfig()).uri)
    return str(check_video_path(raw, media_roots=media_roots, max_file_bytes=max_file_bytes))


@contextlib.contextmanager
def open_video(
    raw: str, *, media_roots: tuple[str, ...] = (), max_file_bytes: int = 0,
    storage_config: storage.StorageConfig | None = None,
) -> Iterator[VideoSource]:
    """Check ``raw``, open it once, and yield what FFmpeg must open: for a local file a
    ``HashingReader`` over the descriptor (the decoder's bytes are hashed as it reads
    them), for an object-store URI a seekable file object (vidq/storage.py). The checks
    are then repeated on what was actually opened, so a path swapped between the check
    and the open (a symlink, a FIFO, a directory moved outside the media roots) is
    refused instead of escaping the roots or blocking."""
    if storage.is_uri(raw):
        with storage.open_object(raw, media_roots=media_roots, max_file_bytes=max_file_bytes,
                                 storage=storage_config or storage.StorageConfig()) as fh:
            yield fh
        return
    resolved = check_video_path(raw, media_roots=media_roots, max_file_bytes=max_file_bytes)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"{raw}: refused: changed while opening ({exc.strerror}).",
                         kind="refused_path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{raw}: refused: not a regular file once opened.",
                             kind="refused_path")
        if max_file_bytes and st.st_size > max_file_bytes:
            raise InputError(f"{raw}: {st.st_size} bytes is over the limit "
                             f"VIDQ_MAX_FILE_BYTES={max_file_bytes}.", kind="over_limit")
        proc = f"/proc/self/fd/{fd}"
        roots = _local_roots(raw, media_roots)
        if roots is not None and os.path.exists(proc):  # without procfs: the checked path
            real = Path(os.readlink(proc))
            if not any(real == r or r in real.parents for r in roots):
                raise OutsideRootsError(f"{raw}: refused: the file opened is outside "
                                 "VIDQ_MEDIA_ROOTS.", kind="refused_path")
        yield HashingReader(fd, raw=raw)
    finally:
        os.close(fd)


class HashingReader:
    """A seekable, read-only file over an opened descriptor, for FFmpeg (PyAV reads it
    through Python), that hashes every byte of the file as the decoder read it.

    Bytes read in order are hashed as they are read. What the decoder skipped (a seek
    forward over frames it did not need) or read out of order (an MP4's index at the
    end, read first) is hashed from the descriptor by ``sha256()``, after the decode,
    so the digest always covers the whole file. Compared with the hash taken at submit
    (``changed_since_submit``), it proves that the labels were computed from the bytes
    submitted, whatever happened to the path in between (a same-size replacement with
    its mtime restored included). The descriptor stays the caller's to close."""

    def __init__(self, fd: int, *, raw: str) -> None:
        self.fd, self.raw = fd, raw
        self._pos = 0
        self._digest = hashlib.sha256()
        self._hashed = 0
        """Bytes [0, _hashed) are in the digest."""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(0, os.fstat(self.fd).st_size - self._pos)
        data = os.pread(self.fd, n, self._pos)
        start, end = self._pos, self._pos + len(data)
        if start <= self._hashed < end:
            self._digest.update(memoryview(data)[self._hashed - start:])
            self._hashed = end
        self._pos = end
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = os.fstat(self.fd).st_size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def sha256(self) -> str:
        """The SHA-256 of the whole file: what was read in order, then the rest read
        from the descriptor now."""
        while chunk := os.pread(self.fd, 1 << 20, self._hashed):
            self._digest.update(chunk)
            self._hashed += len(chunk)
        return self._digest.copy().hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


CHECK_TIMEOUT_S = 60.0
"""How long the commit's check of a local file may take (a stat, and a hash only when
its size or mtime moved and the decoder's hash is not at hand) before the attempt is
given back as this host's transient failure: a hung mount must not hang the job."""


def changed_since_submit(
    path: str, *, size_bytes: int, mtime_ns: int | None, content_sha256: str,
    read_sha256: str | None = None, storage_config: storage.StorageConfig | None = None,
    timeout_s: float = CHECK_TIMEOUT_S,
) -> InputError | None:
    """Why the file at ``path`` is not the one submitted, or None if it is.

    ``read_sha256``, the hash of the bytes the decoder read (``HashingReader``), is the
    proof that counts: when it differs from the hash taken at submit, the labels are
    another file's, whatever the path's size and mtime say (a same-size replacement with
    its mtime restored). The path itself is then checked without following a symlink or
    opening a FIFO (``O_NOFOLLOW | O_NONBLOCK``, then ``fstat``: a regular file or
    refused): a path that is no longer a regular file, or whose size changed, is
    refused. Without the decoder's hash, same size and mtime (to the nanosecond) is the
    same file, as make and rsync assume, and a moved mtime has the content hashed again
    through the descriptor (a file merely touched passes); rows recorded before mtimes
    were (``mtime_ns`` NULL) are checked by size. A path this host can no longer open
    or read says nothing of the bytes the decoder hashed (the result stands) and, without
    that hash, is this host's trouble (``unreadable_here``: kind ``not_found`` or
    ``unreadable``, given back to the queue by the worker), not a change. All of it
    within ``timeout_s``, or TransientError (the mount hangs: the host's trouble, not
    the video's). An object-store URI is checked on its metadata
    (``storage.object_changed``): the store's checksum or ETag is its content hash."""
    if storage.is_uri(path):
        return storage.object_changed(path, size_bytes=size_bytes, modified_ns=mtime_ns,
                                      content_hash=content_sha256,
                                      storage=storage_config or storage.StorageConfig())
    if read_sha256 is not None and read_sha256 != content_sha256:
        return InputError(
            f"{path}: the file read is not the one submitted (its content hash differs); "
            "results were not written. Submit it again to classify the new content.",
            kind="changed_since_submit",
        )
    return _within(timeout_s, path, lambda: _local_changed(
        path, size_bytes=size_bytes, mtime_ns=mtime_ns, content_sha256=content_sha256,
        verified=read_sha256 is not None))


def _local_changed(path: str, *, size_bytes: int, mtime_ns: int | None, content_sha256: str,
                   verified: bool) -> InputError | None:
    def changed(why: str) -> InputError:
        return InputError(f"{path}: {why} since it was submitted; results were not written. "
                          "Submit it again to classify what is there now.",
                          kind="changed_since_submit")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return changed("refused: the path became a symbolic link")
        if verified:
            return None  # the bytes classified were the submitted ones, wherever they went
        return unreadable_here(path, exc)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return changed("refused: the path is no longer a regular file (a FIFO, "
                           "device, socket or directory)")
        if st.st_size != size_bytes:
            return changed(f"the file changed ({size_bytes} bytes then, {st.st_size} now)")
        if verified or mtime_ns is None or st.st_mtime_ns == mtime_ns:
            return None  # the decoder's hash proved the bytes; or the same file by its stat
        return _same_content(fd, path, content_sha256, changed)
    finally:
        os.close(fd)


def unreadable_here(path: str, exc: OSError) -> InputError:
    """The file cannot be opened or read on this host at commit: the host's trouble (its
    mount went away, a permission) until another host agrees, not the video's. Kind
    ``not_found`` or ``unreadable``, which the worker treats as host-local."""
    gone = exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.ENODEV)
    return InputError(f"{path}: no longer readable on this host ({exc.strerror}) since it "
                      "was submitted; results were not written.",
                      kind="not_found" if gone else "unreadable")


def _same_content(fd: int, path: str, content_sha256: str,
                  changed: Callable[[str], InputError]) -> InputError | None:
    digest = hashlib.sha256()
    offset = 0
    try:
        while chunk := os.pread(fd, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
    except OSError as exc:
        return unreadable_here(path, exc)
    return None if digest.hexdigest() == content_sha256 else changed(
        "the file changed (its content hash differs)")


def _within(timeout_s: float, path: str,
            check: Callable[[], InputError | None]) -> InputError | None:
    """``check()`` in a thread of its own, waited for ``timeout_s`` at most: a read
    blocked on a hung mount cannot be interrupted, only left behind."""
    returned: list[InputError | None] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            returned.append(check())
        except BaseException as exc:  # re-raised in the caller's thread
            raised.append(exc)

    thread = threading.Thread(target=run, name="vidq-input-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if raised:
        raise raised[0]
    if not returned:
        raise TransientError(f"{path}: could not be checked within {timeout_s:g} s (a hung "
                             "mount?); the job goes back to the queue.", kind="check_timeout")
    return returned[0]
