"""The ``grpcio-aio`` runtime: grpcio's ``grpc.aio`` server, the pipeline as its interceptor.

The conservative choice: grpc-core does HTTP/2 and call handling, driven from the event loop
(about half of a loaded server's CPU, measured: docs/BENCHMARKS.md). Serves every
configuration, TLS and mutual TLS included.
"""

from __future__ import annotations

import grpc

from pricing_service.config import Settings
from pricing_service.interceptors import ServerInterceptor
from pricing_service.runtime import ServerParts

NAME = "grpcio-aio"


def refuse(settings: Settings) -> str | None:
    return None  # serves everything


class GrpcioAioServer:
    """A ``grpc.aio.Server`` with every service added and the port bound."""

    def __init__(self, parts: ServerParts) -> None:
        s = parts.settings
        server = grpc.aio.server(
            interceptors=[ServerInterceptor.for_pipeline(parts.pipeline)] if parts.pipeline else [],
            options=parts.grpc_options,
        )
        for service, handlers in parts.methods.services.items():
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, handlers),)
            )
            server.add_registered_method_handlers(service, handlers)
        parts.add_grpcio_services(server)
        port = (
            server.add_secure_port(s.listen, server_credentials(s))
            if s.tls_cert_file
            else server.add_insecure_port(s.listen)
        )
        if port == 0:
            raise OSError(f"cannot listen on {s.listen}")
        self._server = server
        self._port: int = port

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)


def build(parts: ServerParts) -> GrpcioAioServer:
    return GrpcioAioServer(parts)


def server_credentials(s: Settings) -> grpc.ServerCredentials:
    """TLS from PEM files; with a client CA, clients must present a certificate (mTLS)."""
    assert s.tls_cert_file is not None and s.tls_key_file is not None
    with open(s.tls_key_file, "rb") as f:
        key = f.read()
    with open(s.tls_cert_file, "rb") as f:
        cert = f.read()
    ca = None
    if s.tls_client_ca_file:
        with open(s.tls_client_ca_file, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )
