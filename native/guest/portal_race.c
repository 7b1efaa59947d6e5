/*
 * portal-race ITERATIONS: two threads, pinned to CPU 0 and CPU 1, each submit
 * ITERATIONS NOOP descriptors into the same 64-byte slot of WQ 0's portal with
 * MOVDIR64B, as Linux 6.1's idxd can make two CPUs do (idxd_wq_portal_addr
 * advances the portal offset without a lock).  On hardware each 64-byte store
 * is atomic; an emulated one that lets another CPU's store interleave with it
 * tears both descriptors, and the device drops them.
 *
 * Run as root in the guest, with the DSA function's wq0.0 enabled as a
 * dedicated WQ (guest-scripts/portal-race.sh).  The device writes the
 * completion records by guest-physical address (the guest has no IOMMU), which
 * /proc/self/pagemap gives.  The threads submit in lock-step; each keeps one
 * descriptor in flight, so the WQ never overflows, and waits up to TIMEOUT_MS
 * for its record.
 *
 * Prints one "name value" line per figure: device, iterations, timeout_ms,
 * then per thread N (0, 1) threadN.cpu (the CPU it ran on), threadN.submitted,
 * threadN.completed (status SUCCESS), threadN.failed (another status),
 * threadN.lost (no record in time), then lost (both threads) and seconds.
 * Exit status: 0 every descriptor completed, 1 one was lost or failed (or the
 * clock failed), 2 bad arguments, 3 the setup failed (no device, mapping, CPUs).
 */
#define _GNU_SOURCE
#include <linux/idxd.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROGRAM "portal-race"
#include "guest_program.h"

#define THREADS 2
#define TIMEOUT_MS 1000
/* Completion records are 32-byte aligned; a cache line each keeps the two
 * threads' polling apart. */
#define RECORD_STRIDE 64

_Static_assert(sizeof(struct dsa_hw_desc) == 64, "a descriptor is 64 bytes");

struct worker {
	int cpu; /* the one it is pinned to */
	volatile struct dsa_completion_record *record;
	uint64_t record_pa;
	volatile void *slot; /* the same for both threads */
	atomic_ulong *arrived; /* arrivals at the lock-step, both threads' */
	unsigned long long iterations;
	int ran_on; /* sched_getcpu() in the thread */
	unsigned long long submitted, completed, failed, lost;
};

/* Whether the record's status came within TIMEOUT_MS. */
static int wait_status(volatile struct dsa_completion_record *record)
{
	double deadline = now() + TIMEOUT_MS / 1000.0;

	while (!record->status) {
		if (now() > deadline)
			return 0;
		__builtin_ia32_pause();
	}
	return 1;
}

static void *submit(void *arg)
{
	struct worker *w = arg;
	struct dsa_hw_desc desc;

	memset(&desc, 0, sizeof(desc));
	desc.opcode = DSA_OPCODE_NOOP;
	desc.flags = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR;
	desc.completion_addr = w->record_pa;
	w->ran_on = sched_getcpu();
	for (unsigned long long i = 0; i < w->iterations; i++) {
		/* Lock-step: both threads submit at the same moment each time,
		 * which is when their stores can interleave. */
		atomic_fetch_add(w->arrived, 1);
		while (atomic_load(w->arrived) < THREADS * (i + 1))
			__builtin_ia32_pause();
		w->record->status = 0;
		/* The cleared status must reach memory before the device can
		 * write the record (the driver's wmb() before its MOVDIR64B). */
		__asm__ volatile("sfence" : : : "memory");
		movdir64b(w->slot, &desc);
		w->submitted++;
		if (!wait_status(w->record))
			w->lost++;
		else if ((w->record->status & DSA_COMP_STATUS_MASK) == DSA_COMP_SUCCESS)
			w->completed++;
		else
			w->failed++;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct worker workers[THREADS];
	pthread_t threads[THREADS];
	atomic_ulong arrived = 0;
	unsigned long long iterations, lost = 0;
	char device[256];
	volatile void *portal;
	unsigned char *records;
	uint64_t records_pa;
	double began, seconds;
	int bad = 0;

	if (argc != 2) {
		fprintf(stderr, "usage: portal-race ITERATIONS\n");
		return 2;
	}
	if (!parse_count(argv[1], "ITERATIONS", &iterations))
		return 2;
	if (!find_dsa(device) || !(portal = map_resource(device, 2, PORTAL_PAGE, PROT_WRITE)) ||
	    !(records = physical_page(&records_pa)))
		return 3;
	began = now();
	for (int t = 0; t < THREADS; t++) {
		pthread_attr_t attr;
		cpu_set_t cpus;
		int err;

		workers[t] = (struct worker){
			.cpu = t,
			.record = (volatile struct dsa_completion_record *)(records + t * RECORD_STRIDE),
			.record_pa = records_pa + t * RECORD_STRIDE,
			.slot = portal,
			.arrived = &arrived,
			.iterations = iterations,
		};
		CPU_ZERO(&cpus);
		CPU_SET(t, &cpus);
		pthread_attr_init(&attr);
		pthread_attr_setaffinity_np(&attr, sizeof(cpus), &cpus);
		err = pthread_create(&threads[t], &attr, submit, &workers[t]);
		pthread_attr_destroy(&attr);
		if (err) {
			/* EINVAL here: CPU t is not online.  A thread already
			 * started waits for it for good; returning ends it. */
			fprintf(stderr, PROGRAM ": thread on CPU %d: %s\n", t, strerror(err));
			return 3;
		}
	}
	for (int t = 0; t < THREADS; t++)
		pthread_join(threads[t], NULL);
	seconds = now() - began;

	printf("device %s\niterations %llu\ntimeout_ms %d\n", device, iterations, TIMEOUT_MS);
	for (int t = 0; t < THREADS; t++) {
		struct worker *w = &workers[t];

		printf("thread%d.cpu %d\nthread%d.submitted %llu\nthread%d.completed %llu\n"
		       "thread%d.failed %llu\nthread%d.lost %llu\n",
		       t, w->ran_on, t, w->submitted, t, w->completed, t, w->failed, t, w->lost);
		lost += w->lost;
		bad |= w->lost || w->failed || w->ran_on != w->cpu;
	}
	printf("lost %llu\nseconds %.3f\n", lost, seconds);
	return bad ? 1 : 0;
}
