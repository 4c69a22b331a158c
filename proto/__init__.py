"""gradhub's wire layer: generated protobuf/gRPC code (``gradhub.proto.v1``) and the tensor codec."""
