"""cueline: cues, executions and write-once outcomes over gRPC and REST."""

__version__ = "0.1.0"
