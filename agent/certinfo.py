"""A certificate's validity dates without importing cryptography.

The running agent needs only one fact about its own certificate while idle: when to renew
it. cryptography (its Rust bindings and x509 modules) would cost the idle agent about 9 MB
of resident memory for that, so the two dates are read straight from the DER encoding
(RFC 5280: Certificate → tbsCertificate → validity). Everything else about certificates
(keys, CSRs, checking what the controller issued) stays in :mod:`agent.enroll`, which is
imported only when joining or renewing.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from pathlib import Path

_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_SEQUENCE = 0x30
_VERSION = 0xA0  # [0] EXPLICIT, present on v2/v3 certificates
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18


def certificate_validity(path: Path) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after) of the first PEM certificate in ``path``, as aware UTC datetimes.

    Raises ValueError when the file holds no certificate or a malformed one.
    """
    match = _PEM_CERT_RE.search(path.read_bytes())
    if match is None:
        raise ValueError(f"{path}: no PEM certificate found")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        return validity_from_der(der)
    except (binascii.Error, IndexError, ValueError) as exc:
        raise ValueError(f"{path}: malformed certificate: {exc}") from None


def validity_from_der(der: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after) of a DER X.509 certificate; ValueError (or IndexError) if malformed."""
    _, cert_start, _ = _expect(der, 0, _SEQUENCE, "Certificate")
    _, pos, _ = _expect(der, cert_start, _SEQUENCE, "tbsCertificate")
    if der[pos] == _VERSION:
        pos = _read(der, pos)[2]
    for _field in ("serialNumber", "signature", "issuer"):
        pos = _read(der, pos)[2]
    _, pos, _ = _expect(der, pos, _SEQUENCE, "validity")
    not_before, pos = _time(der, pos)
    not_after, _ = _time(der, pos)
    return not_before, not_after


def _read(der: bytes, pos: int) -> tuple[int, int, int]:
    """The element at ``pos``: (tag, start of its value, end of its value)."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= 4:
            raise ValueError(f"unsupported DER length of {size} bytes")
        length = int.from_bytes(der[pos : pos + size], "big")
        pos += size
    end = pos + length
    if end > len(der):
        raise ValueError("truncated DER element")
    return tag, pos, end


def _expect(der: bytes, pos: int, tag: int, what: str) -> tuple[int, int, int]:
    element = _read(der, pos)
    if element[0] != tag:
        raise ValueError(f"{what}: expected DER tag 0x{tag:02x}, found 0x{element[0]:02x}")
    return element


def _time(der: bytes, pos: int) -> tuple[datetime.datetime, int]:
    """A UTCTime or GeneralizedTime (RFC 5280 §4.1.2.5: always Zulu, with seconds) and the next position."""
    tag, start, end = _read(der, pos)
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME:
        # RFC 5280: two-digit years 50-99 are 19xx, 00-49 are 20xx.
        century = "19" if int(text[:2]) >= 50 else "20"
        text = century + text
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"validity: expected a UTCTime or GeneralizedTime, found DER tag 0x{tag:02x}")
    when = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    return when.replace(tzinfo=datetime.UTC), end
