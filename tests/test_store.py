"""The store contract: SQLite (embedded) and PostgreSQL (shared by several controllers)
pass the same tests. PostgreSQL-only tests cover what only a shared database has: two
controllers racing, events crossing processes, singleton work moving, the server going away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from controller.store import Store, open_store
from controller.store.database import StoreError, StoreUnavailable
from controller.store.enrollment import JOIN_RETRY_SECONDS
from controller.store.schema import SCHEMA_VERSION

FAR = time.time() + 3600


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def database(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "kumo.db")
    return request.getfixturevalue("postgres").database()


async def opener(database: str) -> AsyncIterator[Callable[[], Any]]:
    """``await open_one()`` opens one more store on ``database`` (another controller); all are
    closed at the end."""
    opened: list[Store] = []

    async def open_one() -> Store:
        store = await open_store(database).open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def stores(database: str) -> AsyncIterator[Callable[[], Any]]:
    async for open_one in opener(database):
        yield open_one


@pytest.fixture
async def store(stores: Callable[[], Any]) -> Store:
    return await stores()


async def node(store: Store, node_id: str = "n-1", token: str = "h") -> None:
    await store.add_token(token + node_id, FAR, 1)
    assert await store.enroll(token + node_id, "key", node_id, "host", f"serial-{node_id}", FAR) == "ok"


def task(node_id: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"id": f"t-{node_id}-{key}", "node": node_id, "kind": "process.create", "payload": {"name": "x", "n": 1},
            "idempotency_key": key, **extra}


def events_of(store: Store) -> list[Any]:
    seen: list[Any] = []
    store.subscribe(seen.append)
    return seen


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)


async def test_opening_applies_the_schema_once_and_records_its_version(stores) -> None:
    first = await stores()
    second = await stores()  # a second controller starting on the same database changes nothing
    async with second.db.transaction() as tx:
        assert (await tx.one("SELECT value FROM meta WHERE key='schema_version'"))["value"] == str(SCHEMA_VERSION)
    await node(first)
    assert [n["id"] for n in await second.list_nodes()] == ["n-1"]


async def test_a_database_newer_than_the_controller_is_refused(stores, database) -> None:
    store = await stores()
    async with store.db.transaction() as tx:
        await tx.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(StoreError, match=r"schema is version 999, newer than this controller's.*upgrade this one"):
        await open_store(database).open()


async def test_tokens_are_spent_once_and_report_why_they_fail(store) -> None:
    await store.add_token("once", FAR, 1)
    await store.add_token("old", time.time() - 1, 5)
    assert await store.token_status("once") == "ok"
    assert await store.enroll("once", "k1", "n-1", "h", "s1", FAR) == "ok"
    assert await store.enroll("once", "k2", "n-2", "h", "s2", FAR) == "used"
    assert await store.enroll("old", "k3", "n-3", "h", "s3", FAR) == "expired"
    assert await store.enroll("nope", "k4", "n-4", "h", "s4", FAR) == "unknown"
    assert [n["id"] for n in await store.list_nodes()] == ["n-1"]


async def test_a_join_is_found_again_by_its_token_and_key_only_within_its_window(store) -> None:
    await store.add_token("short", time.time() + 60, 1)
    await store.add_token("long", FAR, 1)
    assert await store.enroll("short", "k1", "n-1", "h", "s1", FAR) == "ok"
    assert await store.enroll("long", "k2", "n-2", "h", "s2", FAR) == "ok"
    assert await store.joined_before("short", "k1") == "n-1"
    assert await store.joined_before("short", "k2") is None
    assert await store.joined_before("long", "k1") is None
    # A short token's window outlasts it by JOIN_RETRY_SECONDS; a long one's lasts as it does.
    async with store.db.transaction() as tx:
        until = {r["id"]: r["join_retry_until"] for r in await tx.all("SELECT id, join_retry_until FROM nodes")}
        assert until["n-1"] > time.time() + JOIN_RETRY_SECONDS - 5 and until["n-2"] == FAR
        await tx.execute("UPDATE nodes SET join_retry_until=? WHERE id='n-1'", time.time() - 1)
    assert await store.joined_before("short", "k1") is None
    await store.remove_node("n-2", "removed", "node-removed")
    assert await store.joined_before("long", "k2") is None


async def test_a_renewal_racing_a_removal_cannot_readmit_the_node(store) -> None:
    # The API's guard let the renewal in just before `nodes remove` committed: the store,
    # not the guard's earlier look, decides whether the new certificate counts.
    await node(store)
    assert await store.add_certificate("n-1", "serial-2", FAR)
    assert (await store.valid_serials("n-1")) == {"n-1": {"serial-n-1", "serial-2"}}
    await store.remove_node("n-1", "the node was removed", "node-removed")
    assert not await store.add_certificate("n-1", "serial-3", FAR)
    assert await store.valid_serials() == {}


async def test_a_task_is_queued_once_per_idempotency_key(store) -> None:
    await node(store)
    seen = events_of(store)
    first, created = await store.add_task(task("n-1", "k"))
    again, created_again = await store.add_task(task("n-1", "k") | {"id": "t-other"})
    assert created and not created_again and again["id"] == first["id"] == "t-n-1-k"
    assert first["payload"] == {"name": "x", "n": 1} and first["state"] == "pending"
    await eventually(lambda: {"event": "tasks", "node": "n-1"} in seen)
    assert seen.count({"event": "tasks", "node": "n-1"}) == 1


async def test_claimed_tasks_come_oldest_first_and_only_once(store) -> None:
    await node(store)
    for key in "abc":
        await store.add_task(task("n-1", key))
    claimed = await store.claim_tasks("n-1", 2)
    assert [t["idempotency_key"] for t in claimed] == ["a", "b"] and {t["state"] for t in claimed} == {"delivered"}
    assert [t["idempotency_key"] for t in await store.claim_tasks("n-1", 10)] == ["c"]
    assert await store.claim_tasks("n-1", 10) == []
    assert await store.requeue_delivered("n-1") == 3


async def test_finishing_a_task_can_forget_its_instance(store) -> None:
    await node(store)
    instance = {"name": "web", "kind": "process", "node": "n-1", "spec": {"a": 1}, "reasons": {}}
    created = await store.add_instance(instance, task("n-1", "create", instance="web"))
    with pytest.raises(StoreError, match="'web' already exists"):
        await store.add_instance(instance, task("n-1", "create2", instance="web"))
    seen = events_of(store)
    outcome = {"state": "failed", "error": "boom", "code": "failed"}
    ended = await store.finish_task(created["id"], "n-1", outcome, lambda t: t["kind"].endswith(".create"))
    assert ended["state"] == "failed" and ended["error"] == "boom" and ended["result"] == {}
    assert await store.get_instance("web") is None
    assert await store.finish_task(created["id"], "n-2", outcome, lambda t: True) is None  # not that node's
    await eventually(lambda: {"event": "task", "id": created["id"]} in seen)


async def test_removing_a_node_fails_its_open_tasks(store) -> None:
    await node(store)
    queued, _ = await store.add_task(task("n-1", "a"))
    seen = events_of(store)
    await store.remove_node("n-1", "the node was removed", "node-removed")
    ended = await store.get_task(queued["id"])
    assert (ended["state"], ended["code"]) == ("failed", "node-removed")
    await eventually(lambda: {"event": "removed", "node": "n-1"} in seen and {"event": "task", "id": queued["id"]} in seen)


async def test_events_are_sent_only_when_the_transaction_commits(store) -> None:
    seen = events_of(store)
    with pytest.raises(RuntimeError):
        async with store.db.transaction() as tx:
            tx.notify({"event": "never"})
            raise RuntimeError("rolled back")
    async with store.db.transaction() as tx:
        tx.notify({"event": "sent"})
    await eventually(lambda: seen == [{"event": "sent"}])


async def test_alerts_are_kept_once_each_and_forwarded_in_order(store) -> None:
    await node(store)
    alert = {"id": "a1", "rule": "r", "state": "firing", "severity": "warning", "labels": {"x": "1"},
             "annotations": {}, "value": 2.5, "starts_at": "2026-01-01T00:00:00Z", "ends_at": None}
    assert await store.add_alerts("n-1", [alert, alert | {"id": "a2"}]) == 2
    assert await store.add_alerts("n-1", [alert]) == 0
    assert [a["id"] for a in await store.unforwarded_alerts(10)] == ["a1", "a2"]
    await store.mark_forwarded([("n-1", "a1")])
    assert [(a["id"], a["labels"]) for a in await store.unforwarded_alerts(10)] == [("a2", {"x": "1"})]


async def test_each_alerts_latest_transition_is_listed_newest_first_a_page_at_a_time(store) -> None:
    await node(store)
    await node(store, "n-2")
    alert = {"rule": "r", "severity": "warning", "annotations": {}, "value": 1.0,
             "starts_at": "2026-01-01T00:00:00Z", "ends_at": None}
    await store.add_alerts("n-1", [alert | {"id": "f1", "state": "firing", "labels": {"x": "1"}},
                                   alert | {"id": "f2", "state": "firing", "labels": {"x": "2"}},
                                   alert | {"id": "r1", "state": "resolved", "labels": {"x": "1"}}])
    await store.add_alerts("n-2", [alert | {"id": "f1", "state": "firing", "labels": {"x": "1"}}])
    assert [(a["node"], a["id"]) for a in await store.current_alerts()] == [("n-2", "f1"), ("n-1", "r1"), ("n-1", "f2")]
    assert [a["id"] for a in await store.current_alerts("firing", "n-1")] == ["f2"]
    first = await store.current_alerts(limit=2)
    cursor = (first[-1]["received_at"], first[-1]["node"], first[-1]["id"])
    assert [(a["node"], a["id"]) for a in await store.current_alerts(limit=2, before=cursor)] == [("n-1", "f2")]


async def test_settings_audit_and_client_certificates(store) -> None:
    await store.put_setting("logging", {"a": [1]})
    await store.put_setting("logging", {"a": [2]})
    assert await store.get_setting("logging") == {"a": [2]} and await store.get_setting("none") is None
    for n in range(3):
        await store.add_audit({"at": n, "role": "admin", "name": "a", "serial": "s", "method": "POST", "path": f"/{n}",
                               "status": 200, "error": None})
    assert [e["path"] for e in await store.list_audit(2)] == ["/2", "/1"]
    await store.add_client_certificate("c1", "admin", "a", FAR)
    await store.add_client_certificate("c1", "admin", "a", FAR)
    assert await store.revoke_client_certificate("c1") and not await store.revoke_client_certificate("nope")
    assert await store.revoked_serials() == {"c1"}
    for serial in ("c2", "c3"):
        await store.add_client_certificate(serial, "scraper", serial, FAR)
    first = await store.list_client_certificates(2)
    assert [c["serial"] for c in first] == ["c1", "c2"] and first[0]["revoked_at"] is not None
    after = (first[-1]["created_at"], first[-1]["serial"])
    assert [c["serial"] for c in await store.list_client_certificates(2, after)] == ["c3"]


async def test_migrations_are_listed_newest_first_a_page_at_a_time_and_by_state(store) -> None:
    docs = []
    for n, ended in enumerate([None, "succeeded", "failed", "succeeded"]):
        doc = {"id": f"m-{n}", "instance": f"i-{n}", "state": "running", "phase": "checkpoint", "progress": {}}
        assert await store.begin_migration(doc, "c-1") is None
        if ended:
            doc.update(state=ended, phase="done")
            await store.put_migration(doc)
        docs.append(doc)
    listed = await store.list_migrations(None, 10)
    assert [m["id"] for m in listed] == ["m-3", "m-2", "m-1", "m-0"]
    assert listed[0]["state"] == "succeeded" and listed[0]["controller"] == "c-1"
    first = await store.list_migrations(None, 2)
    rest = await store.list_migrations(None, 10, (first[-1]["listed_at"], first[-1]["id"]))
    assert [m["id"] for m in first + rest] == ["m-3", "m-2", "m-1", "m-0"]
    assert [m["id"] for m in await store.list_migrations("succeeded", 10)] == ["m-3", "m-1"]
    assert [m["id"] for m in await store.list_migrations("running", 10)] == ["m-0"]
    # Ended, they no longer hold their instances: each may move again.
    assert await store.active_migration("i-1") is None and await store.active_migration("i-0") == "m-0"


async def test_nodes_are_found_by_part_of_their_id_or_hostname(store) -> None:
    for node_id, hostname in (("n-1", "Web_1"), ("n-2", "db-1"), ("n-3", "web%")):
        await store.add_token(f"h{node_id}", FAR, 1)
        assert await store.enroll(f"h{node_id}", "key", node_id, hostname, f"serial-{node_id}", FAR) == "ok"

    async def ids(match: str) -> list[str]:
        return [row["id"] for row in await store.list_nodes(match=match)]

    assert await ids("WEB") == ["n-1", "n-3"] and await ids("n-2") == ["n-2"]
    assert await ids("%") == ["n-3"] and await ids("_") == ["n-1"], "LIKE's wildcards are plain characters"
    assert await ids("'; DROP TABLE nodes; --") == [] and await ids("") == ["n-1", "n-2", "n-3"]


async def test_a_sign_in_link_opens_one_session_and_revoking_ends_it(store) -> None:
    events: list[Any] = []
    store.subscribe(events.append)
    await store.add_ui_signin("l-1", "h-link", "admin", FAR)
    await store.add_ui_signin("l-2", "h-old", "admin", time.time() - 1)
    session = {"id": "s-1", "hash": "h-session", "expires_at": FAR, "remote": "127.0.0.1"}
    assert await store.redeem_ui_signin("h-link", session) == "ok"
    assert await store.redeem_ui_signin("h-link", {**session, "id": "s-2", "hash": "h-2"}) == "used"
    assert await store.redeem_ui_signin("h-old", {**session, "id": "s-3", "hash": "h-3"}) == "expired"
    assert await store.redeem_ui_signin("h-none", {**session, "id": "s-4", "hash": "h-4"}) == "unknown"
    assert (await store.ui_session("h-session"))["name"] == "admin" and await store.ui_session("h-link") is None
    assert [(r["id"], r["kind"]) for r in await store.list_ui_sessions()] == [("l-1", "signin"), ("s-1", "session")]
    assert await store.revoke_ui_session("s-1") and not await store.revoke_ui_session("s-none")
    assert await store.ui_session("h-session") is None
    assert {"event": "ui-revoked", "id": "s-1"} in events


async def test_controllers_register_and_age_out(store) -> None:
    await store.controller_seen("c-a", "https://a:8443", 1.0)
    await store.controller_seen("c-b", "https://b:8443", 2.0)
    assert [c["url"] for c in await store.list_controllers(time.time() - 60)] == ["https://a:8443", "https://b:8443"]
    await store.controller_gone("c-a")
    assert [c["id"] for c in await store.list_controllers(time.time() - 60)] == ["c-b"]
    assert await store.list_controllers(time.time() + 60) == []


# What only a shared database has.

@pytest.fixture
async def shared(postgres) -> AsyncIterator[Callable[[], Any]]:
    async for open_one in opener(postgres.database()):
        yield open_one


@pytest.mark.integration
async def test_an_event_from_one_controller_reaches_the_others(shared) -> None:
    a, b = await shared(), await shared()
    seen_by_b = events_of(b)
    await node(a)
    await a.add_task(task("n-1", "k"))
    await eventually(lambda: {"event": "tasks", "node": "n-1"} in seen_by_b)
    assert {"event": "certificate", "node": "n-1", "serial": "serial-n-1"} in seen_by_b


@pytest.mark.integration
async def test_two_controllers_racing_deliver_each_task_once(shared) -> None:
    a, b = await shared(), await shared()
    await node(a)
    same = await asyncio.gather(*(s.add_task(task("n-1", "same") | {"id": f"t-{i}"}) for i, s in enumerate((a, b) * 5)))
    assert len({t["id"] for t, _ in same}) == 1 and sum(created for _, created in same) == 1
    for key in range(40):
        await a.add_task(task("n-1", f"k{key}"))
    ids: list[str] = []
    while claims := await asyncio.gather(*(s.claim_tasks("n-1", 3) for s in (a, b) * 4)):
        if not any(claims):
            break
        ids += [t["id"] for claimed in claims for t in claimed]
    assert len(ids) == len(set(ids)) == 41


@pytest.mark.integration
async def test_a_token_enrolls_one_node_even_when_two_controllers_race(shared) -> None:
    a, b = await shared(), await shared()
    await a.add_token("once", FAR, 1)
    results = await asyncio.gather(*(s.enroll("once", f"k{i}", f"n-{i}", "h", f"s{i}", FAR) for i, s in enumerate((a, b) * 4)))
    assert sorted(results) == ["ok"] + ["used"] * 7


@pytest.mark.integration
async def test_singleton_work_runs_on_one_controller_and_moves_when_it_dies(shared) -> None:
    a, b = await shared(), await shared()
    running: list[str] = []

    def work(name: str) -> Callable[[], Any]:
        async def forever() -> None:
            running.append(name)
            await asyncio.Event().wait()
        return forever

    first = asyncio.create_task(a.singleton("test-work", work("a")))
    await eventually(lambda: running == ["a"])
    second = asyncio.create_task(b.singleton("test-work", work("b")))
    await asyncio.sleep(1.0)
    assert running == ["a"]  # b waits while a holds it
    first.cancel()  # a dies: its lock connection goes with it
    await eventually(lambda: running == ["a", "b"], timeout=20)
    second.cancel()
    await asyncio.gather(first, second, return_exceptions=True)


@pytest.mark.integration
async def test_the_database_going_away_is_unavailable_not_an_error_and_comes_back(postgres, shared) -> None:
    store = await shared()
    seen = events_of(store)
    await node(store)
    postgres.stop()
    try:
        with pytest.raises(StoreUnavailable, match="database"):
            await store.list_nodes()
    finally:
        postgres.start()
    await eventually(lambda: None in seen, timeout=30)  # the listener reconnected and says it may have missed events
    assert [n["id"] for n in await store.list_nodes()] == ["n-1"]


@pytest.mark.integration
async def test_a_wrong_password_or_database_names_the_setting(postgres) -> None:
    with pytest.raises(StoreError, match=r"password authentication failed.*fix the database setting") as wrong:
        await open_store(postgres.url(password="wrong")).open()
    assert "wrong" not in str(wrong.value)  # the password is not repeated in logs
    with pytest.raises(StoreError, match=r"does not exist.*fix the database setting"):
        await open_store(postgres.url("no_such_db")).open()


async def test_pruning_forgets_what_ended_before_the_retention(store) -> None:
    await node(store)
    old, _ = await store.add_task(task("n-1", "old"))
    await store.finish_task(old["id"], "n-1", {"state": "succeeded"}, lambda t: False)
    waiting, _ = await store.add_task(task("n-1", "waiting"))
    transition = {"rule": "r", "severity": "warning", "labels": {"x": "1"}, "annotations": {}, "value": 1.0,
                  "starts_at": "2026-01-01T00:00:00Z", "ends_at": None}
    await store.add_alerts("n-1", [transition | {"id": "f1", "state": "firing"},
                                   transition | {"id": "r1", "state": "resolved"},
                                   transition | {"id": "f2", "state": "firing", "labels": {"x": "2"}}])
    pruned = await store.prune(time.time() + 1, forwarding=False)
    assert pruned["tasks"] == 1 and pruned["alerts"] == 2 and pruned["tokens"] == 1
    assert await store.get_task(old["id"]) is None and await store.get_task(waiting["id"]) is not None
    assert [a["id"] for a in await store.current_alerts()] == ["f2"]  # still firing: kept
    assert await store.prune(time.time() - 60, forwarding=False) == {
        "tasks": 0, "migrations": 0, "rebalancing decisions": 0, "tokens": 0, "sessions": 0,
        "alerts": 0}


async def test_rebalancing_samples_decisions_and_the_round_lease(store) -> None:
    now = time.time()
    await store.add_rebalance_samples([("n-1", now - 100, 0.5, {"a": 1.0}), ("n-1", now, 0.25, {"a": 0.5})], now - 200)
    await store.add_rebalance_samples([("n-2", now + 1, 0.0, {})], now - 50)  # the oldest goes
    assert [(s["node"], s["cpu"], s["instances"]) for s in await store.rebalance_samples(now - 500)] == [
        ("n-1", 0.25, {"a": 0.5}), ("n-2", 0.0, {})]
    for at in (now - 10, now):
        await store.add_rebalance_entry({"at": at, "instance": "a", "migration": None})
    newest, oldest = await store.rebalance_history(limit=5)
    assert newest["at"] == now and oldest["at"] == now - 10 and newest["id"] > oldest["id"]
    assert await store.rebalance_history(limit=5, before=newest["id"]) == [oldest]
    assert await store.rebalance_history(since=now - 5) == [newest]
    assert await store.take_lease("round", "c-1", 60) and not await store.take_lease("round", "c-2", 60)
    await store.release_lease("round", "c-2")  # not its holder: nothing happens
    assert not await store.take_lease("round", "c-2", 60)
    await store.release_lease("round", "c-1")
    assert await store.take_lease("round", "c-2", -1)  # taken, and expired at once
    assert await store.take_lease("round", "c-1", 60)
