/*
 * ring.c - atomics, futexes and record layout of the shm ring (see ring.h for the ABI).
 *
 * No policy here: no timeouts beyond one futex wait, no error texts beyond a static reason,
 * no Python. Every value read from shared memory is copied to a local before it is checked,
 * so a confused or hostile peer can produce a DPM_CORRUPT result but never an out-of-bounds
 * access.
 */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t ld_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t ld_rlx(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Non-private futex ops: the word is in a MAP_SHARED mapping used by two processes. */
static long futex_wait(uint32_t *word, uint32_t expected, int timeout_ms)
{
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    return syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static void futex_wake_all(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static void bump_and_wake(uint32_t *ec)
{
    __atomic_fetch_add(ec, 1u, __ATOMIC_SEQ_CST);
    futex_wake_all(ec);
}

void dpm_ring_init(struct dpm_ring *r, void *base, uint64_t data_bytes, uint64_t capacity,
                   uint32_t max_message, uint64_t first_seq)
{
    struct dpm_ring_header *h = base;
    memset(h, 0, sizeof(*h));
    h->abi_version = DPM_RING_ABI_VERSION;
    h->header_bytes = DPM_RING_HEADER_BYTES;
    h->data_bytes = data_bytes;
    h->capacity = capacity;
    h->max_message = max_message;
    h->head_seq = h->tail_seq = first_seq;
    /* magic last: a half-written header never looks valid */
    __atomic_store_n(&h->magic, DPM_RING_MAGIC, __ATOMIC_RELEASE);

    memset(r, 0, sizeof(*r));
    r->hdr = h;
    r->data = (uint8_t *)base + DPM_RING_HEADER_BYTES;
    r->data_bytes = data_bytes;
    r->mask = data_bytes - 1;
    r->capacity = capacity;
    r->max_message = max_message;
    r->head_seq = r->tail_seq_cache = first_seq;
}

const char *dpm_ring_check(const void *base, uint64_t map_bytes)
{
    const struct dpm_ring_header *h = base;
    if (map_bytes < DPM_RING_HEADER_BYTES)
        return "mapping is smaller than the ring header";
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != DPM_RING_MAGIC)
        return "bad magic: this memory is not a dpmigrate ring";
    if (h->abi_version != DPM_RING_ABI_VERSION)
        return "ring ABI version differs from this build";
    if (h->header_bytes != DPM_RING_HEADER_BYTES)
        return "header size differs from this build";
    uint64_t d = h->data_bytes;
    if (d < DPM_RING_MIN_DATA || d > DPM_RING_MAX_DATA || (d & (d - 1)) != 0)
        return "data area size is not a power of two in range";
    if (DPM_RING_HEADER_BYTES + d > map_bytes)
        return "data area extends beyond the mapping";
    if (h->capacity == 0 || h->capacity > d / sizeof(struct dpm_record))
        return "capacity out of range";
    if (2 * dpm_record_bytes(h->max_message) > d)
        return "max_message does not fit the data area";
    return NULL;
}

void dpm_ring_attach(struct dpm_ring *r, void *base)
{
    struct dpm_ring_header *h = base;
    memset(r, 0, sizeof(*r));
    r->hdr = h;
    r->data = (uint8_t *)base + DPM_RING_HEADER_BYTES;
    r->data_bytes = h->data_bytes;
    r->mask = r->data_bytes - 1;
    r->capacity = h->capacity;
    r->max_message = h->max_message;
}

/* ---------------------------------------------------------------- producer */

/* Bytes needed at the current head for a record of `size` bytes, wrap padding included. */
static inline uint64_t needed_bytes(const struct dpm_ring *r, uint64_t size)
{
    uint64_t contig = r->data_bytes - (r->head & r->mask);
    return contig < size ? contig + size : size;
}

static inline int fits_cached(const struct dpm_ring *r, uint64_t need)
{
    return r->head_seq - r->tail_seq_cache < r->capacity &&
           r->head + need - r->tail_cache <= r->data_bytes;
}

static inline int fits(struct dpm_ring *r, uint64_t need)
{
    if (fits_cached(r, need))
        return 1;
    r->tail_cache = ld_acq(&r->hdr->tail);
    r->tail_seq_cache = ld_rlx(&r->hdr->tail_seq);
    return fits_cached(r, need);
}

int dpm_ring_fits(struct dpm_ring *r, uint32_t len)
{
    return fits(r, needed_bytes(r, dpm_record_bytes(len)));
}

int dpm_ring_put(struct dpm_ring *r, const void *buf, uint32_t len)
{
    uint64_t size = dpm_record_bytes(len);
    uint64_t off = r->head & r->mask;
    uint64_t contig = r->data_bytes - off;
    if (!fits(r, contig < size ? contig + size : size))
        return DPM_FULL;
    if (contig < size) {
        if (contig >= sizeof(struct dpm_record)) {
            struct dpm_record pad = {(uint32_t)(contig - sizeof(struct dpm_record)), DPM_REC_PAD,
                                     0};
            memcpy(r->data + off, &pad, sizeof(pad));
        }
        r->head += contig;
        off = 0;
    }
    struct dpm_record rec = {len, DPM_REC_DATA, r->head_seq};
    memcpy(r->data + off, &rec, sizeof(rec));
    memcpy(r->data + off + sizeof(rec), buf, len);
    r->head += size;
    r->head_seq += 1;
    return DPM_OK;
}

uint32_t dpm_ring_put_many(struct dpm_ring *r, const struct dpm_msg *msgs, uint32_t n)
{
    uint32_t i = 0;
    while (i < n) {
        /* What the cached tail allows without a wrap: the bytes to the end of the area or
         * to the consumer's committed position, whichever is nearer, and the free window.
         * The differences are checked, not trusted: the consumer writes the tail. */
        uint64_t used = r->head - r->tail_cache, used_n = r->head_seq - r->tail_seq_cache;
        uint64_t room = used <= r->data_bytes ? r->data_bytes - used : 0;
        uint64_t window = used_n < r->capacity ? r->capacity - used_n : 0;
        uint64_t contig = r->data_bytes - (r->head & r->mask);
        uint8_t *p = r->data + (r->head & r->mask), *start = p;
        uint64_t seq = r->head_seq; /* locals: a store through p may alias *r */
        if (room > contig)
            room = contig;
        for (; i < n && window > 0; i++, window--) {
            uint64_t size = dpm_record_bytes(msgs[i].len);
            if (size > room)
                break;
            struct dpm_record rec = {msgs[i].len, DPM_REC_DATA, seq++};
            memcpy(p, &rec, sizeof(rec));
            memcpy(p + sizeof(rec), msgs[i].buf, msgs[i].len);
            p += size;
            room -= size;
        }
        r->head += (uint64_t)(p - start);
        r->head_seq = seq;
        if (i == n)
            break;
        /* The next record needs a fresher tail or a wrap: the one-record path does both. */
        if (dpm_ring_put(r, msgs[i].buf, msgs[i].len) != DPM_OK)
            break;
        i++;
    }
    return i;
}

void dpm_ring_publish(struct dpm_ring *r)
{
    struct dpm_ring_header *h = r->hdr;
    __atomic_store_n(&h->head_seq, r->head_seq, __ATOMIC_RELAXED);
    __atomic_store_n(&h->head, r->head, __ATOMIC_RELEASE);
    full_fence(); /* pairs with the fence in dpm_ring_wait_data */
    if (__atomic_load_n(&h->consumer_waiting, __ATOMIC_RELAXED))
        bump_and_wake(&h->data_ec);
}

/* ---------------------------------------------------------------- consumer */

/* Find the next data record at r->read, skipping pad space. check_seq=0 only in resync. */
static inline int next_record(struct dpm_ring *r, uint64_t head, struct dpm_record *rec,
                       const uint8_t **payload, int check_seq)
{
    for (;;) {
        uint64_t avail = head - r->read;
        if (avail == 0)
            return DPM_EMPTY;
        if (avail > r->data_bytes || (r->read & 7u) != 0)
            return DPM_CORRUPT;
        uint64_t off = r->read & r->mask;
        uint64_t contig = r->data_bytes - off;
        if (contig < sizeof(struct dpm_record)) { /* implicit pad: too short for a header */
            if (avail < contig)
                return DPM_CORRUPT;
            r->read += contig;
            continue;
        }
        if (avail < sizeof(struct dpm_record))
            return DPM_CORRUPT;
        memcpy(rec, r->data + off, sizeof(*rec));
        if (rec->flags == DPM_REC_PAD) {
            if ((uint64_t)rec->len + sizeof(*rec) != contig || avail < contig)
                return DPM_CORRUPT;
            r->read += contig;
            continue;
        }
        if (rec->flags != DPM_REC_DATA || rec->len > r->max_message)
            return DPM_CORRUPT;
        uint64_t size = dpm_record_bytes(rec->len);
        if (size > contig || size > avail)
            return DPM_CORRUPT;
        if (check_seq && rec->seq != r->read_seq)
            return DPM_CORRUPT;
        *payload = r->data + off + sizeof(*rec);
        return DPM_OK;
    }
}

int dpm_ring_peek(struct dpm_ring *r, uint64_t head, struct dpm_record *rec,
                  const uint8_t **payload)
{
    return next_record(r, head, rec, payload, 1);
}

int dpm_ring_peek_many(struct dpm_ring *restrict r, uint64_t head, struct dpm_found *restrict out,
                       uint32_t max_n, uint32_t *found)
{
    struct dpm_record rec;
    const uint8_t *payload;
    uint32_t n = 0;
    int rc = DPM_OK;
    while (n < max_n) {
        rc = next_record(r, head, &rec, &payload, 1);
        if (rc != DPM_OK)
            break;
        out[n].off = (uint64_t)(payload - r->data);
        out[n].len = rec.len;
        n++;
        dpm_ring_advance(r, &rec);
    }
    *found = n;
    return rc == DPM_CORRUPT ? DPM_CORRUPT : DPM_OK;
}

static void publish_tail(struct dpm_ring *r, uint64_t pos, uint64_t seq)
{
    struct dpm_ring_header *h = r->hdr;
    r->tail_pub = pos;
    r->tail_seq_pub = seq;
    __atomic_store_n(&h->tail_seq, seq, __ATOMIC_RELAXED);
    __atomic_store_n(&h->tail, pos, __ATOMIC_RELEASE); /* tail_seq is visible first */
    full_fence(); /* pairs with the fence in dpm_ring_wait_space */
    if (__atomic_load_n(&h->producer_waiting, __ATOMIC_RELAXED))
        bump_and_wake(&h->space_ec);
}

void dpm_ring_commit(struct dpm_ring *r)
{
    if (r->read != r->tail_pub)
        publish_tail(r, r->read, r->read_seq);
}

int dpm_ring_commit_upto(struct dpm_ring *r, uint64_t seq)
{
    if (seq <= r->tail_seq_pub)
        return DPM_OK;
    if (seq >= r->read_seq) {
        dpm_ring_commit(r);
        return DPM_OK;
    }
    /* Walk the delivered (still intact, uncommitted) records from the committed position. */
    struct dpm_ring walk = *r;
    struct dpm_record rec;
    const uint8_t *payload;
    walk.read = r->tail_pub;
    walk.read_seq = r->tail_seq_pub;
    while (walk.read_seq < seq) {
        if (next_record(&walk, r->read, &rec, &payload, 1) != DPM_OK)
            return DPM_CORRUPT;
        dpm_ring_advance(&walk, &rec);
    }
    publish_tail(r, walk.read, seq);
    return DPM_OK;
}

int dpm_ring_resync(struct dpm_ring *r, uint64_t next_expected, uint64_t *skipped,
                    uint64_t *committed_seq)
{
    struct dpm_ring_header *h = r->hdr;
    uint64_t tail = ld_acq(&h->tail);
    uint64_t tail_seq = ld_rlx(&h->tail_seq);
    uint64_t head = ld_acq(&h->head);
    struct dpm_record rec;
    const uint8_t *payload;

    *skipped = 0;
    r->read = tail;
    r->tail_pub = tail;
    /* The first data record at tail carries the authoritative committed seq; tail_seq may
     * be ahead of it if a consumer died between its two commit stores. */
    int rc = next_record(r, head, &rec, &payload, 0);
    if (rc == DPM_CORRUPT)
        return DPM_CORRUPT;
    if (rc == DPM_OK && rec.seq != tail_seq) {
        tail_seq = rec.seq;
        __atomic_store_n(&h->tail_seq, tail_seq, __ATOMIC_RELEASE);
    }
    r->read_seq = r->tail_seq_pub = tail_seq;
    *committed_seq = tail_seq;
    if (next_expected < tail_seq)
        return DPM_GAP;
    while (r->read_seq < next_expected) {
        rc = next_record(r, head, &rec, &payload, 1);
        if (rc == DPM_EMPTY)
            return DPM_AHEAD;
        if (rc != DPM_OK)
            return DPM_CORRUPT;
        dpm_ring_advance(r, &rec);
        *skipped += 1;
    }
    return DPM_OK;
}

/* ---------------------------------------------------------------- both */

void dpm_ring_wake_all(struct dpm_ring *r)
{
    bump_and_wake(&r->hdr->data_ec);
    bump_and_wake(&r->hdr->space_ec);
}

void dpm_ring_set_flags(struct dpm_ring *r, uint32_t bits)
{
    __atomic_fetch_or(&r->hdr->flags, bits, __ATOMIC_SEQ_CST);
    dpm_ring_wake_all(r);
}

static int space_ready(struct dpm_ring *r, int64_t len)
{
    if (dpm_load_flags(r))
        return 1;
    if (len < 0) {
        r->tail_cache = ld_acq(&r->hdr->tail);
        r->tail_seq_cache = ld_rlx(&r->hdr->tail_seq);
        return r->tail_seq_cache >= r->head_seq;
    }
    return dpm_ring_fits(r, (uint32_t)len);
}

static int data_ready(struct dpm_ring *r)
{
    return dpm_load_head(r) != r->read || dpm_load_flags(r);
}

static int wait_result(long rc)
{
    if (rc == 0)
        return 0;
    if (errno == EAGAIN || errno == EINTR || errno == ETIMEDOUT)
        return 0;
    return -errno;
}

/* The current spin budget; a fresh dpm_ring (zeroed) starts at 4 us. */
static uint64_t spin_budget(const struct dpm_ring *r)
{
    return r->spin_ns ? r->spin_ns : DPM_SPIN_MIN_NS * 4;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* vDSO: about 25 ns, no syscall */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Spin (with the CPU's pause hint) for up to r->spin_ns of wall time until `ready`.
 * Time, not a count of pauses: a pause lasts from a few to over a hundred cycles depending
 * on the CPU. Returns 1 if ready; 0 with *started set when the budget ran out. */
static int adaptive_spin(struct dpm_ring *r, int (*ready)(struct dpm_ring *, int64_t), int64_t arg,
                         uint64_t *started)
{
    if (ready(r, arg))
        return 1;
    uint64_t budget = spin_budget(r);
    uint64_t t0 = now_ns(), t = t0;
    r->spins++;
    while (t - t0 < budget) {
        for (int i = 0; i < 4; i++) {
            __builtin_ia32_pause();
            if (ready(r, arg)) {
                uint64_t grown = budget * 2 > DPM_SPIN_MAX_NS ? DPM_SPIN_MAX_NS : budget * 2;
                r->spin_ns = (uint32_t)grown;
                return 1;
            }
        }
        t = now_ns();
    }
    *started = t0;
    return 0;
}

/* After a futex sleep (woken or timed out): had the wait been shorter than
 * DPM_SPIN_MAX_NS, a longer spin would have saved both ends a syscall, so cover it next
 * time (twice what it took); a longer wait was idle time, so spin less. */
static void learn_from_sleep(struct dpm_ring *r, uint64_t started)
{
    uint64_t took = now_ns() - started;
    uint64_t budget = spin_budget(r);
    if (took < DPM_SPIN_MAX_NS) {
        uint64_t cover = took * 2 > DPM_SPIN_MAX_NS ? DPM_SPIN_MAX_NS : took * 2;
        if (cover > budget)
            budget = cover;
    } else {
        budget = budget / 2 < DPM_SPIN_MIN_NS ? DPM_SPIN_MIN_NS : budget / 2;
    }
    r->spin_ns = (uint32_t)budget;
}

static int data_ready_arg(struct dpm_ring *r, int64_t unused)
{
    (void)unused;
    return data_ready(r);
}

int dpm_ring_wait_space(struct dpm_ring *r, int64_t len, int timeout_ms)
{
    uint64_t started = 0;
    if (timeout_ms > 0 && adaptive_spin(r, space_ready, len, &started))
        return 1;
    struct dpm_ring_header *h = r->hdr;
    uint32_t snap = __atomic_load_n(&h->space_ec, __ATOMIC_ACQUIRE);
    __atomic_store_n(&h->producer_waiting, 1u, __ATOMIC_RELAXED);
    full_fence();
    int err = 0;
    if (!space_ready(r, len) && timeout_ms > 0)
        err = wait_result(futex_wait(&h->space_ec, snap, timeout_ms));
    __atomic_store_n(&h->producer_waiting, 0u, __ATOMIC_RELAXED);
    if (err < 0)
        return err;
    int ready = space_ready(r, len);
    if (started != 0)
        learn_from_sleep(r, started);
    return ready;
}

int dpm_ring_spin_data(struct dpm_ring *r)
{
    uint64_t started = 0;
    if (adaptive_spin(r, data_ready_arg, 0, &started)) {
        r->spun_until = 0;
        return 1;
    }
    r->spun_from = started; /* set whenever the budget ran out */
    r->spun_until = now_ns();
    return 0;
}

int dpm_ring_wait_data(struct dpm_ring *r, int timeout_ms)
{
    uint64_t started = 0;
    uint64_t spun_until = r->spun_until;
    r->spun_until = 0;
    if (spun_until != 0 && now_ns() - spun_until < DPM_SPUN_FRESH_NS) {
        started = r->spun_from; /* a receive has just spun its budget: sleep at once */
        if (data_ready(r))
            return 1;
    } else if (timeout_ms > 0 && adaptive_spin(r, data_ready_arg, 0, &started)) {
        return 1;
    }
    struct dpm_ring_header *h = r->hdr;
    uint32_t snap = __atomic_load_n(&h->data_ec, __ATOMIC_ACQUIRE);
    __atomic_store_n(&h->consumer_waiting, 1u, __ATOMIC_RELAXED);
    full_fence();
    int err = 0;
    if (!data_ready(r) && timeout_ms > 0)
        err = wait_result(futex_wait(&h->data_ec, snap, timeout_ms));
    __atomic_store_n(&h->consumer_waiting, 0u, __ATOMIC_RELAXED);
    if (err < 0)
        return err;
    int ready = data_ready(r);
    if (started != 0)
        learn_from_sleep(r, started);
    return ready;
}
