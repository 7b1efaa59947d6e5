"""The project's own standards, enforced with the tests: ruff and strict mypy, and the
README's list of kernel bugs kept to the tests'."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.kernel_bugs import KNOWN_BUGS
from vdsa_server.paths import REPO_ROOT


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=False)


def test_ruff_is_clean() -> None:
    done = run_tool("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    done = run_tool("mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_lists_every_known_kernel_bug() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Kernel bugs found with vdsa", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \*\*([\w-]+)\*\*", section, re.MULTILINE)
    assert listed == [bug.name for bug in KNOWN_BUGS]
