# vdsa platform check, run inside the guest by `vdsa boot --script`.
# Shows that the guest CPU executes MOVDIR64B, that the stock idxd driver
# loads, and which PCI functions the guest sees (a vfio-user device among
# them when `--socket` is given).  Exits non-zero if a check fails.
failed=0
check() {  # check NAME STATUS: report one check, remember failures
    if [ "$2" -eq 0 ]; then vdsa-result "check.$1" pass; else vdsa-result "check.$1" fail; failed=1; fi
}

echo "guest kernel: $(uname -r)"
grep -qw movdir64b /proc/cpuinfo
check cpuinfo_movdir64b $?

movdir64b-test
check movdir64b_instruction $?

modprobe idxd
check modprobe_idxd $?
lsmod | grep '^idxd' | sed 's/^/loaded module: /'
if dmesg | grep -q 'failed to load without MOVDIR64B'; then refused=1; else refused=0; fi
check idxd_no_movdir64b_refusal $refused

for dev in /sys/bus/pci/devices/*; do
    echo "$(basename "$dev") $(cat "$dev/vendor"):$(cat "$dev/device") class $(cat "$dev/class")"
done > /tmp/pci.txt
cat /tmp/pci.txt
vdsa-result pci.functions < /tmp/pci.txt
exit $failed
