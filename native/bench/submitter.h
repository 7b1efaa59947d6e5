/* Native submitters into mapped portals (see submitter.c): one stream that measures
 * throughput and latency for `vdsa bench`, and writer threads that the engine tests set
 * loose on the poller. */
#ifndef VDSA_SUBMITTER_H
#define VDSA_SUBMITTER_H

#include <stdbool.h>
#include <stdint.h>

#define VDSA_SUBMIT_DESC_SIZE 64
#define VDSA_SUBMIT_RECORD_SIZE 32

struct vdsa_submit_plan {
	uint8_t *portal; /* host address of the first slot used */
	uint32_t slots; /* slots used in turn from there (1: the same address every time) */
	uint32_t window; /* descriptors in flight at most (records: one each) */
	uint8_t descriptor[VDSA_SUBMIT_DESC_SIZE]; /* bytes 8-15 (record address) are set here */
	uint8_t *records; /* host address of `window` completion records, 32 bytes apart */
	uint64_t records_iova; /* the same records as the device addresses them */
	int irq_fd; /* >= 0: sleep on this eventfd while the oldest record is pending */
	uint8_t expected_status; /* every record must end with this status */
	uint64_t duration_ns; /* submit for this long, then reap what is in flight */
	uint64_t wait_ns; /* bound on any one wait for a slot, a record or an interrupt */
	uint64_t *latency_ns; /* if not NULL: submission to completion seen, per descriptor */
	uint64_t latency_capacity;
};

struct vdsa_submit_result {
	uint64_t completed;
	uint64_t elapsed_ns;
	uint64_t cpu_ns; /* this thread's CPU time over the stream */
	uint64_t samples; /* latencies stored */
	uint8_t bad_status; /* the first unexpected status, 0 if none */
};

/* Returns 0; -ETIMEDOUT if a slot, a record or an interrupt outwaited wait_ns (result holds
 * what was done); -EIO at the first record whose status is not expected_status; -EINVAL for
 * a plan without slots, with a window of 0, or a latency array without capacity. */
int vdsa_submit_stream(const struct vdsa_submit_plan *plan, struct vdsa_submit_result *out);

/* How a writer stores each descriptor into its slot. */
enum vdsa_writer_mode {
	/* The handshake: wait until qword 0 is zero, store qwords 7..1, then qword 0 (release). */
	VDSA_WRITER_HANDSHAKE,
	/* The handshake with a pause of pause_ns after each of qwords 1..7, stored ascending. */
	VDSA_WRITER_SLOW,
	/* A guest that ignores the contract: qwords 0..7 ascending, with no wait for the slot. */
	VDSA_WRITER_RAW,
	/* Qwords 1..7 only: a descriptor never finished. */
	VDSA_WRITER_NO_QWORD0,
};

struct vdsa_writer_plan {
	uint8_t *bar; /* host address of BAR2 */
	const uint8_t *descriptors; /* count descriptors, 64 bytes each */
	const uint32_t *offsets; /* BAR2 offset of each one's slot */
	uint32_t count;
	enum vdsa_writer_mode mode;
	uint64_t pause_ns;
	uint64_t wait_ns; /* bound on the wait for each slot */
	/* Exclusive writers of one set take slots in turn, as vCPUs do when QEMU runs a
	 * MOVDIR64B with the others stopped: the wait and the stores are one step. */
	bool exclusive;
};

struct vdsa_writer_result {
	uint64_t written;
	uint64_t timeouts; /* 1 if a slot stayed busy for wait_ns: the writer stopped there */
};

struct vdsa_writers;

/* Starts one thread per plan (the plans and what they point to must outlive join). NULL
 * with errno on failure. */
struct vdsa_writers *vdsa_writers_start(const struct vdsa_writer_plan *plans, uint32_t count);
/* Waits for every writer, stores their results (count of them) and frees the set. */
void vdsa_writers_join(struct vdsa_writers *writers, struct vdsa_writer_result *results);

#endif
