"""Generated protobuf and gRPC modules for package ``gradhub.v1`` (see gradhub.proto.generate)."""
