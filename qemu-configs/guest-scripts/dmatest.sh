# vdsa dmatest, run inside the guest: the stock idxd driver's dmaengine
# channel on a dedicated kernel WQ copies memory with the kernel's own DMA test
# client.  Every step and each run's summary lines and totals are reported with
# vdsa-result; exits non-zero if a step fails, a copy fails, or a run does not
# complete the tests requested.
#
# Usage: sh dmatest.sh [THREADS [ITERATIONS [MODE [SIZE]]]]: THREADS dmatest
# threads on the channel, each running ITERATIONS copies (default 4 x 1000),
# with a SIZE-byte test buffer (default 16384, dmatest's own).  MODE:
#   verify (default)  memcpy of random lengths at random offsets, every copy
#                     verified, then again after the WQ was disabled and
#                     enabled; results are named dmatest.*;
#   bench             one run of whole-buffer copies (norandom) that are not
#                     verified (noverify), for throughput (bench.sh); results
#                     are named bench.*;
#   setup             only loads the modules, configures dsa0 and wq0.0 and
#                     enables them, and leaves them enabled for another
#                     program's descriptors (portal-race.sh); results are
#                     named setup.*;
#   inflight          verify's first run, then verified copies without end:
#                     once they run, reports dmatest.inflight and waits for
#                     the host to kill or reset the guest under them (fault
#                     tests).
threads=${1:-4}
iterations=${2:-1000}
mode=${3:-verify}
size=${4:-16384}
case $mode in
    verify) results=dmatest noverify=N norandom=N first=run1 ;;
    bench) results=bench noverify=Y norandom=Y first=dmatest ;;
    setup) results=setup ;;
    inflight) results=dmatest noverify=N norandom=N first=run1 ;;
    *) echo "dmatest.sh: unknown mode '$mode' (verify, bench, setup or inflight)"; exit 2 ;;
esac
failed=0
check() {  # check NAME STATUS
    if [ "$2" -eq 0 ]; then vdsa-result "$results.check.$1" pass; else vdsa-result "$results.check.$1" fail; failed=1; fi
}
DSA=/sys/bus/dsa/devices/dsa0
WQ=/sys/bus/dsa/devices/wq0.0
PARAMS=/sys/module/dmatest/parameters
# The first channel of the first dmaengine device: wq0.0's.
CHANNEL=dma0chan0
# wq0.0's size, which is also how many descriptors the driver keeps for it.
WQ_SIZE=16
# 4 x 1000 copies take about 4 s under TCG: this bound is only for a run that
# stalls, and two runs at it still end within `vdsa boot`'s default 600 s.
RUN_SECONDS=120

disable_dsa0() {  # disable wq0.0 and dsa0, whichever is enabled
    if [ "$(cat "$WQ/state")" = enabled ]; then accel-config disable-wq dsa0/wq0.0 || return; fi
    if [ "$(cat "$DSA/state")" = enabled ]; then accel-config disable-device dsa0; fi
}
config_wq() {  # config_wq [OPTION...]: wq0.0 as a dedicated kernel WQ in group 0
    # Since 6.7 a kernel WQ must name its driver; 6.1 has no driver_name.
    if [ -e "$WQ/driver_name" ]; then set -- --driver-name=dmaengine "$@"; fi
    accel-config config-wq dsa0/wq0.0 --group-id=0 --mode=dedicated --type=kernel \
        --name=vdsa-dmatest --priority=10 "$@"
}
summaries() {  # the summary lines of the dmatest threads on $CHANNEL so far
    dmesg | sed -n "s/^\[[^]]*\] //; /^dmatest: $CHANNEL-copy[0-9]*: summary /p"
}
timeouts() {  # how many of those threads' copies timed out so far
    dmesg | grep -c "dmatest: $CHANNEL-copy[0-9]*: result #[0-9]*: 'test timed out'"
}
run_dmatest() {  # run_dmatest NAME: one dmatest run on $CHANNEL, reported as $results.NAME.*
    name=$1
    summaries_before=$(summaries | wc -l)
    timeouts_before=$(timeouts)
    # Naming the channel creates its threads with the parameters set so far.
    echo "$CHANNEL" > "$PARAMS/channel"
    check "$name.channel" $?
    vdsa-result "$results.$name.channel" "$(cat "$PARAMS/channel")"
    echo 1 > "$PARAMS/run" || { check "$name" 1; return; }
    start=$(date +%s)
    # Done when every thread has printed its summary and `run` reads N (which
    # also releases the channel).  A copy that times out keeps its idxd
    # descriptor for good (6.1 frees one only on completion), so after
    # $WQ_SIZE timeouts the threads sleep in idxd_alloc_desc() and never end.
    until [ "$(summaries | wc -l)" -ge $((summaries_before + threads)) ] &&
            [ "$(cat "$PARAMS/run")" = N ]; do
        if [ $(($(timeouts) - timeouts_before)) -ge "$WQ_SIZE" ]; then
            echo "dmatest $name: $WQ_SIZE copies timed out, the WQ has no descriptors left"
            break
        fi
        if [ $(($(date +%s) - start)) -ge "$RUN_SECONDS" ]; then
            echo "dmatest $name: not finished after $RUN_SECONDS s"
            break
        fi
        sleep 1
    done
    vdsa-result "$results.$name.seconds" $(($(date +%s) - start))
    summaries | tail -n +$((summaries_before + 1)) | tee "/tmp/dmatest-$name.txt"
    vdsa-result "$results.$name.summary" < "/tmp/dmatest-$name.txt"
    # Totals over the threads, from lines like "dmatest: dma0chan0-copy0:
    # summary 1000 tests, 0 failures 1234.56 iops 5678 KB/s (0)"; the threads
    # run side by side, so their rates add up.
    awk '{ n++; tests += $4; failures += $6; iops += $8; kbs += $10 }
        END { printf "%d %d %d %.2f %d\n", n, tests, failures, iops, kbs }' \
        "/tmp/dmatest-$name.txt" > "/tmp/dmatest-$name.totals"
    read -r count tests failures iops kbs < "/tmp/dmatest-$name.totals"
    vdsa-result "$results.$name.threads" "$count"
    vdsa-result "$results.$name.tests" "$tests"
    vdsa-result "$results.$name.failures" "$failures"
    vdsa-result "$results.$name.iops" "$iops"
    vdsa-result "$results.$name.kbps" "$kbs"
    [ "$count" -eq "$threads" ] && [ "$tests" -eq $((threads * iterations)) ] &&
        [ "$failures" -eq 0 ]
    check "$name" $?
}

