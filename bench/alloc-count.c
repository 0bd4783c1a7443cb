/* bench/alloc-count.c: an LD_PRELOAD shim for bench/compare.sh that counts a process's heap
 * allocations, for derpd-load's allocations per relayed packet and per login.
 *
 * Every malloc, calloc, realloc, posix_memalign, aligned_alloc and memalign (what Rust's
 * System allocator calls) adds one to a counter in the file named by DERPD_ALLOC_COUNT_FILE,
 * mapped shared: derpd-load (--alloc-counter) reads it at the edges of its measured window,
 * as it reads the server's CPU time from /proc. Counter 0: allocations; counter 1: bytes
 * asked for. Little-endian u64s at offsets 0 and 8.
 *
 * It works on the glibc build only (the static musl binary cannot be preloaded); the count is
 * the same code's, as both call the allocator for the same things. Never shipped, never
 * linked into derpd: bench/compare.sh builds it with cc.
 *
 *   cc -O2 -shared -fPIC -o alloc-count.so bench/alloc-count.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static uint64_t *counters;
static int state; /* 0: not mapped yet, 1: mapping, 2: mapped or not wanted */

static void count(size_t bytes) {
  if (__atomic_load_n(&state, __ATOMIC_ACQUIRE) != 2) {
    int zero = 0;
    if (!__atomic_compare_exchange_n(&state, &zero, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      return; /* another thread is mapping, or it is done: this call is not counted */
    const char *path = getenv("DERPD_ALLOC_COUNT_FILE");
    if (path) {
      int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
      if (fd >= 0 && ftruncate(fd, 4096) == 0) {
        void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) counters = p;
      }
      if (fd >= 0) close(fd);
    }
    __atomic_store_n(&state, 2, __ATOMIC_RELEASE);
  }
  if (counters) {
    __atomic_fetch_add(&counters[0], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&counters[1], bytes, __ATOMIC_RELAXED);
  }
}

void *malloc(size_t n) { count(n); return __libc_malloc(n); }
void *calloc(size_t m, size_t n) { count(m * n); return __libc_calloc(m, n); }
void *realloc(void *p, size_t n) { count(n); return __libc_realloc(p, n); }
void *memalign(size_t a, size_t n) { count(n); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { count(n); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
  count(n);
  void *p = __libc_memalign(a, n);
  if (!p) return 12; /* ENOMEM */
  *out = p;
  return 0;
}
