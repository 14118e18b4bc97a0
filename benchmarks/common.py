"""What every benchmark shares besides the corpus (benchmarks/corpus.py): alternating
rounds, fresh-process runs, a ``vidq worker`` in a process of its own, and the report
(a table of ratios against a baseline measured in the same run, optionally written
as JSON)."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BROKER_URL = os.environ.get("VIDQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
"""The Redis database the benchmarks that need a broker use (and flush)."""
POSTGRES_URL = os.environ.get("VIDQ_BENCH_PG_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
"""A PostgreSQL database the benchmarks create their own databases from."""


# -- rounds and processes ----------------------------------------------------------
def alternate(sides: dict[str, Callable[[], float]], rounds: int, *,
              show: Callable[[dict[str, float]], str] | None = None
              ) -> dict[str, list[float]]:
    """``rounds`` rounds of every side, the order rotated each round so that a noisy
    moment on a shared machine hits every side alike; one line per round. Returns
    each side's value per round."""
    names = list(sides)
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        got = {name: sides[name]() for name in order}
        for name in names:
            values[name].append(got[name])
        detail = show(got) if show else ", ".join(f"{n} {v:.3g}" for n, v in got.items())
        print(f"  round {r + 1} ({' then '.join(order)}): {detail}", flush=True)
    return values


def child_env(extra: dict[str, str] | None = None, *, root: Path = ROOT) -> dict[str, str]:
    """The environment of a child process: this repository (or another checkout of it,
    ``root``) importable."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else str(root),
            **(extra or {})}


def fresh_process(function: str, **kwargs: Any) -> Any:
    """Call ``module:function(**kwargs)`` in a fresh Python process and return what it
    returns (JSON): a timing that no earlier run in this process warmed or slowed."""
    module, name = function.split(":")
    code = ("import json, sys\n"
            f"from {module} import {name}\n"
            f"print(json.dumps({name}(**json.loads(sys.argv[1]))))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{function} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(x) for x in out.stdout.split()]


def memory_mb(pid: int, field_name: str = "VmRSS:") -> float:
    """A /proc/PID/status memory field in MiB (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def worker_process(env: dict[str, str], workdir: Path, *, concurrency: int = 1,
                   timeout_s: float = 300, root: Path = ROOT
                   ) -> Iterator[subprocess.Popen[bytes]]:
    """A ``vidq worker`` process (the CLI, as a user starts it; the code of ``root``),
    yielded once it is ready to take jobs; stopped with SIGTERM afterwards."""
    log = workdir / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "vidq.cli", "worker", "--concurrency", str(concurrency)],
            env=child_env(env, root=root), cwd=workdir, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while "ready:" not in log.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vidq worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield worker
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def wait_for_jobs(database_url: str, job_ids: Sequence[int], *, poll_s: float = 0.1) -> None:
    """Until none of ``job_ids`` is queued or running."""
    from sqlalchemy import create_engine, func, select

    from vidq.db import Job

    engine = create_engine(database_url)
    try:
        while True:
            with engine.connect() as conn:
                left = conn.execute(select(func.count()).where(
                    Job.id.in_(job_ids), Job.status.in_(("queued", "running")))).scalar()
            if not left:
                return
            time.sleep(poll_s)
    finally:
        engine.dispose()


# -- the report --------------------------------------------------------------------
def times(ratio: float) -> str:
    """A ratio as text: two decimals, or two significant digits below 0.1."""
    return f"{ratio:.2f}x" if abs(ratio) >= 0.1 else f"{ratio:.2g}x"


def spread(values: Sequence[float]) -> str:
    return f"{times(min(values))[:-1]}-{times(max(values))}" if len(values) > 1 else ""


@dataclass
class Row:
    name: str
    values: list[float]
    """One per round (or one)."""
    ratios: list[float] | None
    """Per round, against the table's baseline; None for the baseline itself."""


@dataclass
class Report:
    """One table: rows of a measured value per round, each with its ratio to the
    baseline row of the same run. ``higher``: whether a larger value is better (rates)
    or worse (times, memory); the ratio is always value / baseline."""

    title: str
    unit: str
    baseline: str = ""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, values: Sequence[float] | float, *,
            against: str | None = None, baseline: bool = False) -> Row:
        """A row; its ratios are against ``against`` (default: the table's baseline,
        the first row added), round by round. ``baseline``: a row that others name in
        ``against``, shown without a ratio of its own."""
        values = [float(values)] if isinstance(values, (int, float)) else list(values)
        if not self.baseline:
            self.baseline = name
        base_name = against or self.baseline
        ratios = None
        if name != base_name and not baseline:
            base = self.row(base_name).values
            ratios = [v / b if b else float("nan") for v, b in zip(values, base)] if \
                len(base) == len(values) else [statistics.median(values) / statistics.median(base)]
        row = Row(name, values, ratios)
        self.rows.append(row)
        return row

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def ratio(self, name: str) -> float:
        ratios = self.row(name).ratios
        return statistics.median(ratios) if ratios else 1.0

    def print(self) -> None:
        width = max(len(r.name) for r in self.rows)
        print(f"\n{self.title}")
        print(f"  {'':{width}}  {'median ' + self.unit:>18}  {'ratio':>8}  {'rounds':>12}")
        for r in self.rows:
            ratio = "baseline" if r.ratios is None else times(statistics.median(r.ratios))
            print(f"  {r.name:{width}}  {statistics.median(r.values):18.4g}  {ratio:>8}  "
                  f"{spread(r.ratios or []):>12}")
        for note in self.notes:
            print(f"  {note}")

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title, "unit": self.unit, "baseline": self.baseline,
            "rows": [{"name": r.name, "values": r.values,
                      "median": statistics.median(r.values), "ratios": r.ratios,
                      "median_ratio": statistics.median(r.ratios) if r.ratios else None}
                     for r in self.rows],
            "notes": self.notes,
        }


def machine() -> dict[str, Any]:
    """Where a run ran: what a figure needs beside it."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(path: Path, benchmark: str, argv: Sequence[str], reports: Sequence[Report]) -> None:
    path.write_text(json.dumps({
        "benchmark": benchmark, "command": f"python -m benchmarks {benchmark} {' '.join(argv)}",
        "machine": machine(), "reports": [r.to_json() for r in reports],
    }, indent=2) + "\n")
