/* The operations that move, fill, compare and flush memory: MEMMOVE, MEMFILL, COMPARE,
 * COMPVAL, CR_DELTA, AP_DELTA, DUALCAST and CFLUSH. */
#include <string.h>

#include "internal.h"

#define DELTA_MAX_SIZE 0x80000u
#define DELTA_ENTRY 10u

uint32_t op_memmove(struct job *job)
{
	uint64_t src = le64(job->d + 16), dst = le64(job->d + 24), n = job->size, done = 0;
	uint8_t *hs, *hd;

	if (wraps(src, n))
		return fault(job, src, 0, false);
	if (wraps(dst, n))
		return fault(job, dst, 0, true);
	if (dst > src && dst - src < n) {
		/* Destination above an overlapping source: copy back to front. */
		job->out->result = 1;
		while (done < n) {
			uint64_t ss = dma_span_back(job->dma, src + n - done, n - done,
						    PROT_READABLE, &hs);
			uint64_t ds = dma_span_back(job->dma, dst + n - done, n - done,
						    PROT_WRITABLE, &hd);
			uint64_t chunk = ss < ds ? ss : ds;

			if (chunk == 0)
				return ss == 0 ? fault(job, src + n - done - 1, done, false)
					       : fault(job, dst + n - done - 1, done, true);
			memmove(hd + ds - chunk, hs + ss - chunk, chunk);
			done += chunk;
		}
	} else {
		while (done < n) {
			uint64_t ss = dma_span(job->dma, src + done, n - done, PROT_READABLE, &hs);
			uint64_t ds = dma_span(job->dma, dst + done, n - done, PROT_WRITABLE, &hd);
			uint64_t chunk = ss < ds ? ss : ds;

			if (chunk == 0)
				return ss == 0 ? fault(job, src + done, done, false)
					       : fault(job, dst + done, done, true);
			memmove(hd, hs, chunk);
			done += chunk;
		}
	}
	return ST_SUCCESS;
}

#define TILE 4096u

/* A run of the 8-byte pattern long enough to copy TILE bytes from any phase. */
static void make_tile(uint8_t *tile, uint64_t pattern)
{
	for (uint32_t i = 0; i < TILE + 8; i += 8)
		memcpy(tile + i, &pattern, 8);
}

uint32_t op_memfill(struct job *job)
{
	uint64_t dst = le64(job->d + 24), n = job->size, done = 0, pattern = le64(job->d + 16);
	/* One byte repeated (zeroing, the common case): memset stores without reading. */
	bool one_byte = pattern == (pattern & 0xFF) * 0x0101010101010101ull;
	uint8_t tile[TILE + 8];
	uint8_t *hd;

	if (!one_byte)
		make_tile(tile, pattern);
	if (wraps(dst, n))
		return fault(job, dst, 0, true);
	while (done < n) {
		uint64_t ds = dma_span(job->dma, dst + done, n - done, PROT_WRITABLE, &hd);

		if (ds == 0)
			return fault(job, dst + done, done, true);
		if (one_byte)
			memset(hd, (int)(pattern & 0xFF), ds);
		for (uint64_t at = 0; !one_byte && at < ds;) {
			uint64_t piece = ds - at < TILE ? ds - at : TILE;

			memcpy(hd + at, tile + ((done + at) & 7), piece);
			at += piece;
		}
		done += ds;
	}
	return ST_SUCCESS;
}

static uint32_t checked_result(struct job *job, uint8_t result, uint8_t accepted_mask)
{
	job->out->result = result;
	if (!(job->flags & F_CHECK))
		return ST_SUCCESS;
	return (accepted_mask >> result) & 1 ? ST_SUCCESS : ST_SUCCESS_PRED;
}

static uint32_t first_difference(const uint8_t *a, const uint8_t *b, uint64_t n)
{
	uint64_t i = 0;

	while (i + 8 <= n && le64(a + i) == le64(b + i))
		i += 8;
	while (a[i] == b[i])
		i++;
	return (uint32_t)i;
}

