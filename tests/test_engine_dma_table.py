"""The engine's DMA table on its own, at a vIOMMU guest's scale: native/engine/bench/dma_table.c,
built with the table and the sanitized engine's flags, checks random maps, unmaps and lookups
against a model, and its bench runs (README, "A guest vIOMMU", has its figures at 262,144 maps,
from the release build: an insert that moved the entries above it took 24 s for them in
descending order)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vdsa_server.builds.engine_build import COMPILER, ENGINE_SOURCES, WARNINGS, Variant
from vdsa_server.builds.libvfio_user_build import libvfio_user_artifact

SCALE = 65_536  # maps in each order; sanitized, 262,144 take the bench 40 s on a busy machine
RUN_LIMIT = 300.0  # seconds for one run of the program, sanitized, on a busy machine


@pytest.fixture(scope="module")
def dma_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    program = tmp_path_factory.mktemp("dma-table") / "dma_table"
    subprocess.run([COMPILER, "-std=gnu11", "-g", "-pthread", *WARNINGS,
                    *Variant.SANITIZED.flags, f"-I{libvfio_user_artifact().path / 'include'}",
                    "-o", str(program), str(ENGINE_SOURCES / "bench" / "dma_table.c"),
                    str(ENGINE_SOURCES / "dma.c")], check=True)
    return program


def run(program: Path, *args: str) -> str:
    done = subprocess.run([str(program), *args], capture_output=True, text=True,
                          timeout=RUN_LIMIT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_maps_unmaps_and_lookups_match_a_model(dma_table: Path, seed: int) -> None:
    assert "no difference" in run(dma_table, "check", str(seed), "20000")


def test_the_bench_maps_in_every_order(dma_table: Path) -> None:
    assert run(dma_table, "bench", str(SCALE)).startswith(f"{SCALE} one-page maps")
