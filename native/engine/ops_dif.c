/* DIF (T10 protection information): DIF_CHECK, DIF_INS, DIF_STRP and DIF_UPDT. */
#include <string.h>

#include "internal.h"

#define DIF_SIZE 8u
#define DIF_MAX_BLOCK 4104u

static const uint32_t dif_block_sizes[4] = { 512, 520, 4096, 4104 };

uint32_t check_dif(const struct job *job)
{
	const uint8_t *d = job->d;
	uint64_t src = le64(d + 16), dst = le64(d + 24), n = job->size;
	uint64_t bs = dif_block_sizes[d[42] & 3];
	uint64_t step = job->op == OP_DIF_INS ? bs : bs + DIF_SIZE;
	uint64_t blocks = n / step, out_size = n;

	if (n % step)
		return ST_XFER_ERANGE;
	if (job->op == OP_DIF_INS)
		out_size = n + blocks * DIF_SIZE;
	else if (job->op == OP_DIF_STRP)
		out_size = n - blocks * DIF_SIZE;
	if (job->op != OP_DIF_CHECK && overlaps(src, n, dst, out_size))
		return ST_OVERLAP_BUFFERS;
	return 0;
}

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

uint32_t op_dif(struct job *job)
{
	const uint8_t *d = job->d;
	uint8_t opcode = job->op;
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
