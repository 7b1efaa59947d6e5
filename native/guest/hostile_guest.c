/*
 * hostile-guest SEED COUNT: a guest that does what a buggy or hostile driver
 * could, against the device's WQ 0 (a dedicated WQ that dmatest.sh's setup
 * mode enabled), and checks that the device does only what DSA defines.
 *
 * COUNT descriptors, one at a time, drawn from a generator seeded by SEED:
 *   valid    memmove, fill, compare, compare-value and noop inside the
 *            program's own pages; each must succeed with the right effect
 *            (the bytes, the compare result) and touch nothing else;
 *   invalid  a valid one with one thing wrong: an unknown opcode, a flag or a
 *            reserved byte the operation does not allow, a size of 0 or past
 *            max_transfer_size, an address in a hole of guest-physical memory,
 *            past the top of RAM, in the device's own BARs or wrapping past
 *            2^64, a batch whose list is unmapped, an interrupt handle that does
 *            not exist; each must get a record whose status is not success,
 *            and writes nothing in the program's pages;
 *   no-record the completion record misaligned or unmapped: nothing may be
 *            written (the device records a software error instead).
 * Between them: torn and partial portal writes (8-byte stores of some of a
 * descriptor's qwords, in any order) into the portal's upper slots, whose
 * descriptors can only touch a scratch page, and writes to BAR0's read-only
 * and reserved registers (the driver's own registers are left alone).
 *
 * Every destination page is filled with a canary pattern and restored after
 * each descriptor; source pages are compared with a private copy; the records
 * page keeps its canary outside the record. Any difference is a stray write.
 *
 * Prints "name value" lines: seed, descriptors, valid, valid_ok, invalid,
 * invalid_rejected, no_record, lost, torn_stores, bar0_writes, stray_writes,
 * wrong_results, invalid_succeeded, register_changes, seconds.  Exit status:
 * 0 nothing wrong, 1 a finding, 2 bad arguments, 3 the setup failed.
 */
#define _GNU_SOURCE
#include <linux/idxd.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROGRAM "hostile-guest"
#include "guest_program.h"

#define SRC_PAGES 8
#define DST_PAGES 8
#define TIMEOUT_S 1.0
/* A descriptor whose record cannot be written: how long to let it run. */
#define NO_RECORD_S 0.002
#define CANARY 0xa5
/* The portal's slots 0..31 take the real submissions, 32..63 the torn writes,
 * so that a torn descriptor only ever mixes with other torn ones. */
#define TORN_SLOT_FIRST 32
#define SLOTS 64
#define BAR0_SIZE 4096
#define TOP 0xfffffffffffff000ULL
/* Flags DSA 1.0 leaves reserved for every operation (bits 22 and 23). */
#define RESERVED_FLAG (1u << 22)

static const uint8_t zeros[32];

struct page {
	uint8_t *va;
	uint64_t pa;
};

struct state {
	uint64_t rng;
	struct page src[SRC_PAGES], dst[DST_PAGES], records, scratch;
	uint8_t shadow[SRC_PAGES][PAGE];
	volatile uint8_t *portal;
	volatile uint64_t *bar0;
	uint64_t bar_pa[2];
	uint64_t ram_top; /* the end of the highest System RAM range */
	uint64_t hole; /* a page in no System RAM range and in no BAR */
	uint32_t max_xfer;
	unsigned long long descriptors, valid, valid_ok, invalid, invalid_rejected, no_record,
		lost, torn_stores, bar0_writes, stray_writes, wrong_results, invalid_succeeded,
		register_changes;
};

/* BAR0 registers that are read-only (VERSION, GENCAP, WQCAP, GRPCAP, ENGCAP,
 * OPCAP, the table offsets, GENSTS, CMDSTS, CMDCAP) or reserved; offsets in
 * qwords. */
static const unsigned int untouchable_qwords[] = {
	0x00 / 8, 0x10 / 8, 0x20 / 8, 0x30 / 8, 0x38 / 8, 0x40 / 8, 0x48 / 8, 0x50 / 8,
	0x58 / 8, 0x60 / 8, 0x68 / 8, 0x70 / 8, 0x78 / 8, 0x90 / 8, 0xa8 / 8, 0xb0 / 8,
	0xb8 / 8, 0xe0 / 8, 0xe8 / 8, 0xf0 / 8, 0xf8 / 8,
};
#define UNTOUCHABLE (sizeof(untouchable_qwords) / sizeof(untouchable_qwords[0]))

