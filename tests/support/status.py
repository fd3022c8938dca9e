"""Read the google.rpc.Status details a server sent with an error (AIP-193)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def status_details(err: grpc.RpcError) -> tuple[str, list[tuple[str, str]]]:
    """The ErrorInfo reason and the BadRequest (field, reason) violations of an error."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status details on {err}"
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
