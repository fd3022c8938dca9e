"""The one RPC pipeline: request id, admission, error translation, canonical log line.

Every unary call goes through :class:`RpcPipeline`, whatever server runtime received it
(``pricing_service.runtime``): grpcio's aio server runs it as a server interceptor
(:class:`ServerInterceptor`), the native runtime calls it directly. So the behaviour below is
defined once:

* Binds ``request_id`` (from ``x-request-id`` metadata, else generated) and ``rpc`` in
  structlog contextvars for every log line of the call.
* Admission: at most ``max_concurrent_rpcs`` in flight, RESOURCE_EXHAUSTED beyond.
* Error translation (AIP-193): a :class:`PricingError` becomes its gRPC code with a
  ``google.rpc.Status`` carrying ``ErrorInfo`` (reason, domain, metadata) and, for field errors,
  ``BadRequest``. Anything else becomes INTERNAL with a generic message and a logged traceback.
  Servicers never call ``abort`` themselves.
* Responses a servicer already serialised (``bytes``: the page path's memoised answers) are
  passed through the method's serialiser unchanged; messages are serialised as usual.
* One canonical log line per RPC (``rpc_finished``: method, code, duration_ms, request_id) and
  the request count / latency metrics.
* With tracing on (``pricing_service.tracing``), the RPC's span around all of the above.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from pricing_service.errors import (
    DOMAIN,
    InvalidArgumentError,
    PricingError,
    ResourceExhaustedError,
)
from pricing_service.logging import canonical_line
from pricing_service.metrics import Metrics
from pricing_service.ratelimit import RateLimiter, caller_identity

log = structlog.get_logger("pricing_service.rpc")

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def status_details(err: PricingError) -> bytes:
    """Serialized ``google.rpc.Status`` for the ``grpc-status-details-bin`` trailer."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    details = [info]
    if err.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description, reason=v.reason or err.reason
                    )
                    for v in err.violations
                ]
            )
        )
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    code_value = err.code.value[0]
    status = status_pb2.Status(code=code_value, message=err.message, details=packed)
    data: bytes = status.SerializeToString()
    return data


INTERNAL_MESSAGE = "internal error; the request id identifies it in the server's logs"


class Failure(NamedTuple):
    """How a call ends when it does not answer: the gRPC status and its trailing metadata
    (``grpc-status-details-bin``: the ``google.rpc.Status`` of :func:`status_details`)."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, err: PricingError) -> Failure:
        return cls(err.code, err.message, (("grpc-status-details-bin", status_details(err)),))


class CallContext(Protocol):
    """What the pipeline and the servicers read of a call, on every runtime (a
    ``grpc.aio.ServicerContext`` is one)."""

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...

    def peer(self) -> str: ...

    def time_remaining(self) -> float | None: ...


#: One unary method behind the pipeline: the request message (or ``_UNDECODABLE``) and the
#: call's context in, the response (a message, or bytes already serialised) or a
#: :class:`Failure` out.
Invoke = Callable[[Any, Any], Awaitable[Any]]


class RpcTracing(Protocol):
    """Tracing of the pipeline's calls (``pricing_service.tracing.Tracing``)."""

    def wrap_rpc(self, method: str, call: Invoke) -> Invoke:
        """``call`` inside the RPC's span."""