/* Opcodes DSA 1.0 does not define. */
static const uint8_t unknown_opcodes[] = {0x07, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x16, 0x17,
					  0x1f, 0x21, 0x42, 0x7f, 0x80, 0xfe, 0xff};

static uint64_t next(struct state *s)
{
	/* xorshift64*: a fixed seed gives the same run on every machine. */
	s->rng ^= s->rng >> 12;
	s->rng ^= s->rng << 25;
	s->rng ^= s->rng >> 27;
	return s->rng * 0x2545f4914f6cdd1dULL;
}

static uint64_t below(struct state *s, uint64_t n)
{
	return next(s) % n;
}

static bool pages(struct page *out, int n)
{
	for (int i = 0; i < n; i++)
		if (!(out[i].va = physical_page(&out[i].pa)))
			return false;
	return true;
}

static unsigned long long read_u64(const char *path)
{
	unsigned long long value = 0;
	FILE *f = fopen(path, "r");

	if (f) {
		if (fscanf(f, "%llu", &value) != 1)
			value = 0;
		fclose(f);
	}
	return value;
}

/* The start of BAR index of device, from its sysfs "resource" table. */
static uint64_t bar_start(const char *device, int index)
{
	char path[PATH_MAX], line[128];
	unsigned long long start = 0;
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s/resource", PCI_DEVICES, device);
	f = fopen(path, "r");
	if (!f)
		return 0;
	for (int i = 0; i <= index && fgets(line, sizeof(line), f); i++)
		if (i == index && sscanf(line, "%llx", &start) != 1)
			start = 0;
	fclose(f);
	return start;
}

/* The top of System RAM and a page in a hole below it (from /proc/iomem). */
static bool memory_map(struct state *s)
{
	unsigned long long start, end, low_end = 0;
	char line[256];
	FILE *f = fopen("/proc/iomem", "r");

	if (!f) {
		perror(PROGRAM ": /proc/iomem");
		return false;
	}
	while (fgets(line, sizeof(line), f)) {
		if (line[0] == ' ' || !strstr(line, "System RAM") ||
		    sscanf(line, "%llx-%llx", &start, &end) != 2)
			continue;
		if (end + 1 > s->ram_top)
			s->ram_top = end + 1;
		if (end < 0xffffffffULL && end + 1 > low_end)
			low_end = end + 1;
	}
	fclose(f);
	/* Just above the RAM below 4 GiB: the PCI hole, where the BARs are far above. */
	s->hole = (low_end + 0x10000000ULL) & ~(uint64_t)(PAGE - 1);
	if (!s->ram_top || s->hole >= 0xfe000000ULL ||
	    (s->hole <= s->bar_pa[0] && s->bar_pa[0] < s->hole + PAGE) ||
	    (s->hole <= s->bar_pa[1] && s->bar_pa[1] < s->hole + PAGE)) {
		fprintf(stderr, PROGRAM ": no hole found in guest-physical memory\n");
		return false;
	}
	return true;
}

static void fill_canary(uint8_t *p, size_t n)
{
	memset(p, CANARY, n);
}

static size_t canary_breaks(const uint8_t *p, size_t n)
{
	size_t bad = 0;

	for (size_t i = 0; i < n; i++)
		bad += p[i] != CANARY;
	return bad;
}

/* Stray writes anywhere in the program's pages, given that destination page
 * dst_page's bytes [from, to) may differ (dst_page -1: none). */
static size_t strays(struct state *s, int dst_page, size_t from, size_t to)
{
	size_t bad = 0;

	for (int p = 0; p < DST_PAGES; p++) {
		if (p != dst_page) {
			bad += canary_breaks(s->dst[p].va, PAGE);
			continue;
		}
		bad += canary_breaks(s->dst[p].va, from) +
		       canary_breaks(s->dst[p].va + to, PAGE - to);
	}
	for (int p = 0; p < SRC_PAGES; p++)
		bad += memcmp(s->src[p].va, s->shadow[p], PAGE) != 0;
	/* The record is its first 32 bytes. */
	bad += canary_breaks(s->records.va + 32, PAGE - 32);
	return bad;
}

static void clear_record(struct state *s)
{
	memset(s->records.va, 0, 32);
	fill_canary(s->records.va + 32, PAGE - 32);
	/* Cleared before the device can write it (the driver's wmb()). */
	__asm__ volatile("sfence" : : : "memory");
}

static uint8_t wait_record(struct state *s, double seconds)
{
	volatile struct dsa_completion_record *record = (void *)s->records.va;
	double deadline = now() + seconds;

	while (!record->status && now() < deadline)
		__builtin_ia32_pause();
	return record->status;
}

