"""Inputs that used to hang or crash the controller, and the rules that keep them out.

Each test here failed on the code before the fix it proves: a NaN long-poll wait parked in
the event loop, NaN/Infinity accepted as JSON numbers, deep nesting raising RecursionError
on the unauthenticated enrollment port, the CA's signature work done for anyone before
the token was checked, and names matched with ``$`` (which also matches before a final
newline, so ``"web\\n"`` was a name of its own).
"""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.sdk import NAME_RE
from tests.test_controller import csr_for, enroll_node, register, token

REPO = Path(__file__).resolve().parents[1]


def test_no_validating_pattern_ends_in_a_dollar() -> None:
    """``re.compile(r"^...$")`` also matches "name\\n"; the end of a pattern is ``\\Z``."""
    wrong = []
    for path in sorted(p for d in ("agent", "plugins", "controller") for p in (REPO / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("compile", "match", "fullmatch") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and re.search(r"(?<!\\)\$\)?$", node.args[0].value)):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.args[0].value!r}")
    assert not wrong, "patterns ending in $ (use \\Z):\n" + "\n".join(wrong)
    assert NAME_RE.match("web") and not NAME_RE.match("web\n")


@pytest.mark.integration
def test_a_nan_or_negative_long_poll_wait_is_refused(controller, tmp_path) -> None:
    node_id, cert = enroll_node(controller, tmp_path)
    for wait in ("nan", "-1", "soon"):
        status, answer = controller.call("GET", f"/v1/nodes/{node_id}/tasks?wait={wait}", cert=cert)
        assert status == 400 and "wait must be a number of seconds, 0 or more" in answer["error"], (wait, answer)
    status, _ = controller.call("GET", f"/v1/nodes/{node_id}/tasks?wait=0", cert=cert)
    assert status == 200


@pytest.mark.integration
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_json_numbers_outside_json_are_refused(controller, number) -> None:
    raw = f'{{"ttl_seconds": {number}}}'.encode()
    status, answer = controller.call("POST", "/v1/tokens", raw=raw, cert=controller.admin_cert)
    assert status == 400 and "not valid JSON" in answer["error"], answer
    status, answer = controller.call("POST", "/v1/enroll", raw=raw, port=controller.enroll_port)
    assert status == 400 and "not valid JSON" in answer["error"], answer


@pytest.mark.integration
def test_deep_nesting_on_the_enrollment_port_is_a_400_not_a_crash(controller) -> None:
    status, answer = controller.call("POST", "/v1/enroll", raw=b"[" * 100_000, port=controller.enroll_port)
    assert status == 400 and "nested too deeply" in answer["error"], answer
    assert "Traceback" not in controller.log_path.read_text()


@pytest.mark.integration
def test_the_token_is_checked_before_any_work_on_the_csr(controller) -> None:
    # A CSR that would fail verification: with an unknown token the answer is about the token.
    status, answer = controller.call(
        "POST", "/v1/enroll", {"token": "x" * 32, "csr": "not a CSR", "hostname": "h"}, port=controller.enroll_port)
    assert status == 401 and "join token is not known" in answer["error"], answer
    # With a good token, a bad CSR is refused and the token is not spent.
    join = token(controller)
    status, answer = controller.call(
        "POST", "/v1/enroll", {"token": join, "csr": "not a CSR", "hostname": "h"}, port=controller.enroll_port)
    assert status == 400, answer
    key = ec.generate_private_key(ec.SECP256R1())
    status, answer = controller.call(
        "POST", "/v1/enroll", {"token": join, "csr": csr_for(key), "hostname": "h"}, port=controller.enroll_port)
    assert status == 201, answer


