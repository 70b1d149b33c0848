"""Domain errors raised by the service cores.

Cores never import gRPC; the serving layer maps these to status codes in one
interceptor (:mod:`storyreel.serving`).
"""

from __future__ import annotations


class StoryreelError(Exception):
    """Base class of every error a caller is meant to see."""

    #: Name of the grpc.StatusCode the error maps to.
    status = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(StoryreelError):
    """The request is malformed; retrying it unchanged cannot succeed."""

    status = "INVALID_ARGUMENT"


class NotFound(StoryreelError):
    """A job, artifact or scene the request names does not exist."""

    status = "NOT_FOUND"


class AlreadyExists(StoryreelError):
    status = "ALREADY_EXISTS"


class PermissionDenied(StoryreelError):
    status = "PERMISSION_DENIED"


class Unauthenticated(StoryreelError):
    status = "UNAUTHENTICATED"


class Overloaded(StoryreelError):
    """No capacity now (queue full, out of memory); the caller may retry later."""

    status = "RESOURCE_EXHAUSTED"


class NotReady(StoryreelError):
    """The service is starting or stopping."""

    status = "UNAVAILABLE"


class UpstreamFailed(StoryreelError):
    """A model server, object store or other dependency failed."""

    status = "UNAVAILABLE"


class FailedPrecondition(StoryreelError):
    status = "FAILED_PRECONDITION"


class Aborted(StoryreelError):
    """A concurrent change won (the caller's version is stale): fetch again, then retry."""

    status = "ABORTED"


class Cancelled(StoryreelError):
    status = "CANCELLED"


class DeadlineExceeded(StoryreelError):
    status = "DEADLINE_EXCEEDED"
