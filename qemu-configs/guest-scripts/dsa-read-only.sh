# vdsa read-only-config check ("1dwq-v1"), run inside the guest with a server
# started from qemu-configs/devices/read-only-1dwq.toml: the driver loads the
# preset WQ from the device and enables the device itself; the guest sets
# only the WQ's type and name and enables the WQ.
failed=0
check() {  # check NAME STATUS
    if [ "$2" -eq 0 ]; then vdsa-result "check.$1" pass; else vdsa-result "check.$1" fail; failed=1; fi
}
WQ=/sys/bus/dsa/devices/wq0.0
modprobe idxd
check modprobe_idxd $?
vdsa-result dsa0.configurable "$(cat /sys/bus/dsa/devices/dsa0/configurable)"
for attr in size mode group_id priority; do
    vdsa-result "wq0.0.$attr" "$(cat "$WQ/$attr")"
done
# Since 6.7 a kernel WQ must name its driver; 6.1 has no driver_name.
driver_name=
[ -e "$WQ/driver_name" ] && driver_name=--driver-name=dmaengine
accel-config config-wq dsa0/wq0.0 --type=kernel --name=vdsa-1dwq $driver_name
check set_type_and_name $?
# A read-only device is enabled by the driver as it binds, like the mdev's.
vdsa-result dsa0.state_at_probe "$(cat /sys/bus/dsa/devices/dsa0/state)"
accel-config enable-wq dsa0/wq0.0
check enable $?
vdsa-result states "$(cat /sys/bus/dsa/devices/dsa0/state) $(cat "$WQ/state")"
ls /sys/class/dma/ > /tmp/dma.txt
vdsa-result dma.channels < /tmp/dma.txt
exit $failed
