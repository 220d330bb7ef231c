"""KVM or TCG: which accelerator this node's guests run under, and why.

Hardware acceleration is proven, not assumed. That ``/dev/kvm`` opens is not enough: on
hosts whose /dev/kvm is a paravirtual or nested implementation, guests run at emulation
speed or fault. So before choosing kvm over tcg the plugin runs a tiny real guest under
``-accel kvm`` and requires it to finish within a few seconds. The verdict is kept in the
plugin's state directory for the rest of the boot (keyed by boot id and QEMU binary): it
cannot change before a reboot or a QEMU reinstall, and the probe costs seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from agent.sdk import atomic_write, boot_id, run_command

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 5.0
# The verdict's file in the plugin's state directory.
VERDICT_FILE = "acceleration.json"

# A 512-byte boot sector (16-bit real mode): install an int3 handler, print "K" on COM1,
# trap into it (prints "3"), spin 16M iterations, then leave through isa-debug-exit with
# status 0x31 (QEMU exits with (0x31 << 1) | 1 = 99). Under working hardware acceleration
# it finishes in milliseconds after QEMU starts; under TCG in a fraction of a second; where
# /dev/kvm emulates guest instructions (paravirtual or nested KVM) it takes 10 s or faults.
_PROBE_CODE = bytes.fromhex(
    "FA31C08ED88ED0BC007CC7060C002E7CC7060E000000BAF803B04BEECC"
    "66B900000001664975FCB031E6F4F4EBFDB033EECF"
)
_PROBE_SECTOR = _PROBE_CODE + bytes(510 - len(_PROBE_CODE)) + b"\x55\xaa"
_PROBE_EXIT = 99


@dataclasses.dataclass(frozen=True)
class Acceleration:
    """``domain_type`` is what the domain XML says (``<domain type='kvm'|'qemu'>``)."""

    domain_type: Literal["kvm", "qemu"]
    name: Literal["kvm", "tcg"]
    reason: str


async def decide(mode: Literal["auto", "kvm", "tcg"], state_dir: Path) -> Acceleration:
    """The accelerator for new domains under the configured ``mode``."""
    if mode == "tcg":
        return Acceleration("qemu", "tcg", "set by configuration (acceleration: tcg)")
    works, why = await _verdict(state_dir)
    if mode == "kvm":
        note = "" if works else f"; the probe disagrees: {why}"
        return Acceleration("kvm", "kvm", f"set by configuration (acceleration: kvm){note}")
    if works:
        return Acceleration("kvm", "kvm", why)
    return Acceleration("qemu", "tcg", f"KVM is not usable, falling back to TCG: {why}")


async def _verdict(state_dir: Path) -> tuple[bool, str]:
    """Whether a real guest runs under KVM here: (works, why), probed once per boot."""
    cache = state_dir / VERDICT_FILE
    qemu = shutil.which(QEMU)
    key = {"boot_id": await asyncio.to_thread(boot_id), "qemu": qemu}
    with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
        saved = json.loads(await asyncio.to_thread(cache.read_text))
        if saved.get("key") == key:
            return bool(saved["works"]), str(saved["reason"])
    works, reason = await _probe(qemu, state_dir)
    record = json.dumps({"key": key, "works": works, "reason": reason})
    await asyncio.to_thread(atomic_write, cache, record)
    return works, reason


def _prepare(workdir: Path) -> Path:
    """Check that /dev/kvm opens (OSError if not) and write the probe guest's disk. Blocking."""
    os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    image = workdir / "kvm-probe.img"
    image.write_bytes(_PROBE_SECTOR)
    return image


async def _probe(qemu: str | None, workdir: Path) -> tuple[bool, str]:
    """Run the probe guest under ``-accel kvm``; (works, why)."""
    try:
        image = await asyncio.to_thread(_prepare, workdir)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened ({exc.strerror})"
    if qemu is None:
        return False, f"{QEMU} is not installed"
    try:
        result = await run_command(
            qemu, "-accel", "kvm", "-nodefaults", "-display", "none", "-no-reboot", "-m", "16",
            "-serial", "stdio", "-monitor", "none",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive", f"file={image},format=raw,if=ide",
            timeout=PROBE_TIMEOUT,
        )
    except TimeoutError:
        return False, (
            f"/dev/kvm opens, but a probe guest under -accel kvm did not finish within "
            f"{PROBE_TIMEOUT:g} s (TCG takes well under 1 s): guest instructions are being emulated, "
            "not accelerated (nested or paravirtual KVM)"
        )
    if result.returncode == _PROBE_EXIT and result.stdout.startswith("K3"):
        return True, "a probe guest ran under -accel kvm"
    last = result.stderr.strip().splitlines()[-1:] or ["no error output"]
    return False, f"/dev/kvm opens, but a probe guest under -accel kvm failed (exit {result.returncode}): {last[0]}"
