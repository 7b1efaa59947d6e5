/* Guest memory: the DMA regions the client mapped, looked up by IOVA. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int dma_init(struct dma_table *table)
{
	pthread_rwlockattr_t attr;
	int rc;

	memset(table, 0, sizeof(*table));
	pthread_rwlockattr_init(&attr);
	/* An unmap must not starve behind a stream of descriptors. */
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	rc = pthread_rwlock_init(&table->lock, &attr);
	pthread_rwlockattr_destroy(&attr);
	return -rc;
}

void dma_destroy(struct dma_table *table)
{
	pthread_rwlock_destroy(&table->lock);
	free(table->regions);
	table->regions = NULL;
}

/* Index of the first region whose end is above iova. */
static size_t first_ending_above(const struct dma_table *table, uint64_t iova)
{
	size_t low = 0, high = table->count;

	while (low < high) {
		size_t mid = low + (high - low) / 2;
		const struct dma_region *r = &table->regions[mid];

		if (r->iova + r->length <= iova)
			low = mid + 1;
		else
			high = mid;
	}
	return low;
}

int dma_map(struct dma_table *table, uint64_t iova, uint64_t length, void *vaddr,
	    uint32_t prot)
{
	size_t at;
	int rc = 0;

	if (length == 0 || iova + length < iova)
		return -EINVAL;
	pthread_rwlock_wrlock(&table->lock);
	at = first_ending_above(table, iova);
	if (at < table->count && table->regions[at].iova < iova + length) {
		rc = -EEXIST;
		goto out;
	}
	if (table->count == table->capacity) {
		size_t capacity = table->capacity ? 2 * table->capacity : 16;
		struct dma_region *grown =
			realloc(table->regions, capacity * sizeof(*grown));

		if (!grown) {
			rc = -ENOMEM;
			goto out;
		}
		table->regions = grown;
		table->capacity = capacity;
	}
	memmove(&table->regions[at + 1], &table->regions[at],
		(table->count - at) * sizeof(table->regions[0]));
	table->regions[at] = (struct dma_region){ iova, length, vaddr, prot };
	table->count++;
out:
	pthread_rwlock_unlock(&table->lock);
	return rc;
}

int dma_unmap(struct dma_table *table, uint64_t iova, uint64_t length)
{
	size_t at;
	int rc = -ENOENT;

	/* Taking the write lock is the fence: no descriptor is in progress past here. */
	pthread_rwlock_wrlock(&table->lock);
	at = first_ending_above(table, iova);
	if (at < table->count && table->regions[at].iova == iova &&
	    table->regions[at].length == length) {
		memmove(&table->regions[at], &table->regions[at + 1],
			(table->count - at - 1) * sizeof(table->regions[0]));
		table->count--;
		rc = 0;
	}
	pthread_rwlock_unlock(&table->lock);
	return rc;
}

static const struct dma_region *find(const struct dma_table *table, uint64_t iova)
{
	size_t at = first_ending_above(table, iova);

	if (at < table->count && table->regions[at].iova <= iova)
		return &table->regions[at];
	return NULL;
}

static bool permits(const struct dma_region *r, uint32_t prot)
{
	return (r->prot & prot) == prot;
}

uint64_t dma_span(const struct dma_table *table, uint64_t iova, uint64_t length, uint32_t prot,
		  uint8_t **host)
{
	const struct dma_region *r = find(table, iova);
	uint64_t available;

	if (!r || !permits(r, prot) || length == 0)
		return 0;
	available = r->iova + r->length - iova;
	*host = r->vaddr + (iova - r->iova);
	return available < length ? available : length;
}

uint64_t dma_span_back(const struct dma_table *table, uint64_t end, uint64_t length,
		       uint32_t prot, uint8_t **host)
{
	const struct dma_region *r;
	uint64_t available;

	if (end == 0 || length == 0)
		return 0;
	r = find(table, end - 1);
	if (!r || !permits(r, prot))
		return 0;
	available = end - r->iova;
	if (available > length)
		available = length;
	*host = r->vaddr + (end - available - r->iova);
	return available;
}

/* The accessible prefix of [iova, iova + length), copied out to or in from a host buffer
 * when one is given. */
static uint64_t walk(const struct dma_table *table, uint64_t iova, uint64_t length,
		     uint32_t prot, uint8_t *out, const uint8_t *in)
{
	uint64_t done = 0;
	uint8_t *host;

	while (done < length) {
		uint64_t span = dma_span(table, iova + done, length - done, prot, &host);

		if (span == 0)
			break;
		if (out)
			memcpy(out + done, host, span);
		if (in)
			memcpy(host, in + done, span);
		done += span;
	}
	return done;
}

uint64_t dma_accessible(const struct dma_table *table, uint64_t iova, uint64_t length,
			uint32_t prot)
{
	return walk(table, iova, length, prot, NULL, NULL);
}

uint64_t dma_read(const struct dma_table *table, uint64_t iova, void *out, uint64_t length)
{
	return walk(table, iova, length, PROT_READABLE, out, NULL);
}

uint64_t dma_write(const struct dma_table *table, uint64_t iova, const void *in,
		   uint64_t length)
{
	return walk(table, iova, length, PROT_WRITABLE, NULL, in);
}
