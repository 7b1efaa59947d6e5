/*
 * movdir64b-test: checks, inside the guest, that the CPU implements MOVDIR64B
 * the way the idxd driver relies on it for descriptor submission:
 *   cpuid          CPUID.(EAX=7,ECX=0):ECX[28] is set;
 *   copy           a 64-byte store from an unaligned source to a 64-byte
 *                  aligned destination copies exactly those 64 bytes;
 *   misaligned-gp  a destination that is not 64-byte aligned raises #GP,
 *                  which Linux delivers to user space as SIGSEGV.
 * Exit status: 0 all checks passed, 1 a check failed, 2 the CPU does not
 * advertise MOVDIR64B (the instruction is then never executed).
 */
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define GUARD 0xa5

/* The destination line sits between two guard lines that must stay intact. */
static unsigned char area[3 * 64] __attribute__((aligned(64)));
/* The source has no alignment requirement; start it at an odd offset. */
static unsigned char source[64 + 64] __attribute__((aligned(64)));

static void movdir64b(void *dst, const void *src)
{
	/* The instruction's stores are weakly ordered; sfence makes them visible
	 * to the loads that check them. */
	__asm__ volatile("movdir64b (%[src]), %[dst]\n\tsfence"
			 :
			 : [dst] "r"(dst), [src] "r"(src)
			 : "memory");
}

static int has_movdir64b(void)
{
	unsigned int eax, ebx, ecx, edx;

	if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
		return 0;
	return (ecx >> 28) & 1;
}

static int all_equal(const unsigned char *p, size_t n, unsigned char value)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] != value)
			return 0;
	return 1;
}

static int check_copy(void)
{
	const unsigned char *src = source + 5;
	unsigned char *dst = area + 64;

	memset(area, GUARD, sizeof(area));
	for (size_t i = 0; i < 64; i++)
		source[5 + i] = (unsigned char)(i * 7 + 1);
	movdir64b(dst, src);
	if (memcmp(dst, src, 64) != 0) {
		printf("movdir64b-test: copy FAILED: destination differs from source\n");
		return 0;
	}
	if (!all_equal(area, 64, GUARD) || !all_equal(area + 128, 64, GUARD)) {
		printf("movdir64b-test: copy FAILED: bytes outside the destination changed\n");
		return 0;
	}
	printf("movdir64b-test: copy ok\n");
	return 1;
}

static int check_misaligned_gp(void)
{
	int status;
	pid_t child;

	fflush(stdout);
	child = fork();
	if (child < 0) {
		perror("movdir64b-test: fork");
		return 0;
	}
	if (child == 0) {
		/* The expected crash needs no core file. */
		struct rlimit no_core = { 0, 0 };

		setrlimit(RLIMIT_CORE, &no_core);
		movdir64b(area + 64 + 8, source);
		_exit(0);
	}
	if (waitpid(child, &status, 0) != child) {
		perror("movdir64b-test: waitpid");
		return 0;
	}
	if (WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV) {
		printf("movdir64b-test: misaligned-gp ok\n");
		return 1;
	}
	if (WIFSIGNALED(status))
		printf("movdir64b-test: misaligned-gp FAILED: child killed by signal %d, expected SIGSEGV\n",
		       WTERMSIG(status));
	else
		printf("movdir64b-test: misaligned-gp FAILED: child exited with status %d, expected SIGSEGV\n",
		       WEXITSTATUS(status));
	return 0;
}

int main(void)
{
	int ok;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!has_movdir64b()) {
		printf("movdir64b-test: cpuid: MOVDIR64B not supported (CPUID.(EAX=7,ECX=0):ECX[28] is clear)\n");
		return 2;
	}
	printf("movdir64b-test: cpuid ok\n");
	ok = check_copy();
	ok = check_misaligned_gp() && ok;
	return ok ? 0 : 1;
}
