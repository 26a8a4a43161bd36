"""Generated gRPC stubs of the wire contract in protos/confide/v1 (do not edit; `make protos`)."""
