"""Exceptions: one class per gRPC status code, each keeping the code and the server's message.

Every failed call raises a FibquantError subclass; `err.code` is the grpc.StatusCode, `err.message`
the server's (or the client's) message, `err.method` the RPC ("CompressPages") or client step.
Some classes also derive from the matching builtin so generic handlers work: InvalidArgumentError
is a ValueError, DeadlineExceededError a TimeoutError, UnavailableError a ConnectionError,
PermissionDeniedError / UnauthenticatedError a PermissionError.
"""
from __future__ import annotations

import grpc


class FibquantError(Exception):
    """Base class. Attributes: code (grpc.StatusCode), message (str), method (str or None)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, method: str | None = None):
        if code is not None:
            self.code = code
        self.message = message
        self.method = method
        prefix = f"{method}: " if method else ""
        super().__init__(f"{prefix}{self.code.name}: {message}")


class CancelledError(FibquantError):
    code = grpc.StatusCode.CANCELLED


class UnknownError(FibquantError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(FibquantError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(FibquantError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(FibquantError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(FibquantError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(FibquantError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(FibquantError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(FibquantError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(FibquantError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(FibquantError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(FibquantError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(FibquantError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(FibquantError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(FibquantError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(FibquantError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE = {
    cls.code: cls
    for cls in (CancelledError, UnknownError, InvalidArgumentError, DeadlineExceededError, NotFoundError,
                AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError, FailedPreconditionError,
                AbortedError, OutOfRangeError, UnimplementedError, InternalError, UnavailableError,
                DataLossError, UnauthenticatedError)
}


def error_from_code(code: grpc.StatusCode, message: str, method: str | None = None) -> FibquantError:
    """The exception for a status code (UnknownError for OK or an unmapped code)."""
    cls = _BY_CODE.get(code, UnknownError)
    return cls(message, code=code if cls is not UnknownError else grpc.StatusCode.UNKNOWN, method=method)


def from_rpc_error(err: grpc.RpcError, method: str) -> FibquantError:
    """Maps a grpc.RpcError (sync or aio) to its FibquantError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_from_code(code or grpc.StatusCode.UNKNOWN, details or "", method)
