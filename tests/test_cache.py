"""The build cache: keys follow inputs, and only complete builds count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vdsa_server.builds.cache import artifact, tree_digest


def test_key_follows_inputs(tmp_path: Path) -> None:
    a = artifact("qemu", {"version": "1", "flags": "x"}, root=tmp_path)
    same = artifact("qemu", {"flags": "x", "version": "1"}, root=tmp_path)
    other = artifact("qemu", {"version": "2", "flags": "x"}, root=tmp_path)
    assert a.path == same.path
    assert a.path != other.path
    assert a.path.parent == tmp_path


def test_building_publishes_only_on_success(tmp_path: Path) -> None:
    a = artifact("thing", {"v": "1"}, root=tmp_path)
    def fail_half_way() -> None:
        with a.building() as scratch:
            (scratch / "half").write_text("x")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_half_way()
    assert not a.is_complete()
    assert list(tmp_path.iterdir()) == []

    with a.building() as scratch:
        (scratch / "out").write_text("done")
    assert a.is_complete()
    assert (a.path / "out").read_text() == "done"


def test_tree_digest_sees_content_and_names(tmp_path: Path) -> None:
    one = tmp_path / "a.patch"
    one.write_text("x")
    before = tree_digest([one])
    one.write_text("y")
    changed = tree_digest([one])
    assert changed != before
    renamed = one.rename(tmp_path / "b.patch")
    assert tree_digest([renamed]) != changed


def test_a_killed_builders_scratch_is_removed_by_the_next_build(tmp_path: Path) -> None:
    a = artifact("thing", {"v": "1"}, root=tmp_path)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = tmp_path / f".{a.name}-{a.key}.{done.stdout.strip()}.partial"
    alive = tmp_path / f".{a.name}-{a.key}.1.partial"  # init's: never removed
    other = tmp_path / f".other-{a.key}.{done.stdout.strip()}.partial"
    for scratch in (dead, alive, other):
        (scratch / "half").mkdir(parents=True)
    with a.building() as scratch:
        (scratch / "out").write_text("done")
    assert not dead.exists()
    assert alive.exists()
    assert other.exists()
