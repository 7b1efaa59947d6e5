/* Submitting into mapped portals from native code, as a guest's MOVDIR64B does through vdsa's
 * QEMU: wait until the slot's qword 0 is zero, store qwords 7..1, then qword 0 with release
 * order (native/engine/poller.c has the other side). A Python loop costs about 9 us a
 * descriptor and measures itself; this costs tens of nanoseconds and measures the device.
 *
 * The stream waits for completion records as a polling (or interrupt-driven) driver does:
 * each descriptor's record is cleared before it is submitted and read once its status byte
 * is set, so every completion it counts was seen in guest memory. */
#define _GNU_SOURCE /* pthread, clock_gettime */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "submitter.h"

#define QWORDS (VDSA_SUBMIT_DESC_SIZE / 8)
/* Spins between two looks at the clock or a yield: a look costs about 20 ns. */
#define SPINS_PER_CHECK 256u

static uint64_t clock_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void)
{
	return clock_ns(CLOCK_MONOTONIC);
}

/* A compiler barrier, not PAUSE: in a VM a PAUSE loop can exit to the hypervisor
 * (pause-loop exiting), which here made one round trip 20 us instead of under 1 us. */
static void cpu_relax(void)
{
	__asm__ volatile("" ::: "memory");
}

/* Waits until qword 0 of slot is zero; false if it stayed busy for wait_ns. */
static bool wait_slot_free(uint64_t *slot, uint64_t wait_ns)
{
	uint64_t give_up = 0;

	for (uint32_t spins = 0; __atomic_load_n(&slot[0], __ATOMIC_ACQUIRE); spins++) {
		if (spins % SPINS_PER_CHECK == SPINS_PER_CHECK - 1) {
			uint64_t now = now_ns();

			if (!give_up)
				give_up = now + wait_ns;
			else if (now > give_up)
				return false;
			/* The poller may share this CPU. */
			sched_yield();
		}
		cpu_relax();
	}
	return true;
}

/* Qwords 7..1, then qword 0 with release order: the poller's acquire load of a non-zero
 * qword 0 then sees the whole descriptor. */
static void store_descriptor(uint64_t *slot, const uint8_t *descriptor)
{
	uint64_t q[QWORDS];

	memcpy(q, descriptor, sizeof(q));
	for (unsigned i = QWORDS - 1; i > 0; i--)
		__atomic_store_n(&slot[i], q[i], __ATOMIC_RELAXED);
	__atomic_store_n(&slot[0], q[0], __ATOMIC_RELEASE);
}

/* --- The stream ------------------------------------------------------------------------- */

struct stream {
	const struct vdsa_submit_plan *plan;
	uint64_t *submitted_at; /* per record: when its descriptor went into the slot */
	uint8_t descriptor[VDSA_SUBMIT_DESC_SIZE];
	uint64_t submitted;
	uint64_t completed;
	uint64_t signals; /* interrupts received and not yet matched to a completion */
};

static uint8_t *record_of(const struct stream *s, uint64_t index)
{
	return s->plan->records + index % s->plan->window * VDSA_SUBMIT_RECORD_SIZE;
}

static int submit_one(struct stream *s)
{
	const struct vdsa_submit_plan *plan = s->plan;
	uint64_t *slot = (uint64_t *)(plan->portal + s->submitted % plan->slots *
				      VDSA_SUBMIT_DESC_SIZE);
	uint64_t record_iova = plan->records_iova +
			       s->submitted % plan->window * VDSA_SUBMIT_RECORD_SIZE;

	memset(record_of(s, s->submitted), 0, VDSA_SUBMIT_RECORD_SIZE);
	memcpy(s->descriptor + 8, &record_iova, sizeof(record_iova));
	if (!wait_slot_free(slot, plan->wait_ns))
		return -ETIMEDOUT;
	if (plan->latency_ns)
		s->submitted_at[s->submitted % plan->window] = now_ns();
	store_descriptor(slot, s->descriptor);
	s->submitted++;
	return 0;
}

