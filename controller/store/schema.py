"""The controller's tables, as numbered migrations that both databases apply in order.

The statements are written once, in the SQL that SQLite and PostgreSQL both accept, except
where a name in braces stands for what differs (``{id_column}``: an auto-numbered key).
Times are epoch seconds (DOUBLE PRECISION), JSON documents are TEXT, flags are 0/1
INTEGERs, so rows read the same from either database.

A database is at the version of the last migration applied (``meta.schema_version``). A
controller applies the missing ones at start, under a lock so that two controllers
starting together do not both apply them, and refuses a database newer than itself.
Add a migration at the end; never edit one that has shipped.
"""

from __future__ import annotations

DIALECT = {
    "sqlite": {"id_column": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"id_column": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"},
}

MIGRATIONS: list[tuple[str, list[str]]] = [
    ("nodes, certificates, tokens, tasks, instances, settings, alerts, migrations, audit", [
        "CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL, "
        "uses_left INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE IF NOT EXISTS nodes (id TEXT PRIMARY KEY, hostname TEXT NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL, removed INTEGER NOT NULL DEFAULT 0, drained INTEGER NOT NULL DEFAULT 0, "
        "last_seen DOUBLE PRECISION, agent_version TEXT, metrics_url TEXT, facts TEXT NOT NULL DEFAULT '{}', "
        "plugins TEXT NOT NULL DEFAULT '{}', instances TEXT NOT NULL DEFAULT '[]')",
        "CREATE TABLE IF NOT EXISTS certificates (serial TEXT PRIMARY KEY, node_id TEXT NOT NULL REFERENCES nodes(id), "
        "expires_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, node TEXT NOT NULL REFERENCES nodes(id), "
        "kind TEXT NOT NULL, payload TEXT NOT NULL, idempotency_key TEXT NOT NULL, state TEXT NOT NULL, "
        "result TEXT, error TEXT, code TEXT, instance TEXT, created_at DOUBLE PRECISION NOT NULL, "
        "updated_at DOUBLE PRECISION NOT NULL, UNIQUE (node, idempotency_key))",
        "CREATE INDEX IF NOT EXISTS tasks_by_node_state ON tasks (node, state, created_at)",
        "CREATE INDEX IF NOT EXISTS tasks_by_instance ON tasks (instance, created_at)",
        "CREATE TABLE IF NOT EXISTS instances (name TEXT PRIMARY KEY, kind TEXT NOT NULL, "
        "node TEXT NOT NULL REFERENCES nodes(id), spec TEXT NOT NULL, reasons TEXT NOT NULL DEFAULT '{}', "
        "created_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS alerts (node TEXT NOT NULL REFERENCES nodes(id), id TEXT NOT NULL, "
        "rule TEXT NOT NULL, state TEXT NOT NULL, severity TEXT NOT NULL, labels TEXT NOT NULL, "
        "annotations TEXT NOT NULL, value DOUBLE PRECISION, starts_at TEXT NOT NULL, ends_at TEXT, "
        "received_at DOUBLE PRECISION NOT NULL, forwarded INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (node, id))",
        "CREATE INDEX IF NOT EXISTS alerts_unforwarded ON alerts (forwarded, received_at)",
        "CREATE TABLE IF NOT EXISTS migrations (id TEXT PRIMARY KEY, instance TEXT NOT NULL, doc TEXT NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX IF NOT EXISTS migrations_by_instance ON migrations (instance, created_at)",
        "CREATE TABLE IF NOT EXISTS audit (id {id_column}, at DOUBLE PRECISION NOT NULL, role TEXT NOT NULL, "
        "name TEXT NOT NULL, serial TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, "
        "status INTEGER NOT NULL, error TEXT)",
        "CREATE TABLE IF NOT EXISTS client_certificates (serial TEXT PRIMARY KEY, role TEXT NOT NULL, "
        "name TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "revoked_at DOUBLE PRECISION)",
    ]),
    ("several controllers: the controllers table; a migration is held by the controller driving it", [
        "CREATE TABLE controllers (id TEXT PRIMARY KEY, url TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL, "
        "last_seen DOUBLE PRECISION NOT NULL)",
        "ALTER TABLE migrations ADD COLUMN controller TEXT",
        "ALTER TABLE migrations ADD COLUMN active INTEGER NOT NULL DEFAULT 0",
        # At most one migration holds an instance, whichever controller drives it.
        "CREATE UNIQUE INDEX migrations_active ON migrations (instance) WHERE active = 1",
        # What the node last measured (agent.usage): CPU, memory, load, and per instance.
        "ALTER TABLE nodes ADD COLUMN usage TEXT",
        # The CPUs and memory the controller believes the node has: what its first
        # registration said, raised only by an admin (a node claiming more is flagged).
        "ALTER TABLE nodes ADD COLUMN capacity TEXT",
    ]),
    ("the image catalogue; what images nodes hold; the catalogue image an instance was made from", [
        # One row per form: a version of a name has at most a kvm disk and an lxc rootfs.
        "CREATE TABLE images (sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, "
        "kind TEXT NOT NULL, format TEXT NOT NULL, size_bytes BIGINT NOT NULL, description TEXT NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL, UNIQUE (name, version, kind))",
        "CREATE TABLE image_aliases (alias TEXT PRIMARY KEY, target TEXT NOT NULL, "
        "updated_at DOUBLE PRECISION NOT NULL)",
        # {"held": [sha256...], "pulling": {sha256: {"bytes", "total"}}}, from heartbeats.
        "ALTER TABLE nodes ADD COLUMN images TEXT",
        # The catalogue image (name, version, sha256, held by the node when placed), if any.
        "ALTER TABLE instances ADD COLUMN image TEXT",
        "ALTER TABLE instances ADD COLUMN image_sha256 TEXT",
        "CREATE INDEX instances_by_image ON instances (image_sha256)",
    ]),
    ("the web interface's sign-in links and sessions", [
        # kind 'signin': a single-use link from `kumoctl ui`; kind 'session': a browser's
        # cookie. Only the SHA-256 of either secret is kept; id is what lists and revokes.
        "CREATE TABLE ui_sessions (id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, "
        "name TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, "
        "used_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION, remote TEXT)",
    ]),
    ("rebalancing: pinned instances, the nodes' usage over the window, the decisions, round leases", [
        # 1: the rebalancer never moves it (created with --option pin=true).
        "ALTER TABLE instances ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",
        # What the nodes' instances used at each sample: the share of the node's CPUs, and
        # the cores of each instance (JSON), kept for the rebalancing window only.
        "CREATE TABLE rebalance_samples (node TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, "
        "cpu DOUBLE PRECISION NOT NULL, instances TEXT NOT NULL, PRIMARY KEY (node, at))",
        "CREATE TABLE rebalance_history (id {id_column}, at DOUBLE PRECISION NOT NULL, doc TEXT NOT NULL, "
        "instance TEXT NOT NULL)",
        "CREATE INDEX rebalance_history_by_instance ON rebalance_history (instance, at)",
        # Work one controller does at a time for a while (a rebalancing round): whoever
        # holds the row until it expires or is let go.
        "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL)",
    ]),
    ("migrations listed newest first and by state (running, succeeded, failed)", [
        "ALTER TABLE migrations ADD COLUMN state TEXT NOT NULL DEFAULT 'running'",
        # Once, for the rows from before: an ended migration's state is only in its document,
        # which json.dumps wrote with its default separators.
        "UPDATE migrations SET state = CASE WHEN active = 1 THEN 'running' "
        "WHEN doc LIKE '%\"state\": \"succeeded\"%' THEN 'succeeded' ELSE 'failed' END",
        "CREATE INDEX migrations_by_age ON migrations (created_at, id)",
    ]),
    ("an instance's own checkpoint retention", [
        # The checkpoints its node keeps after each checkpoint (--option checkpoint_keep=N);
        # NULL: the node's plugins.checkpoint.keep.
        "ALTER TABLE instances ADD COLUMN checkpoint_keep INTEGER",
    ]),
    ("a join answered again: the token and key a node last joined with, and until when", [
        # SHA-256 of the join token and of the CSR's public key (SubjectPublicKeyInfo): the
        # same join retried after its answer was lost gets this node again, until then.
        "ALTER TABLE nodes ADD COLUMN join_token TEXT",
        "ALTER TABLE nodes ADD COLUMN join_key TEXT",
        "ALTER TABLE nodes ADD COLUMN join_retry_until DOUBLE PRECISION",
    ]),
    ("alerts listed a page at a time: each alert's latest transition found by index", [
        # An alert is a node, a rule and its labels; its transitions in the order received.
        "CREATE INDEX alerts_by_alert ON alerts (node, rule, labels, received_at)",
        "CREATE INDEX alerts_by_received ON alerts (received_at, node, id)",
        "CREATE INDEX client_certificates_by_age ON client_certificates (created_at, serial)",
    ]),
]
SCHEMA_VERSION = len(MIGRATIONS)


def statements(dialect: str, version: int) -> list[str]:
    """The statements of migration ``version`` (1-based) for ``dialect``."""
    out = []
    for sql in MIGRATIONS[version - 1][1]:
        for name, value in DIALECT[dialect].items():
            sql = sql.replace("{" + name + "}", value)  # not str.format: the SQL holds '{}' literals
        out.append(sql)
    return out
