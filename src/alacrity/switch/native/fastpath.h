/* The switch's native fast path: shared by the C source and the cffi cdef, so it holds
 * declarations only (no #include, no macros with expressions). See fastpath.c. */

#define SW_DONE 0
#define SW_PUNT 1

#define SW_RX_DROP 0
#define SW_RX_NATIVE 1
#define SW_RX_PYTHON 2

/* One mapped region of a port's memory table: guest-physical [gpa, gpa + size) at host. */
struct sw_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

/* A split virtqueue, device side. Python's DeviceQueue is the source of truth between
 * calls: last_avail and used_idx are copied in before and out after (see engine.py). */
struct sw_queue {
    uint8_t *desc;              /* 16 * size bytes */
    uint8_t *avail;             /* flags, idx, ring[size], used_event */
    uint8_t *used;              /* flags, idx, ring[size] of (id, len), avail_event */
    struct sw_region *regions;
    uint32_t nregions;
    uint32_t size;
    uint16_t last_avail;
    uint16_t used_idx;
    uint16_t signalled;         /* DeviceQueue.signalled_used */
    uint8_t indirect;
    uint8_t event_idx;
    uint8_t dirty;              /* indices moved since the last sync out */
    uint8_t publish;            /* used_idx to store in the used ring before returning */
    uint8_t native;             /* attached: C may use this ring */
    uint8_t touched;            /* in sw_engine.order this poll */
    uint32_t pushed;            /* used entries since the last sync out (DeviceQueue.requests) */
    uint16_t published;         /* the used index last stored in the used ring */
    uint8_t log_used;           /* the dirty log covers the used ring too, at used_log */
    uint8_t pad;
    uint8_t *log;               /* the dirty log (DeviceQueue.logging), log_size bytes; NULL: none */
    uint64_t log_size;
    uint64_t used_log;          /* the used ring's guest-physical address, for the log */
    uint32_t pf_len;            /* bytes of a buffer to prefetch: the last frame's (receivers) */
    uint32_t pad2;
};

struct sw_port {
    int64_t id;
    int32_t index;              /* in sw_engine.ports */
    uint8_t rx_state;           /* SW_RX_* */
    uint8_t hdr_size;           /* 10 or 12 */
    uint8_t mrg_rxbuf;
    uint8_t host_csum;
    uint8_t guest_csum;
    uint8_t broken;
    uint8_t dirty;              /* in sw_engine.dirty */
    uint8_t host_gso;           /* GSO types it may send: bit 1 << type (TCPV4 1, UDP 3, TCPV6 4) */
    uint8_t guest_gso;          /* GSO types it takes whole, the same bits, and 0x80 for GUEST_ECN */
    uint8_t tx_skip;            /* poll_once passes its TX ring by: none, or the port is broken */
    uint32_t max_frame;
    struct sw_queue rx;
    struct sw_queue tx;
    /* counter deltas since the last sync out */
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t rx_dropped;
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_dropped;
    double tx_deferred_since;   /* when its TX interrupt decision was deferred... */
    uint32_t tx_deferring;      /* ...if it is */
    uint32_t pad3;
};

struct sw_seg {
    uint8_t *p;
    uint64_t len;
    uint64_t gpa;               /* where the guest has it: for the dirty log */
};

struct sw_chain {
    uint16_t head;
    uint16_t pad;
    uint32_t seg0;              /* its writable buffers: segs[seg0 .. seg0 + nseg) */
    uint32_t nseg;
    uint32_t pad2;
    uint64_t room;
};

struct sw_rxplan {
    struct sw_port *port;
    uint32_t chain0;
    uint32_t nchains;           /* 0: a counted drop */
    uint16_t cursor;            /* the receiver's last_avail once delivered */
    uint16_t pad[3];
};

struct sw_fdb;

struct sw_engine {
    struct sw_port **ports;     /* in the order of Engine.ports */
    int32_t nports;
    int32_t status;             /* SW_DONE or SW_PUNT, from sw_drain */
    int32_t *idmap;             /* open addressing: port index + 1, 0 = empty */
    uint32_t idmask;
    int32_t norder;
    int32_t *order;             /* 2 * port index + ring of the rings touched this poll, in order */
    int32_t ndirty;
    int32_t *dirty;             /* port indices with state to sync out */
    struct sw_rxplan *plans;    /* nports of them */
    struct sw_seg *segs;
    uint32_t segs_cap;
    uint32_t chains_cap;
    struct sw_chain *chains;
    struct sw_fdb *fdb;
    double now;
    uint64_t floods;            /* delta since the last sync out */
    uint64_t frames;            /* forwarded by C, ever (for benchmarks) */
    uint64_t gso_frames;        /* of which GSO frames (for benchmarks and tests) */
    int32_t stop;               /* sw_poll: the port it stopped at (nports: none) */
    int32_t pdone;              /* sw_poll: with SW_PUNT, the chains of that port done before */
    int32_t nout;               /* sw_finish: the values it exported */
    int32_t pad;
    double tx_defer;            /* seconds a TX interrupt decision may wait (Engine.tx_defer_s) */
    uint64_t tx_deferred;       /* decisions deferred, ever (Engine.tx_deferred) */
    uint64_t tx_unneeded;       /* ...that then needed no interrupt (Engine.tx_unneeded) */
};

