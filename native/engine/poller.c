/* Mapped portals: BAR2 as shared memory that the client maps, and one thread that sweeps its
 * slots for descriptors.
 *
 * Who writes what, in which order, who clears (the whole contract between a submitter and
 * the poller):
 *   submitter: waits until the slot's qword 0 is zero, stores qwords 7..1, then qword 0
 *              with release order (vdsa's QEMU MOVDIR64B does this for a mapped vfio-user
 *              region; a KVM guest's MOVDIR64B stores all 64 bytes at once and cannot wait);
 *   poller:    loads qword 0 with acquire order; if it is not zero, copies the slot and
 *              then stores zero to qword 0 with release order, handing the slot back.
 * A descriptor whose qword 0 is zero is a NOOP without flags (no record, no interrupt): an
 * empty slot and it are indistinguishable, and treating it as empty loses nothing a guest
 * can observe. Descriptors then meet the same rules as trapped ones (disabled WQ, full WQ:
 * dropped and counted). */
#define _GNU_SOURCE /* memfd_create, file seals */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* Empty sweeps in a row before the poller starts to sleep, and its longest sleep: busy, it
 * answers within one sweep; idle with a WQ enabled, one short wake-up per 4 ms; with
 * none enabled, nothing. */
#define SPIN_SWEEPS 256u
#define FIRST_SLEEP_NS 1000L
#define LONGEST_SLEEP_NS 4000000L
/* A sweep reads only the enabled WQs' slots (a busy poller sweeps millions of times a
 * second); every this many sweeps, and before each sleep, it reads every slot, so that
 * descriptors for disabled WQs or for no WQ are taken and counted as dropped. */
#define FULL_SWEEP_PERIOD 64u
#define WQ_PORTALS (4u * 4096u)
/* Descriptors handed to the engine under one lock. */
#define TAKE_BATCH 32u

struct poller {
	struct vdsa_engine *engine;
	int fd;
	uint8_t *base;
	uint32_t size;
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t kick; /* a WQ was enabled, or stop */
	bool kicked;
	atomic_bool stop; /* read on every sweep: a busy poller may never sleep */
	/* A discard asked of the poller's thread (poller_discard_wq), under lock. */
	atomic_bool discard_asked; /* read on every sweep, as stop */
	uint32_t discard_wq;
	uint32_t discarded;
	pthread_cond_t discard_done;
	atomic_uint_fast64_t sleeps; /* times the poller slept, for the idle-cost figures */
};

struct batch {
	struct taken taken[TAKE_BATCH];
	uint32_t count;
	uint32_t total;
};

static void flush(struct poller *poller, struct batch *batch)
{
	if (batch->count)
		engine_submit(poller->engine, batch->taken, batch->count);
	batch->total += batch->count;
	batch->count = 0;
}

/* Takes every full slot of [start, end) once, into batch. */
static void sweep_range(struct poller *poller, struct batch *batch, uint32_t start,
			uint32_t end)
{
	for (uint32_t offset = start; offset < end; offset += DESC_SIZE) {
		uint64_t *slot = (uint64_t *)(poller->base + offset);
		struct taken *t;
		uint64_t q[DESC_SIZE / 8];

		q[0] = __atomic_load_n(&slot[0], __ATOMIC_ACQUIRE);
		if (!q[0])
			continue;
		for (unsigned i = 1; i < DESC_SIZE / 8; i++)
			q[i] = __atomic_load_n(&slot[i], __ATOMIC_RELAXED);
		__atomic_store_n(&slot[0], 0, __ATOMIC_RELEASE);
		t = &batch->taken[batch->count++];
		t->offset = offset;
		memcpy(t->descriptor, q, DESC_SIZE);
		if (batch->count == TAKE_BATCH)
			flush(poller, batch);
	}
}

/* Takes the full slots of the enabled WQs, or with `full` of the whole BAR; returns how
 * many it took. */
static uint32_t sweep(struct poller *poller, bool full)
{
	struct batch batch = { .count = 0 };

	if (full) {
		sweep_range(poller, &batch, 0, poller->size);
	} else {
		for (uint64_t wqs = engine_enabled_wqs(poller->engine); wqs; wqs &= wqs - 1) {
			uint32_t start = (uint32_t)__builtin_ctzll(wqs) * WQ_PORTALS;

			sweep_range(poller, &batch, start, start + WQ_PORTALS);
		}
	}
	flush(poller, &batch);
	return batch.total;
}

static void serve_discard(struct poller *poller)
{
	pthread_mutex_lock(&poller->lock);
	if (poller->discard_asked) {
		uint32_t start = poller->discard_wq * WQ_PORTALS;

		poller->discarded = 0;
		for (uint32_t offset = start; offset < start + WQ_PORTALS && offset < poller->size;
		     offset += DESC_SIZE) {
			uint64_t *slot = (uint64_t *)(poller->base + offset);

			poller->discarded += __atomic_exchange_n(&slot[0], 0, __ATOMIC_ACQ_REL) != 0;
		}
		atomic_store(&poller->discard_asked, false);
		pthread_cond_broadcast(&poller->discard_done);
	}
	pthread_mutex_unlock(&poller->lock);
}

/* Something needs the poller awake now: stop, an enable's kick, a discard. Under lock. */
static bool called(const struct poller *poller)
{
	return poller->stop || poller->kicked || poller->discard_asked;
}

