/* The descriptor engine's interface to Python (ctypes) and to libvfio-user.
 * Behaviour: README.md in this directory. */
#ifndef VDSA_ENGINE_H
#define VDSA_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include <libvfio-user.h>

#define VDSA_MAX_WQS 64
#define VDSA_MAX_ENGINES 64
#define VDSA_MAX_MSIX 2048

struct vdsa_engine;

struct vdsa_engine_config {
	uint32_t num_wqs;
	uint32_t num_msix;
	uint64_t opcap[4]; /* OPCAP bits: opcode n is bit n % 64 of word n / 64 */
	bool interrupt_handles; /* handles must be granted (REQUEST_INT_HANDLE) */
};

struct vdsa_wq_config {
	uint32_t size; /* descriptors the WQ holds */
	uint32_t priority;
	uint64_t engines; /* bitmap of the engines of the WQ's group */
	uint32_t max_transfer_size;
	uint32_t max_batch_size;
};

/* One software error for SWERR, as the engine found it. */
struct vdsa_swerr {
	uint8_t error; /* completion status code */
	uint8_t operation;
	uint8_t wq;
	uint8_t fault_rw; /* 1: the fault was on a write */
	uint8_t batch; /* 1: a descriptor inside a batch */
	uint8_t desc_valid;
	uint16_t batch_index;
	uint32_t invalid_flags;
	uint64_t fault_addr;
};

struct vdsa_wq_counters {
	uint64_t submitted; /* whole descriptors accepted into the WQ */
	uint64_t completed; /* descriptors (batch entries counted once, in the batch) done */
	uint64_t dropped_disabled;
	uint64_t dropped_full;
	uint64_t dropped_torn;
	uint64_t errors; /* completions with a status other than SUCCESS/SUCCESS_PRED */
};

/* Lifecycle. create() starts no thread; engines start with their first enabled WQ. */
struct vdsa_engine *vdsa_engine_create(const struct vdsa_engine_config *config);
void vdsa_engine_destroy(struct vdsa_engine *engine);

/* Mapped portals (poller.c has the submitter/poller contract): BAR2 becomes a sealed memfd
 * of bar2_size bytes, swept by a thread of the engine's own. Before attach_vfu. Returns
 * the memfd (the engine owns it; a client maps it) or -errno. */
int vdsa_engine_map_portals(struct vdsa_engine *engine, uint32_t bar2_size);
/* Times the poller slept since map_portals (its idle cost). */
uint64_t vdsa_engine_portal_sleeps(struct vdsa_engine *engine);
/* Descriptors written to the portals of no WQ (BAR2 beyond the last WQ's pages): dropped. */
uint64_t vdsa_engine_stray_descriptors(struct vdsa_engine *engine);
/* ctx must have been created with this engine as its private pointer. Registers BAR2
 * (size bytes) with the engine's own access callback (portal writes while
 * PCI_COMMAND.MEM is clear are ignored) and, with mapped portals, the memfd as the whole
 * BAR's one mmap area; registers the engine's own DMA callbacks, so that the client's maps
 * and unmaps become the engine's without a call into Python (a vIOMMU guest sends a pair for
 * every page it maps); and makes vfu_irq_trigger on ctx the way interrupts leave. Before
 * vfu_realize_ctx. */
int vdsa_engine_attach_vfu(struct vdsa_engine *engine, vfu_ctx_t *ctx, uint32_t bar2_size);
/* vfu_attach_ctx / vfu_run_ctx wrapped so that interrupts raised meanwhile by workers are
 * delivered after it, never while libvfio-user may be replacing the eventfds. vfu_run
 * handles up to 16 waiting messages in one call and returns how many (0: none waited), or
 * -1 with errno from the first failing vfu_run_ctx. */
int vdsa_engine_vfu_attach(struct vdsa_engine *engine);
int vdsa_engine_vfu_run(struct vdsa_engine *engine);
/* Portal write as libvfio-user's region callback would pass it (exposed for tests). */
int vdsa_engine_portal_write(struct vdsa_engine *engine, uint64_t offset, const void *data,
			     uint32_t size);