/* COMPARE (second operand in guest memory) and COMPVAL (the 8-byte pattern). */
uint32_t op_compare(struct job *job)
{
	bool pattern = job->op == OP_COMPVAL;
	uint64_t src = le64(job->d + 16), src2 = le64(job->d + 24), n = job->size, done = 0;
	uint8_t expected = job->d[40] & 1;
	uint8_t tile[TILE + 8];
	uint8_t *h1, *h2;

	if (pattern)
		make_tile(tile, src2);
	if (wraps(src, n))
		return fault(job, src, 0, false);
	if (!pattern && wraps(src2, n))
		return fault(job, src2, 0, false);
	while (done < n) {
		uint64_t s1 = dma_span(job->dma, src + done, n - done, PROT_READABLE, &h1);
		uint64_t s2 = n - done < TILE ? n - done : TILE;
		uint64_t chunk;

		if (pattern)
			h2 = tile + (done & 7);
		else
			s2 = dma_span(job->dma, src2 + done, n - done, PROT_READABLE, &h2);
		chunk = s1 < s2 ? s1 : s2;
		if (chunk == 0)
			return s1 == 0 ? fault(job, src + done, done, false)
				       : fault(job, src2 + done, done, false);
		if (memcmp(h1, h2, chunk) != 0) {
			job->out->bytes_completed = (uint32_t)done + first_difference(h1, h2, chunk);
			return checked_result(job, 1, (uint8_t)(1u << expected));
		}
		done += chunk;
	}
	return checked_result(job, 0, (uint8_t)(1u << expected));
}

uint32_t check_cr_delta(const struct job *job)
{
	const uint8_t *d = job->d;

	if (job->size % 8 || job->size > DELTA_MAX_SIZE)
		return ST_XFER_ERANGE;
	if ((le64(d + 16) | le64(d + 24) | le64(d + 40)) & 7)
		return ST_ADDR_ALIGN;
	return le32(d + 48) == 0 || le32(d + 48) % DELTA_ENTRY ? ST_DR_ERANGE : 0;
}

uint32_t op_cr_delta(struct job *job)
{
	uint64_t src1 = le64(job->d + 16), src2 = le64(job->d + 24), delta = le64(job->d + 40);
	uint32_t max_size = le32(job->d + 48), n = job->size, record = 0;
	uint64_t done = 0;
	uint8_t *h1, *h2;

	while (done < n) {
		uint64_t s1 = dma_span(job->dma, src1 + done, n - done, PROT_READABLE, &h1);
		uint64_t s2 = dma_span(job->dma, src2 + done, n - done, PROT_READABLE, &h2);
		uint64_t chunk = (s1 < s2 ? s1 : s2) & ~7ull;

		if (chunk == 0) {
			put32(job->out->specific, record);
			job->out->result = record ? 1 : 0;
			return s1 < 8 ? fault(job, src1 + done + s1, done, false)
				      : fault(job, src2 + done + s2, done, false);
		}
		for (uint64_t at = 0; at < chunk; at += 8) {
			uint8_t entry[DELTA_ENTRY];
			uint64_t writable;

			if (le64(h1 + at) == le64(h2 + at))
				continue;
			if (record + DELTA_ENTRY > max_size) {
				job->out->bytes_completed = (uint32_t)(done + at);
				put32(job->out->specific, record);
				return checked_result(job, 2, job->d[56] & 7);
			}
			put16(entry, (uint16_t)((done + at) / 8));
			memcpy(entry + 2, h2 + at, 8);
			/* An entry is written whole or not at all. */
			writable = dma_accessible(job->dma, delta + record, DELTA_ENTRY,
						  PROT_WRITABLE);
			if (writable < DELTA_ENTRY) {
				put32(job->out->specific, record);
				job->out->result = record ? 1 : 0;
				return fault(job, delta + record + writable, done + at, true);
			}
			dma_write(job->dma, delta + record, entry, DELTA_ENTRY);
			record += DELTA_ENTRY;
		}
		done += chunk;
	}
	put32(job->out->specific, record);
	return checked_result(job, record ? 1 : 0, job->d[56] & 7);
}