@pytest.mark.integration
def test_a_name_with_a_trailing_newline_is_refused(controller) -> None:
    status, answer = controller.call(
        "POST", "/v1/instances", {"name": "web\n", "kind": "process", "command": ["sleep", "1"]},
        cert=controller.admin_cert)
    assert status == 400 and "name" in answer["error"], answer


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"facts": {"cpus": 2, "memory_bytes": "lots"}}, "facts.memory_bytes must be an integer"),
        ({"facts": {"cpus": 1_000_000, "memory_bytes": 2 << 30}}, "facts.cpus must be an integer from 1 to 4096"),
        ({"facts": {"cpus": True, "memory_bytes": 2 << 30}}, "facts.cpus must be an integer"),
        ({"facts": {"cpus": 2, "memory_bytes": 1, "memory_available_bytes": 2}}, "more than facts.memory_bytes"),
        ({"plugins": {"kvm": {"available": "yes"}}}, "plugins.kvm.available must be true or false"),
        ({"plugins": {"kvm": {"available": True, "kinds": ["kvm", "../x"]}}}, "plugins.kvm.kinds must be a list"),
        ({"plugins": {"Bad Name": {}}}, "a plugin name is"),
        ({"instances": [{"name": "web\n", "kind": "lxc", "state": "running"}]}, "each item needs a valid name"),
        ({"metrics_url": "file:///etc/shadow"}, "metrics_url must be http(s)://HOST:PORT/metrics"),
        ({"metrics_url": "http://10.0.0.1:9464/admin?x=1"}, "metrics_url must be http(s)://HOST:PORT/metrics"),
    ],
)
def test_what_a_node_reports_is_checked_field_by_field(controller, tmp_path, extra, message) -> None:


    node_id, cert = enroll_node(controller, tmp_path)
    status, answer = register(controller, node_id, cert, **extra)
    assert status == 400 and message in answer["error"], answer
    status, answer = controller.call("POST", f"/v1/nodes/{node_id}/heartbeat",
                                     {"instances": extra.get("instances", []), "plugins": extra.get("plugins")},
                                     cert=cert)
    if "instances" in extra or "plugins" in extra:
        assert status == 400 and message in answer["error"], answer
    # Whatever was refused, the fleet's views still answer.
    assert controller.call("GET", "/v1/prometheus/targets", cert=controller.admin_cert)[0] == 200
    assert controller.call("GET", "/v1/nodes", cert=controller.admin_cert)[0] == 200


@pytest.mark.integration
def test_prometheus_scrapes_a_node_where_the_controller_sees_it_not_where_it_says(controller, tmp_path) -> None:


    node_id, cert = enroll_node(controller, tmp_path)
    status, _ = register(controller, node_id, cert, metrics_url="https://internal.example:9464/metrics",
                         facts={"cpus": 2, "memory_bytes": 2 << 30, "future_fact": {"x": 1}})
    assert status == 200
    status, groups = controller.call("GET", "/v1/prometheus/targets", cert=controller.admin_cert)
    [group] = [g for g in groups if g["labels"]["node_id"] == node_id]
    assert group["targets"] == ["127.0.0.1:9464"] and group["labels"]["__scheme__"] == "https"
    node = controller.admin("GET", f"/v1/nodes/{node_id}")
    assert "future_fact" not in node["facts"]  # a newer agent's fact is dropped, not refused


@pytest.mark.integration
def test_a_result_too_large_for_the_controller_fails_the_task_instead_of_hanging(controller_factory, kumo_agent):
    # The agent used to drop a result the controller refused with 413: the task stayed
    # "delivered" for ever. A process console is a result much larger than its request.
    from tests.test_agent_integration import submit, wait_task

    controller = controller_factory(max_body_bytes=65536)
    agent = kumo_agent(controller=controller)
    chatty = ["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x; exec sleep 600"]
    created = wait_task(controller, submit(controller, agent.node_id, "process.create",
                                           {"name": "chatty", "kind": "process", "options": {"command": chatty}})["id"])
    assert created["state"] == "succeeded", created
    time.sleep(1)
    console = wait_task(controller, submit(controller, agent.node_id, "process.console",
                                           {"name": "chatty", "bytes": 200000})["id"])
    assert (console["state"], console["code"]) == ("failed", "result-too-large"), console
    assert "65536-byte limit" in console["error"]
    small = wait_task(controller, submit(controller, agent.node_id, "process.console", {"name": "chatty", "bytes": 100})["id"])
    assert small["state"] == "succeeded" and small["result"]["log"] == "x" * 100
    wait_task(controller, submit(controller, agent.node_id, "process.delete", {"name": "chatty"})["id"])


