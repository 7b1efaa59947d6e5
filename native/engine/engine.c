/* The engine: portals, WQ queues, worker threads, interrupts and software errors. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "internal.h"

#define PORTAL_PAGE 4096u
#define PORTALS_PER_WQ 4u
#define SLOTS_PER_PAGE (PORTAL_PAGE / DESC_SIZE)
#define ERROR_QUEUE 64u
/* Threads that can run a WQ's descriptors at once: one per engine (the poller runs for a
 * lent engine, whose worker sleeps) and disable's caller always find a place; callers of
 * execute() share the rest. */
#define MAX_RUNNING (VDSA_MAX_ENGINES + 8)
#define EXECUTE_RUNNING (MAX_RUNNING - VDSA_MAX_ENGINES - 1)
/* Messages one vdsa_engine_vfu_run handles at most: two MOVDIR64Bs, so that interrupts held
 * back while libvfio-user runs wait for little. */
#define RUN_BURST 16

struct partial {
	uint8_t data[DESC_SIZE];
	uint8_t filled;
};

struct wq {
	bool enabled;
	struct vdsa_wq_config config;
	uint8_t (*ring)[DESC_SIZE]; /* config.size slots */
	uint32_t head;
	uint32_t count;
	/* Every accepted descriptor gets the next sequence number; the queue holds
	 * [accepted - count, accepted) in order, and running[] the ones taken and not yet
	 * done. A drain waits only for numbers below its own. */
	uint64_t accepted;
	uint64_t running[MAX_RUNNING];
	uint32_t inflight; /* entries of running[] */
	/* A device command waiting on this WQ (Drain or Disable WQ): over once nothing
	 * numbered below wait_seq is queued or running. While `disabling`, the WQ takes no
	 * descriptor but the workers still run its queue. */
	bool waiting;
	bool disabling;
	uint64_t wait_seq;
	atomic_bool abort;
	struct vdsa_wq_counters counters;
	struct partial partial[PORTALS_PER_WQ][SLOTS_PER_PAGE];
};

struct vdsa_engine {
	struct vdsa_engine_config config;
	struct dma_table dma;

	pthread_mutex_t lock; /* WQs, counters, workers */
	pthread_cond_t work[VDSA_MAX_ENGINES]; /* a WQ of the engine's group got work, or stop */
	pthread_cond_t idle; /* a descriptor finished */
	struct wq wqs[VDSA_MAX_WQS];
	pthread_t workers[VDSA_MAX_ENGINES];
	bool started[VDSA_MAX_ENGINES];
	uint32_t next_wq[VDSA_MAX_ENGINES]; /* round-robin start among equal priorities */
	bool stopping;
	/* Engines whose worker waits for work and has not been signalled: none of their WQs
	 * has a queued descriptor. */
	uint64_t idle_engines;
	/* The engine the poller runs descriptors for in its own thread (-1: none); its worker
	 * sleeps meanwhile. Lending an idle engine to the thread that took the descriptor
	 * saves the wake-up and the two context switches a hand-off costs. */
	int lent_engine;
	atomic_uint_fast64_t enabled_wqs; /* bit n: WQ n enabled, for the poller's sweep */
	atomic_uint_fast64_t stray; /* descriptors sent to portals of no WQ */
	struct {
		atomic_uint_fast64_t maps, unmaps, unreachable, map_failures;
	} dma_counters;

	/* MSI-X. While libvfio-user runs (vfu_busy) it may replace eventfds, so interrupts
	 * raised then are deferred and delivered when it returns. */
	pthread_mutex_t irq_lock;
	vfu_ctx_t *vfu;
	bool vfu_busy;
	bool masked[VDSA_MAX_MSIX];
	bool pending[VDSA_MAX_MSIX]; /* raised while masked */
	bool deferred[VDSA_MAX_MSIX]; /* raised while vfu_busy */
	atomic_uint_fast64_t irq_counts[VDSA_MAX_MSIX];
	atomic_bool granted[VDSA_MAX_MSIX];

	struct poller *poller; /* mapped portals, if any */

	pthread_mutex_t error_lock;
	struct vdsa_swerr errors[ERROR_QUEUE];
	uint32_t error_head;
	uint32_t error_count;
	int error_fd;
	int command_fd; /* written when a WQ's command wait ends */
};

struct vdsa_engine *vdsa_engine_create(const struct vdsa_engine_config *config)
{
	struct vdsa_engine *engine;

