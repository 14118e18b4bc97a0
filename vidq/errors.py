"""The error taxonomy: what fails a job at once, and what is worth retrying.

Every error a user can hit carries a short machine-readable ``kind`` (stored in
``jobs.error_kind``) and a one-sentence message that says what to do.
"""

from __future__ import annotations


class VidqError(Exception):
    """Base of all errors vidq raises on purpose."""

    kind = "error"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.kind


class PermanentError(VidqError):
    """Retrying cannot help: the job is marked failed at once."""

    kind = "permanent"


class InputError(PermanentError):
    """The video itself is missing, refused, undecodable or over a limit."""

    kind = "bad_input"


class ConfigError(PermanentError):
    """The settings are wrong (unknown model, missing weights...)."""

    kind = "config"


class TransientError(VidqError):
    """The world may heal (database, broker, GPU memory): retry with backoff."""

    kind = "transient"


class Cancelled(VidqError):
    """The job stopped being this worker's to run (``vidq cancel``, or another worker took
    it over): give it up without writing anything."""

    kind = "cancelled"


STALLED = "stalled"
"""The ``error_kind`` of a decoder that made no progress (worker/watchdog.py), while it
is one host's failure."""


class HostLocalError(TransientError):
    """This host, not the video, failed the job (the file is not found or not readable
    here, a path outside this host's media roots, bucket credentials, a device error, a
    decoder that stalled): another host may well succeed. The job goes back to the
    queue without spending an attempt, and fails for good only once two hosts agree
    (worker/jobs.py); failures in a row open the host's circuit (worker/breaker.py)."""

    kind = "host_local"

    def __init__(self, message: str, *, kind: str | None = None, again: bool = False) -> None:
        super().__init__(message, kind=kind)
        self.again = again
        """This host had failed this very job before: no news about the host (a file
        missing everywhere, passed back and forth, is not a failure in a row)."""


class OutsideRootsError(InputError):
    """The path resolves outside this host's ``VIDQ_MEDIA_ROOTS``: a host whose roots
    (or mounts) differ from the producer's says so about itself, not about the video."""

    kind = "refused_path"
