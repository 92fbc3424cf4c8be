/* The SIGBUS guard: survive a peer that truncates the file behind memory we mapped.
 *
 * A vhost-user peer hands us its memory as fds, which we map MAP_SHARED. If it shrinks
 * such a file afterwards (ftruncate), our next access to a page beyond the new end raises
 * SIGBUS, whose default action kills the whole process. Memory that can be sealed against
 * shrinking is (memory.py); for the rest, this handler, installed once per process:
 *
 *  - for a SIGBUS raised by the kernel for a bad address (BUS_ADRERR) inside a registered
 *    mapping, replaces the faulting page (a huge page on hugetlbfs) by an anonymous zero
 *    page, mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS), and returns: the access runs
 *    again and succeeds, whether it was in our C code or in CPython's memcpy. If that
 *    mmap fails (no mapping left to split), the whole registered mapping is replaced;
 *  - counts the fault in the registration, in a process total and the last address
 *    (atomics, no lock), so that Python finds the damaged memory table and breaks that
 *    connection (MemoryTable.damaged);
 *  - for any other SIGBUS (a real bug, a mapping of ours that is not guest memory, a
 *    signal sent by a process), calls the handler it replaced, or restores the default
 *    action so that the fault, run again, kills the process as it would have.
 *
 * The table: GUARD_SLOTS fixed slots, each under a sequence lock. Writers (register,
 * unregister) take a mutex among themselves; the handler takes no lock: it reads a slot
 * only while its sequence is even and unchanged across the read, so it never uses a
 * half-written one. A slot is written only while its mapping is inaccessible (before the
 * first access, after the last), so skipping a slot that is being written is correct.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "sigbus.h"

#define GUARD_HUGETLBFS_MAGIC 0x958458f6

struct guard_slot {
    _Atomic uint64_t seq;        /* odd while a writer changes the slot */
    _Atomic uintptr_t start;
    _Atomic uintptr_t end;       /* 0: the slot is free */
    _Atomic uintptr_t granule;
    _Atomic uint64_t token;
    _Atomic uint64_t faults;
};

static struct guard_slot guard_slots[GUARD_SLOTS];
static _Atomic int64_t guard_high;          /* every slot in use is below this */
static _Atomic int64_t guard_in_use;
static _Atomic uint64_t guard_total;
static _Atomic uintptr_t guard_last;
static uint64_t guard_next_token;           /* under guard_writers */
static pthread_mutex_t guard_writers = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction guard_previous;     /* written before our handler is installed */
static int guard_installed;                 /* under guard_writers */

static int guard_zero_fill(uintptr_t start, uintptr_t length)
{
    void *p = mmap((void *)start, length, PROT_READ | PROT_WRITE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? -1 : 0;
}

/* Repair a fault at `addr` if it lies in registered memory: 1 if repaired. */
static int guard_repair(uintptr_t addr)
{
    int64_t high = atomic_load_explicit(&guard_high, memory_order_acquire);
    for (int64_t i = 0; i < high; i++) {
        struct guard_slot *s = &guard_slots[i];
        uint64_t seq = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (seq & 1)
            continue;
        uintptr_t start = atomic_load_explicit(&s->start, memory_order_relaxed);
        uintptr_t end = atomic_load_explicit(&s->end, memory_order_relaxed);
        uintptr_t granule = atomic_load_explicit(&s->granule, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->seq, memory_order_relaxed) != seq)
            continue;
        if (addr < start || addr >= end)
            continue;
        uintptr_t lo = addr & ~(granule - 1);
        if (lo < start)
            lo = start;
        uintptr_t hi = lo + granule;
        if (hi > end || hi < lo)
            hi = end;
        if (guard_zero_fill(lo, hi - lo) != 0 && guard_zero_fill(start, end - start) != 0)
            return 0;
        atomic_fetch_add_explicit(&s->faults, 1, memory_order_relaxed);
        atomic_store_explicit(&guard_last, addr, memory_order_relaxed);
        atomic_fetch_add_explicit(&guard_total, 1, memory_order_release);
        return 1;
    }
    return 0;
}

static void guard_chain(int sig, siginfo_t *info, void *context)
{
    struct sigaction old = guard_previous;
    if (old.sa_flags & SA_SIGINFO) {
        if (old.sa_sigaction != NULL) {
            old.sa_sigaction(sig, info, context);
            return;
        }
    } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
        old.sa_handler(sig);
        return;
    }
    /* The default action (a fault cannot be ignored): restore it. A fault runs again and
     * kills the process; a signal that a process sent is sent again. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (info == NULL || info->si_code <= 0)
        raise(sig);
}

static void guard_handler(int sig, siginfo_t *info, void *context)
{
    int saved = errno;
    if (info != NULL && info->si_code == BUS_ADRERR && guard_repair((uintptr_t)info->si_addr)) {
        errno = saved;
        return;
    }
    errno = saved;
    guard_chain(sig, info, context);
}

int guard_install(void)
{
    int err = 0;
    pthread_mutex_lock(&guard_writers);
    if (!guard_installed) {
        struct sigaction ours, replaced;
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = guard_handler;
        ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&ours.sa_mask);
        /* Read the one we replace first, so that the handler never sees it half-copied. */
        if (sigaction(SIGBUS, NULL, &guard_previous) != 0 || sigaction(SIGBUS, &ours, &replaced) != 0)
            err = errno;
        else
            guard_installed = 1;
    }
    pthread_mutex_unlock(&guard_writers);
    return err;
}