static void submit(struct state *s, const struct dsa_hw_desc *desc)
{
	movdir64b(s->portal + below(s, TORN_SLOT_FIRST) * 64, desc);
	s->descriptors++;
}

/* Submits d with a cleared record and waits for it; 0 (counted as lost) if none came. */
static uint8_t run(struct state *s, const struct dsa_hw_desc *d)
{
	uint8_t status;

	clear_record(s);
	submit(s, d);
	status = wait_record(s, TIMEOUT_S);
	if (!status)
		s->lost++;
	return status;
}

static bool succeeded(uint8_t status)
{
	uint8_t code = status & DSA_COMP_STATUS_MASK;

	return code == DSA_COMP_SUCCESS || code == DSA_COMP_SUCCESS_PRED;
}

/* A random range [*offset, *offset + *size) inside one page, size >= 1. */
static void range(struct state *s, size_t *offset, uint32_t *size)
{
	*offset = below(s, PAGE);
	*size = (uint32_t)(1 + below(s, PAGE - *offset));
}

static void base_desc(struct state *s, struct dsa_hw_desc *d, uint8_t opcode)
{
	memset(d, 0, sizeof(*d));
	d->opcode = opcode;
	d->flags = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR;
	d->completion_addr = s->records.pa;
}

static void valid_one(struct state *s)
{
	struct dsa_hw_desc d;
	int page = (int)below(s, DST_PAGES), src = (int)below(s, SRC_PAGES);
	size_t so, dof = 0;
	uint32_t n = 0;
	uint8_t expected[PAGE], status, kind = (uint8_t)below(s, 5);
	uint8_t *dst = s->dst[page].va;
	int want_result = -1;

	range(s, &so, &n);
	switch (kind) {
	case 0:
		base_desc(s, &d, DSA_OPCODE_MEMMOVE);
		dof = below(s, PAGE - n + 1);
		d.src_addr = s->src[src].pa + so;
		d.dst_addr = s->dst[page].pa + dof;
		memcpy(expected, s->shadow[src] + so, n);
		break;
	case 1:
		base_desc(s, &d, DSA_OPCODE_MEMFILL);
		dof = so;
		d.pattern = next(s);
		d.dst_addr = s->dst[page].pa + dof;
		for (uint32_t i = 0; i < n; i++)
			expected[i] = (uint8_t)(d.pattern >> (8 * (i % 8)));
		break;
	case 2: {
		int other = below(s, 2) ? src : (int)below(s, SRC_PAGES);
		size_t oo = below(s, PAGE - n + 1);

		base_desc(s, &d, DSA_OPCODE_COMPARE);
		d.src_addr = s->src[src].pa + so;
		d.src2_addr = s->src[other].pa + (other == src ? so : oo);
		want_result = memcmp(s->shadow[src] + so,
				     s->shadow[other] + (other == src ? so : oo), n) != 0;
		break;
	}
	case 3: {
		uint64_t pattern;

		base_desc(s, &d, DSA_OPCODE_COMPVAL);
		n = (uint32_t)((n + 7) / 8 * 8);
		if (so + n > PAGE)
			so = PAGE - n;
		memcpy(&pattern, s->shadow[src] + so, 8);
		d.comp_pattern = below(s, 2) ? pattern : pattern ^ 1;
		d.src_addr = s->src[src].pa + so;
		want_result = 0;
		for (uint32_t i = 0; i < n; i++)
			if (s->shadow[src][so + i] != (uint8_t)(d.comp_pattern >> (8 * (i % 8))))
				want_result = 1;
		break;
	}
	default:
		base_desc(s, &d, DSA_OPCODE_NOOP);
		n = 0;
		break;
	}
	d.xfer_size = n;
	s->valid++;
	status = run(s, &d);
	if (status && !succeeded(status)) {
		fprintf(stderr, PROGRAM ": valid opcode %u size %u: status 0x%x\n", d.opcode, n, status);
		s->wrong_results++;
	} else if (status && want_result >= 0 &&
		   ((volatile struct dsa_completion_record *)s->records.va)->result != want_result) {
		fprintf(stderr, PROGRAM ": opcode %u: result %u, not %d\n", d.opcode,
			((volatile struct dsa_completion_record *)s->records.va)->result, want_result);
		s->wrong_results++;
	} else if (status && (kind == 0 || kind == 1) && memcmp(dst + dof, expected, n) != 0) {
		fprintf(stderr, PROGRAM ": opcode %u size %u: wrong bytes\n", d.opcode, n);
		s->wrong_results++;
	} else if (status) {
		s->valid_ok++;
	}
	s->stray_writes += strays(s, kind <= 1 ? page : -1, dof, dof + (kind <= 1 ? n : 0));
	fill_canary(dst, PAGE);
}

