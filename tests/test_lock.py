"""The locks agree with pyproject.toml: every dependency is locked at a version its specifier
allows, every package the lock says comes from pyproject.toml still does, every other locked
package is still needed by one that is locked, and each lock has the torch build it is for.
A change of dependencies comes with its `make lock`. Plain file reads: no Ray, no network."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import cache

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PYPROJECT = REPO / "pyproject.toml"
TORCH_PIN = REPO / "requirements" / "torch.txt"
# Each lock and the extras it covers (the Makefile's LOCK and IMAGE_LOCK).
LOCKS = {"cpu.txt": ("test", "notebook"), "image.txt": ()}
# The platform the locks are for: markers are evaluated there.
ENVIRONMENT = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}
FROM_PYPROJECT = "emotion2vec-serve (pyproject.toml)"
OVERRIDE = "--override requirements/torch.txt"
RUN = "run `make lock`"

ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)")
VIA = re.compile(r"^\s+#\s+via(?:\s+(.*))?$")
VIA_MORE = re.compile(r"^\s+#\s{2,}(\S.*)$")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass
class Pin:
    version: Version
    via: set[str] = field(default_factory=set)
    hashes: int = 0


@cache
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def wanted(extras: tuple[str, ...]) -> dict[str, Requirement]:
    """pyproject.toml's requirements for a lock: the dependencies and the given extras."""
    project = pyproject()["project"]
    lines = [*project["dependencies"]]
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    found: dict[str, Requirement] = {}
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(ENVIRONMENT):
            found.setdefault(canonicalize_name(requirement.name), requirement)
    return found


@cache
def read_lock(name: str) -> dict[str, Pin]:
    """A lock written by `uv pip compile` (annotated): each package's pin, its hashes and the
    `# via` lines saying what needs it."""
    pins: dict[str, Pin] = {}
    current = None
    for line in (REPO / "requirements" / name).read_text(encoding="utf-8").splitlines():
        if match := ENTRY.match(line):
            current = pins.setdefault(canonicalize_name(match.group(1)),
                                      Pin(Version(match.group(2))))
        elif current is None:
            continue
        elif match := VIA.match(line):
            if match.group(1):
                current.via.add(match.group(1).strip())
        elif match := VIA_MORE.match(line):
            current.via.add(match.group(1).strip())
        current.hashes += len(HASH.findall(line))
    return pins


def parent(via: str) -> str:
    return via if via in (FROM_PYPROJECT, OVERRIDE) else canonicalize_name(via.split()[0])


@pytest.mark.parametrize("lock", LOCKS)
def test_every_dependency_is_locked_as_pyproject_allows(lock):
    pins = read_lock(lock)
    for name, requirement in wanted(LOCKS[lock]).items():
        assert name in pins, f"requirements/{lock} lacks {name} ({requirement}): {RUN}"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"requirements/{lock} has {name}=={pins[name].version}, pyproject.toml wants "
            f"{requirement}: {RUN}")


@pytest.mark.parametrize("lock", LOCKS)
def test_every_locked_package_is_still_needed(lock):
    pins, direct = read_lock(lock), wanted(LOCKS[lock])
    for name, pin in pins.items():
        assert pin.via, f"requirements/{lock}: {name} says nothing about what needs it: {RUN}"
        if FROM_PYPROJECT in pin.via:
            assert name in direct, (
                f"requirements/{lock} locks {name} for pyproject.toml, which no longer asks for "
                f"it: {RUN}")
        needed = {parent(via) for via in pin.via} & {FROM_PYPROJECT, OVERRIDE, *pins}
        assert needed, f"requirements/{lock} locks {name}, which nothing locked needs: {RUN}"
        assert pin.hashes, f"requirements/{lock} has no hash for {name}: {RUN}"


@pytest.mark.parametrize("lock", LOCKS)
def test_setuptools_is_locked_for_the_build(lock):
    """`make install` and the Dockerfile build this package with no build isolation: with the
    locked setuptools, which must satisfy [build-system] requires."""
    pins = read_lock(lock)
    for line in pyproject()["build-system"]["requires"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements/{lock} lacks {name}, needed for the build: {RUN}"
        assert requirement.specifier.contains(pins[name].version), (
            f"requirements/{lock} has {name}=={pins[name].version}, the build wants "
            f"{requirement}")


def test_torch_builds():
    """Both locks pin requirements/torch.txt's release: the CPU lock its CPU build and nothing
    of CUDA's, the image PyPI's build."""
    pinned = next(Requirement(line) for line in TORCH_PIN.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    cpu, image = read_lock("cpu.txt"), read_lock("image.txt")
    assert cpu["torch"].version.local == "cpu", f"requirements/cpu.txt's torch is "\
        f"{cpu['torch'].version}, not a CPU build: {RUN} (the CPU wheel must be found)"
    assert image["torch"].version.local is None, image["torch"].version
    for lock, pins in (("cpu.txt", cpu), ("image.txt", image)):
        assert pinned.specifier.contains(pins["torch"].version), (
            f"requirements/{lock} has torch {pins['torch'].version}, requirements/torch.txt "
            f"pins {pinned}: {RUN}")
    cuda = sorted(name for name in cpu if name.startswith(("nvidia-", "cuda-")) or name == "triton")
    assert not cuda, f"requirements/cpu.txt locks CUDA packages: {cuda}"
