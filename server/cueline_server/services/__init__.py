"""The service layer: domain rules for cues, executions, outcomes, workers and
accounts. Services take plain values and a unit of work; they know nothing of
gRPC, HTTP or SQL, and report failures as ApiError codes from the catalogue."""
