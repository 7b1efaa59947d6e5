/*
 * memcpy-bench SIZE ITERATIONS: the guest CPU's memcpy throughput, the
 * reference for dmatest's figures on the idxd channel (guest-scripts/bench.sh).
 * One thread copies a SIZE-byte buffer to another ITERATIONS times, as
 * dmatest with norandom=Y copies its whole test buffer, and prints one
 * "name value" line per figure:
 *   size     SIZE
 *   copies   ITERATIONS
 *   bytes    SIZE * ITERATIONS
 *   seconds  the time the copies took (CLOCK_MONOTONIC)
 *   iops     copies per second
 *   kbps     KB/s in dmatest's unit: KB = 1024 bytes (dmatest_KBs() divides
 *            the bytes by 1024), whole KB/s as dmatest prints them
 * Exit status: 0 done, 1 the copy or the clock failed, 2 bad arguments.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROGRAM "memcpy-bench"
#include "guest_program.h"

/* Page-aligned buffers, as dmatest's kmalloc'ed 16 KiB ones are. */
#define BUFFER_ALIGN 4096

int main(int argc, char **argv)
{
	unsigned long long size, iterations, bytes;
	unsigned char *src, *dst;
	double start, seconds;

	if (argc != 3) {
		fprintf(stderr, "usage: memcpy-bench SIZE ITERATIONS\n");
		return 2;
	}
	if (!parse_count(argv[1], "SIZE", &size) || !parse_count(argv[2], "ITERATIONS", &iterations))
		return 2;
	if (iterations > ULLONG_MAX / size) {
		fprintf(stderr, "memcpy-bench: SIZE * ITERATIONS is too large\n");
		return 2;
	}
	bytes = size * iterations;
	if (posix_memalign((void **)&src, BUFFER_ALIGN, size) ||
	    posix_memalign((void **)&dst, BUFFER_ALIGN, size)) {
		fprintf(stderr, "memcpy-bench: cannot allocate two %llu-byte buffers\n", size);
		return 1;
	}
	/* Touched first, so that page faults are not timed. */
	for (unsigned long long i = 0; i < size; i++)
		src[i] = (unsigned char)(i * 7 + 1);
	memset(dst, 0, size);

	start = now();
	for (unsigned long long i = 0; i < iterations; i++) {
		memcpy(dst, src, size);
		/* The compiler must assume each copy is read: none is dropped or merged. */
		__asm__ volatile("" : : "r"(dst), "r"(src) : "memory");
	}
	seconds = now() - start;

	if (memcmp(dst, src, size) != 0) {
		fprintf(stderr, "memcpy-bench: the destination differs from the source\n");
		return 1;
	}
	if (seconds <= 0) {
		fprintf(stderr, "memcpy-bench: the clock did not advance\n");
		return 1;
	}
	printf("size %llu\ncopies %llu\nbytes %llu\nseconds %.6f\niops %.2f\nkbps %llu\n",
	       size, iterations, bytes, seconds, (double)iterations / seconds,
	       (unsigned long long)((double)(bytes / 1024) / seconds));
	free(src);
	free(dst);
	return 0;
}