/* Guest memory. prot: bit 0 read, bit 1 write. unmap waits for descriptors in progress. */
int vdsa_engine_dma_map(struct vdsa_engine *engine, uint64_t iova, uint64_t length,
			void *vaddr, uint32_t prot);
int vdsa_engine_dma_unmap(struct vdsa_engine *engine, uint64_t iova, uint64_t length);
/* The regions mapped, in iova order: fills out with at most max, returns how many there are. */
struct vdsa_dma_region {
	uint64_t iova;
	uint64_t length;
	uint32_t prot;
};
uint64_t vdsa_engine_dma_regions(struct vdsa_engine *engine, struct vdsa_dma_region *out,
				 uint64_t max);
/* What the DMA callbacks attach_vfu registers have done. */
struct vdsa_dma_counters {
	uint64_t maps; /* regions libvfio-user added */
	uint64_t unmaps; /* regions libvfio-user removed */
	uint64_t unreachable; /* added without an fd (guest RAM not shared): descriptors fault */
	uint64_t map_failures; /* added with one, and the engine had no memory to map it */
};
void vdsa_engine_get_dma_counters(struct vdsa_engine *engine, struct vdsa_dma_counters *out);

/* WQs. disable waits until the WQ is empty; drain waits for every descriptor the WQ
 * accepted before the call (not for those a busy client adds meanwhile); abort drops the
 * queued ones (no completion) and waits for those in progress, which stop early. */
int vdsa_engine_wq_enable(struct vdsa_engine *engine, uint32_t wq,
			  const struct vdsa_wq_config *config);
int vdsa_engine_wq_disable(struct vdsa_engine *engine, uint32_t wq);
int vdsa_engine_wq_drain(struct vdsa_engine *engine, uint32_t wq);
int vdsa_engine_wq_abort(struct vdsa_engine *engine, uint32_t wq);
/* The same waits without blocking the caller (a device command must not hold up the
 * server's message loop): disable_start stops the WQ taking descriptors at once and lets the
 * workers finish its queue; drain_start waits as drain does. When a WQ's wait ends the
 * engine writes command_fd (an eventfd); wq_waiting is 1 while a started wait is not over.
 * A new start on a waiting WQ extends its wait; abort and reset end it. */
int vdsa_engine_wq_disable_start(struct vdsa_engine *engine, uint32_t wq);
int vdsa_engine_wq_drain_start(struct vdsa_engine *engine, uint32_t wq);
int vdsa_engine_wq_waiting(struct vdsa_engine *engine, uint32_t wq);
int vdsa_engine_command_fd(struct vdsa_engine *engine);
/* Every WQ disabled, queues dropped, interrupt handles released. */
void vdsa_engine_reset(struct vdsa_engine *engine);
int vdsa_engine_get_counters(struct vdsa_engine *engine, uint32_t wq,
			     struct vdsa_wq_counters *out);

/* Runs one descriptor in the calling thread as if WQ wq's engine had taken it
 * (the WQ must be enabled). For tests and benchmarks of the operations. */
int vdsa_engine_execute(struct vdsa_engine *engine, uint32_t wq, const void *descriptor);

/* Interrupts. */
int vdsa_engine_set_int_handle(struct vdsa_engine *engine, uint32_t handle, bool granted);
void vdsa_engine_irq_mask(struct vdsa_engine *engine, uint32_t start, uint32_t count,
			  bool masked);
void vdsa_engine_irq_trigger(struct vdsa_engine *engine, uint32_t vector);
/* The client's MSI-X state is gone (reset, disconnect): unmasked, nothing pending. */
void vdsa_engine_irq_reset(struct vdsa_engine *engine);
/* Interrupts raised so far on a vector (delivered or not). */
uint64_t vdsa_engine_irq_count(struct vdsa_engine *engine, uint32_t vector);

/* Software errors: an eventfd readable while errors wait; pop returns 1 with one, 0 when
 * none is left. */
int vdsa_engine_error_fd(struct vdsa_engine *engine);
int vdsa_engine_pop_error(struct vdsa_engine *engine, struct vdsa_swerr *out);

#endif
