"""More of the `cueapi` CLI 0.2.0 against a live cueline (contract §7.3): the
commands test_published_clients.py leaves out, and the failure paths, each
checked on what the CLI prints, its exit code and what cueline stored.

The CLI prints errors as "Error: ..." on stderr and exits 1. It reads error
text from `detail.error.message`, which cueline does not send, so its generic
texts ("Failed (HTTP n)") are what it is expected to print.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import re
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_published_clients import client
from tests.integration.test_scheduler import wait_for
from tests.integration.test_webhooks import LOCAL
from tests.support import Receiver, Server, auth

BAD_KEY = "cue_sk_" + "0" * 32


@pytest.fixture(scope="module")
def cli() -> Path:
    return client("cli")


@pytest.fixture(scope="module")
def worker() -> Path:
    return client("worker")


class Cli:
    """The CLI as one account (or one bad key) sees it, pointed at `base`."""

    def __init__(self, command: Path, base: str, key: str, home: Path) -> None:
        self.command, self.base, self.key, self.home = command, base, key, home

    def __call__(
        self, *args: str, key: str | None = None, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home),
            "CUEAPI_API_BASE": f"{self.base}/v1",
            "CUEAPI_API_KEY": key or self.key,
        }
        return subprocess.run(
            [str(self.command), *args], capture_output=True, text=True, env=env, input=stdin, timeout=60
        )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0 and not result.stderr, result.stdout + result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed command."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip()


def field(output: str, label: str) -> str:
    """The value the CLI printed after `label` (its `echo_info` lines)."""
    match = re.search(rf"^{re.escape(label)}\s+(.*)$", output, re.MULTILINE)
    assert match, f"{label!r} not in {output!r}"
    return match.group(1).strip()


def created_id(output: str) -> str:
    match = re.search(r"Created: (cue_[a-z0-9]{12})", output)
    assert match, output
    return match.group(1)


@pytest.fixture
def account(server: Server, cli: Path, tmp_path: Path) -> Iterator[tuple[Cli, httpx.Client]]:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as rest:
        yield Cli(cli, server.http_url, key, tmp_path), rest


def test_create_update_and_delete_webhook_cues(account: tuple[Cli, httpx.Client]) -> None:
    cue, rest = account
    out = ok(
        cue(
            "create",
            "--name",
            "hook",
            "--cron",
            "0 3 1 1 *",
            "--url",
            "https://example.com/hook",
            "--method",
            "PUT",
            "--timezone",
            "Europe/Berlin",
            "--payload",
            '{"n": 1}',
            "--description",
            "first",
        )
    )
    cue_id = created_id(out)
    stored = rest.get(f"/v1/cues/{cue_id}").json()
    assert field(out, "Status:") == "active" and field(out, "Next run:") == stored["next_run"]
    assert stored["transport"] == "webhook" and stored["description"] == "first"
    assert (stored["callback"]["url"], stored["callback"]["method"]) == ("https://example.com/hook", "PUT")
    assert stored["schedule"] == {
        "type": "recurring",
        "cron": "0 3 1 1 *",
        "at": None,
        "timezone": "Europe/Berlin",
    }
    assert stored["payload"] == {"n": 1}

    at = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).replace(microsecond=0)
    once = ok(cue("create", "--name", "later", "--at", at.isoformat(), "--url", "https://example.com/once"))
    once_id = created_id(once)
    stored_once = rest.get(f"/v1/cues/{once_id}").json()
    assert stored_once["schedule"]["type"] == "once" and stored_once["callback"]["method"] == "POST"
    assert dt.datetime.fromisoformat(stored_once["schedule"]["at"]) == at
    assert dt.datetime.fromisoformat(field(once, "Next run:")) == at
    shown = ok(cue("get", once_id))
    assert field(shown, "Schedule:") == f"One-time: {stored_once['schedule']['at']}"
    assert field(shown, "Callback:") == "POST https://example.com/once"

    # update sends `schedule` without a timezone and `callback` as {"url"}: both merge.
    updated = cue(
        "update",
        cue_id,
        "--name",
        "renamed",
        "--cron",
        "0 4 1 1 *",
        "--url",
        "https://example.com/moved",
        "--payload",
        '{"n": 2}',
        "--description",
        "second",
    )
    assert ok(updated).strip() == f"Updated: {cue_id} (renamed)"
    stored = rest.get(f"/v1/cues/{cue_id}").json()
    assert (stored["name"], stored["description"], stored["payload"]) == ("renamed", "second", {"n": 2})
    assert stored["schedule"] == {
        "type": "recurring",
        "cron": "0 4 1 1 *",
        "at": None,
        "timezone": "Europe/Berlin",
    }
    assert (stored["callback"]["url"], stored["callback"]["method"]) == ("https://example.com/moved", "PUT")
    # A rejected update (400 invalid_schedule) changes nothing.
    assert fails(cue("update", cue_id, "--cron", "every day")) == "Error: Failed (HTTP 400)"
    assert fails(cue("update", cue_id, "--name", "later")) == "Error: Failed (HTTP 409)"  # duplicate_cue_name
    assert rest.get(f"/v1/cues/{cue_id}").json()["schedule"]["cron"] == "0 4 1 1 *"

    assert ok(cue("delete", cue_id, "-y")).strip() == "Deleted."
    assert rest.get(f"/v1/cues/{cue_id}").json()["error"]["code"] == "cue_not_found"
    # Without -y the CLI reads the cue's name for its prompt first.
    prompted = cue("delete", once_id, stdin="y\n")
    assert f"Delete {once_id} (later)?" in prompted.stdout and prompted.stdout.strip().endswith("Deleted.")
    assert rest.get("/v1/cues").json()["total"] == 0
    assert fails(cue("delete", cue_id, "-y")) == f"Error: Cue not found: {cue_id}"


def test_unknown_ids_are_404s_the_cli_names(account: tuple[Cli, httpx.Client]) -> None:
    cue, _ = account
    for cue_id in ("cue_000000000000", "not-a-cue-id"):
        expected = f"Error: Cue not found: {cue_id}"
        for args in (
            ("get", cue_id),
            ("pause", cue_id),
            ("resume", cue_id),
            ("fire", cue_id),
            ("update", cue_id, "--name", "x"),
            ("delete", cue_id, "-y"),
            ("delete", cue_id),  # the lookup before the prompt
        ):
            assert fails(cue(*args)) == expected, args
    for execution_id in (str(uuid.uuid4()), "not-a-uuid"):
        expected = f"Error: Execution not found: {execution_id}"
        assert fails(cue("executions", "get", execution_id)) == expected
        assert fails(cue("executions", "heartbeat", execution_id, "--worker-id", "w")) == expected
        assert fails(cue("executions", "report-outcome", execution_id, "--success")) == expected
    # Claim answers 409 for an id it cannot claim, whether or not it exists (§3.2); a malformed id is a 404.
    unknown = cue("executions", "claim", str(uuid.uuid4()), "--worker-id", "w")
    assert fails(unknown) == "Error: Not claimable (already claimed, wrong status, or wrong owner)"
    malformed = cue("executions", "claim", "not-a-uuid", "--worker-id", "w")
    assert fails(malformed) == "Error: Execution not found: not-a-uuid"


def test_a_bad_api_key_is_a_401_the_cli_reads_as_json(
    server: Server, account: tuple[Cli, httpx.Client]
) -> None:
    cue, _ = account
    for key in (BAD_KEY, "not-a-key"):
        assert fails(cue("whoami", key=key)) == "Error: Failed to get user info (HTTP 401)"
        assert fails(cue("list", key=key)) == "Error: Failed to list cues (HTTP 401)"
        # These parse the error body as JSON to look for a message: the envelope must be JSON.
        created = cue("create", "--name", "x", "--cron", "0 0 * * *", "--worker", key=key)
        assert fails(created) == "Error: Failed (HTTP 401)"
        assert (
            fails(cue("executions", "claim-next", "--worker-id", "w", key=key)) == "Error: Failed (HTTP 401)"
        )
        body = httpx.get(f"{server.http_url}/v1/cues", headers=auth(key)).json()
        assert body == {"error": {"code": "invalid_api_key", "message": "Invalid API key", "status": 401}}


def test_key_regenerate_retires_the_old_key(server: Server, account: tuple[Cli, httpx.Client]) -> None:
    cue, rest = account
    email = field(ok(cue("whoami")), "Email:")
    out = ok(cue("key", "regenerate", "-y"))
    new_key = field(out, "New API key:")
    assert re.fullmatch(r"cue_sk_[0-9a-f]{32}", new_key) and new_key != cue.key
    assert fails(cue("whoami")) == "Error: Failed to get user info (HTTP 401)"
    old = rest.get("/v1/auth/me")
    assert (old.status_code, old.json()["error"]["code"]) == (401, "key_rotated")
    assert field(ok(cue("whoami", key=new_key)), "Email:") == email
    me = httpx.get(f"{server.http_url}/v1/auth/me", headers=auth(new_key)).json()
    assert me["api_key_prefix"] == new_key[:12]
    # Declining the prompt sends nothing: the new key keeps working.
    assert "Cancelled." in cue("key", "regenerate", key=new_key, stdin="n\n").stdout
    assert ok(cue("whoami", key=new_key))


class RacingProxy:
    """Forwards every request to cueline unchanged, but before passing on a
    claim by id it lets `rival` claim the same execution first: the CLI's
    list-then-claim loses the race every time."""

    def __init__(self, target: str, rival: Callable[[str], Any]) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                claim = re.fullmatch(r"/v1/executions/([0-9a-f-]{36})/claim", self.path)
                if self.command == "POST" and claim:
                    proxy.rival(claim.group(1))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                answer = httpx.request(self.command, target + self.path, headers=headers, content=body)
                self.send_response(answer.status_code)
                for name in ("content-type", "x-request-id"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.rival = rival
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_claims_heartbeats_and_write_once_outcomes(server: Server, account: tuple[Cli, httpx.Client]) -> None:
    cue, rest = account
    cue_id = created_id(
        ok(
            cue(
                "create", "--name", "jobs", "--cron", "0 0 1 1 *", "--worker", "--payload", '{"task": "sync"}'
            )
        )
    )
    first, second, third = (field(ok(cue("fire", cue_id)), "Execution:") for _ in range(3))

    # claim-next without --task uses POST /executions/claim: the oldest execution.
    claimed = ok(cue("executions", "claim-next", "--worker-id", "w1"))
    assert field(claimed, "Claimed:") == first and field(claimed, "Lease:") == "900s"
    # With --task it lists claimable work for the task, then claims the first by id.
    claimed = ok(cue("executions", "claim-next", "--worker-id", "w2", "--task", "sync"))
    assert field(claimed, "Claimed:") == second
    stored = {e: rest.get(f"/v1/executions/{e}").json() for e in (first, second)}
    assert [(s["status"], s["claimed_by_worker"]) for s in stored.values()] == [
        ("delivering", "w1"),
        ("delivering", "w2"),
    ]

    shown = ok(cue("executions", "get", first))
    assert (field(shown, "ID:"), field(shown, "Cue:"), field(shown, "Status:")) == (
        first,
        cue_id,
        "delivering",
    )
    assert (field(shown, "Claimed by:"), field(shown, "Attempts:")) == ("w1", "1")
    assert field(shown, "Scheduled:") == stored[first]["scheduled_for"]

    # Claiming a claimed execution by id is a 409.
    again = cue("executions", "claim", first, "--worker-id", "w2")
    assert fails(again) == "Error: Not claimable (already claimed, wrong status, or wrong owner)"
    # Someone else's heartbeat is a 403; the owner's extends the lease.
    wrong = cue("executions", "heartbeat", first, "--worker-id", "w2")
    assert fails(wrong) == "Error: Worker-id does not match the worker that claimed this execution"
    beat = ok(cue("executions", "heartbeat", first, "--worker-id", "w1"))
    beaten = rest.get(f"/v1/executions/{first}").json()["last_heartbeat_at"]
    lease = dt.datetime.fromisoformat(field(beat, "Lease until:")) - dt.datetime.fromisoformat(beaten)
    assert lease == dt.timedelta(seconds=900)

    # Losing the race: a rival claims between the CLI's list and its claim.
    proxy = RacingProxy(
        server.http_url, lambda e: rest.post(f"/v1/executions/{e}/claim", json={"worker_id": "rival"})
    )
    try:
        raced = Cli(cue.command, proxy.url, cue.key, cue.home)(
            "executions", "claim-next", "--worker-id", "w3", "--task", "sync"
        )
    finally:
        proxy.close()
    assert fails(raced) == f"Error: Lost the race on {third} (another worker beat us). Retry."
    assert rest.get(f"/v1/executions/{third}").json()["claimed_by_worker"] == "rival"
    # Nothing is left: both forms of claim-next say so and exit 0.
    assert "No claimable executions for task=sync." in ok(
        cue("executions", "claim-next", "--worker-id", "w3", "--task", "sync")
    )
    assert "No executions available for claiming." in ok(cue("executions", "claim-next", "--worker-id", "w3"))

    # Outcomes are write-once: a second report is a 409 and changes nothing.
    reported = ok(
        cue("executions", "report-outcome", first, "--success", "--external-id", "job-1", "--summary", "ok")
    )
    assert reported.strip() == f"Outcome recorded: {first}"
    for args in (("--failure",), ("--success", "--external-id", "job-2")):
        assert (
            fails(cue("executions", "report-outcome", first, *args))
            == "Error: Outcome already recorded (write-once)"
        )
    kept = rest.get(f"/v1/executions/{first}").json()
    assert kept["status"] == "success" and kept["outcome_success"] is True
    assert (kept["outcome"]["external_id"], kept["outcome"]["summary"]) == ("job-1", "ok")

    failed = ok(cue("executions", "report-outcome", second, "--failure"))
    assert field(failed, "Marked:") == "failure"
    assert field(ok(cue("executions", "get", second)), "Status:") == "failed"
    listed = ok(cue("executions", "list", "--cue-id", cue_id, "--status", "failed"))
    assert second in listed and first not in listed


def in_seconds(seconds: int) -> dt.datetime:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).replace(microsecond=0)


def test_a_once_cue_from_the_cli_is_fired_and_delivered_to_its_webhook(
    database_url: str, cli: Path, tmp_path: Path
) -> None:
    receiver = Receiver()
    server = Server(database_url, env=LOCAL).start()
    try:
        key = server.register()
        cue = Cli(cli, server.http_url, key, tmp_path)
        at = in_seconds(4)
        created = cue(
            "create",
            "--name",
            "ping",
            "--at",
            at.isoformat(),
            "--url",
            receiver.url("/ping"),
            "--payload",
            '{"n": 1}',
        )
        cue_id = created_id(ok(created))
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as rest:
            done = wait_for(
                lambda: (c := rest.get(f"/v1/cues/{cue_id}").json())["status"] == "completed" and c, 30
            )
            [execution] = rest.get(f"/v1/executions?cue_id={cue_id}").json()["executions"]
        assert done["run_count"] == 1 and done["next_run"] is None
        assert (execution["status"], execution["http_status"], execution["attempts"]) == ("success", 200, 1)
        assert execution["triggered_by"] == "scheduled"
        assert dt.datetime.fromisoformat(execution["scheduled_for"]) == at
        [delivery] = receiver.to("/ping")
        body = json.loads(delivery.body)
        assert (body["cue_id"], body["execution_id"], body["payload"]) == (cue_id, execution["id"], {"n": 1})

        shown = ok(cue("get", cue_id))
        assert (field(shown, "Status:"), field(shown, "Run count:")) == ("completed", "1")
        assert "success  (200, 1 attempt)" in shown
        detail = ok(cue("executions", "get", execution["id"]))
        assert (field(detail, "Status:"), field(detail, "HTTP status:")) == ("success", "200")
    finally:
        server.stop()
        receiver.close()


def test_a_once_cue_from_the_cli_runs_on_the_worker_daemon(
    server: Server, cli: Path, worker: Path, tmp_path: Path
) -> None:
    key = server.register()
    cue = Cli(cli, server.http_url, key, tmp_path)
    at = in_seconds(4)
    created = cue(
        "create", "--name", "once", "--at", at.isoformat(), "--worker", "--payload", '{"task": "hello"}'
    )
    cue_id = created_id(ok(created))
    handler = tmp_path / "hello.sh"
    handler.write_text(
        '#!/bin/sh\nprintf \'{"success": true, "external_id": "run-1"}\' > "$CUEAPI_OUTCOME_FILE"\n'
    )
    handler.chmod(0o755)
    config = tmp_path / "worker.yaml"
    config.write_text(
        f"api_base: {server.http_url}\napi_key: {key}\nworker_id: cli-box\npoll_interval: 1\n"
        f"handlers:\n  hello:\n    cmd: {handler}\n"
    )
    daemon = subprocess.Popen(
        [str(worker), "start", "--config", str(config)],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as rest:
        try:
            done = wait_for(
                lambda: (c := rest.get(f"/v1/cues/{cue_id}").json())["status"] == "completed" and c, 30
            )
        finally:
            daemon.terminate()
            daemon.wait(10)
        [execution] = rest.get(f"/v1/executions?cue_id={cue_id}").json()["executions"]
    assert done["run_count"] == 1 and done["transport"] == "worker"
    assert (execution["status"], execution["claimed_by_worker"], execution["triggered_by"]) == (
        "success",
        "cli-box",
        "scheduled",
    )
    assert dt.datetime.fromisoformat(execution["scheduled_for"]) == at
    assert execution["outcome"]["success"] is True and execution["outcome"]["external_id"] == "run-1"
    assert field(ok(cue("get", cue_id)), "Status:") == "completed"


def test_list_claimable_filters_by_payload_agent(account: tuple[Cli, httpx.Client]) -> None:
    """The CLI sends `?agent=` for `list-claimable --agent`; cueline filters on the payload's
    string `agent` in the query, before the limit (contract notes)."""
    cue, rest = account
    payloads = {
        "a1": {"task": "sync", "agent": "a1"},
        "a2": {"task": "sync", "agent": "a2"},
        "number": {"task": "sync", "agent": 1},
        "other": {"task": "other", "agent": "a1"},
    }
    ids = {}
    for name, payload in payloads.items():
        created = cue(
            "create", "--name", name, "--cron", "0 0 1 1 *", "--worker", "--payload", json.dumps(payload)
        )
        ids[name] = field(ok(cue("fire", created_id(ok(created)))), "Execution:")

    def listed(*args: str) -> set[str]:
        out = ok(cue("executions", "list-claimable", *args))
        return {name for name, execution in ids.items() if execution in out}

    assert listed() == set(payloads)
    assert listed("--agent", "a1") == {"a1", "other"}
    assert listed("--task", "sync", "--agent", "a1") == {"a1"}
    assert "No claimable executions (agent=nobody)." in ok(
        cue("executions", "list-claimable", "--agent", "nobody")
    )

    def over_rest(**params: str) -> list[str]:
        return [
            e["execution_id"]
            for e in rest.get("/v1/executions/claimable", params=params).json()["executions"]
        ]

    assert over_rest(agent="1") == []  # only string values match
    assert over_rest(agent="a2", limit="1") == [ids["a2"]]  # filtered before the limit
