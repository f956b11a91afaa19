"""Run by the cueapi-sdk 0.1.3 interpreter (its own venv), not by pytest.

`flow BASE KEY RECEIVER_URL`: cue CRUD through the SDK's models, outcomes with
evidence, handle(), verification calls and heartbeat; then fires a webhook cue
to RECEIVER_URL and prints the account's webhook secret as JSON.
`verify BODY_FILE SIGNATURE SECRET TIMESTAMP`: the SDK's own verify_webhook.
`ratelimit BASE KEY`: lists cues until the SDK raises RateLimitError; prints
how many calls succeeded and what the exception carried, as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import httpx
from cueapi import CueAPI, verify_webhook
from cueapi.exceptions import CueNotFoundError, RateLimitError


def flow(base: str, key: str, receiver: str) -> None:
    c = CueAPI(key, base_url=base)
    cue = c.cues.create(name="sdk-test-cue", cron="*/5 * * * *", callback="https://example.com/webhook")
    assert cue.status == "active" and cue.callback.url == "https://example.com/webhook"
    assert [x.id for x in c.cues.list(limit=1).cues] == [cue.id]
    assert c.cues.pause(cue.id).status == "paused" and c.cues.resume(cue.id).status == "active"
    assert c.cues.update(cue.id, name="renamed").name == "renamed"
    c.cues.delete(cue.id)
    try:
        c.cues.get(cue.id)
        raise SystemExit("a deleted cue was found")
    except CueNotFoundError:
        pass
    again = c.cues.create(name="sdk-test-cue", cron="*/5 * * * *", callback="https://example.com/x")
    assert again.name == "sdk-test-cue"  # the name is free at once after delete

    worker = c.cues.create(name="w", cron="0 0 1 1 *", transport="worker", payload={"task": "t"})
    headers = {"Authorization": f"Bearer {key}"}

    def fire(cue_id: str) -> str:
        return str(httpx.post(f"{base}/v1/cues/{cue_id}/fire", headers=headers).json()["id"])

    first, second = fire(worker.id), fire(worker.id)
    httpx.post(f"{base}/v1/executions/{first}/claim", headers=headers, json={"worker_id": "sdk"})
    assert c.executions.heartbeat(first)["acknowledged"] is True
    recorded = c.executions.report_outcome(
        first, success=True, external_id="job-1", summary="ok", artifacts=[{"n": 1}]
    )
    assert recorded["outcome_recorded"] is True
    assert c.executions.get(first)["outcome"]["external_id"] == "job-1"
    assert c.executions.mark_verification_pending(first)["outcome_state"] == "verification_pending"
    assert c.executions.mark_verified(first)["outcome_state"] == "verified_success"
    with c.executions.handle(second) as ctx:
        ctx.result = "handled"
    assert c.executions.get(second)["outcome"]["result"] == "handled"
    assert {e["id"] for e in c.executions.list(cue_id=worker.id)["executions"]} == {first, second}

    hook = c.cues.create(name="hook", cron="0 0 1 1 *", callback=receiver)
    fire(hook.id)
    secret = httpx.get(f"{base}/v1/auth/webhook-secret", headers=headers).json()["webhook_secret"]
    print(json.dumps({"secret": secret}))


def verify(body_file: str, signature: str, secret: str, timestamp: str) -> None:
    with open(body_file, "rb") as body:
        if not verify_webhook(body.read(), signature, secret, timestamp):
            raise SystemExit("signature rejected")


def ratelimit(base: str, key: str) -> None:
    c = CueAPI(key, base_url=base)
    for calls in range(1000):
        try:
            c.cues.list()
        except RateLimitError as error:
            seen = {"code": error.code, "status": error.status_code, "retry_after": error.retry_after}
            print(json.dumps({"allowed": calls, **seen, "message": error.message}))
            return
    raise SystemExit("never rate limited")


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    modes: dict[str, Callable[..., None]] = {"flow": flow, "verify": verify, "ratelimit": ratelimit}
    modes[mode](*args)
