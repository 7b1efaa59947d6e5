# vdsa dmatest behind a guest vIOMMU (vdsa boot --iommu legacy|scalable): DMA
# remapping is on and the DSA function sits in an IOMMU group, so every buffer
# the idxd driver maps becomes a vfio-user DMA_MAP (and DMA_UNMAP) of its own;
# then dmatest.sh's verified copies, fewer than its defaults (each copy costs
# map and unmap round trips).
#
# Usage: sh dmatest-iommu.sh [THREADS [ITERATIONS]] (default 2 x 400), with
# dmatest.sh at /vdsa/dmatest.sh (vdsa boot --file dmatest.sh).
threads=${1:-2}
iterations=${2:-400}
failed=0
report() {  # report NAME STATUS
    if [ "$2" -eq 0 ]; then vdsa-result "iommu.check.$1" pass; else vdsa-result "iommu.check.$1" fail; failed=1; fi
}
[ -n "$(ls /sys/class/iommu 2>/dev/null)" ]; report remapping $?
function=""
for dev in /sys/bus/pci/devices/*; do
    if [ "$(cat "$dev/vendor")" = 0x8086 ] && [ "$(cat "$dev/device")" = 0x0b25 ]; then
        function=$dev
    fi
done
[ -n "$function" ] && [ -e "$function/iommu_group" ]; report group $?
vdsa-result iommu.mode "$(dmesg | grep -o 'DMAR: IOMMU enabled\|Intel-IOMMU force enabled\|scalable mode' | sort -u | tr '\n' ';')"
sh /vdsa/dmatest.sh "$threads" "$iterations" || failed=1
exit $failed
