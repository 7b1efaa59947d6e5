"""`vdsa bench` through the protocol harness: the host reference library against independent
models, the benchmark's own result checks against a real server, and the command's table,
JSON and chart. Speed is reported, never asserted."""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import vdsa_env
from tests.engine_reference import crc16_t10dif, crc32c
from tests.test_engine_protocol import server_process
from vdsa_server.bench.harness import (
    DMA_MAP_IOVA,
    MEMORY,
    MEMORY_SIZE,
    SRC,
    Bench,
    BenchError,
    BenchPlan,
    CpuClock,
    Work,
    _crc_check,
    dest,
    dma_map_case,
)
from vdsa_server.bench.hostref import HostOp, HostReference
from vdsa_server.bench.results import Measurement
from vdsa_server.client import GuestMemory, VfioUserClient
from vdsa_server.client.driver import DsaDriver
from vdsa_server.device.descriptors import DsaOpcode

KiB = 1024
BLOCK = 512


@pytest.fixture(scope="module")
def host() -> HostReference:
    return HostReference()


def buffers(size: int) -> tuple[Any, Any, int, int]:
    """A source of ``size`` patterned bytes and a larger destination, with their addresses;
    the caller keeps the buffers alive while the library uses the addresses."""
    src = ctypes.create_string_buffer(bytes((i * 7 + i // 256) & 0xFF for i in range(size)))
    dst = ctypes.create_string_buffer(2 * size + 64)
    return src, dst, ctypes.addressof(src), ctypes.addressof(dst)


def test_host_crc32c_is_the_rfc3720_crc(host: HostReference) -> None:
    src, _, src_addr, _ = buffers(4 * KiB)
    host.time_ns(HostOp.CRC32C, 0, src_addr, 4 * KiB, 3)
    assert ~host.result() & 0xFFFF_FFFF == crc32c(src.raw[:4 * KiB])


def test_host_dif_insert_writes_what_dif_check_accepts_and_the_model_computes(
        host: HostReference) -> None:
    src, dst, src_addr, dst_addr = buffers(2 * BLOCK)
    host.time_ns(HostOp.DIF_INSERT, dst_addr, src_addr, 2 * BLOCK, 1)
    expected = b"".join(
        src.raw[b * BLOCK:(b + 1) * BLOCK]
        + struct.pack(">HHI", crc16_t10dif(src.raw[b * BLOCK:(b + 1) * BLOCK]), 0, b)
        for b in range(2))
    assert dst.raw[:len(expected)] == expected
    host.time_ns(HostOp.DIF_CHECK, 0, dst_addr, 2 * BLOCK, 1)
    assert host.result() == 0
    dst[BLOCK + 8 + 3] = dst.raw[BLOCK + 8 + 3] ^ 1  # a data byte of the second block
    host.time_ns(HostOp.DIF_CHECK, 0, dst_addr, 2 * BLOCK, 1)
    assert host.result() == 1


def test_host_copy_and_fill_do_the_work(host: HostReference) -> None:
    src, dst, src_addr, dst_addr = buffers(4 * KiB)
    host.time_ns(HostOp.COPY_CRC32C, dst_addr, src_addr, 4 * KiB, 1)
    assert dst.raw[:4 * KiB] == src.raw[:4 * KiB]
    host.time_ns(HostOp.MEMSET, dst_addr, src_addr, 4 * KiB, 1)
    assert dst.raw[:4 * KiB] == src.raw[:1] * 4 * KiB
    host.time_ns(HostOp.MEMCMP, dst_addr, src_addr, 4 * KiB, 1)
    assert host.result() != 0


@pytest.mark.parametrize(("op", "size"), [(HostOp.MEMCPY, 0), (HostOp.DIF_INSERT, 100),
                                          (HostOp.DIF_CHECK, BLOCK + 1)])
def test_host_reference_refuses_sizes_it_cannot_run(host: HostReference, op: HostOp,
                                                     size: int) -> None:
    src, dst, src_addr, dst_addr = buffers(4 * KiB)
    with pytest.raises(ValueError, match="cannot run"):
        host.time_ns(op, dst_addr, src_addr, size, 1)
    del src, dst  # kept alive until here: the library has their addresses


def test_host_rate_runs_the_operation(host: HostReference) -> None:
    src, dst, src_addr, dst_addr = buffers(4 * KiB)
    rate = host.rate(HostOp.MEMCPY, dst_addr, src_addr, 4 * KiB, 0.01)
    assert rate > 0
    assert dst.raw[:4 * KiB] == src.raw[:4 * KiB]


def test_ratio_is_figure_over_reference() -> None:
    m = Measurement("g", "c", "GB/s", 2.0, "ref", 8.0)
    assert m.ratio == 0.25
    assert m.as_json()["ratio"] == 0.25


# --- Against a real server ----------------------------------------------------------------------


@pytest.fixture
async def bench(tmp_path: Path, host: HostReference) -> AsyncIterator[Bench]:
    socket = tmp_path / "vdsa.sock"
    async with server_process(socket, tmp_path / "server.log") as process, \
            VfioUserClient.connect(socket) as client:
        with GuestMemory(MEMORY, MEMORY_SIZE) as memory:
            bench = Bench(DsaDriver(client, memory), CpuClock(process.pid), host,
                          BenchPlan(0.05))
            await bench.set_up()
            yield bench


async def test_a_stream_counts_only_checked_completions(bench: Bench) -> None:
    work = Work(DsaOpcode.MEMMOVE, 4 * KiB, {"src_addr": SRC, "dst_addr": dest(0),
                                              "xfer_size": 4 * KiB})
    result = await bench.throughput(work)
    assert result.completed > 0
    assert bench.memory.read(dest(0), 4 * KiB) == bench.memory.read(SRC, 4 * KiB)
    assert result.server_cpu >= 0


async def test_a_wrong_device_result_is_an_error_not_a_figure(bench: Bench) -> None:
    bench.host.time_ns(HostOp.CRC32C, 0, bench.address(SRC, 4 * KiB), 4 * KiB, 1)
    right = ~bench.host.result() & 0xFFFF_FFFF
    work = Work(DsaOpcode.CRCGEN, 4 * KiB, {"src_addr": SRC, "xfer_size": 4 * KiB},
                _crc_check(right ^ 1))
    with pytest.raises(BenchError, match="CRC"):
        await bench.throughput(work)


async def test_the_dma_map_case_leaves_nothing_mapped(bench: Bench) -> None:
    """Every pair's unmap removes its map: afterwards a descriptor to that IOVA faults."""
    measurement = await dma_map_case(bench)
    assert measurement.value > 0
    assert measurement.extra["completed"] > 0
    work = Work(DsaOpcode.MEMMOVE, 64, {"src_addr": DMA_MAP_IOVA, "dst_addr": dest(0),
                                        "xfer_size": 64})
    with pytest.raises(BenchError, match="completion status 0x3"):
        await bench.throughput(work)


async def test_a_failed_descriptor_is_an_error_not_a_figure(bench: Bench) -> None:
    unmapped = MEMORY + MEMORY_SIZE
    work = Work(DsaOpcode.MEMMOVE, 64, {"src_addr": unmapped, "dst_addr": dest(0),
                                        "xfer_size": 64})
    with pytest.raises(BenchError, match="completion status 0x3"):
        await bench.throughput(work)


# --- The command ----------------------------------------------------------------------------------

HARNESS_CASES = {
    "memmove": [f"memmove {s}" for s in ("64 B", "4 KiB", "64 KiB", "1 MiB")],
    "operations": [f"{op} {s}" for s in ("4 KiB", "1 MiB")
                   for op in ("fill", "compare", "CRC32C", "copy with CRC32C", "DIF insert",
                              "DIF check")],
    "batch": ["batch of 32 x 4 KiB memmove"],
    "vIOMMU": ["DMA_MAP + DMA_UNMAP of a 4 KiB page"],
    "latency": [f"latency 64 B memmove, {mode}, {p}" for mode in ("interrupt", "polling")
                for p in ("p50", "p99")],
    "scaling": [f"memmove {s} on {n}" for s in ("64 KiB", "1 MiB")
                for n in ("1 WQ", "2 WQs", "4 WQs")],
    "memmove (mapped)": [f"memmove {s} (mapped)" for s in ("64 B", "4 KiB", "64 KiB", "1 MiB")],
    "operations (mapped)": [f"{op} {s} (mapped)" for s in ("4 KiB", "1 MiB")
                            for op in ("fill", "compare", "CRC32C", "copy with CRC32C",
                                       "DIF insert", "DIF check")],
    "latency (mapped)": [f"latency 64 B memmove, {mode}, {p} (mapped)"
                         for mode in ("interrupt", "polling") for p in ("p50", "p99")],
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                                 Path]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "vdsa_server", "bench", "--seconds", "0.05", "--json",
         str(out / "bench.json"), "--plot", str(out / "bench.png"), "--log-dir", str(out)],
        capture_output=True, text=True, timeout=600, check=False, env=vdsa_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def test_bench_json_has_every_case_with_its_reference_and_ratio(
        bench_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = bench_run
    document = json.loads((out / "bench.json").read_text())
    found: dict[str, list[str]] = {}
    for m in document["measurements"]:
        found.setdefault(m["group"], []).append(m["case"])
        assert m["value"] > 0, m
        assert m["reference_value"] > 0, m
        assert m["ratio"] == pytest.approx(m["value"] / m["reference_value"]), m
        if m["unit"] == "GB/s":
            assert m["extra"]["completed"] > 0, m
            assert m["extra"]["server_cpu_us_per_op"] >= 0, m
    assert found == HARNESS_CASES
    assert document["machine"]["cpus"] >= 1
    assert len(document["versions"]["git"]) >= 40
    for name in ("python", "trio", "engine", "libvfio-user"):
        assert document["versions"][name]
    assert document["plan"] == {"seconds": 0.05, "guest": False}


def test_bench_prints_a_table_row_per_case_and_writes_a_png(
        bench_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = bench_run
    lines = done.stdout.splitlines()
    for cases in HARNESS_CASES.values():
        for case in cases:
            assert any(line.startswith(case + " ") for line in lines), case
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "server.log").exists()


def test_bench_refuses_a_non_positive_duration() -> None:
    done = subprocess.run([sys.executable, "-m", "vdsa_server", "bench", "--seconds", "0"],
                          capture_output=True, text=True, check=False, env=vdsa_env())
    assert done.returncode == 2
    assert "not a positive number" in done.stderr


def test_git_revision_without_git_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    from vdsa_server.bench import report

    monkeypatch.setenv("PATH", "/nonexistent")
    assert report.git_revision() == "unknown"
