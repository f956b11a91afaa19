"""The published CueAPI clients against a live cueline, unchanged: the `cueapi`
CLI 0.2.0 and the `cueapi-worker` 0.3.0 daemon (contract §7).

Each client gets its own virtual environment under .cache/clients (both may
install a top-level `cueapi` package), created once and reused. HOME and
XDG_CONFIG_HOME point at a temporary directory so no stored credentials are read.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import venv
from pathlib import Path

import httpx
import pytest

from tests.integration.test_scheduler import wait_for
from tests.support import ROOT, Server, auth

CLIENTS = ROOT / ".cache" / "clients"
SDK_FLOW = Path(__file__).parent / "sdk_flow.py"
PACKAGES = {
    "cli": ("cueapi==0.2.0", "cueapi"),
    "worker": ("cueapi-worker==0.3.0", "cueapi-worker"),
    "sdk": ("cueapi-sdk==0.1.3", "python"),
}


def client(name: str) -> Path:
    """The client's executable, installing it into its own venv on first use."""
    requirement, command = PACKAGES[name]
    home = CLIENTS / requirement.replace("==", "-")
    executable = home / "bin" / command
    if not executable.exists():
        venv.create(home, with_pip=True, clear=True)
        subprocess.run(
            [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement],
            check=True,
            timeout=600,
        )
    return executable


@pytest.fixture(scope="session")
def cli() -> Path:
    return client("cli")


@pytest.fixture(scope="session")
def worker() -> Path:
    return client("worker")


@pytest.fixture(scope="session")
def sdk() -> Path:
    """The SDK's interpreter: its scripts run in their own venv."""
    return client("sdk")


def run(command: Path, *args: str, key: str, server: Server, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "CUEAPI_API_BASE": f"{server.http_url}/v1",
        "CUEAPI_API_KEY": key,
    }
    return subprocess.run([str(command), *args], capture_output=True, text=True, env=env, timeout=60)


def test_the_cli(server: Server, cli: Path, tmp_path: Path) -> None:
    key = server.register()

    def cue(*args: str) -> subprocess.CompletedProcess[str]:
        return run(cli, *args, key=key, server=server, home=tmp_path)

    assert "Plan:" in cue("whoami").stdout
    created = cue(
        "create", "--name", "nightly", "--cron", "0 3 * * *", "--worker", "--payload", '{"task": "report"}'
    )
    assert created.returncode == 0, created.stdout + created.stderr
    cue_id = created.stdout.split("Created:")[1].split()[0]
    assert cue_id in cue("list").stdout
    assert "nightly" in cue("get", cue_id).stdout
    assert cue("pause", cue_id).returncode == 0 and cue("resume", cue_id).returncode == 0
    assert "renamed" in cue("update", cue_id, "--name", "renamed").stdout
    fired = cue("fire", cue_id)
    execution = fired.stdout.split("Execution:")[1].split()[0]
    assert execution in cue("executions", "list").stdout
    assert "report" in cue("executions", "list-claimable").stdout
    assert "Lease" in cue("executions", "claim", execution, "--worker-id", "w1").stdout
    assert cue("executions", "heartbeat", execution, "--worker-id", "w1").returncode == 0
    reported = cue("executions", "report-outcome", execution, "--success", "--external-id", "job-1")
    assert reported.returncode == 0, reported.stdout + reported.stderr
    again = cue("executions", "report-outcome", execution, "--failure")
    assert again.returncode == 1 and "Outcome already recorded (write-once)" in again.stdout + again.stderr
    assert "No executions available" in cue("executions", "claim-next", "--worker-id", "w1").stdout
    assert "Executions:" in cue("usage").stdout
    stored = httpx.get(f"{server.http_url}/v1/executions/{execution}", headers=auth(key)).json()
    assert stored["outcome"]["external_id"] == "job-1" and stored["status"] == "success"


def test_the_worker_daemon_runs_a_once_cue_to_completion(
    server: Server, worker: Path, tmp_path: Path
) -> None:
    key = server.register()
    handler = tmp_path / "hello.sh"
    handler.write_text(
        "#!/bin/sh\n"
        'echo "payload: $CUEAPI_PAYLOAD"\n'
        'printf \'{"success": true, "external_id": "e-1", "summary": "said hi"}\' > "$CUEAPI_OUTCOME_FILE"\n'
    )
    handler.chmod(0o755)
    config = tmp_path / "worker.yaml"
    config.write_text(
        f"api_base: {server.http_url}\napi_key: {key}\nworker_id: box-1\npoll_interval: 1\n"
        f"handlers:\n  hello:\n    cmd: {handler}\n"
    )
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)).isoformat()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={
                "name": "once",
                "transport": "worker",
                "payload": {"task": "hello", "who": "world"},
                "schedule": {"type": "once", "at": at},
            },
        ).json()
        daemon = subprocess.Popen(
            [str(worker), "start", "--config", str(config)],
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: client.get(f"/v1/cues/{cue['id']}").json()["status"] == "completed", timeout=30)
        finally:
            daemon.terminate()
            daemon.wait(10)
        [execution] = client.get(f"/v1/executions?cue_id={cue['id']}").json()["executions"]
        assert execution["status"] == "success" and execution["claimed_by_worker"] == "box-1"
        outcome = execution["outcome"]
        assert outcome["external_id"] == "e-1" and outcome["summary"] == "said hi"
        assert outcome["result"].startswith("payload: ") and '"who": "world"' in outcome["result"]
        workers = client.get("/v1/workers").json()["workers"]
        assert [w["worker_id"] for w in workers] == ["box-1"] and workers[0]["handlers"] == ["hello"]