	if (config->num_wqs == 0 || config->num_wqs > VDSA_MAX_WQS || config->num_msix == 0 ||
	    config->num_msix > VDSA_MAX_MSIX)
		return NULL;
	engine = calloc(1, sizeof(*engine));
	if (!engine)
		return NULL;
	engine->config = *config;
	engine->lent_engine = -1;
	engine->error_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	engine->command_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (engine->error_fd < 0 || engine->command_fd < 0 || dma_init(&engine->dma) != 0) {
		if (engine->error_fd >= 0)
			close(engine->error_fd);
		if (engine->command_fd >= 0)
			close(engine->command_fd);
		free(engine);
		return NULL;
	}
	pthread_mutex_init(&engine->lock, NULL);
	for (uint32_t e = 0; e < VDSA_MAX_ENGINES; e++)
		pthread_cond_init(&engine->work[e], NULL);
	pthread_cond_init(&engine->idle, NULL);
	pthread_mutex_init(&engine->irq_lock, NULL);
	pthread_mutex_init(&engine->error_lock, NULL);
	return engine;
}

void vdsa_engine_destroy(struct vdsa_engine *engine)
{
	if (!engine)
		return;
	pthread_mutex_lock(&engine->lock);
	engine->stopping = true;
	for (uint32_t w = 0; w < engine->config.num_wqs; w++)
		atomic_store(&engine->wqs[w].abort, true);
	for (uint32_t e = 0; e < VDSA_MAX_ENGINES; e++)
		pthread_cond_signal(&engine->work[e]);
	pthread_mutex_unlock(&engine->lock);
	poller_destroy(engine->poller);
	for (int e = 0; e < VDSA_MAX_ENGINES; e++)
		if (engine->started[e])
			pthread_join(engine->workers[e], NULL);
	for (uint32_t w = 0; w < engine->config.num_wqs; w++)
		free(engine->wqs[w].ring);
	dma_destroy(&engine->dma);
	close(engine->error_fd);
	close(engine->command_fd);
	pthread_mutex_destroy(&engine->lock);
	for (uint32_t e = 0; e < VDSA_MAX_ENGINES; e++)
		pthread_cond_destroy(&engine->work[e]);
	pthread_cond_destroy(&engine->idle);
	pthread_mutex_destroy(&engine->irq_lock);
	pthread_mutex_destroy(&engine->error_lock);
	free(engine);
}

/* --- Services for descriptor.c and the operations --------------------------------------- */

struct dma_table *engine_dma(struct vdsa_engine *engine)
{
	return &engine->dma;
}

bool engine_opcode_supported(const struct vdsa_engine *engine, uint8_t opcode)
{
	return (engine->config.opcap[opcode / 64] >> (opcode % 64)) & 1;
}

bool engine_int_handle_valid(struct vdsa_engine *engine, uint16_t handle)
{
	if (handle >= engine->config.num_msix)
		return false;
	return !engine->config.interrupt_handles || atomic_load(&engine->granted[handle]);
}

void engine_report_error(struct vdsa_engine *engine, const struct vdsa_swerr *error)
{
	pthread_mutex_lock(&engine->error_lock);
	/* A full queue keeps the oldest errors: SWERR shows the first and flags overflow. */
	if (engine->error_count < ERROR_QUEUE) {
		engine->errors[(engine->error_head + engine->error_count) % ERROR_QUEUE] = *error;
		engine->error_count++;
	}
	pthread_mutex_unlock(&engine->error_lock);
	eventfd_write(engine->error_fd, 1);
}

/* Whether wq still has a descriptor accepted before sequence number `seq`, queued or
 * running. Caller holds the lock. */
static bool pending_before(const struct wq *wq, uint64_t seq)
{
	if (wq->count && wq->accepted - wq->count < seq)
		return true;
	for (uint32_t i = 0; i < wq->inflight; i++)
		if (wq->running[i] < seq)
			return true;
	return false;
}

/* Ends wq's command wait if nothing it waits for is left. Caller holds the lock. */
static void end_wait_if_done(struct vdsa_engine *engine, struct wq *wq)
{
	if (!wq->waiting || pending_before(wq, wq->wait_seq))
		return;
	wq->waiting = false;
	if (wq->disabling) {
		wq->disabling = false;
		memset(wq->partial, 0, sizeof(wq->partial));
	}
	eventfd_write(engine->command_fd, 1);
}

