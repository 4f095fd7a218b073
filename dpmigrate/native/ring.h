/*
 * ring.h - the shared-memory layout (ABI) and C core of dpmigrate's shm ring.
 *
 * One ring = one memfd created by the PRODUCER, mapped MAP_SHARED by both ends:
 *
 *   offset 0                    DPM_RING_HEADER_BYTES            + data_bytes
 *   +---------------------------+--------------------------------+
 *   | struct dpm_ring_header    | data area (power-of-two bytes) |
 *   +---------------------------+--------------------------------+
 *
 * The header is a versioned ABI: magic + abi_version first, every offset pinned by
 * static_assert below. Nothing in shared memory is a pointer; positions are free-running
 * 64-bit byte indices into the data area (position & (data_bytes - 1) is the offset), so
 * they never wrap in practice and "used = head - tail" needs no special cases.
 *
 * Cache lines (64 bytes each), one writer per line:
 *   line 0  geometry, written once by the producer before the fd is handed out; `flags`
 *           is the only field written later (atomically, by either end, once).
 *   line 1  producer line: head, head_seq, data_ec, producer_waiting
 *   line 2  consumer line: tail, tail_seq, space_ec, consumer_waiting
 *
 * Records in the data area, each starting at an 8-byte aligned position:
 *   struct dpm_record { u32 len; u32 flags; u64 seq; } then `len` payload bytes, padded
 *   to a multiple of 8. A record never wraps: when the bytes left before the end of the
 *   area cannot hold the whole record, the producer fills them with a PAD record (or, when
 *   fewer than 16 bytes are left, the reader skips them implicitly) and writes the record
 *   at offset 0.
 *
 * Sequence numbers and the window:
 *   head      bytes published by the producer (release store after the records)
 *   head_seq  sequence number of the next record the producer will publish
 *   tail      bytes freed by the consumer = its COMMITTED position (not its read cursor)
 *   tail_seq  sequence number of the first uncommitted record
 *   The producer may publish while (head_seq - tail_seq) < capacity and the bytes fit in
 *   data_bytes - (head - tail). The consumer reads at a private cursor and publishes
 *   tail/tail_seq only on commit, so everything it delivered but did not commit is still in
 *   the ring: the ring memory itself is the producer's retention. A consumer that
 *   reattaches scans from tail and skips records with seq < its next_expected.
 *   The consumer stores tail_seq before tail; a consumer killed between the two stores
 *   leaves tail_seq ahead of tail, which dpm_ring_resync() repairs from the record seqs.
 *
 * Waiting (futex eventcounts, no lost wake-ups, no busy spin):
 *   waiter: snap = ec; waiting = 1; full fence; re-check condition; futex_wait(ec, snap)
 *   waker:  publish; full fence; if (waiting) { ec += 1; futex_wake(ec) }
 *   The fences make sure that either the waker sees `waiting` or the waiter sees the new
 *   state. Futex ops are the non-private ones: the words live in a shared mapping used by
 *   several processes. A waiter that died leaves `waiting` set, which only costs the other
 *   end a spare wake.
 *
 * All functions here work on plain memory; none allocates, none touches Python.
 */
#ifndef DPM_RING_H
#define DPM_RING_H

#include <stddef.h>
#include <stdint.h>

#define DPM_RING_MAGIC 0x474e495250444d44ULL /* "DMDPRING" read as little-endian bytes */
#define DPM_RING_ABI_VERSION 1u
#define DPM_RING_HEADER_BYTES 4096u /* the data area starts on its own page */
#define DPM_RING_CACHE_LINE 64u
#define DPM_RING_HUGE_PAGE (2u * 1024u * 1024u)
#define DPM_RING_MIN_DATA 4096u
#define DPM_RING_MAX_DATA (1ULL << 40)

/* header.flags bits */
#define DPM_RING_PRODUCER_CLOSED 0x1u
#define DPM_RING_CONSUMER_CLOSED 0x2u

/* record.flags values */
#define DPM_REC_DATA 0u
#define DPM_REC_PAD 1u

struct dpm_ring_header {
    /* line 0: geometry (immutable after init) + flags */
    uint64_t magic;
    uint32_t abi_version;
    uint32_t header_bytes;
    uint64_t data_bytes;
    uint64_t capacity; /* messages */
    uint32_t max_message;
    uint32_t flags; /* DPM_RING_*_CLOSED, atomic */
    uint64_t reserved0[3];
    /* line 1: written by the producer only */
    uint64_t head;
    uint64_t head_seq;
    uint32_t data_ec;          /* futex: bumped when data was published to a waiting consumer */
    uint32_t producer_waiting; /* 1 while the producer waits on space_ec */
    uint8_t pad1[40];
    /* line 2: written by the consumer only */
    uint64_t tail;
    uint64_t tail_seq;
    uint32_t space_ec;         /* futex: bumped when room was freed for a waiting producer */
    uint32_t consumer_waiting; /* 1 while the consumer waits on data_ec */
    uint8_t pad2[40];
};

