/* The host's own speed for the work DSA descriptors do, for `vdsa bench` to compare against:
 * glibc (memcpy, memset, memcmp) and ISA-L (CRC32C, CRC16 T10-DIF) called directly, timed
 * here in a loop so that a call from Python costs nothing per iteration. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include <isa-l/crc.h>

#include "hostref.h"

#define DIF_BLOCK 512
#define DIF_SIZE 8

/* Results land here so the compiler cannot drop work whose result nobody reads. */
static volatile uint64_t sink;

static void put_be16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
	put_be16(p, (uint16_t)(v >> 16));
	put_be16(p + 2, (uint16_t)v);
}

static uint16_t get_be16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get_be32(const uint8_t *p)
{
	return (uint32_t)get_be16(p) << 16 | get_be16(p + 2);
}

/* Blocks of `size` source bytes, each copied and followed by its DIF (application tag 0,
 * reference tags counting from 0), as DIF insert with all flags 0 does. */
static void dif_insert(uint8_t *dst, const uint8_t *src, size_t size)
{
	for (size_t block = 0; block * DIF_BLOCK < size; block++) {
		const uint8_t *in = src + block * DIF_BLOCK;
		uint8_t *out = dst + block * (DIF_BLOCK + DIF_SIZE);

		memcpy(out, in, DIF_BLOCK);
		put_be16(out + DIF_BLOCK, crc16_t10dif(0, in, DIF_BLOCK));
		put_be16(out + DIF_BLOCK + 2, 0);
		put_be32(out + DIF_BLOCK + 4, (uint32_t)block);
	}
}

/* The number of blocks whose DIF does not match, of blocks holding `size` data bytes. */
static uint64_t dif_check(const uint8_t *src, size_t size)
{
	uint64_t bad = 0;

	for (size_t block = 0; block * DIF_BLOCK < size; block++) {
		const uint8_t *in = src + block * (DIF_BLOCK + DIF_SIZE);
		const uint8_t *dif = in + DIF_BLOCK;

		bad += get_be16(dif) != crc16_t10dif(0, in, DIF_BLOCK) || get_be16(dif + 2) != 0 ||
		       get_be32(dif + 4) != (uint32_t)block;
	}
	return bad;
}

static void run_once(enum vdsa_hostref_op op, uint8_t *dst, const uint8_t *src, size_t size)
{
	switch (op) {
	case VDSA_HOSTREF_MEMCPY:
		memcpy(dst, src, size);
		break;
	case VDSA_HOSTREF_MEMSET:
		memset(dst, src[0], size);
		break;
	case VDSA_HOSTREF_MEMCMP:
		sink = (uint64_t)memcmp(dst, src, size);
		break;
	case VDSA_HOSTREF_CRC32C:
		sink = crc32_iscsi((unsigned char *)src, (int)size, 0xFFFFFFFFu);
		break;
	case VDSA_HOSTREF_COPY_CRC32C:
		memcpy(dst, src, size);
		sink = crc32_iscsi((unsigned char *)src, (int)size, 0xFFFFFFFFu);
		break;
	case VDSA_HOSTREF_DIF_INSERT:
		dif_insert(dst, src, size);
		break;
	case VDSA_HOSTREF_DIF_CHECK:
		sink = dif_check(src, size);
		break;
	}
	/* Keep each iteration's stores: without this, the loop of memcpys could become one. */
	__asm__ volatile("" : : "r"(dst) : "memory");
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t vdsa_hostref_time(enum vdsa_hostref_op op, uint8_t *dst, const uint8_t *src,
			  size_t size, uint64_t iterations)
{
	uint64_t start;

	if (op > VDSA_HOSTREF_DIF_CHECK || size == 0 || size > INT32_MAX ||
	    ((op == VDSA_HOSTREF_DIF_INSERT || op == VDSA_HOSTREF_DIF_CHECK) && size % DIF_BLOCK))
		return -1;
	start = now_ns();
	for (uint64_t i = 0; i < iterations; i++)
		run_once(op, dst, src, size);
	return (int64_t)(now_ns() - start);
}

uint64_t vdsa_hostref_result(void)
{
	return sink;
}
