# vdsa guest benchmark, run inside the guest by `vdsa bench --guest`: dmatest's
# throughput on the idxd channel (whole-buffer copies, not verified; dmatest.sh
# in bench mode), then this guest CPU's memcpy of the same buffer size
# (memcpy-bench), both in the same boot.  The figures are reported with
# vdsa-result as bench.dmatest.* (threads, tests, failures, iops, kbps, ...)
# and bench.memcpy.* (size, copies, bytes, seconds, iops, kbps), KB being 1024
# bytes for both as dmatest counts; the steps as bench.check.*.  Then, unless
# PORTAL_SECONDS is 0, a user-space submitter at full rate (portal-bench: 64 B
# and 4 KiB memmoves stored with MOVDIR64B into wq0.0's portal through sysfs
# resource2, beside this CPU's memcpy of the same size), reported as
# bench.portal.SIZE.*.  Exits non-zero if any part fails.
#
# Usage: sh bench.sh [THREADS [ITERATIONS [SIZE [COPIES [PORTAL_SECONDS]]]]],
# with dmatest.sh at /vdsa/dmatest.sh (`vdsa boot --script bench.sh --file
# dmatest.sh`): THREADS dmatest threads of ITERATIONS copies each (default 4 x
# 2000), SIZE-byte buffers (default 16384), COPIES memcpys (default 50000): a
# few seconds each under TCG; PORTAL_SECONDS for each submitter size and its
# memcpy (default 2; the submitter writes by guest-physical address, so not
# behind a vIOMMU).
threads=${1:-4}
iterations=${2:-2000}
size=${3:-16384}
copies=${4:-50000}
portal_seconds=${5:-2}

sh /vdsa/dmatest.sh "$threads" "$iterations" bench "$size"
dmatest=$?
echo

memcpy-bench "$size" "$copies" > /tmp/memcpy-bench.txt
memcpy=$?
cat /tmp/memcpy-bench.txt
while read -r name value; do
    vdsa-result "bench.memcpy.$name" "$value"
done < /tmp/memcpy-bench.txt
if [ "$memcpy" -eq 0 ]; then vdsa-result bench.check.memcpy pass; else vdsa-result bench.check.memcpy fail; fi
[ "$dmatest" -eq 0 ] && [ "$memcpy" -eq 0 ] || exit 1
[ "$portal_seconds" -eq 0 ] && exit 0

# dmatest.sh's bench mode ends with dsa0 disabled: enable wq0.0 again.
sh /vdsa/dmatest.sh '' '' setup > /tmp/portal-setup.txt || { cat /tmp/portal-setup.txt; exit 1; }
portal=0
for bytes in 64 4096; do
    portal-bench "$bytes" "$portal_seconds" > "/tmp/portal-$bytes.txt"
    status=$?
    cat "/tmp/portal-$bytes.txt"
    while read -r name value; do
        vdsa-result "bench.portal.$bytes.$name" "$value"
    done < "/tmp/portal-$bytes.txt"
    if [ "$status" -eq 0 ]; then vdsa-result "bench.check.portal_$bytes" pass; else vdsa-result "bench.check.portal_$bytes" fail; portal=1; fi
done
exit $portal
