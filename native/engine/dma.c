/* Guest memory: the DMA regions the client mapped, looked up by IOVA. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Below this many slots a node is merged with a neighbour it fits in. */
#define NODE_SHORT (DMA_NODE_SLOTS / 4)

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

static void free_subtree(struct dma_node *node)
{
	uint32_t i;

	for (i = 0; !node->leaf && i < node->count; i++)
		free_subtree(node->children[i]);
	free(node);
}

static void free_spares(struct dma_table *table)
{
	while (table->spares) {
		struct dma_node *next = table->spares->children[0];

		free(table->spares);
		table->spares = next;
	}
	table->spare_count = 0;
}

void dma_destroy(struct dma_table *table)
{
	pthread_rwlock_destroy(&table->lock);
	if (table->root)
		free_subtree(table->root);
	table->root = NULL;
	free_spares(table);
}

/* The last slot whose key is at most key, or -1. */
static int floor_slot(const struct dma_node *node, uint64_t key)
{
	uint32_t low = 0, high = node->count;

	while (low < high) {
		uint32_t mid = (low + high) / 2;

		if (node->keys[mid] <= key)
			low = mid + 1;
		else
			high = mid;
	}
	return (int)low - 1;
}

/* The region with the highest iova at most key, or NULL. */
static const struct dma_region *floor_region(const struct dma_table *table, uint64_t key)
{
	const struct dma_node *node = table->root;

	while (node) {
		int slot = floor_slot(node, key);

		if (slot < 0)
			return NULL;
		if (node->leaf)
			return &node->regions[slot];
		node = node->children[slot];
	}
	return NULL;
}

/* Moves count slots of from, from start on, to slot at of to (the same kind of node). */
static void move_slots(struct dma_node *to, uint32_t at, struct dma_node *from, uint32_t start,
		       uint32_t count)
{
	memmove(&to->keys[at], &from->keys[start], count * sizeof(to->keys[0]));
	if (to->leaf)
		memmove(&to->regions[at], &from->regions[start], count * sizeof(to->regions[0]));
	else
		memmove(&to->children[at], &from->children[start],
			count * sizeof(to->children[0]));
}

static struct dma_node *take_spare(struct dma_table *table)
{
	struct dma_node *node = table->spares;

	table->spares = node->children[0];
	table->spare_count--;
	return node;
}

/* Puts a region (in a leaf) or a child (in an inner node) at slot of node, splitting a full
 * node in two; returns the new right half, or NULL.  A put at either end of a full node leaves
 * it full and starts the new one with the put alone: maps in ascending or descending order then
 * fill their nodes, where halves would leave every node half empty. */
static struct dma_node *put(struct dma_table *table, struct dma_node *node, uint32_t slot,
			    const struct dma_region *region, struct dma_node *child)
{
	struct dma_node *right = NULL;

	if (node->count == DMA_NODE_SLOTS) {
		uint32_t cut = slot == 0 || slot == DMA_NODE_SLOTS ? slot : DMA_NODE_SLOTS / 2;

		right = take_spare(table);
		right->leaf = node->leaf;
		right->count = DMA_NODE_SLOTS - cut;
		move_slots(right, 0, node, cut, right->count);
		node->count = cut;
		if (slot > cut || cut == DMA_NODE_SLOTS) {
			slot -= cut;
			node = right;
		}
	}
	move_slots(node, slot + 1, node, slot, node->count - slot);
	if (node->leaf) {
		node->keys[slot] = region->iova;
		node->regions[slot] = *region;
	} else {
		node->keys[slot] = child->keys[0];
		node->children[slot] = child;
	}
	node->count++;
	return right;
}

/* Recursion as deep as the tree: a few levels. */
static struct dma_node *insert(struct dma_table *table, struct dma_node *node,
			       const struct dma_region *region)
{
	int slot = floor_slot(node, region->iova);
	struct dma_node *split;

	if (node->leaf)
		return put(table, node, (uint32_t)(slot + 1), region, NULL);
	if (slot < 0)
		slot = 0;
	split = insert(table, node->children[slot], region);
	node->keys[slot] = node->children[slot]->keys[0];
	return split ? put(table, node, (uint32_t)slot + 1, NULL, split) : NULL;
}

static void remove_slot(struct dma_node *node, uint32_t slot)
{
	node->count--;
	move_slots(node, slot, node, slot + 1, node->count - slot);
}

/* Child slot of node lost a slot: an empty child goes, a short one joins a neighbour it fits
 * in. So no node but the root is empty, and the tree stays a few levels deep. */
