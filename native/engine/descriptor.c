/* One descriptor: the opcode table, validation in README.md's order of checks, dispatch to
 * the operation, and completion (record, interrupt, software error). */
#include <stdatomic.h>
#include <string.h>

#include "internal.h"

#define F_COMMON (F_CRAV | F_RCR | F_RCI)
#define F_WRITER (F_FENCE | F_BOF | F_CC | F_STORD | F_DRDBK)

#define BYTES(lo, hi) ((~0ull >> (63 - (hi))) & (~0ull << (lo)))

/* What validation and dispatch need to know of an opcode. */
struct opcode_desc {
	uint32_t flags; /* allowed beyond F_COMMON */
	uint64_t reserved; /* descriptor bytes that must be zero, bit n = byte n (38-39 always) */
	struct {
		uint32_t flag;
		uint64_t bytes;
	} reserved_unless[2]; /* bytes that must be zero while flag is clear */
	struct {
		uint8_t byte, bits;
	} reserved_bits[2]; /* bits of a byte that must be zero */
	bool sized; /* bytes 32-35 are a transfer size, 1..max_transfer_size (checked first) */
	bool wq_only; /* not inside a batch */
	bool may_block; /* may run long or wait for other engines: only a worker runs it */
	uint32_t (*check)(const struct job *job); /* the opcode's own checks, if any */
	uint32_t (*run)(struct job *job); /* NULL: not an opcode */
};

/* DSA 1.x; a later generation is another table of this shape. */
static const struct opcode_desc opcodes[OP_LIMIT] = {
	[OP_NOOP] = { .flags = F_FENCE, .reserved = BYTES(16, 35) | BYTES(40, 63),
		      .run = op_noop },
	[OP_BATCH] = { .flags = F_A1, .reserved = BYTES(24, 31) | BYTES(40, 63),
		       .wq_only = true, .may_block = true, .check = check_batch,
		       .run = op_batch },
	[OP_DRAIN] = { .flags = F_A1 | F_A2 | F_OP16 | F_OP17,
		       .reserved = BYTES(32, 35) | BYTES(40, 63),
		       .reserved_unless = { { F_OP16, BYTES(16, 23) }, { F_OP17, BYTES(24, 31) } },
		       .wq_only = true, .may_block = true, .run = op_drain },
	[OP_MEMMOVE] = { .flags = F_WRITER | F_A1 | F_A2, .reserved = BYTES(40, 63),
			 .sized = true, .run = op_memmove },
	[OP_MEMFILL] = { .flags = F_WRITER | F_A2, .reserved = BYTES(40, 63), .sized = true,
			 .run = op_memfill },
	[OP_COMPARE] = { .flags = F_FENCE | F_BOF | F_CHECK | F_A1 | F_A2,
			 .reserved = BYTES(41, 63), .reserved_bits = { { 40, 0xFE } },
			 .sized = true, .run = op_compare },
	[OP_COMPVAL] = { .flags = F_FENCE | F_BOF | F_CHECK | F_A1, .reserved = BYTES(41, 63),
			 .reserved_bits = { { 40, 0xFE } }, .sized = true, .run = op_compare },
	[OP_CR_DELTA] = { .flags = F_WRITER | F_CHECK | F_A1 | F_A2 | F_A3,
			  .reserved = BYTES(52, 55) | BYTES(57, 63),
			  .reserved_bits = { { 56, 0xF8 } }, .sized = true,
			  .check = check_cr_delta, .run = op_cr_delta },
	[OP_AP_DELTA] = { .flags = F_WRITER | F_A1 | F_A2, .reserved = BYTES(44, 63),
			  .sized = true, .check = check_ap_delta, .run = op_ap_delta },
	[OP_DUALCAST] = { .flags = F_WRITER | F_A1 | F_A2 | F_A3, .reserved = BYTES(48, 63),
			  .sized = true, .check = check_dualcast, .run = op_dualcast },
	[OP_CRCGEN] = { .flags = F_FENCE | F_BOF | F_A1 | F_A3 | F_CRC_OPS,
			.reserved = BYTES(24, 31) | BYTES(44, 47) | BYTES(56, 63),
			.reserved_unless = { { F_OP16, BYTES(48, 55) } }, .sized = true,
			.check = check_crc, .run = op_crc },
	[OP_COPY_CRC] = { .flags = F_WRITER | F_A1 | F_A2 | F_A3 | F_CRC_OPS,
			  .reserved = BYTES(44, 47) | BYTES(56, 63),
			  .reserved_unless = { { F_OP16, BYTES(48, 55) } }, .sized = true,
			  .check = check_crc, .run = op_crc },
	[OP_DIF_CHECK] = { .flags = F_FENCE | F_BOF | F_A1,
			   .reserved = BYTES(24, 31) | BYTES(41, 41) | BYTES(43, 47) |
				       BYTES(56, 63),
			   .reserved_bits = { { 42, 0xF0 } }, .sized = true, .check = check_dif,
			   .run = op_dif },
	[OP_DIF_INS] = { .flags = F_WRITER | F_A1 | F_A2, .reserved = BYTES(40, 40) | BYTES(43, 55),
			 .reserved_bits = { { 42, 0xF0 }, { 41, 0x07 } }, .sized = true,
			 .check = check_dif, .run = op_dif },
	[OP_DIF_STRP] = { .flags = F_WRITER | F_A1 | F_A2,
			  .reserved = BYTES(41, 41) | BYTES(43, 47) | BYTES(56, 63),
			  .reserved_bits = { { 42, 0xF0 } }, .sized = true, .check = check_dif,
			  .run = op_dif },
	[OP_DIF_UPDT] = { .flags = F_WRITER | F_A1 | F_A2, .reserved = BYTES(43, 47),
			  .reserved_bits = { { 42, 0xF0 }, { 41, 0x07 } }, .sized = true,
			  .check = check_dif, .run = op_dif },
	[OP_CFLUSH] = { .flags = F_WRITER | F_A2, .reserved = BYTES(16, 23) | BYTES(40, 63),
			.sized = true, .run = op_cflush },
};

