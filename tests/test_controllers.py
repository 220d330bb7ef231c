"""Several active controllers on one PostgreSQL database, as real processes with real agents.

Every controller serves every endpoint: what one learns (a task queued, a node removed, a
heartbeat) the others act on, through the database and its events, not through memory.
"""

from __future__ import annotations

import time

import pytest

from tests.harness.agents import wait_for
from tests.test_agent_integration import submit, wait_task

pytestmark = pytest.mark.integration

SLOW_POLL = {"poll_timeout": 60.0}  # a task that arrives sooner was woken, not found by a poll's timeout


@pytest.fixture
def pair(postgres, controller_factory):
    """Two controllers, A and B, on one database, B joined to A's CA."""
    database = postgres.database()
    a = controller_factory(init_args=["--database", database], **SLOW_POLL)
    b = controller_factory(init_args=["--database", database, "--ca-from", str(a.pki)], **SLOW_POLL)
    return a, b


def test_a_task_submitted_on_one_controller_runs_on_an_agent_polling_another(pair, kumo_agent) -> None:
    a, b = pair
    agent = kumo_agent(controller=b)
    wait_for(lambda: a.admin("GET", f"/v1/nodes/{agent.node_id}")["state"] == "ready", "A sees the node ready")
    submitted = time.monotonic()
    task = submit(a, agent.node_id, "process.create",
                  {"name": "web", "kind": "process", "options": {"command": ["sleep", "600"]}})
    ended = wait_task(b, task["id"], timeout=SLOW_POLL["poll_timeout"] / 2)
    assert ended["state"] == "succeeded", ended
    # Woken by A's NOTIFY: the long-poll B held would otherwise have returned only after 60 s.
    assert time.monotonic() - submitted < SLOW_POLL["poll_timeout"] / 2
    assert a.admin("GET", f"/v1/tasks/{task['id']}")["state"] == "succeeded"


def test_a_node_removed_on_one_controller_is_refused_by_the_other_at_once(pair, kumo_agent) -> None:
    a, b = pair
    agent = kumo_agent(controller=b)
    a.admin("DELETE", f"/v1/nodes/{agent.node_id}")
    cert = (agent.state_dir / "node.crt", agent.state_dir / "node.key")
    status, answer = b.call("POST", f"/v1/nodes/{agent.node_id}/heartbeat", {}, cert=cert)
    assert status == 403 and "removed" in answer["error"], answer


def test_both_controllers_issue_certificates_the_other_accepts(pair, kumo_agent) -> None:
    a, b = pair
    on_b = kumo_agent(controller=b)  # enrolled by B's enrollment listener, with B's token
    cert = (on_b.state_dir / "node.crt", on_b.state_dir / "node.key")
    status, _ = a.call("POST", f"/v1/nodes/{on_b.node_id}/heartbeat", {}, cert=cert)
    assert status == 200
    status, _ = a.call("GET", "/v1/nodes", cert=b.admin_cert)  # B's admin certificate, on A
    assert status == 200