void engine_drain_wait(const struct exec_context *ctx)
{
	struct vdsa_engine *engine = ctx->engine;

	pthread_mutex_lock(&engine->lock);
	while (pending_before(&engine->wqs[ctx->wq], ctx->seq))
		pthread_cond_wait(&engine->idle, &engine->lock);
	pthread_mutex_unlock(&engine->lock);
}

/* Caller holds the lock. */
static void start_running(struct wq *wq, uint64_t seq)
{
	wq->running[wq->inflight++] = seq;
}

static void stop_running(struct wq *wq, uint64_t seq)
{
	for (uint32_t i = 0; i < wq->inflight; i++) {
		if (wq->running[i] == seq) {
			wq->running[i] = wq->running[--wq->inflight];
			return;
		}
	}
}

/* --- Workers ---------------------------------------------------------------------------- */

struct worker_start {
	struct vdsa_engine *engine;
	uint32_t index;
};

static void wake_engines(struct vdsa_engine *engine, uint64_t engines, uint64_t limit);

/* Whether wq has queued descriptors the workers should run. */
static bool runnable(const struct wq *wq)
{
	return (wq->enabled || wq->disabling) && wq->count;
}

/* The next WQ engine `index` serves that has work: highest priority, round robin among
 * equals. Caller holds the lock. */
static struct wq *pick(struct vdsa_engine *engine, uint32_t index, uint32_t *wq_index)
{
	uint32_t n = engine->config.num_wqs, start = engine->next_wq[index];
	struct wq *best = NULL;

	for (uint32_t i = 0; i < n; i++) {
		uint32_t w = (start + i) % n;
		struct wq *wq = &engine->wqs[w];

		if (!runnable(wq) || !((wq->config.engines >> index) & 1))
			continue;
		if (!best || wq->config.priority > best->config.priority) {
			best = wq;
			*wq_index = w;
		}
	}
	if (best)
		engine->next_wq[index] = (*wq_index + 1) % n;
	return best;
}

static void run_taken(struct vdsa_engine *engine, uint32_t w, const uint8_t *descriptor,
		      uint64_t seq)
{
	struct wq *wq = &engine->wqs[w];
	struct exec_context ctx = { engine, w, &wq->config, &wq->abort, seq };

	bool failed = execute_descriptor(&ctx, descriptor);

	pthread_mutex_lock(&engine->lock);
	wq->counters.completed++;
	wq->counters.errors += failed;
	stop_running(wq, seq);
	end_wait_if_done(engine, wq);
	pthread_cond_broadcast(&engine->idle);
	pthread_mutex_unlock(&engine->lock);
}

/* Takes WQ w's oldest descriptor and runs it; called and returns with the lock held. */
static void run_next(struct vdsa_engine *engine, uint32_t w)
{
	struct wq *wq = &engine->wqs[w];
	uint8_t descriptor[DESC_SIZE];
	uint64_t seq = wq->accepted - wq->count;

	memcpy(descriptor, wq->ring[wq->head], DESC_SIZE);
	wq->head = (wq->head + 1) % wq->config.size;
	wq->count--;
	start_running(wq, seq);
	pthread_mutex_unlock(&engine->lock);
	run_taken(engine, w, descriptor, seq);
	pthread_mutex_lock(&engine->lock);
}

static void *worker(void *arg)
{
	struct worker_start start = *(struct worker_start *)arg;
	struct vdsa_engine *engine = start.engine;

	free(arg);
	pthread_mutex_lock(&engine->lock);
	while (!engine->stopping) {
		uint32_t w = 0;
		struct wq *wq = engine->lent_engine == (int)start.index
					? NULL
					: pick(engine, start.index, &w);

		if (!wq) {
			engine->idle_engines |= 1ull << start.index;
			pthread_cond_wait(&engine->work[start.index], &engine->lock);
			engine->idle_engines &= ~(1ull << start.index);
			continue;
		}
		run_next(engine, w);
	}
	pthread_mutex_unlock(&engine->lock);
	return NULL;
}

static int start_workers(struct vdsa_engine *engine, uint64_t engines)
{
	for (uint32_t e = 0; e < VDSA_MAX_ENGINES; e++) {
		struct worker_start *start;
		int rc;

		if (!((engines >> e) & 1) || engine->started[e])
			continue;
		start = malloc(sizeof(*start));
		if (!start)
			return -ENOMEM;
		*start = (struct worker_start){ engine, e };
		rc = pthread_create(&engine->workers[e], NULL, worker, start);
		if (rc != 0) {
			free(start);
			return -rc;
		}
		engine->started[e] = true;
	}
	return 0;
}

