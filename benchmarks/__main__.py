"""``python -m benchmarks NAME [options]``: one entry point for every benchmark.

Each benchmark measures its baseline in the same run, prints a table of ratios
against it, and writes the table as JSON with ``--json PATH``. ``python -m benchmarks
NAME --help`` gives a benchmark's options; ``--quick`` runs it at its smallest size.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from benchmarks.common import write_json

BENCHMARKS: dict[str, tuple[str, str]] = {
    "seed": ("benchmarks.seed",
             "vidq classify against the seed's own pipeline (seed/pipeline.py): clips/s"),
    "forward": ("benchmarks.model",
                "the model's forward beside a decode thread against it alone"),
    "int8": ("benchmarks.model",
             "int8 against vidq's fp32 fast path and the seed's eager model: forward, classify"),
    "decode": ("benchmarks.decode",
               "skipping unused frames against decoding them all: decode side and end to end"),
    "read_hash": ("benchmarks.decode",
                  "a decode hashing every byte it reads against FFmpeg reading the file"),
    "storage": ("benchmarks.decode",
                "decoding from an S3-compatible store against the same local file"),
    "feed": ("benchmarks.feed",
             "a Celery worker's pipeline (simulated accelerator) against its bare decoders"),
    "gpu": ("benchmarks.feed",
            "a GPU host: forward floor per batch size, decoders, vidq run against the floor"),
    "submit": ("benchmarks.services",
               "vidq submit (SQLite, PostgreSQL) against a raw pipelined Redis publish"),
    "polling": ("benchmarks.services",
                "the documented SQL polls on 1M clip rows against the same polls unindexed"),
    "similar": ("benchmarks.services",
                "vidq similar against reading and scoring the same vectors with numpy"),
    "viewer": ("benchmarks.viewer",
               "a 2-hour video's page and the library search (1M segments) against their SQL"),
    "library": ("benchmarks.library",
                "results, segments, status, similar and export on a synthetic library "
                "against the 0006 schema, the exact scan and COPY"),
    "revision": ("benchmarks.services",
                 "vidq end to end (short jobs; long sliding jobs) against another git "
                 "revision's, alternating"),
    "ann": ("benchmarks.ann",
            "vidq similar's HNSW build and search parameters on library vectors: recall@10 "
            "and latency against vidq's own"),
    "memory": ("benchmarks.services",
               "a vidq worker's memory over many jobs against its memory after the first"),
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [f"  {name:{width}}  {line}" for name, (_module, line) in BENCHMARKS.items()]
    return "benchmarks:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    top = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0], epilog=usage(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("name", choices=list(BENCHMARKS), metavar="NAME",
                     help="the benchmark to run (listed below)")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return
    name, rest = top.parse_args(argv[:1]).name, argv[1:]
    module = importlib.import_module(BENCHMARKS[name][0])
    run = getattr(module, name)
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {name}",
        description=f"{(run.__doc__ or '').strip()}\n\n{module.__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    getattr(module, f"{name}_options")(parser)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the tables, the machine and the command as JSON")
    args = parser.parse_args(rest)
    reports = run(args)
    for report in reports:
        report.print()
    if args.json:
        write_json(args.json, name, rest, reports)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
