/* The engine's DMA table on its own, at a vIOMMU guest's scale (built with ../dma.c; not part
 * of the engine library):
 *
 *   dma_table check SEED STEPS   random maps, unmaps and lookups against a model; exit 1 at
 *                                the first difference
 *   dma_table bench COUNT        COUNT one-page maps in ascending IOVA order, unmaps, the same
 *                                in descending and in random order, then lookups of random
 *                                pages; the best time of ROUNDS for each (the machine may be
 *                                busy)
 *
 * tests/test_engine_dma_table.py builds and runs both. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../internal.h"

#define PAGE 4096ull
#define WINDOW 256 /* pages the check maps in */
#define BASE 0x100000000ull
#define LOOKUPS 200000
#define ROUNDS 5

static uint8_t memory[WINDOW * PAGE];

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int fail(int step, const char *what)
{
	fprintf(stderr, "step %d: %s differs from the model\n", step, what);
	return 1;
}

/* The model: the first page of the region that holds each page (-1: none), and the page
 * count and prot of each region by its first page. */
static int owner[WINDOW], pages[WINDOW];
static uint32_t prots[WINDOW];

/* dma_span from a random byte of every page, for either prot, against the model. */
static int lookups_match(const struct dma_table *table)
{
	int p;

	for (p = 0; p < WINDOW; p++) {
		uint64_t at = BASE + (uint64_t)p * PAGE + (uint64_t)(rand() % PAGE);
		uint32_t prot = rand() % 2 ? PROT_READABLE : PROT_WRITABLE;
		uint8_t *host = NULL;
		uint64_t span = dma_span(table, at, 2 * PAGE, prot, &host);
		uint64_t want = 0;

		if (owner[p] >= 0 && (prots[owner[p]] & prot))
			want = BASE + (uint64_t)(owner[p] + pages[owner[p]]) * PAGE - at;
		if (want > 2 * PAGE)
			want = 2 * PAGE;
		if (span != want || (span && host != memory + (at - BASE)))
			return 0;
	}
	return 1;
}

static int check(unsigned seed, int steps)
{
	struct dma_table table;
	int step, p;

	srand(seed);
	for (p = 0; p < WINDOW; p++)
		owner[p] = -1;
	if (dma_init(&table) != 0)
		return fail(0, "dma_init");
	for (step = 0; step < steps; step++) {
		int first = rand() % WINDOW, count = 1 + rand() % (rand() % 4 ? 2 : 24);
		uint64_t iova;
		int rc, expect = 0;

		if (first + count > WINDOW)
			count = WINDOW - first;
		if (rand() % 2) {
			uint32_t prot = 1 + (uint32_t)(rand() % 3);

			for (p = first; p < first + count; p++)
				expect = owner[p] >= 0 ? -EEXIST : expect;
			rc = dma_map(&table, BASE + (uint64_t)first * PAGE, (uint64_t)count * PAGE,
				     memory + first * PAGE, prot);
			if (rc != expect)
				return fail(step, "a map's result");
			for (p = first; !rc && p < first + count; p++)
				owner[p] = first;
			pages[first] = rc ? pages[first] : count;
			prots[first] = rc ? prots[first] : prot;
		} else {
			/* Half the unmaps are of a mapped region: the engine's unmap is exact
			 * (libvfio-user splits a covering one into the regions it covers). */
			if (rand() % 2 && owner[first] >= 0) {
				first = owner[first];
				count = pages[first];
			}
			iova = BASE + (uint64_t)first * PAGE;
			expect = owner[first] == first && pages[first] == count ? 0 : -ENOENT;
			rc = dma_unmap(&table, iova, (uint64_t)count * PAGE);
			if (rc != expect)
				return fail(step, "an unmap's result");
			for (p = first; !rc && p < first + count; p++)
				owner[p] = -1;
		}
		if (!lookups_match(&table))
			return fail(step, "a lookup");
	}
	dma_destroy(&table);
	printf("check: %d steps, no difference\n", steps);
	return 0;
}

/* Maps page order[n] for each n below count. */
static int map_all(struct dma_table *table, const uint64_t *order, uint64_t count)
{
	uint64_t n;

	for (n = 0; n < count; n++)
		if (dma_map(table, BASE + order[n] * PAGE, PAGE, memory,
			    PROT_READABLE | PROT_WRITABLE))
			return 0;
	return 1;
}

static uint64_t random_below(uint64_t bound)
{
	return ((uint64_t)rand() << 31 ^ (uint64_t)rand()) % bound;
}

static int unmap_all(struct dma_table *table, uint64_t count)
{
	uint64_t page;

	for (page = 0; page < count; page++)
		if (dma_unmap(table, BASE + page * PAGE, PAGE))
			return 0;
	return 1;
}

static double best(double time, double other)
{
	return time < other ? time : other;
}

static int bench(uint64_t count)
{
	double ascending = 1e9, descending = 1e9, shuffled = 1e9, unmap = 1e9, lookup = 1e9;
	uint64_t *orders[3], n, found = 0;
	static uint64_t targets[LOOKUPS];
	struct dma_table table;
	double start;
	uint8_t *host;
	int round, o;

	if (dma_init(&table) != 0)
		return 1;
	for (o = 0; o < 3; o++) {
		orders[o] = malloc(count * sizeof(orders[o][0]));
		if (!orders[o])
			return fail(0, "malloc");
	}
	srand(1);
	for (n = 0; n < count; n++) {
		uint64_t other = random_below(n + 1);

		orders[0][n] = n;
		orders[1][n] = count - 1 - n;
		orders[2][n] = orders[2][other];
		orders[2][other] = n;
	}
	for (n = 0; n < LOOKUPS; n++)
		targets[n] = random_below(count);
	for (round = 0; round < ROUNDS; round++) {
		start = now();
		if (!map_all(&table, orders[0], count))
			return fail(round, "ascending map");
		ascending = best(now() - start, ascending);
		start = now();
		if (!unmap_all(&table, count))
			return fail(round, "unmap");
		unmap = best(now() - start, unmap);
		start = now();
		if (!map_all(&table, orders[2], count))
			return fail(round, "random map");
		shuffled = best(now() - start, shuffled);
		if (!unmap_all(&table, count))
			return fail(round, "unmap");
		start = now();
		if (!map_all(&table, orders[1], count))
			return fail(round, "descending map");
		descending = best(now() - start, descending);
		start = now();
		for (n = 0; n < LOOKUPS; n++)
			found += dma_span(&table, BASE + targets[n] * PAGE + 8, 8, PROT_READABLE,
					  &host) == 8;
		lookup = best(now() - start, lookup);
		if (!unmap_all(&table, count))
			return fail(round, "unmap");
	}
	dma_destroy(&table);
	for (o = 0; o < 3; o++)
		free(orders[o]);
	if (found != (uint64_t)ROUNDS * LOOKUPS)
		return fail(0, "a lookup");
	printf("%llu one-page maps, best of %d: ascending %.3f s, descending %.3f s, random %.3f s, "
	       "unmaps %.3f s; random lookups %.0f ns each\n", (unsigned long long)count, ROUNDS,
	       ascending, descending, shuffled, unmap, lookup / LOOKUPS * 1e9);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "check"))
		return check((unsigned)atoi(argv[2]), atoi(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "bench"))
		return bench(strtoull(argv[2], NULL, 0));
	fprintf(stderr, "usage: %s check SEED STEPS | bench COUNT\n", argv[0]);
	return 2;
}
