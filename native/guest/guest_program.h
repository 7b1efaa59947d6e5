/*
 * Helpers shared by the programs of native/guest/.  Each program is one static
 * binary compiled from its own .c file, so these are static inline: a program
 * that does not use one gets no unused-function warning.  The includer defines
 * PROGRAM, its name, which prefixes the messages.
 */
#ifndef VDSA_GUEST_PROGRAM_H
#define VDSA_GUEST_PROGRAM_H

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PCI_DEVICES "/sys/bus/pci/devices"
#define DSA_VENDOR 0x8086
#define DSA_DEVICE 0x0b25
/* WQ 0's first portal page starts BAR2 (registers.py, wq_portal_offset). */
#define PORTAL_PAGE 4096
#define PAGE 4096

/* Parses a positive decimal count; otherwise says so and returns 0. */
static inline int parse_count(const char *text, const char *what, unsigned long long *out)
{
	char *end;

	/* strtoull alone would take a sign or leading blanks, and wrap "-1". */
	if (isdigit((unsigned char)text[0])) {
		errno = 0;
		*out = strtoull(text, &end, 10);
		if (!errno && !*end && *out > 0)
			return 1;
	}
	fprintf(stderr, PROGRAM ": %s must be a positive integer, not '%s'\n", what, text);
	return 0;
}

/* CLOCK_MONOTONIC in seconds; a failing clock ends the program with status 1. */
static inline double now(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
		perror(PROGRAM ": clock_gettime");
		exit(1);
	}
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline unsigned long read_hex(const char *dir, const char *name)
{
	/* Room for the directory (up to PATH_MAX) and the attribute's name. */
	char path[PATH_MAX + 64], text[32] = "";
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "r");
	if (!f)
		return 0;
	if (!fgets(text, sizeof(text), f))
		text[0] = '\0';
	fclose(f);
	return strtoul(text, NULL, 16);
}

/* The PCI address of the first DSA function, in name (at least 256 bytes). */
static inline int find_dsa(char *name)
{
	char dir[PATH_MAX];
	struct dirent *entry;
	DIR *devices = opendir(PCI_DEVICES);
	int found = 0;

	if (!devices) {
		perror(PROGRAM ": " PCI_DEVICES);
		return 0;
	}
	while (!found && (entry = readdir(devices))) {
		if (entry->d_name[0] == '.')
			continue;
		snprintf(dir, sizeof(dir), "%s/%s", PCI_DEVICES, entry->d_name);
		if (read_hex(dir, "vendor") == DSA_VENDOR && read_hex(dir, "device") == DSA_DEVICE) {
			snprintf(name, 256, "%s", entry->d_name);
			found = 1;
		}
	}
	closedir(devices);
	if (!found)
		fprintf(stderr, PROGRAM ": no %04x:%04x function in %s\n", DSA_VENDOR, DSA_DEVICE,
			PCI_DEVICES);
	return found;
}

/* The first size bytes of the function's BAR index (sysfs resourceN), or NULL. */
static inline volatile void *map_resource(const char *device, int index, size_t size, int prot)
{
	char path[PATH_MAX];
	void *mapped;
	int fd;

	snprintf(path, sizeof(path), "%s/%s/resource%d", PCI_DEVICES, device, index);
	fd = open(path, O_RDWR);
	if (fd < 0) {
		fprintf(stderr, PROGRAM ": %s: %s\n", path, strerror(errno));
		return NULL;
	}
	mapped = mmap(NULL, size, prot, MAP_SHARED, fd, 0);
	close(fd);
	if (mapped == MAP_FAILED) {
		fprintf(stderr, PROGRAM ": mmap %s: %s\n", path, strerror(errno));
		return NULL;
	}
	return mapped;
}

/* A locked, zeroed page and its guest-physical address: locked, so that the page
 * stays where the device writes for as long as the program runs.  The device
 * addresses guest-physical memory (the guest has no IOMMU); /proc/self/pagemap
 * gives the frame to root. */
static inline void *physical_page(uint64_t *pa)
{
	uint64_t entry;
	void *page;
	int fd;

	page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
	if (page == MAP_FAILED) {
		perror(PROGRAM ": mmap");
		return NULL;
	}
	memset(page, 0, PAGE);
	fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0) {
		perror(PROGRAM ": /proc/self/pagemap");
		return NULL;
	}
	if (pread(fd, &entry, sizeof(entry), (off_t)((uintptr_t)page / PAGE * sizeof(entry))) !=
	    (ssize_t)sizeof(entry)) {
		perror(PROGRAM ": read /proc/self/pagemap");
		close(fd);
		return NULL;
	}
	close(fd);
	/* Bit 63: present; bits 54:0: the page frame number (0 unless root). */
	if (!(entry >> 63) || !(entry & ((1ULL << 55) - 1))) {
		fprintf(stderr, PROGRAM ": no page frame number for a page (not root?)\n");
		return NULL;
	}
	*pa = (entry & ((1ULL << 55) - 1)) * PAGE;
	return page;
}

static inline void movdir64b(volatile void *dst, const void *src)
{
	__asm__ volatile("movdir64b (%[src]), %[dst]" : : [dst] "r"(dst), [src] "r"(src) : "memory");
}

#endif