static const struct opcode_desc *opcode_desc(uint8_t op)
{
	return op < OP_LIMIT && opcodes[op].run ? &opcodes[op] : NULL;
}

uint32_t fault(struct job *job, uint64_t addr, uint64_t completed, bool write)
{
	job->out->fault_addr = addr;
	job->out->bytes_completed = (uint32_t)completed;
	job->out->status = ST_PAGE_FAULT_NOBOF | (write ? STATUS_WRITE_FAULT : 0);
	return job->out->status;
}

/* --- Validation ------------------------------------------------------------------------- */

static bool reserved_clear(const struct opcode_desc *desc, const uint8_t *d, uint32_t flags)
{
	uint64_t bytes = desc->reserved | BYTES(38, 39);

	for (size_t i = 0; i < sizeof(desc->reserved_unless) / sizeof(desc->reserved_unless[0]);
	     i++)
		if (!(flags & desc->reserved_unless[i].flag))
			bytes |= desc->reserved_unless[i].bytes;
	for (int i = 16; i < DESC_SIZE; i++)
		if ((bytes >> i & 1) && d[i])
			return false;
	for (size_t i = 0; i < sizeof(desc->reserved_bits) / sizeof(desc->reserved_bits[0]); i++)
		if (d[desc->reserved_bits[i].byte] & desc->reserved_bits[i].bits)
			return false;
	return true;
}

/* Checks 3-7 of README.md; 0 when the descriptor may run. */
static uint32_t validate(struct job *job, bool in_batch, uint32_t *invalid_flags)
{
	const struct opcode_desc *desc = opcode_desc(job->op);
	uint32_t bad;

	if (!desc || !engine_opcode_supported(job->ctx->engine, job->op) ||
	    (in_batch && desc->wq_only))
		return ST_BAD_OPCODE;
	bad = job->flags & ~(F_COMMON | desc->flags);
	if (bad) {
		*invalid_flags = bad;
		return ST_INVALID_FLAGS;
	}
	if ((job->flags & F_RCI) && !engine_int_handle_valid(job->ctx->engine, le16(job->d + 36)))
		return ST_INT_HANDLE_INVAL;
	if (!reserved_clear(desc, job->d, job->flags))
		return ST_NOZERO_RESERVE;
	if (desc->sized && (job->size == 0 || job->size > job->ctx->wq_config->max_transfer_size))
		return ST_XFER_ERANGE;
	return desc->check ? desc->check(job) : 0;
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

static void complete(struct job *job, int batch_index, uint32_t invalid_flags)
{
	struct outcome *out = job->out;
	uint64_t record_addr = le64(job->d + 8);
	uint8_t record[COMPLETION_SIZE] = { 0 };
	uint64_t writable;
	uint8_t *status_byte;

	if (!(job->flags & F_CRAV) && !successful(out->status))
		software_error(job->ctx, out->status, job->op, batch_index, invalid_flags,
			       out->fault_addr);
	if ((job->flags & F_CRAV) && ((job->flags & F_RCR) || out->status != ST_SUCCESS)) {
		writable = wraps(record_addr, COMPLETION_SIZE)
				   ? 0
				   : dma_accessible(job->dma, record_addr, COMPLETION_SIZE,
						    PROT_WRITABLE);
		if (writable < COMPLETION_SIZE) {
			software_error(job->ctx, ST_CRA_XLAT | STATUS_WRITE_FAULT, job->op,
				       batch_index, 0, record_addr + writable);
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

/* --- One descriptor --------------------------------------------------------------------- */

uint32_t process_descriptor(struct exec_context *ctx, const struct dma_table *dma,
			    const uint8_t *d, int batch_index)
{
	struct outcome out = { 0 };
	uint32_t flags = le32(d + 4) & 0xFFFFFF, invalid_flags = 0;
	struct job job = { .ctx = ctx, .dma = dma, .d = d, .op = d[7], .flags = flags,
			   .size = le32(d + 32), .out = &out };

	if ((flags & F_CRAV) && (le64(d + 8) & (COMPLETION_SIZE - 1))) {
		software_error(ctx, ST_CRA_ALIGN, job.op, batch_index, 0, 0);
		return ST_CRA_ALIGN;
	}
	if ((flags & F_RCR) && !(flags & F_CRAV)) {
		software_error(ctx, ST_INVALID_FLAGS, job.op, batch_index, F_RCR, 0);
		return ST_INVALID_FLAGS;
	}
	out.status = validate(&job, batch_index >= 0, &invalid_flags);
	if (out.status == 0)
		out.status = opcodes[job.op].run(&job);
	if (out.status == ST_ABANDONED)
		return ST_ABANDONED;
	complete(&job, batch_index, invalid_flags);
	return out.status;
}

bool descriptor_may_block(const uint8_t *descriptor)
{
	const struct opcode_desc *desc = opcode_desc(descriptor[7]);

	return desc && desc->may_block;
}

bool execute_descriptor(struct exec_context *ctx, const uint8_t *descriptor)
{
	struct dma_table *dma = engine_dma(ctx->engine);
	uint32_t status;

	pthread_rwlock_rdlock(&dma->lock);
	status = process_descriptor(ctx, dma, descriptor, -1);
	pthread_rwlock_unlock(&dma->lock);
	return !successful(status);
}