/* Sync-out records (sw_export): SW_REC int64s per port with changes, then the floods. */
#define SW_REC 16

void sw_begin(struct sw_engine *e, double now);
void sw_index_ports(struct sw_engine *e);
int32_t sw_drain(struct sw_engine *e, int32_t index, int32_t budget, int32_t done_before);
int32_t sw_poll(struct sw_engine *e, int32_t start, int32_t budget);
int32_t sw_finish(struct sw_engine *e, int32_t *signals, int64_t *out);
void sw_touch(struct sw_engine *e, int32_t index, int32_t ring);
int32_t sw_notify(struct sw_engine *e, int32_t *out);
double sw_next_decision(struct sw_engine *e);
int32_t sw_export(struct sw_engine *e, int64_t *out);

struct sw_fdb *sw_fdb_new(uint32_t max_entries, double ageing, uint64_t k0, uint64_t k1);
void sw_fdb_free(struct sw_fdb *f);
void sw_fdb_set_ageing(struct sw_fdb *f, double ageing);
double sw_fdb_ageing(struct sw_fdb *f);
uint32_t sw_fdb_max(struct sw_fdb *f);
void sw_fdb_learn(struct sw_fdb *f, uint64_t mac, int64_t port, double now);
int sw_fdb_lookup(struct sw_fdb *f, uint64_t mac, double now, int64_t *port);
void sw_fdb_forget_port(struct sw_fdb *f, int64_t port);
void sw_fdb_expire(struct sw_fdb *f, double now);
uint32_t sw_fdb_len(struct sw_fdb *f);
uint32_t sw_fdb_dump(struct sw_fdb *f, uint64_t *macs, int64_t *ports, double *seen, uint32_t cap);
uint64_t sw_fdb_moves(struct sw_fdb *f);
uint64_t sw_fdb_evictions(struct sw_fdb *f);
void sw_fdb_set_counts(struct sw_fdb *f, uint64_t moves, uint64_t evictions);

/* The wake-up loop (wakeup.c): why sw_run returned. */
#define SW_RUN_IO 1
#define SW_RUN_EINTR 2
#define SW_RUN_TIMEOUT 3
#define SW_RUN_PUNT 4
#define SW_RUN_FAULTS 5
#define SW_RUN_CALL 6
#define SW_RUN_SIGNALS 7
#define SW_RUN_ERROR 8

struct sw_wait {
    /* set by Python before each sw_run */
    int32_t batch;
    int32_t timeout_ms;         /* the longest sleep */
    int64_t budget_ns;          /* Switch.poll_budget_s */
    int64_t min_ns;             /* POLL_MIN_S */
    int64_t spin_ns;            /* in and out: Switch.poll_s */
    int64_t last_work_ns;       /* in and out: CLOCK_MONOTONIC */
    int64_t io_check_ns;        /* IO_CHECK_S */
    int32_t adaptive;
    int32_t pad;
    int32_t *calls;             /* call fd of each ring, 2 * port index + ring; -1: none */
    uint64_t (*faults)(void);   /* the SIGBUS guard's count of repaired faults, or NULL */
    uint64_t faults_seen;
    int32_t *signals;           /* scratch for sw_notify: 2 * nports */
    /* out: counter deltas (Python takes and clears them) */
    int64_t *kicks;             /* per port index */
    int64_t *interrupts;        /* per port index */
    int64_t sleeps;
    int64_t wakeups;
    int64_t batches;
    int32_t failed_entry;       /* SW_RUN_CALL: the ring whose call fd failed */
    int32_t failed_errno;       /* SW_RUN_CALL, SW_RUN_ERROR */
    int32_t nsignals;           /* SW_RUN_CALL, SW_RUN_SIGNALS: signals[next_signal .. nsignals) */
    int32_t next_signal;        /*   are left for Python */
    uint64_t in_call;           /* odd while a call fd write is under way (the watchdog reads it) */
    int32_t *watch_parked;      /* non-zero while the watchdog is parked (eventfd.py's parking()) */
    int32_t watch_wake;         /*   and the eventfd that wakes it */
    int32_t pad3;
    /* private: sw_wait_fds */
    struct pollfd *pfds;        /* kick fds first, then those Python serves */
    int32_t *kick_port;
    int32_t nfds;
    int32_t nkicks;
};

int32_t sw_wait_fds(struct sw_wait *w, const int32_t *fds, const int32_t *kick_port, int32_t nfds,
                    int32_t nkicks);
void sw_wait_free(struct sw_wait *w);
void sw_adapt(struct sw_wait *w, int64_t gap_ns);
int32_t sw_run(struct sw_engine *e, struct sw_wait *w);
