"""A network partition between one agent and the controller, made by the kernel (iptables).

    def test_x(controller, kumo_agent, network_partition):
        partition = network_partition(controller)
        agent = kumo_agent(settings={"controller": partition.url})
        partition.cut()      # every packet of the agent's connections dropped, both ways
        partition.heal()

The agent is given a port of its own (``partition.url``) that the kernel redirects to the
controller's API port (``nat OUTPUT REDIRECT``), so its traffic is told apart from everyone
else's by the port it was sent to. ``cut()`` drops every packet of the connections made to
that port, both ways and established ones included (``filter OUTPUT DROP`` on conntrack's
original destination port): the agent sees what a pulled cable does, no answer and no
reset. Admin calls, kumoctl and other agents use the controller's own port and go on. Every
rule is deleted at teardown, whatever happened, and each carries a comment naming its test.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import free_port, require


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, check=check)  # noqa: S603, S607


@dataclasses.dataclass
class Partition:
    """The agent's own way to one controller, and the switch that cuts it."""

    port: int
    target: int
    comment: str
    cut_now: bool = False

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _redirect(self) -> list[str]:
        return ["OUTPUT", "-t", "nat", "-p", "tcp", "-d", "127.0.0.1", "--dport", str(self.port),
                "-m", "comment", "--comment", self.comment, "-j", "REDIRECT", "--to-ports", str(self.target)]

    def _drop(self) -> list[str]:
        return ["OUTPUT", "-p", "tcp", "-m", "conntrack", "--ctorigdst", "127.0.0.1", "--ctorigdstport",
                str(self.port), "-m", "comment", "--comment", self.comment, "-j", "DROP"]

    def open(self) -> None:
        _iptables("-A", *self._redirect())

    def cut(self) -> None:
        if not self.cut_now:
            _iptables("-I", *self._drop())
            self.cut_now = True

    def heal(self) -> None:
        if self.cut_now:
            _iptables("-D", *self._drop())
            self.cut_now = False

    def close(self) -> None:
        self.heal()
        _iptables("-D", *self._redirect(), check=False)


@pytest.fixture
def network_partition(request: pytest.FixtureRequest) -> Iterator[Callable[[Any], Partition]]:
    """Factory: ``network_partition(controller)`` → a :class:`Partition`, open (not cut)."""
    require(shutil.which("iptables") is not None, "iptables (scripts/deps/00-base.sh installs it)")
    made: list[Partition] = []

    def make(controller: Any) -> Partition:
        partition = Partition(free_port(), controller.port, f"kumo-test {request.node.name}"[:250])
        partition.open()
        made.append(partition)
        return partition

    yield make
    for partition in made:
        partition.close()