static void tidy_child(struct dma_node *node, uint32_t slot)
{
	struct dma_node *child = node->children[slot], *left, *right;
	uint32_t at;

	if (child->count == 0) {
		free(child);
		remove_slot(node, slot);
		return;
	}
	node->keys[slot] = child->keys[0];
	if (child->count >= NODE_SHORT)
		return;
	if (slot > 0 && node->children[slot - 1]->count + child->count <= DMA_NODE_SLOTS)
		at = slot - 1;
	else if (slot + 1 < node->count &&
		 child->count + node->children[slot + 1]->count <= DMA_NODE_SLOTS)
		at = slot;
	else
		return;
	left = node->children[at];
	right = node->children[at + 1];
	move_slots(left, left->count, right, 0, right->count);
	left->count += right->count;
	free(right);
	remove_slot(node, at + 1);
}

/* Removes the region at iova, which is in node's subtree. */
static void erase(struct dma_node *node, uint64_t iova)
{
	int slot = floor_slot(node, iova);

	if (node->leaf) {
		remove_slot(node, (uint32_t)slot);
		return;
	}
	erase(node->children[slot], iova);
	tidy_child(node, (uint32_t)slot);
}

int dma_map(struct dma_table *table, uint64_t iova, uint64_t length, void *vaddr,
	    uint32_t prot)
{
	const struct dma_region region = { iova, length, vaddr, prot };
	const struct dma_region *below;
	struct dma_node *split;
	int rc = 0;

	if (length == 0 || iova + length < iova)
		return -EINVAL;
	pthread_rwlock_wrlock(&table->lock);
	/* Only the last region starting below the new end can overlap it. */
	below = floor_region(table, iova + length - 1);
	if (below && below->iova + below->length > iova) {
		rc = -EEXIST;
		goto out;
	}
	/* A node for each level that may split and one for a new root, before anything
	 * changes: a failed allocation leaves the tree as it was. */
	while (table->spare_count < table->height + 1) {
		struct dma_node *spare = calloc(1, sizeof(*spare));

		if (!spare) {
			rc = -ENOMEM;
			goto out;
		}
		spare->children[0] = table->spares;
		table->spares = spare;
		table->spare_count++;
	}
	if (!table->root) {
		table->root = take_spare(table);
		table->root->leaf = true;
		table->root->count = 0;
		table->height = 1;
	}
	split = insert(table, table->root, &region);
	if (split) {
		struct dma_node *top = take_spare(table);

		top->leaf = false;
		top->count = 2;
		top->keys[0] = table->root->keys[0];
		top->children[0] = table->root;
		top->keys[1] = split->keys[0];
		top->children[1] = split;
		table->root = top;
		table->height++;
	}
	table->count++;
out:
	pthread_rwlock_unlock(&table->lock);
	return rc;
}

static const struct dma_region *find(const struct dma_table *table, uint64_t iova)
{
	const struct dma_region *r = floor_region(table, iova);

	return r && iova - r->iova < r->length ? r : NULL;
}

int dma_unmap(struct dma_table *table, uint64_t iova, uint64_t length)
{
	const struct dma_region *r;
	int rc = -ENOENT;

	/* Taking the write lock is the fence: no descriptor is in progress past here. */
	pthread_rwlock_wrlock(&table->lock);
	r = floor_region(table, iova);
	if (r && r->iova == iova && r->length == length) {
		struct dma_node *root = table->root;

		erase(root, iova);
		while (!root->leaf && root->count == 1) {
			table->root = root->children[0];
			free(root);
			root = table->root;
			table->height--;
		}
		/* The last region gone, so are the nodes: a guest that mapped a million pages
		 * once does not keep them. */
		if (--table->count == 0) {
			free(root);
			table->root = NULL;
			table->height = 0;
			free_spares(table);
		}
		rc = 0;
	}
	pthread_rwlock_unlock(&table->lock);
	return rc;
}

static void list_subtree(const struct dma_node *node, struct vdsa_dma_region *out,
			 uint64_t max, uint64_t *at)
{
	for (uint32_t i = 0; i < node->count && *at < max; i++) {
		if (node->leaf)
			out[(*at)++] = (struct vdsa_dma_region){ node->regions[i].iova,
								 node->regions[i].length,
								 node->regions[i].prot };
		else
			list_subtree(node->children[i], out, max, at);
	}
}

uint64_t dma_list(struct dma_table *table, struct vdsa_dma_region *out, uint64_t max)
{
	uint64_t at = 0, count;

	pthread_rwlock_rdlock(&table->lock);
	if (table->root && max)
		list_subtree(table->root, out, max, &at);
	count = table->count;
	pthread_rwlock_unlock(&table->lock);
	return count;
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
