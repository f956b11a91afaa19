"""Servicers turn protobuf requests into service calls and results back into
protobuf responses. Their methods are named after the RPCs in proto/; the
pipeline finds them by those names. A response is never changed once returned:
concurrent calls may be handed the same one (the claimable list), and the REST
transcoder renders a response it has just rendered only once."""
