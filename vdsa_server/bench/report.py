"""What ``vdsa bench`` prints and writes: a console table, JSON with the machine, the versions
and every figure, and a PNG chart of the ratios."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from vdsa_server.bench.results import Measurement
from vdsa_server.paths import REPO_ROOT


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def machine() -> dict[str, Any]:
    uname = platform.uname()
    return {"hostname": uname.node, "kernel": uname.release, "arch": uname.machine,
            "cpu": _cpu_model(), "cpus": os.cpu_count(), "memory_bytes": _memory_bytes(),
            "load_average": os.getloadavg()}


def git_revision() -> str:
    """HEAD of the checkout, with ``-dirty`` when the tree has uncommitted changes."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                                  text=True, check=False)
        except FileNotFoundError:  # no git: the figures still count, without a revision
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    revision = git("rev-parse", "HEAD") or "unknown"
    return revision + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def versions(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    found = {"python": sys.version.split()[0], "git": git_revision()}
    for package in ("vdsa", "trio", "structlog"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found | dict(extra or {})


def report(measurements: Sequence[Measurement], context: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document: when, where, with what, and every figure with its ratio."""
    return {"created": datetime.now(UTC).isoformat(timespec="seconds"), **context,
            "measurements": [m.as_json() for m in measurements]}


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def _figure(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio(m: Measurement) -> str:
    ratio = m.ratio
    if m.lower_is_better:
        return f"{ratio:,.0f}x the time" if ratio >= 10 else f"{ratio:.2f}x the time"
    return f"{ratio * 100:.3g}%" if ratio < 10 else f"{ratio:.1f}x"


def table(measurements: Sequence[Measurement]) -> str:
    """One line a measurement: case, figure, operations per second and server CPU time per
    operation when known, reference and ratio; a blank line between groups."""
    header = ("case", "figure", "ops/s", "server CPU/op", "reference", "ratio")
    rows: list[tuple[str, ...]] = []
    group = None
    for m in measurements:
        if group is not None and m.group != group:
            rows.append(("",) * len(header))
        group = m.group
        ops = m.extra.get("ops_per_s")
        cpu = m.extra.get("server_cpu_us_per_op")
        rows.append((m.case, f"{_figure(m.value)} {m.unit}",
                     _figure(ops) if ops is not None else "",
                     f"{_figure(cpu)} us" if cpu is not None else "",
                     f"{_figure(m.reference_value)} {m.unit} {m.reference}", _ratio(m)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_plot(path: Path, measurements: Sequence[Measurement], title: str) -> None:
    """A horizontal bar a measurement: its ratio to its reference on a log scale, one colour
    a group, the figure written beside each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys(m.group for m in measurements))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(measurements) + 1.8))
    positions = range(len(measurements))[::-1]
    for y, m in zip(positions, measurements, strict=True):
        ax.barh(y, m.ratio, color=colours(groups.index(m.group) % 10))
        ax.text(m.ratio * 1.08, y, f"{_figure(m.value)} {m.unit} ({_ratio(m)})",
                va="center", fontsize=7)
    ax.set_yticks(list(positions), [f"{m.case}\nvs {m.reference}" for m in measurements],
                  fontsize=6)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("figure / reference (log scale; 1 = the reference; latencies: times "
                  "the reference's time)")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=colours(i % 10), label=group)
                       for i, group in enumerate(groups)], loc="lower right", fontsize=7)
    lo = min(m.ratio for m in measurements)
    hi = max(m.ratio for m in measurements)
    ax.set_xlim(lo / 3, hi * 30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