/* --- WQs -------------------------------------------------------------------------------- */

int vdsa_engine_wq_enable(struct vdsa_engine *engine, uint32_t w,
			  const struct vdsa_wq_config *config)
{
	struct wq *wq;
	uint32_t discarded;
	int rc;

	if (w >= engine->config.num_wqs || config->size == 0 || config->engines == 0)
		return -EINVAL;
	wq = &engine->wqs[w];
	pthread_mutex_lock(&engine->lock);
	if (wq->enabled || wq->disabling) {
		rc = -EBUSY;
		goto out;
	}
	if (engine->poller) {
		/* Not under the lock: a sweep in progress may need it to submit. The WQ stays
		 * disabled meanwhile, and only this (the device's) thread enables WQs. */
		pthread_mutex_unlock(&engine->lock);
		discarded = poller_discard_wq(engine->poller, w);
		pthread_mutex_lock(&engine->lock);
		wq->counters.dropped_disabled += discarded;
	}
	free(wq->ring);
	wq->ring = calloc(config->size, DESC_SIZE);
	if (!wq->ring) {
		rc = -ENOMEM;
		goto out;
	}
	wq->config = *config;
	wq->head = wq->count = 0;
	memset(wq->partial, 0, sizeof(wq->partial));
	rc = start_workers(engine, config->engines);
	wq->enabled = rc == 0;
	if (wq->enabled)
		atomic_fetch_or(&engine->enabled_wqs, 1ull << w);
out:
	pthread_mutex_unlock(&engine->lock);
	if (rc == 0 && engine->poller)
		poller_kick(engine->poller);
	return rc;
}

static void drop_queued(struct vdsa_engine *engine, struct wq *wq)
{
	atomic_store(&wq->abort, true);
	wq->count = 0;
	while (wq->inflight)
		pthread_cond_wait(&engine->idle, &engine->lock);
	atomic_store(&wq->abort, false);
	end_wait_if_done(engine, wq);
	/* A drain with nothing left running waits for this, not for a descriptor's end. */
	pthread_cond_broadcast(&engine->idle);
}

static int wq_locked(struct vdsa_engine *engine, uint32_t w,
		     void (*action)(struct vdsa_engine *, struct wq *))
{
	if (w >= engine->config.num_wqs)
		return -EINVAL;
	pthread_mutex_lock(&engine->lock);
	action(engine, &engine->wqs[w]);
	pthread_mutex_unlock(&engine->lock);
	return 0;
}

/* Starts (or extends) wq's command wait to everything accepted so far. Caller holds the
 * lock. */
static void start_wait(struct vdsa_engine *engine, struct wq *wq)
{
	wq->waiting = true;
	wq->wait_seq = wq->accepted;
	end_wait_if_done(engine, wq);
}

/* Caller holds the lock. */
static void start_disable(struct vdsa_engine *engine, uint32_t w)
{
	struct wq *wq = &engine->wqs[w];

	if (wq->enabled) {
		wq->enabled = false;
		wq->disabling = true;
		atomic_fetch_and(&engine->enabled_wqs, ~(1ull << w));
	}
	start_wait(engine, wq);
	/* Idle workers would sleep through the queue a disabled WQ still has to finish. */
	wake_engines(engine, wq->config.engines, wq->count);
}

int vdsa_engine_wq_disable_start(struct vdsa_engine *engine, uint32_t w)
{
	if (w >= engine->config.num_wqs)
		return -EINVAL;
	pthread_mutex_lock(&engine->lock);
	start_disable(engine, w);
	pthread_mutex_unlock(&engine->lock);
	return 0;
}

int vdsa_engine_wq_drain_start(struct vdsa_engine *engine, uint32_t w)
{
	return wq_locked(engine, w, start_wait);
}

int vdsa_engine_wq_waiting(struct vdsa_engine *engine, uint32_t w)
{
	bool waiting;

	if (w >= engine->config.num_wqs)
		return -EINVAL;
	pthread_mutex_lock(&engine->lock);
	waiting = engine->wqs[w].waiting;
	pthread_mutex_unlock(&engine->lock);
	return waiting;
}

int vdsa_engine_command_fd(struct vdsa_engine *engine)
{
	return engine->command_fd;
}