def test_the_sdk(database_url: str, sdk: Path, tmp_path: Path) -> None:
    from tests.integration.test_webhooks import LOCAL
    from tests.support import Receiver

    receiver = Receiver()
    server = Server(database_url, env=LOCAL).start()
    try:
        key = server.register()
        ran = subprocess.run(
            [str(sdk), str(SDK_FLOW), "flow", server.http_url, key, receiver.url("/hook")],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
        secret = json.loads(ran.stdout.strip().splitlines()[-1])["secret"]
        [delivery] = wait_for(lambda: receiver.to("/hook"))
        body = tmp_path / "body.json"
        body.write_bytes(delivery.body)
        signature, timestamp = delivery.headers["X-CueAPI-Signature"], delivery.headers["X-CueAPI-Timestamp"]
        verified = subprocess.run(
            [str(sdk), str(SDK_FLOW), "verify", str(body), signature, secret, timestamp],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        server.stop()
        receiver.close()


HANDLERS = {
    # name: (shell script body, expected success, expected external_id)
    "evidence": ('printf \'{"success": true, "external_id": "x-1"}\' > "$CUEAPI_OUTCOME_FILE"', True, "x-1"),
    "file_says_no": ('printf \'{"success": false, "error": "quota"}\' > "$CUEAPI_OUTCOME_FILE"', False, None),
    "exit_wins": (
        'printf \'{"success": true, "external_id": "x-3"}\' > "$CUEAPI_OUTCOME_FILE"; exit 3',
        False,
        "x-3",
    ),
    "no_file": ("echo done", True, None),
    "malformed": ("printf 'not json' > \"$CUEAPI_OUTCOME_FILE\"", True, None),
}


def test_the_worker_outcome_file_rules(server: Server, worker: Path, tmp_path: Path) -> None:
    key = server.register()
    lines = [
        f"api_base: {server.http_url}",
        f"api_key: {key}",
        "worker_id: rules",
        "poll_interval: 1",
        "handlers:",
    ]
    for name, (body, _, _) in HANDLERS.items():
        script = tmp_path / f"{name}.sh"
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
        lines.append(f"  {name}:\n    cmd: {script}")
    config = tmp_path / "worker.yaml"
    config.write_text("\n".join(lines) + "\n")
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        executions = {}
        for name in HANDLERS:
            cue = client.post(
                "/v1/cues",
                json={
                    "name": name,
                    "transport": "worker",
                    "payload": {"task": name},
                    "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
                },
            ).json()
            executions[name] = client.post(f"/v1/cues/{cue['id']}/fire").json()["id"]
        daemon = subprocess.Popen(
            [str(worker), "start", "--config", str(config)],
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def reported() -> bool:
                return all(client.get(f"/v1/executions/{e}").json()["outcome"] for e in executions.values())

            wait_for(reported, timeout=60)
        finally:
            daemon.terminate()
            daemon.wait(10)
        for name, (_, success, external_id) in HANDLERS.items():
            execution = client.get(f"/v1/executions/{executions[name]}").json()
            outcome = execution["outcome"]
            assert (outcome["success"], outcome["external_id"]) == (success, external_id), name
            assert execution["status"] == ("success" if success else "failed"), name
        malformed = client.get(f"/v1/executions/{executions['malformed']}").json()["outcome"]
        assert "outcome_file_parse_error" in malformed["metadata"]["_cueapi_worker"]


def test_a_handler_running_past_the_lease_keeps_its_execution(
    database_url: str, worker: Path, tmp_path: Path
) -> None:
    """cueapi-worker sends no per-execution heartbeats; its worker heartbeats alone
    must keep a claim whose lease (2 s here) runs out while the handler works (5 s)."""
    server = Server(
        database_url,
        env={"CUELINE_WORKER_CLAIM_LEASE_SECONDS": "2", "CUELINE_SCHEDULER_POLL_SECONDS": "0.2"},
    ).start()
    try:
        key = server.register()
        handler = tmp_path / "slow.sh"
        handler.write_text("#!/bin/sh\nsleep 5\necho finished\n")
        handler.chmod(0o755)
        config = tmp_path / "worker.yaml"
        config.write_text(
            f"api_base: {server.http_url}\napi_key: {key}\nworker_id: slow-box\npoll_interval: 1\n"
            f"handlers:\n  slow:\n    cmd: {handler}\n"
        )
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            cue = client.post(
                "/v1/cues",
                json={
                    "name": "slow",
                    "transport": "worker",
                    "payload": {"task": "slow"},
                    "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
                },
            ).json()
            execution = client.post(f"/v1/cues/{cue['id']}/fire").json()["id"]
            daemon = subprocess.Popen(
                [str(worker), "start", "--config", str(config)],
                cwd=tmp_path,
                env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                stored = wait_for(
                    lambda: (e := client.get(f"/v1/executions/{execution}").json())["outcome"] and e,
                    timeout=60,
                )
            finally:
                daemon.terminate()
                daemon.wait(10)
        assert stored["status"] == "success" and stored["attempts"] == 1  # never reclaimed
        assert stored["outcome"]["result"].startswith("finished")
    finally:
        server.stop()
