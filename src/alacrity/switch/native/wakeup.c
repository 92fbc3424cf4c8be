/* The switch's wake-up loop in C: Switch.run's sleep, wake, forward and signal, for a switch
 * whose every running ring is native (no tap, no coalescing, no dirty log, no Python-only
 * sender). process.py's loop is the reference; this is the same loop without Python between
 * a kick and the interrupt it causes.
 *
 * Why: on a small host with TCG guests frames come one or two at a time, the switch sleeps
 * after nearly every batch, and each wake-up ran ~130 us of cold Python before the first
 * interrupt went out (measured with timestamps in the loop): that was most of what the switch
 * added to a VM-to-VM round trip, and the CPU it took came out of the guests.
 *
 * sw_run returns whenever Python has something to do, with every moved index and counter
 * still in C (Python syncs them out, as after sw_poll): a readable socket or any fd with an
 * error (SW_RUN_IO; a signal is one: Python's wake-up fd, set by Switch.run, is among the fds
 * Python serves, so a signal that comes while C forwards is seen too), a sleep that timed out, a
 * chain the C path cannot take (SW_RUN_PUNT, after signalling what this poll moved), a SIGBUS
 * the guard repaired, a call fd that failed, or a ring whose signal Python decides.
 *
 * Call fds are the peer's (it shares their file flags: see vhost_user/eventfd.py). A write is
 * bracketed by an odd `in_call` count; Python's eventfd watchdog thread sends a signal to
 * this thread when it sees the same odd count twice, and the write fails with EINTR instead
 * of sleeping on: EPERM for Python, which breaks that port alone. The watchdog parks while
 * nothing writes; a write that finds it parked wakes it first (`watch_parked`, `watch_wake`).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fastpath.h"

#define USED_F_NO_NOTIFY 1

static inline int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static inline void st16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}

static inline int tx_polled(const struct sw_port *p)
{
    return !p->tx_skip && p->tx.native;
}

/* DeviceQueue.enable_notify for every TX ring; 1 if a chain came meanwhile (do not sleep). */
static int arm(struct sw_engine *e)
{
    for (int32_t i = 0; i < e->nports; i++) {
        struct sw_queue *q = &e->ports[i]->tx;
        if (!tx_polled(e->ports[i]))
            continue;
        if (q->event_idx)
            st16(q->used + 4 + 8 * (size_t)q->size, q->last_avail);
        else
            st16(q->used, 0);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the driver sees our request before we look again */
    for (int32_t i = 0; i < e->nports; i++) {
        struct sw_queue *q = &e->ports[i]->tx;
        if (tx_polled(e->ports[i]) && __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE) != q->last_avail)
            return 1;
    }
    return 0;
}

/* DeviceQueue.disable_notify: with EVENT_IDX the avail_event left behind suppresses kicks. */
static void disarm(struct sw_engine *e)
{
    for (int32_t i = 0; i < e->nports; i++) {
        struct sw_queue *q = &e->ports[i]->tx;
        if (tx_polled(e->ports[i]) && !q->event_idx)
            st16(q->used, USED_F_NO_NOTIFY);
    }
}

/* Switch._adapt_poll: grow the spin while wake-ups come within the budget, else halve it. */
void sw_adapt(struct sw_wait *w, int64_t gap_ns)
{
    if (gap_ns <= w->budget_ns) {
        int64_t grown = 2 * w->spin_ns > w->min_ns ? 2 * w->spin_ns : w->min_ns;
        w->spin_ns = grown < w->budget_ns ? grown : w->budget_ns;
    } else {
        w->spin_ns = w->spin_ns / 2 >= w->min_ns ? w->spin_ns / 2 : 0;
    }
}

/* vhost_user/eventfd.py's notify: 0, or the errno that must break the port. */
static int call(struct sw_wait *w, int fd)
{
    static const uint64_t one = 1;
    __atomic_add_fetch(&w->in_call, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(w->watch_parked, __ATOMIC_SEQ_CST)) /* after our mark: see eventfd.py */
        (void)!write(w->watch_wake, &one, sizeof(one));
    ssize_t n = write(fd, &one, sizeof(one));
    int err = errno;
    __atomic_add_fetch(&w->in_call, 1, __ATOMIC_SEQ_CST);
    if (n == (ssize_t)sizeof(one) || (n < 0 && err == EAGAIN))
        return 0; /* EAGAIN: the counter is full, so the peer has a signal pending anyway */
    if (n < 0 && err == EINTR)
        return EPERM; /* only a write that slept sees the watchdog's signal */
    return n < 0 ? err : EIO;
}

