"""Agent pieces that need no controller: join strings, CA pinning, settings, journal, backoff."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.client import ControllerChoice
from agent.enroll import (
    JoinError,
    JoinString,
    fetch_unverified_chain,
    find_pinned_ca,
    install_renewed,
    key_pem,
    new_node_key,
    parse_join_string,
    recover_renewal,
    spki_sha256,
)
from agent.journal import Outcome, TaskJournal
from agent.pluginmanager import Hooks, make_plugin_manager
from agent.runtime import configure_plugins
from agent.sdk import Backoff, ConfigError, Fingerprint, hookimpl
from agent.settings import (
    JOIN_FILE,
    NODE_CERT,
    NODE_CERT_NEXT,
    NODE_KEY,
    JoinRecord,
    load_settings,
    read_join_record,
    write_join_record,
)
from controller.api.enroll import join_string
from tests.harness import free_port

GOOD_HASH = "ab" * 32


def test_join_string_parses():
    js = parse_join_string(f"kumo2:8444:{'t' * 32}:{GOOD_HASH.upper()}:https://ctl1:8443,https://[fd00::2]:8443/")
    assert (js.enroll_port, js.token, js.ca_hash) == (8444, "t" * 32, GOOD_HASH)
    assert js.controllers == ("https://ctl1:8443", "https://[fd00::2]:8443")


def test_join_string_is_what_the_controller_makes():
    made = join_string(8444, "t" * 32, GOOD_HASH, ["https://ctl1.example:8443", "https://10.0.0.2:9443"])
    assert parse_join_string(made) == JoinString(8444, "t" * 32, GOOD_HASH,
                                                 ("https://ctl1.example:8443", "https://10.0.0.2:9443"))


def test_an_older_controllers_join_string_names_no_controller():
    assert parse_join_string(f"kumo1:8444:{'t' * 32}:{GOOD_HASH}").controllers == ()


URLS = "https://a:8443"


@pytest.mark.parametrize(
    "text, part",
    [
        ("", "it starts with '', not kumo2"),
        (f"kumo3:8444:{'t' * 32}:{GOOD_HASH}:{URLS}", "it starts with 'kumo3', not kumo2"),
        (f"kumo2:8444:{'t' * 32}:{GOOD_HASH}", "5 fields separated by ':' needed, 4 found"),
        (f"kumo1:8444:{'t' * 32}:{GOOD_HASH}:extra", "4 fields separated by ':' needed, 5 found"),
        (f"kumo2:http:{'t' * 32}:{GOOD_HASH}:{URLS}", "enrollment port 'http'"),
        (f"kumo2:70000:{'t' * 32}:{GOOD_HASH}:{URLS}", "enrollment port '70000'"),
        (f"kumo2:8444:sh@rt:{GOOD_HASH}:{URLS}", "token part"),
        (f"kumo2:8444:{'t' * 32}:abc:{URLS}", "64 hex digits"),
        (f"kumo2:8444:{'t' * 32}:{GOOD_HASH}:", "controller URL 1: expected https://HOST:PORT"),
        (f"kumo2:8444:{'t' * 32}:{GOOD_HASH}:{URLS},http://b:8443", "controller URL 2: expected https://HOST:PORT (a controller's API address), got 'http://b:8443'"),
        (f"kumo2:8444:{'t' * 32}:{GOOD_HASH}:{URLS},https://b", "controller URL 2: expected https://HOST:PORT"),
        (f"kumo2:8444:{'t' * 32}:{GOOD_HASH}:{URLS}:extra", "controller URL 1: expected https://HOST:PORT"),
    ],
)
def test_malformed_join_strings_are_refused_clearly(text, part):
    with pytest.raises(JoinError, match="malformed join string") as err:
        parse_join_string(text)
    assert part in str(err.value)


def _name(cn: str, ou: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kumo"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(subject, issuer, key, signer, ca: bool, days: float = 1.0) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture
def tls_server(tmp_path):
    """A TLS listener on 127.0.0.1 presenting server cert + CA cert, like the enrollment port."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("kumo-ca", "ca"), _name("kumo-ca", "ca"), ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(_name("ctl", "controller"), ca.subject, key, ca_key, ca=False)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    keyfile = tmp_path / "server.key"
    keyfile.write_bytes(key_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, keyfile)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    received.append(tls.recv(4096))
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port, ca, cert, received
    listener.close()


