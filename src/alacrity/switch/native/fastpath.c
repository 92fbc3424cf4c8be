/* The switch's native fast path: the common case of Engine.poll_once for one sender's
 * batch, without going back to Python per frame.
 *
 * For each TX chain of the sender: walk it (split ring, INDIRECT_DESC, every index,
 * address, length and loop bound checked against the port's memory regions, exactly as
 * device_queue.py does), check its virtio-net header as check_header does, and a GSO
 * frame's own headers as offload.py's parse_gso does (on a private copy of them, which is
 * what receivers get: the sender cannot change what was checked), learn the source and
 * look up the destination in the FDB (the same semantics as switch/fdb.py), plan the
 * delivery to every receiver that takes the frame as it is (pop and walk their RX
 * chains, MRG_RXBUF included), and only then copy, push used entries and count. The plan
 * is all-or-nothing: anything this code does not handle (a header spread over buffers,
 * any ring or header fault, an offload to convert for a receiver that did not negotiate
 * it, UFO, headers beyond HEAD_COPY, a tap or other Python-only receiver, scratch space
 * exhausted) makes sw_drain stop *before* consuming that chain with status SW_PUNT, and the Python reference code handles it (and words
 * any fault). The FDB updates done before a punt are idempotent: Python repeats them.
 *
 * Used entries are written as they are made; each ring's used index is stored once, at
 * the end of the call. Counters are kept as deltas, and the engine keeps the ordered list
 * of rings touched in the poll; sw_notify and sw_export hand both to Python at its end.
 *
 * Guest memory is hostile and changes under us: every value read from it that is
 * checked and then used is copied to a local first (READ_ONCE), and all pointers are
 * into the port's own mapped regions, checked before use.
 *
 * Dirty logging (live migration; vhost_user/dirty_log.py says why it works so): a ring with
 * a log marks the pages of every byte written, after a fence: the RX buffers' written bytes
 * after each delivery, the used elements and index at each publish. A chain with a buffer
 * the log does not cover is a punt: Python breaks the port as the reference does.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastpath.h"

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define MAX_QUEUE_SIZE 32768u
#define TX_SEGS 64
#define ETH_HLEN 14
#define HDR_F_NEEDS_CSUM 1
#define HDR_F_DATA_VALID 2
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80
#define MAX_GSO_FRAME (65535 + ETH_HLEN + 4) /* virtio/net.py: 64 KiB of IP, Ethernet, a VLAN tag */
#define HEAD_COPY 256 /* a GSO frame's headers are checked and sent from a copy this long */
#define LOG_PAGE_SHIFT 12 /* the dirty log has a bit per 4 KiB page */

#define barrier() __asm__ __volatile__("" ::: "memory")

struct vdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static inline void read_desc(const uint8_t *table, uint32_t i, struct vdesc *d)
{
    memcpy(d, table + 16 * (size_t)i, 16);
    barrier(); /* the copy is what we check and use: no re-reads of guest memory */
}

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    barrier();
    return v;
}

