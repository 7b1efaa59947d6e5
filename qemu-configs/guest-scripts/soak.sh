# vdsa soak, run inside the guest: rounds of dmatest.sh's verify mode (the
# stock driver configures dsa0 and wq0.0, two verified runs with the WQ cycled
# between them, dsa0 disabled) until SECONDS have passed.  dmatest.sh reports
# each round's results as dmatest.* (the host adds them up as they arrive);
# this script reports soak.round after each round and soak.rounds, soak.trouble
# at the end.  The kernel log is checked for warnings after every round, then
# cleared, so that hours of rounds cannot roll dmatest.sh's summaries out of it.
# Exits non-zero at the first round that fails or leaves a warning.
#
# Usage: sh soak.sh [SECONDS [THREADS [ITERATIONS]]], with dmatest.sh at
# /vdsa/dmatest.sh (default 60 s of 2 x 500 copies a run).
seconds=${1:-60}
threads=${2:-2}
iterations=${3:-500}
TROUBLE='WARNING:|BUG:|Oops|Call Trace:|general protection'

start=$(date +%s)
rounds=0
status=0
while [ $(($(date +%s) - start)) -lt "$seconds" ]; do
    sh /vdsa/dmatest.sh "$threads" "$iterations" verify > /tmp/round.txt 2>&1
    status=$?
    trouble=$(dmesg | grep -cE "$TROUBLE")
    if [ "$status" -ne 0 ] || [ "$trouble" -ne 0 ]; then
        cat /tmp/round.txt
        dmesg | grep -E "$TROUBLE"
        [ "$status" -ne 0 ] || status=1
        break
    fi
    dmesg -c > /dev/null
    rounds=$((rounds + 1))
    vdsa-result soak.round "$rounds"
done
vdsa-result soak.rounds "$rounds"
vdsa-result soak.trouble "${trouble:-0}"
exit $status
