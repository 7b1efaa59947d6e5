# vdsa DPDK, run inside the guest: DPDK's own test of its dmadev library
# (dpdk-test dmadev_autotest) drives the virtual DSA through DPDK's idxd
# driver, a user-space client independent of the kernel's idxd driver (which
# is never loaded here).  Needs the image's DPDK archive (vdsa boot --with dpdk).
#
# Usage: sh dpdk-dmadev.sh [pa|va|auto [RUNS [QUEUES]]]
#   pa    uio_pci_generic, IOVA as physical addresses (no vIOMMU);
#   va    vfio-pci behind the vIOMMU (vdsa boot --iommu legacy), IOVA as
#         virtual addresses;
#   auto  (default) va if the guest has an IOMMU, else pa;
# RUNS dmadev_autotest runs in this boot (default 1 for pa, 2 for va); QUEUES
# the WQs DPDK's idxd driver sets up, each a dmadev the test runs on (default
# all: the driver's own choice).
#
# Results, under dpdk.: mode, function, memory, check.* (each step), and for
# each run runN.status (ok, failed, skipped or none: dpdk-test's verdict line),
# runN.exit, runN.seconds, runN.iova (EAL's IOVA mode), runN.devices (one line
# "ID NAME" a dmadev), runN.cases (one line "DEVICE SUITE CASE STATUS" a
# sub-test, SUITE api or instance, STATUS as DPDK prints it: succeeded,
# skipped, failed, unsupported), runN.ran (the instance tests' "Running"
# lines), runN.skips (the reasons DPDK gave for skipping a test or a device).  Exits non-zero
# unless every step passes and every run says "Test OK".
mode=${1:-auto}
queues=${3:-}
if [ "$mode" = auto ]; then
    if [ -n "$(ls /sys/class/iommu 2>/dev/null)" ]; then mode=va; else mode=pa; fi
fi
case $mode in
    pa) driver=uio_pci_generic iova=pa runs=${2:-1} ;;
    va) driver=vfio-pci iova=va runs=${2:-2} ;;
    *) echo "usage: dpdk-dmadev.sh [pa|va|auto [RUNS [QUEUES]]]"; exit 2 ;;
esac
failed=0
check() {  # check NAME STATUS
    if [ "$2" -eq 0 ]; then vdsa-result "dpdk.check.$1" pass; else vdsa-result "dpdk.check.$1" fail; failed=1; fi
}
# 2 MiB pages: DPDK maps each segment it uses for DMA, and behind the vIOMMU
# every one is a vfio-user DMA region of the server's.
HUGEPAGES=128
HUGEPAGE_DIR=/sys/kernel/mm/hugepages/hugepages-2048kB
# A run of 8 WQs takes about a minute under TCG; this bounds one that stalls.
RUN_SECONDS=600

vdsa-result dpdk.mode "$mode"
[ -x /usr/bin/dpdk-test ]
check archive $?
[ "$failed" -eq 0 ] || { echo "no dpdk-test: boot with --with dpdk"; exit 1; }

function=""
for dev in /sys/bus/pci/devices/*; do
    if [ "$(cat "$dev/vendor")" = 0x8086 ] && [ "$(cat "$dev/device")" = 0x0b25 ]; then
        function=$dev
    fi
done
[ -n "$function" ]
check function $?
[ -n "$function" ] || exit 1
bdf=${function##*/}
vdsa-result dpdk.function "$bdf"

echo "$HUGEPAGES" > "$HUGEPAGE_DIR/nr_hugepages"
mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages &&
    [ "$(cat "$HUGEPAGE_DIR/nr_hugepages")" -eq "$HUGEPAGES" ]
check hugepages $?
grep -E '^(MemTotal|MemFree|HugePages_Total|HugePages_Free):' /proc/meminfo > /tmp/meminfo.txt
vdsa-result dpdk.memory < /tmp/meminfo.txt
# EAL keeps its runtime files in /var/run/dpdk, which this root lacks, and
# loads no driver from under a world-writable directory, as the initramfs's
# root is (the kernel's rootfs is 0777).
[ -e /var/run ] || { mkdir -p /var && ln -s /run /var/run; }
chmod 755 /

