/* One descriptor: validation, the operation against guest memory, completion.
 * Behaviour and the order of checks: README.md. */
#include <stdatomic.h>
#include <string.h>

#include "internal.h"

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

#define F_COMMON (F_CRAV | F_RCR | F_RCI)
#define F_WRITER (F_FENCE | F_BOF | F_CC | F_STORD | F_DRDBK)
#define F_CRC_OPS (F_OP16 | F_OP17 | F_OP18)

/* Extra flags each opcode takes beyond F_COMMON; 0 marks an opcode DSA 1.x lacks. */
static const uint32_t allowed_flags[OP_LIMIT] = {
	[OP_NOOP] = F_FENCE,
	[OP_BATCH] = F_A1,
	[OP_DRAIN] = F_A1 | F_A2 | F_OP16 | F_OP17,
	[OP_MEMMOVE] = F_WRITER | F_A1 | F_A2,
	[OP_MEMFILL] = F_WRITER | F_A2,
	[OP_COMPARE] = F_FENCE | F_BOF | F_CHECK | F_A1 | F_A2,
	[OP_COMPVAL] = F_FENCE | F_BOF | F_CHECK | F_A1,
	[OP_CR_DELTA] = F_WRITER | F_CHECK | F_A1 | F_A2 | F_A3,
	[OP_AP_DELTA] = F_WRITER | F_A1 | F_A2,
	[OP_DUALCAST] = F_WRITER | F_A1 | F_A2 | F_A3,
	[OP_CRCGEN] = F_FENCE | F_BOF | F_A1 | F_A3 | F_CRC_OPS,
	[OP_COPY_CRC] = F_WRITER | F_A1 | F_A2 | F_A3 | F_CRC_OPS,
	[OP_DIF_CHECK] = F_FENCE | F_BOF | F_A1,
	[OP_DIF_INS] = F_WRITER | F_A1 | F_A2,
	[OP_DIF_STRP] = F_WRITER | F_A1 | F_A2,
	[OP_DIF_UPDT] = F_WRITER | F_A1 | F_A2,
	[OP_CFLUSH] = F_WRITER | F_A2,
};

static bool known_opcode(uint8_t op)
{
	return op < OP_LIMIT && (op == OP_NOOP || allowed_flags[op] != 0);
}

#define BYTES(lo, hi) ((~0ull >> (63 - (hi))) & (~0ull << (lo)))

/* Descriptor bytes that must be zero, as bit n = byte n (38-39 always). */
static const uint64_t reserved_bytes[OP_LIMIT] = {
	[OP_NOOP] = BYTES(16, 35) | BYTES(40, 63),
	[OP_BATCH] = BYTES(24, 31) | BYTES(40, 63),
	[OP_DRAIN] = BYTES(32, 35) | BYTES(40, 63),
	[OP_MEMMOVE] = BYTES(40, 63),
	[OP_MEMFILL] = BYTES(40, 63),
	[OP_COMPARE] = BYTES(41, 63),
	[OP_COMPVAL] = BYTES(41, 63),
	[OP_CR_DELTA] = BYTES(52, 55) | BYTES(57, 63),
	[OP_AP_DELTA] = BYTES(44, 63),
	[OP_DUALCAST] = BYTES(48, 63),
	[OP_CRCGEN] = BYTES(24, 31) | BYTES(44, 47) | BYTES(56, 63),
	[OP_COPY_CRC] = BYTES(44, 47) | BYTES(56, 63),
	[OP_DIF_CHECK] = BYTES(24, 31) | BYTES(41, 41) | BYTES(43, 47) | BYTES(56, 63),
	[OP_DIF_STRP] = BYTES(41, 41) | BYTES(43, 47) | BYTES(56, 63),
	[OP_DIF_INS] = BYTES(40, 40) | BYTES(43, 55),
	[OP_DIF_UPDT] = BYTES(43, 47),
	[OP_CFLUSH] = BYTES(16, 23) | BYTES(40, 63),
};

#define DELTA_MAX_SIZE 0x80000u
#define DELTA_ENTRY 10u
#define DIF_SIZE 8u
#define DIF_MAX_BLOCK 4104u

static const uint32_t dif_block_sizes[4] = { 512, 520, 4096, 4104 };

static uint16_t le16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

struct outcome {
	uint32_t status; /* enum status, possibly | STATUS_WRITE_FAULT */
	uint8_t result;
	uint32_t bytes_completed;
	uint64_t fault_addr;
	uint8_t specific[16]; /* record bytes 16-31 */
};

