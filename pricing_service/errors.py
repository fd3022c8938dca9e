"""The one exception hierarchy of the service.

Every error a caller can see is a :class:`PricingError`. Each subclass carries the gRPC status
code it maps to and an UPPER_SNAKE ``reason`` (google.rpc.ErrorInfo, AIP-193). The error
interceptor (``pricing_service.interceptors``) is the only place that turns them into gRPC
statuses; anything else raised by a servicer becomes INTERNAL with a generic message.

    PricingError
    ├── InvalidArgumentError      INVALID_ARGUMENT  (with BadRequest field violations)
    ├── FailedPreconditionError   FAILED_PRECONDITION
    ├── NotFoundError             NOT_FOUND
    ├── AlreadyExistsError        ALREADY_EXISTS
    ├── UnauthenticatedError      UNAUTHENTICATED
    ├── PermissionDeniedError     PERMISSION_DENIED
    ├── ResourceExhaustedError    RESOURCE_EXHAUSTED
    ├── UnavailableError          UNAVAILABLE
    ├── DeadlineExceededError     DEADLINE_EXCEEDED
    └── ConfigError               (start-up only: never sent over the wire)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import grpc

DOMAIN = "pricing.crowd.dev"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str
    reason: str = ""


class PricingError(Exception):
    """Root of every error of this service."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: list[FieldViolation] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = list(violations or [])
        self.metadata = dict(metadata or {})

    @classmethod
    def field(cls, field: str, description: str, reason: str) -> Self:
        """A refusal about one field: ``field`` is the request path (``items[3].item_id``)."""
        return cls(
            f"{field}: {description}",
            reason=reason,
            violations=[FieldViolation(field, description, reason)],
            metadata={"field": field},
        )


class InvalidArgumentError(PricingError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class FailedPreconditionError(PricingError):
    """The request is well formed but the system's state forbids it."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class NotFoundError(PricingError):
    """The named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExistsError(PricingError):
    """The resource to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class UnauthenticatedError(PricingError):
    """Missing or wrong credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(PricingError):
    """Credentials are valid but do not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhaustedError(PricingError):
    """Too many requests or too large a request for the configured bounds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class UnavailableError(PricingError):
    """A dependency cannot be reached, or a guarantee cannot be proven now; retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceededError(PricingError):
    """The caller's deadline ran out before the answer was ready."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class ConfigError(PricingError):
    """Invalid configuration found at start-up; names the variable."""

    default_reason = "INVALID_CONFIG"
