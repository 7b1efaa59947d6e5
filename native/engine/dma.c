/* Guest memory: the DMA regions the client mapped, looked up by IOVA. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define NIL (-1)

int dma_init(struct dma_table *table)
{
	pthread_rwlockattr_t attr;
	int rc;

	memset(table, 0, sizeof(*table));
	table->root = NIL;
	table->free = NIL;
	pthread_rwlockattr_init(&attr);
	/* An unmap must not starve behind a stream of descriptors. */
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	rc = pthread_rwlock_init(&table->lock, &attr);
	pthread_rwlockattr_destroy(&attr);
	return -rc;
}

static void release_nodes(struct dma_table *table)
{
	free(table->nodes);
	table->nodes = NULL;
	table->root = NIL;
	table->free = NIL;
	table->used = 0;
	table->capacity = 0;
}

void dma_destroy(struct dma_table *table)
{
	pthread_rwlock_destroy(&table->lock);
	release_nodes(table);
}

static int height(const struct dma_table *table, int32_t i)
{
	return i == NIL ? 0 : table->nodes[i].height;
}

static void update(struct dma_table *table, int32_t i)
{
	struct dma_region *r = &table->nodes[i];
	int left = height(table, r->left), right = height(table, r->right);

	r->height = (int8_t)(1 + (left > right ? left : right));
}

static int32_t rotate_right(struct dma_table *table, int32_t i)
{
	int32_t top = table->nodes[i].left;

	table->nodes[i].left = table->nodes[top].right;
	table->nodes[top].right = i;
	update(table, i);
	update(table, top);
	return top;
}

static int32_t rotate_left(struct dma_table *table, int32_t i)
{
	int32_t top = table->nodes[i].right;

	table->nodes[i].right = table->nodes[top].left;
	table->nodes[top].left = i;
	update(table, i);
	update(table, top);
	return top;
}

/* Restores the AVL property at i, whose subtrees have it; returns the subtree's root. */
static int32_t balance(struct dma_table *table, int32_t i)
{
	struct dma_region *r = &table->nodes[i];
	int skew = height(table, r->left) - height(table, r->right);

	if (skew > 1) {
		const struct dma_region *left = &table->nodes[r->left];

		if (height(table, left->left) < height(table, left->right))
			r->left = rotate_left(table, r->left);
		return rotate_right(table, i);
	}
	if (skew < -1) {
		const struct dma_region *right = &table->nodes[r->right];

		if (height(table, right->right) < height(table, right->left))
			r->right = rotate_right(table, r->right);
		return rotate_left(table, i);
	}
	update(table, i);
	return i;
}

/* Recursion as deep as the tree: under 1.45 log2(count). */
static int32_t insert(struct dma_table *table, int32_t root, int32_t i)
{
	struct dma_region *r;

	if (root == NIL)
		return i;
	r = &table->nodes[root];
	if (table->nodes[i].iova < r->iova)
		r->left = insert(table, r->left, i);
	else
		r->right = insert(table, r->right, i);
	return balance(table, root);
}

static int32_t remove_min(struct dma_table *table, int32_t root, int32_t *min)
{
	struct dma_region *r = &table->nodes[root];

	if (r->left == NIL) {
		*min = root;
		return r->right;
	}
	r->left = remove_min(table, r->left, min);
	return balance(table, root);
}

/* Removes the region at iova, which is in the tree. */
static int32_t remove_at(struct dma_table *table, int32_t root, uint64_t iova)
{
	struct dma_region *r = &table->nodes[root];
	int32_t min, right;

	if (iova < r->iova) {
		r->left = remove_at(table, r->left, iova);
		return balance(table, root);
	}
	if (iova > r->iova) {
		r->right = remove_at(table, r->right, iova);
		return balance(table, root);
	}
	if (r->left == NIL)
		return r->right;
	if (r->right == NIL)
		return r->left;
	right = remove_min(table, r->right, &min);
	table->nodes[min].left = r->left;
	table->nodes[min].right = right;
	return balance(table, min);
}

/* The first region whose end is above iova, or NULL. Regions never overlap, so the tree is
 * ordered by their ends too. */
static const struct dma_region *first_ending_above(const struct dma_table *table,
						   uint64_t iova)
{
	const struct dma_region *found = NULL;
	int32_t i = table->root;

	while (i != NIL) {
		const struct dma_region *r = &table->nodes[i];

		if (r->iova + r->length > iova) {
			found = r;
			i = r->left;
		} else {
			i = r->right;
		}
	}
	return found;
}

static int32_t take_slot(struct dma_table *table)
{
	int32_t i = table->free;

	if (i != NIL) {
		table->free = table->nodes[i].left;
		return i;
	}
	if (table->used == table->capacity) {
		size_t capacity = table->capacity ? 2 * table->capacity : 16;
		struct dma_region *grown;

		if (capacity > INT32_MAX)
			return NIL;
		grown = realloc(table->nodes, capacity * sizeof(*grown));
		if (!grown)
			return NIL;
		table->nodes = grown;
		table->capacity = capacity;
	}
	return (int32_t)table->used++;
}

int dma_map(struct dma_table *table, uint64_t iova, uint64_t length, void *vaddr,
	    uint32_t prot)
{
	const struct dma_region *next;
	int32_t i;
	int rc = 0;

	if (length == 0 || iova + length < iova)
		return -EINVAL;
	pthread_rwlock_wrlock(&table->lock);
	next = first_ending_above(table, iova);
	if (next && next->iova < iova + length) {
		rc = -EEXIST;
		goto out;
	}
	i = take_slot(table);
	if (i == NIL) {
		rc = -ENOMEM;
		goto out;
	}
	table->nodes[i] = (struct dma_region){ iova, length, vaddr, prot, NIL, NIL, 1 };
	table->root = insert(table, table->root, i);
	table->count++;
out:
	pthread_rwlock_unlock(&table->lock);
	return rc;
}

static const struct dma_region *find(const struct dma_table *table, uint64_t iova)
{
	int32_t i = table->root;

	while (i != NIL) {
		const struct dma_region *r = &table->nodes[i];

		if (iova < r->iova)
			i = r->left;
		else if (iova - r->iova < r->length)
			return r;
		else
			i = r->right;
	}
	return NULL;
}

int dma_unmap(struct dma_table *table, uint64_t iova, uint64_t length)
{
	const struct dma_region *r;
	int32_t i;
	int rc = -ENOENT;

	/* Taking the write lock is the fence: no descriptor is in progress past here. */
	pthread_rwlock_wrlock(&table->lock);
	r = find(table, iova);
	if (r && r->iova == iova && r->length == length) {
		i = (int32_t)(r - table->nodes);
		table->root = remove_at(table, table->root, iova);
		table->nodes[i].left = table->free;
		table->free = i;
		/* The last region gone, so is the pool: a guest that mapped a million pages
		 * once does not keep their nodes. */
		if (--table->count == 0)
			release_nodes(table);
		rc = 0;
	}
	pthread_rwlock_unlock(&table->lock);
	return rc;
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
