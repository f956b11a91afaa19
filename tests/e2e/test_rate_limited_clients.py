"""The published clients meet cueline's rate limit (contract §2.10): each parses
the 429 as it expects, and `Retry-After` is an integer the worker and the SDK
can `int()`."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_published_clients import SDK_FLOW, client, run
from tests.integration.test_scheduler import wait_for
from tests.support import Server, auth

LIMIT = 5


@pytest.fixture(scope="module")
def clients() -> dict[str, Path]:
    return {name: client(name) for name in ("cli", "sdk", "worker")}


def test_the_cli_sdk_and_worker_parse_the_429(
    database_url: str, clients: dict[str, Path], tmp_path: Path
) -> None:
    server = Server(database_url, env={"CUELINE_DEFAULT_RATE_LIMIT_PER_MINUTE": str(LIMIT)}).start()
    try:
        # The CLI: every `list` is one request; the sixth is refused and reported as an error.
        key = server.register()
        cli = clients["cli"]
        listed = [run(cli, "list", key=key, server=server, home=tmp_path) for _ in range(LIMIT + 1)]
        assert [r.returncode for r in listed] == [0] * LIMIT + [1]
        assert "No cues yet" in listed[0].stdout
        assert listed[-1].stderr.strip() == "Error: Failed to list cues (HTTP 429)"
        assert "Traceback" not in listed[-1].stdout + listed[-1].stderr

        # The SDK: RateLimitError with the envelope's code and an int retry_after.
        ran = subprocess.run(
            [str(clients["sdk"]), str(SDK_FLOW), "ratelimit", server.http_url, server.register()],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
        seen = json.loads(ran.stdout.strip().splitlines()[-1])
        assert (seen["allowed"], seen["code"], seen["status"]) == (LIMIT, "rate_limit_exceeded", 429)
        assert isinstance(seen["retry_after"], int) and 1 <= seen["retry_after"] <= 60
        assert seen["message"] == f"Too many requests. Retry after {seen['retry_after']} seconds."

        # The worker daemon: heartbeat and polls use the budget, then it sleeps Retry-After, alive.
        worker_key = server.register()
        config = tmp_path / "worker.yaml"
        config.write_text(
            f"api_base: {server.http_url}\napi_key: {worker_key}\nworker_id: busy\npoll_interval: 1\n"
            "handlers:\n  noop:\n    cmd: echo\n"
        )
        log = tmp_path / "worker.log"
        with log.open("wb") as sink:
            daemon = subprocess.Popen(
                [str(clients["worker"]), "start", "--config", str(config)],
                cwd=tmp_path,
                env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
                stdout=sink,
                stderr=sink,
            )
        try:
            pattern = re.compile(r"Rate limited \((\w+)\)\. Waiting (\d+)s")
            waiting = wait_for(lambda: pattern.search(log.read_text()), 60)
            assert daemon.poll() is None, log.read_text()
        finally:
            daemon.kill()  # it sleeps through SIGTERM until Retry-After has passed
            daemon.wait(10)
        assert 1 <= int(waiting.group(2)) <= 60
        with httpx.Client(base_url=server.http_url, headers=auth(worker_key)) as rest:
            refused = rest.get("/v1/workers")
        assert refused.status_code == 429  # the daemon's requests were counted against its account
    finally:
        server.stop()