def test_unverified_chain_is_fetched_and_the_pinned_ca_found(tls_server):
    port, ca, cert, received = tls_server
    chain = fetch_unverified_chain("127.0.0.1", port)
    assert [c.fingerprint(hashes.SHA256()) for c in chain] == [
        cert.fingerprint(hashes.SHA256()),
        ca.fingerprint(hashes.SHA256()),
    ]
    assert find_pinned_ca(chain, spki_sha256(ca), "x") == ca
    assert received in ([], [b""])  # nothing was sent over the unverified connection


def test_a_chain_without_the_pinned_ca_is_refused(tls_server):
    port, ca, _, _ = tls_server
    chain = fetch_unverified_chain("127.0.0.1", port)
    with pytest.raises(JoinError, match="refusing to join.*token was NOT sent"):
        find_pinned_ca(chain, GOOD_HASH, f"127.0.0.1:{port}")


def test_unreachable_enrollment_port_is_a_clear_error():
    with pytest.raises(JoinError, match="cannot reach the enrollment listener"):
        fetch_unverified_chain("127.0.0.1", free_port(), timeout=10)


def test_interrupted_renewal_is_finished_or_discarded(tmp_path):
    old_key, new_key = new_node_key(), new_node_key()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    old = _cert(_name("n-1", "node"), _name("ca", "ca"), old_key, ca_key, ca=False)
    new = _cert(_name("n-1", "node"), _name("ca", "ca"), new_key, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / NODE_KEY).write_bytes(key_pem(old_key))
    (tmp_path / NODE_CERT).write_bytes(old.public_bytes(pem))
    # Crash after the new certificate was parked but before the key moved: discard it.
    (tmp_path / NODE_CERT_NEXT).write_bytes(new.public_bytes(pem))
    recover_renewal(tmp_path)
    assert not (tmp_path / NODE_CERT_NEXT).exists()
    assert (tmp_path / NODE_CERT).read_bytes() == old.public_bytes(pem)
    # Crash after the key moved: finish the renewal.
    (tmp_path / NODE_CERT_NEXT).write_bytes(new.public_bytes(pem))
    (tmp_path / NODE_KEY).write_bytes(key_pem(new_key))
    recover_renewal(tmp_path)
    assert (tmp_path / NODE_CERT).read_bytes() == new.public_bytes(pem)
    # A full renewal leaves a 0600 key matching the certificate.
    install_renewed(tmp_path, old_key, old.public_bytes(pem))
    assert (tmp_path / NODE_KEY).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / NODE_CERT).read_bytes() == old.public_bytes(pem)


def test_a_join_keeps_its_key_until_answered_and_gives_up_saying_how_to_retry(tmp_path, monkeypatch, capsys):
    import agent.enroll as enroll

    key = enroll._pending_key(tmp_path / "state")
    assert (tmp_path / "state" / "node.key.pending").stat().st_mode & 0o777 == 0o600
    assert key_pem(enroll._pending_key(tmp_path / "state")) == key_pem(key)
    # Nothing listens: every try loses its answer; the last error says what to do.
    monkeypatch.setattr(enroll, "RETRY_DELAYS", (0.0, 0.0))
    ctx = ssl.create_default_context()
    with pytest.raises(JoinError, match=r"after 3 tries\. The token may or may not have been used: run the same"):
        enroll._enroll("127.0.0.1", free_port(), ctx, {}, tmp_path / "state" / "node.key.pending")
    assert capsys.readouterr().err.count("trying again in 0 s with the same token and key") == 2


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_controller_is_one_url_or_a_list(tmp_path):
    assert load_settings(_write(tmp_path, "controller: https://a:8443/\n")).controller == ["https://a:8443"]
    listed = load_settings(_write(tmp_path, "controller: [https://a:8443, 'https://[::1]:9443']\n"))
    assert listed.controller == ["https://a:8443", "https://[::1]:9443"]
    assert load_settings(_write(tmp_path, "state_dir: /x\n")).controller is None


