"""The real controller process over real TLS: trust, enrollment, bad input, durability."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from controller.api import (
    alerts,
    enroll,
    images,
    instances,
    logging_settings,
    meta,
    migration,
    nodes,
    rebalancing,
    tasks,
    ui,
)
from controller.pki import CertificateAuthority, key_pem, pem
from controller.store import is_database_url
from tests.harness.cluster import controller_command

pytestmark = pytest.mark.integration


def csr_for(key, cn: str = "whatever") -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def token(controller, **body) -> str:
    return controller.admin("POST", "/v1/tokens", body or {"ttl_seconds": 600})["join"].split(":")[2]


def enroll_node(controller, tmp_path: Path) -> tuple[str, tuple[Path, Path]]:
    """Enroll like an agent does; the node id and its (certificate, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    status, answer = controller.call(
        "POST", "/v1/enroll", {"token": token(controller), "csr": csr_for(key), "hostname": "h1"},
        port=controller.enroll_port,
    )
    assert status == 201, answer
    node_id = answer["node_id"]
    cert_path, key_path = tmp_path / f"{node_id}.crt", tmp_path / f"{node_id}.key"
    cert_path.write_text(answer["certificate"])
    key_path.write_bytes(key_pem(key))
    return node_id, (cert_path, key_path)


def register(controller, node_id, cert, **extra):
    body = {"hostname": "h1", "agent_version": "test", "facts": {"cpus": 2, "memory_bytes": 2 << 30},
            "plugins": {}, "metrics_url": None, "instances": [], **extra}
    return controller.call("POST", f"/v1/nodes/{node_id}/register", body, cert=cert)


def handshake(controller, cert=None) -> str:
    """'ok' when a TLS handshake with the API completes and a request is answered, else the error."""
    context = controller.context(cert)
    try:
        with socket.create_connection(("127.0.0.1", controller.port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return "ok" if tls.recv(12).startswith(b"HTTP/1.1") else "no answer"
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__


def test_api_refuses_the_handshake_without_a_kumo_client_certificate(controller, tmp_path):
    assert handshake(controller, controller.admin_cert) == "ok"
    assert handshake(controller) != "ok"
    foreign = CertificateAuthority.create("Not Kumo")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = foreign.issue(key.public_key(), "admin", "admin", __import__("datetime").timedelta(days=1))
    (tmp_path / "f.crt").write_text(pem(cert))
    (tmp_path / "f.key").write_bytes(key_pem(key))
    assert handshake(controller, (tmp_path / "f.crt", tmp_path / "f.key")) != "ok"


def test_enrollment_listener_serves_enrollment_only(controller):
    status, answer = controller.call("GET", "/v1/nodes", port=controller.enroll_port)
    assert status == 404 and "no such endpoint" in answer["error"]


def test_init_writes_private_keys_0600_and_a_usable_kumoctl_config(controller):
    for name in ("ca.key", "server.key", "admin.key"):
        assert (controller.pki / name).stat().st_mode & 0o777 == 0o600, name
    config = __import__("yaml").safe_load(controller.kumoctl_config.read_text())
    assert config["controller"] == controller.url
    result = subprocess.run(  # noqa: S603
        [*controller_command(), "init", "--dir", str(controller.dir)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr


def test_join_string_pins_the_ca_and_the_token_is_stored_hashed(controller):
    join = controller.admin("POST", "/v1/tokens", {"ttl_seconds": 600, "uses": 2})["join"]
    prefix, port, secret, ca_hash, urls = join.split(":", 4)
    assert (prefix, int(port), urls) == ("kumo2", controller.enroll_port, controller.url)
    ca = x509.load_pem_x509_certificate((controller.pki / "ca.crt").read_bytes())
    spki = ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ca_hash == hashlib.sha256(spki).hexdigest()
    stored = [row["hash"] for row in controller.sql("SELECT hash FROM tokens")]
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    if not is_database_url(controller.database):
        assert secret.encode() not in Path(controller.database).read_bytes()


def test_tokens_unknown_used_and_expired_are_refused_with_what_to_do(controller):
    def attempt(secret):
        key = ec.generate_private_key(ec.SECP256R1())
        return controller.call("POST", "/v1/enroll", {"token": secret, "csr": csr_for(key), "hostname": "h"},
                               port=controller.enroll_port)

    status, answer = attempt("no-such-token")
    assert status == 401 and "not known" in answer["error"] and "kumoctl token create" in answer["error"]
    once = token(controller)
    assert attempt(once)[0] == 201
    status, answer = attempt(once)
    assert status == 401 and "already used" in answer["error"]
    stale = token(controller)
    controller.sql("UPDATE tokens SET expires_at = 0 WHERE hash = ?", hashlib.sha256(stale.encode()).hexdigest())
    status, answer = attempt(stale)
    assert status == 401 and "expired" in answer["error"]


def test_the_same_join_again_gets_its_node_and_the_used_token_nothing_else(controller):
    """The agent's retry after a lost answer: same token, same key (a new CSR), same node."""
    secret = token(controller)
    key = ec.generate_private_key(ec.SECP256R1())

    def attempt(with_key):
        return controller.call("POST", "/v1/enroll", {"token": secret, "csr": csr_for(with_key), "hostname": "h"},
                               port=controller.enroll_port)

    status, first = attempt(key)
    assert status == 201
    status, again = attempt(key)
    assert status == 201 and again["node_id"] == first["node_id"] and again["certificate"] != first["certificate"]
    status, answer = attempt(ec.generate_private_key(ec.SECP256R1()))
    assert status == 401 and "already used" in answer["error"], answer
    assert [node["id"] for node in controller.admin("GET", "/v1/nodes")["nodes"]] == [first["node_id"]]
    controller.admin("DELETE", f"/v1/nodes/{first['node_id']}")
    status, answer = attempt(key)
    assert status == 401 and "already used" in answer["error"], answer


def test_bad_csr_is_refused_without_spending_the_token(controller):
    secret = token(controller)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for csr, expected in (("junk", "PEM certificate signing request"), (csr_for(rsa_key), "ECDSA P-256")):
        status, answer = controller.call("POST", "/v1/enroll", {"token": secret, "csr": csr, "hostname": "h"},
                                         port=controller.enroll_port)
        assert status == 400 and expected in answer["error"], answer
    key = ec.generate_private_key(ec.SECP256R1())
    status, _ = controller.call("POST", "/v1/enroll", {"token": secret, "csr": csr_for(key, "n-evil"), "hostname": "h"},
                                port=controller.enroll_port)
    assert status == 201


def test_node_certificate_names_the_node_not_what_the_csr_asked(controller, tmp_path):
    node_id, (cert_path, _) = enroll_node(controller, tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == node_id
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "node"
    # The names a scraper may dial: the node id, its hostname, the address it enrolled from.
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == [node_id]  # never the hostname the node reported
    assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_a_node_can_act_only_as_itself_and_never_as_admin(controller, tmp_path):
    first, cert1 = enroll_node(controller, tmp_path)
    second, _ = enroll_node(controller, tmp_path)
    assert register(controller, first, cert1)[0] == 200
    status, answer = register(controller, second, cert1)
    assert status == 403 and f"cannot act as node {second}" in answer["error"]
    status, answer = controller.call("GET", "/v1/nodes", cert=cert1)
    assert status == 403 and "admin certificate" in answer["error"]
    status, answer = controller.call("POST", f"/v1/nodes/{first}/heartbeat", {"instances": []}, cert=controller.admin_cert)
    assert status == 403


def test_removed_node_is_refused_at_once(controller, tmp_path):
    node_id, cert = enroll_node(controller, tmp_path)
    assert register(controller, node_id, cert)[0] == 200
    controller.admin("DELETE", f"/v1/nodes/{node_id}")
    status, answer = controller.call("POST", f"/v1/nodes/{node_id}/heartbeat", {"instances": []}, cert=cert)
    assert status == 403 and "re-join" in answer["error"]


def test_bad_json_unknown_fields_and_oversized_bodies_are_named(controller, tmp_path):
    status, answer = controller.call("POST", "/v1/tokens", raw=b"{not json", cert=controller.admin_cert)
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = controller.call("POST", "/v1/tokens", {"ttl": 5}, cert=controller.admin_cert)
    assert status == 400 and "unknown field 'ttl'" in answer["error"]
    status, answer = controller.call("POST", "/v1/tokens", {"ttl_seconds": "soon"}, cert=controller.admin_cert)
    assert status == 400 and "ttl_seconds" in answer["error"]
    big = json.dumps({"node": "x", "kind": "a.b", "payload": {"blob": "x" * (1024 * 1024 + 1)}}).encode()
    status, answer = controller.call("POST", "/v1/tasks", raw=big, cert=controller.admin_cert)
    assert status == 413 and "limit" in answer["error"]
    assert controller.admin("GET", "/v1/nodes") == {"nodes": [], "next": None}


@pytest.mark.reliability("task store", "controller kill -9")
def test_tasks_survive_a_controller_crash_and_keep_their_idempotency(controller, tmp_path):
    node_id, cert = enroll_node(controller, tmp_path)
    register(controller, node_id, cert)
    body = {"node": node_id, "kind": "x.run", "payload": {"n": 1}, "idempotency_key": "once"}
    status, first = controller.call("POST", "/v1/tasks", body, cert=controller.admin_cert)
    assert status == 201
    controller.kill()
    controller.start()
    status, again = controller.call("POST", "/v1/tasks", body, cert=controller.admin_cert)
    assert (status, again["id"]) == (200, first["id"])
    status, polled = controller.call("GET", f"/v1/nodes/{node_id}/tasks?wait=5", cert=cert)
    assert [t["id"] for t in polled["tasks"]] == [first["id"]]
    status, _ = controller.call("POST", f"/v1/nodes/{node_id}/tasks/{first['id']}/result",
                                {"state": "failed", "error": "boom", "code": "x"}, cert=cert)
    assert status == 200
    assert controller.admin("GET", f"/v1/tasks/{first['id']}")["error"] == "boom"
    status, answer = controller.call("POST", "/v1/tasks", {"node": "n-000000000000", "kind": "x.run"}, cert=controller.admin_cert)
    assert status == 404 and "kumoctl nodes list" in answer["error"]


def test_openapi_document_lists_exactly_the_routes(controller):
    document = controller.admin("GET", "/v1/openapi.json")
    served = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    declared = {(r.method, r.path) for m in (enroll, nodes, tasks, instances, images, migration, rebalancing,
                                             logging_settings, alerts, meta, ui) for r in m.ROUTES}
    assert served == declared
    for method, path in declared:
        # Served means routed: a handler may still say 404 about the object in the path.
        status, answer = controller.call(method, path.replace("{", "x").replace("}", ""), {}, cert=controller.admin_cert,
                                         port=controller.enroll_port if path == "/v1/enroll" else None)
        assert status != 405 and "no such endpoint" not in str(answer), (method, path, answer)


def test_controller_metrics_and_prometheus_targets(controller, tmp_path):
    node_id, cert = enroll_node(controller, tmp_path)
    register(controller, node_id, cert, metrics_url="https://127.0.0.1:9999/metrics",
             plugins={"kvm": {"available": True, "reason": "", "kinds": ["kvm"], "attributes": {"acceleration": "tcg"}}})
    status, text = controller.call("GET", "/metrics", cert=controller.admin_cert)
    assert status == 200 and 'kumo_controller_nodes{state="ready"} 1.0' in text
    groups = controller.admin("GET", "/v1/prometheus/targets")
    assert groups == [{"targets": ["127.0.0.1:9999"], "labels": {
        "__scheme__": "https", "__metrics_path__": "/metrics", "node_id": node_id, "hostname": "h1",
        "kumo_state": "ready", "kumo_kinds": "kvm", "kumo_acceleration": "tcg"}}]
    status, _ = controller.call("GET", "/v1/prometheus/targets", cert=cert)
    assert status == 403


def test_alerts_are_stored_once_and_listed_by_state(controller, tmp_path):
    node_id, cert = enroll_node(controller, tmp_path)
    firing = {"id": "a1", "rule": "disk", "state": "firing", "severity": "critical", "labels": {"mount": "/"},
              "annotations": {"summary": "disk full"}, "value": 97.0, "starts_at": "2026-01-01T00:00:00Z", "ends_at": None}
    for _ in range(2):
        status, answer = controller.call("POST", f"/v1/nodes/{node_id}/alerts", {"alerts": [firing]}, cert=cert)
        assert status == 200
    assert answer["accepted"] == 0
    assert [a["state"] for a in controller.admin("GET", "/v1/alerts?state=firing")["alerts"]] == ["firing"]
    resolved = {**firing, "id": "a2", "state": "resolved", "ends_at": "2026-01-01T00:05:00Z"}
    controller.call("POST", f"/v1/nodes/{node_id}/alerts", {"alerts": [resolved]}, cert=cert)
    assert controller.admin("GET", "/v1/alerts?state=firing")["alerts"] == []
    assert len(controller.admin("GET", "/v1/alerts?state=resolved")["alerts"]) == 1
    other = {**firing, "id": "a3", "labels": {"mount": "/var"}}
    controller.call("POST", f"/v1/nodes/{node_id}/alerts", {"alerts": [other]}, cert=cert)
    page = controller.admin("GET", "/v1/alerts?limit=1")
    assert [a["labels"] for a in page["alerts"]] == [{"mount": "/var"}] and page["next"]
    page = controller.admin("GET", f"/v1/alerts?limit=1&after={quote(page['next'])}")
    assert [(a["labels"], a["state"]) for a in page["alerts"]] == [({"mount": "/"}, "resolved")] and not page["next"]
    status, answer = controller.call("POST", f"/v1/nodes/{node_id}/alerts", {"alerts": [{**firing, "state": "on"}]}, cert=cert)
    assert status == 400 and "firing or resolved" in answer["error"]


def test_log_forwarding_setting_goes_to_nodes_running_rsyslog(controller, tmp_path):
    node_id, cert = enroll_node(controller, tmp_path)
    register(controller, node_id, cert, plugins={"rsyslog": {"available": True, "reason": "", "kinds": [], "attributes": {}}})
    status, answer = controller.call("PUT", "/v1/logging", {"target": "logs:70000"}, cert=controller.admin_cert)
    assert status == 400 and "port from 1 to 65535" in answer["error"]
    answer = controller.admin("PUT", "/v1/logging", {"target": "logs.example:2514", "protocol": "relp"})
    [task] = answer["tasks"]
    assert (task["kind"], task["payload"]["target"], task["payload"]["tls"]) == ("rsyslog.configure", "logs.example:2514", True)
    # Registering again does not resend the same version.
    register(controller, node_id, cert, plugins={"rsyslog": {"available": True, "reason": "", "kinds": [], "attributes": {}}})
    assert len(controller.admin("GET", f"/v1/tasks?node={node_id}")["tasks"]) == 1
    shown = controller.admin("GET", "/v1/logging")
    assert shown["effective"][node_id]["target"] == "logs.example:2514"


def test_run_with_a_bad_config_names_the_key(tmp_path):
    config = tmp_path / "controller.yaml"
    config.write_text("pki_dir: pki\ndatabase: db\nlisten: nowhere\n")
    result = subprocess.run([*controller_command(), "run", "--config", str(config)],  # noqa: S603
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "listen" in result.stderr and "HOST:PORT" in result.stderr
    config.write_text("pki_dir: pki\ndatabase: db\nlisen: 1\n")
    result = subprocess.run([*controller_command(), "run", "--config", str(config)],  # noqa: S603
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "lisen" in result.stderr and "Traceback" not in result.stderr


def test_alerts_reach_an_alertmanager_webhook_with_retries(controller_factory, tmp_path):
    import http.server
    import threading

    from tests.harness import free_port

    received: list = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/api/v2/alerts"
            received.extend(body)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    port = free_port()
    controller = controller_factory(alertmanager_url=f"http://127.0.0.1:{port}")
    node_id, cert = enroll_node(controller, tmp_path)
    alert = {"id": "t1", "rule": "load", "state": "firing", "severity": "warning", "labels": {"probe": "load"},
             "annotations": {"summary": "load high"}, "value": 9.0, "starts_at": "2026-01-01T00:00:00Z", "ends_at": None}
    # The receiver is not up yet: the controller keeps the alert and retries.
    assert controller.call("POST", f"/v1/nodes/{node_id}/alerts", {"alerts": [alert]}, cert=cert)[0] == 200
    server = http.server.HTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        resolved = {**alert, "id": "t2", "state": "resolved", "ends_at": "2026-01-01T00:01:00Z"}
        controller.call("POST", f"/v1/nodes/{node_id}/alerts", {"alerts": [resolved]}, cert=cert)
        deadline = time.monotonic() + 30
        while len(received) < 2:
            assert time.monotonic() < deadline, received
            time.sleep(0.2)
    finally:
        server.shutdown()
    assert received[0]["labels"] == {"probe": "load", "alertname": "load", "node": node_id, "severity": "warning"}
    assert "endsAt" not in received[0] and received[1]["endsAt"] == "2026-01-01T00:01:00Z"
    assert len(received) == 2


def test_a_heartbeat_carries_usage_checked_and_shown_with_cpu_rates(controller, tmp_path):
    node_id, cert = enroll_node(controller, tmp_path)
    assert register(controller, node_id, cert)[0] == 200

    def heartbeat(body):
        return controller.call("POST", f"/v1/nodes/{node_id}/heartbeat", body, cert=cert)

    usage = {"node": {"cpu_busy": 0.25, "cpus": 2, "memory_used_bytes": 1 << 30, "memory_total_bytes": 4 << 30,
                      "load1": 0.5, "load5": 0.4, "load15": 0.3, "newer_figure": 1},
             "instances": {"web": {"kind": "process", "cpu_seconds": 10.0, "memory_bytes": 1 << 20}}}
    assert heartbeat({"usage": usage})[0] == 200
    time.sleep(1)
    # A task poll in between says the node is alive, not when it last measured.
    assert controller.call("GET", f"/v1/nodes/{node_id}/tasks?wait=0", cert=cert)[0] == 200
    usage["instances"]["web"]["cpu_seconds"] = 10.5
    assert heartbeat({"usage": usage})[0] == 200
    shown = controller.admin("GET", f"/v1/nodes/{node_id}")["usage"]
    assert "newer_figure" not in shown["node"] and shown["node"]["cpu_busy"] == 0.25
    cores = shown["instances"]["web"]["cpu_cores"]
    assert 0 < cores <= 0.5
    # One sent early, moments later (an instance changed state), keeps the rate: over so short a
    # time a counter in clock ticks would say 0.
    assert heartbeat({"usage": usage})[0] == 200
    assert controller.admin("GET", f"/v1/nodes/{node_id}")["usage"]["instances"]["web"]["cpu_cores"] == cores
    for bad, field in (({"node": {"cpu_busy": 7}}, "usage.node.cpu_busy"),
                       ({"instances": {"web": {"kind": "process", "memory_bytes": -1}}}, "usage.instances.web.memory_bytes"),
                       ({"instances": {"../x": {"kind": "process"}}}, "usage.instances")):
        status, answer = heartbeat({"usage": bad})
        assert status == 400 and field in answer["error"], answer


def test_list_endpoints_page_with_limit_and_after(controller, tmp_path):
    nodes = sorted(enroll_node(controller, tmp_path)[0] for _ in range(3))
    first = controller.admin("GET", "/v1/nodes?limit=2")
    assert [n["id"] for n in first["nodes"]] == nodes[:2] and first["next"] == nodes[1]
    rest = controller.admin("GET", f"/v1/nodes?limit=2&after={first['next']}")
    assert [n["id"] for n in rest["nodes"]] == nodes[2:] and rest["next"] is None
    for n in range(5):
        controller.admin("POST", "/v1/tasks", {"node": nodes[0], "kind": "x.y", "payload": {"n": n}})
    seen, after = [], None
    while True:
        page = controller.admin("GET", "/v1/tasks?limit=2" + (f"&after={after}" if after else ""))
        seen += [t["payload"]["n"] for t in page["tasks"]]
        if not (after := page["next"]):
            break
    assert seen == [4, 3, 2, 1, 0]  # newest first, each once
    for bad in ("limit=0", "limit=1001", "limit=x", "after=nonsense"):
        status, answer = controller.call("GET", f"/v1/tasks?{bad}", cert=controller.admin_cert)
        assert status == 400 and ("limit" in answer["error"] or "cursor" in answer["error"]), (bad, answer)
