"""Checks on a video path before anything opens it (shared by producer and worker).

FFmpeg treats many strings as protocols (``concat:``, ``pipe:``, ``http:``...),
so a path is only ever opened after it resolves to a regular file under one of
the configured media roots. Object-store URIs (``s3://...``) are not FFmpeg's to
open: they go through vidq/storage.py, under the same roots and limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from vidq import storage
from vidq.errors import InputError, OutsideRootsError

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
) -> Iterator[str | IO[bytes]]:
    """Check ``raw``, open it once, and yield what FFmpeg must open: for a local file
    the descriptor's ``/proc/self/fd/N``, for an object-store URI a seekable file
    object (vidq/storage.py). The checks are then repeated on what was actually opened,
    so a path swapped between the check and the open (a symlink, a FIFO, a directory
    moved outside the media roots) is refused instead of escaping the roots or blocking."""
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
        if not os.path.exists(proc):  # no procfs: the checked path is the best we have
            yield str(resolved)
            return
        roots = _local_roots(raw, media_roots)
        if roots is not None:
            real = Path(os.readlink(proc))
            if not any(real == r or r in real.parents for r in roots):
                raise OutsideRootsError(f"{raw}: refused: the file opened is outside "
                                 "VIDQ_MEDIA_ROOTS.", kind="refused_path")
        yield proc
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def changed_since_submit(
    path: str, *, size_bytes: int, mtime_ns: int | None, content_sha256: str,
    storage_config: storage.StorageConfig | None = None,
) -> InputError | None:
    """Why the file at ``path`` is not the one submitted, or None if it is.

    The cheap check first: same size and modification time (to the nanosecond) means
    the same file, as make and rsync assume. Only when either differs is the content
    hashed again (a full read of the file), so a file merely touched, or copied back
    unchanged, still passes, and the usual case costs one stat(). Rows recorded before
    mtimes were (``mtime_ns`` NULL) are checked by size, then by hash. An object-store
    URI is checked the same way on its metadata (``storage.object_changed``)."""
    if storage.is_uri(path):
        return storage.object_changed(path, size_bytes=size_bytes, modified_ns=mtime_ns,
                                      content_hash=content_sha256,
                                      storage=storage_config or storage.StorageConfig())
    try:
        st = os.stat(path)
    except OSError as exc:
        return InputError(f"{path}: no longer readable since it was submitted ({exc.strerror}).",
                          kind="changed_since_submit")
    if st.st_size == size_bytes and (mtime_ns is None or st.st_mtime_ns == mtime_ns):
        return None
    try:
        if sha256_file(path) == content_sha256:
            return None
    except OSError as exc:
        return InputError(f"{path}: no longer readable since it was submitted ({exc.strerror}).",
                          kind="changed_since_submit")
    return InputError(
        f"{path}: the file changed after it was submitted (its content hash differs); "
        "results were not written. Submit it again to classify the new content.",
        kind="changed_since_submit",
    )