/* The end of a poll: signal the touched rings that asked for it, in order (sw_notify). */
static int32_t deliver(struct sw_engine *e, struct sw_wait *w)
{
    int32_t n = sw_notify(e, w->signals);
    for (int32_t k = 0; k < n; k++) {
        int32_t entry = w->signals[k];
        if (entry < 0) {
            w->nsignals = n;
            w->next_signal = k;
            return SW_RUN_SIGNALS;
        }
        int32_t fd = w->calls[entry];
        if (fd < 0)
            continue;
        int err = call(w, fd);
        if (err) {
            w->failed_entry = entry;
            w->failed_errno = err;
            w->nsignals = n;
            w->next_signal = k + 1;
            return SW_RUN_CALL;
        }
        w->interrupts[entry >> 1]++;
    }
    return 0;
}

/* Take a kick: 1, 0 if there was none, or -errno (Python's take_kick then says what). The
 * peer shares the fd's flags, so the read asks for RWF_NOWAIT itself, as eventfd.drain does. */
static int drain_kick(int fd)
{
    uint64_t value;
    struct iovec iov = {&value, sizeof(value)};
    ssize_t n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    if (n == (ssize_t)sizeof(value))
        return 1;
    if (n < 0 && errno == EAGAIN)
        return 0;
    return n < 0 ? -errno : -EIO;
}

/* Is any fd that Python serves readable (or in error)? */
static int io_ready(struct sw_wait *w)
{
    int32_t others = w->nfds - w->nkicks;
    return others > 0 && poll(w->pfds + w->nkicks, (nfds_t)others, 0) > 0;
}

int32_t sw_wait_fds(struct sw_wait *w, const int32_t *fds, const int32_t *kick_port, int32_t nfds,
                    int32_t nkicks)
{
    struct pollfd *pfds = realloc(w->pfds, sizeof(*pfds) * (size_t)(nfds ? nfds : 1));
    int32_t *ports = realloc(w->kick_port, sizeof(int32_t) * (size_t)(nkicks ? nkicks : 1));
    if (pfds)
        w->pfds = pfds;
    if (ports)
        w->kick_port = ports;
    if (!pfds || !ports)
        return -1;
    for (int32_t k = 0; k < nfds; k++) {
        pfds[k].fd = fds[k];
        pfds[k].events = POLLIN;
        pfds[k].revents = 0;
    }
    for (int32_t k = 0; k < nkicks; k++)
        ports[k] = kick_port[k];
    w->nfds = nfds;
    w->nkicks = nkicks;
    return 0;
}

void sw_wait_free(struct sw_wait *w)
{
    free(w->pfds);
    free(w->kick_port);
    w->pfds = NULL;
    w->kick_port = NULL;
    w->nfds = w->nkicks = 0;
}

int32_t sw_run(struct sw_engine *e, struct sw_wait *w)
{
    int64_t next_io = 0;
    for (;;) {
        if (w->faults && w->faults() != w->faults_seen)
            return SW_RUN_FAULTS; /* poll_once finds the ports whose memory it was */
        int64_t t = now_ns();
        sw_begin(e, (double)t / 1e9);
        int32_t work = sw_poll(e, 0, w->batch);
        int32_t r = deliver(e, w);
        if (r)
            return r;
        if (e->stop < e->nports)
            return SW_RUN_PUNT;
        if (work) {
            w->batches++;
            w->last_work_ns = t;
        }
        if (work || t - w->last_work_ns < w->spin_ns) {
            if (t >= next_io) { /* under load too, a stopping VM waits on GET_VRING_BASE */
                if (io_ready(w)) /* a signal too: its wake-up fd is one of these */
                    return SW_RUN_IO;
                next_io = t + w->io_check_ns;
            }
            continue;
        }
        if (arm(e)) {
            disarm(e);
            continue;
        }
        w->sleeps++;
        int timeout_ms = w->timeout_ms;
        double decision = sw_next_decision(e); /* a deferred TX decision: wake for it */
        if (decision >= 0) {
            double ms = (decision - (double)t / 1e9) * 1e3;
            timeout_ms = ms < 1 ? 1 : ms < timeout_ms ? (int)ms + 1 : timeout_ms;
        }
        int n = poll(w->pfds, (nfds_t)w->nfds, timeout_ms);
        int err = errno;
        w->wakeups++;
        disarm(e);
        t = now_ns();
        if (w->adaptive)
            sw_adapt(w, t - w->last_work_ns);
        w->last_work_ns = t; /* poll a while after every wake-up */
        if (n < 0) {
            w->failed_errno = err;
            return err == EINTR ? SW_RUN_EINTR : SW_RUN_ERROR;
        }
        if (n == 0) {
            if (decision >= 0)
                continue; /* the next poll takes it */
            return SW_RUN_TIMEOUT;
        }
        for (int32_t k = 0; k < w->nkicks; k++) {
            short got = w->pfds[k].revents;
            if (!got)
                continue;
            int kicked = got == POLLIN ? drain_kick(w->pfds[k].fd) : -EIO;
            if (kicked < 0)
                return SW_RUN_IO;
            w->kicks[w->kick_port[k]] += kicked;
        }
        for (int32_t k = w->nkicks; k < w->nfds; k++)
            if (w->pfds[k].revents)
                return SW_RUN_IO;
    }
}
