"""``vidq export``: a batch's results as files a data tool reads directly.

Three tables, one file each under the output directory:

- ``videos``: one row per job of the batch (every status), its metadata and its
  top-k video labels as ``label_1, class_id_1, score_1, ...``;
- ``clips``: ``clip_predictions``, one row per clip x rank;
- ``segments``: ``label_segments``, one row per segment;
- when the batch kept embeddings (``VIDQ_EMBEDDINGS``): ``video_embeddings`` and, in
  ``clip`` mode, ``clip_embeddings``, their ``vector`` column a fixed-size list of
  float16 in Parquet, an array of numbers in JSON lines, and base64 of the stored
  little-endian float16 bytes in CSV.

Rows stream from the database in pages (``yield_per``: a server-side cursor on
PostgreSQL, SQLite's own stepping) and leave as Parquet row groups
(``pyarrow.parquet.ParquetWriter``), JSON lines or CSV rows, so memory stays flat
however many rows a batch has. Each file is written under a temporary name and
renamed when complete: an interrupted export leaves no half file behind. An
object-store ``--out`` (``s3://bucket/prefix``) is written the same way through
fsspec, streamed in parts; the object appears only when its upload completes, and
a failed one is aborted, so there too no half file is left.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt
import io
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeAlias

from sqlalchemy import Boolean, DateTime, Float, Integer, SmallInteger, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from vidq import storage
from vidq.db import (
    Batch,
    ClipEmbedding,
    ClipPrediction,
    Job,
    LabelSegment,
    VideoEmbedding,
    VideoLabel,
    aware,
    reading_at_the_readers_pace,
)
from vidq.embeddings import floats_from_float16
from vidq.errors import InputError, VidqError

FORMATS = ("parquet", "jsonl", "csv")
PAGE_ROWS = 65_536
"""Rows fetched per database page and written per Parquet row group."""
PAGE_BYTES = 8 * 2**20
"""Tables with a vector column page by size: at most this many bytes of vectors a page
(2,048 rows of 2048 x float16: Parquet's float16 encoder holds several times that),
so memory stays flat whatever the vector size."""
WIDE_PAGE_ROWS = 16_384
"""The videos table (some fifty columns a row, folded in Python): rows per page."""
COPY_BLOCK_BYTES = 2**20
"""PostgreSQL: CSV bytes from ``COPY ... TO STDOUT`` parsed per Arrow batch."""

Column: TypeAlias = "ColumnElement[Any] | InstrumentedAttribute[Any]"
"""A selected column: a labelled expression, or a mapped attribute as it is."""

VIDEO_COLUMNS: tuple[Column, ...] = (
    Job.id.label("job_id"), Batch.name.label("batch"), Job.path, Job.content_sha256,
    Job.size_bytes, Job.status, Job.attempts, Job.error_kind, Job.error_message, Job.model,
    Job.weights, Job.weights_id, Job.precision, Job.device, Job.strategy, Job.clips_requested,
    Job.stride_s, Job.start_sec, Job.crops, Job.duration_s, Job.fps, Job.width, Job.height,
    Job.frames, Job.codec, Job.has_audio, Job.clips_done, Job.decode_s, Job.model_s,
    Job.submitted_at, Job.started_at, Job.finished_at, Job.top_class_id, Job.top_label,
    Job.top_score,
)
CLIP_COLUMNS: tuple[ColumnElement[Any], ...] = tuple(
    getattr(ClipPrediction, c) for c in
    ("job_id", "clip_index", "rank", "start_sec", "end_sec", "class_id", "label", "score"))
SEGMENT_COLUMNS: tuple[ColumnElement[Any], ...] = tuple(
    getattr(LabelSegment, c) for c in
    ("job_id", "segment_index", "label", "class_id", "start_sec", "end_sec", "duration_s",
     "mean_score", "peak_score", "clips"))
VIDEO_EMBEDDING_COLUMNS: tuple[ColumnElement[Any], ...] = tuple(
    getattr(VideoEmbedding, c) for c in ("job_id", "model", "weights_id", "dim", "norm", "vector"))
CLIP_EMBEDDING_COLUMNS: tuple[ColumnElement[Any], ...] = tuple(
    getattr(ClipEmbedding, c) for c in ("job_id", "clip_index", "start_sec", "end_sec", "vector"))


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    """int16 | int64 | float64 | bool | timestamp | string | vector"""
    dim: int = 0
    """``vector``: values per row (float16 bytes in the database)."""


@dataclass(frozen=True)
class TableExport:
    name: str
    fields: list[Field]
    rows: Callable[[], Iterator[Sequence[Any]]]
    page_rows: int = PAGE_ROWS
    query: Select[Any] | None = None
    """Tables of plain columns (numbers and text): their SELECT, which Parquet reads
    into Arrow column by column instead of row by row (``_arrow_batches``)."""


@dataclass
class ExportReport:
    files: dict[str, Path | str]
    """Local paths, or URIs for an object-store export."""
    rows: dict[str, int]


def _kind(column: Column) -> str:
    t = column.type
    if isinstance(t, Boolean):
        return "bool"
    if isinstance(t, DateTime):
        return "timestamp"
    if isinstance(t, Float):
        return "float64"
    if isinstance(t, SmallInteger):
        return "int16"
    if isinstance(t, Integer):  # BigInteger too
        return "int64"
    return "string"


def _fields(columns: Sequence[Column]) -> list[Field]:
    return [Field(c.name, _kind(c)) for c in columns]


def _stream(conn: Connection, stmt: Select[Any], page_rows: int = PAGE_ROWS
            ) -> Iterator[Sequence[Any]]:
    reading_at_the_readers_pace(conn)
    result = conn.execute(stmt.execution_options(yield_per=page_rows))
    for page in result.partitions():
        yield from page


def _binary_stream(conn: Connection, stmt: Select[Any], page_rows: int
                   ) -> Iterator[Sequence[Any]]:
    """Like ``_stream``; on PostgreSQL (psycopg) through a server-side cursor in binary
    format, which hands a ``bytea`` over as its bytes: four times faster than the hex
    text of the default format, for tables of vectors."""
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        yield from _stream(conn, stmt, page_rows)
        return
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    cursor = conn.connection.driver_connection.cursor(  # type: ignore[union-attr]
        name="vidq_export_vectors", binary=True)
    try:
        cursor.itersize = page_rows
        cursor.execute(sql)
        while page := cursor.fetchmany(page_rows):
            yield from page
    finally:
        cursor.close()


def batch_tables(conn: Connection, batch: str) -> list[TableExport]:
    """The three tables of ``batch``, each with its fields and a row stream."""
    bid = conn.scalar(select(Batch.id).where(Batch.name == batch))
    if bid is None:
        raise InputError(f"no batch named {batch!r}; `vidq status` lists what was submitted.",
                         kind="not_found")
    batch_jobs = select(Job.id).where(Job.batch_id == bid).scalar_subquery()
    top_k = conn.scalar(select(func.max(VideoLabel.rank)).where(
        VideoLabel.job_id.in_(select(Job.id).where(Job.batch_id == bid)))) or 1
    label_fields = [Field(f"{name}_{rank}", kind) for rank in range(1, top_k + 1)
                    for name, kind in (("label", "string"), ("class_id", "int16"),
                                       ("score", "float64"))]
    video_fields = _fields(VIDEO_COLUMNS) + label_fields
    n_job = len(VIDEO_COLUMNS)

    def videos() -> Iterator[Sequence[Any]]:
        stmt = (
            select(*VIDEO_COLUMNS, VideoLabel.rank, VideoLabel.label, VideoLabel.class_id,
                   VideoLabel.score)
            .join(Batch, Batch.id == Job.batch_id)
            .outerjoin(VideoLabel, VideoLabel.job_id == Job.id)
            .where(Job.batch_id == bid)
            .order_by(Job.id, VideoLabel.rank)
        )
        # One job's rows (one per rank) arrive together: fold them into one wide row.
        for _job_id, group in itertools.groupby(_stream(conn, stmt, WIDE_PAGE_ROWS),
                                                key=lambda r: r[0]):
            labels: list[Any] = [None] * (3 * top_k)
            job: Sequence[Any] = ()
            for row in group:
                job = row[:n_job]
                rank = row[n_job]
                if rank is not None and rank <= top_k:
                    labels[3 * (rank - 1): 3 * rank] = row[n_job + 1:]
            yield (*job, *labels)

    clip_query = (select(*CLIP_COLUMNS).where(ClipPrediction.job_id.in_(batch_jobs))
                  .order_by(ClipPrediction.job_id, ClipPrediction.clip_index,
                            ClipPrediction.rank))
    segment_query = (select(*SEGMENT_COLUMNS).where(LabelSegment.job_id.in_(batch_jobs))
                     .order_by(LabelSegment.job_id, LabelSegment.segment_index))

    def clips() -> Iterator[Sequence[Any]]:
        return _stream(conn, clip_query)

    def segments() -> Iterator[Sequence[Any]]:
        return _stream(conn, segment_query)

    tables = [TableExport("videos", video_fields, videos, WIDE_PAGE_ROWS),
              TableExport("clips", _fields(CLIP_COLUMNS), clips, query=clip_query),
              TableExport("segments", _fields(SEGMENT_COLUMNS), segments, query=segment_query)]
    return tables + _embedding_tables(conn, batch_jobs)


def _embedding_tables(conn: Connection, batch_jobs: Any) -> list[TableExport]:
    """The embedding tables, when the batch kept any (``VIDQ_EMBEDDINGS``)."""
    dims = list(conn.scalars(select(VideoEmbedding.dim).distinct()
                             .where(VideoEmbedding.job_id.in_(batch_jobs))))
    if not dims:
        return []
    if len(dims) > 1:  # one fixed-size vector column per file
        raise InputError(f"the batch's embeddings have different sizes ({sorted(dims)}); "
                         "export batches of one model.", kind="config")

    def vector_fields(columns: Sequence[ColumnElement[Any]]) -> list[Field]:
        return _fields(columns[:-1]) + [Field("vector", "vector", dims[0])]

    page_rows = max(1, min(PAGE_ROWS, PAGE_BYTES // (2 * dims[0])))

    def videos() -> Iterator[Sequence[Any]]:
        return _binary_stream(conn, select(*VIDEO_EMBEDDING_COLUMNS)
                              .where(VideoEmbedding.job_id.in_(batch_jobs))
                              .order_by(VideoEmbedding.job_id), page_rows)

    def clips() -> Iterator[Sequence[Any]]:
        return _binary_stream(conn, select(*CLIP_EMBEDDING_COLUMNS)
                              .where(ClipEmbedding.job_id.in_(batch_jobs))
                              .order_by(ClipEmbedding.job_id, ClipEmbedding.clip_index),
                              page_rows)

    tables = [TableExport("video_embeddings", vector_fields(VIDEO_EMBEDDING_COLUMNS), videos,
                          page_rows)]
    if conn.scalar(select(ClipEmbedding.job_id).where(ClipEmbedding.job_id.in_(batch_jobs))
                   .limit(1)) is not None:
        tables.append(TableExport("clip_embeddings", vector_fields(CLIP_EMBEDDING_COLUMNS),
                                  clips, page_rows))
    return tables


def export_batch(conn: Connection, *, batch: str, fmt: str, out_dir: str,
                 storage_config: storage.StorageConfig | None = None) -> ExportReport:
    """Write ``out_dir``/{videos,clips,segments}.{fmt} for ``batch``; ``out_dir`` may be
    an object-store prefix (``s3://bucket/exports/b1``)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)}.", kind="config")
    writer = {"parquet": _write_parquet, "jsonl": _write_jsonl, "csv": _write_csv}[fmt]
    destination = (_object_destination(out_dir, storage_config) if storage.is_uri(out_dir)
                   else _local_destination(out_dir))
    tables = batch_tables(conn, batch)  # an unknown batch is refused before a file is made
    report = ExportReport(files={}, rows={})
    for table in tables:
        with destination(f"{table.name}.{fmt}") as (fh, where):
            report.rows[table.name] = (_write_parquet(fh, table, conn) if fmt == "parquet"
                                       else writer(fh, table))
        report.files[table.name] = where
    return report


Destination = Callable[[str], contextlib.AbstractContextManager[tuple[IO[bytes], "Path | str"]]]
"""A file name -> a context giving (binary file, where it lands); the file appears
there only when the context ends without error."""


def _local_destination(out_dir: str) -> Destination:
    out = Path(out_dir)

    @contextlib.contextmanager
    def open_file(name: str) -> Iterator[tuple[IO[bytes], Path | str]]:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create {out}: {exc.strerror}.", kind="config") from None
        path, tmp = out / name, out / f".{name}.partial"
        try:
            with open(tmp, "wb") as fh:
                yield fh, path
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    return open_file


def _object_destination(out_dir: str, storage_config: storage.StorageConfig | None
                        ) -> Destination:
    prefix = storage.ObjectURI.parse(out_dir, prefix=True)  # refuses other schemes
    fs = (storage_config or storage.StorageConfig()).filesystem(prefix.scheme)

    @contextlib.contextmanager
    def open_object(name: str) -> Iterator[tuple[IO[bytes], Path | str]]:
        uri = storage.ObjectURI(prefix.scheme, prefix.bucket,
                                "/".join(filter(None, (prefix.key, name))))
        with _upload(fs, uri) as fh:
            yield fh, str(uri)

    return open_object


@contextlib.contextmanager
def _upload(fs: Any, uri: storage.ObjectURI) -> Iterator[IO[bytes]]:
    """An object opened for writing, committed only if the block ends without error:
    fsspec's ``close`` would otherwise upload what was written so far. The store's
    errors (on open, on each part sent, on completion) become vidq's."""
    with storage.storage_errors(str(uri)):
        fh = fs.open(uri.fs_path, "wb", block_size=storage.WRITE_PART_BYTES)
    try:
        yield fh
    except BaseException as exc:
        discard = getattr(fh, "discard", None)  # aborts an S3 multipart upload
        if discard is not None:
            with contextlib.suppress(Exception):
                discard()
        if isinstance(exc, Exception) and not isinstance(exc, (VidqError, SQLAlchemyError)):
            with storage.storage_errors(str(uri)):
                raise
        raise
    with storage.storage_errors(str(uri)):
        fh.close()


def _pages(rows: Iterator[Sequence[Any]], page_rows: int = PAGE_ROWS
           ) -> Iterator[list[Sequence[Any]]]:
    while page := list(itertools.islice(rows, page_rows)):
        yield page


class _CopyReader(io.RawIOBase):
    """The CSV bytes of a ``COPY ... TO STDOUT``, as the file Arrow's CSV reader reads."""

    def __init__(self, blocks: Iterator[Any]) -> None:
        self._blocks = blocks
        self._left = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # libpq hands COPY data over a row at a time: rows are appended to one buffer
        # and handed over a buffer at a time (a slice per row cost more than the
        # database's own COPY; keeping libpq's row buffers alive to join them, more).
        view = memoryview(buffer).cast("B")
        if len(self._left) < len(view):
            for block in self._blocks:
                self._left += block
                if len(self._left) >= len(view):
                    break
        n = min(len(view), len(self._left))
        view[:n] = self._left[:n]
        del self._left[:n]
        return n


def _arrow_batches(conn: Connection, query: Select[Any], schema: Any) -> Iterator[Any]:
    """``query``'s rows as Arrow record batches of ``schema``, without a Python object
    per row: on PostgreSQL ``COPY (query) TO STDOUT`` as CSV, parsed by Arrow in C++ (in
    the export's transaction, so its snapshot); elsewhere the driver's tuples, a page
    at a time, turned into Arrow arrays a column at a time."""
    import pyarrow as pa

    sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    cursor = conn.connection.cursor()
    try:
        if conn.dialect.name == "postgresql":
            import pyarrow.csv as pacsv

            with cursor.copy(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv)") as copy:
                reader = pacsv.open_csv(
                    io.BufferedReader(_CopyReader(iter(copy)), buffer_size=COPY_BLOCK_BYTES),
                    read_options=pacsv.ReadOptions(column_names=schema.names,
                                                   block_size=COPY_BLOCK_BYTES,
                                                   use_threads=True),
                    convert_options=pacsv.ConvertOptions(
                        column_types=dict(zip(schema.names, schema.types)),
                        strings_can_be_null=False, quoted_strings_can_be_null=False))
                yield from reader
            return
        cursor.execute(sql)
        while page := cursor.fetchmany(PAGE_ROWS):
            yield pa.record_batch([pa.array(col, type=t) for col, t in
                                   zip(zip(*page), schema.types)], schema=schema)
    finally:
        cursor.close()


def _write_parquet(fh: IO[bytes], table: TableExport, conn: Connection | None = None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"int16": pa.int16(), "int64": pa.int64(),
             "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string(),
             "timestamp": pa.timestamp("us", tz="UTC")}
    schema = pa.schema([pa.field(f.name, pa.list_(pa.float16(), f.dim) if f.kind == "vector"
                                 else types[f.kind]) for f in table.fields])

    def array(values: Sequence[Any], i: int) -> Any:
        f = table.fields[i]
        if f.kind != "vector":
            return pa.array(values, type=schema.field(i).type)
        # The stored bytes are the array's buffer (little-endian float16, as Arrow's on
        # the little-endian hosts vidq runs on): no per-value conversion.
        flat = pa.Array.from_buffers(pa.float16(), len(values) * f.dim,
                                     [None, pa.py_buffer(b"".join(values))])
        return pa.FixedSizeListArray.from_arrays(flat, f.dim)

    n = 0
    # Dictionaries and min/max statistics help columns of repeated values; a vector
    # column (float16 values, rarely equal) only pays for them, and for compression:
    # zstd took 40% of its write time to save 15% of its size.
    plain = [f.name for f in table.fields if f.kind != "vector"]
    compression = {f.name: "none" if f.kind == "vector" else "zstd" for f in table.fields}
    with pq.ParquetWriter(fh, schema, compression=compression, use_dictionary=plain,
                          write_statistics=plain) as writer, _written_behind() as behind:
        if table.query is not None and conn is not None:
            # Batches come in whatever size the parser made: row groups stay PAGE_ROWS.
            pending: list[Any] = []
            held = 0
            pool = pa.default_memory_pool()
            for batch in _arrow_batches(conn, table.query, schema):
                pending.append(batch)
                held += batch.num_rows
                while held >= PAGE_ROWS:
                    whole = pa.Table.from_batches(pending, schema=schema)
                    behind(writer.write_table, whole.slice(0, PAGE_ROWS),
                           row_group_size=PAGE_ROWS)
                    # A copy of the rest: a slice would hold every parsed block alive.
                    pending = whole.slice(PAGE_ROWS).combine_chunks().to_batches()
                    del whole
                    pool.release_unused()  # Arrow's allocator would keep the peak
                    held -= PAGE_ROWS
                    n += PAGE_ROWS
            if held:
                behind(writer.write_table, pa.Table.from_batches(pending, schema=schema),
                       row_group_size=PAGE_ROWS)
                n += held
            return n
        for page in _pages(table.rows(), table.page_rows):
            columns = list(zip(*page))
            arrays = [array(col, i) for i, col in enumerate(columns)]
            behind(writer.write_batch, pa.record_batch(arrays, schema=schema),
                   row_group_size=table.page_rows)
            n += len(page)
    return n


@contextlib.contextmanager
def _written_behind() -> Iterator[Callable[..., None]]:
    """A call that runs its writes on one thread of their own, one at a time, while the
    caller reads the next page: Parquet's encoder releases the GIL, so reading from the
    database and encoding overlap. At most one page waits, so memory stays bounded; an
    encoder's error is raised in the caller at its next write or at the end."""
    from concurrent.futures import Future, ThreadPoolExecutor

    last: list[Future[Any]] = []

    def behind(write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if last:
            last.pop().result()
        last.append(pool.submit(write, *args, **kwargs))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidq-export") as pool:
        try:
            yield behind
        finally:
            while last:
                last.pop().result()


def _text(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return aware(value).isoformat()
    return value


def _json_value(value: Any) -> Any:
    """A vector as its numbers (each float16 value exactly), anything else as text."""
    return list(floats_from_float16(value)) if isinstance(value, bytes) else _text(value)


def _csv_value(value: Any) -> Any:
    """A vector as base64 of its float16 bytes: 2,732 characters for 2048 values, where
    numbers would take ~40,000 (``numpy.frombuffer(base64.b64decode(s), "<f2")``)."""
    return base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else _text(value)


@contextlib.contextmanager
def _text_over(fh: IO[bytes]) -> Iterator[io.TextIOWrapper]:
    """UTF-8 text written through ``fh``, which stays open for its owner to close."""
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")  # type: ignore[arg-type]
    try:
        yield text
        text.flush()
    finally:
        text.detach()


def _write_jsonl(fh: IO[bytes], table: TableExport) -> int:
    names = [f.name for f in table.fields]
    n = 0
    with _text_over(fh) as f:
        for row in table.rows():
            f.write(json.dumps(dict(zip(names, map(_json_value, row)))) + "\n")
            n += 1
    return n


def _write_csv(fh: IO[bytes], table: TableExport) -> int:
    n = 0
    with _text_over(fh) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([fl.name for fl in table.fields])
        for row in table.rows():
            writer.writerow(map(_csv_value, row))
            n += 1
    return n

