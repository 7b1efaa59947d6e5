/* Shared between the engine's translation units; not part of the API. */
#ifndef VDSA_INTERNAL_H
#define VDSA_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "vdsa_engine.h"

#define DESC_SIZE 64
#define COMPLETION_SIZE 32

enum { PROT_READABLE = 1, PROT_WRITABLE = 2, PROT_MAPPED = 0 };

/* --- dma.c: IOVA -> host translation ------------------------------------- */

struct dma_region {
	uint64_t iova;
	uint64_t length;
	uint8_t *vaddr;
	uint32_t prot;
};

/* A B+ tree of regions by iova (never overlapping): a vIOMMU guest maps pages one at a time in
 * any order (Linux allocates IOVAs top down), so a map or an unmap costs O(log n), and a lookup
 * reads a few nodes, each searched in a few cache lines of keys. */
#define DMA_NODE_SLOTS 32

struct dma_node {
	uint32_t count;
	bool leaf;
	uint64_t keys[DMA_NODE_SLOTS]; /* a leaf's regions' iovas; an inner node's children's lowest */
	union {
		struct dma_node *children[DMA_NODE_SLOTS];
		struct dma_region regions[DMA_NODE_SLOTS];
	};
};

struct dma_table {
	pthread_rwlock_t lock; /* read: a descriptor in progress; write: map/unmap */
	struct dma_node *root; /* NULL: empty; nodes change only under the write lock */
	unsigned height; /* levels of nodes */
	struct dma_node *spares; /* enough for a map's splits, taken before the tree changes */
	unsigned spare_count;
	size_t count; /* regions mapped */
};

int dma_init(struct dma_table *table);
void dma_destroy(struct dma_table *table);
int dma_map(struct dma_table *table, uint64_t iova, uint64_t length, void *vaddr,
	    uint32_t prot);
int dma_unmap(struct dma_table *table, uint64_t iova, uint64_t length);
/* Bytes accessible with prot from iova on, up to length, in one host run; *host points at
 * the first. 0: iova itself is not accessible. Caller holds the read lock. */
uint64_t dma_span(const struct dma_table *table, uint64_t iova, uint64_t length, uint32_t prot,
		  uint8_t **host);
/* The same, for the run that ends just below end (descending walks). */
uint64_t dma_span_back(const struct dma_table *table, uint64_t end, uint64_t length,
		       uint32_t prot, uint8_t **host);
/* Accessible prefix of [iova, iova + length), across regions. */
uint64_t dma_accessible(const struct dma_table *table, uint64_t iova, uint64_t length,
			uint32_t prot);
/* Copy between guest and host; returns bytes moved (the accessible prefix). */
uint64_t dma_read(const struct dma_table *table, uint64_t iova, void *out, uint64_t length);
uint64_t dma_write(const struct dma_table *table, uint64_t iova, const void *in,
		   uint64_t length);

/* --- crc.c ---------------------------------------------------------------- */

/* DSA CRC generation; flags are the descriptor's operation-specific bits 16-18. */
#define CRC_FLAG_SEED_FROM_MEMORY (1u << 16)
#define CRC_FLAG_BYPASS_INVERSION (1u << 17)
#define CRC_FLAG_BYPASS_DATA_REFLECTION (1u << 18)
/* CRC state carried across chunks: crc_begin(seed), crc_update()..., crc_end(). */
uint32_t crc_begin(uint32_t seed, uint32_t flags);
uint32_t crc_update(uint32_t state, const uint8_t *data, uint64_t length, uint32_t flags);
uint32_t crc_end(uint32_t state, uint32_t flags);
uint16_t crc16_t10(uint16_t seed, const uint8_t *data, uint64_t length);

/* --- ops.c: one descriptor ------------------------------------------------ */

struct vdsa_engine;

struct exec_context {
	struct vdsa_engine *engine;
	uint32_t wq;
	const struct vdsa_wq_config *wq_config;
	const atomic_bool *abort; /* set: stop between batch entries */
	uint64_t seq; /* the descriptor's place in its WQ's order of acceptance */
};

/* Validates and executes one descriptor taken from a WQ, then completes it (record,
 * interrupt, software error). Holds the DMA read lock itself. True if it failed. */
bool execute_descriptor(struct exec_context *ctx, const uint8_t *descriptor);
/* A batch (unbounded work) or a drain (waits for other engines). */
bool descriptor_may_block(const uint8_t *descriptor);

/* --- engine.c services used by ops.c -------------------------------------- */

struct dma_table *engine_dma(struct vdsa_engine *engine);
bool engine_opcode_supported(const struct vdsa_engine *engine, uint8_t opcode);
bool engine_int_handle_valid(struct vdsa_engine *engine, uint16_t handle);
void engine_report_error(struct vdsa_engine *engine, const struct vdsa_swerr *error);
/* A drain descriptor (ctx->seq): wait until every descriptor its WQ accepted before it is
 * done; later ones do not hold it up. */
void engine_drain_wait(const struct exec_context *ctx);
/* Bit n set: WQ n is enabled (read without the lock; the sweep only needs a hint). */
uint64_t engine_enabled_wqs(struct vdsa_engine *engine);

/* A whole descriptor the poller took from the slot at BAR2 offset. */
struct taken {
	uint32_t offset;
	uint8_t descriptor[DESC_SIZE];
};
/* Queues each on its offset's WQ, or drops and counts it, under one lock; wakes no worker
 * (engine_poll_run does). */
void engine_submit(struct vdsa_engine *engine, const struct taken *taken, uint32_t count);
/* Wakes the idle workers that have work, and runs one descriptor in the calling thread (the
 * poller) for an engine that would otherwise need waking. True if it ran one. */
bool engine_poll_run(struct vdsa_engine *engine);

/* --- poller.c: mapped portals --------------------------------------------- */

struct poller;

/* A sealed memfd of size bytes mapped here, and the thread that sweeps it. */
struct poller *poller_create(struct vdsa_engine *engine, uint32_t size, int *error);
void poller_destroy(struct poller *poller);
/* End the poller's sleep now (a WQ was enabled). */
void poller_kick(struct poller *poller);
int poller_fd(const struct poller *poller);
uint64_t poller_sleeps(struct poller *poller);

#endif
