"""``vidq worker``: one Celery worker process per GPU (or one on a CPU host), supervised.

Why this shape: a worker process must hold many jobs at once (``VIDQ_INFLIGHT``) and
decode several videos in parallel, around one model. Celery's prefork children run
one task each and, being daemonic, cannot start processes of their own. So each
device gets its own Celery worker with the *threads* pool, sized to the jobs in
flight: every task thread claims its job and waits on the process's pipeline
(worker/pipeline.py), where decoder threads and one model loop do the work. With
``worker_prefetch_multiplier = 1`` such a process reserves exactly as many messages
as it has jobs in flight, so no message waits in a busy process while another is
idle.

This parent imports no torch and never touches CUDA: it counts GPUs with
``nvidia-smi``, starts ``celery -A worker.tasks worker --pool threads`` once per GPU
with ``VIDQ_DEVICE=cuda:N``, forwards SIGTERM/SIGINT as Celery's warm shutdown, and
restarts a process that dies (a crash, an out-of-memory kill, or a deliberate exit
above ``VIDQ_WORKER_MAX_MEMORY_MB``), as prefork's parent would restart a child.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from vidq.settings import Settings
from worker.plan import Plan

log = logging.getLogger("vidq.supervisor")
CONFIG_EXIT = 2
"""A worker process that exits with this gave up on its settings (weights, schema):
restarting it cannot help, so the supervisor stops too."""


def run_workers(settings: Settings, plan: Plan, *, queues: str, loglevel: str) -> int:
    """Start, supervise and stop the worker processes; returns the exit status."""
    stopping = False
    children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    metrics_env: dict[str, str] = {}
    if settings.metrics_port:
        metrics_env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vidq-metrics-")
        os.environ.update(metrics_env)  # before prometheus_client reads it
        from worker import metrics_server as metrics

        def healthy() -> tuple[bool, str]:
            alive = sum(1 for proc, _ in children.values() if proc.poll() is None)
            loaded = metrics.models_loaded()
            failing = metrics.heartbeats_failing(settings.stale_after_s)
            circuits = metrics.circuits_open()
            ok = (not stopping and alive == plan.processes and loaded >= plan.processes
                  and not failing and not circuits)
            return ok, (f"{'ok' if ok else 'unhealthy'}: {alive}/{plan.processes} worker "
                        f"processes alive, {loaded} with a model loaded, {failing} unable "
                        f"to write heartbeats, {circuits} with the circuit open "
                        "(host-local failures)")

        metrics.serve(settings.metrics_port, healthy=healthy, host=settings.metrics_host)

    def spawn(index: int) -> None:
        env = {
            **os.environ,
            "VIDQ_DEVICE": plan.device_for(index, settings),
            **plan.environment(),
            **metrics_env,
        }
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker.tasks", "worker",
            "--pool=threads", f"--concurrency={plan.inflight}", f"--queues={queues}",
            f"--loglevel={loglevel}", f"--hostname=vidq-{os.getpid()}-{index}@%h",
            "--without-mingle",
        ]
        children[index] = (subprocess.Popen(cmd, env=env), time.monotonic())

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc, _ in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(plan.processes):
        spawn(i)
    backoff = {i: 1.0 for i in range(plan.processes)}
    status = 0
    while children:
        time.sleep(0.5)
        for index, (proc, started) in list(children.items()):
            code = proc.poll()
            if code is None:
                continue
            del children[index]
            if metrics_env:
                from worker import metrics_server

                metrics_server.mark_process_dead(proc.pid)
            if stopping:
                continue
            if code == CONFIG_EXIT:
                print(f"vidq: error: worker process {index} stopped on its settings; "
                      "stopping the others", file=sys.stderr)
                status = CONFIG_EXIT
                stop(signal.SIGTERM, None)
                continue
            # Restart; back off if it keeps dying at once (a crash loop).
            backoff[index] = 1.0 if time.monotonic() - started > 60 else min(
                30.0, backoff[index] * 2)
            print(f"vidq: worker process {index} exited with {code}; restarting in "
                  f"{backoff[index]:.0f}s", file=sys.stderr, flush=True)
            time.sleep(backoff[index])
            if not stopping:
                spawn(index)
    if metrics_env:
        shutil.rmtree(metrics_env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return status