int vdsa_engine_wq_disable(struct vdsa_engine *engine, uint32_t w)
{
	if (w >= engine->config.num_wqs)
		return -EINVAL;
	pthread_mutex_lock(&engine->lock);
	start_disable(engine, w);
	while (engine->wqs[w].waiting)
		pthread_cond_wait(&engine->idle, &engine->lock);
	pthread_mutex_unlock(&engine->lock);
	return 0;
}

int vdsa_engine_wq_drain(struct vdsa_engine *engine, uint32_t w)
{
	struct wq *wq;

	if (w >= engine->config.num_wqs)
		return -EINVAL;
	wq = &engine->wqs[w];
	pthread_mutex_lock(&engine->lock);
	/* What was accepted before the command, not what a busy guest adds meanwhile. */
	for (uint64_t before = wq->accepted; pending_before(wq, before);)
		pthread_cond_wait(&engine->idle, &engine->lock);
	pthread_mutex_unlock(&engine->lock);
	return 0;
}

int vdsa_engine_wq_abort(struct vdsa_engine *engine, uint32_t w)
{
	return wq_locked(engine, w, drop_queued);
}

void vdsa_engine_reset(struct vdsa_engine *engine)
{
	pthread_mutex_lock(&engine->lock);
	atomic_store(&engine->enabled_wqs, 0);
	for (uint32_t w = 0; w < engine->config.num_wqs; w++) {
		engine->wqs[w].enabled = false;
		drop_queued(engine, &engine->wqs[w]);
		memset(engine->wqs[w].partial, 0, sizeof(engine->wqs[w].partial));
	}
	pthread_mutex_unlock(&engine->lock);
	for (uint32_t v = 0; v < VDSA_MAX_MSIX; v++)
		atomic_store(&engine->granted[v], false);
}

void vdsa_engine_irq_reset(struct vdsa_engine *engine)
{
	pthread_mutex_lock(&engine->irq_lock);
	memset(engine->masked, 0, sizeof(engine->masked));
	memset(engine->pending, 0, sizeof(engine->pending));
	memset(engine->deferred, 0, sizeof(engine->deferred));
	pthread_mutex_unlock(&engine->irq_lock);
}

int vdsa_engine_get_counters(struct vdsa_engine *engine, uint32_t w,
			     struct vdsa_wq_counters *out)
{
	if (w >= engine->config.num_wqs)
		return -EINVAL;
	pthread_mutex_lock(&engine->lock);
	*out = engine->wqs[w].counters;
	pthread_mutex_unlock(&engine->lock);
	return 0;
}

int vdsa_engine_execute(struct vdsa_engine *engine, uint32_t w, const void *descriptor)
{
	uint8_t copy[DESC_SIZE];
	uint64_t seq;

	if (w >= engine->config.num_wqs)
		return -EINVAL;
	memcpy(copy, descriptor, DESC_SIZE);
	pthread_mutex_lock(&engine->lock);
	if (!engine->wqs[w].enabled) {
		pthread_mutex_unlock(&engine->lock);
		return -EINVAL;
	}
	while (engine->wqs[w].inflight >= EXECUTE_RUNNING)
		pthread_cond_wait(&engine->idle, &engine->lock);
	engine->wqs[w].counters.submitted++;
	seq = engine->wqs[w].accepted++;
	start_running(&engine->wqs[w], seq);
	pthread_mutex_unlock(&engine->lock);
	run_taken(engine, w, copy, seq);
	return 0;
}

/* --- Portals ---------------------------------------------------------------------------- */

/* Signals up to `limit` idle workers among `engines`: one a queued descriptor (a busy
 * worker looks for work before it sleeps; the lent engine is the poller's to run). Caller
 * holds the lock. */
static void wake_engines(struct vdsa_engine *engine, uint64_t engines, uint64_t limit)
{
	engines &= engine->idle_engines;
	if (engine->lent_engine >= 0)
		engines &= ~(1ull << engine->lent_engine);
	for (; engines && limit; engines &= engines - 1, limit--) {
		uint32_t e = (uint32_t)__builtin_ctzll(engines);

		engine->idle_engines &= ~(1ull << e);
		pthread_cond_signal(&engine->work[e]);
	}
}

/* Queues a whole descriptor on wq, or drops and counts it; `wake`: signal the group's idle
 * workers now (the poller decides after its sweep instead). Caller holds the lock. */
