"""The chaos run: a fleet of worker hosts on one PostgreSQL and one Redis, faults of
docs/reliability.md injected at random while jobs arrive, then healed. Every job must
succeed exactly once, with the results a clean run of the same videos gives.

    python -m tests.chaos                          # 3 hosts, 200 jobs, 5 minutes of faults
    python -m tests.chaos --jobs 40 --fault-s 60 --seed 7 --json chaos.json
    python -m pytest -m chaos tests/faults/test_chaos.py   # the same, under pytest

First a clean run classifies the videos on a fleet without faults; then a fresh
database and fleet take them again, submitted in waves over the fault period, while
a scheduler injects one fault after another (several at once, never two on one host),
each healed when its time is up. After the last heal the run waits for every job to
settle and prints a table of the faults injected and the outcomes.

Each host reaches the services through fault proxies of its own (tests/faults/proxy.py).
Host ``c`` is the fleet's flaky host: its decoders are processes that the run freezes,
and, where mount namespaces can be made (root), its media mount vanishes for a while.
Faults that say something about a host (a missing mount, a stalled decoder) are kept to
that one host: on two hosts, vidq rightly fails the video for good.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text

from tests.cluster import READY_LINE
from tests.faults.harness import TOP_K, FaultCluster
from tests.faults.hosts import Fleet, Host, decoder_processes, namespaces_available
from tests.media import make_video
from tests.services import REDIS_URL, new_database
from vidq.db import make_engine
from vidq.migrate import upgrade

HEARTBEAT_S = 2
"""A job's lease: 3 x 2 + 5 = 11 s. Outages and freezes below run past it."""
DECODE_STALL_S = 6
CHAOS_ENV = {
    "VIDQ_HEARTBEAT_S": str(HEARTBEAT_S),
    # Reconcile as a fleet runs it, only sooner: every 5 s, re-sending a queued job's
    # message after 30 s without a live task (600 s by default).
    "VIDQ_RECONCILE_EVERY_S": "5",
    "VIDQ_RECONCILE_AFTER_S": "30",
    "VIDQ_DECODE_STALL_S": str(DECODE_STALL_S),
    "VIDQ_DB_CONNECT_TIMEOUT_S": "5",
}
CLOCK_SKEW = ("host clocks set off: libfaketime 0.9.10 (Debian 12) breaks Python's timed"
              " waits (sem_clockwait), so a worker under it stalls; the clock promises have"
              " their own test (tests/faults/test_least_privilege.py)")
FLAKY = "c"


@dataclass
class Injected:
    kind: str
    target: str
    started_s: float
    duration_s: float


@dataclass
class Report:
    seed: int
    hosts: int
    jobs: int
    fault_s: float
    clean_s: float = 0.0
    chaos_s: float = 0.0
    settle_s: float = 0.0
    """From the last heal until every job had settled."""
    faults: list[Injected] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    not_available: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


# -- the videos and the runs -------------------------------------------------------------
def make_videos(root: Path, n: int) -> list[Path]:
    """``n`` distinct short videos (distinct content: the producer dedupes by hash)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"chaos_{i:04d}.mp4" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.exists():
            make_video(path, seconds=8, fps=12, width=96, height=64, seed=300_000 + i)
    return paths


@contextlib.contextmanager
def fleet_on_fresh_services(workdir: Path) -> Iterator[Fleet]:
    """A new PostgreSQL database at vidq's schema and the test Redis db, flushed."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with new_database("postgresql", workdir) as url:
            engine = make_engine(url)
            try:
                upgrade(engine)
            finally:
                engine.dispose()
            cluster = FaultCluster(broker_url=REDIS_URL, database_url=url, workdir=workdir)
            cluster.env.update(CHAOS_ENV)
            fleet = Fleet(cluster)
            try:
                yield fleet
            finally:
                cluster.kill_all()
                fleet.close()
    finally:
        client.flushdb()
        client.close()


def start_hosts(fleet: Fleet, n: int, *, chaos: bool) -> list[Host]:
    names = [chr(ord("a") + i) for i in range(n)]
    isolate = chaos and namespaces_available()
    hosts = []
    for name in names:
        env = {"VIDQ_DECODERS": "processes"} if name == FLAKY else {}
        hosts.append(fleet.add_host(name, "--concurrency", "1", isolate=isolate,
                                    ready=False, **env))
    for host in hosts:
        wait_ready(fleet, host)
    return hosts


