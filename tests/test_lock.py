"""The lock (requirements/dev.lock) and pyproject.toml agree: every requirement of llamakit[all,dev] is pinned in
the lock at a version it admits, so `make install` never installs what pyproject.toml would refuse. `make lock`
writes the lock again after a change to pyproject.toml (docs/development.md#installs-that-do-not-drift)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"


def _requirements(extras: set[str]) -> list[Requirement]:
    """llamakit's requirements with `extras`, its own extras (llamakit[node,…]) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "llamakit":
                todo.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def _pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", line)
        if match:
            pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_every_requirement_is_pinned_in_the_lock_at_a_version_it_admits() -> None:
    pins = _pins()
    environment = default_environment()
    wrong = []
    for requirement in _requirements({"all", "dev"}):
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            wrong.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            wrong.append(f"{requirement} does not admit the lock's {requirement.name}=={pinned}")
    assert not wrong, "pyproject.toml and requirements/dev.lock disagree; run `make lock`:\n" + "\n".join(wrong)


def test_every_pin_has_its_hashes() -> None:
    """pip installs the lock with --require-hashes: a pin without a hash would make the whole install fail."""
    text = LOCK.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9_.\-]+==)", text)
    missing = [b.split(" ", 1)[0] for b in blocks if "==" in b.split("\n", 1)[0] and "--hash=sha256:" not in b]
    assert not missing, f"pins without hashes: {missing}"
