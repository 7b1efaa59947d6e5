/* Host reference timings for `vdsa bench` (see hostref.c). */
#ifndef VDSA_HOSTREF_H
#define VDSA_HOSTREF_H

#include <stddef.h>
#include <stdint.h>

enum vdsa_hostref_op {
	VDSA_HOSTREF_MEMCPY,	   /* memcpy(dst, src, size) */
	VDSA_HOSTREF_MEMSET,	   /* memset(dst, src[0], size) */
	VDSA_HOSTREF_MEMCMP,	   /* memcmp(dst, src, size) */
	VDSA_HOSTREF_CRC32C,	   /* ISA-L crc32_iscsi over src */
	VDSA_HOSTREF_COPY_CRC32C,  /* memcpy, then crc32_iscsi over src */
	VDSA_HOSTREF_DIF_INSERT,   /* size/512 blocks of src to dst, each followed by its DIF */
	VDSA_HOSTREF_DIF_CHECK,	   /* size/512 blocks with DIFs in src checked */
};

/* Nanoseconds that `iterations` runs of `op` over `size` bytes took; -1 for an unknown op, a
 * size of 0 or over INT32_MAX, or a DIF size that is not whole 512-byte blocks. */
int64_t vdsa_hostref_time(enum vdsa_hostref_op op, uint8_t *dst, const uint8_t *src,
			  size_t size, uint64_t iterations);

/* The last compare, CRC or DIF check result (the number of bad blocks for a check). */
uint64_t vdsa_hostref_result(void);

#endif
