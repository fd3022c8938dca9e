"""Read the google.rpc.Status details a server sent with an error (AIP-193): shared by the
tests and the load (which records each refusal's reason)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def error_details(err: grpc.RpcError) -> tuple[str, list[tuple[str, str]]] | None:
    """The ErrorInfo reason ("" for none) and the BadRequest (field, reason) violations of an
    error; None when it carries no google.rpc.Status (the transport's own failures, a deadline
    the client enforced)."""
    status = rpc_status.from_call(err)
    if status is None:
        return None
    reason, fields = "", []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = info.reason
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            fields += [(v.field, v.reason) for v in br.field_violations]
    return reason, fields
