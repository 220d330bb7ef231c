"""A create cut off by kill -9 of the agent leaves nothing on the node: the restarted agent
removes what the driver had made, with the driver's own delete, and reports the task
``interrupted`` naming the clean-up (the controller forgets an instance whose create failed).

The cut is real, not a hook in the product: the image URL is served here with its headers and
a first chunk, then nothing until the test ends. kvm has made the instance directory by then,
lxc its build's work directory under lxcpath. The process kind has no such slow step (its
create makes a directory and spawns at once), so there is no point to cut it at.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness import tls_server_context
from tests.harness.agents import reported, wait_for
from tests.test_agent_integration import submit, wait_task

pytestmark = pytest.mark.integration

NEVER_SERVED = "0" * 64  # the download never ends, so no checksum is ever compared


@pytest.fixture
def stalled_image(tmp_path: Path) -> Iterator[tuple[str, Path, threading.Event]]:
    """(https URL, its CA file, set once it is requested): an image whose download stalls."""
    requested, release = threading.Event(), threading.Event()

    class Stall(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(64 << 20))
            self.end_headers()
            self.wfile.write(bytes(64 << 10))
            self.wfile.flush()
            requested.set()
            release.wait(300)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    server.daemon_threads = True
    server.socket = tls_server_context(tmp_path).wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_port}/image", tmp_path / "cert.pem", requested
    release.set()
    server.shutdown()
    server.server_close()


def cut_create(controller: Any, agent: Any, kind: str, payload: dict[str, Any], requested: threading.Event,
               made: Callable[[], list[Path]]) -> None:
    """Submit ``<kind>.create``, kill -9 the agent once its image download stalls with what
    ``made`` finds on disk, start it again; check the task's outcome and that what was made is gone."""
    task = submit(controller, agent.node_id, f"{kind}.create", payload)
    wait_for(requested.is_set, "the image download to start", limit=120)
    paths = wait_for(made, f"the {kind} create to make something before its download")
    agent.kill()
    agent.start()
    done = wait_task(controller, task["id"])
    assert (done["state"], done["code"]) == ("failed", "interrupted"), done
    assert f"what it had made of {kind} instance {payload['name']!r} was removed" in done["error"], done
    assert not any(path.exists() for path in paths)
    assert reported(agent, payload["name"]) is None


@pytest.mark.reliability("kvm create", "agent kill -9 with the instance directory made")
def test_a_vm_create_cut_off_by_kill_9_leaves_nothing(controller, kumo_agent, libvirtd, kvm_guest, stalled_image,
                                                      tmp_path):
    url, ca, requested = stalled_image
    instances = tmp_path / "instances"
    agent = kumo_agent(
        plugins={"kvm": {"uri": libvirtd, "instance_dir": str(instances), "acceleration": "tcg"}},
        settings={"image_cache": {"path": str(tmp_path / "images"), "ca_file": str(ca)}},
    )
    name = f"cut-vm-{uuid.uuid4().hex[:8]}"  # libvirtd is shared with other tests
    payload = {"name": name, "kind": "kvm", "image": url, "image_sha256": NEVER_SERVED, "vcpus": 1,
               "memory_mib": 128, "options": {"kernel": str(kvm_guest.kernel), "initrd": str(kvm_guest.initrd),
                                              "cmdline": kvm_guest.cmdline}}
    cut_create(controller, agent, "kvm", payload, requested, lambda: [p for p in [instances / name] if p.is_dir()])
    domains = subprocess.run(["virsh", "-c", libvirtd, "list", "--all", "--name"],  # noqa: S603, S607
                             capture_output=True, text=True, check=True).stdout.split()
    assert name not in domains
    assert list(instances.iterdir()) == []


@pytest.mark.reliability("lxc create", "agent kill -9 with the build directory made")
def test_a_container_create_cut_off_by_kill_9_leaves_nothing(controller, kumo_agent, lxcpath_factory, stalled_image,
                                                             tmp_path):
    url, ca, requested = stalled_image
    lxcpath = lxcpath_factory()
    agent = kumo_agent(plugins={"lxc": {"lxcpath": str(lxcpath)}},
                       settings={"image_cache": {"path": str(tmp_path / "images"), "ca_file": str(ca)}})
    name = "cut-ct"
    payload = {"name": name, "kind": "lxc", "image": url, "image_sha256": NEVER_SERVED}
    cut_create(controller, agent, "lxc", payload, requested, lambda: list(lxcpath.glob(f".create-{name}-*")))
    listed = subprocess.run(["lxc-ls", "-P", str(lxcpath)], capture_output=True, text=True,  # noqa: S603, S607
                            check=True).stdout.split()
    assert listed == [] and list(lxcpath.iterdir()) == []
