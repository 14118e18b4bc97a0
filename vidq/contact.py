"""What a process knows of its own link to the database, for the stale-takeover rule.

A job's heartbeat goes stale for two reasons: its worker died, or nobody could write
heartbeats (the database, or the network to it, was down for every host). The second
must not make anyone take the job over: its worker is alive, its results may be
waiting to commit. So a process takes over a stale job only once it has itself been
in contact with the database, without a failure, for a full lease of that job:

    takeover when  heartbeat_at  < db_now - lease   (the job's worker went quiet)
              and  back_at       < db_now - lease   (we were not cut off meanwhile)

``back_at`` is the database's clock at this process's first successful statement after
a failed one (never this host's clock), or the server's start time when that is later
(a fresh process knows nothing of an outage before it started, but a restarted server
does). A worker process probes the database every heartbeat period, jobs held or not,
so it notices an outage longer than that; reconcile in the same process shares what it
saw. Within a lease after the database is back every live worker has written its
heartbeats again, so only jobs whose workers really died are taken over.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class DatabaseContact:
    """One process's record of its database contact (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._back_at: dt.datetime | None = None
        self.last_error = ""

    def failed(self, error: str) -> None:
        """A statement could not reach the database."""
        with self._lock:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            self.last_error = error

    @property
    def failing(self) -> bool:
        with self._lock:
            return self._failing_since is not None

    def failing_for_s(self) -> float:
        """Seconds since the first failure of the current outage; 0 while reachable."""
        with self._lock:
            since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    def reached(self, db_time: dt.datetime) -> None:
        """A statement succeeded; ``db_time`` is the database's clock at that moment."""
        with self._lock:
            if self._failing_since is None:
                return
            self._failing_since = None
            self._back_at = _aware(db_time)

    def takeover_floor(self) -> dt.datetime:
        """The database time from which this process's contact has been unbroken."""
        with self._lock:
            return self._back_at or EPOCH

    def reset(self) -> None:
        with self._lock:
            self._failing_since, self._back_at, self.last_error = None, None, ""


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


CONTACT = DatabaseContact()
"""This process's (worker/jobs.py's JobStore and vidq/reconcile.py record into it)."""
