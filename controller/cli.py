"""``kumo-controller``: ``init`` a controller directory, ``run`` the controller.

Errors go to stderr as one sentence and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import pwd
import signal
import socket
import sys
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.sdk import ConfigError
from controller import pki
from controller.settings import (
    ControllerSettings,
    check_url,
    default_url,
    load_settings,
    split_address,
)
from controller.store import is_database_url
from controller.store.database import StoreError

log = logging.getLogger("kumo.controller")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, StoreError, OSError, ValueError) as exc:
        print(f"kumo-controller: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kumo-controller", description="The Kumo controller: CA, API and scheduler.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create the CA, certificates and configs of a new controller")
    init.add_argument("--dir", required=True, type=Path, help="directory for keys, certificates and the database")
    init.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT", help="API address (default %(default)s)")
    init.add_argument("--enroll-listen", metavar="HOST:PORT", help="enrollment address (default: API port + 1)")
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="another DNS name or IP address nodes use to reach the controller (repeatable); "
                           "the first one also goes into kumoctl.yaml")
    init.add_argument("--config", type=Path, help="where to write controller.yaml (default DIR/controller.yaml)")
    init.add_argument("--database", metavar="URL",
                      help="postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE shared by several controllers "
                           "(default: a SQLite file in DIR, for a controller that runs alone)")
    init.add_argument("--ca-from", type=Path, metavar="PKI_DIR",
                      help="another controller's pki directory (ca.crt and ca.key, copied here securely): this "
                           "controller joins its fleet and issues certificates the others accept, instead of "
                           "creating a new CA")
    init.add_argument("--owner", metavar="USER",
                      help="system user the controller runs as (e.g. kumo-controller): it gets DIR and the keys, "
                           "its group may read the config; run init as root for this")
    init.set_defaults(func=_init)

    run = sub.add_parser("run", help="serve the API and enrollment until SIGTERM")
    run.add_argument("--config", required=True, type=Path, help="controller.yaml written by init")
    run.set_defaults(func=_run)
    return parser


def _init(args: argparse.Namespace) -> int:
    directory: Path = args.dir.resolve()
    if args.database and not is_database_url(args.database):
        raise ValueError(f"--database: expected a postgresql:// URL, got {args.database!r} "
                         "(leave it out for the embedded SQLite store)")
    if args.ca_from and not (args.ca_from / "ca.key").is_file():
        raise ValueError(f"--ca-from: {args.ca_from / 'ca.key'} is not a file: give the pki directory of a "
                         "controller of this fleet (it holds ca.crt and ca.key)")
    config_path: Path = (args.config or directory / "controller.yaml").resolve()
    pki_dir = directory / "pki"
    host, port = split_address(args.listen, "--listen")
    enroll_listen = args.enroll_listen or f"{args.listen.rpartition(':')[0]}:{port + 1}"
    split_address(enroll_listen, "--enroll-listen")
    for path in (pki_dir / "ca.key", config_path):
        if path.exists():
            raise ValueError(f"{path} already exists: this controller is initialised (use another --dir to make a new one)")
    owner = _owner(args.owner) if args.owner else None
    directory.mkdir(parents=True, exist_ok=True)
    pki_dir.mkdir(mode=0o700, exist_ok=True)

    names, ips = ["localhost", socket.gethostname(), socket.getfqdn()], ["127.0.0.1", "::1"]
    if host not in ("0.0.0.0", "::", ""):
        args.san.insert(0, host)
    for san in args.san:
        try:
            ips.append(str(ipaddress.ip_address(san)))
        except ValueError:
            names.append(san)
    if args.ca_from:
        ca = pki.CertificateAuthority.load(args.ca_from / "ca.crt", args.ca_from / "ca.key")
    else:
        ca = pki.CertificateAuthority.create()
    _write_pair(pki_dir, "ca", ca.cert, ca.key)
    server_key = pki.new_key()
    server = ca.issue(server_key.public_key(), "controller", "kumo-controller", pki.SERVER_LIFETIME,
                      dns_names=tuple(dict.fromkeys(names)), ips=tuple(dict.fromkeys(ips)), server=True)
    # The chain, not the bare certificate: a joining node pins the CA it finds in it.
    (pki_dir / "server.crt").write_text(pki.pem(server) + pki.pem(ca.cert))
    pki.write_private(pki_dir / "server.key", pki.key_pem(server_key))
    admin_key = pki.new_key()
    admin = ca.issue(admin_key.public_key(), "admin", "admin", pki.ADMIN_LIFETIME)
    _write_pair(pki_dir, "admin", admin, admin_key)

    # Nodes reach the controller by the first name it was given, else by this host's name.
    url = check_url(f"https://{_bracketed(args.san[0])}:{port}", "--san") if args.san else default_url(args.listen)
    config = {
        "pki_dir": str(pki_dir),
        "database": args.database or str(directory / "controller.db"),
        "listen": args.listen,
        "enroll_listen": enroll_listen,
        "url": url,
        "heartbeat_interval": 10.0,
        "poll_timeout": 30.0,
        "node_cert_ttl": 86400.0,
        "images_dir": str(directory / "images"),
        "images_quota_bytes": ControllerSettings.images_quota_bytes,
        "log_level": "info",
    }
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text("# kumo-controller run --config " + str(config_path) + "\n" + yaml.safe_dump(config, sort_keys=False))
    kumoctl = {
        "controller": url if args.san else f"https://127.0.0.1:{port}",
        "ca": str(pki_dir / "ca.crt"),
        "cert": str(pki_dir / "admin.crt"),
        "key": str(pki_dir / "admin.key"),
    }
    (directory / "kumoctl.yaml").write_text(yaml.safe_dump(kumoctl, sort_keys=False))
    if owner:
        _hand_over(owner, directory, config_path)
    print(f"controller initialised in {directory}")
    print(f"  start it:   kumo-controller run --config {config_path}")
    print(f"  admin tool: export KUMOCTL_CONFIG={directory / 'kumoctl.yaml'}; kumoctl token create")
    return 0


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _owner(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"--owner: no user {user!r} on this host; install the kumo-controller package "
                         "(it creates the user) or name an existing one") from None
    return entry.pw_uid, entry.pw_gid


def _hand_over(owner: tuple[int, int], directory: Path, config_path: Path) -> None:
    """Give the service user what it writes and its keys; the config stays root's, readable by its group."""
    uid, gid = owner
    directory.chmod(0o700)
    for path in (directory, directory / "kumoctl.yaml", *directory.joinpath("pki").rglob("*"), directory / "pki"):
        os.chown(path, uid, gid)
    os.chown(config_path, -1, gid)
    config_path.chmod(0o640)


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{name}.crt").write_text(pki.pem(cert))
    pki.write_private(directory / f"{name}.key", pki.key_pem(key))


def _run(args: argparse.Namespace) -> int:
    # Only run serves: the app and aiohttp are half a second of imports that init does not need.
    from controller.app import serve

    settings = load_settings(args.config)
    logging.basicConfig(
        level=settings.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        path = settings.pki_dir / name
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{args.config}: pki_dir: cannot read {path}; was `kumo-controller init` run for this config?")
    try:
        settings.images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{args.config}: images_dir: cannot create {settings.images_dir}: {exc.strerror}") from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop)
        log.info("stopped")

    asyncio.run(main())
    return 0
