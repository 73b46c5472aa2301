"""The wire events built from an exception or a cancel: each built here, once, with its code from the table."""

from .errors import WorkerError
from .messages import Done, Error, Generate


def request_kind(req) -> str:
    """The request's wire ``type`` (``"generate"``, ``"load"``...), as ``done.request`` names it."""
    return type(req).__struct_config__.tag


def error_event(rid, exc: WorkerError, refused_id=None) -> Error:
    """The ``error`` event of a failure a host can cause (or one we classified)."""
    return Error(id=rid, code=exc.code, number=exc.number, message=exc.message, refused_id=refused_id)


def internal_error(rid, exc: BaseException, what: str = "") -> Error:
    """The ``error`` event of a bug or an unexpected failure: code ``internal``, the exception in the message."""
    message = f"{type(exc).__name__}: {exc}"
    return error_event(rid, WorkerError("internal", f"{what}: {message}" if what else message))


def cancelled_done(req) -> Done:
    """The terminal event of a request cancelled before it produced anything (a generate's text is "")."""
    return Done(id=req.id, request=request_kind(req), stop_reason="cancelled",
                text="" if isinstance(req, Generate) else None)
