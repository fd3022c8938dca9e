"""The connection flags of the CLI commands that talk to a server (no gRPC import here:
``pricing-service serve`` forks its workers before any gRPC object exists)."""

from __future__ import annotations

import argparse

TIMEOUT_S = 5.0


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """The connection flags of every command that talks to a server."""
    p.add_argument(
        "--target", default=None, help="server HOST:PORT (default: PRICING_LISTEN's port here)"
    )
    p.add_argument("--tls", action="store_true", help="TLS even without PRICING_TLS_CERT_FILE")
    p.add_argument("--plaintext", action="store_true", help="no TLS, whatever the settings say")
    p.add_argument("--tls-ca-file", default=None, help="PEM CA bundle to trust (default: system)")
    p.add_argument("--tls-cert-file", default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key-file", default=None, help="PEM key of the client certificate")
    p.add_argument(
        "--tls-server-name", default=None, help="name to verify the server certificate against"
    )
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per call")
