"""Lapsed leases in the claim queue (contract §5.6): claim-next and the
claimable list take an expired lease of a silent worker directly, in claim
order, and finding one costs the same however many executions are in flight,
or have outlived their lease under a live worker."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, insert, select

from cueline_server.services.identifiers import hash_api_key
from cueline_server.store.database import Database, sync_url
from cueline_server.store.repositories import _claim_next_statement_postgres, _claimable_page_direct
from cueline_server.store.tables import executions
from tests.integration.test_scheduler import wait_for
from tests.integration.test_worker_transport import fire, worker_cue
from tests.support import Server, auth, new_database

# Second-scale leases, and a housekeeping pass only every minute: a lapsed lease
# stays `delivering` until a claim takes it.
NO_SWEEP = {
    "CUELINE_WORKER_CLAIM_LEASE_SECONDS": "1",
    "CUELINE_WORKER_HEARTBEAT_TIMEOUT_SECONDS": "1",
    "CUELINE_SCHEDULER_POLL_SECONDS": "60",
}
IN_FLIGHT = 2000


@pytest.fixture
def unswept_server(database_url: str) -> Iterator[Server]:
    running = Server(database_url, env=NO_SWEEP).start()
    yield running
    running.stop()


def test_a_lapsed_lease_is_listed_and_claimed_in_claim_order(unswept_server: Server) -> None:
    key = unswept_server.register()
    with httpx.Client(base_url=unswept_server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
        first, second = fire(client, cue["id"]), fire(client, cue["id"])
        client.post("/v1/worker/heartbeat", json={"worker_id": "crashy"})
        claimed = client.post(f"/v1/executions/{first}/claim", json={"worker_id": "crashy"})
        assert claimed.status_code == 200, claimed.text

        def listed() -> list[str]:
            page = client.get("/v1/executions/claimable").json()["executions"]
            return [str(item["execution_id"]) for item in page]

        # The lease runs out and the worker falls silent: the first is claimable
        # again, ahead of the second, while still marked as delivering.
        assert wait_for(lambda: listed() == [first, second])
        assert client.get(f"/v1/executions/{first}").json()["status"] == "delivering"

        taken = client.post("/v1/executions/claim", json={"worker_id": "rescuer"})
        assert taken.status_code == 200, taken.text
        assert taken.json()["execution_id"] == first
        stored = client.get(f"/v1/executions/{first}").json()
        assert (stored["claimed_by_worker"], stored["attempts"]) == ("rescuer", 2)
        assert listed() == [second]
        following = client.post("/v1/executions/claim", json={"worker_id": "rescuer"})
        assert following.json()["execution_id"] == second


# Leases of a second, a heartbeat timeout of four, housekeeping five times a second.
QUICK_SWEEPS = {
    "CUELINE_WORKER_CLAIM_LEASE_SECONDS": "1",
    "CUELINE_WORKER_HEARTBEAT_TIMEOUT_SECONDS": "4",
    "CUELINE_SCHEDULER_POLL_SECONDS": "0.2",
}


def _recover_after(server: Server, execution_id: str) -> tuple[dt.datetime, dt.datetime]:
    """(lease_expires_at, recover_after) as stored."""
    engine = create_engine(sync_url(server.database_url))
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(executions.c.lease_expires_at, executions.c.recover_after).where(
                    executions.c.id == uuid.UUID(execution_id)
                )
            ).one()
            return row.lease_expires_at, row.recover_after
    finally:
        engine.dispose()


def test_an_expired_lease_of_a_live_worker_is_put_off_not_lost(database_url: str) -> None:
    """The lease sweep moves an expired lease whose worker is alive to the
    moment that worker could first be silent; forgetting the worker brings it
    back at once, and a worker that falls silent loses its claim then."""
    server = Server(database_url, env=QUICK_SWEEPS).start()
    try:
        key = server.register()
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            cue = worker_cue(client)
            kept, dropped = fire(client, cue["id"]), fire(client, cue["id"])
            for worker, execution_id in (("kept", kept), ("dropped", dropped)):
                client.post("/v1/worker/heartbeat", json={"worker_id": worker})
                claimed = client.post(f"/v1/executions/{execution_id}/claim", json={"worker_id": worker})
                assert claimed.status_code == 200, claimed.text

            def deferred() -> bool:
                for worker in ("kept", "dropped"):  # alive throughout
                    client.post("/v1/worker/heartbeat", json={"worker_id": worker})
                stored = [_recover_after(server, execution_id) for execution_id in (kept, dropped)]
                return all(after > lease_end + dt.timedelta(seconds=1) for lease_end, after in stored)

            # Both leases run out while both workers are alive: the sweep puts them off.
            assert wait_for(deferred, timeout=10)
            assert client.get("/v1/executions/claimable").json()["executions"] == []

            # A forgotten worker is silent: its claim is claimable again at once, not
            # when its last heartbeat times out.
            assert client.delete("/v1/workers/dropped").status_code == 204
            listed = client.get("/v1/executions/claimable").json()["executions"]
            assert [str(item["execution_id"]) for item in listed] == [dropped]

            # The other worker falls silent: its claim is recovered once its heartbeat
            # is older than the timeout, and claimed again.
            def rescued() -> bool:
                taken = client.post(f"/v1/executions/{kept}/claim", json={"worker_id": "rescuer"})
                return taken.status_code == 200

            assert wait_for(rescued, timeout=20)
            assert client.get(f"/v1/executions/{kept}").json()["attempts"] == 2
    finally:
        server.stop()


def _in_flight(server: Server, key: str, *, lease_expired: bool = False) -> uuid.UUID:
    """IN_FLIGHT executions claimed by a live worker (their leases running, or
    expired), and 60 pending; returns the account."""

    async def account() -> uuid.UUID:
        db = Database(server.database_url)
        try:
            async with db.reader() as repos:
                found = await repos.accounts.by_key_hash(hash_api_key(key))
            assert found is not None
            return uuid.UUID(str(found.id))
        finally:
            await db.dispose()

    owner = asyncio.run(account())
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue_id = worker_cue(client)["id"]
        client.post("/v1/worker/heartbeat", json={"worker_id": "busy"})
    now = dt.datetime.now(dt.UTC)
    common = {"account_id": owner, "cue_id": cue_id, "transport": "worker", "scheduled_for": now,
              "triggered_by": "manual_fire", "payload": json.dumps({"task": "report"}), "task": "report",
              "created_at": now, "updated_at": now}  # fmt: skip
    lease_end = now + dt.timedelta(hours=-1 if lease_expired else 1)
    claimed = {"status": "delivering", "attempts": 1, "claimed_by_worker": "busy", "claimed_at": now,
               "lease_expires_at": lease_end, "recover_after": lease_end}  # fmt: skip
    pending = {"status": "pending", "attempts": 0, "available_at": now}
    engine = create_engine(sync_url(server.database_url))
    try:
        with engine.begin() as conn:
            for state, count in ((claimed, IN_FLIGHT), (pending, 60)):
                rows = [{"id": uuid.uuid4(), **common, **state} for _ in range(count)]
                conn.execute(insert(executions), rows)
    finally:
        engine.dispose()
    return owner


def _rows_filtered_out(plan: dict[str, Any]) -> int:
    """Rows that plan nodes read and then discarded, over the whole plan."""
    own = int(plan.get("Rows Removed by Filter", 0)) + int(plan.get("Rows Removed by Join Filter", 0))
    return own + sum(_rows_filtered_out(child) for child in plan.get("Plans", ()))


def _rows_read_from(plan: dict[str, Any], index: str) -> int:
    """Rows that the plan's scans of `index` returned, over all their loops."""
    own = int(plan["Actual Rows"]) * int(plan["Actual Loops"]) if plan.get("Index Name") == index else 0
    return own + sum(_rows_read_from(child, index) for child in plan.get("Plans", ()))


