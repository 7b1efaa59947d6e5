# vdsa demo, run inside the guest by `vdsa demo`: the platform check
# (MOVDIR64B, the stock idxd driver loads), then the virtual DSA configured
# and used through the stock driver and accel-config.
sh /vdsa/platform-check.sh
platform=$?
echo
sh /vdsa/dsa-configure.sh
dsa=$?
[ "$platform" -eq 0 ] && [ "$dsa" -eq 0 ]
