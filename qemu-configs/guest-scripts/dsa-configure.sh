# vdsa DSA check, run inside the guest: the stock idxd driver probes the
# virtual DSA, accel-config configures a group, an engine and a dedicated
# kernel WQ, enables them, cycles them through a saved configuration, and the
# device survives unbinding and rebinding the driver.  Exits non-zero if a
# step fails; every step is reported with vdsa-result.
failed=0
check() {  # check NAME STATUS
    if [ "$2" -eq 0 ]; then vdsa-result "check.$1" pass; else vdsa-result "check.$1" fail; failed=1; fi
}
states() {  # the device's and wq0.0's state, as one word each
    echo "$(cat /sys/bus/dsa/devices/dsa0/state) $(cat /sys/bus/dsa/devices/wq0.0/state)"
}
DSA=/sys/bus/dsa/devices/dsa0
PCI=$(grep -l 0x0b25 /sys/bus/pci/devices/*/device | head -n1 | xargs -r dirname | xargs -r basename)
vdsa-result pci.dsa "${PCI:-none}"
[ -n "$PCI" ]
check pci_function $?

modprobe idxd
check modprobe_idxd $?
[ -d "$DSA" ]
check dsa0_present $?
for attr in version max_groups max_work_queues max_engines max_work_queues_size \
        max_batch_size max_transfer_size op_cap configurable; do
    vdsa-result "dsa0.$attr" "$(cat "$DSA/$attr")"
done

# Since 6.7 a kernel WQ must name its driver; 6.1 has no driver_name.
driver_name=
[ -e /sys/bus/dsa/devices/wq0.0/driver_name ] && driver_name=--driver-name=dmaengine
accel-config config-engine dsa0/engine0.0 --group-id=0 &&
accel-config config-wq dsa0/wq0.0 --group-id=0 --mode=dedicated --type=kernel \
    --name=vdsa-demo --priority=10 --wq-size=16 $driver_name
check configure $?
accel-config enable-device dsa0 && accel-config enable-wq dsa0/wq0.0
check enable $?
vdsa-result states.enabled "$(states)"
accel-config list | tee /tmp/list.json
vdsa-result accel_config.list < /tmp/list.json
ls /sys/class/dma/ | tee /tmp/dma.txt
vdsa-result dma.channels < /tmp/dma.txt

accel-config save-config -s /tmp/dsa.conf
check save_config $?
accel-config disable-wq dsa0/wq0.0 && accel-config disable-device dsa0
check disable $?
vdsa-result states.disabled "$(states)"
accel-config load-config -c /tmp/dsa.conf -e
check reenable $?
vdsa-result states.reenabled "$(states)"

# Disable before unbinding: Debian's 6.1 idxd_remove() walks WQs it has already
# freed when dsa0 is still enabled (a use-after-free that slub_debug shows in
# idxd_device_drv_remove), whatever the device does.
accel-config disable-wq dsa0/wq0.0 && accel-config disable-device dsa0
echo "$PCI" > /sys/bus/pci/drivers/idxd/unbind
check unbind $?
[ ! -d "$DSA" ]
check dsa0_gone $?
echo "$PCI" > /sys/bus/pci/drivers/idxd/bind
check rebind $?
accel-config load-config -c /tmp/dsa.conf -e
check enable_after_rebind $?
vdsa-result states.after_rebind "$(states)"
exit $failed