/* Sleeps until the eventfd is signalled and consumes it: the signals it counted (they add
 * up), 0 after wait_ns. */
static uint64_t wait_interrupt(int fd, uint64_t wait_ns)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	uint64_t counter;
	int rc;

	do
		rc = poll(&p, 1, (int)(wait_ns / 1000000u) + 1);
	while (rc < 0 && errno == EINTR);
	if (rc <= 0 || read(fd, &counter, sizeof(counter)) != sizeof(counter))
		return 0;
	return counter;
}

/* The status of the oldest pending record once it is set, 0 after wait_ns. With an
 * interrupt, the record counts only once its interrupt has come, as a driver sleeping on
 * it sees it (the interrupt follows the record). */
static uint8_t wait_oldest(struct stream *s)
{
	const struct vdsa_submit_plan *plan = s->plan;
	const uint8_t *record = record_of(s, s->completed);
	uint64_t give_up = 0;
	uint8_t status;

	for (uint32_t spins = 1;; spins++) {
		if (plan->irq_fd >= 0) {
			status = s->signals ? __atomic_load_n(record, __ATOMIC_ACQUIRE) : 0;
			if (status)
				break;
			if (!give_up)
				give_up = now_ns() + plan->wait_ns;
			else if (now_ns() > give_up)
				return 0;
			s->signals += wait_interrupt(plan->irq_fd, plan->wait_ns);
			continue;
		}
		status = __atomic_load_n(record, __ATOMIC_ACQUIRE);
		if (status)
			break;
		if (spins % SPINS_PER_CHECK == 0) {
			uint64_t now = now_ns();

			if (!give_up)
				give_up = now + plan->wait_ns;
			else if (now > give_up)
				return 0;
			sched_yield();
		}
		cpu_relax();
	}
	if (plan->irq_fd >= 0)
		s->signals--;
	return status;
}

/* Takes the oldest record once complete, and every completed one after it. Returns 0,
 * -ETIMEDOUT or -EIO. */
static int reap(struct stream *s, struct vdsa_submit_result *out)
{
	const struct vdsa_submit_plan *plan = s->plan;
	uint8_t status = wait_oldest(s);

	if (!status)
		return -ETIMEDOUT;
	for (;;) {
		uint64_t seen = plan->latency_ns ? now_ns() : 0;

		if (status != plan->expected_status) {
			out->bad_status = status;
			return -EIO;
		}
		if (plan->latency_ns && out->samples < plan->latency_capacity)
			plan->latency_ns[out->samples++] =
				seen - s->submitted_at[s->completed % plan->window];
		s->completed++;
		if (s->completed == s->submitted)
			return 0;
		if (plan->irq_fd >= 0) {
			if (!s->signals)
				return 0;
			s->signals--;
		}
		status = __atomic_load_n(record_of(s, s->completed), __ATOMIC_ACQUIRE);
		if (!status) {
			s->signals += plan->irq_fd >= 0;
			return 0;
		}
	}
}

int vdsa_submit_stream(const struct vdsa_submit_plan *plan, struct vdsa_submit_result *out)
{
	struct stream s = { .plan = plan };
	uint64_t start, deadline, cpu_start;
	int rc = 0;

	memset(out, 0, sizeof(*out));
	if (!plan->slots || !plan->window || (plan->latency_ns && !plan->latency_capacity))
		return -EINVAL;
	if (plan->latency_ns) {
		s.submitted_at = calloc(plan->window, sizeof(*s.submitted_at));
		if (!s.submitted_at)
			return -ENOMEM;
	}
	memcpy(s.descriptor, plan->descriptor, sizeof(s.descriptor));
	cpu_start = clock_ns(CLOCK_THREAD_CPUTIME_ID);
	start = now_ns();
	deadline = start + plan->duration_ns;
	for (bool open = true; rc == 0;) {
		while (open && s.submitted - s.completed < plan->window && rc == 0)
			rc = submit_one(&s);
		if (rc != 0 || s.completed == s.submitted)
			break;
		rc = reap(&s, out);
		open = open && now_ns() < deadline;
	}
	out->completed = s.completed;
	out->elapsed_ns = now_ns() - start;
	out->cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
	free(s.submitted_at);
	return rc;
}

