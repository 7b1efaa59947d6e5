/* Shared between the engine's translation units; not part of the API. */
#ifndef VDSA_INTERNAL_H
#define VDSA_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

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
/* The regions in iova order, at most max of them copied; returns how many there are. */
uint64_t dma_list(struct dma_table *table, struct vdsa_dma_region *out, uint64_t max);
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

/* --- descriptor.c: one descriptor ----------------------------------------- */

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

/* --- descriptor.c and ops_*.c: the operations ----------------------------- */

enum opcode {
	OP_NOOP = 0x00, OP_BATCH = 0x01, OP_DRAIN = 0x02, OP_MEMMOVE = 0x03, OP_MEMFILL = 0x04,
	OP_COMPARE = 0x05, OP_COMPVAL = 0x06, OP_CR_DELTA = 0x07, OP_AP_DELTA = 0x08,
	OP_DUALCAST = 0x09, OP_CRCGEN = 0x10, OP_COPY_CRC = 0x11, OP_DIF_CHECK = 0x12,
	OP_DIF_INS = 0x13, OP_DIF_STRP = 0x14, OP_DIF_UPDT = 0x15, OP_CFLUSH = 0x20,
	OP_LIMIT = 0x21,
};

enum status {
	ST_SUCCESS = 0x01, ST_SUCCESS_PRED = 0x02, ST_PAGE_FAULT_NOBOF = 0x03,
	ST_BATCH_FAIL = 0x05, ST_BATCH_PAGE_FAULT = 0x06, ST_DR_OFFSET_NOINC = 0x07,
	ST_DR_OFFSET_ERANGE = 0x08, ST_DIF_ERR = 0x09, ST_BAD_OPCODE = 0x10,
	ST_INVALID_FLAGS = 0x11, ST_NOZERO_RESERVE = 0x12, ST_XFER_ERANGE = 0x13,
	ST_DESC_CNT_ERANGE = 0x14, ST_DR_ERANGE = 0x15, ST_OVERLAP_BUFFERS = 0x16,
	ST_DCAST_ERR = 0x17, ST_DESCLIST_ALIGN = 0x18, ST_INT_HANDLE_INVAL = 0x19,
	ST_CRA_XLAT = 0x1a, ST_CRA_ALIGN = 0x1b, ST_ADDR_ALIGN = 0x1c,
	/* Not a DSA code: a batch entry left undone by a fence or an abort. */
	ST_ABANDONED = 0x100,
};

#define STATUS_WRITE_FAULT 0x80

enum flag {
	F_FENCE = 0x1, F_BOF = 0x2, F_CRAV = 0x4, F_RCR = 0x8, F_RCI = 0x10, F_CHECK = 0x80,
	F_CC = 0x100, F_A1 = 0x200, F_A2 = 0x400, F_A3 = 0x800, F_STORD = 0x2000,
	F_DRDBK = 0x4000, F_OP16 = 1u << 16, F_OP17 = 1u << 17, F_OP18 = 1u << 18,
};

#define F_CRC_OPS (F_OP16 | F_OP17 | F_OP18)

static inline uint16_t le16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* [a, a + la) and [b, b + lb) share a byte (lengths non-zero). */
static inline bool overlaps(uint64_t a, uint64_t la, uint64_t b, uint64_t lb)
{
	return (unsigned __int128)a < (unsigned __int128)b + lb &&
	       (unsigned __int128)b < (unsigned __int128)a + la;
}

static inline bool wraps(uint64_t addr, uint64_t length)
{
	return length && addr > UINT64_MAX - (length - 1);
}

/* What an operation reports, for the completion record. */
struct outcome {
	uint32_t status; /* enum status, possibly | STATUS_WRITE_FAULT */
	uint8_t result;
	uint32_t bytes_completed;
	uint64_t fault_addr;
	uint8_t specific[16]; /* record bytes 16-31 */
};

/* One descriptor in progress. */
struct job {
	struct exec_context *ctx;
	const struct dma_table *dma;
	const uint8_t *d;
	uint8_t op; /* d[7]: lets one handler serve the opcodes of a family */
	uint32_t flags;
	uint32_t size;
	struct outcome *out;
};

/* A page fault at addr after completed bytes; returns the status it set. */
uint32_t fault(struct job *job, uint64_t addr, uint64_t completed, bool write);
/* One descriptor, in a batch when batch_index >= 0 (ops_batch.c runs the entries); returns
 * its status. */
uint32_t process_descriptor(struct exec_context *ctx, const struct dma_table *dma,
			    const uint8_t *d, int batch_index);

/* The opcodes' own checks (README.md, check 7, after the transfer size): 0 when the
 * descriptor may run, else its status. */
uint32_t check_batch(const struct job *job);
uint32_t check_cr_delta(const struct job *job);
uint32_t check_ap_delta(const struct job *job);
uint32_t check_dualcast(const struct job *job);
uint32_t check_crc(const struct job *job);
uint32_t check_dif(const struct job *job);

/* The operations; each returns the status. ops_batch.c: */
uint32_t op_noop(struct job *job);
uint32_t op_batch(struct job *job);
uint32_t op_drain(struct job *job);
/* ops_move.c: */
uint32_t op_memmove(struct job *job);
uint32_t op_memfill(struct job *job);
uint32_t op_compare(struct job *job); /* COMPARE and COMPVAL */
uint32_t op_cr_delta(struct job *job);
uint32_t op_ap_delta(struct job *job);
uint32_t op_dualcast(struct job *job);
uint32_t op_cflush(struct job *job);
/* ops_crc.c: CRCGEN and COPY_CRC. */
uint32_t op_crc(struct job *job);
/* ops_dif.c: DIF_CHECK, DIF_INS, DIF_STRP and DIF_UPDT. */
uint32_t op_dif(struct job *job);

/* --- engine.c services used by descriptor.c and ops_*.c ------------------- */

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
/* Empties WQ wq's portal slots, in the poller's thread between two sweeps, and returns how
 * many held a descriptor. For a WQ about to be enabled: descriptors written while it was
 * disabled are dropped, as DSA drops them at the portal, never run once it is enabled (with
 * no WQ enabled the poller sleeps and leaves them in their slots). Any sweep that took one
 * before submitted it while the WQ was still disabled. */
uint32_t poller_discard_wq(struct poller *poller, uint32_t wq);
int poller_fd(const struct poller *poller);
uint64_t poller_sleeps(struct poller *poller);

#endif
