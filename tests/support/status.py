"""Read the google.rpc.Status details a server sent with an error (AIP-193)."""

from __future__ import annotations

import grpc

from pricing_testing.status import error_details


def status_details(err: grpc.RpcError) -> tuple[str, list[tuple[str, str]]]:
    """The ErrorInfo reason and the BadRequest (field, reason) violations of an error."""
    details = error_details(err)
    assert details is not None, f"no google.rpc.Status details on {err}"
    return details
