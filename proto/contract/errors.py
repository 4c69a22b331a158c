"""The gradhub error hierarchy: one base, specific subclasses, messages that name the field or knob.

Every class pickles cleanly (plain ``Exception`` subclasses with a single message
argument), so an error raised inside a Ray actor arrives intact in the caller.
"""

from __future__ import annotations


class GradhubError(Exception):
    """Base of every error gradhub raises on purpose."""


class SpecError(GradhubError, ValueError):
    """A job spec is invalid; the message starts with the field's dotted path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self):  # keep pickling (Ray) working with two arguments
        return (type(self), (self.field, self.problem))


class FactoryError(GradhubError):
    """A ``package.module:function`` factory could not be imported or did not return what it must."""


class ProtocolError(GradhubError):
    """A message on the wire is malformed: wrong shape, dtype, byte count or order."""


class NotFoundError(GradhubError, KeyError):
    """An unknown job, worker or checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StateError(GradhubError):
    """The operation does not fit the current state (job finished, store closed, ...)."""


class ReleasedError(StateError):
    """An elastic job shrank: this worker's rank is above the job's size, so it leaves (its run
    ends without an error and its resources go back to the cluster)."""


class JobFailedError(GradhubError):
    """A job ended FAILED or CANCELLED; the message carries the server's reason."""


class ServerUnavailableError(GradhubError):
    """The gradhub server cannot be reached at the given address."""


class AuthError(GradhubError):
    """The server refused the bearer token (missing or wrong)."""


class PermissionDeniedError(GradhubError):
    """The caller is known but may not do this (a viewer submitting, a user cancelling someone
    else's job); the message names the rule."""


class ResourceExhaustedError(GradhubError):
    """A limit on what one client, or all together, may hold open was reached (the message names
    it); nothing changed: try again when something was closed."""


class PeerLostError(GradhubError):
    """allreduce mode: a collective failed because another worker of the group is gone (died,
    hung past the collective timeout, or unreachable). The server restarts the whole group."""


class WorkerFailure(GradhubError):
    """A worker's own error (bad data, a bug in the model or loss, ...), with where it happened
    (``phase``: build, train, eval or checkpoint; ``step``) and the worker's traceback, which
    the server writes to the job's log."""

    def __init__(self, message: str, phase: str = "", step: int = 0, traceback: str = "") -> None:
        super().__init__(message)
        self.phase, self.step, self.traceback = phase, step, traceback

    def __reduce__(self):  # keep pickling (Ray) working with the extra fields
        return (type(self), (str(self), self.phase, self.step, self.traceback))


# --- errors on the wire --------------------------------------------------------------------
# The server sends the class of a GradhubError (and a SpecError's field) as trailing metadata
# beside the status; the client and the workers rebuild the same class from this one table.

ERROR_KEY, FIELD_KEY = "gradhub-error", "gradhub-field"
# request metadata: a worker's job credential, which WorkerControl and the ParameterServer check
JOB_CREDENTIAL_KEY = "gradhub-job-credential"

ERRORS: dict[str, type[GradhubError]] = {cls.__name__: cls for cls in (
    GradhubError, SpecError, FactoryError, ProtocolError, NotFoundError, StateError, JobFailedError,
    ServerUnavailableError, AuthError, PeerLostError, WorkerFailure, ResourceExhaustedError,
    PermissionDeniedError, ReleasedError,
)}


def error_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that names ``exc``'s class (and a SpecError's field); () for others."""
    if not isinstance(exc, GradhubError) or type(exc).__name__ not in ERRORS:
        return ()
    out = ((ERROR_KEY, type(exc).__name__),)
    return out + ((FIELD_KEY, exc.field),) if isinstance(exc, SpecError) else out


def rebuild_error(metadata: object, details: str) -> GradhubError | None:
    """The error a server raised, from its trailing metadata (pairs of key and value) and the
    status details; None when the metadata names no gradhub error."""
    pairs = dict(metadata) if isinstance(metadata, tuple | list) else {}  # type: ignore[arg-type]
    cls = ERRORS.get(str(pairs.get(ERROR_KEY, "")))
    if cls is None:
        return None
    if cls is SpecError:
        field = str(pairs.get(FIELD_KEY, "spec"))
        return SpecError(field, details.removeprefix(f"{field}: "))
    return cls(details)


def from_rpc_error(e: BaseException) -> GradhubError | None:
    """``rebuild_error`` for a ``grpc.RpcError`` (read by duck typing: no grpc import here)."""
    trailing, details = getattr(e, "trailing_metadata", None), getattr(e, "details", None)
    if not callable(trailing) or not callable(details):
        return None
    return rebuild_error(trailing(), details() or "")
