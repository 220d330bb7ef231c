"""``kumoctl certificate``: client certificates from the Kumo CA (a scraper for Prometheus,
another admin). The key is made here and never leaves this machine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .arguments import Group
from .client import Client
from .errors import CommandError

NAME = "certificate"
HELP = "client certificates from the Kumo CA"


def cmd_certificate_create(client: Client, args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import CertificateSigningRequestBuilder, Name, NameAttribute
    from cryptography.x509.oid import NameOID

    out = Path(args.out)
    key_path, cert_path, ca_path = out / f"{args.name}.key", out / f"{args.name}.crt", out / "ca.crt"
    if key_path.exists():
        raise CommandError(f"{key_path} already exists; remove it or choose another --name")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = CertificateSigningRequestBuilder().subject_name(Name([NameAttribute(NameOID.COMMON_NAME, args.name)]))
    pem = csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    answer = client.call("POST", "/v1/certificates", {"role": args.role, "name": args.name, "csr": pem})
    out.mkdir(parents=True, exist_ok=True)
    # The key is made here and written 0600 from the start; only the CSR went to the controller.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_text(answer["certificate"])
    ca_path.write_text(answer["ca"])
    print(f"{args.role} certificate for {args.name}: {cert_path}, key {key_path}, CA {ca_path}")
    return 0


def register(group: Group) -> None:
    sub = group.leaf("create", cmd_certificate_create,
                     "make a key here and get it certified (e.g. for Prometheus to scrape the agents)")
    sub.add_argument("--role", choices=("scraper", "admin"), default="scraper", help="default: scraper")
    sub.add_argument("--name", required=True, help="name in the certificate, e.g. prometheus")
    sub.add_argument("--out", required=True, metavar="DIR", help="where NAME.key, NAME.crt and ca.crt go")