def test_join_record_keeps_the_list_and_reads_an_older_agents_single_url(tmp_path):
    write_join_record(tmp_path, JoinRecord(("https://a:8443", "https://b:8443"), "n-1"))
    assert read_join_record(tmp_path) == JoinRecord(("https://a:8443", "https://b:8443"), "n-1")
    (tmp_path / JOIN_FILE).write_text('{"controller": "https://a:8443", "node_id": "n-1"}')
    assert read_join_record(tmp_path) == JoinRecord(("https://a:8443",), "n-1")


def test_failover_keeps_a_working_controller_and_tries_the_others_in_order():
    choice = ControllerChoice(["a", "b", "c"])
    assert choice.current == "a"
    # Nothing answers: every one in turn, then again from the top.
    assert [choice.failed() for _ in range(4)] == ["b", "c", "a", "b"]
    choice.working()  # b answers: it stays in use
    assert choice.current == "b"
    # b fails: the list's order again, the one that just failed last.
    assert [choice.failed() for _ in range(3)] == ["a", "c", "b"]
    choice.working()
    assert [choice.failed(), choice.failed()] == ["a", "c"]


def test_failover_with_one_controller_retries_it():
    choice = ControllerChoice(["a"])
    assert [choice.failed(), choice.failed()] == ["a", "a"]


def test_settings_defaults_and_values(tmp_path):
    path = _write(tmp_path, "state_dir: /srv/kumo\nmetrics: {listen: '127.0.0.1:9999'}\nvcpu_overcommit: 2\n")
    settings = load_settings(path)
    assert settings.state_dir == Path("/srv/kumo")
    assert settings.metrics.listen == "127.0.0.1:9999"
    assert settings.vcpu_overcommit == 2.0
    assert settings.source == path


@pytest.mark.parametrize(
    "text, message",
    [
        ("stat_dir: /x\n", "{p}: stat_dir: unknown key (allowed keys: controller, controller_timeout, heartbeat, image_cache, log_level, metrics, plugins, state_dir, tasks, vcpu_overcommit)"),
        ("metrics: {listen: 9464}\n", "{p}: metrics.listen: expected a string or null, got 9464"),
        ("metrics: {listen: 'nohost'}\n", "{p}: metrics.listen: expected HOST:PORT (e.g. 0.0.0.0:9464), got 'nohost'"),
        ("metrics: {max_connections: 0}\n", "{p}: metrics.max_connections: expected a whole number of connections, 1 or more"),
        ("controller: http://ctl:8443\n", "{p}: controller: expected https://HOST:PORT (a controller's API address), got 'http://ctl:8443'"),
        ("controller: [https://a:8443, https://b]\n", "{p}: controller[1]: expected https://HOST:PORT (a controller's API address), got 'https://b'"),
        ("controller: [https://a:8443, 'https://a:8443/']\n", "{p}: controller[1]: https://a:8443 is listed twice"),
        ("controller: []\n", "{p}: controller: expected a URL or a list of URLs; leave it out to use the ones recorded at join"),
        ("controller: 3\n", "{p}: controller: expected a string or a list of a string or null, got 3"),
        ("controller_timeout: 0\n", "{p}: controller_timeout: expected seconds above 0, got 0.0"),
        ("vcpu_overcommit: 0\n", "{p}: vcpu_overcommit: expected a number above 0, got 0.0"),
        ("image_cache: {max_mib: 0}\n", "{p}: image_cache.max_mib: expected a positive number of MiB (or null: no limit)"),
        ("log_level: loud\n", "{p}: log_level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'"),
        ("plugins: {kvm: [1]}\n", "{p}: plugins.kvm: expected a mapping of that plugin's settings"),
    ],
)
def test_settings_errors_name_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value) == message.format(p=path)


