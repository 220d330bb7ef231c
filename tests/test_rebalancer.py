"""The rebalancing policy (controller.rebalancer), on made-up measurements: what moves, what
stays and why, the limits and the hysteresis that keeps anything from moving back."""

from __future__ import annotations

import re

import pytest

from controller.rebalancer import Instance, Node, Policy, plan

NOW = 1000.0
POLICY = Policy(cpu_high=0.8, margin=0.1, window=60.0, interval=10.0, max_in_flight=2)


def node(node_id: str, share: float, cpus: int = 4, seconds: float = 60.0) -> Node:
    """A node whose instances used ``share`` of its CPUs in every sample of the last ``seconds``."""
    return Node(node_id, cpus, tuple((NOW - t, share) for t in range(int(seconds), -1, -10)))


def inst(name: str, on: str, cpu: float | None, others: dict[str, str | None] | None = None,
         refused: str | None = None, everywhere: tuple[str, ...] = ("n-a", "n-b", "n-c")) -> Instance:
    destinations = {n: None for n in everywhere if n != on}
    destinations.update(others or {})
    return Instance(name, "process", on, cpu, refused, destinations)


def test_a_node_busy_for_the_whole_window_sheds_load_to_the_idle_ones():
    nodes = [node("n-a", 0.9), node("n-b", 0.0), node("n-c", 0.0)]
    instances = [inst(f"p{i}", "n-a", 0.9) for i in range(4)]  # 3.6 cores of 4: 90%
    result = plan(nodes, instances, POLICY, NOW)
    assert [(m.instance, m.source, m.destination, m.wave) for m in result.moves] == [("p0", "n-a", "n-b", 1)]
    move = result.moves[0]
    assert (move.source_before, move.source_after, move.destination_after) == (0.9, 0.675, 0.225)
    assert "over 80% of its 4 CPUs for 60 s" in move.reason and "leaves it at 68%" in move.reason
    assert result.refused == [] and result.summary.startswith("1 move(s) in 1 wave(s) off n-a")


def test_a_burst_is_not_sustained_and_a_window_not_yet_covered_is_not_either():
    bursty = Node("n-a", 4, ((NOW - 60, 0.9), (NOW - 30, 0.5), (NOW, 0.95)))
    young = node("n-a", 0.95, seconds=20)
    for busy in (bursty, young):
        result = plan([busy, node("n-b", 0.0)], [inst("p", "n-a", 3.6, everywhere=("n-a", "n-b"))], POLICY, NOW)
        assert result.moves == [] and "nothing to move" in result.summary


def test_samples_a_little_late_still_cover_the_window_and_a_missed_first_one_does_not():
    # Every 10 s, each 0.2 s late: the window's first sample is 10.x s after its start.
    late = Node("n-a", 4, tuple((NOW - 49.8 + 10 * i, 0.95) for i in range(5)))
    missed = Node("n-a", 4, tuple((NOW - 40 + 10 * i, 0.95) for i in range(5)))
    sustained = [plan([busy, node("n-b", 0.0)], [inst("p", "n-a", 3.8, everywhere=("n-a", "n-b"))], POLICY,
                      NOW).nodes[0].sustained for busy in (late, missed)]
    assert sustained == [True, False]


def test_a_move_must_leave_the_destination_below_the_threshold_less_the_margin():
    # One instance of 3 cores: wherever it goes that node is at 75% (>= 70%): it stays.
    nodes = [node("n-a", 0.95), node("n-b", 0.0)]
    instances = [inst("big", "n-a", 3.0, everywhere=("n-a", "n-b")), inst("small", "n-a", 0.8, everywhere=("n-a", "n-b"))]
    result = plan(nodes, instances, POLICY, NOW)
    assert [m.instance for m in result.moves] == ["small"]
    assert result.nodes[0].after == 0.75 and result.nodes[1].after == 0.2
    # What the plan leaves: n-a is under 80% now, so nothing is reported refused.
    assert result.refused == []
    # After the move the next plan finds nothing to do (no flapping), even measured busy again.
    moved = [inst("big", "n-a", 3.0, everywhere=("n-a", "n-b")), inst("small", "n-b", 0.8, everywhere=("n-a", "n-b"))]
    again = plan([node("n-a", 0.75), node("n-b", 0.2)], moved, POLICY, NOW)
    assert again.moves == [] and "nothing to move" in again.summary


