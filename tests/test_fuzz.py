"""The protocol fuzzer in CI: a bounded run with a fixed seed against the sanitized server
must find nothing, and the fuzzer must notice a server that dies under it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import vdsa_env
from vdsa_server.fuzz.machine import ProtocolMachine, Tally
from vdsa_server.fuzz.run import run_fuzz

CI_SECONDS = 90.0  # "a few minutes" of the run's budget; `vdsa fuzz --seconds N` for more
CI_SEED = 0


def test_a_fixed_seed_run_finds_nothing(tmp_path: Path) -> None:
    report = run_fuzz(tmp_path, seconds=CI_SECONDS, base_seed=CI_SEED)
    (tmp_path / "report.txt").write_text("\n".join(report.lines()) + "\n")
    print("\n".join(report.lines()))
    assert report.failure is None, "\n".join(report.lines())
    # It reached what it is there for: refusals of every kind it sends, and a live server.
    commands = {command for command, label, _ in report.tally.outcomes if label == "invalid"}
    assert {"DMA_MAP", "DMA_UNMAP", "REGION_READ", "REGION_WRITE", "DEVICE_SET_IRQS",
            "DEVICE_GET_REGION_INFO", "DEVICE_GET_IRQ_INFO", "header"} <= commands
    assert report.tally.examples > 100


def test_a_server_that_dies_under_the_fuzzer_is_reported(tmp_path: Path) -> None:
    killed: list[int] = []

    def kill_after_the_first_round(_: Tally) -> None:
        if not killed:
            killed.append(ProtocolMachine.target.pid)
            os.kill(ProtocolMachine.target.pid, signal.SIGKILL)

    report = run_fuzz(tmp_path, seconds=30.0, base_seed=CI_SEED,
                      progress=kill_after_the_first_round)
    assert killed
    assert report.failure is not None
    assert f"ended with {-signal.SIGKILL}" in report.failure


def test_fuzz_command_writes_its_report(tmp_path: Path) -> None:
    report = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, "-m", "vdsa_server", "fuzz", "--seconds", "1",
                           "--seed", "7", "--json", str(report), "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=vdsa_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no failure" in done.stdout
    written = json.loads(report.read_text())
    assert written["seed"] == 7
    assert written["examples"] > 0
    assert written["failure"] is None
