/*
 * portal-bench SIZE SECONDS [WINDOW]: a user-space submitter in the guest at
 * full rate: memmoves of SIZE bytes (at most a page) stored with MOVDIR64B into
 * WQ 0's portal through sysfs resource2, rotating over the page's 64 slots as
 * the stock driver does, WINDOW descriptors in flight (default 16, wq0.0's size
 * in dmatest.sh), each completion record polled, for SECONDS; then this CPU's
 * own memcpy of the same SIZE between the same pages for SECONDS, the
 * reference.  Every completion must be success and the last copy's bytes must
 * be the source's.
 *
 * Run as root in the guest with wq0.0 enabled as a dedicated WQ of WINDOW
 * slots or more (dmatest.sh's setup mode).  The device writes by
 * guest-physical address (no IOMMU), which /proc/self/pagemap gives.
 *
 * Prints one "name value" line per figure: device, size, window, descriptors
 * (completed), failed, lost, seconds, rate (descriptors/s), memcpy_copies,
 * memcpy_seconds, memcpy_rate (copies/s).  Exit status: 0 all completed with
 * success and the data checked, 1 a descriptor failed, was lost or copied the
 * wrong bytes, 2 bad arguments, 3 the setup failed.
 */
#include <linux/idxd.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define PROGRAM "portal-bench"
#include "guest_program.h"

#define SLOTS (PORTAL_PAGE / 64)
#define MAX_WINDOW 64
#define RECORD_STRIDE 64 /* a record a cache line */
#define TIMEOUT_S 1.0

struct pages {
	volatile unsigned char *records, *src, *dst;
	uint64_t records_pa, src_pa, dst_pa;
};

/* Waits for the record's status; 0 if none came within TIMEOUT_S. */
static uint8_t wait_status(volatile struct dsa_completion_record *record)
{
	double deadline = now() + TIMEOUT_S;

	while (!record->status) {
		if (now() > deadline)
			return 0;
	}
	return record->status;
}

static void submit(volatile void *portal, unsigned long long n, struct dsa_hw_desc *desc,
		   const struct pages *p, unsigned window)
{
	unsigned index = (unsigned)(n % window);
	volatile struct dsa_completion_record *record =
		(volatile struct dsa_completion_record *)(p->records + index * RECORD_STRIDE);

	record->status = 0;
	desc->completion_addr = p->records_pa + index * RECORD_STRIDE;
	/* The cleared status reaches memory before the device can write the record. */
	__asm__ volatile("sfence" : : : "memory");
	movdir64b((volatile unsigned char *)portal + (n % SLOTS) * 64, desc);
}

int main(int argc, char **argv)
{
	unsigned long long size, seconds_arg, window = 16;
	unsigned long long submitted = 0, completed = 0, failed = 0, lost = 0, copies = 0;
	struct dsa_hw_desc desc;
	struct pages p;
	char device[256];
	volatile void *portal;
	double began, seconds, memcpy_seconds;
	int wrong;

	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: " PROGRAM " SIZE SECONDS [WINDOW]\n");
		return 2;
	}
	if (!parse_count(argv[1], "SIZE", &size) || !parse_count(argv[2], "SECONDS", &seconds_arg) ||
	    (argc == 4 && !parse_count(argv[3], "WINDOW", &window)))
		return 2;
	if (size > PAGE || window > MAX_WINDOW) {
		fprintf(stderr, PROGRAM ": SIZE is at most %d and WINDOW at most %d\n", PAGE,
			MAX_WINDOW);
		return 2;
	}
	if (!find_dsa(device) || !(portal = map_resource(device, 2, PORTAL_PAGE, PROT_WRITE)) ||
	    !(p.records = physical_page(&p.records_pa)) || !(p.src = physical_page(&p.src_pa)) ||
	    !(p.dst = physical_page(&p.dst_pa)))
		return 3;
	for (unsigned i = 0; i < PAGE; i++)
		p.src[i] = (unsigned char)(i * 7 + 1);

	memset(&desc, 0, sizeof(desc));
	desc.opcode = DSA_OPCODE_MEMMOVE;
	desc.flags = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR | IDXD_OP_FLAG_CC;
	desc.src_addr = p.src_pa;
	desc.dst_addr = p.dst_pa;
	desc.xfer_size = (uint32_t)size;
	began = now();
	while (submitted < window)
		submit(portal, submitted++, &desc, &p, (unsigned)window);
	while (completed + failed + lost < submitted) {
		unsigned long long n = completed + failed + lost;
		volatile struct dsa_completion_record *record =
			(volatile struct dsa_completion_record *)(p.records +
								   (n % window) * RECORD_STRIDE);
		uint8_t status = wait_status(record);

		if (!status)
			lost++;
		else if ((status & DSA_COMP_STATUS_MASK) == DSA_COMP_SUCCESS)
			completed++;
		else
			failed++;
		if (lost || now() - began >= (double)seconds_arg)
			continue;
		submit(portal, submitted++, &desc, &p, (unsigned)window);
	}
	seconds = now() - began;
	wrong = memcmp((const void *)p.dst, (const void *)p.src, size) != 0;

	began = now();
	do {
		for (int i = 0; i < 1000; i++) {
			memcpy((void *)p.dst, (const void *)p.src, size);
			__asm__ volatile("" : : : "memory");
		}
		copies += 1000;
		memcpy_seconds = now() - began;
	} while (memcpy_seconds < (double)seconds_arg);

	printf("device %s\nsize %llu\nwindow %llu\ndescriptors %llu\nfailed %llu\nlost %llu\n"
	       "wrong_data %d\nseconds %.3f\nrate %.0f\nmemcpy_copies %llu\nmemcpy_seconds %.3f\n"
	       "memcpy_rate %.0f\n",
	       device, size, window, completed, failed, lost, wrong, seconds,
	       completed / seconds, copies, memcpy_seconds, copies / memcpy_seconds);
	return failed || lost || wrong ? 1 : 0;
}