static void enqueue(struct vdsa_engine *engine, struct wq *wq, const uint8_t *descriptor,
		    bool wake)
{
	if (!wq->enabled) {
		wq->counters.dropped_disabled++;
		return;
	}
	if (wq->count == wq->config.size) {
		wq->counters.dropped_full++;
		return;
	}
	memcpy(wq->ring[(wq->head + wq->count) % wq->config.size], descriptor, DESC_SIZE);
	wq->count++;
	wq->accepted++;
	wq->counters.submitted++;
	if (wake)
		wake_engines(engine, wq->config.engines, 1);
}

uint64_t engine_enabled_wqs(struct vdsa_engine *engine)
{
	return atomic_load_explicit(&engine->enabled_wqs, memory_order_acquire);
}

void engine_submit(struct vdsa_engine *engine, const struct taken *taken, uint32_t count)
{
	pthread_mutex_lock(&engine->lock);
	for (uint32_t i = 0; i < count; i++) {
		uint32_t w = taken[i].offset / (PORTAL_PAGE * PORTALS_PER_WQ);

		if (w < engine->config.num_wqs)
			enqueue(engine, &engine->wqs[w], taken[i].descriptor, false);
		else
			atomic_fetch_add(&engine->stray, 1);
	}
	pthread_mutex_unlock(&engine->lock);
}

/* Engines that some enabled WQ with queued descriptors can use, and how many descriptors
 * those WQs hold. Caller holds the lock. */
static uint64_t engines_with_work(const struct vdsa_engine *engine, uint64_t *queued)
{
	uint64_t engines = 0;

	*queued = 0;
	for (uint32_t w = 0; w < engine->config.num_wqs; w++) {
		if (runnable(&engine->wqs[w])) {
			engines |= engine->wqs[w].config.engines;
			*queued += engine->wqs[w].count;
		}
	}
	return engines;
}

bool engine_poll_run(struct vdsa_engine *engine)
{
	uint64_t busy, queued;
	uint32_t w = 0;
	bool ran = false;

	pthread_mutex_lock(&engine->lock);
	busy = engines_with_work(engine, &queued);
	/* Keep the lent engine while it has work; else give it back to its worker. */
	if (engine->lent_engine >= 0 && !((busy >> engine->lent_engine) & 1))
		engine->lent_engine = -1;
	if (engine->lent_engine < 0 && (busy & engine->idle_engines))
		engine->lent_engine = __builtin_ctzll(busy & engine->idle_engines);
	if (engine->lent_engine >= 0) {
		struct wq *wq = pick(engine, (uint32_t)engine->lent_engine, &w);

		ran = wq != NULL;
		/* Those go to the worker: the poller must keep sweeping (vdsa's QEMU waits
		 * 250 ms at most for a slot), and a drain waits for other engines. */
		if (ran && descriptor_may_block(wq->ring[wq->head])) {
			engine->lent_engine = -1;
			ran = false;
		}
	}
	wake_engines(engine, busy, queued - ran);
	if (ran)
		run_next(engine, w);
	pthread_mutex_unlock(&engine->lock);
	return ran;
}

uint64_t vdsa_engine_stray_descriptors(struct vdsa_engine *engine)
{
	return atomic_load(&engine->stray);
}

int vdsa_engine_portal_write(struct vdsa_engine *engine, uint64_t offset, const void *data,
			     uint32_t size)
{
	uint64_t w = offset / (PORTAL_PAGE * PORTALS_PER_WQ);
	uint32_t page = (uint32_t)(offset / PORTAL_PAGE % PORTALS_PER_WQ);
	uint32_t slot = (uint32_t)(offset % PORTAL_PAGE / DESC_SIZE);
	uint32_t at = (uint32_t)(offset % DESC_SIZE);
	struct partial *p;
	struct wq *wq;

	if (size == 0)
		return -EINVAL;
	if (w >= engine->config.num_wqs) {
		/* Counted once a descriptor, at its first store. */
		if (at == 0)
			atomic_fetch_add(&engine->stray, 1);
		return -EINVAL;
	}
	wq = &engine->wqs[w];
	p = &wq->partial[page][slot];
	pthread_mutex_lock(&engine->lock);
	if (at + size > DESC_SIZE || (at != 0 && p->filled != at)) {
		/* Crosses a slot, or does not continue the descriptor being written; a piece
		 * with no descriptor begun (the rest of one already dropped) is not counted. */
		if (p->filled || at + size > DESC_SIZE)
			wq->counters.dropped_torn++;
		p->filled = 0;
	} else {
		if (at == 0 && p->filled)
			wq->counters.dropped_torn++;
		memcpy(p->data + at, data, size);
		p->filled = (uint8_t)(at + size);
		if (p->filled == DESC_SIZE) {
			p->filled = 0;
			enqueue(engine, wq, p->data, true);
		}
	}
	pthread_mutex_unlock(&engine->lock);
	return 0;
}

