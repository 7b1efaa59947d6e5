/* CRC generation: CRCGEN, and COPY_CRC, which copies as it computes (the CRC arithmetic is
 * crc.c's). */
#include <string.h>

#include "internal.h"

uint32_t check_crc(const struct job *job)
{
	uint64_t src = le64(job->d + 16), dst = le64(job->d + 24), n = job->size;

	if ((job->flags & F_OP16) && (le64(job->d + 48) & 3))
		return ST_ADDR_ALIGN;
	return job->op == OP_COPY_CRC && overlaps(src, n, dst, n) ? ST_OVERLAP_BUFFERS : 0;
}

uint32_t op_crc(struct job *job)
{
	bool copy = job->op == OP_COPY_CRC;
	uint64_t src = le64(job->d + 16), dst = le64(job->d + 24), n = job->size, done = 0;
	uint32_t crc_flags = job->flags & F_CRC_OPS, seed = le32(job->d + 40), state;
	uint8_t *hs, *hd = NULL;
	uint32_t status = ST_SUCCESS;

	if (job->flags & F_OP16) {
		uint64_t seed_addr = le64(job->d + 48);
		uint8_t raw[4];
		uint64_t got = dma_read(job->dma, seed_addr, raw, 4);

		if (got < 4)
			return fault(job, seed_addr + got, 0, false);
		seed = le32(raw);
	}
	state = crc_begin(seed, crc_flags);
	if (wraps(src, n))
		status = fault(job, src, 0, false);
	else if (copy && wraps(dst, n))
		status = fault(job, dst, 0, true);
	while (status == ST_SUCCESS && done < n) {
		uint64_t ss = dma_span(job->dma, src + done, n - done, PROT_READABLE, &hs);
		uint64_t chunk = ss;

		if (copy) {
			uint64_t ds = dma_span(job->dma, dst + done, n - done, PROT_WRITABLE, &hd);

			chunk = ss < ds ? ss : ds;
		}
		if (chunk == 0) {
			status = ss == 0 ? fault(job, src + done, done, false)
					 : fault(job, dst + done, done, true);
			break;
		}
		if (copy)
			memcpy(hd, hs, chunk);
		state = crc_update(state, hs, chunk, crc_flags);
		done += chunk;
	}
	put64(job->out->specific, crc_end(state, crc_flags));
	return status;
}