def test_what_cannot_move_says_why():
    nodes = [node("n-a", 0.95), node("n-b", 0.65), node("n-c", 0.0)]
    instances = [
        inst("pinned", "n-a", 1.5, refused="pinned (created with --option pin=true)"),
        inst("fresh", "n-a", None),
        inst("idle", "n-a", 0.0),
        inst("wide", "n-a", 1.8, {"n-c": "node is drained (kumoctl nodes undrain to accept new instances)"}),
        inst("filler", "n-b", 2.6),
    ]
    result = plan(nodes, instances, POLICY, NOW)
    assert result.moves == []
    reasons = {r.instance: r.reason for r in result.refused}
    assert reasons == {
        "pinned": "pinned (created with --option pin=true)",
        "fresh": "its CPU use is not measured yet (it needs two heartbeats on one node)",
        "idle": "it uses no CPU: moving it would not make its node less busy",
        "wide": "no node can take it: n-b: would be at 110% with it, not below 70%; n-c: node is drained "
                "(kumoctl nodes undrain to accept new instances)",
    }
    assert "nothing on it can move" in result.summary


def test_one_migration_per_node_at_a_time_and_waves_for_the_rest():
    nodes = [node("n-a", 0.95), node("n-b", 0.0), node("n-c", 0.0)]
    instances = [inst(f"p{i}", "n-a", 0.38) for i in range(10)]  # 95%: two moves bring it under 80%
    result = plan(nodes, instances, POLICY, NOW)
    assert [(m.instance, m.destination, m.wave) for m in result.moves] == [("p0", "n-b", 1), ("p1", "n-c", 2)]
    # A migration already running off n-a: nothing more from it until it ends, in this wave.
    running = plan(nodes, instances, POLICY, NOW, in_flight=[("n-a", "n-b")])
    assert [(m.destination, m.wave) for m in running.moves] == [("n-b", 2), ("n-c", 3)]


def test_the_fleet_wide_limit_counts_migrations_already_running():
    nodes = [node(n, 0.95) for n in ("n-a", "n-b")] + [node(n, 0.0) for n in ("n-c", "n-d", "n-x", "n-y")]
    everywhere = ("n-a", "n-b", "n-c", "n-d", "n-x", "n-y")
    instances = [inst(f"{n}-{i}", n, 1.9, everywhere=everywhere) for n in ("n-a", "n-b") for i in range(2)]
    result = plan(nodes, instances, POLICY, NOW, in_flight=[("n-x", "n-y")])
    assert [m.wave for m in result.moves] == [1, 2]
    assert plan(nodes, instances, POLICY, NOW).moves[1].wave == 1


def test_the_move_that_brings_the_node_under_the_threshold_wins_and_keeps_loads_even():
    nodes = [node("n-a", 0.85), node("n-b", 0.1)]
    everywhere = ("n-a", "n-b")
    instances = [inst("a", "n-a", 2.0, everywhere=everywhere), inst("b", "n-a", 1.0, everywhere=everywhere),
                 inst("c", "n-a", 0.4, everywhere=everywhere), inst("d", "n-b", 0.4, everywhere=everywhere)]
    # c alone leaves n-a at 75%; b leaves it at 60% and n-b at 35%: the more even of the two.
    [move] = plan(nodes, instances, POLICY, NOW).moves
    assert move.instance == "b" and (move.source_after, move.destination_after) == (0.6, 0.35)


def write_config(tmp_path, text: str):
    path = tmp_path / "controller.yaml"
    path.write_text("pki_dir: pki\ndatabase: c.db\n" + text)
    return path


def test_the_rebalance_settings_default_to_off_and_take_yaml_off(tmp_path):
    from controller.settings import load_settings

    assert load_settings(write_config(tmp_path, "")).rebalance.mode == "off"
    settings = load_settings(write_config(tmp_path, "rebalance: {mode: off, cpu_high: 0.7, exclude: [db-*]}\n"))
    assert (settings.rebalance.mode, settings.rebalance.cpu_high, settings.rebalance.exclude) == ("off", 0.7, ["db-*"])
    assert load_settings(write_config(tmp_path, "rebalance: {mode: auto}\n")).rebalance.mode == "auto"


@pytest.mark.parametrize(("text", "message"), [
    ("rebalance: {mode: on}", "rebalance.mode: expected one of 'off', 'auto', got True"),
    ("rebalance: {cpu_high: 1.5}", "rebalance.cpu_high: expected a fraction above 0 and at most 1"),
    ("rebalance: {cpu_high: 0.5, margin: 0.5}", "rebalance.margin: expected a fraction from 0 to below cpu_high"),
    ("rebalance: {interval: 60, window: 30}", "rebalance.window: expected at least one interval (60 s)"),
    ("rebalance: {cooldown: 0}", "rebalance.cooldown: expected a positive number of seconds"),
    ("rebalance: {max_in_flight: 0}", "rebalance.max_in_flight: expected a whole number of migrations, 1 or more"),
    ("rebalance: {threshold: 0.5}", "rebalance.threshold: unknown key"),
])
def test_bad_rebalance_settings_name_the_key(tmp_path, text, message):
    from agent.sdk import ConfigError
    from controller.settings import load_settings

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(write_config(tmp_path, text + "\n"))
