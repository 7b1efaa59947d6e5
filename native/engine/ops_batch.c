/* The operations that move no data of their own: NOOP, BATCH and DRAIN. */
#include <stdatomic.h>

#include "internal.h"

uint32_t op_noop(struct job *job)
{
	(void)job;
	return ST_SUCCESS;
}

uint32_t check_batch(const struct job *job)
{
	if (job->size < 2 || job->size > job->ctx->wq_config->max_batch_size)
		return ST_DESC_CNT_ERANGE;
	return le64(job->d + 16) & 63 ? ST_DESCLIST_ALIGN : 0;
}

uint32_t op_batch(struct job *job)
{
	uint64_t list = le64(job->d + 16);
	uint32_t count = job->size, processed = 0, status = ST_SUCCESS;
	bool failed = false;

	for (uint32_t i = 0; i < count; i++) {
		uint8_t entry[DESC_SIZE];
		uint64_t got;
		uint32_t entry_flags;

		if (atomic_load(job->ctx->abort))
			return ST_ABANDONED;
		/* Between entries, let a waiting DMA unmap in. */
		pthread_rwlock_unlock((pthread_rwlock_t *)&job->dma->lock);
		pthread_rwlock_rdlock((pthread_rwlock_t *)&job->dma->lock);
		got = dma_read(job->dma, list + (uint64_t)i * DESC_SIZE, entry, DESC_SIZE);
		if (got < DESC_SIZE) {
			job->out->fault_addr = list + (uint64_t)i * DESC_SIZE + got;
			status = ST_BATCH_PAGE_FAULT;
			break;
		}
		entry_flags = le32(entry + 4) & 0xFFFFFF;
		if ((entry_flags & F_FENCE) && failed) {
			failed = true;
			break;
		}
		if (process_descriptor(job->ctx, job->dma, entry, (int)i) != ST_SUCCESS)
			failed = true;
		processed++;
	}
	job->out->bytes_completed = processed;
	if (status == ST_SUCCESS && (failed || processed < count))
		status = ST_BATCH_FAIL;
	return status;
}

uint32_t op_drain(struct job *job)
{
	/* Earlier descriptors may wait for the DMA lock behind an unmap: not held here. */
	pthread_rwlock_unlock((pthread_rwlock_t *)&job->dma->lock);
	engine_drain_wait(job->ctx);
	pthread_rwlock_rdlock((pthread_rwlock_t *)&job->dma->lock);
	return ST_SUCCESS;
}