@pytest.mark.integration
def test_a_node_cannot_hold_more_than_a_few_long_polls(controller_factory, tmp_path) -> None:
    import concurrent.futures

    controller = controller_factory(max_polls_per_node=2)
    node_id, cert = enroll_node(controller, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(controller.call, "GET", f"/v1/nodes/{node_id}/tasks?wait=3", cert=cert)
                   for _ in range(2)]
        time.sleep(1)
        status, answer = controller.call("GET", f"/v1/nodes/{node_id}/tasks?wait=3", cert=cert)
        assert status == 429 and answer["error"] == (f"node {node_id} already has 2 task polls waiting "
                                                     "(max_polls_per_node in controller.yaml); poll again when "
                                                     "one returns"), answer
        assert [f.result()[0] for f in waiting] == [200, 200]
    assert controller.call("GET", f"/v1/nodes/{node_id}/tasks?wait=0", cert=cert)[0] == 200


@pytest.mark.integration
def test_admin_and_scraper_certificates_can_be_revoked_for_good(controller, tmp_path) -> None:
    from controller.pki import key_pem

    key = ec.generate_private_key(ec.SECP256R1())
    issued = controller.admin("POST", "/v1/certificates", {"role": "scraper", "name": "prom", "csr": csr_for(key)})
    (tmp_path / "prom.crt").write_text(issued["certificate"])
    (tmp_path / "prom.key").write_bytes(key_pem(key))
    scraper = (tmp_path / "prom.crt", tmp_path / "prom.key")
    assert controller.call("GET", "/metrics", cert=scraper)[0] == 200
    listed = {c["serial"]: c for c in controller.admin("GET", "/v1/certificates")["certificates"]}
    assert listed[issued["serial"]]["role"] == "scraper" and listed[issued["serial"]]["revoked_at"] is None
    assert {c["role"] for c in listed.values()} == {"admin", "scraper"}  # init's admin is listed too
    page = controller.admin("GET", "/v1/certificates?limit=1")  # oldest first: init's admin
    assert [c["role"] for c in page["certificates"]] == ["admin"] and page["next"]
    page = controller.admin("GET", "/v1/certificates?limit=1&after=" + quote(page["next"]))
    assert [c["serial"] for c in page["certificates"]] == [issued["serial"]] and not page["next"]

    controller.admin("DELETE", f"/v1/certificates/{issued['serial']}")
    status, answer = controller.call("GET", "/metrics", cert=scraper)
    assert status == 403 and "was revoked" in answer["error"], answer
    [own] = [s for s, c in listed.items() if c["role"] == "admin"]
    status, answer = controller.call("DELETE", f"/v1/certificates/{own}", cert=controller.admin_cert)
    assert status == 409, answer  # not the certificate making the request: no locking oneself out
    assert controller.call("DELETE", "/v1/certificates/abc123", cert=controller.admin_cert)[0] == 404

    controller.stop()
    controller.start()
    assert controller.call("GET", "/metrics", cert=scraper)[0] == 403  # revoked for good, not until a restart


@pytest.mark.integration
def test_every_admin_action_is_in_the_audit_log_with_who_and_how_it_ended(controller) -> None:
    from tests.test_kumoctl import run_kumoctl

    controller.admin("POST", "/v1/tokens", {"ttl_seconds": 600})
    status, _ = controller.call("POST", "/v1/tokens", {"ttl_seconds": 1}, cert=controller.admin_cert)
    assert status == 400
    controller.admin("GET", "/v1/nodes")  # reading changes nothing: not audited
    entries = controller.admin("GET", "/v1/audit?limit=10")["entries"]
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [("POST", "/v1/tokens", 400),
                                                                        ("POST", "/v1/tokens", 201)]
    assert entries[0]["role"] == "admin" and entries[0]["serial"] and "ttl_seconds" in entries[0]["error"]
    assert "join" not in str(entries)  # what the answer carried (the join string) is not logged
    result = run_kumoctl("audit", "list", "-o", "json", config=controller.kumoctl_config)
    assert result.returncode == 0, result.stderr
    assert [e["status"] for e in json.loads(result.stdout)] == [400, 201]


