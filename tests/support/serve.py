"""Servicers served by the server's own runtime and pipeline, without the whole server."""

from __future__ import annotations

from collections.abc import Callable

from pricing_service.config import Settings
from pricing_service.interceptors import RpcPipeline
from pricing_service.metrics import Metrics
from pricing_service.runtime import MethodTable, RuntimeServer, ServerParts, select_runtime


async def serve(
    settings: Settings,
    metrics: Metrics,
    register: Callable[[MethodTable], None],
    *,
    max_concurrent_rpcs: int = 100,
) -> RuntimeServer:
    """Start the servicers ``register`` adds (generated ``add_*_to_server`` functions) on the
    runtime ``settings`` name (``PRICING_SERVER_RUNTIME``), behind the real pipeline; the port
    is ``settings.listen``'s (``127.0.0.1:0``: any free one, see ``.port``)."""
    methods = MethodTable()
    register(methods)
    server = select_runtime(settings).build(
        ServerParts(
            settings=settings,
            pipeline=RpcPipeline(metrics, max_concurrent_rpcs=max_concurrent_rpcs),
            methods=methods,
            add_grpcio_services=lambda _server: None,
        )
    )
    await server.start()
    return server