static ssize_t portal_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset,
			     bool is_write)
{
	struct vdsa_engine *engine = vfu_get_private(ctx);
	const uint8_t *config = (const uint8_t *)vfu_pci_get_config_space(ctx);

	if (!is_write) {
		/* Portals are write-only; reads return all ones as DSA's do. */
		memset(buf, 0xFF, count);
		return (ssize_t)count;
	}
	/* With memory decode off the function does not claim the write. */
	if (config[PCI_COMMAND] & PCI_COMMAND_MEMORY)
		vdsa_engine_portal_write(engine, (uint64_t)offset, buf, (uint32_t)count);
	return (ssize_t)count;
}

static void dma_registered(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
	struct vdsa_engine *engine = vfu_get_private(ctx);

	atomic_fetch_add(&engine->dma_counters.maps, 1);
	if (!info->vaddr)
		atomic_fetch_add(&engine->dma_counters.unreachable, 1);
	else if (dma_map(&engine->dma, (uint64_t)(uintptr_t)info->iova.iov_base, info->iova.iov_len,
			 info->vaddr, info->prot) < 0)
		/* libvfio-user's table refuses overlaps first, so only memory can fail here; the
		 * region then faults as one without an fd does, never reaching stale memory. */
		atomic_fetch_add(&engine->dma_counters.map_failures, 1);
}

static void dma_unregistered(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
	struct vdsa_engine *engine = vfu_get_private(ctx);

	atomic_fetch_add(&engine->dma_counters.unmaps, 1);
	/* A region the engine never took (no fd, a failed map) answers -ENOENT: nothing to do. */
	dma_unmap(&engine->dma, (uint64_t)(uintptr_t)info->iova.iov_base, info->iova.iov_len);
}

int vdsa_engine_attach_vfu(struct vdsa_engine *engine, vfu_ctx_t *ctx, uint32_t bar2_size)
{
	/* The callbacks find the engine as the context's private pointer. */
	if (vfu_get_private(ctx) != engine)
		return -EINVAL;
	if (vfu_setup_device_dma(ctx, dma_registered, dma_unregistered) < 0)
		return -errno;
	pthread_mutex_lock(&engine->irq_lock);
	engine->vfu = ctx;
	pthread_mutex_unlock(&engine->irq_lock);
	if (engine->poller) {
		/* The whole BAR is mappable; a client that does not map it still writes through
		 * the callback, so both paths serve at once. */
		struct iovec all = { .iov_base = 0, .iov_len = bar2_size };

		if (vfu_setup_region(ctx, VFU_PCI_DEV_BAR2_REGION_IDX, bar2_size, portal_access,
				     VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM, &all, 1,
				     poller_fd(engine->poller), 0) < 0)
			return -errno;
		return 0;
	}
	if (vfu_setup_region(ctx, VFU_PCI_DEV_BAR2_REGION_IDX, bar2_size, portal_access,
			     VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM, NULL, 0, -1, 0) < 0)
		return -errno;
	return 0;
}

int vdsa_engine_map_portals(struct vdsa_engine *engine, uint32_t bar2_size)
{
	int rc = 0;

	if (engine->poller)
		return -EBUSY;
	if (bar2_size < engine->config.num_wqs * PORTALS_PER_WQ * PORTAL_PAGE ||
	    bar2_size % PORTAL_PAGE)
		return -EINVAL;
	engine->poller = poller_create(engine, bar2_size, &rc);
	return engine->poller ? poller_fd(engine->poller) : rc;
}

uint64_t vdsa_engine_portal_sleeps(struct vdsa_engine *engine)
{
	return engine->poller ? poller_sleeps(engine->poller) : 0;
}

/* --- Interrupts ------------------------------------------------------------------------- */

static void deliver(struct vdsa_engine *engine, uint32_t vector)
{
	if (engine->masked[vector])
		engine->pending[vector] = true;
	else if (engine->vfu_busy)
		engine->deferred[vector] = true;
	else if (engine->vfu)
		vfu_irq_trigger(engine->vfu, vector); /* ENOENT: the client wired no eventfd */
}