def test_a_node_claiming_more_than_it_first_had_is_held_to_it_until_an_admin_accepts(controller, tmp_path):
    # A compromised node that reports 4096 CPUs would win every placement and drain: the
    # controller keeps counting what its first registration said and flags the claim.
    node_id, cert = enroll_node(controller, tmp_path)
    small = {"cpus": 2, "memory_bytes": 2 << 30, "memory_available_bytes": 1 << 30}
    assert register(controller, node_id, cert, facts=small)[0] == 200
    assert register(controller, node_id, cert, facts={"cpus": 4096, "memory_bytes": 1 << 45,
                                                      "memory_available_bytes": 1 << 45})[0] == 200
    node = controller.admin("GET", f"/v1/nodes/{node_id}")
    assert (node["facts"]["cpus"], node["facts"]["memory_bytes"]) == (2, 2 << 30)
    assert node["facts"]["memory_available_bytes"] == 2 << 30
    assert node["capacity"] == {"cpus": 2, "memory_bytes": 2 << 30, "claimed": {"cpus": 4096, "memory_bytes": 1 << 45}}
    from tests.test_instances import kumoctl

    shown = kumoctl(controller, "nodes", "show", node_id).stdout
    assert f"the node now claims 4096 CPUs, 32768.0 GiB: kumoctl nodes accept {node_id}" in shown, shown
    assert "from now on" in kumoctl(controller, "nodes", "accept", node_id).stdout
    node = controller.admin("GET", f"/v1/nodes/{node_id}")
    assert node["facts"]["cpus"] == 4096 and node["capacity"]["claimed"] is None


@pytest.mark.integration
def test_connections_are_capped_per_client_and_in_all_and_idle_ones_closed(controller_factory, tmp_path) -> None:
    import http.client

    controller = controller_factory(max_connections=4, max_connections_per_client=2, keepalive_timeout=1.5)
    for i in range(2):
        (tmp_path / str(i)).mkdir()
    nodes = [enroll_node(controller, tmp_path / str(i)) for i in range(2)]

    def connect(cert: tuple[Path, Path]) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", controller.port, context=controller.context(cert), timeout=10)

    def get(conn: http.client.HTTPSConnection, path: str = "/v1/nodes") -> tuple[int, dict, str | None]:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.getheader("Connection")

    admin = [connect(controller.admin_cert) for _ in range(2)]
    assert [get(conn)[0] for conn in admin] == [200, 200]
    status, answer, connection = get(connect(controller.admin_cert))
    assert (status, connection) == (503, "close"), answer
    assert "holds 2 connections from admin 'admin' (max_connections_per_client" in answer["error"]
    # Another certificate is another client, up to the listener's total.
    held = [connect(cert) for _, cert in nodes]  # kept open while the test runs
    for conn, (node_id, _) in zip(held, nodes, strict=True):
        assert get(conn, f"/v1/nodes/{node_id}/tasks?wait=0")[0] == 200
    status, answer, _ = get(connect(nodes[0][1]), f"/v1/nodes/{nodes[0][0]}/tasks?wait=0")
    assert status == 503 and "already holds 4 connections (max_connections" in answer["error"], answer
    assert [get(conn)[0] for conn in admin] == [200, 200], "connections held before the cap keep working"
    # Idle kept-alive connections are closed by the controller, which frees their places.
    time.sleep(2)
    for conn in admin:
        conn.sock.settimeout(10)
        assert conn.sock.recv(1) == b"", "the controller closed the idle connection"
        conn.close()
    deadline = time.monotonic() + 10
    while (status := get(connect(controller.admin_cert))[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200


@pytest.mark.parametrize(("text", "message"), [
    ("max_connections: 0", "max_connections: expected a whole number of connections, 1 or more"),
    ("max_connections: 8\nmax_connections_per_client: 9", "max_connections_per_client: expected at most max_connections (8)"),
    ("keepalive_timeout: 0", "keepalive_timeout: expected a positive number of seconds"),
    ("max_polls_per_node: 0", "max_polls_per_node: expected a whole number of long polls, 1 or more"),
])
def test_bad_connection_settings_name_the_key(tmp_path, text, message) -> None:
    from agent.sdk import ConfigError
    from controller.settings import load_settings

    path = tmp_path / "controller.yaml"
    path.write_text("pki_dir: pki\ndatabase: c.db\n" + text + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)
    path.write_text("pki_dir: pki\ndatabase: c.db\n")
    defaults = load_settings(path)
    assert (defaults.max_connections, defaults.keepalive_timeout, defaults.max_polls_per_node) == (16384, 30.0, 4)
