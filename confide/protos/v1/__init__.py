"""Generated stubs of confide.v1 (do not edit; regenerate with `make protos`)."""

PROTOCOL_VERSION = 4
