# vdsa demo, run inside the guest by `vdsa demo`: the platform check
# (MOVDIR64B, the stock idxd driver loads), then the virtual DSA configured
# and used through the stock driver and accel-config, then copying memory for
# the kernel's dmatest client: a short run (2 threads x 250 copies), as the
# boot tests run the full one.
sh /vdsa/platform-check.sh
platform=$?
echo
sh /vdsa/dsa-configure.sh
dsa=$?
echo
sh /vdsa/dmatest.sh 2 250
dmatest=$?
[ "$platform" -eq 0 ] && [ "$dsa" -eq 0 ] && [ "$dmatest" -eq 0 ]