static inline uint16_t avail_idx(const struct sw_queue *q)
{
    return __atomic_load_n((const uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
}

static inline uint8_t *xlate(const struct sw_queue *q, uint64_t addr, uint64_t len)
{
    for (uint32_t i = 0; i < q->nregions; i++) {
        const struct sw_region *r = &q->regions[i];
        if (addr >= r->gpa && addr - r->gpa <= r->size && len <= r->size - (addr - r->gpa))
            return r->host + (addr - r->gpa);
    }
    return NULL;
}

/* Walk the chain at `head` into segs[0 .. cap): readable buffers first. Returns the number
 * of buffers, or -1 for anything device_queue.py would refuse (or more than `cap`). */
static int walk(const struct sw_queue *q, uint32_t head, struct sw_seg *segs, uint32_t cap,
                uint32_t *nreadable)
{
    struct vdesc d;
    const uint8_t *table;
    uint32_t count, index;
    if (head >= q->size)
        return -1;
    read_desc(q->desc, head, &d);
    if (d.flags & DESC_F_INDIRECT) {
        if (!q->indirect)
            return -1;
        if ((d.flags & DESC_F_NEXT) || !d.len || d.len % 16 || d.len > 16 * MAX_QUEUE_SIZE)
            return -1;
        table = xlate(q, d.addr, d.len);
        if (!table)
            return -1;
        count = d.len / 16;
        index = 0;
    } else {
        table = q->desc;
        count = q->size;
        index = head;
    }
    uint32_t n = 0, nr = 0, nw = 0;
    for (uint32_t k = 0; k < count; k++) {
        read_desc(table, index, &d);
        if (d.flags & DESC_F_INDIRECT)
            return -1;
        uint8_t *p = xlate(q, d.addr, d.len);
        if (!p)
            return -1;
        if (d.flags & DESC_F_WRITE)
            nw++;
        else if (nw)
            return -1;
        else
            nr++;
        if (n == cap)
            return -1;
        segs[n].p = p;
        segs[n].len = d.len;
        segs[n].gpa = d.addr;
        n++;
        if (!(d.flags & DESC_F_NEXT)) {
            *nreadable = nr;
            return (int)n;
        }
        if (d.next >= count)
            return -1;
        index = d.next;
    }
    return -1;
}

/* ---- prefetch hints. Frames come from another CPU: its descriptors and buffers are in that
 * CPU's cache, and walking a chain is a series of dependent misses (avail entry, descriptor,
 * buffer). The loops below ask for the next chains' lines a few chains ahead, so the misses
 * overlap. Nothing read here is used but as a prefetch address (a prefetch cannot fault and
 * changes nothing); every value is read again, and checked, when it is used. */

#define PF_DESC 8 /* chains ahead whose descriptor is fetched */
#define PF_BUF 4  /* chains ahead whose first buffer is fetched (its descriptor was, before) */
#define PF_MAX 1536 /* bytes of a buffer fetched */
#define PF_AVAIL 16 /* avail entries ahead (32 to a line) */

static inline void pf_read(const void *p) { __builtin_prefetch(p, 0, 3); }

static inline void pf_write(const void *p)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("prefetchw %0" : : "m"(*(const volatile uint8_t *)p)); /* a NOP where unknown */
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

/* The descriptor of the chain at avail position `idx`. */
static inline void pf_desc(const struct sw_queue *q, uint16_t idx)
{
    uint16_t head = ld16(q->avail + 4 + 2 * (size_t)(idx & (q->size - 1)));
    if (head < q->size)
        pf_read(q->desc + 16 * (size_t)head);
}

/* The first buffer (its first two lines) of the chain at avail position `idx`, or its
 * indirect table; `write`: for a receiver, which writes it. */
static void pf_buf(const struct sw_queue *q, uint16_t idx, int write)
{
    uint16_t head = ld16(q->avail + 4 + 2 * (size_t)(idx & (q->size - 1)));
    if (head >= q->size)
        return;
    uint64_t d[2];
    memcpy(d, q->desc + 16 * (size_t)head, 16);
    barrier();
    uint64_t addr = d[0];
    uint32_t len = (uint32_t)d[1];
    uint16_t flags = (uint16_t)(d[1] >> 32);
    if (!len)
        return;
    const uint8_t *p = xlate(q, addr, len);
    if (!p)
        return;
    if (flags & DESC_F_INDIRECT) {
        pf_read(p);
        return;
    }
    /* a receiver's buffer: as much as the last frame it got took */
    uint32_t want = write ? (q->pf_len > 128 ? q->pf_len : 128) : PF_MAX;
    uint32_t n = len < want ? len : want;
    if (write) {
        for (uint32_t off = 0; off < n; off += 64)
            pf_write(p + off);
    } else {
        for (uint32_t off = 0; off < n; off += 64)
            pf_read(p + off);
    }
}

/* Prefetch for a ring about to consume position `idx` (< aidx): the descriptors and buffers
 * of the chains after it. */
static inline void pf_ahead(const struct sw_queue *q, uint16_t idx, uint16_t aidx, int write)
{
    uint16_t left = (uint16_t)(aidx - idx);
    if (left > q->size)
        return;
    if (left > PF_AVAIL)
        pf_read(q->avail + 4 + 2 * (size_t)((idx + PF_AVAIL) & (q->size - 1)));
    if (left > PF_DESC)
        pf_desc(q, (uint16_t)(idx + PF_DESC));
    if (left > PF_BUF)
        pf_buf(q, (uint16_t)(idx + PF_BUF), write);
}

/* The same, starting a run at `idx`: everything up to the look-ahead distances. */
static void pf_start(const struct sw_queue *q, uint16_t idx, uint16_t aidx, int write)
{
    uint16_t left = (uint16_t)(aidx - idx);
    if (left > q->size)
        return;
    for (uint16_t k = 0; k < PF_DESC && k < left; k++)
        pf_desc(q, (uint16_t)(idx + k));
    for (uint16_t k = 0; k < PF_BUF && k < left; k++)
        pf_buf(q, (uint16_t)(idx + k), write);
}

static inline int log_covers(const struct sw_queue *q, uint64_t gpa, uint64_t len)
{
    /* gpa + len cannot wrap: the range is inside a region of the memory table */
    return !len || ((gpa + len - 1) >> LOG_PAGE_SHIFT >> 3) < q->log_size;
}

/* Mark the pages of [gpa, gpa + len), which the log covers, after a fence that follows the
 * writes: a bit already set needs no atomic operation. */
static void log_mark(const struct sw_queue *q, uint64_t gpa, uint64_t len)
{
    if (!len)
        return;
    for (uint64_t page = gpa >> LOG_PAGE_SHIFT; page <= (gpa + len - 1) >> LOG_PAGE_SHIFT; page++) {
        uint8_t *byte = q->log + (page >> 3), bit = (uint8_t)(1u << (page & 7));
        if (!(__atomic_load_n(byte, __ATOMIC_RELAXED) & bit))
            __atomic_fetch_or(byte, bit, __ATOMIC_RELAXED);
    }
}

/* The used elements pushed since the last publish, and the index, which publish just stored. */
static void log_used_ring(const struct sw_queue *q)
{
    uint32_t n = (uint16_t)(q->used_idx - q->published), first = q->published & (q->size - 1);
    if (n > q->size)
        n = q->size; /* (never: a ring has at most `size` chains to push) */
    uint32_t before_wrap = n < q->size - first ? n : q->size - first;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    log_mark(q, q->used_log + 4 + 8 * (uint64_t)first, 8 * (uint64_t)before_wrap);
    log_mark(q, q->used_log + 4, 8 * (uint64_t)(n - before_wrap));
    log_mark(q, q->used_log + 2, 2);
}

static inline void mark_dirty(struct sw_engine *e, struct sw_port *p)
{
    if (!p->dirty) {
        p->dirty = 1;
        e->dirty[e->ndirty++] = p->index;
    }
}

static inline void push(struct sw_engine *e, struct sw_port *p, struct sw_queue *q, uint32_t head,
                        uint32_t written)
{
    uint32_t elem[2] = {head, written};
    memcpy(q->used + 4 + 8 * (size_t)(q->used_idx & (q->size - 1)), elem, 8);
    pf_write(q->used + 4 + 8 * (size_t)((q->used_idx + 8) & (q->size - 1))); /* the next line */
    q->used_idx++;
    q->pushed++;
    q->dirty = 1;
    q->publish = 1;
    mark_dirty(e, p);
}

static inline void publish(struct sw_queue *q)
{
    if (q->publish) {
        q->publish = 0;
        /* the buffers and used elements are visible before the index that hands them over */
        __atomic_store_n((uint16_t *)(q->used + 2), q->used_idx, __ATOMIC_RELEASE);
        if (q->log && q->log_used)
            log_used_ring(q);
        q->published = q->used_idx;
    }
}

/* ---- the FDB: switch/fdb.py in C. Insertion order (a list) decides eviction; a keyed
 * multiply-shift hash with chaining finds entries. */

struct sw_fent {
    uint64_t mac;
    double seen;
    int64_t port;
    int32_t hnext, prev, next;
    int32_t pad;
};

struct sw_fdb {
    uint32_t cap, count, bits, pad;
    int32_t *buckets;
    struct sw_fent *ents;
    int32_t head, tail, freelist, pad2;
    double ageing;
    uint64_t moves, evictions, k0, k1;
};

static inline uint32_t fdb_hash(const struct sw_fdb *f, uint64_t mac)
{
    return (uint32_t)(((mac ^ f->k0) * f->k1) >> (64 - f->bits));
}

struct sw_fdb *sw_fdb_new(uint32_t max_entries, double ageing, uint64_t k0, uint64_t k1)
{
    if (max_entries < 1 || max_entries > (1u << 24))
        return NULL;
    struct sw_fdb *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    uint32_t bits = 1;
    while ((1u << bits) < 2 * max_entries)
        bits++;
    f->cap = max_entries;
    f->bits = bits;
    f->buckets = malloc(sizeof(int32_t) << bits);
    f->ents = calloc(max_entries, sizeof(struct sw_fent));
    if (!f->buckets || !f->ents) {
        free(f->buckets);
        free(f->ents);
        free(f);
        return NULL;
    }
    memset(f->buckets, 0xff, sizeof(int32_t) << bits);
    for (uint32_t i = 0; i < max_entries; i++)
        f->ents[i].next = i + 1 < max_entries ? (int32_t)(i + 1) : -1;
    f->freelist = 0;
    f->head = f->tail = -1;
    f->ageing = ageing;
    f->k0 = k0;
    f->k1 = k1 | 1;
    return f;
}

void sw_fdb_free(struct sw_fdb *f)
{
    if (f) {
        free(f->buckets);
        free(f->ents);
        free(f);
    }
}

void sw_fdb_set_ageing(struct sw_fdb *f, double ageing) { f->ageing = ageing; }
double sw_fdb_ageing(struct sw_fdb *f) { return f->ageing; }
uint32_t sw_fdb_max(struct sw_fdb *f) { return f->cap; }
uint32_t sw_fdb_len(struct sw_fdb *f) { return f->count; }
uint64_t sw_fdb_moves(struct sw_fdb *f) { return f->moves; }
uint64_t sw_fdb_evictions(struct sw_fdb *f) { return f->evictions; }

void sw_fdb_set_counts(struct sw_fdb *f, uint64_t moves, uint64_t evictions)
{
    f->moves = moves;
    f->evictions = evictions;
}

static inline int32_t fdb_find(const struct sw_fdb *f, uint64_t mac)
{
    for (int32_t i = f->buckets[fdb_hash(f, mac)]; i >= 0; i = f->ents[i].hnext)
        if (f->ents[i].mac == mac)
            return i;
    return -1;
}

static void fdb_remove(struct sw_fdb *f, int32_t i)
{
    struct sw_fent *e = &f->ents[i];
    int32_t *link = &f->buckets[fdb_hash(f, e->mac)];
    while (*link != i)
        link = &f->ents[*link].hnext;
    *link = e->hnext;
    if (e->prev >= 0)
        f->ents[e->prev].next = e->next;
    else
        f->head = e->next;
    if (e->next >= 0)
        f->ents[e->next].prev = e->prev;
    else
        f->tail = e->prev;
    e->next = f->freelist;
    f->freelist = i;
    f->count--;
}

void sw_fdb_expire(struct sw_fdb *f, double now)
{
    for (int32_t i = f->head; i >= 0;) {
        int32_t next = f->ents[i].next;
        if (now - f->ents[i].seen > f->ageing)
            fdb_remove(f, i);
        i = next;
    }
}

void sw_fdb_forget_port(struct sw_fdb *f, int64_t port)
{
    for (int32_t i = f->head; i >= 0;) {
        int32_t next = f->ents[i].next;
        if (f->ents[i].port == port)
            fdb_remove(f, i);
        i = next;
    }
}

void sw_fdb_learn(struct sw_fdb *f, uint64_t mac, int64_t port, double now)
{
    int32_t i = fdb_find(f, mac);
    if (i >= 0) {
        struct sw_fent *e = &f->ents[i];
        if (e->port != port) {
            e->port = port;
            f->moves++;
        }
        e->seen = now;
        return;
    }
    if (mac >> 40 & 1)
        return; /* group addresses are not learned */
    if (f->count >= f->cap) {
        sw_fdb_expire(f, now);
        while (f->count >= f->cap) {
            fdb_remove(f, f->head); /* the one learned longest ago */
            f->evictions++;
        }
    }
    i = f->freelist;
    struct sw_fent *e = &f->ents[i];
    f->freelist = e->next;
    e->mac = mac;
    e->seen = now;
    e->port = port;
    uint32_t h = fdb_hash(f, mac);
    e->hnext = f->buckets[h];
    f->buckets[h] = i;
    e->prev = f->tail;
    e->next = -1;
    if (f->tail >= 0)
        f->ents[f->tail].next = i;
    else
        f->head = i;
    f->tail = i;
    f->count++;
}

int sw_fdb_lookup(struct sw_fdb *f, uint64_t mac, double now, int64_t *port)
{
    int32_t i = fdb_find(f, mac);
    if (i < 0)
        return 0;
    if (now - f->ents[i].seen > f->ageing) {
        fdb_remove(f, i);
        return 0;
    }
    *port = f->ents[i].port;
    return 1;
}

uint32_t sw_fdb_dump(struct sw_fdb *f, uint64_t *macs, int64_t *ports, double *seen, uint32_t cap)
{
    uint32_t n = 0;
    for (int32_t i = f->head; i >= 0 && n < cap; i = f->ents[i].next, n++) {
        macs[n] = f->ents[i].mac;
        ports[n] = f->ents[i].port;
        seen[n] = f->ents[i].seen;
    }
    return n;
}

/* ---- ports */

static inline uint32_t id_hash(int64_t id, uint32_t mask)
{
    return (uint32_t)(((uint64_t)id * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

void sw_index_ports(struct sw_engine *e)
{
    memset(e->idmap, 0, sizeof(int32_t) * ((size_t)e->idmask + 1));
    for (int32_t i = 0; i < e->nports; i++) {
        struct sw_port *p = e->ports[i];
        p->index = i;
        uint32_t h = id_hash(p->id, e->idmask);
        while (e->idmap[h])
            h = (h + 1) & e->idmask;
        e->idmap[h] = i + 1;
    }
}

static inline struct sw_port *port_by_id(const struct sw_engine *e, int64_t id)
{
    for (uint32_t h = id_hash(id, e->idmask);; h = (h + 1) & e->idmask) {
        int32_t slot = e->idmap[h];
        if (!slot)
            return NULL;
        if (e->ports[slot - 1]->id == id)
            return e->ports[slot - 1];
    }
}

void sw_begin(struct sw_engine *e, double now)
{
    e->now = now;
    e->norder = 0;
    for (int32_t i = 0; i < e->nports; i++)
        e->ports[i]->rx.touched = e->ports[i]->tx.touched = 0;
}

/* Ring `ring` of port `index` was written this poll (Engine.poll_once's `touched`, in order). */
void sw_touch(struct sw_engine *e, int32_t index, int32_t ring)
{
    struct sw_port *p = e->ports[index];
    struct sw_queue *q = ring ? &p->tx : &p->rx;
    if (!q->touched) {
        q->touched = 1;
        e->order[e->norder++] = 2 * index + ring;
    }
}

/* DeviceQueue.needs_notify: does the driver ask to be interrupted for what was used since
 * the last decision? That decision is then taken. */
static int needs_notify(struct sw_engine *e, struct sw_port *p, struct sw_queue *q)
{
    uint16_t old = q->signalled, now = q->used_idx;
    q->signalled = now;
    q->dirty = 1;
    mark_dirty(e, p);
    if (q->event_idx) {
        uint16_t event = ld16(q->avail + 4 + 2 * (size_t)q->size);
        return (uint16_t)(now - event - 1) < (uint16_t)(now - old);
    }
    return !(ld16(q->avail) & 1);
}

/* Engine._tx_decision_due: has port `p`'s deferred TX decision waited its bound, or does
 * a quarter of its ring wait to be reported? */
static int tx_decision_due(const struct sw_engine *e, const struct sw_port *p)
{
    uint16_t waiting = (uint16_t)(p->tx.used_idx - p->tx.signalled);
    return e->now - p->tx_deferred_since >= e->tx_defer || waiting >= p->tx.size / 4;
}

/* The end of poll_once: which touched rings to signal, in order (Engine.poll_once: a ring C
 * does not have comes as -1 - entry, for Python to decide); then the TX rings whose deferred
 * decision is due (Engine._decide_deferred). out[k] = 2 * index + ring. */
int32_t sw_notify(struct sw_engine *e, int32_t *out)
{
    int32_t n = 0;
    for (int32_t k = 0; k < e->norder; k++) {
        int32_t entry = e->order[k];
        struct sw_port *p = e->ports[entry / 2];
        struct sw_queue *q = entry % 2 ? &p->tx : &p->rx;
        if (p->broken)
            continue;
        if (!q->native) {
            out[n++] = -1 - entry;
            continue;
        }
        if (q->used_idx == q->signalled)
            continue;
        if (entry % 2 && e->tx_defer > 0) {
            if (!p->tx_deferring) {
                p->tx_deferring = 1;
                p->tx_deferred_since = e->now;
                e->tx_deferred++;
            }
            continue;
        }
        if (needs_notify(e, p, q))
            out[n++] = entry;
    }
    for (int32_t i = 0; i < e->nports; i++) {
        struct sw_port *p = e->ports[i];
        if (!p->tx_deferring)
            continue;
        if (p->broken || !p->tx.native) {
            p->tx_deferring = 0;
            if (!p->broken && !p->tx.native) {
                /* a ring C no longer has: a new one (nothing waits on it), or the same that
                 * Python now serves, which then decides (or defers) in C's stead */
                e->tx_unneeded++;
                if (!p->tx.touched) /* else it is in `out` already: at most one entry a ring */
                    out[n++] = -1 - (2 * i + 1);
            }
            continue;
        }
        if (!tx_decision_due(e, p))
            continue;
        p->tx_deferring = 0;
        if (p->tx.used_idx != p->tx.signalled && needs_notify(e, p, &p->tx))
            out[n++] = 2 * i + 1;
        else
            e->tx_unneeded++;
    }
    return n;
}

/* When the next deferred TX decision is due at the latest (its deferral's start plus the
 * bound), or -1 if none is deferred. */
double sw_next_decision(struct sw_engine *e)
{
    double next = -1;
    for (int32_t i = 0; i < e->nports; i++) {
        struct sw_port *p = e->ports[i];
        if (p->tx_deferring && (next < 0 || p->tx_deferred_since + e->tx_defer < next))
            next = p->tx_deferred_since + e->tx_defer;
    }
    return next;
}

/* Sync out: for every port with changes, SW_REC values (see engine.py), cleared here; then
 * the floods. Returns the number of values. */
int32_t sw_export(struct sw_engine *e, int64_t *out)
{
    int32_t n = 0;
    for (int32_t i = 0; i < e->ndirty; i++) {
        struct sw_port *p = e->ports[e->dirty[i]];
        int64_t *r = out + n;
        r[0] = p->index;
        r[1] = p->rx.dirty | p->tx.dirty << 1;
        r[2] = p->rx.last_avail;
        r[3] = p->rx.used_idx;
        r[4] = p->rx.signalled;
        r[5] = p->rx.pushed;
        r[6] = p->tx.last_avail;
        r[7] = p->tx.used_idx;
        r[8] = p->tx.signalled;
        r[9] = p->tx.pushed;
        r[10] = (int64_t)p->rx_packets;
        r[11] = (int64_t)p->rx_bytes;
        r[12] = (int64_t)p->rx_dropped;
        r[13] = (int64_t)p->tx_packets;
        r[14] = (int64_t)p->tx_bytes;
        r[15] = (int64_t)p->tx_dropped;
        n += SW_REC;
        p->rx.dirty = p->tx.dirty = 0;
        p->rx.pushed = p->tx.pushed = 0;
        p->rx_packets = p->rx_bytes = p->rx_dropped = 0;
        p->tx_packets = p->tx_bytes = p->tx_dropped = 0;
        p->dirty = 0;
    }
    e->ndirty = 0;
    out[n++] = (int64_t)e->floods;
    e->floods = 0;
    return n;
}

/* ---- forwarding */

struct frame {
    struct sw_seg src[TX_SEGS + 2]; /* the virtio-net header we write, then the frame */
    uint32_t nsrc;
    uint64_t length;
    uint64_t hdr0;                  /* the header each receiver gets: bytes 0-7, 8-9 */
    uint16_t hdr1;
    uint8_t hdr[12];                /* the same, in bytes, for a header spread over RX buffers */
    int needs_csum;
    uint8_t gso_type;
    uint8_t head[HEAD_COPY];        /* a GSO frame's first bytes, checked: src[1] points here */
};

static inline uint32_t be16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }

/* Replace the first min(length, HEAD_COPY) bytes of the frame's sources by a copy in f->head
 * (src[1]); returns the length of the copy. */
static uint64_t copy_head(struct frame *f)
{
    uint64_t want = f->length < HEAD_COPY ? f->length : HEAD_COPY, got = 0, off = 0;
    uint32_t k = 1;
    while (got < want) {
        uint64_t n = f->src[k].len - off;
        if (n > want - got)
            n = want - got;
        memcpy(f->head + got, f->src[k].p + off, n);
        got += n;
        off += n;
        if (off == f->src[k].len) {
            k++;
            off = 0;
        }
    }
    barrier(); /* the copy is what is checked and sent */
    struct sw_seg rest[TX_SEGS + 1];
    uint32_t nrest = 0;
    for (; k < f->nsrc; k++, off = 0) {
        rest[nrest].p = f->src[k].p + off;
        rest[nrest].len = f->src[k].len - off;
        nrest++;
    }
    f->src[1].p = f->head;
    f->src[1].len = want;
    memcpy(f->src + 2, rest, sizeof(rest[0]) * nrest);
    f->nsrc = 2 + nrest;
    return want;
}

/* offload.py's parse_gso for TCPv4/v6, on the first `n` bytes of a `length`-byte frame
 * (n <= length): 0 if Python would find it believable, -1 if not *or* if telling would need
 * a byte past `n` (a punt either way: Python decides). */
static int gso_check(const uint8_t *h, uint64_t n, uint64_t length, uint8_t base, uint16_t csum_start,
                     uint16_t csum_offset)
{
    uint32_t kind = be16(h + 12);
    uint64_t off = ETH_HLEN, l4;
    for (int i = 0; i < 2 && (kind == 0x8100 || kind == 0x88A8); i++) {
        if (off + 4 > n)
            return -1;
        kind = be16(h + off + 2);
        off += 4;
    }
    if (base == GSO_TCPV4) {
        if (kind != 0x0800 || off + 20 > n)
            return -1;
        uint8_t ver_ihl = h[off];
        uint64_t ihl = (uint64_t)(ver_ihl & 0xF) * 4;
        if (ver_ihl >> 4 != 4 || ihl < 20 || off + ihl > n)
            return -1;
        if (be16(h + off + 6) & 0x3FFF || h[off + 9] != 6)
            return -1; /* a fragment, or not TCP */
        l4 = off + ihl;
    } else {
        if (kind != 0x86DD || off + 40 > n || h[off] >> 4 != 6)
            return -1;
        uint8_t next = h[off + 6];
        l4 = off + 40;
        for (int i = 0; i < 8 && (next == 0 || next == 43 || next == 60); i++) {
            if (l4 + 8 > n)
                return -1;
            next = h[l4];
            l4 += ((uint64_t)h[l4 + 1] + 1) * 8;
        }
        if (next != 6)
            return -1;
    }
    if (l4 + 20 > n)
        return -1;
    uint64_t doff = (uint64_t)(h[l4 + 12] >> 4) * 4;
    if (doff < 20 || l4 + doff >= length) /* beyond the frame, or no payload */
        return -1;
    if (csum_start != l4 || csum_offset != 16)
        return -1;
    return 0;
}

/* Pop (in plan only: `*cursor` moves, the queue does not) and walk one RX chain.
 * 1: planned; 0: the ring is empty; -1: punt. */
static int plan_chain(struct sw_engine *e, const struct sw_queue *q, uint16_t aidx, uint16_t *cursor,
                      uint32_t *nsegs, uint32_t *nchains, uint64_t *room)
{
    uint16_t pending = (uint16_t)(aidx - *cursor);
    if (!pending)
        return 0;
    if (pending > q->size)
        return -1;
    if (*nchains >= e->chains_cap)
        return -1;
    uint16_t head = ld16(q->avail + 4 + 2 * (size_t)(*cursor & (q->size - 1)));
    pf_ahead(q, *cursor, aidx, 1);
    uint32_t nr = 0;
    int n = walk(q, head, e->segs + *nsegs, e->segs_cap - *nsegs, &nr);
    if (n < 0)
        return -1;
    struct sw_chain *c = &e->chains[*nchains];
    c->head = head;
    c->seg0 = *nsegs + nr;
    c->nseg = (uint32_t)n - nr;
    uint64_t r = 0;
    for (uint32_t k = 0; k < c->nseg; k++) {
        const struct sw_seg *s = &e->segs[c->seg0 + k];
        if (q->log && !log_covers(q, s->gpa, s->len))
            return -1;
        r += s->len;
    }
    c->room = r;
    *room += r;
    *nsegs += (uint32_t)n;
    (*nchains)++;
    (*cursor)++;
    return 1;
}

/* Plan the delivery of `f` to `r` (as Engine._deliver would do it). 0 or -1 (punt). */
static int plan_rx(struct sw_engine *e, struct sw_rxplan *pl, struct sw_port *r, const struct frame *f,
                   uint32_t *nsegs, uint32_t *nchains)
{
    pl->port = r;
    pl->nchains = 0;
    if (r->rx_state == SW_RX_DROP)
        return 0;
    if (r->rx_state != SW_RX_NATIVE)
        return -1;
    if (f->needs_csum && !r->guest_csum)
        return -1; /* the checksum is completed in software: Python */
    if (f->gso_type) { /* engine.py's _takes_whole, else segments cut in software: Python */
        if (!(r->guest_gso & 1u << (f->gso_type & ~GSO_ECN)))
            return -1;
        if ((f->gso_type & GSO_ECN) && !(r->guest_gso & GSO_ECN))
            return -1;
    }
    const struct sw_queue *q = &r->rx;
    uint64_t need = r->hdr_size + f->length, room = 0;
    uint32_t segs0 = *nsegs, chain0 = *nchains;
    uint16_t cursor = q->last_avail, aidx = avail_idx(q);
    int got = plan_chain(e, q, aidx, &cursor, nsegs, nchains, &room);
    if (got <= 0)
        return got;
    if (room < need && r->mrg_rxbuf) {
        while (room < need) {
            got = plan_chain(e, q, aidx, &cursor, nsegs, nchains, &room);
            if (got < 0)
                return -1;
            if (!got)
                break;
        }
    }
    if (room < need) { /* a counted drop: the buffers stay for a frame that fits */
        *nsegs = segs0;
        *nchains = chain0;
        return 0;
    }
    pl->chain0 = chain0;
    pl->nchains = *nchains - chain0;
    pl->cursor = cursor;
    return 0;
}

/* _scatter: copy the sources in order into the chains' writable buffers, push each chain. */
static void deliver(struct sw_engine *e, struct sw_port *r, const struct sw_rxplan *pl, struct frame *f)
{
    struct sw_queue *q = &r->rx;
    uint32_t hs = r->hdr_size;
    uint16_t nb = (uint16_t)pl->nchains;
    const struct sw_seg *src = f->src;
    uint32_t nsrc = f->nsrc, si = 0;
    uint64_t soff = 0, skip = 0;
    const struct sw_chain *first = &e->chains[pl->chain0];
    if (first->nseg && e->segs[first->seg0].len >= hs) {
        /* The header straight into the first buffer, from registers: a copy from a buffer
         * just written in pieces would wait for every store before it (store forwarding). */
        uint8_t *d = e->segs[first->seg0].p;
        memcpy(d, &f->hdr0, 8);
        memcpy(d + 8, &f->hdr1, 2);
        if (hs == 12)
            memcpy(d + 10, &nb, 2);
        si = 1;
        skip = hs;
    } else {
        memcpy(f->hdr, &f->hdr0, 8);
        memcpy(f->hdr + 8, &f->hdr1, 2);
        memcpy(f->hdr + 10, &nb, 2);
        f->src[0].p = f->hdr;
        f->src[0].len = hs;
    }
    for (uint32_t c = 0; c < pl->nchains; c++) {
        const struct sw_chain *ch = &e->chains[pl->chain0 + c];
        uint64_t written = 0;
        for (uint32_t k = 0; k < ch->nseg; k++) {
            const struct sw_seg *d = &e->segs[ch->seg0 + k];
            uint64_t pos = skip;
            skip = 0;
            while (pos < d->len && si < nsrc) {
                uint64_t n = d->len - pos, left = src[si].len - soff;
                if (left < n)
                    n = left;
                memmove(d->p + pos, src[si].p + soff, n);
                pos += n;
                soff += n;
                if (soff == src[si].len) {
                    si++;
                    soff = 0;
                }
            }
            written += pos;
            if (si == nsrc)
                break;
        }
        push(e, r, q, ch->head, (uint32_t)written);
    }
    if (q->log) { /* the written bytes: the first hs + length of the chains' buffers */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint64_t left = hs + f->length;
        for (uint32_t c = 0; c < pl->nchains && left; c++) {
            const struct sw_chain *ch = &e->chains[pl->chain0 + c];
            for (uint32_t k = 0; k < ch->nseg && left; k++) {
                const struct sw_seg *d = &e->segs[ch->seg0 + k];
                uint64_t n = d->len < left ? d->len : left;
                log_mark(q, d->gpa, n);
                left -= n;
            }
        }
    }
    q->last_avail = pl->cursor;
    q->pf_len = hs + f->length < PF_MAX ? (uint32_t)(hs + f->length) : PF_MAX;
    r->rx_packets++;
    r->rx_bytes += f->length;
    sw_touch(e, r->index, 0);
}

/* Forward the chain at `head` from `p`: 0 done (counted), -1 punt (nothing consumed). */
static int forward(struct sw_engine *e, struct sw_port *p, uint32_t head)
{
    struct sw_seg tx[TX_SEGS];
    struct frame f;
    uint32_t nr = 0;
    int n = walk(&p->tx, head, tx, TX_SEGS, &nr);
    if (n < 0 || (uint32_t)n != nr || !nr)
        return -1; /* a fault, device-writable buffers, or too many buffers */
    uint32_t hs = p->hdr_size;
    if (tx[0].len < hs)
        return -1; /* the header spread over buffers */
    /* the header's bytes 0-9, all that is read of it (num_buffers is not), into registers */
    uint64_t w0;
    uint16_t w1;
    memcpy(&w0, tx[0].p, 8);
    memcpy(&w1, tx[0].p + 8, 2);
    barrier();
    /* the frame's segments: _read_tx */
    f.nsrc = 1;
    f.length = 0;
    if (nr == 1 || tx[0].len > hs) {
        f.src[1].p = tx[0].p + hs;
        f.src[1].len = tx[0].len - hs;
        f.length = f.src[1].len;
        f.nsrc = 2;
    }
    for (uint32_t k = 1; k < nr; k++) {
        f.src[f.nsrc++] = tx[k];
        f.length += tx[k].len;
    }
    uint8_t flags = (uint8_t)w0, gso_type = (uint8_t)(w0 >> 8);
    uint16_t hdr_len = (uint16_t)(w0 >> 16), gso_size = (uint16_t)(w0 >> 32);
    uint16_t csum_start = (uint16_t)(w0 >> 48), csum_offset = w1;
    uint64_t length = f.length;
    /* check_header: anything it refuses is Python's to word (and to break the sender for) */
    if (length < ETH_HLEN || hdr_len > length || (flags & ~(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID)))
        return -1;
    f.needs_csum = flags & HDR_F_NEEDS_CSUM;
    if (f.needs_csum && (!p->host_csum || (uint64_t)csum_start + csum_offset + 2 > length))
        return -1;
    f.gso_type = gso_type;
    if (gso_type == GSO_NONE) {
        if (gso_size || length > p->max_frame)
            return -1;
    } else {
        uint8_t base = gso_type & ~GSO_ECN;
        /* UFO (which parse_gso does not check) stays Python's, with every other GSO type */
        if ((base != GSO_TCPV4 && base != GSO_TCPV6) || !(p->host_gso & 1u << base))
            return -1;
        if (!f.needs_csum || !gso_size || gso_size >= length || length > MAX_GSO_FRAME || hdr_len >= length)
            return -1;
        /* _forward_offload: parse_gso on a copy, forwarded from the copy */
        uint64_t n = copy_head(&f);
        if (gso_check(f.head, n, length, base, csum_start, csum_offset) < 0)
            return -1;
    }
    if (f.src[1].len < 12)
        return -1; /* the addresses spread over buffers */
    uint64_t m0;
    uint32_t m1;
    memcpy(&m0, f.src[1].p, 8);
    memcpy(&m1, f.src[1].p + 8, 4);
    barrier();
    m0 = __builtin_bswap64(m0);
    uint64_t dst = m0 >> 16, src = (m0 & 0xFFFF) << 32 | __builtin_bswap32(m1); /* 48-bit, big-endian */
    /* the header each receiver gets: flags & NEEDS_CSUM, the rest as sent, num_buffers later */
    f.hdr0 = (w0 & ~(uint64_t)0xFF) | (uint8_t)f.needs_csum;
    f.hdr1 = w1;
    double now = e->now;
    if (!(src >> 40 & 1))
        sw_fdb_learn(e->fdb, src, p->id, now);
    int flood = 1;
    int64_t out = 0;
    if (!(dst >> 40 & 1))
        flood = !sw_fdb_lookup(e->fdb, dst, now, &out);
    /* plan every delivery before doing any */
    uint32_t nplans = 0, nsegs = 0, nchains = 0;
    if (flood) {
        for (int32_t i = 0; i < e->nports; i++) {
            struct sw_port *r = e->ports[i];
            if (r != p && plan_rx(e, &e->plans[nplans++], r, &f, &nsegs, &nchains) < 0)
                return -1;
        }
    } else if (out != p->id) {
        struct sw_port *r = port_by_id(e, out);
        if (r && plan_rx(e, &e->plans[nplans++], r, &f, &nsegs, &nchains) < 0)
            return -1;
    }
    /* commit */
    for (uint32_t i = 0; i < nplans; i++) {
        struct sw_rxplan *pl = &e->plans[i];
        struct sw_port *r = pl->port;
        if (pl->nchains)
            deliver(e, r, pl, &f);
        else
            r->rx_dropped++;
        mark_dirty(e, r);
    }
    if (flood)
        e->floods++;
    e->gso_frames += gso_type != GSO_NONE;
    p->tx_packets++;
    p->tx_bytes += length;
    if (!nplans)
        p->tx_dropped++;
    return 0;
}

/* Forward up to `budget` chains from port `index`'s TX ring (`done_before` of its batch were
 * forwarded already): returns how many; e->status says SW_PUNT if the next one is Python's. */
int32_t sw_drain(struct sw_engine *e, int32_t index, int32_t budget, int32_t done_before)
{
    struct sw_port *p = e->ports[index];
    struct sw_queue *q = &p->tx;
    int32_t done = 0;
    e->status = SW_DONE;
    uint16_t aidx = avail_idx(q);
    pf_start(q, q->last_avail, aidx, 0);
    while (done < budget) {
        if (aidx == q->last_avail) {
            aidx = avail_idx(q);
            if (aidx == q->last_avail)
                break;
            pf_start(q, q->last_avail, aidx, 0);
        }
        if ((uint16_t)(aidx - q->last_avail) > q->size) {
            e->status = SW_PUNT;
            break;
        }
        uint16_t head = ld16(q->avail + 4 + 2 * (size_t)(q->last_avail & (q->size - 1)));
        pf_ahead(q, q->last_avail, aidx, 0);
        if (forward(e, p, head) < 0) {
            e->status = SW_PUNT;
            break;
        }
        q->last_avail++;
        push(e, p, q, head, 0);
        done++;
    }
    e->frames += (uint64_t)done;
    if (e->status == SW_DONE && done_before + done)
        sw_touch(e, index, 1); /* the sender's batch is over: its TX ring goes in `touched` */
    for (int32_t i = 0; i < e->ndirty; i++) {
        publish(&e->ports[e->dirty[i]]->rx);
        publish(&e->ports[e->dirty[i]]->tx);
    }
    return done;
}

/* poll_once's loop over the senders, from port `start` on, in order: drains each native TX
 * ring (`budget` chains), passes by the ports with tx_skip, and stops at a TX ring that
 * Python drains or at a punt: e->stop is that port (nports: none), e->status SW_PUNT with
 * e->pdone chains of it forwarded already, or SW_DONE. Returns the chains of the ports it
 * finished (the stopping port's are not among them). */
int32_t sw_poll(struct sw_engine *e, int32_t start, int32_t budget)
{
    int32_t work = 0;
    for (int32_t i = start; i < e->nports; i++) {
        struct sw_port *p = e->ports[i];
        if (p->tx_skip)
            continue;
        if (!p->tx.native) {
            e->status = SW_DONE;
            e->stop = i;
            return work;
        }
        int32_t done = sw_drain(e, i, budget, 0);
        if (e->status == SW_PUNT) {
            e->stop = i;
            e->pdone = done;
            return work;
        }
        work += done;
    }
    e->status = SW_DONE;
    e->stop = e->nports;
    return work;
}

/* The end of poll_once: sw_notify into `signals` (returned: how many), then sw_export into
 * `out` (e->nout values). */
int32_t sw_finish(struct sw_engine *e, int32_t *signals, int64_t *out)
{
    int32_t n = sw_notify(e, signals);
    e->nout = sw_export(e, out);
    return n;
}
