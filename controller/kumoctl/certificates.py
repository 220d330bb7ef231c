"""``kumoctl certificate``: client certificates from the Kumo CA (a scraper for Prometheus,
another admin): made (the key is made here and never leaves this machine), listed, revoked."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .arguments import OUTPUT, Group
from .client import Client
from .errors import CommandError
from .output import print_json, print_table

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
    print(f"{args.role} certificate for {args.name} (serial {answer['serial']}): {cert_path}, key {key_path}, "
          f"CA {ca_path}")
    return 0


def cmd_certificate_list(client: Client, args: argparse.Namespace) -> int:
    certificates = client.pages("/v1/certificates", "certificates")
    if args.output == "json":
        print_json(certificates)
        return 0
    rows = [[c["serial"], c["role"], c["name"], c["created_at"], c["expires_at"], c["revoked_at"] or "-"]
            for c in certificates]
    print_table(["SERIAL", "ROLE", "NAME", "ISSUED", "EXPIRES", "REVOKED"], rows, empty="no certificates")
    return 0


def cmd_certificate_revoke(client: Client, args: argparse.Namespace) -> int:
    client.call("DELETE", f"/v1/certificates/{args.serial}")
    print(f"certificate {args.serial} is revoked: the controller refuses it from now on")
    return 0


def register(group: Group) -> None:
    sub = group.leaf("create", cmd_certificate_create,
                     "make a key here and get it certified (e.g. for Prometheus to scrape the agents)")
    sub.add_argument("--role", choices=("scraper", "admin"), default="scraper", help="default: scraper")
    sub.add_argument("--name", required=True, help="name in the certificate, e.g. prometheus")
    sub.add_argument("--out", required=True, metavar="DIR", help="where NAME.key, NAME.crt and ca.crt go")
    group.leaf("list", cmd_certificate_list, "list admin and scraper certificates, revoked ones too", [OUTPUT])
    sub = group.leaf("revoke", cmd_certificate_revoke, "revoke an admin or scraper certificate at once")
    sub.add_argument("serial", help="its serial, as kumoctl certificate list shows it")