def wait_ready(fleet: Fleet, host: Host) -> None:
    assert host.log is not None
    fleet.cluster.wait_log(host.log, READY_LINE, proc=host.worker, timeout=300)


Results = dict[str, list[tuple[str, float]]]
"""video file name -> its top-k (label, score), best first."""


def results(cluster: FaultCluster) -> Results:
    rows = cluster.sql("select j.path, l.label, l.score from jobs j join video_labels l"
                       " on l.job_id = j.id where j.status = 'succeeded' order by j.path, l.rank")
    out: Results = {}
    for path, label, score in rows:
        out.setdefault(Path(path).name, []).append((label, float(score)))
    return out


JOB = ("--strategy", "sliding", "--stride", "0.25")
"""About 30 clips a video: jobs long enough that faults find work in flight."""


def submit(cluster: FaultCluster, paths: list[Path]) -> None:
    out = cluster.vidq("submit", *map(str, paths), *JOB, "--batch", "chaos", timeout=300)
    if f"{len(paths)} jobs recorded" not in out.stderr:
        raise AssertionError(f"submit of {len(paths)} videos said: {out.stderr}")


def clean_run(videos: list[Path], hosts: int, workdir: Path) -> tuple[Results, float]:
    started = time.monotonic()
    with fleet_on_fresh_services(workdir) as fleet:
        start_hosts(fleet, hosts, chaos=False)
        submit(fleet.cluster, videos)
        fleet.cluster.wait_done(len(videos), timeout=1800)
        return results(fleet.cluster), time.monotonic() - started


# -- faults ------------------------------------------------------------------------------
Heal = Callable[[], None]


class Faults:
    """What the run can do to the fleet. Each ``start_*`` injects one fault and returns
    how to heal it, or None when it cannot be injected now."""

    def __init__(self, fleet: Fleet, hosts: list[Host], media: Path, rng: random.Random,
                 *, isolated: bool) -> None:
        self.fleet, self.hosts, self.media, self.rng = fleet, hosts, media, rng
        self.by_name = {h.name: h for h in hosts}
        self.isolated = isolated

    def kinds(self) -> dict[str, tuple[str, tuple[float, float]]]:
        """kind -> (target: 'fleet', 'host', 'flaky' or 'database', duration range in s)."""
        kinds = {
            "database outage, every host": ("fleet", (15.0, 30.0)),
            "broker outage, every host": ("fleet", (5.0, 15.0)),
            "database blackholed from a host": ("host", (10.0, 30.0)),
            "database down for a host": ("host", (5.0, 20.0)),
            "broker blackholed from a host": ("host", (10.0, 30.0)),
            "broker down for a host": ("host", (5.0, 20.0)),
            "host partitioned (both links)": ("host", (10.0, 30.0)),
            "latency on a host's links": ("host", (10.0, 30.0)),
            "host killed (SIGKILL), restarted": ("host", (2.0, 10.0)),
            "host frozen (SIGSTOP) past its lease": ("host", (12.0, 25.0)),
            "decoder process frozen": ("flaky", (3.0 * DECODE_STALL_S, 4.0 * DECODE_STALL_S)),
            "session frozen holding a job's row lock": ("database", (10.0, 40.0)),
        }
        if self.isolated:
            kinds["media mount gone"] = ("flaky", (5.0, 20.0))
        return kinds

    def start(self, kind: str, host: Host | None) -> Heal | None:
        if kind == "database outage, every host":
            return self._links([h.database for h in self.hosts], "down")
        if kind == "broker outage, every host":
            return self._links([h.broker for h in self.hosts], "down")
        assert host is not None or kind.startswith("session")
        if kind == "database blackholed from a host":
            return self._links([host.database], "blackhole")
        if kind == "database down for a host":
            return self._links([host.database], "down")
        if kind == "broker blackholed from a host":
            return self._links([host.broker], "blackhole")
        if kind == "broker down for a host":
            return self._links([host.broker], "down")
        if kind == "host partitioned (both links)":
            return self._links([host.database, host.broker], "blackhole")
        if kind == "latency on a host's links":
            ms = self.rng.uniform(50, 300)
            return self._links([host.database, host.broker], "latency", latency_ms=ms)
        if kind == "host killed (SIGKILL), restarted":
            return self._kill(host)
        if kind == "host frozen (SIGSTOP) past its lease":
            return self._freeze_host(host)
        if kind == "decoder process frozen":
            return self._freeze_decoder(host)
        if kind == "media mount gone":
            return self._unmount(host)
        if kind == "session frozen holding a job's row lock":
            return self._lock_a_running_job()
        raise ValueError(kind)

    @staticmethod
    def _links(proxies: list[Any], mode: str, latency_ms: float = 0.0) -> Heal:
        for proxy in proxies:
            proxy.set_mode(mode, latency_ms=latency_ms)

        def heal() -> None:
            for proxy in proxies:
                proxy.heal()
        return heal

    def _kill(self, host: Host) -> Heal:
        assert host.worker is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.worker.pid, signal.SIGKILL)
        host.worker.wait(timeout=30)

        def heal() -> None:
            self.fleet.start_worker(host)  # the host reboots; the run goes on at once
        return heal

    @staticmethod
    def _freeze_host(host: Host) -> Heal | None:
        assert host.worker is not None
        if host.worker.poll() is not None:
            return None
        group = host.worker.pid
        os.killpg(group, signal.SIGSTOP)
        return lambda: _quietly(os.killpg, group, signal.SIGCONT)

    @staticmethod
    def _freeze_decoder(host: Host) -> Heal | None:
        assert host.worker is not None
        decoders = decoder_processes(host)
        if not decoders:
            return None
        pid = decoders[0]
        os.kill(pid, signal.SIGSTOP)
        # The watchdog kills it long before; SIGCONT only frees one it missed.
        return lambda: _quietly(os.kill, pid, signal.SIGCONT)

    def _unmount(self, host: Host) -> Heal | None:
        if host.worker is None or host.worker.poll() is not None:
            return None
        media = str(self.media)
        done = host.run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "chaos-gone", media)
        if done.returncode != 0:
            raise AssertionError(f"could not hide {media} on host {host.name}: {done.stderr}")
        worker = host.worker

        def heal() -> None:
            if worker.poll() is None:  # a restarted host has its mount back anyway
                host.run("umount", media)
        return heal

    def _lock_a_running_job(self) -> Heal | None:
        """A session that took a running job's row lock and froze mid-transaction (its
        host died between UPDATE and COMMIT); closed at heal."""
        engine = create_engine(self.fleet.cluster.database_url, pool_size=1)
        conn = engine.connect()
        row = conn.execute(text("select id from jobs where status = 'running'"
                                " order by random() limit 1 for update")).first()
        if row is None:
            conn.close()
            engine.dispose()
            return None

        def heal() -> None:
            with contextlib.suppress(Exception):
                conn.rollback()
            conn.close()
            engine.dispose()
        return heal