def test_a_controller_older_than_the_database_refuses_to_start(postgres, controller_factory) -> None:
    database = postgres.database()
    first = controller_factory(init_args=["--database", database])
    first.stop()
    postgres.sql(database, "UPDATE meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(AssertionError, match="schema is version 999, newer than this controller's"):
        first.start()


def test_a_wrong_password_stops_the_controller_naming_the_setting(postgres, controller_factory) -> None:
    wrong = postgres.url(postgres.database().rpartition("/")[2], password="not-the-password")
    with pytest.raises(AssertionError, match=r"(?s)exited 2.*password authentication failed.*fix the database setting"):
        controller_factory(init_args=["--database", wrong])


@pytest.mark.reliability("controller start", "database unreachable")
def test_an_unreachable_database_is_retried_and_the_api_says_why(tmp_path) -> None:
    from tests.harness import free_port
    from tests.harness.cluster import ControllerProcess

    nowhere = f"postgresql://kumo:x@127.0.0.1:{free_port()}/kumo"
    ctl = ControllerProcess(tmp_path / "ctl", {}, ["--database", nowhere])
    ctl.start(ready=False)
    try:
        status, answer = ctl.call("GET", "/v1/nodes", cert=ctl.admin_cert)
        assert status == 503 and "cannot reach its database" in answer["error"], answer
        assert ctl.proc.poll() is None  # still running, still retrying
    finally:
        ctl.stop()


def test_a_migration_relays_between_nodes_attached_to_different_controllers(criu_required, pair, kumo_agent, tmp_path):
    from tests.harness import read_counter
    from tests.harness.agents import running_on
    from tests.test_migration import COUNTER, PY

    a, b = pair
    source, destination = kumo_agent(controller=a), kumo_agent(controller=b)
    count = tmp_path / "web.count"
    a.admin("POST", "/v1/instances", {"name": "web", "kind": "process", "node": source.node_id, "vcpus": 1,
                                      "memory_mib": 64, "options": {"command": [PY, "-c", COUNTER, str(count)]}})
    try:
        wait_for(lambda: running_on(source, "web") and read_counter(count) >= 5, "web to count on the source")
        # Driven by A: the source uploads to A, the destination downloads through B.
        moved = a.admin("POST", "/v1/instances/web/migrate", {"to": destination.node_id})["migration"]
        done = wait_for(lambda: (m := b.admin("GET", f"/v1/migrations/{moved['id']}"))["state"] != "running" and m,
                        "the migration to end", limit=120)
        assert done["state"] == "succeeded", done
        assert done["progress"]["bytes_received"] == done["progress"]["bytes_sent"] > 0
        before = read_counter(count)
        wait_for(lambda: read_counter(count) > before + 5, "web to keep counting on the destination")
        assert a.admin("GET", "/v1/instances/web")["node"] == destination.node_id
    finally:
        a.delete_instance("web")


@pytest.mark.reliability("tasks on two controllers", "PostgreSQL restarted under load")
def test_postgresql_restarting_under_load_loses_nothing(postgres, pair, kumo_agent) -> None:
    a, b = pair
    agent = kumo_agent(controller=b)
    before = submit(a, agent.node_id, "process.create",
                    {"name": "before", "kind": "process", "options": {"command": ["sleep", "600"]}})
    postgres.restart()  # every controller's connections (pool, LISTEN, locks) are cut
    after = wait_for(lambda: _submit_when_back(a, agent.node_id), "A to take a task again", limit=60)
    for task in (before, after):
        assert wait_task(b, task["id"], timeout=60)["state"] == "succeeded"
    wait_for(lambda: a.admin("GET", f"/v1/nodes/{agent.node_id}")["state"] == "ready", "the node ready again on A")


def _submit_when_back(controller, node_id: str) -> dict | None:
    status, task = controller.call("POST", "/v1/tasks", {"node": node_id, "kind": "process.create", "payload": {
        "name": "after", "kind": "process", "options": {"command": ["sleep", "600"]}}}, cert=controller.admin_cert)
    assert status in (201, 503), task  # while the database is away: 503 and a reason, never a 500
    return task if status == 201 else None


@pytest.mark.reliability("migration across two controllers", "driving controller kill -9")
def test_a_migration_whose_controller_dies_ends_with_the_instance_running_once(criu_required, pair, kumo_agent,
                                                                                tmp_path):
    from tests.harness import read_counter
    from tests.harness.agents import running_on
    from tests.test_migration import COUNTER, PY

    a, b = pair
    source, destination = kumo_agent(controller=a), kumo_agent(controller=a)  # both fail over to B
    count = tmp_path / "web.count"
    # 200 MiB to carry: the transfer lasts long enough to cut it.
    command = [PY, "-c", COUNTER, str(count), "200"]
    a.admin("POST", "/v1/instances", {"name": "web", "kind": "process", "node": source.node_id, "vcpus": 1,
                                      "memory_mib": 512, "options": {"command": command}})
    try:
        wait_for(lambda: running_on(source, "web") and read_counter(count) >= 5, "web to count on the source", limit=60)
        moving = a.admin("POST", "/v1/instances/web/migrate", {"to": destination.node_id})["migration"]
        wait_for(lambda: b.admin("GET", f"/v1/migrations/{moving['id']}")["phase"] != "checkpoint",
                 "the checkpoint to be taken", limit=60, interval=0.02)
        a.kill()  # mid-transfer: the relay and the steps A had in mind are gone
        source.controller = destination.controller = b
        done = wait_for(lambda: (m := b.admin("GET", f"/v1/migrations/{moving['id']}"))["state"] != "running" and m,
                        "B to take the migration over and end it", limit=180)
        # A restored source says so at its next heartbeat, which may come just after the end.
        runs_on = wait_for(lambda: [agent.node_id for agent in (source, destination) if running_on(agent, "web")],
                           "web to be reported running", limit=10)
        assert len(runs_on) == 1, (done, runs_on)
        assert b.admin("GET", "/v1/instances/web")["node"] == runs_on[0], done
        before = read_counter(count)
        wait_for(lambda: read_counter(count) > before + 5, "web to keep counting where it runs")
    finally:
        b.delete_instance("web")
