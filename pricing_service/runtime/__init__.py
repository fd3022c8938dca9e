"""gRPC server runtimes: what receives calls and sends answers, behind one small interface.

The hot path's cost is dominated by the gRPC runtime, not by pricing (docs/BENCHMARKS.md,
"Serving runtime"), so the runtime is a replaceable part chosen by ``PRICING_SERVER_RUNTIME``:

``grpcio-aio``
    grpcio's ``grpc.aio`` server: HTTP/2 and call handling in grpc-core, driven from the
    event loop. Serves every configuration, TLS and mutual TLS included.
``native``
    pygrpc-native's ``NativeGrpcFront``: HTTP/2, framing, flow control, deadlines and
    cancellation run in Rust threads outside the GIL; each call reaches the event loop as an
    event (id, method, request bytes, metadata) and is answered by id. Health and reflection
    (a streaming and a bidirectional method) are served by a grpcio server on a private Unix
    socket behind it. No TLS: a TLS configuration is refused at start-up, never downgraded.

Every runtime serves the same servicers behind the same :class:`~pricing_service.interceptors.
RpcPipeline` (request ids, bearer auth in the servicers, admission, rate limits, error details,
the canonical log line, metrics), with the same message size limits, health and reflection,
graceful drain and ``SO_REUSEPORT`` for ``--workers N``. ``tests/`` run the integration and
fault suites against each runtime.

A runtime module is imported only when chosen (pygrpc-native is a compiled dependency with
wheels for Linux and macOS only), and only after ``--workers`` has forked (no gRPC object
survives a fork).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from pricing_service.errors import ConfigError

if TYPE_CHECKING:
    import grpc

    from pricing_service.config import Settings
    from pricing_service.interceptors import RpcPipeline

#: Names accepted by ``PRICING_SERVER_RUNTIME`` and the module serving each.
RUNTIME_MODULES: Final = {
    "grpcio-aio": "pricing_service.runtime.grpcio_aio",
    "native": "pricing_service.runtime.native",
}


class MethodTable:
    """The method handlers of generated ``add_<Service>Servicer_to_server`` functions,
    captured instead of added to a server, so that any runtime can serve them:
    ``add_PricingServiceServicer_to_server(servicer, table)``."""

    def __init__(self) -> None:
        #: service full name -> method name -> handler (``grpc.RpcMethodHandler``)
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services[service] = dict(handlers)

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        """Generated code also adds a generic handler of the same methods: not needed."""

    def paths(self) -> list[str]:
        return [f"/{svc}/{name}" for svc, methods in self.services.items() for name in methods]


@dataclass(frozen=True)
class ServerParts:
    """What the server lifecycle hands to a runtime to serve."""

    settings: Settings
    #: the process's one pipeline (every unary call goes through it); None serves the handlers
    #: bare, with no request ids, admission, error translation or log line (``bench.echo_server``)
    pipeline: RpcPipeline | None
    #: our services' handlers (PricingService, DiscountAdminService)
    methods: MethodTable
    #: adds the grpcio-only services (health, reflection) to a ``grpc.aio`` server
    add_grpcio_services: Callable[[grpc.aio.Server], None]
    #: server options of grpcio (message sizes, SO_REUSEPORT)
    grpc_options: list[tuple[str, Any]] = field(default_factory=list)


class RuntimeServer(Protocol):
    """One bound, startable server: ``port`` is bound once the object exists."""

    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls, let calls in flight finish for up to ``grace`` seconds (None: no
        wait), cancel the rest, release the port."""


class Runtime(Protocol):
    """A runtime module's interface."""

    NAME: str

    def refuse(self, settings: Settings) -> str | None:
        """Why this runtime cannot serve ``settings`` (naming the variables), or None."""

    def build(self, parts: ServerParts) -> RuntimeServer: ...


def select_runtime(settings: Settings) -> Runtime:
    """The runtime ``PRICING_SERVER_RUNTIME`` names, after checking it can serve ``settings``
    (:class:`ConfigError` naming the variables otherwise: never a silent substitute)."""
    name = settings.server_runtime
    module_name = RUNTIME_MODULES.get(name)
    if module_name is None:  # the setting's own validation already refuses this
        raise ConfigError(f"PRICING_SERVER_RUNTIME: unknown runtime {name!r}")
    try:
        runtime: Runtime = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"PRICING_SERVER_RUNTIME={name}: the runtime cannot be loaded here ({exc}); "
            "install it (pip install pygrpc-native) or choose "
            f"PRICING_SERVER_RUNTIME={'|'.join(n for n in RUNTIME_MODULES if n != name)}"
        ) from None
    why = runtime.refuse(settings)
    if why is not None:
        raise ConfigError(f"PRICING_SERVER_RUNTIME={name} cannot serve this configuration: {why}")
    return runtime
