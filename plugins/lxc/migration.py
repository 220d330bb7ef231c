"""A container migrating here: its config checked against this node, then its directory taken over.

The checkpoint plugin carries the container's directory with the CRIU image, and it
arrives in two steps. As soon as the config arrives, this node checks that it has what the
container needs: the bridges it plugs into, the host paths it binds (they are host paths,
never carried: the busybox template's /lib and /usr/lib), the files it includes, a
searchable lxcpath for a user namespace. It then gives a hidden directory under lxcpath to
unpack the rest into (liblxc lists no dot-directory, so a half-arrived container is no
instance). Before the restore the directory is taken over: paths into the source's
container directory are rewritten to ours, the same checks run again, and the directory is
renamed into place. The source may be compromised: the config must also be one this node's
plugin could have written (allowlist.py), its user namespace this node's own; a config
without one (a privileged container) is taken only by a node that allows privileged
containers, and only when the controller's record of the container (sent with the
migration) says privileged too, since a compromised source could have dropped an
unprivileged one's idmap.

Every function here blocks: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from agent.sdk import TaskError, atomic_write

from .allowlist import foreign_lines
from .host import untraversable
from .lxcconf import LXC_LOG, config_items, import_problems, rewrite_config
from .record import RECORD_FILE, read_record, write_record
from .settings import LxcConfig

STAGED_PREFIX = ".import-"


def adapt(node: LxcConfig, name: str, config: str, source_lxcpath: str, arrived: Path | None) -> str:
    """The config with the source's container directory rewritten to ours, or TaskError naming
    what this node lacks or refuses; ``arrived`` is where it was unpacked (None: not yet, at
    staging)."""
    target = node.lxcpath / name
    adapted = rewrite_config(config, Path(source_lxcpath) / name, target)
    refused = foreign_lines(adapted, target, node)
    if refused:
        raise TaskError(f"container {name!r} is refused on this node: " + "; ".join(refused)
                        + " (a migrated container's config must be one this node's lxc plugin could have written)",
                        code="import-refused")
    problems = import_problems(adapted, target, Path(source_lxcpath), arrived)
    if not problems and not is_privileged(adapted):
        blocked = untraversable(node.lxcpath)
        if blocked is not None:
            problems.append(f"it runs in a user namespace and its mapped root cannot search {blocked}: "
                            "chmod o+x it (or set plugins.lxc.lxcpath elsewhere)")
    if problems:
        code = "no-bridge" if any("bridge" in p for p in problems) else "import-refused"
        raise TaskError(f"container {name!r} cannot run on this node: " + "; ".join(problems)
                        + "; then migrate again", code=code)
    return adapted


def is_privileged(config: str) -> bool:
    """Whether the container of an lxc ``config`` runs without a user namespace."""
    return not any(key == "lxc.idmap" for key, _ in config_items(config))


def require_recorded(name: str, config: str, privileged: bool) -> None:
    """Refuse an adapted ``config`` that confines the container otherwise than the controller
    recorded (``privileged``): a source must not turn an unprivileged container privileged."""
    if is_privileged(config) != privileged:
        recorded, sent = ("privileged", "a user namespace") if privileged else ("unprivileged", "no user namespace")
        raise TaskError(f"container {name!r} is refused on this node: the controller records it as {recorded}, but "
                        f"the config its source sent gives it {sent}; a source cannot change that: check the source "
                        "node", code="import-refused")


def staging_directory(lxcpath: Path, name: str) -> Path:
    """A fresh hidden directory under lxcpath for the arriving container."""
    return Path(tempfile.mkdtemp(prefix=f"{STAGED_PREFIX}{name}-", dir=lxcpath))


def take_over(node: LxcConfig, name: str, staged: Path, source_lxcpath: str) -> None:
    """Make the unpacked ``staged`` directory container ``name``: its config adapted, then renamed
    into place."""
    lxcpath = node.lxcpath
    if staged.parent != lxcpath or not staged.name.startswith(f"{STAGED_PREFIX}{name}-"):
        raise TaskError(f"{staged} is not a directory this node staged for container {name!r}",
                        code="bad-request")
    config_path = staged / "config"
    config = adapt(node, name, config_path.read_text(), source_lxcpath, staged)
    # liblxc appends to its log as root, following a symlink the source may have put there.
    log = staged / LXC_LOG
    if log.is_symlink() or (log.exists() and not log.is_file()):
        raise TaskError(f"container {name!r} is refused on this node: its {LXC_LOG} is not a regular file",
                        code="import-refused")
    atomic_write(config_path, config, mode=stat.S_IMODE(os.stat(config_path).st_mode))
    # The details show the record, which the source wrote: what the config says wins (it was
    # checked against the controller's record at staging, and the stream cannot rewrite it).
    privileged = is_privileged(config)
    record = {} if (staged / RECORD_FILE).is_symlink() else read_record(staged)
    write_record(staged, {**record, "privileged": privileged})
    if not privileged:
        # As lxc-create does: the mapped root must enter its directory (staged 0700 root) to reach rootfs.
        os.chown(staged, node.idmap_start, node.idmap_start)
        os.chmod(staged, 0o770)
    os.rename(staged, lxcpath / name)
