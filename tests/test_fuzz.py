"""Property-based fuzzing of every API endpoint, against a real controller process.

Each route of the controller (the same list the OpenAPI document is made from) is called
with bodies, path parameters and query strings that hypothesis makes (the fields the route
documents with values of every JSON type, unknown fields, deep and odd values), as the
admin, a node, a scraper and another node. What must hold for every request: no 5xx, an
error is a JSON object with an ``error`` sentence, and no identity reaches what its role
may not (403). The budget is fixed and the examples derandomized, so a CI run is
repeatable; a failure prints the request that broke it.
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.app import API_MODULES
from controller.pki import key_pem
from tests.test_controller import csr_for, enroll_node

pytestmark = pytest.mark.integration

ROUTES = [route for module in API_MODULES for route in module.ROUTES if route.role != "enroll"]
ALLOWED = {  # the certificate roles each route role admits
    "admin": {"admin"}, "scraper": {"admin", "scraper"}, "node": {"node"}, "controller": {"controller"},
    "any": {"admin", "scraper", "node"},
}
# Query values that have broken parsers before: numbers out of range, NaN, empty, text.
QUERY_VALUES = st.sampled_from(["", "0", "1", "-1", "0.05", "nan", "inf", "1e999", "abc", "n-000000000000", "\n",
                                "999999999999999999999", "running", "failed"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
SEGMENT = st.text(min_size=1, max_size=30).map(lambda s: quote(s, safe=""))


class Caller:
    """Keep-alive HTTPS to the controller as one identity."""

    def __init__(self, port: int, context: ssl.SSLContext):
        self.port, self.context = port, context
        self.conn: http.client.HTTPSConnection | None = None

    def __call__(self, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=30)
            try:
                self.conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
                response = self.conn.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
            except BaseException:
                self.conn.close()  # a connection left mid-request cannot send the next one
                self.conn = None
                raise
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw[:200]


@pytest.fixture(scope="module")
def callers(controller_module, tmp_path_factory) -> dict[str, tuple[Caller, str]]:
    """One caller per identity, with the node id it may act as (or '')."""
    controller, tmp = controller_module, tmp_path_factory.mktemp("fuzz")
    out: dict[str, tuple[Caller, str]] = {"admin": (Caller(controller.port, controller.context(controller.admin_cert)), "")}
    key = ec.generate_private_key(ec.SECP256R1())
    issued = controller.admin("POST", "/v1/certificates", {"role": "scraper", "name": "fuzz", "csr": csr_for(key)})
    (tmp / "scraper.crt").write_text(issued["certificate"])
    (tmp / "scraper.key").write_bytes(key_pem(key))
    out["scraper"] = (Caller(controller.port, controller.context((tmp / "scraper.crt", tmp / "scraper.key"))), "")
    for name in ("node", "other-node"):
        node_id, cert = enroll_node(controller, tmp)
        out[name] = (Caller(controller.port, controller.context(cert)), node_id)
    return out


@pytest.fixture(scope="module")
def controller_module(request, tmp_path_factory):
    """One controller for the whole module: fuzzing is many requests, not many controllers."""
    from tests.harness.cluster import STORE, ControllerProcess

    init_args = ["--database", request.getfixturevalue("postgres").database()] if STORE == "postgresql" else []
    ctl = ControllerProcess(tmp_path_factory.mktemp("fuzz-controller"), {"poll_timeout": 1.0}, init_args)
    ctl.start()
    yield ctl
    ctl.stop()


@st.composite
def requests(draw: Any, route_index: int) -> tuple[str, str, bytes | None, str]:
    route = ROUTES[route_index]
    who = draw(st.sampled_from(["admin", "scraper", "node", "other-node"]))
    path = route.path
    for param in ("id", "name", "task_id", "mid", "serial"):
        if "{" + param + "}" in path:
            value = draw(st.sampled_from(["@node", "@fuzz"]) if param == "id" else st.just("@fuzz"))
            path = path.replace("{" + param + "}", value if value != "@fuzz" else draw(SEGMENT))
    fields = list((route.body or {}).keys())
    body: bytes | None = None
    if route.method in ("POST", "PUT"):
        doc = draw(st.dictionaries(st.sampled_from(fields + ["unknown"]) if fields else st.text(max_size=8), JSON,
                                   max_size=6))
        body = draw(st.sampled_from([json.dumps(doc).encode(), b"", b"[", b"NaN", json.dumps([doc]).encode()]))
    query = draw(st.dictionaries(st.sampled_from(["limit", "after", "state", "node", "q"]), QUERY_VALUES, max_size=3))
    if draw(st.booleans()):
        # A long-poll waits as long as it is asked (up to a minute): only waits that end soon.
        query["wait"] = draw(st.sampled_from(["", "0", "-1", "nan", "abc", "0.05", "1e-9"]))
    if query:
        path += "?" + urlencode(query)
    return who, route.method, body, path


@pytest.mark.parametrize("route_index", range(len(ROUTES)), ids=[f"{r.method} {r.path}" for r in ROUTES])
def test_no_input_breaks_an_endpoint_or_its_authorisation(callers, route_index: int) -> None:
    route = ROUTES[route_index]

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(requests(route_index))
    def check(request: tuple[str, str, bytes | None, str]) -> None:
        who, method, body, path = request
        caller, node_id = callers[who]
        path = path.replace("@node", node_id or "n-000000000000")
        status, answer = caller(method, path, body)
        assert status < 500, (who, method, path, body, status, answer)
        if status >= 400:
            assert isinstance(answer, dict) and isinstance(answer.get("error"), str), (method, path, status, answer)
        role = "node" if who == "other-node" else who
        if role not in ALLOWED[route.role] and status < 400:
            raise AssertionError(f"{who} reached {method} {path} ({route.role} only): {status} {answer!r:.200}")
        if route.role == "node" and status < 400:
            assert f"/nodes/{node_id}/" in path or path.startswith("/v1/relay/"), (who, path, status)

    check()


def test_every_route_is_fuzzed() -> None:
    assert len(ROUTES) > 30 and {r.role for r in ROUTES} >= {"admin", "node", "scraper", "controller"}