uint32_t check_ap_delta(const struct job *job)
{
	uint64_t src = le64(job->d + 16), dst = le64(job->d + 24);
	uint32_t record = le32(job->d + 40), n = job->size;

	if (n % 8 || n > DELTA_MAX_SIZE)
		return ST_XFER_ERANGE;
	if (record == 0 || record % DELTA_ENTRY)
		return ST_DR_ERANGE;
	if ((src | dst) & 7)
		return ST_ADDR_ALIGN;
	return overlaps(src, record, dst, n) ? ST_OVERLAP_BUFFERS : 0;
}

uint32_t op_ap_delta(struct job *job)
{
	uint64_t delta = le64(job->d + 16), dst = le64(job->d + 24);
	uint32_t record_size = le32(job->d + 40), n = job->size;
	uint32_t previous = 0;

	for (uint32_t at = 0; at < record_size; at += DELTA_ENTRY) {
		uint8_t entry[DELTA_ENTRY];
		uint64_t got = dma_read(job->dma, delta + at, entry, DELTA_ENTRY);
		uint32_t offset;

		if (got < DELTA_ENTRY)
			return fault(job, delta + at + got, at, false);
		offset = le16(entry);
		job->out->bytes_completed = at;
		if (at > 0 && offset <= previous)
			return ST_DR_OFFSET_NOINC;
		if ((uint64_t)offset * 8 + 8 > n)
			return ST_DR_OFFSET_ERANGE;
		got = dma_write(job->dma, dst + (uint64_t)offset * 8, entry + 2, 8);
		if (got < 8)
			return fault(job, dst + (uint64_t)offset * 8 + got, at, true);
		previous = offset;
	}
	job->out->bytes_completed = record_size;
	return ST_SUCCESS;
}

uint32_t check_dualcast(const struct job *job)
{
	uint64_t src = le64(job->d + 16), dst = le64(job->d + 24), dst2 = le64(job->d + 40);
	uint64_t n = job->size;

	if ((dst ^ dst2) & 0xFFF)
		return ST_DCAST_ERR;
	if (overlaps(src, n, dst, n) || overlaps(src, n, dst2, n) || overlaps(dst, n, dst2, n))
		return ST_OVERLAP_BUFFERS;
	return 0;
}

uint32_t op_dualcast(struct job *job)
{
	uint64_t src = le64(job->d + 16), dst1 = le64(job->d + 24), dst2 = le64(job->d + 40);
	uint64_t n = job->size, done = 0;
	uint8_t *hs, *h1, *h2;

	if (wraps(src, n))
		return fault(job, src, 0, false);
	if (wraps(dst1, n))
		return fault(job, dst1, 0, true);
	if (wraps(dst2, n))
		return fault(job, dst2, 0, true);
	while (done < n) {
		uint64_t ss = dma_span(job->dma, src + done, n - done, PROT_READABLE, &hs);
		uint64_t s1 = dma_span(job->dma, dst1 + done, n - done, PROT_WRITABLE, &h1);
		uint64_t s2 = dma_span(job->dma, dst2 + done, n - done, PROT_WRITABLE, &h2);
		uint64_t chunk = ss < s1 ? ss : s1;

		chunk = chunk < s2 ? chunk : s2;
		if (chunk == 0) {
			if (ss == 0)
				return fault(job, src + done, done, false);
			return s1 == 0 ? fault(job, dst1 + done, done, true)
				       : fault(job, dst2 + done, done, true);
		}
		memcpy(h1, hs, chunk);
		memcpy(h2, hs, chunk);
		done += chunk;
	}
	return ST_SUCCESS;
}

uint32_t op_cflush(struct job *job)
{
	uint64_t dst = le64(job->d + 24), n = job->size;
	uint64_t got = wraps(dst, n) ? 0 : dma_accessible(job->dma, dst, n, PROT_MAPPED);

	/* A flush writes lines back: a fault counts as a write. */
	if (got < n)
		return fault(job, dst + got, got, true);
	return ST_SUCCESS;
}
