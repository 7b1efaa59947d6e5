# vdsa hostile guest, run inside the guest: hostile-guest submits random valid,
# invalid and record-less descriptors, torn portal writes and writes to BAR0's
# read-only registers, checking every result and canaries around its pages
# (native/guest/hostile_guest.c).  dsa0 and wq0.0 are set up by dmatest.sh's
# setup mode (results setup.*); the program's figures are reported as
# hostile.* and its exit status as hostile.status, a control run's with the WQ
# disabled as hostile_control.*.  Then dmatest runs on the
# same device (results dmatest.*): it must still work for the driver.  Exits
# non-zero if the setup fails, the program finds anything, or dmatest fails.
#
# Usage: sh hostile-guest.sh [SEED [COUNT]], with dmatest.sh at /vdsa/dmatest.sh
# (`vdsa boot --script hostile-guest.sh --file dmatest.sh`); default seed 1,
# 10000 descriptors.
seed=${1:-1}
count=${2:-10000}

sh /vdsa/dmatest.sh '' '' setup || exit
echo

hostile-guest "$seed" "$count" > /tmp/hostile.txt 2> /tmp/hostile.err
hostile=$?
cat /tmp/hostile.txt
# The first findings, if any, with what the descriptor was.
head -n 40 /tmp/hostile.err
while read -r name value; do
    vdsa-result "hostile.$name" "$value"
done < /tmp/hostile.txt
vdsa-result hostile.status "$hostile"

# The control: with wq0.0 disabled the device drops every descriptor, which the
# program must report as lost (status 1), or its checks could not fail.
accel-config disable-wq dsa0/wq0.0
hostile-guest 2 4 > /tmp/control.txt 2>/dev/null
vdsa-result hostile_control.status $?
while read -r name value; do
    vdsa-result "hostile_control.$name" "$value"
done < /tmp/control.txt

sh /vdsa/dmatest.sh 2 250 || exit
exit $hostile