struct dpm_record {
    uint32_t len;
    uint32_t flags;
    uint64_t seq;
};

_Static_assert(offsetof(struct dpm_ring_header, magic) == 0, "magic first");
_Static_assert(offsetof(struct dpm_ring_header, abi_version) == 8, "abi");
_Static_assert(offsetof(struct dpm_ring_header, header_bytes) == 12, "header_bytes");
_Static_assert(offsetof(struct dpm_ring_header, data_bytes) == 16, "data_bytes");
_Static_assert(offsetof(struct dpm_ring_header, capacity) == 24, "capacity");
_Static_assert(offsetof(struct dpm_ring_header, max_message) == 32, "max_message");
_Static_assert(offsetof(struct dpm_ring_header, flags) == 36, "flags");
_Static_assert(offsetof(struct dpm_ring_header, head) == 64, "producer line");
_Static_assert(offsetof(struct dpm_ring_header, head_seq) == 72, "head_seq");
_Static_assert(offsetof(struct dpm_ring_header, data_ec) == 80, "data_ec");
_Static_assert(offsetof(struct dpm_ring_header, producer_waiting) == 84, "producer_waiting");
_Static_assert(offsetof(struct dpm_ring_header, tail) == 128, "consumer line");
_Static_assert(offsetof(struct dpm_ring_header, tail_seq) == 136, "tail_seq");
_Static_assert(offsetof(struct dpm_ring_header, space_ec) == 144, "space_ec");
_Static_assert(offsetof(struct dpm_ring_header, consumer_waiting) == 148, "consumer_waiting");
_Static_assert(sizeof(struct dpm_ring_header) == 192, "three cache lines");
_Static_assert(sizeof(struct dpm_ring_header) <= DPM_RING_HEADER_BYTES, "header fits its page");
_Static_assert(sizeof(struct dpm_record) == 16, "record header");

/* Bytes a record with `len` payload bytes occupies (header + payload padded to 8). */
static inline uint64_t dpm_record_bytes(uint64_t len)
{
    return sizeof(struct dpm_record) + ((len + 7u) & ~(uint64_t)7u);
}

/* A process-local view of a mapped ring (never stored in shared memory). */
struct dpm_ring {
    struct dpm_ring_header *hdr;
    uint8_t *data;
    uint64_t mask;
    uint64_t data_bytes;
    uint64_t capacity;
    uint32_t max_message;
    /* producer private state: head/head_seq mirror what it published */
    uint64_t head, head_seq;
    uint64_t tail_cache, tail_seq_cache; /* last tail/tail_seq the producer loaded */
    /* consumer private state: the read cursor (delivered, maybe not committed) */
    uint64_t read, read_seq;
    uint64_t tail_pub, tail_seq_pub; /* last tail/tail_seq this consumer published */
    /* adaptive spin before sleeping on the futex, in nanoseconds of wall time: a sleep
     * costs this end a wake-up latency and the other end a FUTEX_WAKE syscall on its hot
     * path, so the budget follows how long waits really last (see adaptive_spin) */
    uint32_t spin_ns;
    /* consumer: when dpm_ring_spin_data last ran out of budget (0: it did not), and when
     * that spin began; a dpm_ring_wait_data right after it sleeps at once and learns from
     * that start instead of spinning a second budget */
    uint64_t spun_until, spun_from;
    uint64_t spins; /* spins begun by this end: a statistic, and how tests see a skipped one */
};

#define DPM_SPIN_MIN_NS 1000u  /* 1 us: what a wait is allowed to cost when waits are long */
#define DPM_SPIN_MAX_NS 50000u /* 50 us: longer gaps are idle time, not a burst in progress */
#define DPM_SPUN_FRESH_NS 1000000u /* 1 ms: a failed spin this recent stands in for a wait's own */

/* Result codes (>= 0 success, < 0 failure) */
#define DPM_OK 0
#define DPM_FULL 1          /* not enough room / window full */
#define DPM_EMPTY 1         /* nothing to read */
#define DPM_CORRUPT (-1)    /* shared memory does not follow the layout */
#define DPM_GAP (-2)        /* next_expected is below what the ring still holds */
#define DPM_AHEAD (-3)      /* next_expected is beyond what the producer published */

/* Producer: write a fresh header for a data area of `data_bytes` (power of two); the first
 * message will get sequence number `first_seq`. */
void dpm_ring_init(struct dpm_ring *r, void *base, uint64_t data_bytes, uint64_t capacity,
                   uint32_t max_message, uint64_t first_seq);

/* Consumer: check a mapped header of `map_bytes`; returns NULL or a static reason. */
const char *dpm_ring_check(const void *base, uint64_t map_bytes);