def cancelled_code(context: CallContext) -> grpc.StatusCode:
    """How a cancelled call ended: the caller went away, or its deadline passed (the runtime
    cancels the call then)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class RpcPipeline:
    """What every unary RPC goes through, on every server runtime (see the module docstring):
    request id, admission, rate limit, error translation, canonical log line, metrics.

    One per process, shared by everything that serves calls in it, so that
    ``max_concurrent_rpcs`` counts every call in flight whichever runtime part received it.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_concurrent_rpcs: int,
        log_rpcs: bool = True,
        limiter: RateLimiter | None = None,
        tracing: RpcTracing | None = None,
    ) -> None:
        self._metrics = metrics
        self._limiter = limiter
        self._tracing = tracing  # None: no spans, and nothing to check per call
        self._max = max_concurrent_rpcs
        self._in_flight = 0
        self._log_rpcs = log_rpcs

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def max_concurrent_rpcs(self) -> int:
        return self._max

    def wrap(self, method: str, inner: Handler) -> Invoke:
        """``inner`` (a servicer method) behind the pipeline; errors come back as a
        :class:`Failure` instead of being raised (a ``grpc.aio.AbortError`` raised by a
        grpcio servicer, such as health's, is re-raised: that call has its status already)."""
        metrics = self._metrics
        short = method.rsplit("/", 1)[-1]

        async def call(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            request_id = _request_id(context)
            tokens = structlog.contextvars.bind_contextvars(request_id=request_id, rpc=short)
            code = grpc.StatusCode.OK
            err: PricingError | None = None
            self._in_flight += 1
            try:
                if type(request) is _Undecodable:
                    raise InvalidArgumentError(
                        "the request body is not a valid protobuf message of this method",
                        reason="MALFORMED_REQUEST",
                    )
                limiter = self._limiter
                if limiter is not None:
                    wait = limiter.allow(
                        caller_identity(context.invocation_metadata(), context.peer())
                    )
                    if wait:
                        raise ResourceExhaustedError(
                            f"more than {limiter.rate:g} requests/s from this caller; "
                            f"retry in {wait * 1000:.0f} ms",
                            reason="RATE_LIMITED",
                            metadata={"retry_after_ms": str(max(1, round(wait * 1000)))},
                        )
                if self._in_flight > self._max:
                    raise ResourceExhaustedError(
                        f"more than {self._max} RPCs in flight; retry with backoff",
                        reason="TOO_MANY_IN_FLIGHT",
                    )
                return await inner(request, context)
            except PricingError as exc:
                err = exc
                code = exc.code
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = cancelled_code(context)
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_internal_error", method=method)
                err = PricingError(INTERNAL_MESSAGE)
            finally:
                self._in_flight -= 1
                elapsed = time.perf_counter() - start
                metrics.observe_rpc(short, code.name, elapsed)
                if self._log_rpcs:
                    # without structlog's processor chain where logging is JSON
                    (canonical_line() or log).info(
                        "rpc_finished",
                        method=method,
                        code=code.name,
                        duration_ms=round(elapsed * 1000, 3),
                        **({"reason": err.reason} if err is not None else {}),
                    )
                structlog.contextvars.reset_contextvars(**tokens)
            # only reached with err set (the try returns otherwise)
            return Failure.of(err)

        # tracing: the RPC's span around the whole call (decided here, once per method)
        return call if self._tracing is None else self._tracing.wrap_rpc(method, call)


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The pipeline as a ``grpc.aio`` server interceptor: unary methods run behind it (a
    :class:`Failure` becomes ``context.abort`` with its trailers); streaming methods (health
    Watch, reflection) pass through untouched."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_concurrent_rpcs: int,
        log_rpcs: bool = True,
        limiter: RateLimiter | None = None,
        pipeline: RpcPipeline | None = None,
    ) -> None:
        self.pipeline = pipeline or RpcPipeline(
            metrics, max_concurrent_rpcs=max_concurrent_rpcs, log_rpcs=log_rpcs, limiter=limiter
        )
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    @classmethod
    def for_pipeline(cls, pipeline: RpcPipeline) -> ServerInterceptor:
        """An interceptor in front of an existing pipeline (one per process)."""
        return cls(pipeline.metrics, max_concurrent_rpcs=pipeline.max_concurrent_rpcs,
                   pipeline=pipeline)  # fmt: skip

    @property
    def in_flight(self) -> int:
        return self.pipeline.in_flight

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming (health Watch, reflection): passed through untouched
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary),
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=passing_bytes(handler.response_serializer),
        )
        self._cache[method] = wrapped
        return wrapped

    def _wrap(self, method: str, inner: Handler) -> Handler:
        invoke = self.pipeline.wrap(method, inner)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            result = await invoke(request, context)
            if result.__class__ is Failure:
                await context.abort(
                    result.code, result.message, trailing_metadata=result.trailing_metadata
                )
            return result

        return call


class _Undecodable:
    """Stands for a request body that did not parse (answered INVALID_ARGUMENT, not INTERNAL)."""


_UNDECODABLE = _Undecodable()


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return _UNDECODABLE

    return parse


def passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """The method's serialiser, passing through a response a servicer already serialised."""
    if serialize is None:
        return None

    def dump(response: Any) -> bytes:
        if response.__class__ is bytes:
            data: bytes = response
            return data
        return serialize(response)

    return dump


def _request_id(context: CallContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return os.urandom(16).hex()  # a random 128-bit id, as uuid4().hex but 4x cheaper
