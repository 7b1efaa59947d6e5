# vdsa guest benchmark, run inside the guest by `vdsa bench --guest`: dmatest's
# throughput on the idxd channel (whole-buffer copies, not verified; dmatest.sh
# in bench mode), then this guest CPU's memcpy of the same buffer size
# (memcpy-bench), both in the same boot.  The figures are reported with
# vdsa-result as bench.dmatest.* (threads, tests, failures, iops, kbps, ...)
# and bench.memcpy.* (size, copies, bytes, seconds, iops, kbps), KB being 1024
# bytes for both as dmatest counts; the steps as bench.check.*.  Exits non-zero
# if either half fails.
#
# Usage: sh bench.sh [THREADS [ITERATIONS [SIZE [COPIES]]]], with dmatest.sh at
# /vdsa/dmatest.sh (`vdsa boot --script bench.sh --file dmatest.sh`): THREADS
# dmatest threads of ITERATIONS copies each (default 4 x 2000), SIZE-byte
# buffers (default 16384), COPIES memcpys (default 50000): a few seconds each
# under TCG.
threads=${1:-4}
iterations=${2:-2000}
size=${3:-16384}
copies=${4:-50000}

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
[ "$dmatest" -eq 0 ] && [ "$memcpy" -eq 0 ]