/* An address no descriptor may read or write: a hole, past RAM, a BAR, the top. */
static uint64_t bad_address(struct state *s)
{
	switch (below(s, 5)) {
	case 0:
		return s->hole + below(s, PAGE);
	case 1:
		return s->ram_top + below(s, 1ULL << 30);
	case 2:
		return s->bar_pa[below(s, 2)] + below(s, PAGE);
	case 3:
		return 1ULL << (40 + below(s, 23));
	default:
		return TOP + below(s, PAGE);
	}
}

static void invalid_one(struct state *s)
{
	struct dsa_hw_desc d;
	uint8_t status;
	size_t so;
	uint32_t n;
	uint8_t *raw = (uint8_t *)&d;

	range(s, &so, &n);
	base_desc(s, &d, DSA_OPCODE_MEMMOVE);
	d.src_addr = s->src[below(s, SRC_PAGES)].pa + so;
	d.dst_addr = s->scratch.pa + below(s, PAGE - n + 1);
	d.xfer_size = n;
	switch (below(s, 10)) {
	case 0:
		d.opcode = unknown_opcodes[below(s, sizeof(unknown_opcodes))];
		break;
	case 1:
		d.flags |= RESERVED_FLAG << below(s, 2);
		break;
	case 2:
		raw[38 + below(s, 2)] = (uint8_t)(1 + below(s, 255)); /* reserved in every op */
		break;
	case 3:
		d.xfer_size = below(s, 2) ? 0 : s->max_xfer + 1 + (uint32_t)below(s, 1u << 20);
		break;
	case 4:
		d.src_addr = bad_address(s);
		break;
	case 5:
		d.dst_addr = bad_address(s);
		break;
	case 6:
		/* Starts below 2^64 and ends past it. */
		d.src_addr = TOP + 0xf00;
		d.xfer_size = 0x1000 + (uint32_t)below(s, 0x10000);
		break;
	case 7:
		d.opcode = DSA_OPCODE_BATCH;
		d.desc_list_addr = bad_address(s) & ~63ULL;
		d.dst_addr = 0;
		d.desc_count = 2 + (uint32_t)below(s, 30);
		break;
	case 8:
		d.flags |= IDXD_OP_FLAG_RCI;
		d.int_handle = (uint16_t)(0x800 + below(s, 0xf7ff));
		break;
	default:
		d.opcode = DSA_OPCODE_MEMFILL;
		d.pattern = next(s);
		d.dst_addr = bad_address(s);
		break;
	}
	s->invalid++;
	status = run(s, &d);
	if (status && succeeded(status)) {
		fprintf(stderr, PROGRAM ": invalid opcode 0x%x flags 0x%x size %u src 0x%llx "
			"dst 0x%llx: success\n", d.opcode, d.flags, d.xfer_size,
			(unsigned long long)d.src_addr, (unsigned long long)d.dst_addr);
		s->invalid_succeeded++;
	} else if (status) {
		s->invalid_rejected++;
	}
	s->stray_writes += strays(s, -1, 0, 0);
}

static void no_record_one(struct state *s)
{
	struct dsa_hw_desc d;

	base_desc(s, &d, DSA_OPCODE_NOOP);
	d.completion_addr = below(s, 2) ? s->records.pa + 8 + 8 * below(s, 3) : bad_address(s);
	clear_record(s);
	submit(s, &d);
	s->no_record++;
	/* Nothing may arrive: neither at the record's place nor around it. */
	wait_record(s, NO_RECORD_S);
	s->stray_writes += strays(s, -1, 0, 0) + (memcmp(s->records.va, zeros, 32) != 0);
}

static void torn_writes(struct state *s)
{
	struct dsa_hw_desc d;
	uint64_t q[8];
	volatile uint64_t *slot =
		(volatile uint64_t *)(s->portal + (TORN_SLOT_FIRST + below(s, SLOTS - TORN_SLOT_FIRST)) * 64);
	int stores = 1 + (int)below(s, 8);

	/* Only the scratch page and bad addresses: however the qwords mix, no
	 * descriptor made of them can reach the checked pages. */
	base_desc(s, &d, below(s, 2) ? DSA_OPCODE_MEMMOVE : (uint8_t)below(s, 0x20));
	d.src_addr = below(s, 2) ? s->scratch.pa + below(s, PAGE / 2) : bad_address(s);
	d.dst_addr = below(s, 2) ? s->scratch.pa + below(s, PAGE / 2) : bad_address(s);
	d.completion_addr = s->scratch.pa + 32 * below(s, PAGE / 32);
	d.xfer_size = (uint32_t)below(s, PAGE / 2);
	memcpy(q, &d, sizeof(q));
	for (int i = 0; i < stores; i++) {
		slot[below(s, 8)] = below(s, 4) ? q[below(s, 8)] : next(s);
		s->torn_stores++;
	}
}

