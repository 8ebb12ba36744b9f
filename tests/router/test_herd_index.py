"""The herd's pick index takes the node a full scan of the herd would take, through joins, loads, failures,
drains, slot changes and removals."""

from __future__ import annotations

import random

from llamakit.router.herd import Herd, HerdNode


def scan(herd: Herd, model: str) -> HerdNode | None:
    """What `Herd.pick` promises, the slow way: the least-loaded accepting node (most free, then name)."""
    best = None
    for node in herd.nodes.values():
        if node.accepting(model) and (
            best is None
            or (node.busy / node.slots, -node.free, node.name) < (best.busy / best.slots, -best.free, best.name)
        ):
            best = node
    return best


def test_the_pick_index_agrees_with_a_scan_of_the_herd() -> None:
    rng = random.Random(7)
    for _trial in range(100):
        herd = Herd()
        for i in range(rng.randint(1, 30)):
            models = rng.sample(["a", "b", "c"], rng.randint(1, 2))
            herd.join(url=f"http://n{i}", name=f"n{i}", models=models, slots=rng.randint(1, 4))
        for _step in range(200):
            nodes, op = list(herd.nodes.values()), rng.random()
            if op < 0.4:
                node = herd.pick(model := rng.choice("abc"))
                assert node is scan(herd, model)
                if node is not None:
                    node.busy += 1
            elif op < 0.7:
                if busy := [n for n in nodes if n.busy > 0]:
                    rng.choice(busy).busy -= 1
            elif op < 0.8:
                rng.choice(nodes).up = rng.random() < 0.7
            elif op < 0.85:
                rng.choice(nodes).draining = rng.random() < 0.3
            elif op < 0.9:
                rng.choice(nodes).slots = rng.randint(1, 5)
            elif op < 0.93 and len(nodes) > 1:
                herd.remove(rng.choice(nodes).id)
            else:
                node = rng.choice(nodes)
                herd.join(url=node.url, name=node.name, models=["b", "c"], slots=3)
            for model in "abc":
                assert herd.pick(model) is scan(herd, model)


def test_the_largest_context_and_the_models_served_agree_with_a_scan_through_changes() -> None:
    rng = random.Random(11)
    herd = Herd()
    for i in range(20):
        herd.join(url=f"http://n{i}", name=f"n{i}", models=rng.sample(["a", "b"], rng.randint(1, 2)), slots=2)
    for step in range(2000):
        nodes, op = list(herd.nodes.values()), rng.random()
        if op < 0.3:
            rng.choice(nodes).n_ctx = rng.choice([512, 2048, 8192])
        elif op < 0.4:
            rng.choice(nodes).models = rng.sample(["a", "b", "c"], rng.randint(1, 2))
        elif op < 0.7:
            node = rng.choice(nodes)
            node.busy = rng.randint(0, 2)
        elif op < 0.75:
            herd.pick(rng.choice("ab"))  # builds the pick index, which changes how a change is recorded
        elif op < 0.8 and len(nodes) > 1:
            herd.remove(rng.choice(nodes).id)
        elif op < 0.85:
            herd.join(url=f"http://x{step}", name=f"x{step}", models=["a"], slots=1)
        model = rng.choice("ab")
        sizes = [n.n_ctx for n in herd.nodes.values() if model in n.models]
        want = max(sizes) if sizes and None not in sizes else None  # type: ignore[type-var]
        assert herd.context(model) == want
        for name in "abcd":  # the set of models served, cached like the contexts
            assert herd.serves(name) == any(name in n.models for n in herd.nodes.values())


class _CountingNodes(dict[str, HerdNode]):
    scans = 0

    def values(self):  # type: ignore[no-untyped-def]
        self.scans += 1
        return super().values()


def test_a_request_pays_no_scan_of_the_herd_for_its_context_as_loads_change() -> None:
    """A router of a cluster never builds the pick index; its nodes' loads change with every request."""
    herd = Herd()
    for i in range(1000):
        herd.join(url=f"http://n{i}", name=f"n{i}", models=["m"], slots=4).n_ctx = 2048
    herd.nodes = counting = _CountingNodes(herd.nodes)
    assert herd.context("m") == 2048
    for i in range(100):
        node = herd.nodes[f"n{i}"]
        node.busy += 1
        assert herd.context("m") == 2048
        node.busy -= 1
    assert counting.scans == 1