# The function must have no kernel driver but the one DPDK uses.
if [ -e "$function/driver" ]; then echo "$bdf" > "$function/driver/unbind"; fi
if [ "$mode" = pa ]; then
    modprobe uio_pci_generic
else
    [ -e "$function/iommu_group" ]
    check iommu_group $?
    # 6.1's vfio-pci refuses 8086:0b25 (DSA_SPR0 is on its denylist) unless told.
    modprobe vfio_iommu_type1 && modprobe vfio-pci disable_denylist=1
fi
check modprobe $?
echo "$driver" > "$function/driver_override" && echo "$bdf" > /sys/bus/pci/drivers_probe &&
    [ "$(basename "$(readlink "$function/driver")")" = "$driver" ]
check bind $?
[ "$failed" -eq 0 ] || exit 1

run_test() {  # run_test NAME: one dmadev_autotest, reported as dpdk.NAME.*
    name=$1
    out=/tmp/dpdk-$name
    start=$(date +%s)
    # -l 0-1: both vCPUs (the test's lcore and EAL's); -a: only this function,
    # with max_queues, the idxd driver's devargs, when asked for.
    # stdout (the test's) apart from stderr (EAL's log, and the test's reasons
    # for skipping): one is buffered, the other not, so together they interleave
    # mid-line.
    DPDK_TEST=dmadev_autotest timeout "$RUN_SECONDS" dpdk-test -l 0-1 -n 1 \
        --iova-mode="$iova" -a "$bdf${queues:+,max_queues=$queues}" \
        > "$out.raw" 2> "$out.log" </dev/null
    vdsa-result "dpdk.$name.exit" $?
    vdsa-result "dpdk.$name.seconds" $(($(date +%s) - start))
    cat "$out.log"
    # Each copy test iteration rewrites its progress line with "\r".
    tr '\r' '\n' < "$out.raw" | grep -v '^Ops submitted' > "$out.txt"
    cat "$out.txt"
    status=none
    grep -qx 'Test OK' "$out.txt" && status=ok
    grep -qx 'Test Failed' "$out.txt" && status=failed
    grep -qx 'Test Skipped' "$out.txt" && status=skipped
    vdsa-result "dpdk.$name.status" "$status"
    vdsa-result "dpdk.$name.iova" "$(sed -n "s/.*Selected IOVA mode '\([A-Z]*\)'.*/\1/p" "$out.log")"
    # "### Test dmadev infrastructure using 0 [NAME]" starts the API suite on a
    # dmadev (the skeleton's only, in older DPDK), "### Test dmadev instance 0
    # [NAME]" its instance tests; under each, " + TestCase [ 0] : CASE STATUS".
    sed -n 's/^### Test dmadev instance \([0-9]*\) \[\(.*\)\]$/\1 \2/p' "$out.txt" > "$out.devices"
    vdsa-result "dpdk.$name.devices" < "$out.devices"
    awk '
        # 22.11 names the skeleton "skeleton driver".
        /^### Test dmadev infrastructure using / { suite = "api"; device = ($NF == "driver") ? $(NF - 1) : $NF }
        /^### Test dmadev instance / { suite = "instance"; device = $NF }
        /^ \+ TestCase \[/ { sub(/^ \+ TestCase \[ *[0-9]+\] : /, ""); print device, suite, $0 }
    ' "$out.txt" | tr -d '[]' > "$out.cases"
    vdsa-result "dpdk.$name.cases" < "$out.cases"
    grep '^DMA Dev [0-9]*: Running ' "$out.txt" | sed 's/ *$//' > "$out.ran"
    vdsa-result "dpdk.$name.ran" < "$out.ran"
    grep -e 'skipping' -e 'not initializing' "$out.log" > "$out.skips"
    vdsa-result "dpdk.$name.skips" < "$out.skips"
    [ "$status" = ok ]
    check "$name" $?
}

run=1
while [ "$run" -le "$runs" ]; do
    run_test "run$run"
    run=$((run + 1))
done
exit $failed
