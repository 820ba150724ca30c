/* SIGBUS guard for read-only mappings of files this process does not own (loaded with ctypes by
 * mer_runtime.guard).
 *
 * A file truncated while it is mapped (a download being rewritten, a `truncate`, a full network file system) makes
 * the next touch of a page past its new end raise SIGBUS, and the process dies without a word, in the middle of
 * xxhash, memcmp or NumPy. This handler turns such a fault inside a registered mapping into a recorded event: it maps
 * anonymous zeros over the faulting page AND everything after it up to the end of the registered range (one
 * MAP_FIXED mmap, same protection), counts the fault in the mapping's slot and returns, so the interrupted code
 * finishes reading zeros. Zeros to the end, not one page: a file truncated to 0 then read every other page would
 * otherwise split the mapping in tens of thousands of pieces, past vm.max_map_count, and mmap would fail; this way
 * one file costs one signal and one extra kernel mapping. (The pages after the faulting one are past the new end
 * too: truncation cuts a file's tail.) Python reads the slot's counter after each
 * piece (`mer_guard_faults`, a plain exported array) and raises a clear error naming the file; the zeros are
 * never used. The later munmap of the whole mapping removes the zero pages with it.
 *
 * A fault outside every registered mapping (or a SIGBUS sent by kill) is not ours: the previous disposition is put
 * back and the fault re-runs into it (pytest's faulthandler, or the default action that ends the process). The
 * handler stays uninstalled only until the next registration re-installs it (mer_guard_install runs with each
 * Guard): a foreign fault normally ends the process anyway, and one that a previous handler survives (it fixed
 * the page) needs no guard until our next mapping.
 *
 * Async-signal-safety: the handler only loads the slot table with atomic loads, calls mmap (a system call) and
 * sigaction, adds to an atomic counter, and saves and restores errno (mmap may set it under the interrupted code).
 * `previous` is written under the lock while our handler is not installed (before the sigaction that installs it),
 * so the handler, which can only run once installed, never sees it half-written. Registration takes a mutex (never
 * taken by the handler); a slot's length is published before its start (release), and the handler reads the start
 * first (acquire). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MER_GUARD_SLOTS 1024

long mer_guard_faults[MER_GUARD_SLOTS];       /* faults recorded in each slot's mapping (read by Python) */
static uintptr_t slot_start[MER_GUARD_SLOTS]; /* 0: free */
static size_t slot_len[MER_GUARD_SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous;
static uintptr_t page_mask;

static void on_sigbus(int sig, siginfo_t *si, void *ctx) {
    int saved_errno = errno;
    uintptr_t a = (uintptr_t)si->si_addr;
    if (si->si_code > 0) { /* a real fault (kill/raise give SI_USER/SI_TKILL, <= 0) */
        int mapped = 0;
        /* every matching slot counts it: a slot whose mapping was just unmapped (unregistered a moment later) must
         * not hide the live mapping now at the same address */
        for (int i = 0; i < MER_GUARD_SLOTS; i++) {
            uintptr_t s = __atomic_load_n(&slot_start[i], __ATOMIC_ACQUIRE);
            if (s == 0 || a < s || a - s >= __atomic_load_n(&slot_len[i], __ATOMIC_RELAXED))
                continue;
            if (!mapped) {
                uintptr_t page = a & page_mask;
                uintptr_t end = (s + __atomic_load_n(&slot_len[i], __ATOMIC_RELAXED) + ~page_mask) & page_mask;
                if (mmap((void *)page, end - page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
                    == MAP_FAILED)
                    break; /* cannot map: let the previous disposition have it */
                mapped = 1;
            }
            __atomic_fetch_add(&mer_guard_faults[i], 1, __ATOMIC_RELEASE);
        }
        if (mapped) {
            errno = saved_errno;
            return; /* the faulting load runs again and reads zeros */
        }
    }
    /* not ours: put the previous disposition back; a fault re-runs into it on return, a sent signal stays pending
     * (SIGBUS is blocked while this runs) and is delivered to it */
    sigaction(SIGBUS, &previous, NULL);
    if (si->si_code <= 0)
        raise(sig);
    errno = saved_errno;
    (void)ctx;
}

/* Install the handler unless it is already the current one (someone, e.g. faulthandler.enable(), may have put
 * theirs on top since: then theirs becomes the previous one). 0 on success. */
int mer_guard_install(void) {
    struct sigaction cur, sa;
    int rc = 0;
    pthread_mutex_lock(&lock);
    if (page_mask == 0)
        page_mask = ~((uintptr_t)sysconf(_SC_PAGESIZE) - 1);
    if (sigaction(SIGBUS, NULL, &cur) != 0) {
        rc = -1;
    } else if (!((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)) {
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        previous = cur;
        rc = sigaction(SIGBUS, &sa, NULL);
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* Register [addr, addr + len): the slot number (>= 0, its fault counter reset), or -1 when every slot is taken. */
int mer_guard_register(const void *addr, size_t len) {
    int slot = -1;
    if (addr == NULL || len == 0)
        return -1;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MER_GUARD_SLOTS; i++) {
        if (__atomic_load_n(&slot_start[i], __ATOMIC_RELAXED) == 0) {
            __atomic_store_n(&mer_guard_faults[i], 0, __ATOMIC_RELAXED);
            __atomic_store_n(&slot_len[i], len, __ATOMIC_RELAXED);
            __atomic_store_n(&slot_start[i], (uintptr_t)addr, __ATOMIC_RELEASE);
            slot = i;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return slot;
}

void mer_guard_unregister(int slot) {
    if (slot < 0 || slot >= MER_GUARD_SLOTS)
        return;
    pthread_mutex_lock(&lock);
    __atomic_store_n(&slot_start[slot], 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);
}

int mer_guard_slots(void) { return MER_GUARD_SLOTS; }
