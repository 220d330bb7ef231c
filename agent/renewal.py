"""Renewing the node certificate before it expires, with no new join token.

- The certificate is renewed at two thirds of its lifetime, whenever the session with the
  controller is up; a failed renewal is retried with backoff until the certificate expires
  and after (an expired one is logged once: the node must then join again).
- A renewal makes a new key and CSR, has the controller sign it, checks what came back and
  installs key and certificate so that a crash never leaves a mismatched pair
  (agent/enroll.py); :func:`recover_interrupted` finishes or discards a renewal a crash cut
  off, at the next start. The controller client and the metrics listener take the new pair
  at once.
- cryptography is imported at the first renewal, never by an idle agent.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import logging
from pathlib import Path

from agent.certinfo import certificate_validity
from agent.client import ControllerClient, ControllerRejected, NodeRejected
from agent.metrics import AgentMetrics, MetricsServer
from agent.sdk import Backoff, ControllerUnavailable, DiskFull, Identity
from agent.settings import NODE_CERT_NEXT, REJOIN_ADVICE, JoinError

log = logging.getLogger(__name__)


class CertificateRenewal:
    """Keeps ``identity`` (under ``state_dir``) valid through ``client`` while ``connected``
    is set; ``metrics_server`` (None: none) serves the renewed certificate."""

    def __init__(self, state_dir: Path, identity: Identity, client: ControllerClient, metrics: AgentMetrics,
                 metrics_server: MetricsServer | None, connected: asyncio.Event):
        self._state_dir = state_dir
        self._identity = identity
        self._client = client
        self._metrics = metrics
        self._metrics_server = metrics_server
        self._connected = connected
        self._expired_logged = False

    async def run(self) -> None:
        """Renew for as long as the agent runs; NodeRejected when the controller refuses this node."""
        backoff = Backoff(base=2.0, cap=60.0)
        while True:
            not_before, not_after = await asyncio.to_thread(certificate_validity, self._identity.certificate)
            self._metrics.cert_expiry.set(not_after.timestamp())
            now = datetime.datetime.now(datetime.UTC)
            renew_at = not_before + (not_after - not_before) * 2 / 3
            if now < renew_at:
                await asyncio.sleep((renew_at - now).total_seconds())
                continue
            if now >= not_after and not self._expired_logged:
                self._expired_logged = True
                log.error(
                    "the node certificate expired at %s (no renewal reached the controller in time): the "
                    "controller refuses this node until it joins again. Instances keep running. %s",
                    not_after.isoformat(), REJOIN_ADVICE,
                )
            wait = backoff.next()
            if now < not_after:  # say so the moment it expires, not at the next backoff step
                wait = min(wait, (not_after - now).total_seconds())
            try:
                async with asyncio.timeout(wait):  # not wait_for: on 3.11 it can swallow a cancellation
                    await self._connected.wait()
                await self._renew()
                backoff.reset()
            except TimeoutError:
                continue
            except ControllerUnavailable as exc:
                log.warning("certificate renewal: controller unavailable (%s); will retry", exc)
                await asyncio.sleep(backoff.next())
            except ControllerRejected as exc:
                if exc.status in (401, 403, 404):
                    raise NodeRejected(f"certificate renewal refused: {exc.error}") from None
                log.error("certificate renewal refused: %s; will retry", exc)
                await asyncio.sleep(backoff.next())
            except (JoinError, DiskFull) as exc:
                log.error("certificate renewal: %s; will retry", exc)
                await asyncio.sleep(backoff.next())

    async def _renew(self) -> None:
        # cryptography is imported at the first renewal, not at start: the idle agent needs
        # only the certificate's dates (agent.certinfo), and it costs ~9 MB resident. The
        # import runs off the event loop, which it would otherwise stall.
        await asyncio.to_thread(importlib.import_module, "agent.enroll")
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from agent.enroll import (
            cert_validity,
            check_issued,
            install_renewed,
            make_csr,
            new_node_key,
        )

        key = await asyncio.to_thread(new_node_key)
        csr = make_csr(key, self._identity.node_id)
        answer = await self._client.node_call("POST", "renew", {"csr": csr})
        try:
            cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        except (KeyError, ValueError) as exc:
            raise JoinError(f"the controller's renewal answer has no usable certificate ({exc})") from None
        check_issued(cert, key, self._identity.node_id)
        await asyncio.to_thread(
            install_renewed, self._state_dir, key, cert.public_bytes(serialization.Encoding.PEM)
        )
        self._client.reload_identity()
        if self._metrics_server is not None:
            self._metrics_server.reload_certificate(self._identity)
        _, not_after = cert_validity(cert)
        self._metrics.cert_expiry.set(not_after.timestamp())
        self._expired_logged = False
        log.info("renewed the node certificate (serial %x), valid until %s", cert.serial_number, not_after.isoformat())


def recover_interrupted(state_dir: Path) -> None:
    """Finish or discard a renewal a crash interrupted; cryptography is imported only then."""
    if (state_dir / NODE_CERT_NEXT).exists():
        from agent.enroll import recover_renewal

        recover_renewal(state_dir)