struct job {
	struct exec_context *ctx;
	const struct dma_table *dma;
	const uint8_t *d;
	uint32_t flags;
	uint32_t size;
	struct outcome *out;
};

static uint32_t fault(struct job *job, uint64_t addr, uint64_t completed, bool write)
{
	job->out->fault_addr = addr;
	job->out->bytes_completed = (uint32_t)completed;
	job->out->status = ST_PAGE_FAULT_NOBOF | (write ? STATUS_WRITE_FAULT : 0);
	return job->out->status;
}

/* [a, a + la) and [b, b + lb) share a byte (lengths non-zero). */
static bool overlaps(uint64_t a, uint64_t la, uint64_t b, uint64_t lb)
{
	return (unsigned __int128)a < (unsigned __int128)b + lb &&
	       (unsigned __int128)b < (unsigned __int128)a + la;
}

static bool wraps(uint64_t addr, uint64_t length)
{
	return length && addr > UINT64_MAX - (length - 1);
}

/* --- Operations ------------------------------------------------------------------------- */

static uint32_t op_memmove(struct job *job)
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

static uint32_t op_memfill(struct job *job)
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
static uint32_t op_compare(struct job *job, bool pattern)
{
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

static uint32_t op_cr_delta(struct job *job)
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

static uint32_t op_ap_delta(struct job *job)
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

static uint32_t op_dualcast(struct job *job)
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

/* CRCGEN, and COPY_CRC when copy is set. */
static uint32_t op_crc(struct job *job, bool copy)
{
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

/* --- DIF -------------------------------------------------------------------------------- */

struct dif_tags {
	uint32_t ref;
	uint16_t app;
	uint16_t mask;
	bool fixed_ref;
	bool increment_app;
};

enum { SRC_F_ENABLE_ERROR = 0x01, SRC_F_ALL = 0x02, SRC_F_APP = 0x04, SRC_F_APP_REF = 0x08,
       SRC_INC_APP = 0x10, SRC_NO_GUARD = 0x20, SRC_NO_REF = 0x40, SRC_FIXED_REF = 0x80 };
enum { DST_PASS_APP = 0x08, DST_INC_APP = 0x10, DST_PASS_GUARD = 0x20, DST_PASS_REF = 0x40,
       DST_FIXED_REF = 0x80 };
enum { DIF_GUARD_ERR = 0x01, DIF_APP_ERR = 0x02, DIF_REF_ERR = 0x04, DIF_ALL_F_ERR = 0x08 };

static struct dif_tags tags_at(const uint8_t *d, uint32_t ref_at, bool fixed, bool increment)
{
	return (struct dif_tags){ le32(d + ref_at), le16(d + ref_at + 6), le16(d + ref_at + 4),
				  fixed, increment };
}

static uint32_t block_ref(const struct dif_tags *t, uint32_t block)
{
	return t->fixed_ref ? t->ref : t->ref + block;
}

static uint16_t block_app(const struct dif_tags *t, uint32_t block)
{
	return t->increment_app ? (uint16_t)(t->app + block) : t->app;
}

static void record_tags(uint8_t *at, const struct dif_tags *t, uint32_t block)
{
	put32(at, block_ref(t, block));
	put16(at + 4, t->mask);
	put16(at + 6, block_app(t, block));
}

static uint16_t guard_of(const uint8_t *block, uint32_t size, uint8_t dif_flags)
{
	uint16_t crc = crc16_t10(dif_flags & 0x4 ? 0xFFFF : 0, block, size);

	return dif_flags & 0x8 ? (uint16_t)~crc : crc;
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put_be32(uint8_t *p, uint32_t v)
{
	put_be16(p, (uint16_t)(v >> 16));
	put_be16(p + 2, (uint16_t)v);
}

static uint8_t dif_verify(const uint8_t *block, uint32_t size, uint8_t src_flags,
			  uint8_t dif_flags, const struct dif_tags *t, uint32_t index)
{
	const uint8_t *dif = block + size;
	uint16_t app = be16(dif + 2);
	uint32_t ref = be32(dif + 4);
	uint8_t errors = 0;

	if ((src_flags & SRC_F_ENABLE_ERROR) && (src_flags & SRC_F_ALL) && app == 0xFFFF &&
	    ref == 0xFFFFFFFF && be16(dif) == 0xFFFF)
		return DIF_ALL_F_ERR;
	if (((src_flags & SRC_F_APP_REF) && app == 0xFFFF && ref == 0xFFFFFFFF) ||
	    ((src_flags & SRC_F_APP) && app == 0xFFFF))
		return 0;
	if (!(src_flags & SRC_NO_GUARD) && guard_of(block, size, dif_flags) != be16(dif))
		errors |= DIF_GUARD_ERR;
	if ((app ^ block_app(t, index)) & (uint16_t)~t->mask)
		errors |= DIF_APP_ERR;
	if (!(src_flags & SRC_NO_REF) && ref != block_ref(t, index))
		errors |= DIF_REF_ERR;
	return errors;
}

static void dif_write(uint8_t *dif, const uint8_t *data, uint32_t size, uint8_t dif_flags,
		      const struct dif_tags *t, uint32_t index, uint8_t dst_flags)
{
	if (!(dst_flags & DST_PASS_GUARD))
		put_be16(dif, guard_of(data, size, dif_flags));
	if (!(dst_flags & DST_PASS_APP))
		put_be16(dif + 2, block_app(t, index) & (uint16_t)~t->mask);
	if (!(dst_flags & DST_PASS_REF))
		put_be32(dif + 4, block_ref(t, index));
}

struct dif_op {
	uint8_t opcode, src_flags, dst_flags, dif_flags;
	uint32_t bs, src_step, dst_step;
	bool checks, writes;
	struct dif_tags in, out;
};

/* Block `index` from `in` to `out` (the same buffer: in place; NULL: nothing written).
 * Returns the DIF error bits of the check, 0 if it passed or there was none. */
static uint8_t dif_block(const struct dif_op *op, const uint8_t *in, uint8_t *out,
			 uint32_t index)
{
	if (op->checks) {
		uint8_t errors = dif_verify(in, op->bs, op->src_flags, op->dif_flags, &op->in,
					    index);

		if (errors)
			return errors;
	}
	if (!out)
		return 0;
	if (out != in)
		memcpy(out, in, op->opcode == OP_DIF_UPDT ? op->bs + DIF_SIZE : op->bs);
	if (op->opcode == OP_DIF_INS || op->opcode == OP_DIF_UPDT)
		dif_write(out + op->bs, in, op->bs, op->dif_flags, &op->out, index,
			  op->opcode == OP_DIF_INS ? 0 : op->dst_flags);
	return 0;
}

/* Block `index` through a copy, checked byte by byte: for a block that straddles two
 * regions or faults. */
static uint32_t dif_block_copied(struct job *job, const struct dif_op *op, uint64_t s,
				 uint64_t t, uint32_t index, uint8_t *errors)
{
	uint8_t block[DIF_MAX_BLOCK + DIF_SIZE];
	uint64_t got = dma_accessible(job->dma, s, op->src_step, PROT_READABLE);

	if (wraps(s, op->src_step) || got < op->src_step)
		return fault(job, s + got, (uint64_t)index * op->src_step, false);
	if (op->writes) {
		got = dma_accessible(job->dma, t, op->dst_step, PROT_WRITABLE);
		if (wraps(t, op->dst_step) || got < op->dst_step)
			return fault(job, t + got, (uint64_t)index * op->src_step, true);
	}
	dma_read(job->dma, s, block, op->src_step);
	*errors = dif_block(op, block, op->writes ? block : NULL, index);
	if (!*errors && op->writes)
		dma_write(job->dma, t, block, op->dst_step);
	return ST_SUCCESS;
}

static uint32_t op_dif(struct job *job, uint8_t opcode)
{
	const uint8_t *d = job->d;
	uint64_t src = le64(d + 16), dst = le64(d + 24);
	struct dif_op op = { .opcode = opcode, .src_flags = d[40], .dst_flags = d[41],
			     .dif_flags = d[42], .checks = opcode != OP_DIF_INS,
			     .writes = opcode != OP_DIF_CHECK };
	uint32_t blocks, b = 0;
	uint32_t status = ST_SUCCESS;
	uint8_t errors = 0;

	op.bs = dif_block_sizes[op.dif_flags & 3];
	op.src_step = op.checks ? op.bs + DIF_SIZE : op.bs;
	op.dst_step = opcode == OP_DIF_STRP ? op.bs : op.bs + DIF_SIZE;
	op.in = tags_at(d, 48, op.src_flags & SRC_FIXED_REF, op.src_flags & SRC_INC_APP);
	op.out = tags_at(d, 56, op.dst_flags & DST_FIXED_REF, op.dst_flags & DST_INC_APP);
	blocks = job->size / op.src_step;
	while (b < blocks && !errors && status == ST_SUCCESS) {
		uint64_t s = src + (uint64_t)b * op.src_step, t = dst + (uint64_t)b * op.dst_step;
		uint8_t *hs, *hd = NULL;
		/* Whole blocks inside one region each way run in place, translated once. */
		uint64_t run = dma_span(job->dma, s, (uint64_t)(blocks - b) * op.src_step,
					PROT_READABLE, &hs) / op.src_step;

		if (run && op.writes)
			run = dma_span(job->dma, t, run * op.dst_step, PROT_WRITABLE, &hd) /
			      op.dst_step;
		if (!run) {
			status = dif_block_copied(job, &op, s, t, b, &errors);
			b += !errors && status == ST_SUCCESS;
			continue;
		}
		for (uint64_t i = 0; i < run; i++, b++) {
			errors = dif_block(&op, hs + i * op.src_step,
					   hd ? hd + i * op.dst_step : NULL, b);
			if (errors)
				break;
		}
	}
	if (errors) {
		job->out->result = errors;
		job->out->bytes_completed = b * op.src_step;
		status = ST_DIF_ERR;
	}
	if (opcode == OP_DIF_INS) {
		record_tags(job->out->specific + 8, &op.out, b);
	} else {
		record_tags(job->out->specific, &op.in, b);
		if (opcode == OP_DIF_UPDT)
			record_tags(job->out->specific + 8, &op.out, b);
	}
	return status;
}

static uint32_t op_cflush(struct job *job)
{
	uint64_t dst = le64(job->d + 24), n = job->size;
	uint64_t got = wraps(dst, n) ? 0 : dma_accessible(job->dma, dst, n, PROT_MAPPED);

	/* A flush writes lines back: a fault counts as a write. */
	if (got < n)
		return fault(job, dst + got, got, true);
	return ST_SUCCESS;
}

/* --- Validation ------------------------------------------------------------------------- */

static bool reserved_clear(const uint8_t *d, uint8_t op, uint32_t flags)
{
	uint64_t bytes = reserved_bytes[op] | BYTES(38, 39);

	if (op == OP_DRAIN) {
		bytes |= flags & F_OP16 ? 0 : BYTES(16, 23);
		bytes |= flags & F_OP17 ? 0 : BYTES(24, 31);
	}
	if ((op == OP_CRCGEN || op == OP_COPY_CRC) && !(flags & F_OP16))
		bytes |= BYTES(48, 55);
	for (int i = 16; i < DESC_SIZE; i++)
		if ((bytes >> i & 1) && d[i])
			return false;
	switch (op) {
	case OP_COMPARE:
	case OP_COMPVAL:
		return !(d[40] & 0xFE);
	case OP_CR_DELTA:
		return !(d[56] & 0xF8);
	case OP_DIF_CHECK:
	case OP_DIF_STRP:
		return !(d[42] & 0xF0);
	case OP_DIF_INS:
	case OP_DIF_UPDT:
		return !(d[42] & 0xF0) && !(d[41] & 0x07);
	default:
		return true;
	}
}

static bool sized(uint8_t op)
{
	return op != OP_NOOP && op != OP_BATCH && op != OP_DRAIN;
}

static uint32_t check_operation(struct job *job, uint8_t op)
{
	const uint8_t *d = job->d;
	uint64_t src = le64(d + 16), dst = le64(d + 24), n = job->size;

	if (sized(op) && (n == 0 || n > job->ctx->wq_config->max_transfer_size))
		return ST_XFER_ERANGE;
	switch (op) {
	case OP_BATCH:
		if (n < 2 || n > job->ctx->wq_config->max_batch_size)
			return ST_DESC_CNT_ERANGE;
		return src & 63 ? ST_DESCLIST_ALIGN : 0;
	case OP_CR_DELTA:
		if (n % 8 || n > DELTA_MAX_SIZE)
			return ST_XFER_ERANGE;
		if ((src | dst | le64(d + 40)) & 7)
			return ST_ADDR_ALIGN;
		return le32(d + 48) == 0 || le32(d + 48) % DELTA_ENTRY ? ST_DR_ERANGE : 0;
	case OP_AP_DELTA: {
		uint32_t record = le32(d + 40);

		if (n % 8 || n > DELTA_MAX_SIZE)
			return ST_XFER_ERANGE;
		if (record == 0 || record % DELTA_ENTRY)
			return ST_DR_ERANGE;
		if ((src | dst) & 7)
			return ST_ADDR_ALIGN;
		return overlaps(src, record, dst, n) ? ST_OVERLAP_BUFFERS : 0;
	}
	case OP_DUALCAST: {
		uint64_t dst2 = le64(d + 40);

		if ((dst ^ dst2) & 0xFFF)
			return ST_DCAST_ERR;
		if (overlaps(src, n, dst, n) || overlaps(src, n, dst2, n) ||
		    overlaps(dst, n, dst2, n))
			return ST_OVERLAP_BUFFERS;
		return 0;
	}
	case OP_CRCGEN:
	case OP_COPY_CRC:
		if ((job->flags & F_OP16) && (le64(d + 48) & 3))
			return ST_ADDR_ALIGN;
		return op == OP_COPY_CRC && overlaps(src, n, dst, n) ? ST_OVERLAP_BUFFERS : 0;
	case OP_DIF_CHECK:
	case OP_DIF_STRP:
	case OP_DIF_INS:
	case OP_DIF_UPDT: {
		uint64_t bs = dif_block_sizes[d[42] & 3];
		uint64_t step = op == OP_DIF_INS ? bs : bs + DIF_SIZE;
		uint64_t blocks = n / step, out_size = n;

		if (n % step)
			return ST_XFER_ERANGE;
		if (op == OP_DIF_INS)
			out_size = n + blocks * DIF_SIZE;
		else if (op == OP_DIF_STRP)
			out_size = n - blocks * DIF_SIZE;
		if (op != OP_DIF_CHECK && overlaps(src, n, dst, out_size))
			return ST_OVERLAP_BUFFERS;
		return 0;
	}
	default:
		return 0;
	}
}

/* Checks 3-7 of README.md; 0 when the descriptor may run. */
static uint32_t validate(struct job *job, uint8_t op, bool in_batch, uint32_t *invalid_flags)
{
	uint32_t bad;

	if (!known_opcode(op) || !engine_opcode_supported(job->ctx->engine, op) ||
	    (in_batch && (op == OP_BATCH || op == OP_DRAIN)))
		return ST_BAD_OPCODE;
	bad = job->flags & ~(F_COMMON | allowed_flags[op]);
	if (bad) {
		*invalid_flags = bad;
		return ST_INVALID_FLAGS;
	}
	if ((job->flags & F_RCI) && !engine_int_handle_valid(job->ctx->engine, le16(job->d + 36)))
		return ST_INT_HANDLE_INVAL;
	if (!reserved_clear(job->d, op, job->flags))
		return ST_NOZERO_RESERVE;
	return check_operation(job, op);
}

/* --- Completion ------------------------------------------------------------------------- */

static bool successful(uint32_t status)
{
	return status == ST_SUCCESS || status == ST_SUCCESS_PRED;
}

static void software_error(struct exec_context *ctx, uint32_t status, uint8_t op,
			   int batch_index, uint32_t invalid_flags, uint64_t fault_addr)
{
	struct vdsa_swerr error = {
		.error = (uint8_t)(status & 0x7F),
		.operation = op,
		.wq = (uint8_t)ctx->wq,
		.fault_rw = (status & STATUS_WRITE_FAULT) ? 1 : 0,
		.batch = batch_index >= 0,
		.desc_valid = 1,
		.batch_index = batch_index >= 0 ? (uint16_t)batch_index : 0,
		.invalid_flags = invalid_flags,
		.fault_addr = fault_addr,
	};

	engine_report_error(ctx->engine, &error);
}

static void complete(struct job *job, uint8_t op, int batch_index, uint32_t invalid_flags)
{
	struct outcome *out = job->out;
	uint64_t record_addr = le64(job->d + 8);
	uint8_t record[COMPLETION_SIZE] = { 0 };
	uint64_t writable;
	uint8_t *status_byte;

	if (!(job->flags & F_CRAV) && !successful(out->status))
		software_error(job->ctx, out->status, op, batch_index, invalid_flags,
			       out->fault_addr);
	if ((job->flags & F_CRAV) && ((job->flags & F_RCR) || out->status != ST_SUCCESS)) {
		writable = wraps(record_addr, COMPLETION_SIZE)
				   ? 0
				   : dma_accessible(job->dma, record_addr, COMPLETION_SIZE,
						    PROT_WRITABLE);
		if (writable < COMPLETION_SIZE) {
			software_error(job->ctx, ST_CRA_XLAT | STATUS_WRITE_FAULT, op, batch_index,
				       0, record_addr + writable);
			return;
		}
		record[1] = out->result;
		put32(record + 4, out->bytes_completed);
		put64(record + 8, out->fault_addr);
		memcpy(record + 16, out->specific, sizeof(out->specific));
		if (out->status == ST_INVALID_FLAGS)
			put32(record + 16, invalid_flags);
		dma_write(job->dma, record_addr + 1, record + 1, COMPLETION_SIZE - 1);
		/* The status byte is what the guest polls: everything else lands first. */
		atomic_thread_fence(memory_order_release);
		dma_span(job->dma, record_addr, 1, PROT_WRITABLE, &status_byte);
		__atomic_store_n(status_byte, (uint8_t)out->status, __ATOMIC_RELEASE);
	}
	if ((job->flags & F_RCI) && engine_int_handle_valid(job->ctx->engine, le16(job->d + 36)))
		vdsa_engine_irq_trigger(job->ctx->engine, le16(job->d + 36));
}

static uint32_t process(struct exec_context *ctx, const struct dma_table *dma,
			const uint8_t *d, int batch_index);

static uint32_t op_batch(struct job *job)
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
		if (process(job->ctx, job->dma, entry, (int)i) != ST_SUCCESS)
			failed = true;
		processed++;
	}
	job->out->bytes_completed = processed;
	if (status == ST_SUCCESS && (failed || processed < count))
		status = ST_BATCH_FAIL;
	return status;
}

static uint32_t run(struct job *job, uint8_t op)
{
	switch (op) {
	case OP_NOOP:
		return ST_SUCCESS;
	case OP_BATCH:
		return op_batch(job);
	case OP_DRAIN:
		/* Earlier descriptors may wait for the DMA lock behind an unmap: not held here. */
		pthread_rwlock_unlock((pthread_rwlock_t *)&job->dma->lock);
		engine_drain_wait(job->ctx);
		pthread_rwlock_rdlock((pthread_rwlock_t *)&job->dma->lock);
		return ST_SUCCESS;
	case OP_MEMMOVE:
		return op_memmove(job);
	case OP_MEMFILL:
		return op_memfill(job);
	case OP_COMPARE:
		return op_compare(job, false);
	case OP_COMPVAL:
		return op_compare(job, true);
	case OP_CR_DELTA:
		return op_cr_delta(job);
	case OP_AP_DELTA:
		return op_ap_delta(job);
	case OP_DUALCAST:
		return op_dualcast(job);
	case OP_CRCGEN:
		return op_crc(job, false);
	case OP_COPY_CRC:
		return op_crc(job, true);
	case OP_CFLUSH:
		return op_cflush(job);
	default:
		return op_dif(job, op);
	}
}

/* One descriptor, in a batch when batch_index >= 0; returns its status. */
static uint32_t process(struct exec_context *ctx, const struct dma_table *dma,
			const uint8_t *d, int batch_index)
{
	struct outcome out = { 0 };
	uint32_t flags = le32(d + 4) & 0xFFFFFF, invalid_flags = 0;
	uint8_t op = d[7];
	struct job job = { ctx, dma, d, flags, le32(d + 32), &out };

	if ((flags & F_CRAV) && (le64(d + 8) & (COMPLETION_SIZE - 1))) {
		software_error(ctx, ST_CRA_ALIGN, op, batch_index, 0, 0);
		return ST_CRA_ALIGN;
	}
	if ((flags & F_RCR) && !(flags & F_CRAV)) {
		software_error(ctx, ST_INVALID_FLAGS, op, batch_index, F_RCR, 0);
		return ST_INVALID_FLAGS;
	}
	out.status = validate(&job, op, batch_index >= 0, &invalid_flags);
	if (out.status == 0)
		out.status = run(&job, op);
	if (out.status == ST_ABANDONED)
		return ST_ABANDONED;
	complete(&job, op, batch_index, invalid_flags);
	return out.status;
}

bool descriptor_may_block(const uint8_t *descriptor)
{
	return descriptor[7] == OP_BATCH || descriptor[7] == OP_DRAIN;
}

bool execute_descriptor(struct exec_context *ctx, const uint8_t *descriptor)
{
	struct dma_table *dma = engine_dma(ctx->engine);
	uint32_t status;

	pthread_rwlock_rdlock(&dma->lock);
	status = process(ctx, dma, descriptor, -1);
	pthread_rwlock_unlock(&dma->lock);
	return !successful(status);
}
