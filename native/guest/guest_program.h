/*
 * Helpers shared by the programs of native/guest/.  Each program is one static
 * binary compiled from its own .c file, so these are static inline: a program
 * that does not use one gets no unused-function warning.  The includer defines
 * PROGRAM, its name, which prefixes the messages.
 */
#ifndef VDSA_GUEST_PROGRAM_H
#define VDSA_GUEST_PROGRAM_H

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

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

#endif
