"""Which files are videos, by name: what a directory walk (``vidq submit DIR``) and an
object-store listing (``vidq submit s3://bucket/prefix/``) pick up when no ``--glob``
is given. A file is only ever *opened* after the checks of vidq/media.py."""

from __future__ import annotations

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .m2ts .mts .wmv .flv .3gp .ogv".split()
)
"""File name suffixes (lower case) taken for videos."""