static void *poll_portals(void *arg)
{
	struct poller *poller = arg;
	uint32_t empty = 0, sweeps = 0;
	long sleep_ns = FIRST_SLEEP_NS;
	bool ran = false;

	while (!atomic_load_explicit(&poller->stop, memory_order_relaxed)) {
		bool full;
		uint32_t taken;

		if (atomic_load_explicit(&poller->discard_asked, memory_order_relaxed))
			serve_discard(poller);
		full = ++sweeps % FULL_SWEEP_PERIOD == 0 || empty + 1 >= SPIN_SWEEPS;
		taken = sweep(poller, full);

		/* Runs what it took itself when an engine would otherwise need waking. With
		 * nothing taken and no engine held (ran is false: it gave the engine back),
		 * there is nothing to run: the lock is left to the others. */
		ran = (taken || ran) && engine_poll_run(poller->engine);
		if (ran || taken) {
			empty = 0;
			sleep_ns = FIRST_SLEEP_NS;
			continue;
		}
		if (++empty < SPIN_SWEEPS) {
			/* The submitter may need this core (a vCPU thread): spin politely. */
			sched_yield();
			continue;
		}
		pthread_mutex_lock(&poller->lock);
		/* With no WQ enabled there is nothing to take until an enable kicks. */
		while (!called(poller) && !engine_enabled_wqs(poller->engine))
			pthread_cond_wait(&poller->kick, &poller->lock);
		if (!called(poller)) {
			struct timespec until;

			clock_gettime(CLOCK_MONOTONIC, &until);
			until.tv_nsec += sleep_ns;
			until.tv_sec += until.tv_nsec / 1000000000L;
			until.tv_nsec %= 1000000000L;
			pthread_cond_timedwait(&poller->kick, &poller->lock, &until);
			atomic_fetch_add(&poller->sleeps, 1);
		}
		if (poller->kicked) {
			poller->kicked = false;
			empty = 0;
			sleep_ns = FIRST_SLEEP_NS;
		} else if (sleep_ns < LONGEST_SLEEP_NS) {
			sleep_ns *= 2;
		}
		pthread_mutex_unlock(&poller->lock);
	}
	return NULL;
}

struct poller *poller_create(struct vdsa_engine *engine, uint32_t size, int *error)
{
	struct poller *poller = calloc(1, sizeof(*poller));
	pthread_condattr_t attr;
	int rc;

	if (!poller) {
		*error = -ENOMEM;
		return NULL;
	}
	poller->engine = engine;
	poller->size = size;
	poller->base = MAP_FAILED;
	poller->fd = memfd_create("vdsa-portals", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	/* The client maps this file: it must never shrink under the poller. */
	if (poller->fd < 0 || ftruncate(poller->fd, size) != 0 ||
	    fcntl(poller->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
		goto fail_errno;
	poller->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, poller->fd, 0);
	if (poller->base == MAP_FAILED)
		goto fail_errno;
	pthread_mutex_init(&poller->lock, NULL);
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&poller->kick, &attr);
	pthread_condattr_destroy(&attr);
	pthread_cond_init(&poller->discard_done, NULL);
	rc = pthread_create(&poller->thread, NULL, poll_portals, poller);
	if (rc == 0)
		return poller;
	pthread_cond_destroy(&poller->discard_done);
	pthread_cond_destroy(&poller->kick);
	pthread_mutex_destroy(&poller->lock);
	*error = -rc;
	goto release;
fail_errno:
	*error = -errno;
release:
	if (poller->base != MAP_FAILED)
		munmap(poller->base, size);
	if (poller->fd >= 0)
		close(poller->fd);
	free(poller);
	return NULL;
}

void poller_destroy(struct poller *poller)
{
	if (!poller)
		return;
	pthread_mutex_lock(&poller->lock);
	poller->stop = true;
	pthread_cond_signal(&poller->kick);
	pthread_mutex_unlock(&poller->lock);
	pthread_join(poller->thread, NULL);
	pthread_cond_destroy(&poller->discard_done);
	pthread_cond_destroy(&poller->kick);
	pthread_mutex_destroy(&poller->lock);
	munmap(poller->base, poller->size);
	close(poller->fd);
	free(poller);
}

void poller_kick(struct poller *poller)
{
	pthread_mutex_lock(&poller->lock);
	poller->kicked = true;
	pthread_cond_signal(&poller->kick);
	pthread_mutex_unlock(&poller->lock);
}

uint32_t poller_discard_wq(struct poller *poller, uint32_t wq)
{
	uint32_t discarded;

	pthread_mutex_lock(&poller->lock);
	while (poller->discard_asked)
		pthread_cond_wait(&poller->discard_done, &poller->lock);
	poller->discard_wq = wq;
	atomic_store(&poller->discard_asked, true);
	pthread_cond_signal(&poller->kick);
	while (poller->discard_asked)
		pthread_cond_wait(&poller->discard_done, &poller->lock);
	discarded = poller->discarded;
	pthread_mutex_unlock(&poller->lock);
	return discarded;
}

int poller_fd(const struct poller *poller)
{
	return poller->fd;
}

uint64_t poller_sleeps(struct poller *poller)
{
	return atomic_load(&poller->sleeps);
}