/* --- Writer threads ----------------------------------------------------------------------- */

struct writer {
	const struct vdsa_writer_plan *plan;
	pthread_mutex_t *exclusive; /* shared by the set's exclusive writers */
	pthread_t thread;
	struct vdsa_writer_result result;
};

struct vdsa_writers {
	pthread_mutex_t exclusive;
	uint32_t count;
	struct writer writers[];
};

static void pause_for(uint64_t ns)
{
	struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000u),
			       .tv_nsec = (long)(ns % 1000000000u) };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* One descriptor into one slot the way the plan's mode says; false on a timeout. */
static bool write_one(const struct vdsa_writer_plan *plan, uint64_t *slot,
		      const uint8_t *descriptor)
{
	uint64_t q[QWORDS];

	memcpy(q, descriptor, sizeof(q));
	switch (plan->mode) {
	case VDSA_WRITER_HANDSHAKE:
		if (!wait_slot_free(slot, plan->wait_ns))
			return false;
		store_descriptor(slot, descriptor);
		return true;
	case VDSA_WRITER_SLOW:
		if (!wait_slot_free(slot, plan->wait_ns))
			return false;
		for (unsigned i = 1; i < QWORDS; i++) {
			__atomic_store_n(&slot[i], q[i], __ATOMIC_RELAXED);
			pause_for(plan->pause_ns);
		}
		__atomic_store_n(&slot[0], q[0], __ATOMIC_RELEASE);
		return true;
	case VDSA_WRITER_RAW:
		for (unsigned i = 0; i < QWORDS; i++)
			__atomic_store_n(&slot[i], q[i], __ATOMIC_RELAXED);
		return true;
	case VDSA_WRITER_NO_QWORD0:
		for (unsigned i = 1; i < QWORDS; i++)
			__atomic_store_n(&slot[i], q[i], __ATOMIC_RELAXED);
		return true;
	}
	return false;
}

static void *run_writer(void *arg)
{
	struct writer *w = arg;
	const struct vdsa_writer_plan *plan = w->plan;

	for (uint32_t i = 0; i < plan->count; i++) {
		uint64_t *slot = (uint64_t *)(plan->bar + plan->offsets[i]);
		bool written;

		if (w->exclusive)
			pthread_mutex_lock(w->exclusive);
		written = write_one(plan, slot, plan->descriptors + (size_t)i * VDSA_SUBMIT_DESC_SIZE);
		if (w->exclusive)
			pthread_mutex_unlock(w->exclusive);
		if (!written) {
			/* A poller that stopped taking slots would make every later wait as long. */
			w->result.timeouts++;
			break;
		}
		w->result.written++;
	}
	return NULL;
}

struct vdsa_writers *vdsa_writers_start(const struct vdsa_writer_plan *plans, uint32_t count)
{
	struct vdsa_writers *set = calloc(1, sizeof(*set) + count * sizeof(set->writers[0]));

	if (!set)
		return NULL;
	pthread_mutex_init(&set->exclusive, NULL);
	for (uint32_t i = 0; i < count; i++) {
		struct writer *w = &set->writers[i];
		int rc;

		w->plan = &plans[i];
		w->exclusive = plans[i].exclusive ? &set->exclusive : NULL;
		rc = pthread_create(&w->thread, NULL, run_writer, w);
		if (rc != 0) {
			set->count = i;
			vdsa_writers_join(set, NULL);
			errno = rc;
			return NULL;
		}
	}
	set->count = count;
	return set;
}

void vdsa_writers_join(struct vdsa_writers *set, struct vdsa_writer_result *results)
{
	for (uint32_t i = 0; i < set->count; i++) {
		pthread_join(set->writers[i].thread, NULL);
		if (results)
			results[i] = set->writers[i].result;
	}
	pthread_mutex_destroy(&set->exclusive);
	free(set);
}
