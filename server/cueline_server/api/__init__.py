"""The transport layer: one call pipeline, served over gRPC and over the REST
transcoder, both driven by the descriptors generated from proto/."""