class Configurable:
    def __init__(self):
        self.seen = None

    @hookimpl
    def kumo_configure(self, section, source):
        if "bad" in section:
            raise ConfigError(f"{source}.bad: expected nothing")
        self.seen = (dict(section), source)


class Plain:
    @hookimpl
    def kumo_fingerprint(self):
        return Fingerprint(True)


def test_plugin_sections_reach_their_plugin_and_unknown_ones_are_refused(tmp_path):
    plugin = Configurable()
    hooks = Hooks(make_plugin_manager({"conf": plugin, "plain": Plain()}))
    path = _write(tmp_path, "plugins: {conf: {a: 1}}\n")
    configure_plugins(hooks, load_settings(path))
    assert plugin.seen == ({"a": 1}, f"{path}: plugins.conf")

    for text, message in [
        ("plugins: {kvmm: {}}\n", f"{path}: plugins.kvmm: no plugin named 'kvmm' is installed (installed plugins: conf, plain)"),
        ("plugins: {conf: {bad: 1}}\n", f"{path}: plugins.conf.bad: expected nothing"),
        ("plugins: {plain: {x: 1}}\n", f"{path}: plugins.plain: the 'plain' plugin takes no settings"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            configure_plugins(hooks, load_settings(path))
        assert str(err.value) == message


def test_journal_survives_reload_and_remembers_interrupted_keys(tmp_path):
    journal = TaskJournal(tmp_path / "j")
    journal.record_started("k1", "t1", "x.run")
    journal.record_done("k1", "t1", Outcome("succeeded", {"n": 1}))
    journal.record_started("k2", "t2", "x.run")
    again = TaskJournal(tmp_path / "j")
    again.load()
    assert again.done == {"k1": Outcome("succeeded", {"n": 1})}
    assert again.started == {"k2"}
    assert all(json.loads(line)["key"] for line in (tmp_path / "j").read_text().splitlines())


def test_backoff_grows_with_jitter_up_to_the_cap():
    backoff = Backoff(base=0.5, cap=30.0)
    delays = [backoff.next() for _ in range(12)]
    assert all(0.5 <= d <= 30.0 for d in delays)
    assert max(delays[8:]) > max(delays[:2])
    backoff.reset()
    assert backoff.next() == 0.5


def test_a_full_disk_leaves_no_torn_journal_line_and_names_the_file(tmp_path, monkeypatch):
    import errno
    import os

    from agent.sdk import DiskFull, atomic_write

    journal = TaskJournal(tmp_path / "tasks.journal")
    journal.record_started("a", "t-1", "x.run")
    before = journal.path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 10:
            return real_write(fd, data[: len(data) // 2])  # a short write, as a nearly full disk does
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull) as err:
        journal.record_started("b", "t-2", "x.run")
    monkeypatch.undo()
    assert journal.path.read_bytes() == before
    assert str(err.value).startswith(f"cannot write {journal.path}: No space left on device")
    assert "free space there and try again" in str(err.value)
    # A task that ran is known to have run even when its end could not be journalled.
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull):
        journal.record_done("a", "t-1", Outcome("succeeded"))
    monkeypatch.undo()
    assert journal.done["a"].state == "succeeded" and "a" not in journal.started
    assert journal.path.read_bytes() == before

    record = tmp_path / "record.json"
    atomic_write(record, "old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull):
        atomic_write(record, "new")
    monkeypatch.undo()
    # The old record whole, and no temporary file left beside it.
    assert record.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json", "tasks.journal"]
