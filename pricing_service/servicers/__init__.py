"""gRPC servicers: convert proto <-> domain, nothing more."""
