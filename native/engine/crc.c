/* CRC32C for CRC generation (ISA-L for the RFC 3720 bit order, a table for the
 * most-significant-bit-first orders the bypass flags select) and CRC16 T10-DIF for guards. */
#include <limits.h>
#include <pthread.h>

#include <isa-l/crc.h>

#include "internal.h"

#define CRC32C_POLY 0x1EDC6F41u

static uint32_t msb_table[256];
static pthread_once_t msb_table_once = PTHREAD_ONCE_INIT;

static void fill_msb_table(void)
{
	for (uint32_t byte = 0; byte < 256; byte++) {
		uint32_t crc = byte << 24;

		for (int bit = 0; bit < 8; bit++)
			crc = (crc & 0x80000000u) ? (crc << 1) ^ CRC32C_POLY : crc << 1;
		msb_table[byte] = crc;
	}
}

static uint32_t reverse32(uint32_t v)
{
	v = ((v & 0x55555555u) << 1) | ((v >> 1) & 0x55555555u);
	v = ((v & 0x33333333u) << 2) | ((v >> 2) & 0x33333333u);
	v = ((v & 0x0F0F0F0Fu) << 4) | ((v >> 4) & 0x0F0F0F0Fu);
	return __builtin_bswap32(v);
}

/* Data reflected (the default): the state is the reflected register ISA-L keeps.
 * Data not reflected: the state is the most-significant-bit-first register. */
uint32_t crc_begin(uint32_t seed, uint32_t flags)
{
	bool bypass_inversion = flags & CRC_FLAG_BYPASS_INVERSION;

	if (!(flags & CRC_FLAG_BYPASS_DATA_REFLECTION))
		return bypass_inversion ? reverse32(seed) : ~seed;
	return bypass_inversion ? seed : reverse32(~seed);
}

uint32_t crc_update(uint32_t state, const uint8_t *data, uint64_t length, uint32_t flags)
{
	if (!(flags & CRC_FLAG_BYPASS_DATA_REFLECTION)) {
		while (length > 0) {
			/* ISA-L takes an int length. */
			int chunk = length > INT_MAX ? INT_MAX : (int)length;

			state = crc32_iscsi((unsigned char *)data, chunk, state);
			data += chunk;
			length -= (uint64_t)chunk;
		}
		return state;
	}
	pthread_once(&msb_table_once, fill_msb_table);
	for (uint64_t i = 0; i < length; i++)
		state = (state << 8) ^ msb_table[(state >> 24) ^ data[i]];
	return state;
}

uint32_t crc_end(uint32_t state, uint32_t flags)
{
	bool bypass_inversion = flags & CRC_FLAG_BYPASS_INVERSION;

	if (!(flags & CRC_FLAG_BYPASS_DATA_REFLECTION))
		return bypass_inversion ? reverse32(state) : ~state;
	return bypass_inversion ? state : ~reverse32(state);
}

uint16_t crc16_t10(uint16_t seed, const uint8_t *data, uint64_t length)
{
	return crc16_t10dif(seed, data, length);
}
