"""Servicers turn protobuf requests into service calls and results back into
protobuf responses. Their methods are named after the RPCs in proto/; the
pipeline finds them by those names."""
