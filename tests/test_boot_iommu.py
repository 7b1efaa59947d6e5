"""Boot tests with a guest vIOMMU in front of the virtual DSA (`vdsa boot --iommu`): every
buffer the stock idxd driver maps becomes a vfio-user DMA_MAP and every unmap a DMA_UNMAP,
in legacy and in scalable mode.  Verified dmatest copies must all pass: before the
libvfio-user patches, unmaps of ranges covering several maps left stale translations and
maps beyond 16 were refused, and 1768 of 3000 copies failed.

One boot per mode through `vdsa boot --serve`, shared by the tests."""

from __future__ import annotations

import pytest

from tests.conftest import CliBoot, run_cli
from tests.test_boot_device import SCRIPTS, results
from tests.test_boot_dmatest import KERNEL_TROUBLE, dmesg_lines
from vdsa_server.launch.launcher import Iommu

pytestmark = pytest.mark.boot

# dmatest-iommu.sh's defaults.
THREADS = 2
ITERATIONS = 400


@pytest.fixture(scope="module", params=list(Iommu), ids=lambda mode: mode.value)
def behind_iommu(tmp_path_factory: pytest.TempPathFactory,
                 request: pytest.FixtureRequest) -> CliBoot:
    mode: Iommu = request.param
    return run_cli("boot", "--serve", "--iommu", mode.value,
                   "--script", str(SCRIPTS / "dmatest-iommu.sh"),
                   "--file", str(SCRIPTS / "dmatest.sh"),
                   log_dir=tmp_path_factory.mktemp(f"iommu-{mode.value}"))


def test_dma_remapping_is_on_for_the_function(behind_iommu: CliBoot) -> None:
    found = results(behind_iommu)
    assert found.get("iommu.check.remapping") == "pass", behind_iommu.context()
    assert found.get("iommu.check.group") == "pass", behind_iommu.context()
    assert "DMAR: IOMMU enabled" in found.get("iommu.mode", ""), behind_iommu.context()


def test_scalable_mode_is_what_was_asked(behind_iommu: CliBoot,
                                         request: pytest.FixtureRequest) -> None:
    scalable = "scalable mode" in results(behind_iommu).get("iommu.mode", "")
    wanted = request.node.callspec.params["behind_iommu"] is Iommu.SCALABLE
    assert scalable == wanted, behind_iommu.context()


@pytest.mark.parametrize("run", ["run1", "run2"])
def test_every_copy_completes_and_verifies(behind_iommu: CliBoot, run: str) -> None:
    found = results(behind_iommu)
    assert found.get(f"dmatest.check.{run}") == "pass", behind_iommu.context()
    assert found[f"dmatest.{run}.tests"] == str(THREADS * ITERATIONS), behind_iommu.context()
    assert found[f"dmatest.{run}.failures"] == "0", behind_iommu.context()


def test_the_guest_stays_quiet(behind_iommu: CliBoot) -> None:
    trouble = [line for line in dmesg_lines(behind_iommu)
               if any(mark in line for mark in (*KERNEL_TROUBLE, "DMAR: DRHD: handling fault"))]
    assert not trouble, f"{trouble} {behind_iommu.context()}"
    assert behind_iommu.returncode == 0, behind_iommu.context()
