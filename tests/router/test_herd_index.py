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
