# vdsa portal race, run inside the guest: two CPUs submit NOOP descriptors
# into the same 64-byte slot of wq0.0's portal with MOVDIR64B at once
# (portal-race), as the 6.1 idxd driver can make them do.  A MOVDIR64B that
# another CPU's can interleave with tears descriptors, which the device drops.
# dsa0 and wq0.0 are set up by dmatest.sh's setup mode (results setup.*); the
# program's figures are reported as portal_race.* (device, iterations,
# thread0.cpu, thread0.submitted, thread0.completed, thread0.failed,
# thread0.lost, the same for thread1, lost, seconds) and its exit status as
# portal_race.status.  Exits non-zero if the setup fails or a descriptor is
# lost or fails.
#
# Usage: sh portal-race.sh [ITERATIONS], with dmatest.sh at /vdsa/dmatest.sh
# (`vdsa boot --script portal-race.sh --file dmatest.sh`): each thread submits
# ITERATIONS descriptors (default 1000).
iterations=${1:-1000}

sh /vdsa/dmatest.sh '' '' setup || exit
echo

portal-race "$iterations" > /tmp/portal-race.txt
race=$?
cat /tmp/portal-race.txt
while read -r name value; do
    vdsa-result "portal_race.$name" "$value"
done < /tmp/portal-race.txt
vdsa-result portal_race.status "$race"
exit $race
