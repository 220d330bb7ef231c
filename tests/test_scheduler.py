"""The scheduler's filters (each with its reason) and its spreading, on plain node dicts."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.scheduler import DEFAULT_VCPU_OVERCOMMIT, place

GIB = 1024**3


def node(node_id: str, **changes: Any) -> dict[str, Any]:
    """A ready 4-CPU, 8 GiB node that runs kvm and lxc, with nothing committed."""
    base: dict[str, Any] = {
        "id": node_id,
        "hostname": node_id,
        "state": "ready",
        "drained": False,
        "plugins": {
            "kvm": {"available": True, "reason": "", "kinds": ["kvm"], "attributes": {}},
            "lxc": {"available": True, "reason": "", "kinds": ["lxc"], "attributes": {}},
        },
        "facts": {"cpus": 4, "memory_bytes": 8 * GIB, "memory_available_bytes": 6 * GIB},
        "committed": {"vcpus": 0, "memory_mib": 0},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def request(**changes: Any) -> dict[str, Any]:
    return {"kind": "kvm", "vcpus": 2, "memory_mib": 1024, **changes}


def test_single_fitting_node_is_chosen_with_no_reasons():
    assert place(request(), [node("n-a")]) == ("n-a", {})


def test_no_nodes_places_nothing():
    assert place(request(), []) == (None, {})


@pytest.mark.parametrize("state", ["unreachable", "removed"])
def test_node_not_ready_is_dropped(state):
    chosen, reasons = place(request(), [node("n-a", state=state), node("n-b")])
    assert chosen == "n-b"
    assert reasons == {"n-a": f"node is {state}, not ready"}


def test_drained_node_is_dropped():
    chosen, reasons = place(request(), [node("n-a", drained=True)])
    assert chosen is None
    assert "drained" in reasons["n-a"]


def test_node_without_a_plugin_for_the_kind_is_dropped():
    chosen, reasons = place(request(kind="zone"), [node("n-a")])
    assert chosen is None
    assert reasons == {"n-a": "no plugin on the node runs zone instances"}


def test_a_kind_is_placed_by_what_nodes_offer_whatever_its_plugin():
    # A third-party plugin's kind, named neither after its plugin nor known to the controller.
    sleeper = {"available": True, "reason": "", "kinds": ["sleep"], "attributes": {}}
    nodes = [node("n-a"), node("n-b", plugins={"kumo-sleep": sleeper})]
    assert place(request(kind="sleep"), nodes) == ("n-b", {"n-a": "no plugin on the node runs sleep instances"})


def test_unavailable_plugin_reports_its_own_reason():
    kvm_down = {
        "available": False,
        "reason": "libvirtd is not running",
        "kinds": ["kvm"],
        "attributes": {},
    }
    chosen, reasons = place(request(), [node("n-a", plugins={"kvm": kvm_down})])
    assert chosen is None
    assert reasons == {"n-a": "plugin kvm is unavailable: libvirtd is not running"}


def test_unavailable_plugin_listing_no_kinds_still_names_its_reason():
    kvm_down = {"available": False, "reason": "no /dev/kvm", "kinds": [], "attributes": {}}
    _, reasons = place(request(), [node("n-a", plugins={"kvm": kvm_down})])
    assert reasons == {"n-a": "plugin kvm is unavailable: no /dev/kvm"}


def test_any_available_plugin_offering_the_kind_is_enough():
    plugins = {
        "kvm": {"available": False, "reason": "no libvirtd", "kinds": ["kvm"], "attributes": {}},
        "qemu-direct": {"available": True, "reason": "", "kinds": ["kvm"], "attributes": {}},
    }
    assert place(request(), [node("n-a", plugins=plugins)]) == ("n-a", {})


def test_node_without_facts_is_dropped():
    _, reasons = place(request(), [node("n-a", facts={"cpus": None})])
    assert reasons == {"n-a": "node has not reported its CPU count and memory yet"}


def test_memory_beyond_what_is_available_is_dropped():
    # 8 GiB total, 6 GiB available, nothing committed: 6144 MiB free.
    chosen, reasons = place(request(memory_mib=6145), [node("n-a")])
    assert chosen is None
    assert reasons == {"n-a": "not enough free memory: 6145 MiB wanted, 6144 MiB free"}
    assert place(request(memory_mib=6144), [node("n-a")])[0] == "n-a"


def test_committed_memory_is_reserved_against_the_total_not_subtracted_from_available():
    # 5 GiB committed (running guests, already missing from the 6 GiB available) leaves
    # 8 - 5 = 3 GiB: counting them against `available` too would leave only 1 GiB.
    busy = node("n-a", committed={"memory_mib": 5 * 1024})
    assert place(request(memory_mib=3 * 1024), [busy])[0] == "n-a"
    _, reasons = place(request(memory_mib=3 * 1024 + 1), [busy])
    assert reasons == {"n-a": "not enough free memory: 3073 MiB wanted, 3072 MiB free"}


def test_vcpus_over_the_default_overcommit_are_dropped():
    capacity = 4 * DEFAULT_VCPU_OVERCOMMIT
    full = node("n-a", committed={"vcpus": capacity - 1})
    assert place(request(vcpus=1), [full])[0] == "n-a"
    chosen, reasons = place(request(vcpus=2), [full])
    assert chosen is None
    assert reasons == {
        "n-a": "not enough vCPUs: 2 wanted, 15 of 16 committed (4 CPUs × overcommit 4)"
    }


def test_node_fact_sets_the_overcommit_ratio():
    strict = node("n-a", facts={"vcpu_overcommit": 1.0})
    assert place(request(vcpus=4), [strict])[0] == "n-a"
    _, reasons = place(request(vcpus=5), [strict])
    assert reasons["n-a"].startswith("not enough vCPUs: 5 wanted, 0 of 4 committed")


def test_pinned_request_drops_every_other_node():
    chosen, reasons = place(request(node="n-b"), [node("n-a"), node("n-b"), node("n-c")])
    assert chosen == "n-b"
    assert reasons == {
        "n-a": "the instance is pinned to node n-b",
        "n-c": "the instance is pinned to node n-b",
    }


def test_pinned_node_still_has_to_fit():
    chosen, reasons = place(request(node="n-a"), [node("n-a", drained=True), node("n-b")])
    assert chosen is None
    assert "drained" in reasons["n-a"]
    assert reasons["n-b"] == "the instance is pinned to node n-a"


def test_spreads_to_the_fewest_committed_vcpus_relative_to_capacity():
    # n-a: 4 of 16 vCPUs (25 %); n-b: 8 cpus → 32 capacity, 6 committed (19 %).
    nodes = [
        node("n-a", committed={"vcpus": 4}),
        node("n-b", facts={"cpus": 8}, committed={"vcpus": 6}),
    ]
    assert place(request(), nodes)[0] == "n-b"


def test_equal_load_goes_to_the_most_free_memory():
    nodes = [
        node("n-a", facts={"memory_available_bytes": 2 * GIB}),
        node("n-b", facts={"memory_available_bytes": 5 * GIB}),
        node("n-c", facts={"memory_available_bytes": 3 * GIB}),
    ]
    assert place(request(), nodes)[0] == "n-b"


def test_full_tie_goes_to_the_smallest_id_whatever_the_order():
    nodes = [node("n-c"), node("n-a"), node("n-b")]
    assert place(request(), nodes)[0] == "n-a"
    assert place(request(), list(reversed(nodes)))[0] == "n-a"


def test_successive_placements_spread_across_nodes():
    nodes = [node("n-a"), node("n-b"), node("n-c")]
    landed = []
    for _ in range(6):
        chosen, _ = place(request(), nodes)
        landed.append(chosen)
        target = next(n for n in nodes if n["id"] == chosen)
        target["committed"]["vcpus"] += 2
        target["committed"]["memory_mib"] += 1024
    assert sorted(landed) == ["n-a", "n-a", "n-b", "n-b", "n-c", "n-c"]


def test_place_does_not_modify_its_inputs():
    nodes = [node("n-a", state="unreachable"), node("n-b")]
    req = request()
    before = copy.deepcopy((req, nodes))
    place(req, nodes)
    assert (req, nodes) == before


def test_every_dropped_node_has_a_reason_and_the_chosen_one_none():
    nodes = [
        node("n-ready"),
        node("n-drained", drained=True),
        node("n-down", state="unreachable"),
        node("n-small", facts={"memory_available_bytes": GIB // 2}),
    ]
    chosen, reasons = place(request(), nodes)
    assert chosen == "n-ready"
    assert set(reasons) == {"n-drained", "n-down", "n-small"}


def busy(fraction: float, used_gib: float = 1.0) -> dict[str, Any]:
    return {"node": {"cpu_busy": fraction, "memory_used_bytes": int(used_gib * 2**30), "memory_total_bytes": 8 << 30}}


def test_a_node_measured_busy_takes_nothing_new_even_with_vcpus_free():
    chosen, reasons = place(request(), [node("n-hot", usage=busy(0.97)), node("n-cool", usage=busy(0.2))])
    assert chosen == "n-cool"
    assert reasons["n-hot"] == ("node's CPU is 97% busy as measured, above the 90% placement limit "
                                "(although 0 of 16 vCPUs are committed)")
    assert place(request(), [node("n-hot", usage=busy(0.97))], cpu_busy_max=0.99)[0] == "n-hot"


def test_a_node_the_rebalancer_finds_busy_takes_nothing_new_unless_named():
    why = "node's instances used over 80% of its CPUs in every sample of the last 300 s (at least 85%), as measured"
    hot = node("n-hot", instances_busy=why)
    chosen, reasons = place(request(), [hot, node("n-cool", committed={"vcpus": 8, "memory_mib": 0})])
    assert chosen == "n-cool" and reasons["n-hot"] == f"{why} (although 0 of 16 vCPUs are committed)"
    assert place(request(node="n-hot"), [hot])[0] == "n-hot"


def test_equal_reservations_go_to_the_node_measured_less_busy():
    nodes = [node("n-a", usage=busy(0.6)), node("n-b", usage=busy(0.1))]
    assert place(request(), nodes)[0] == "n-b"
    # Reservations still come first: one heartbeat's figure is too noisy to outweigh them.
    nodes[1]["committed"] = {"vcpus": 4, "memory_mib": 0}
    assert place(request(), nodes)[0] == "n-a"


def test_measured_free_memory_is_used_when_the_node_reports_it():
    full = node("n-full", usage=busy(0.1, used_gib=7.9))
    chosen, reasons = place(request(memory_mib=512), [full])
    assert chosen is None and "not enough free memory: 512 MiB wanted" in reasons["n-full"]


IMAGE = "ab" * 32


def test_between_equally_loaded_nodes_the_one_holding_the_image_wins() -> None:
    holder = node("n-b", images={"held": [IMAGE], "pulling": {}})
    assert place(request(image_sha256=IMAGE), [node("n-a"), holder])[0] == "n-b"
    assert place(request(), [node("n-a"), holder])[0] == "n-a"  # no image: the smallest id, as before


def test_a_lighter_node_wins_over_one_holding_the_image() -> None:
    holder = node("n-a", images={"held": [IMAGE]}, committed={"vcpus": 2})
    assert place(request(image_sha256=IMAGE), [holder, node("n-b")])[0] == "n-b"