void vdsa_engine_irq_trigger(struct vdsa_engine *engine, uint32_t vector)
{
	if (vector >= engine->config.num_msix)
		return;
	atomic_fetch_add(&engine->irq_counts[vector], 1);
	pthread_mutex_lock(&engine->irq_lock);
	deliver(engine, vector);
	pthread_mutex_unlock(&engine->irq_lock);
}

void vdsa_engine_irq_mask(struct vdsa_engine *engine, uint32_t start, uint32_t count,
			  bool masked)
{
	pthread_mutex_lock(&engine->irq_lock);
	for (uint32_t v = start; v < start + count && v < engine->config.num_msix; v++) {
		engine->masked[v] = masked;
		if (!masked && engine->pending[v]) {
			engine->pending[v] = false;
			deliver(engine, v);
		}
	}
	pthread_mutex_unlock(&engine->irq_lock);
}

uint64_t vdsa_engine_irq_count(struct vdsa_engine *engine, uint32_t vector)
{
	return vector < engine->config.num_msix ? atomic_load(&engine->irq_counts[vector]) : 0;
}

int vdsa_engine_set_int_handle(struct vdsa_engine *engine, uint32_t handle, bool granted)
{
	if (handle >= engine->config.num_msix)
		return -EINVAL;
	atomic_store(&engine->granted[handle], granted);
	return 0;
}

static void set_busy(struct vdsa_engine *engine, bool busy)
{
	pthread_mutex_lock(&engine->irq_lock);
	engine->vfu_busy = busy;
	if (!busy) {
		for (uint32_t v = 0; v < engine->config.num_msix; v++) {
			if (engine->deferred[v]) {
				engine->deferred[v] = false;
				deliver(engine, v);
			}
		}
	}
	pthread_mutex_unlock(&engine->irq_lock);
}

/* Calls `call` while it handles messages, at most `burst` times, in one busy period: a
 * burst of messages such as a MOVDIR64B's eight writes then costs one call from Python and
 * one round of deferred interrupts. Returns the messages handled, or the first error. */
static int while_busy(struct vdsa_engine *engine, int (*call)(vfu_ctx_t *), int burst)
{
	int rc, handled = 0, saved;

	set_busy(engine, true);
	do {
		rc = call(engine->vfu);
		handled += rc > 0 ? rc : 0;
	} while (rc > 0 && handled < burst);
	saved = errno;
	set_busy(engine, false);
	errno = saved;
	return rc < 0 ? rc : handled;
}

int vdsa_engine_vfu_attach(struct vdsa_engine *engine)
{
	return while_busy(engine, vfu_attach_ctx, 1);
}

int vdsa_engine_vfu_run(struct vdsa_engine *engine)
{
	return while_busy(engine, vfu_run_ctx, RUN_BURST);
}

/* --- Memory and errors ------------------------------------------------------------------ */

int vdsa_engine_dma_map(struct vdsa_engine *engine, uint64_t iova, uint64_t length,
			void *vaddr, uint32_t prot)
{
	return dma_map(&engine->dma, iova, length, vaddr, prot);
}

int vdsa_engine_dma_unmap(struct vdsa_engine *engine, uint64_t iova, uint64_t length)
{
	return dma_unmap(&engine->dma, iova, length);
}

uint64_t vdsa_engine_dma_regions(struct vdsa_engine *engine, struct vdsa_dma_region *out,
				 uint64_t max)
{
	return dma_list(&engine->dma, out, max);
}

void vdsa_engine_get_dma_counters(struct vdsa_engine *engine, struct vdsa_dma_counters *out)
{
	out->maps = atomic_load(&engine->dma_counters.maps);
	out->unmaps = atomic_load(&engine->dma_counters.unmaps);
	out->unreachable = atomic_load(&engine->dma_counters.unreachable);
	out->map_failures = atomic_load(&engine->dma_counters.map_failures);
}

int vdsa_engine_error_fd(struct vdsa_engine *engine)
{
	return engine->error_fd;
}

int vdsa_engine_pop_error(struct vdsa_engine *engine, struct vdsa_swerr *out)
{
	int found = 0;

	pthread_mutex_lock(&engine->error_lock);
	if (engine->error_count) {
		*out = engine->errors[engine->error_head];
		engine->error_head = (engine->error_head + 1) % ERROR_QUEUE;
		engine->error_count--;
		found = 1;
	}
	pthread_mutex_unlock(&engine->error_lock);
	return found;
}