int guard_active(void)
{
    struct sigaction now;
    if (sigaction(SIGBUS, NULL, &now) != 0)
        return 0;
    return (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == guard_handler;
}

int64_t guard_hugepage_size(int fd)
{
    struct statfs fs;
    if (fstatfs(fd, &fs) != 0)
        return -errno;
    return (uint32_t)fs.f_type == GUARD_HUGETLBFS_MAGIC ? (int64_t)fs.f_bsize : 0;
}

static void guard_write(struct guard_slot *s, uintptr_t start, uintptr_t end, uintptr_t granule,
                        uint64_t token)
{
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, seq + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&s->start, start, memory_order_relaxed);
    atomic_store_explicit(&s->end, end, memory_order_relaxed);
    atomic_store_explicit(&s->granule, granule, memory_order_relaxed);
    atomic_store_explicit(&s->token, token, memory_order_relaxed);
    if (token != 0)
        atomic_store_explicit(&s->faults, 0, memory_order_relaxed);
    atomic_store_explicit(&s->seq, seq + 2, memory_order_release);
}

int64_t guard_register(uintptr_t start, uint64_t length, uint64_t granule, uint64_t *token)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (length == 0 || granule < page || (granule & (granule - 1)) || start % page)
        return -1;
    uintptr_t end = start + length;
    if (end < start)
        return -1;
    end = (end + granule - 1) & ~(granule - 1);  /* the kernel rounds a mapping up so */
    if (end < start + length || (granule > page && start % granule))
        return -1;
    int64_t slot = -1;
    pthread_mutex_lock(&guard_writers);
    for (int64_t i = 0; i < GUARD_SLOTS; i++) {
        if (atomic_load_explicit(&guard_slots[i].end, memory_order_relaxed) == 0) {
            slot = i;
            break;
        }
    }
    if (slot >= 0) {
        *token = ++guard_next_token;
        guard_write(&guard_slots[slot], start, end, granule, *token);
        if (slot >= atomic_load_explicit(&guard_high, memory_order_relaxed))
            atomic_store_explicit(&guard_high, slot + 1, memory_order_release);
        atomic_fetch_add_explicit(&guard_in_use, 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&guard_writers);
    return slot;
}

int guard_unregister(int64_t slot, uint64_t token)
{
    if (slot < 0 || slot >= GUARD_SLOTS || token == 0)
        return -1;
    int rc = -1;
    pthread_mutex_lock(&guard_writers);
    struct guard_slot *s = &guard_slots[slot];
    if (atomic_load_explicit(&s->token, memory_order_relaxed) == token &&
        atomic_load_explicit(&s->end, memory_order_relaxed) != 0) {
        guard_write(s, 0, 0, 0, 0);
        int64_t high = atomic_load_explicit(&guard_high, memory_order_relaxed);
        while (high > 0 && atomic_load_explicit(&guard_slots[high - 1].end, memory_order_relaxed) == 0)
            high--;
        atomic_store_explicit(&guard_high, high, memory_order_release);
        atomic_fetch_sub_explicit(&guard_in_use, 1, memory_order_relaxed);
        rc = 0;
    }
    pthread_mutex_unlock(&guard_writers);
    return rc;
}

uint64_t guard_faults(int64_t slot, uint64_t token)
{
    if (slot < 0 || slot >= GUARD_SLOTS || token == 0)
        return 0;
    struct guard_slot *s = &guard_slots[slot];
    for (;;) {
        uint64_t seq = atomic_load_explicit(&s->seq, memory_order_acquire);
        uint64_t ours = atomic_load_explicit(&s->token, memory_order_relaxed);
        uint64_t faults = atomic_load_explicit(&s->faults, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        if (!(seq & 1) && atomic_load_explicit(&s->seq, memory_order_relaxed) == seq)
            return ours == token ? faults : 0;
    }
}

uint64_t guard_total_faults(void)
{
    return atomic_load_explicit(&guard_total, memory_order_acquire);
}

uintptr_t guard_last_address(void)
{
    return atomic_load_explicit(&guard_last, memory_order_relaxed);
}

int64_t guard_used(void)
{
    return atomic_load_explicit(&guard_in_use, memory_order_relaxed);
}
