"""Making a new container's files: a root filesystem from a template or a tarball, then Kumo's
config block over whatever it wrote, busybox's boot files, the first-boot seed and the record."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from .host import CgroupLayout
from .liblxc import Liblxc
from .lxcconf import idmap_lines, image_base, kumo_block, with_kumo_block
from .record import write_record
from .rootfs import copy_seed, extract_tarball, shift_ownership, write_busybox_boot
from .settings import LxcConfig
from .spec import CreateSpec


async def from_template(lxc: Liblxc, config: LxcConfig, name: str, spec: CreateSpec, workdir: Path) -> None:
    # The template sees the idmap (to chown the root filesystem) and nothing else:
    # finish() writes the rest of the config after it.
    base = workdir / "create.conf"
    lines = "lxc.net.0.type = empty\n" if spec.privileged else "".join(idmap_lines(config))
    await asyncio.to_thread(base.write_text, lines)
    await lxc.create(name, spec.template or "", base)


def from_image(config: LxcConfig, name: str, spec: CreateSpec, image: Path, shown: str) -> None:
    """A container directory with the tarball ``image`` (``shown`` names it) as its rootfs. Blocking."""
    directory = config.lxcpath / name
    rootfs = directory / "rootfs"
    directory.mkdir(mode=0o770)
    rootfs.mkdir(mode=0o755)
    (directory / "config").write_text(image_base(config, rootfs, spec.privileged))
    extract_tarball(image, rootfs, shown)
    if not spec.privileged:
        shift_ownership(rootfs, config.idmap_start, config.idmap_size)
        # As lxc-create does: the mapped root must enter its 0770 directory to reach rootfs.
        os.chown(directory, config.idmap_start, config.idmap_start)


def finish(config: LxcConfig, cgroups: CgroupLayout, name: str, spec: CreateSpec, seed: Path | None,
           record: dict[str, Any]) -> None:
    """Our config block over the template's, the busybox boot files, the seed and the record. Blocking."""
    directory = config.lxcpath / name
    rootfs = directory / "rootfs"
    owner = (0, 0) if spec.privileged else (config.idmap_start, config.idmap_start)
    config_path = directory / "config"
    block = kumo_block(name, spec, directory, cgroups)
    config_path.write_text(with_kumo_block(config_path.read_text(), block))
    if spec.template == "busybox":
        write_busybox_boot(rootfs, name, spec.network, owner)
    if seed is not None:
        copy_seed(rootfs, seed, owner)
    write_record(directory, record)