modprobe idxd && modprobe dmatest
check modprobe $?
# demo.sh runs this after dsa-configure.sh, which leaves dsa0 enabled, and an
# enabled device's configuration is fixed: start from a disabled one.
disable_dsa0
accel-config config-engine dsa0/engine0.0 --group-id=0 && config_wq --wq-size="$WQ_SIZE"
check configure $?
accel-config enable-device dsa0 && accel-config enable-wq dsa0/wq0.0
check enable $?
ls /sys/class/dma/ > /tmp/dma.txt
vdsa-result "$results.dma_channels" < /tmp/dma.txt
[ "$mode" = setup ] && exit $failed

# verify: random lengths (1 to test_buf_size bytes) at random offsets, so
# copies are unaligned and cross pages; each copy's source and destination
# buffers are verified in full.  bench: every copy is the whole buffer, so its
# bytes compare with a CPU memcpy of that size, and nothing else is timed.
params=0
: > /tmp/dmatest-params.txt
for param in threads_per_chan="$threads" iterations="$iterations" test_buf_size="$size" \
        timeout=3000 noverify="$noverify" norandom="$norandom" polled=N; do
    echo "${param#*=}" > "$PARAMS/${param%%=*}" || params=1
    echo "${param%%=*}=$(cat "$PARAMS/${param%%=*}")" >> /tmp/dmatest-params.txt
done
check params $params
vdsa-result "$results.params" < /tmp/dmatest-params.txt

run_dmatest "$first"
# Threads still running hold the channel, and may never end (see run_dmatest):
# disabling the WQ under them would only hang, so stop here.
[ "$(cat "$PARAMS/run")" = N ] || exit 1

if [ "$mode" = inflight ]; then
    # iterations=0: each thread copies until stopped, which here is never.
    echo 0 > "$PARAMS/iterations" && echo "$CHANNEL" > "$PARAMS/channel" &&
        echo 1 > "$PARAMS/run"
    check inflight $?
    sleep 1
    vdsa-result "$results.inflight" "$(cat "$PARAMS/run")"
    exec sleep 3600
fi

if [ "$mode" = verify ]; then
    # Only the WQ is cycled; dsa0 stays enabled.  Disabling a WQ in 6.1 clears
    # its mode, type, name and priority (not its size, which cannot change
    # while dsa0 is enabled), so they are set again: `load-config` would skip
    # the enabled dsa0.
    accel-config disable-wq dsa0/wq0.0
    check disable_wq $?
    config_wq && accel-config enable-wq dsa0/wq0.0
    check reenable_wq $?
    run_dmatest run2
    [ "$(cat "$PARAMS/run")" = N ] || exit 1
fi

disable_dsa0
check disable $?
exit $failed