def _quietly(call: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        call(*args)


@dataclass
class Active:
    kind: str
    resources: set[str]
    ends_at: float
    heal: Heal


def inject_for(faults: Faults, report: Report, *, fault_s: float, started: float,
               waves: list[list[Path]], cluster: FaultCluster) -> None:
    """Inject faults at random for ``fault_s`` seconds while submitting ``waves``."""
    rng, kinds = faults.rng, faults.kinds()
    active: list[Active] = []
    wave_every = fault_s * 0.3 / max(1, len(waves))  # a backlog all along
    next_wave, next_fault = started, started + rng.uniform(1, 4)
    end = started + fault_s
    try:
        while True:
            now = time.monotonic()
            for fault in [a for a in active if a.ends_at <= now]:
                fault.heal()
                active.remove(fault)
            if now >= end:
                break
            if waves and now >= next_wave:
                submit(cluster, waves.pop(0))
                next_wave += wave_every
            if now >= next_fault:
                busy = set().union(*(a.resources for a in active)) if active else set()
                kind = rng.choice(sorted(kinds))
                target, (low, high) = kinds[kind]
                host = _pick_host(faults, target, busy, rng)
                resources = _resources(target, host, faults)
                if not (resources & busy) and (host is not None or target in ("fleet", "database")):
                    heal = faults.start(kind, host)
                    if heal is not None:
                        duration = rng.uniform(low, high)
                        active.append(Active(kind, resources, now + duration, heal))
                        report.faults.append(Injected(kind, host.name if host else target,
                                                      round(now - started, 1),
                                                      round(duration, 1)))
                next_fault = now + rng.uniform(1, 5)
            time.sleep(0.2)
    finally:
        for fault in active:
            fault.heal()
    for wave in waves:  # what the fault period had no time for
        submit(cluster, wave)


def _pick_host(faults: Faults, target: str, busy: set[str], rng: random.Random) -> Host | None:
    if target == "flaky":
        return faults.by_name.get(FLAKY)
    if target == "host":
        free = [h for h in faults.hosts if h.name not in busy]
        return rng.choice(free) if free else None
    return None


def _resources(target: str, host: Host | None, faults: Faults) -> set[str]:
    if target == "fleet":  # an outage of every host's link: no other fault on any host
        return {h.name for h in faults.hosts} | {"fleet"}
    if target == "database":
        return {"database"}
    return {host.name, "fleet"} if host is not None else {"fleet"}


# -- the chaos run -----------------------------------------------------------------------
def chaos_run(videos: list[Path], clean: Results, report: Report, workdir: Path,
              rng: random.Random) -> None:
    started = time.monotonic()
    with fleet_on_fresh_services(workdir) as fleet:
        cluster = fleet.cluster
        isolated = namespaces_available()
        if not isolated:
            report.not_available.append("media mount gone (needs root for mount namespaces)")
        report.not_available.append(CLOCK_SKEW)
        hosts = start_hosts(fleet, report.hosts, chaos=True)
        faults = Faults(fleet, hosts, videos[0].parent, rng, isolated=isolated)
        order = list(videos)
        rng.shuffle(order)
        waves = [order[i::10] for i in range(10)]
        fault_started = time.monotonic()
        inject_for(faults, report, fault_s=report.fault_s, started=fault_started,
                   waves=waves, cluster=cluster)
        healed = time.monotonic()
        for host in hosts:  # a host killed at the very end has not rebooted yet
            if host.worker is None or host.worker.poll() is not None:
                fleet.start_worker(host)
        cluster.wait_done(len(videos), timeout=1800)
        report.settle_s = round(time.monotonic() - healed, 1)
        report.chaos_s = round(time.monotonic() - started, 1)
        judge(cluster, clean, report)


def judge(cluster: FaultCluster, clean: Results, report: Report) -> None:
    """Every job succeeded exactly once, with the clean run's results."""
    jobs = cluster.jobs()
    statuses = Counter(j["status"] for j in jobs)
    report.attempts = dict(sorted(Counter(int(j["attempts"]) for j in jobs).items()))
    sets = cluster.result_sets()
    complete = [j for j in jobs if j["status"] == "succeeded"
                and sets.get(j["id"]) == (TOP_K, j["clips_done"] * TOP_K, j["clips_done"])]
    commits = Counter(int(m) for m in re.findall(r"job (\d+) succeeded", cluster.all_logs()))
    got = results(cluster)
    differ = sorted(name for name in clean if not _same(clean[name], got.get(name)))
    paths = Counter(j["path"] for j in jobs)
    report.events = events(cluster, report.hosts)
    report.outcomes = {
        "jobs submitted": len(jobs),
        "succeeded": statuses.get("succeeded", 0),
        "failed": statuses.get("failed", 0),
        "not settled": len(jobs) - statuses.get("succeeded", 0) - statuses.get("failed", 0),
        "with exactly one result set": len(complete),
        "videos with more than one job": sum(1 for n in paths.values() if n > 1),
        "jobs whose success was logged twice": sum(1 for n in commits.values() if n > 1),
        "results unlike the clean run's": len(differ),
        "jobs handled by more than one host": _moved(cluster),
    }
    expected = len(clean)
    o = report.outcomes
    if o["jobs submitted"] != expected or o["succeeded"] != expected:
        failed = [(j["id"], j["status"], j["error_kind"], j["error_message"]) for j in jobs
                  if j["status"] != "succeeded"]
        report.problems.append(f"{o['succeeded']}/{expected} succeeded: {failed[:5]}")
    for key in ("videos with more than one job", "jobs whose success was logged twice",
                "results unlike the clean run's"):
        if o[key]:
            report.problems.append(f"{key}: {o[key]}")
    if o["with exactly one result set"] != o["succeeded"]:
        report.problems.append("a succeeded job without exactly one result set")
    if differ:
        report.problems.append(f"differing results: {differ[:5]}")


def _same(a: list[tuple[str, float]], b: list[tuple[str, float]] | None) -> bool:
    if b is None or [label for label, _ in a] != [label for label, _ in b]:
        return False
    return all(abs(x - y) <= 1e-4 for (_, x), (_, y) in zip(a, b))


EVENTS = {
    "a job given back by a host (host-local failure)": r"job \d+: host \S+ cannot run it",
    "a job abandoned, its lease not renewed": r"job \d+ abandoned",
    "a stalled decoder replaced": r"made no progress for",
    "a worker paused, the database unreachable": r"database unreachable \(",
    "a host's circuit opened": r"circuit open:",
    "a worker process restarted after a kill": r"vidq worker: \d+ process",
}
"""What the hosts did about the faults, counted from their logs (the first start of each
host's worker counts as no restart)."""


def events(cluster: FaultCluster, hosts: int) -> dict[str, int]:
    logs = cluster.all_logs()
    counted = {name: len(re.findall(pattern, logs)) for name, pattern in EVENTS.items()}
    counted["a worker process restarted after a kill"] -= hosts
    return counted


def _moved(cluster: FaultCluster) -> int:
    """Jobs that more than one host handled (gave back, abandoned or finished), from
    the hosts' logs."""
    hosts: dict[int, set[str]] = {}
    for _proc, log in cluster.workers:
        if not log.exists():
            continue
        name = log.stem.rsplit("-", 1)[-1]
        for job in re.findall(r"job (\d+)(?: succeeded|: host| abandoned)",
                              log.read_text(errors="replace")):
            hosts.setdefault(int(job), set()).add(name)
    return sum(1 for names in hosts.values() if len(names) > 1)


# -- the table ---------------------------------------------------------------------------
def table(report: Report) -> str:
    kinds = Counter(f.kind for f in report.faults)
    seconds: Counter[str] = Counter()
    for f in report.faults:
        seconds[f.kind] += f.duration_s
    lines = [
        f"chaos run: {report.hosts} hosts, {report.jobs} jobs, {report.fault_s:.0f} s of"
        f" faults (seed {report.seed})",
        "",
        "| fault | injected | seconds in all |",
        "| --- | ---: | ---: |",
        *(f"| {kind} | {n} | {seconds[kind]:.0f} |" for kind, n in sorted(kinds.items())),
        f"| **all** | {len(report.faults)} | {sum(seconds.values()):.0f} |",
        "",
        "| outcome | jobs |",
        "| --- | ---: |",
        *(f"| {name} | {n} |" for name, n in report.outcomes.items()),
        "",
        "| what the hosts did (their logs) | times |",
        "| --- | ---: |",
        *(f"| {name} | {n} |" for name, n in report.events.items()),
        "",
        f"attempts per job: {', '.join(f'{k}: {v}' for k, v in report.attempts.items())}",
        f"clean run {report.clean_s:.0f} s; chaos run {report.chaos_s:.0f} s, settled"
        f" {report.settle_s:.0f} s after the last heal",
    ]
    if report.not_available:
        lines.append("not injected here: " + "; ".join(report.not_available))
    lines.append("PASSED" if report.passed else "FAILED: " + "; ".join(report.problems))
    return "\n".join(lines)


def run(*, hosts: int = 3, jobs: int = 200, fault_s: float = 300.0, seed: int | None = None,
        workdir: Path | None = None) -> Report:
    seed = seed if seed is not None else random.randrange(1_000_000)
    report = Report(seed=seed, hosts=hosts, jobs=jobs, fault_s=fault_s)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vidq-chaos-")))
        videos = make_videos(workdir / "media", jobs)
        clean, report.clean_s = clean_run(videos, hosts, workdir / "clean")
        report.clean_s = round(report.clean_s, 1)
        if len(clean) != jobs:
            report.problems.append(f"the clean run classified {len(clean)} of {jobs} videos")
            return report
        chaos_run(videos, clean, report, workdir / "chaos", random.Random(seed))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=3, help="worker hosts (default 3)")
    parser.add_argument("--jobs", type=int, default=200, help="videos, one job each (200)")
    parser.add_argument("--fault-s", type=float, default=300.0,
                        help="seconds of faults before the heal (300)")
    parser.add_argument("--seed", type=int, help="the faults' random seed (default: random)")
    parser.add_argument("--workdir", type=Path, help="keep videos and worker logs here")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(hosts=args.hosts, jobs=args.jobs, fault_s=args.fault_s, seed=args.seed,
                 workdir=args.workdir)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "passed": report.passed}, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