static void snapshot(struct state *s, uint64_t *regs)
{
	for (size_t i = 0; i < UNTOUCHABLE; i++)
		regs[i] = s->bar0[untouchable_qwords[i]];
}

static void bar0_write(struct state *s)
{
	s->bar0[untouchable_qwords[below(s, UNTOUCHABLE)]] = next(s);
	s->bar0_writes++;
}

static bool setup(struct state *s)
{
	char device[256];

	if (!find_dsa(device) ||
	    !(s->portal = map_resource(device, 2, PORTAL_PAGE, PROT_WRITE)) ||
	    !(s->bar0 = map_resource(device, 0, BAR0_SIZE, PROT_READ | PROT_WRITE)))
		return false;
	s->bar_pa[0] = bar_start(device, 0);
	s->bar_pa[1] = bar_start(device, 2);
	s->max_xfer = (uint32_t)read_u64("/sys/bus/dsa/devices/dsa0/max_transfer_size");
	if (!s->bar_pa[0] || !s->bar_pa[1] || !s->max_xfer) {
		fprintf(stderr, PROGRAM ": cannot read the BARs or dsa0's max_transfer_size\n");
		return false;
	}
	if (!memory_map(s) || !pages(s->src, SRC_PAGES) || !pages(s->dst, DST_PAGES) ||
	    !pages(&s->records, 1) || !pages(&s->scratch, 1))
		return false;
	for (int p = 0; p < SRC_PAGES; p++) {
		for (size_t i = 0; i < PAGE; i += 8) {
			uint64_t r = next(s);

			memcpy(s->src[p].va + i, &r, 8);
		}
		memcpy(s->shadow[p], s->src[p].va, PAGE);
	}
	for (int p = 0; p < DST_PAGES; p++)
		fill_canary(s->dst[p].va, PAGE);
	clear_record(s);
	return true;
}

int main(int argc, char **argv)
{
	static struct state s;
	unsigned long long seed, count;
	uint64_t before[UNTOUCHABLE], after[UNTOUCHABLE];
	double began;

	if (argc != 3) {
		fprintf(stderr, "usage: hostile-guest SEED COUNT\n");
		return 2;
	}
	if (!parse_count(argv[1], "SEED", &seed) || !parse_count(argv[2], "COUNT", &count))
		return 2;
	s.rng = seed;
	if (!setup(&s))
		return 3;
	snapshot(&s, before);
	began = now();
	for (unsigned long long i = 0; i < count; i++) {
		uint64_t roll = below(&s, 100);

		if (roll < 45)
			valid_one(&s);
		else if (roll < 90)
			invalid_one(&s);
		else
			no_record_one(&s);
		if (below(&s, 8) == 0)
			torn_writes(&s);
		if (below(&s, 50) == 0)
			bar0_write(&s);
	}
	snapshot(&s, after);
	for (size_t i = 0; i < UNTOUCHABLE; i++)
		if (before[i] != after[i]) {
			fprintf(stderr, PROGRAM ": BAR0 offset 0x%x changed: 0x%llx -> 0x%llx\n",
				untouchable_qwords[i] * 8, (unsigned long long)before[i],
				(unsigned long long)after[i]);
			s.register_changes++;
		}
	printf("seed %llu\ndescriptors %llu\nvalid %llu\nvalid_ok %llu\ninvalid %llu\n"
	       "invalid_rejected %llu\nno_record %llu\nlost %llu\ntorn_stores %llu\n"
	       "bar0_writes %llu\nstray_writes %llu\nwrong_results %llu\n"
	       "invalid_succeeded %llu\nregister_changes %llu\nseconds %.3f\n",
	       seed, s.descriptors, s.valid, s.valid_ok, s.invalid, s.invalid_rejected,
	       s.no_record, s.lost, s.torn_stores, s.bar0_writes, s.stray_writes,
	       s.wrong_results, s.invalid_succeeded, s.register_changes, now() - began);
	return s.lost || s.stray_writes || s.wrong_results || s.invalid_succeeded ||
			       s.register_changes
		       ? 1
		       : 0;
}
