"""The controller's CA: ECDSA P-256 keys, certificates for the controller, admins and nodes.

Identity lives in the subject: ``O=kumo, OU=<role>, CN=<name>``. The controller decides
every field of an issued certificate itself; a CSR contributes only its public key, after
its signature has been checked.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "kumo"
ROLES = ("admin", "node", "controller", "scraper")
CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=825)
ADMIN_LIFETIME = datetime.timedelta(days=365)
# Clocks of freshly booted nodes drift: certificates are valid from a little before now.
BACKDATE = datetime.timedelta(minutes=5)


class CSRError(ValueError):
    """A certificate signing request that cannot be used; the message says why."""


def utcnow() -> datetime.datetime:
    # Naive UTC: cryptography 38 (Debian 12) has no *_utc accessors.
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def subject(role: str, name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def identity_of(cert: x509.Certificate) -> tuple[str, str]:
    """(role, name) from a certificate this CA issued; ("", "") when it carries none."""
    role = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not role or not name:
        return "", ""
    return str(role[0].value), str(name[0].value)


def expires_at(cert: x509.Certificate) -> float:
    """The certificate's end of validity, as a Unix time (cryptography 38 and 42+ alike)."""
    after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=datetime.UTC)
    return after.timestamp()


def spki_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's SubjectPublicKeyInfo: what a join string pins."""
    return key_sha256(cert.public_key())


def key_sha256(key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of a public key's SubjectPublicKeyInfo (DER)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, name: str = "Kumo CA") -> CertificateAuthority:
        key = new_key()
        now = utcnow()
        name_ = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name_)
            .issuer_name(name_)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: expected an ECDSA key")
        return cls(cert, key)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        role: str,
        name: str,
        lifetime: datetime.timedelta,
        dns_names: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
    ) -> x509.Certificate:
        """A certificate for ``role``/``name``; nodes and the controller may also serve TLS."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        now = utcnow()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject(role, name))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            # Agents renew at two thirds of not_before..not_after: a backdate longer than a
            # tenth of a short lifetime would have them renew at once, again and again.
            .not_valid_before(now - min(BACKDATE, lifetime / 10))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_node(
        self, public_key: ec.EllipticCurvePublicKey, node_id: str, lifetime: datetime.timedelta,
        address: str | None,
    ) -> x509.Certificate:
        """A node's certificate: the identity is ``node_id`` whatever its CSR asked for.

        It also names the address the controller saw it at, where Prometheus scrapes it
        (``/v1/prometheus/targets``). Never the hostname the node reports: a name a node
        chooses could be another machine's, and the certificate would vouch for it.
        """
        names = (node_id,)
        ips: tuple[str, ...] = ()
        if address:
            try:
                ips = (str(ipaddress.ip_address(address)),)
            except ValueError:
                ips = ()
        return self.issue(public_key, "node", node_id, lifetime, dns_names=names, ips=ips, server=True)


def public_key_from_csr(csr_pem: str) -> ec.EllipticCurvePublicKey:
    """The CSR's ECDSA P-256 public key, after checking it is well-formed and self-signed."""
    if not isinstance(csr_pem, str) or "BEGIN CERTIFICATE REQUEST" not in csr_pem:
        raise CSRError("csr must be a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise CSRError(f"csr is not a valid PEM certificate signing request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        valid = False
    if not valid:
        raise CSRError("csr signature does not verify: it was not signed by the key it carries")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CSRError("csr key must be ECDSA P-256 (kumo-agent join makes one)")
    return key


def rejoin_message(token: str, csr_pem: str) -> bytes:
    """What a node signs with its previous key to join again as itself (agent/enroll.py builds
    the same bytes): bound to this token and this CSR, so a proof seen once cannot be
    replayed with another token or for another key."""
    return b"kumo-rejoin\0" + token.encode() + b"\0" + csr_pem.encode()


def previous_node(ca: CertificateAuthority, cert_pem: str, signature: bytes, message: bytes) -> str:
    """The node id named by ``cert_pem``, a node certificate this CA issued (expired or not),
    once ``signature`` over ``message`` verifies with that certificate's key: the proof that
    the caller holds the node's key. CSRError says what did not hold."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as exc:
        raise CSRError(f"previous.certificate is not a PEM certificate: {exc}") from None
    try:
        if cert.issuer != ca.cert.subject:
            raise InvalidSignature
        ca.cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except (InvalidSignature, TypeError, ValueError):
        raise CSRError("previous.certificate was not issued by this controller's CA") from None
    role, node_id = identity_of(cert)
    if role != "node":
        raise CSRError(f"previous.certificate is not a node's certificate (its role: {role or 'none'})")
    key = cert.public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CSRError(f"previous.signature was not made with node {node_id}'s key over this token and CSR") from None
    return node_id


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