/* Consumer: fill `r` from a header that passed dpm_ring_check(). */
void dpm_ring_attach(struct dpm_ring *r, void *base);

/* Producer: does a record with `len` bytes fit now (window and bytes)? */
int dpm_ring_fits(struct dpm_ring *r, uint32_t len);

/* Producer: copy one record into the ring without publishing it (DPM_OK or DPM_FULL). */
int dpm_ring_put(struct dpm_ring *r, const void *buf, uint32_t len);

/* One message for dpm_ring_put_many. */
struct dpm_msg {
    const void *buf;
    uint32_t len; /* at most max_message: the caller checked */
};

/* Producer: dpm_ring_put for each message in turn, stopping at the first that does not fit;
 * returns how many were put. One free-space check covers every record that fits before
 * the end of the area, so a burst of small records costs one copy each and little else. */
uint32_t dpm_ring_put_many(struct dpm_ring *r, const struct dpm_msg *msgs, uint32_t n);

/* Producer: make everything put so far visible and wake a waiting consumer. */
void dpm_ring_publish(struct dpm_ring *r);

/* Consumer: find the next data record at the read cursor. DPM_OK with rec and payload set,
 * DPM_EMPTY, or DPM_CORRUPT. `head` is the value loaded by the caller (acquire). */
int dpm_ring_peek(struct dpm_ring *r, uint64_t head, struct dpm_record *rec,
                  const uint8_t **payload);

/* Where a record's payload lies in the data area. */
struct dpm_found {
    uint64_t off;
    uint32_t len;
};

/* Consumer: dpm_ring_peek and dpm_ring_advance for up to max_n records, each checked the
 * same way. *found receives how many were found and stepped over; DPM_CORRUPT leaves the
 * cursor on the bad record (after the good ones), otherwise DPM_OK (an empty ring too). */
int dpm_ring_peek_many(struct dpm_ring *restrict r, uint64_t head, struct dpm_found *restrict out,
                       uint32_t max_n, uint32_t *found);

/* Consumer: step the read cursor over the record returned by dpm_ring_peek(). */
static inline void dpm_ring_advance(struct dpm_ring *r, const struct dpm_record *rec)
{
    r->read += dpm_record_bytes(rec->len);
    r->read_seq += 1;
}

/* Consumer: publish tail/tail_seq = read cursor and wake a waiting producer. */
void dpm_ring_commit(struct dpm_ring *r);

/* Consumer: publish tail/tail_seq for the delivered prefix below `seq` (tail_seq_pub <= seq
 * <= read_seq; a smaller seq is a no-op since acks are cumulative). DPM_OK or DPM_CORRUPT. */
int dpm_ring_commit_upto(struct dpm_ring *r, uint64_t seq);

/* Consumer: set the read cursor to the record with seq `next_expected`, scanning from the
 * committed position. Returns DPM_OK (and *skipped = records passed over), DPM_GAP,
 * DPM_AHEAD or DPM_CORRUPT. *committed_seq receives the committed seq found. */
int dpm_ring_resync(struct dpm_ring *r, uint64_t next_expected, uint64_t *skipped,
                    uint64_t *committed_seq);

static inline uint64_t dpm_load_head(const struct dpm_ring *r)
{
    return __atomic_load_n(&r->hdr->head, __ATOMIC_ACQUIRE);
}

static inline uint32_t dpm_load_flags(const struct dpm_ring *r)
{
    return __atomic_load_n(&r->hdr->flags, __ATOMIC_ACQUIRE);
}

/* Either end: set flag bits and wake both sides unconditionally. */
void dpm_ring_set_flags(struct dpm_ring *r, uint32_t bits);

/* Either end: wake the other side unconditionally (after close, for instance). */
void dpm_ring_wake_all(struct dpm_ring *r);

/* Producer: wait up to timeout_ms until a record of `len` bytes fits (len < 0: until the
 * consumer committed everything) or a flag is set. Returns 1 if the condition holds, 0 on
 * timeout, or -errno on a futex failure other than EAGAIN/EINTR/ETIMEDOUT. */
int dpm_ring_wait_space(struct dpm_ring *r, int64_t len, int timeout_ms);

/* Consumer: wait up to timeout_ms until data beyond the read cursor is published or a flag
 * is set. Same returns as dpm_ring_wait_space. */
int dpm_ring_wait_data(struct dpm_ring *r, int timeout_ms);

/* Consumer: spin (no futex, no syscall) for the learnt budget until data or a flag shows.
 * The first step of dpm_ring_wait_data on its own, for a receive that waits in C before it
 * goes back to Python: 1 if ready, 0 when the budget ran out. A dpm_ring_wait_data within
 * DPM_SPUN_FRESH_NS of that 0 does not spin again: it sleeps, and learns from this spin. */
int dpm_ring_spin_data(struct dpm_ring *r);

#endif /* DPM_RING_H */
