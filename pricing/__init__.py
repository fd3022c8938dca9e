"""Generated protobuf code for the pricing.v1 contracts (see protos/)."""