def _explained(server: Server, owner: uuid.UUID) -> list[dict[str, Any]]:
    """The plans, run with EXPLAIN ANALYZE and rolled back, of a claimable page
    and of eight claims by claim-next, each checked for the rows it returned."""
    now = dt.datetime.now(dt.UTC)
    parameters = {
        "l_account": owner, "l_now": now, "l_silent_since": now - dt.timedelta(minutes=3),
        "l_limit": 50, "l_task": None, "l_agent": None,
        "c_account": owner, "c_now": now, "c_silent_since": now - dt.timedelta(minutes=3),
        "c_lease_until": now + dt.timedelta(minutes=15), "c_worker": "w", "c_limit": 8,
    }  # fmt: skip
    plans = []
    url = sync_url(server.database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        for statement, rows in (
            (_claimable_page_direct(False, False), 50),  # a page of the pending
            (_claim_next_statement_postgres(False, True), 8),  # eight claims
        ):
            explained = conn.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement.sql, {**statement._defaults, **parameters}
            ).fetchone()
            conn.rollback()  # EXPLAIN ANALYZE ran the claim: undo it
            assert explained is not None
            plan = explained[0][0]["Plan"]
            assert plan["Actual Rows"] == rows, plan
            plans.append(plan)
    return plans


@pytest.mark.postgres
def test_finding_a_lapsed_lease_reads_none_of_the_executions_in_flight(
    postgres_admin_url: str,
) -> None:
    """Every claim and claimable list also looks for lapsed leases. Through the
    account's status index that read every execution in flight; through the
    partial index of leases it reads only the expired ones (none here)."""
    server = Server(new_database(postgres_admin_url)).start()
    try:
        owner = _in_flight(server, server.register())
        for plan in _explained(server, owner):
            assert _rows_filtered_out(plan) < 10, json.dumps(plan, indent=1)
    finally:
        server.stop()


@pytest.mark.postgres
def test_expired_leases_of_a_live_worker_are_read_until_the_lease_sweep_puts_them_off(
    postgres_admin_url: str,
) -> None:
    """Handlers that outlive their lease under a live worker (cueapi-worker never
    extends a lease per execution) are not lapsed. Until the lease sweep puts
    them off, every claim and claimable list reads them all from the partial
    index and drops them; afterwards none."""
    server = Server(new_database(postgres_admin_url), env={"CUELINE_SCHEDULER_POLL_SECONDS": "60"}).start()
    try:
        owner = _in_flight(server, server.register(), lease_expired=True)
        index = "ix_executions_worker_leases"
        assert [_rows_read_from(plan, index) for plan in _explained(server, owner)] == [IN_FLIGHT] * 2

        async def sweep() -> None:
            db = Database(server.database_url)
            try:
                now, silence = dt.datetime.now(dt.UTC), dt.timedelta(minutes=3)
                while True:
                    async with db.unit_of_work() as uow:
                        moved = await uow.claims.defer_live_leases(now, now - silence, silence, 500)
                        await uow.commit()
                    if not moved:
                        return
            finally:
                await db.dispose()

        asyncio.run(sweep())
        assert [_rows_read_from(plan, index) for plan in _explained(server, owner)] == [0, 0]
    finally:
        server.stop()
