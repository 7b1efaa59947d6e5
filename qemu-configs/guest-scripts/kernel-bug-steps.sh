# vdsa kernel-bug steps, run inside the guest: configure and enable dsa0 with a
# dedicated kernel WQ, then take one step that a stock kernel has mishandled:
#   unbind   unbind idxd from the PCI function while dsa0 is enabled, bind again
#   disable  disable dsa0 (a device without an event log)
# Each step is reported with vdsa-result; the test reads the oops, if any, in dmesg.
# Usage: sh kernel-bug-steps.sh unbind|disable
step=$1
failed=0
check() {  # check NAME STATUS
    if [ "$2" -eq 0 ]; then vdsa-result "check.$1" pass; else vdsa-result "check.$1" fail; failed=1; fi
}
DSA=/sys/bus/dsa/devices/dsa0
PCI=$(grep -l 0x0b25 /sys/bus/pci/devices/*/device | head -n1 | xargs -r dirname | xargs -r basename)
modprobe idxd
check modprobe_idxd $?
# Since 6.7 a kernel WQ must name its driver; 6.1 has no driver_name.
driver_name=
[ -e /sys/bus/dsa/devices/wq0.0/driver_name ] && driver_name=--driver-name=dmaengine
accel-config config-engine dsa0/engine0.0 --group-id=0 &&
accel-config config-wq dsa0/wq0.0 --group-id=0 --mode=dedicated --type=kernel \
    --name=vdsa-bug --priority=10 --wq-size=16 $driver_name &&
accel-config enable-device dsa0 && accel-config enable-wq dsa0/wq0.0
check enable $?
case $step in
    unbind)
        echo "$PCI" > /sys/bus/pci/drivers/idxd/unbind
        check unbind $?
        echo "$PCI" > /sys/bus/pci/drivers/idxd/bind
        check rebind $?
        [ -d "$DSA" ]
        check dsa0_back $?
        ;;
    disable)
        accel-config disable-device dsa0
        check disable $?
        vdsa-result dsa0.state "$(cat "$DSA/state")"
        ;;
    *)
        echo "unknown step '$step'"
        exit 2
        ;;
esac
exit $failed
