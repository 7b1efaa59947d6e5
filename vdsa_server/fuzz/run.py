"""A fuzzing run: one server, hypothesis' state machine in rounds of a fixed number of
examples, each round seeded from the run's seed, until the time is up; then the checks that
need the whole run (memory growth) and the report."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from vdsa_server.fuzz.machine import (
    ProtocolMachine,
    Tally,
    check_serves,
    discover,
    outcome_lines,
)
from vdsa_server.fuzz.target import FuzzTarget

EXAMPLES_PER_ROUND = 20
STEPS_PER_EXAMPLE = 40
# Growth of the server's memory from the first quarter of the run to the last that fails it:
# far above the sanitizers' bounded quarantine, far below a leak per message.
RSS_GROWTH_LIMIT = 32 << 20
_NUMBERS = re.compile(r"0x[0-9a-f]+|\d+")


@dataclass
class FuzzReport:
    seed: int
    seconds: float
    rounds: int
    tally: Tally
    vfu_paths: list[str]  # distinct libvfio-user log messages, numbers blanked
    rss_growth: int
    failure: str | None

    def lines(self) -> list[str]:
        head = [
            f"vdsa fuzz: seed {self.seed}, {self.seconds:.0f} s, {self.rounds} rounds, "
            f"{self.tally.examples} examples, {self.tally.messages} messages",
            f"outcome classes reached: {len(self.tally.outcomes)}; distinct libvfio-user "
            f"paths logged: {len(self.vfu_paths)}",
            f"server memory growth, first quarter to last: {self.rss_growth / 2**20:.1f} MiB",
            "",
            f"{'message':<24} {'label':<9} {'outcome':<12} count",
            *outcome_lines(self.tally),
        ]
        if not self.failure:
            return [*head, "", "no failure"]
        steps = [f"  step {n}: {step}" for n, step in enumerate(self.tally.failing_steps, 1)]
        return [*head, "", f"FAILED: {self.failure}", "the failing example's steps:", *steps]

    def as_json(self) -> dict[str, object]:
        return {
            "seed": self.seed, "seconds": self.seconds, "rounds": self.rounds,
            "examples": self.tally.examples, "messages": self.tally.messages,
            "outcomes": [{"message": c, "label": label, "outcome": o, "count": n}
                         for (c, label, o), n in sorted(self.tally.outcomes.items())],
            "vfu_paths": self.vfu_paths, "rss_growth_bytes": self.rss_growth,
            "failure": self.failure, "failing_steps": self.tally.failing_steps,
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n")


def _vfu_paths(log: Path) -> list[str]:
    found = set()
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == "vfu.log":
            found.add(_NUMBERS.sub("N", str(event.get("msg", ""))))
    return sorted(found)


def _growth(samples: list[int]) -> int:
    if len(samples) < 8:
        return 0
    quarter = len(samples) // 4
    return int(statistics.median(samples[-quarter:]) - statistics.median(samples[:quarter]))


def run_fuzz(work_dir: Path, *, seconds: float, base_seed: int,
             progress: Callable[[Tally], None] | None = None) -> FuzzReport:
    """Fuzz a fresh server in ``work_dir`` for about ``seconds`` (whole rounds; at least
    one).  Failures are reported, not raised."""
    work_dir.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    failure: str | None = None
    rounds = 0
    started = time.monotonic()
    with FuzzTarget(work_dir) as target:
        check_serves(target)
        ProtocolMachine.target = target
        ProtocolMachine.tally = tally
        ProtocolMachine.region_sizes = discover(target)
        check_serves(target)
        ProtocolMachine.baseline_fds = target.sample().open_fds
        # No shrinking: a replay meets a server whose state has moved on, so it can end
        # differently; the failing example is reported as it ran, with its steps.
        config = settings(max_examples=EXAMPLES_PER_ROUND,
                          stateful_step_count=STEPS_PER_EXAMPLE, deadline=None, database=None,
                          phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))
        while failure is None and (rounds == 0 or time.monotonic() - started < seconds):
            machine = seed(base_seed + rounds)(type("Round", (ProtocolMachine,), {}))
            rounds += 1
            try:
                run_state_machine_as_test(machine, settings=config)
            except Exception as failed:  # a FuzzFailure, a TargetDied, or what hypothesis raised
                first = tally.failure or repr(failed)
                failure = f"round {rounds} (seed {base_seed + rounds - 1}): {first}"
            if progress is not None:
                progress(tally)
        report = target.sanitizer_report()
        if report and failure is None:
            failure = f"sanitizer report:\n{report}"
    growth = _growth(tally.rss)
    if failure is None and growth > RSS_GROWTH_LIMIT:
        failure = (f"the server's memory grew by {growth / 2**20:.1f} MiB over the run "
                   f"(limit {RSS_GROWTH_LIMIT >> 20} MiB)")
    return FuzzReport(base_seed, time.monotonic() - started, rounds, tally,
                      _vfu_paths(target.log_path), growth, failure)
