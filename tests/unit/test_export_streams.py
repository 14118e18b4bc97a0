"""The pieces of ``vidq export``'s Parquet path that need no database: the COPY stream
read as a file (rows of any size, across buffer boundaries, come out byte for byte)
and the writes done behind the reader (in order, and an encoder's error reaches the
caller). Whole exports on SQLite and PostgreSQL: tests/test_export.py."""

from __future__ import annotations

import io
import random

import pytest

from producer.export import _CopyReader, _written_behind


@pytest.mark.parametrize("buffer_size", [1, 7, 4096, 2**20])
def test_the_copy_reader_hands_over_every_byte_in_order(buffer_size: int) -> None:
    rng = random.Random(buffer_size)
    rows = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
            for _ in range(2_000)]
    # libpq hands over memoryviews, one row each.
    reader = io.BufferedReader(_CopyReader(iter(map(memoryview, rows))),
                               buffer_size=buffer_size)
    got = b"".join(iter(lambda: reader.read(rng.randrange(1, 5000)), b""))
    assert got == b"".join(rows)


def test_writes_behind_run_in_order_and_an_error_reaches_the_caller() -> None:
    done: list[int] = []
    with _written_behind() as behind:
        for i in range(50):
            behind(done.append, i)
    assert done == list(range(50))

    def encoder(i: int) -> None:
        if i == 3:
            raise OSError("disk full")
        done.append(i)

    done.clear()
    with pytest.raises(OSError, match="disk full"), _written_behind() as behind:
        for i in range(10):
            behind(encoder, i)
    assert done == [0, 1, 2]
