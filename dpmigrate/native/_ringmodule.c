/*
 * _ringmodule.c - Python binding of the shm ring core (ring.h / ring.c).
 *
 * Thin on purpose (psutil style): it maps memory, moves bytes, waits on futexes and returns
 * plain values (ints, bytes, lists, tuples). Policy - timeouts, reconnection, error wording -
 * lives in dpmigrate/transports/shm.py. A failing syscall raises OSError whose `filename` is
 * the syscall's name; shm.py turns that into dpmigrate.errors.NativeError in one place.
 * Shared memory that does not follow the layout raises _ring.RingCorrupt.
 *
 *   memfd_create(name, nbytes, hugepages) -> fd
 *   Ring(fd, map_bytes)                    maps the file MAP_SHARED (fd may be closed after)
 *     .init_producer(data_bytes, capacity, max_message[, first_seq]) -> None
 *     .attach_consumer() -> None | str     (str: why the header is not acceptable)
 *     .push(msg) -> 1 | 0 | -1             (-1: the consumer closed the ring)
 *     .push_burst(msgs) -> n | -1
 *     .wait_space(nbytes, timeout_ms) -> bool   (nbytes < 0: wait until all is committed)
 *     .pop(commit[, spin]) -> bytes | None  (spin: wait the learnt spin budget, no futex)
 *     .pop_burst(max_n, commit[, spin]) -> list[bytes]
 *     .pop_views(max_n, commit[, spin]) -> Views  (zero-copy: views into the mapping, below)
 *     .expire_views() -> None               (end the live Views batch; ViewsHeld if in use)
 *     .commit() -> None
 *     .commit_upto(seq) -> None             (acknowledge the delivered prefix below seq)
 *     .wait_data(timeout_ms) -> bool
 *     .resync(next_expected) -> (code, skipped, committed_seq)
 *     .flags() / .set_flags(bits) / .wake()
 *     .positions() -> (head, head_seq, tail, tail_seq, read, read_seq, flags)
 *     .close()
 *     .messages / .bytes / .peak / .spins / .role / .closed / .exports / .name
 *
 * Zero-copy receive (Views). A Ring exports its data area through the buffer protocol
 * (read-only, consumer mappings only) and counts the buffers it has out (`exports`).
 * pop_views() steps the read cursor over up to max_n records exactly as pop_burst() does,
 * but instead of copying each payload into a bytes object it returns one Views object that
 * remembers the records' offsets; a memoryview of a record is made only when the caller
 * indexes the batch. The batch is valid until the next consumer call on the mapping (pop,
 * pop_burst, pop_views, commit, commit_upto, expire_views, close): that call first expires
 * it - releases every memoryview it handed out, so later use raises ValueError, and the
 * batch itself raises dpmigrate.errors.ViewExpired - and then, if `exports` is still not
 * zero (the caller kept a slice of a view, or a numpy array over one), raises
 * dpmigrate.errors.ViewsHeld and does nothing else: no commit can give the producer memory
 * that something still shows. close() with buffers still out unmaps only when the last one
 * is released, so no view can ever point at unmapped memory.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ring.h"

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26) /* log2(2 MiB) << MFD_HUGE_SHIFT */
#endif

enum { ROLE_NONE = 0, ROLE_PRODUCER = 1, ROLE_CONSUMER = 2 };

static PyObject *RingCorrupt;

typedef struct {
    PyObject_HEAD
    void *base;
    Py_ssize_t map_bytes;
    int role;
    int waiting; /* a wait call released the GIL and still uses the mapping */
    int zombie;  /* close() was called while buffers were exported: unmap on the last release */
    Py_ssize_t exports; /* buffers of the data area handed out and not yet released */
    PyObject *batch;    /* the live Views batch (strong ref) or NULL */
    PyObject *name;     /* the ring's name, for error messages (set by shm.py) */
    struct dpm_ring r;
    unsigned long long messages, bytes, peak;
} RingObject;

struct view_item {
    uint64_t off;   /* payload offset in the data area */
    uint32_t len;
    PyObject *view; /* the memoryview handed out for it, or NULL */
};

/* Ownership: the Ring holds its live batch (strong); the batch points back at the Ring only
 * while it is live (borrowed: the Ring expires its batch before it replaces, unmaps or
 * frees it, and expiry clears the pointer), so there is no reference cycle. */
typedef struct {
    PyObject_VAR_HEAD
    RingObject *ring; /* borrowed, NULL once expired */
    PyObject *name;   /* the ring's name, for the expiry error */
    PyObject *base;   /* memoryview of the whole data area, made on first access, or NULL */
    int expired;
    unsigned long long first_seq, nbytes;
    struct view_item items[1];
} ViewsObject;

static PyTypeObject ViewsType;

/* Raise dpmigrate's ViewExpired / ViewsHeld with the wording of transports/base.py. */
static PyObject *view_error(PyObject *name, const char *factory, const char *what)
{
    PyObject *mod = PyImport_ImportModule("dpmigrate.transports.base");
    if (mod == NULL)
        return NULL;
    if (name == NULL)
        name = Py_None;
    PyObject *exc = what == NULL ? PyObject_CallMethod(mod, factory, "O", name)
                                 : PyObject_CallMethod(mod, factory, "Os", name, what);
    Py_DECREF(mod);
    if (exc == NULL)
        return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

/* Release one memoryview through its release() method; 0, or -1 if it has exports. */
static int release_view(PyObject *view)
{
    PyObject *r = PyObject_CallMethod(view, "release", NULL);
    if (r == NULL) {
        PyErr_Clear(); /* BufferError: a buffer was taken from it; the ring's count shows it */
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* Expire a batch: release and forget its views and its base view. Idempotent. */
static void views_expire(ViewsObject *v)
{
    if (v->expired)
        return;
    v->expired = 1;
    v->ring = NULL;
    if (v->base == NULL)
        return; /* no item was looked at: every item view is cut from base */
    for (Py_ssize_t i = 0; i < Py_SIZE(v); i++) {
        if (v->items[i].view != NULL) {
            release_view(v->items[i].view);
            Py_CLEAR(v->items[i].view);
        }
    }
    release_view(v->base);
    Py_CLEAR(v->base);
}

/* Before any consumer call: expire the live batch; -1 with ViewsHeld if memory of it is
 * still referenced (the call must then not go on). */
static int expire_live(RingObject *self, const char *what)
{
    if (self->batch != NULL) {
        views_expire((ViewsObject *)self->batch);
        Py_CLEAR(self->batch);
    }
    if (self->exports > 0) {
        view_error(self->name, "held_error", what);
        return -1;
    }
    return 0;
}

static PyObject *syscall_error(const char *syscall, int err)
{
    errno = err;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, syscall);
}

static int check_role(RingObject *self, int role, const char *what)
{
    if (self->base == NULL || self->zombie) {
        PyErr_Format(PyExc_ValueError, "%s() on a closed ring mapping", what);
        return -1;
    }
    if (self->role != role) {
        PyErr_Format(PyExc_ValueError, "%s() needs a %s mapping; this one is %s", what,
                     role == ROLE_PRODUCER ? "producer" : "consumer",
                     self->role == ROLE_NONE ? "not initialised yet"
                     : self->role == ROLE_PRODUCER ? "the producer's"
                                                   : "the consumer's");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ lifecycle */

static int Ring_init(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "map_bytes", NULL};
    int fd;
    Py_ssize_t map_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "in", kwlist, &fd, &map_bytes))
        return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_ValueError, "Ring() object is already mapped");
        return -1;
    }
    if (fd < 0) {
        PyErr_Format(PyExc_ValueError, "fd must be a file descriptor >= 0, got %d", fd);
        return -1;
    }
    if (map_bytes < (Py_ssize_t)(DPM_RING_HEADER_BYTES + DPM_RING_MIN_DATA) ||
        (unsigned long long)map_bytes > DPM_RING_HEADER_BYTES + DPM_RING_MAX_DATA) {
        PyErr_Format(PyExc_ValueError, "map_bytes must be between %u and %llu, got %zd",
                     DPM_RING_HEADER_BYTES + DPM_RING_MIN_DATA,
                     (unsigned long long)(DPM_RING_HEADER_BYTES + DPM_RING_MAX_DATA), map_bytes);
        return -1;
    }
    void *base = mmap(NULL, (size_t)map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        syscall_error("mmap", errno);
        return -1;
    }
    self->base = base;
    self->map_bytes = map_bytes;
    self->role = ROLE_NONE;
    return 0;
}

static void unmap(RingObject *self)
{
    if (self->batch != NULL) {
        views_expire((ViewsObject *)self->batch);
        Py_CLEAR(self->batch);
    }
    if (self->exports > 0) { /* a view still shows the mapping: unmap at its release */
        self->zombie = 1;
        return;
    }
    if (self->base != NULL) {
        munmap(self->base, (size_t)self->map_bytes);
        self->base = NULL;
        memset(&self->r, 0, sizeof(self->r));
    }
}

static void Ring_dealloc(RingObject *self)
{
    /* exports > 0 cannot happen here: every exported buffer holds a reference */
    unmap(self);
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->waiting) {
        PyErr_SetString(PyExc_ValueError, "close() while another thread waits on this ring");
        return NULL;
    }
    unmap(self);
    Py_RETURN_NONE;
}

static PyObject *Ring_init_producer(RingObject *self, PyObject *args)
{
    unsigned long long data_bytes, capacity, max_message, first_seq = 0;
    if (!PyArg_ParseTuple(args, "KKK|K", &data_bytes, &capacity, &max_message, &first_seq))
        return NULL;
    if (self->base == NULL || self->role != ROLE_NONE) {
        PyErr_SetString(PyExc_ValueError,
                        "init_producer() needs a fresh mapping (not closed, not initialised)");
        return NULL;
    }
    if (data_bytes < DPM_RING_MIN_DATA || data_bytes > DPM_RING_MAX_DATA ||
        (data_bytes & (data_bytes - 1)) != 0)
        return PyErr_Format(PyExc_ValueError,
                            "data_bytes must be a power of two between %u and %llu, got %llu",
                            DPM_RING_MIN_DATA, (unsigned long long)DPM_RING_MAX_DATA, data_bytes);
    if (DPM_RING_HEADER_BYTES + data_bytes > (unsigned long long)self->map_bytes)
        return PyErr_Format(PyExc_ValueError,
                            "header (%u) + data_bytes (%llu) exceed the mapping of %zd bytes",
                            DPM_RING_HEADER_BYTES, data_bytes, self->map_bytes);
    if (capacity == 0 || capacity > data_bytes / sizeof(struct dpm_record))
        return PyErr_Format(PyExc_ValueError,
                            "capacity must be between 1 and %llu messages for %llu data bytes, "
                            "got %llu",
                            data_bytes / sizeof(struct dpm_record), data_bytes, capacity);
    if (max_message > UINT32_MAX || 2 * dpm_record_bytes(max_message) > data_bytes)
        return PyErr_Format(PyExc_ValueError,
                            "max_message %llu does not fit: the data area (%llu bytes) must hold "
                            "2 records of max_message + %zu bytes",
                            max_message, data_bytes, sizeof(struct dpm_record));
    dpm_ring_init(&self->r, self->base, data_bytes, capacity, (uint32_t)max_message, first_seq);
    self->role = ROLE_PRODUCER;
    Py_RETURN_NONE;
}

static PyObject *Ring_attach_consumer(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->base == NULL || self->role != ROLE_NONE) {
        PyErr_SetString(PyExc_ValueError,
                        "attach_consumer() needs a fresh mapping (not closed, not initialised)");
        return NULL;
    }
    const char *why = dpm_ring_check(self->base, (uint64_t)self->map_bytes);
    if (why != NULL)
        return PyUnicode_FromString(why);
    dpm_ring_attach(&self->r, self->base);
    self->role = ROLE_CONSUMER;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ producer */

/* Length of a bytes-like message, or -1 with TypeError set. */
static Py_ssize_t message_len(PyObject *item, Py_ssize_t index)
{
    if (PyBytes_CheckExact(item))
        return PyBytes_GET_SIZE(item);
    Py_buffer view;
    if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "message %zd is %.100s, not a contiguous bytes-like object",
                     index, Py_TYPE(item)->tp_name);
        return -1;
    }
    Py_ssize_t n = view.len;
    PyBuffer_Release(&view);
    return n;
}

static int check_message(RingObject *self, PyObject *item, Py_ssize_t index)
{
    Py_ssize_t n = message_len(item, index);
    if (n < 0)
        return -1;
    if ((unsigned long long)n > self->r.max_message) {
        PyErr_Format(PyExc_ValueError, "message %zd has %zd bytes, more than max_message %u",
                     index, n, self->r.max_message);
        return -1;
    }
    return 0;
}

/* Copy one message in; 1 done, 0 full, -1 Python error. */
static int put_one(RingObject *self, PyObject *item)
{
    int rc;
    Py_ssize_t len;
    if (PyBytes_CheckExact(item)) {
        len = PyBytes_GET_SIZE(item);
        rc = dpm_ring_put(&self->r, PyBytes_AS_STRING(item), (uint32_t)len);
    } else {
        Py_buffer view;
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0)
            return -1;
        len = view.len;
        rc = dpm_ring_put(&self->r, view.buf, (uint32_t)len);
        PyBuffer_Release(&view);
    }
    if (rc != DPM_OK)
        return 0;
    self->messages += 1;
    self->bytes += (unsigned long long)len;
    return 1;
}

static void note_peak(RingObject *self)
{
    uint64_t occ =
        self->r.head_seq - __atomic_load_n(&self->r.hdr->tail_seq, __ATOMIC_RELAXED);
    if (occ > self->peak && occ <= self->r.capacity)
        self->peak = occ;
}

static PyObject *Ring_push(RingObject *self, PyObject *msg)
{
    if (check_role(self, ROLE_PRODUCER, "push") < 0 || check_message(self, msg, 0) < 0)
        return NULL;
    if (dpm_load_flags(&self->r) & DPM_RING_CONSUMER_CLOSED)
        return PyLong_FromLong(-1);
    int rc = put_one(self, msg);
    if (rc < 0)
        return NULL;
    if (rc > 0) {
        dpm_ring_publish(&self->r);
        note_peak(self);
    }
    return PyLong_FromLong(rc);
}

#define PUSH_CHUNK 64
static PyObject *Ring_push_burst(RingObject *self, PyObject *msgs)
{
    if (check_role(self, ROLE_PRODUCER, "push_burst") < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(msgs, "push_burst() needs a sequence of bytes-like objects");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t i, n = 0;
    int all_bytes = 1;
    /* validate the whole burst first: a bad message anywhere sends nothing */
    for (i = 0; i < count; i++) {
        PyObject *item = items[i];
        if (PyBytes_CheckExact(item) && (uint64_t)PyBytes_GET_SIZE(item) <= self->r.max_message)
            continue; /* the common case, checked inline */
        all_bytes = 0;
        if (check_message(self, item, i) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    if (dpm_load_flags(&self->r) & DPM_RING_CONSUMER_CLOSED) {
        Py_DECREF(seq);
        return PyLong_FromLong(-1);
    }
    /* bytes need no buffer to be held: the C core takes them a chunk at a time */
    while (all_bytes && n < count) {
        struct dpm_msg chunk[PUSH_CHUNK];
        uint32_t k = count - n < PUSH_CHUNK ? (uint32_t)(count - n) : PUSH_CHUNK;
        for (uint32_t j = 0; j < k; j++) {
            chunk[j].buf = PyBytes_AS_STRING(items[n + j]);
            chunk[j].len = (uint32_t)PyBytes_GET_SIZE(items[n + j]);
        }
        uint32_t put = dpm_ring_put_many(&self->r, chunk, k);
        for (uint32_t j = 0; j < put; j++)
            self->bytes += chunk[j].len;
        self->messages += put;
        n += put;
        if (put < k)
            break;
    }
    for (; !all_bytes && n < count; n++) {
        int rc = put_one(self, items[n]);
        if (rc < 0) {
            if (n > 0)
                dpm_ring_publish(&self->r);
            Py_DECREF(seq);
            return NULL;
        }
        if (rc == 0)
            break;
    }
    Py_DECREF(seq);
    if (n > 0) {
        dpm_ring_publish(&self->r);
        note_peak(self);
    }
    return PyLong_FromSsize_t(n);
}

static int timeout_arg(int ms)
{
    if (ms < 0) {
        PyErr_Format(PyExc_ValueError, "timeout_ms must be >= 0, got %d", ms);
        return -1;
    }
    return 0;
}

static PyObject *wait_done(RingObject *self, int rc)
{
    self->waiting = 0;
    if (rc < 0)
        return syscall_error("futex", -rc);
    if (PyErr_CheckSignals() < 0) /* let KeyboardInterrupt through */
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *Ring_wait_space(RingObject *self, PyObject *args)
{
    long long nbytes;
    int ms, rc;
    if (!PyArg_ParseTuple(args, "Li", &nbytes, &ms) ||
        check_role(self, ROLE_PRODUCER, "wait_space") < 0 || timeout_arg(ms) < 0)
        return NULL;
    if (nbytes > (long long)self->r.max_message)
        return PyErr_Format(PyExc_ValueError, "wait_space(): %lld bytes exceed max_message %u",
                            nbytes, self->r.max_message);
    self->waiting = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = dpm_ring_wait_space(&self->r, nbytes, ms);
    Py_END_ALLOW_THREADS
    return wait_done(self, rc);
}

/* ------------------------------------------------------------------ consumer */

static PyObject *corrupt(RingObject *self)
{
    PyErr_Format(RingCorrupt,
                 "record at byte %llu (seq %llu) does not follow the ring layout",
                 (unsigned long long)self->r.read, (unsigned long long)self->r.read_seq);
    return NULL;
}

static void note_consumer_peak(RingObject *self)
{
    uint64_t avail =
        __atomic_load_n(&self->r.hdr->head_seq, __ATOMIC_RELAXED) - self->r.read_seq;
    if (avail > self->peak && avail <= self->r.capacity)
        self->peak = avail;
}

/* The producer's published head; with spin, an empty ring is first watched for the spin
 * budget (GIL released), as pop(commit, spin) does. */
static uint64_t head_after_spin(RingObject *self, int spin)
{
    uint64_t head = dpm_load_head(&self->r);
    if (head != self->r.read || !spin)
        return head;
    self->waiting = 1; /* close() from another thread must not unmap under the spin */
    Py_BEGIN_ALLOW_THREADS
    dpm_ring_spin_data(&self->r);
    Py_END_ALLOW_THREADS
    self->waiting = 0;
    return dpm_load_head(&self->r);
}

/* pop(commit[, spin]): with spin true, an empty ring is watched for the learnt spin budget
 * (1-50 us, GIL released) before None comes back: a blocking recv() then returns the moment
 * a message lands instead of after a round through Python's wait loop, which on a ping-pong
 * cost more than the ring itself (about 1 us of 1.4 one-way). */
static PyObject *Ring_pop(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2)
        return PyErr_Format(PyExc_TypeError,
                            "pop() takes 1 or 2 arguments (commit[, spin]), got %zd", nargs);
    int commit = PyObject_IsTrue(args[0]);
    int spin = nargs == 2 ? PyObject_IsTrue(args[1]) : 0;
    if (commit < 0 || spin < 0 || check_role(self, ROLE_CONSUMER, "pop") < 0 ||
        expire_live(self, "receive") < 0)
        return NULL;
    if (commit)
        dpm_ring_commit(&self->r);
    struct dpm_record rec;
    const uint8_t *payload;
    int rc = dpm_ring_peek(&self->r, head_after_spin(self, spin), &rec, &payload);
    if (rc == DPM_EMPTY)
        Py_RETURN_NONE;
    if (rc != DPM_OK)
        return corrupt(self);
    note_consumer_peak(self);
    PyObject *b = PyBytes_FromStringAndSize((const char *)payload, rec.len);
    if (b == NULL)
        return NULL;
    dpm_ring_advance(&self->r, &rec);
    self->messages += 1;
    self->bytes += rec.len;
    return b;
}

/* (max_n, commit[, spin]) of pop_burst/pop_views, read without building an argument tuple:
 * these run once per batch, where parsing a tuple cost about as much as finding 10 records. */
static int burst_args(PyObject *const *args, Py_ssize_t nargs, const char *fn, Py_ssize_t *max_n,
                      int *commit, int *spin)
{
    if (nargs < 2 || nargs > 3) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes 2 or 3 arguments (max_n, commit[, spin]), got %zd", fn, nargs);
        return -1;
    }
    *max_n = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
    if (*max_n == -1 && PyErr_Occurred())
        return -1;
    *commit = PyObject_IsTrue(args[1]);
    *spin = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    return *commit < 0 || *spin < 0 ? -1 : 0;
}

static PyObject *Ring_pop_burst(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t max_n;
    int commit, spin;
    if (burst_args(args, nargs, "pop_burst", &max_n, &commit, &spin) < 0 ||
        check_role(self, ROLE_CONSUMER, "pop_burst") < 0 || expire_live(self, "receive") < 0)
        return NULL;
    if (max_n < 1)
        return PyErr_Format(PyExc_ValueError, "max_n must be >= 1, got %zd", max_n);
    if (commit)
        dpm_ring_commit(&self->r);
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    uint64_t head = head_after_spin(self, spin);
    struct dpm_record rec;
    const uint8_t *payload;
    for (Py_ssize_t n = 0; n < max_n; n++) {
        int rc = dpm_ring_peek(&self->r, head, &rec, &payload);
        if (rc == DPM_EMPTY)
            break;
        if (rc != DPM_OK) {
            Py_DECREF(list);
            return corrupt(self);
        }
        if (n == 0)
            note_consumer_peak(self);
        PyObject *b = PyBytes_FromStringAndSize((const char *)payload, rec.len);
        if (b == NULL || PyList_Append(list, b) < 0) {
            Py_XDECREF(b);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(b);
        dpm_ring_advance(&self->r, &rec);
        self->messages += 1;
        self->bytes += rec.len;
    }
    return list;
}


/* pop_views(max_n, commit) -> Views: step over up to max_n records like pop_burst(), but
 * keep only their offsets (no copy, no per-message object). */
#define VIEWS_STACK 64
static PyObject *Ring_pop_views(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t max_n;
    int commit, spin;
    if (burst_args(args, nargs, "pop_views", &max_n, &commit, &spin) < 0 ||
        check_role(self, ROLE_CONSUMER, "pop_views") < 0 || expire_live(self, "receive") < 0)
        return NULL;
    if (max_n < 1)
        return PyErr_Format(PyExc_ValueError, "max_n must be >= 1, got %zd", max_n);
    if ((uint64_t)max_n > self->r.capacity)
        max_n = (Py_ssize_t)self->r.capacity; /* never more records than the window */
    if (commit)
        dpm_ring_commit(&self->r);
    uint64_t head = head_after_spin(self, spin);
    uint64_t start_seq = self->r.read_seq;
    struct dpm_found stack[VIEWS_STACK], *found = stack;
    Py_ssize_t n = 0, room = VIEWS_STACK;
    /* Peek first, step the cursor only once the batch object exists: a failed allocation
     * must not lose messages. */
    struct dpm_ring walk = self->r;
    for (;;) {
        uint32_t want = (uint32_t)(max_n - n < room - n ? max_n - n : room - n), got;
        int rc = dpm_ring_peek_many(&walk, head, found + n, want, &got);
        n += got;
        if (rc != DPM_OK) {
            if (found != stack)
                PyMem_Free(found);
            self->r.read = walk.read; /* name the bad record */
            self->r.read_seq = walk.read_seq;
            return corrupt(self);
        }
        if (got < want || n == max_n)
            break;
        struct dpm_found *more = PyMem_Malloc(2 * (size_t)room * sizeof(*more));
        if (more == NULL) {
            if (found != stack)
                PyMem_Free(found);
            return PyErr_NoMemory();
        }
        memcpy(more, found, (size_t)n * sizeof(*more));
        if (found != stack)
            PyMem_Free(found);
        found = more;
        room *= 2;
    }
    ViewsObject *v = PyObject_NewVar(ViewsObject, &ViewsType, n);
    if (v == NULL) {
        if (found != stack)
            PyMem_Free(found);
        return NULL;
    }
    unsigned long long nbytes = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        v->items[i].off = found[i].off;
        v->items[i].len = found[i].len;
        v->items[i].view = NULL;
        nbytes += found[i].len;
    }
    if (found != stack)
        PyMem_Free(found);
    v->ring = self;
    v->name = Py_NewRef(self->name != NULL ? self->name : Py_None);
    v->base = NULL;
    v->expired = 0;
    v->first_seq = start_seq;
    v->nbytes = nbytes;
    if (n > 0) {
        note_consumer_peak(self);
        self->r.read = walk.read;
        self->r.read_seq = walk.read_seq;
        self->messages += (unsigned long long)n;
        self->bytes += nbytes;
        Py_INCREF(v);
        self->batch = (PyObject *)v;
    } else {
        v->expired = 1; /* nothing to expire: not the live batch, and no Ring pointer kept */
        v->ring = NULL;
    }
    return (PyObject *)v;
}

static PyObject *Ring_expire_views(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_role(self, ROLE_CONSUMER, "expire_views") < 0 || expire_live(self, "commit") < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ buffer export */

static int Ring_getbuffer(RingObject *self, Py_buffer *view, int flags)
{
    if (self->base == NULL || self->zombie || self->role != ROLE_CONSUMER) {
        PyErr_SetString(PyExc_BufferError,
                        "only an attached consumer mapping exports its data area");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->r.data, (Py_ssize_t)self->r.data_bytes,
                          1, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void Ring_releasebuffer(RingObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
    if (self->exports == 0 && self->zombie) {
        self->zombie = 0;
        unmap(self);
    }
}

static PyBufferProcs Ring_as_buffer = {
    .bf_getbuffer = (getbufferproc)Ring_getbuffer,
    .bf_releasebuffer = (releasebufferproc)Ring_releasebuffer,
};

/* ------------------------------------------------------------------ Views */

static void Views_dealloc(ViewsObject *v)
{
    views_expire(v); /* a no-op for a batch that was live: its Ring expired it first */
    Py_XDECREF(v->name);
    PyObject_Free(v);
}

static Py_ssize_t Views_len(ViewsObject *v)
{
    return Py_SIZE(v);
}

static PyObject *Views_item(ViewsObject *v, Py_ssize_t i)
{
    if (i < 0 || i >= Py_SIZE(v)) { /* first: iteration ends here, also on an empty batch */
        PyErr_SetString(PyExc_IndexError, "batch index out of range");
        return NULL;
    }
    if (v->expired)
        return view_error(v->name, "expired_error", NULL);
    struct view_item *it = &v->items[i];
    if (it->view == NULL) {
        if (v->base == NULL) {
            v->base = PyMemoryView_FromObject((PyObject *)v->ring);
            if (v->base == NULL)
                return NULL;
        }
        PyObject *start = PyLong_FromUnsignedLongLong(it->off);
        PyObject *stop = PyLong_FromUnsignedLongLong(it->off + it->len);
        PyObject *slice = start && stop ? PySlice_New(start, stop, NULL) : NULL;
        Py_XDECREF(start);
        Py_XDECREF(stop);
        if (slice == NULL)
            return NULL;
        it->view = PyObject_GetItem(v->base, slice);
        Py_DECREF(slice);
        if (it->view == NULL)
            return NULL;
    }
    Py_INCREF(it->view);
    return it->view;
}

static PyObject *Views_get_expired(ViewsObject *v, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(v->expired);
}

static PyObject *Views_repr(ViewsObject *v)
{
    return PyUnicode_FromFormat("<shm Views ring=%R seq=%llu n=%zd %s>", v->name, v->first_seq,
                                Py_SIZE(v), v->expired ? "expired" : "live");
}

static PySequenceMethods Views_as_sequence = {
    .sq_length = (lenfunc)Views_len,
    .sq_item = (ssizeargfunc)Views_item,
};

static PyMemberDef Views_members[] = {
    {"first_seq", T_ULONGLONG, offsetof(ViewsObject, first_seq), READONLY,
     "sequence number of the batch's first message"},
    {"nbytes", T_ULONGLONG, offsetof(ViewsObject, nbytes), READONLY,
     "payload bytes of all its messages"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Views_getset[] = {
    {"expired", (getter)Views_get_expired, NULL, "True once its views were released", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ViewsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dpmigrate.native._ring.Views",
    .tp_basicsize = offsetof(ViewsObject, items),
    .tp_itemsize = sizeof(struct view_item),
    .tp_dealloc = (destructor)Views_dealloc,
    .tp_repr = (reprfunc)Views_repr,
    .tp_as_sequence = &Views_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_SEQUENCE,
    .tp_doc = "A batch of records of a consumer mapping, as views valid until its next call.",
    .tp_members = Views_members,
    .tp_getset = Views_getset,
};

static PyObject *Ring_commit(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_role(self, ROLE_CONSUMER, "commit") < 0 || expire_live(self, "commit") < 0)
        return NULL;
    dpm_ring_commit(&self->r);
    Py_RETURN_NONE;
}

static PyObject *Ring_commit_upto(RingObject *self, PyObject *arg)
{
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (check_role(self, ROLE_CONSUMER, "commit_upto") < 0 || expire_live(self, "commit") < 0)
        return NULL;
    if (seq > self->r.read_seq)
        return PyErr_Format(PyExc_ValueError,
                            "commit_upto(%llu): only seq below %llu were delivered", seq,
                            (unsigned long long)self->r.read_seq);
    if (dpm_ring_commit_upto(&self->r, seq) != DPM_OK)
        return corrupt(self);
    Py_RETURN_NONE;
}

static PyObject *Ring_wait_data(RingObject *self, PyObject *args)
{
    int ms, rc;
    if (!PyArg_ParseTuple(args, "i", &ms) || check_role(self, ROLE_CONSUMER, "wait_data") < 0 ||
        timeout_arg(ms) < 0)
        return NULL;
    self->waiting = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = dpm_ring_wait_data(&self->r, ms);
    Py_END_ALLOW_THREADS
    return wait_done(self, rc);
}

static PyObject *Ring_resync(RingObject *self, PyObject *args)
{
    unsigned long long next_expected;
    uint64_t skipped = 0, committed = 0;
    if (!PyArg_ParseTuple(args, "K", &next_expected) ||
        check_role(self, ROLE_CONSUMER, "resync") < 0)
        return NULL;
    int rc = dpm_ring_resync(&self->r, next_expected, &skipped, &committed);
    return Py_BuildValue("iKK", rc, (unsigned long long)skipped, (unsigned long long)committed);
}

/* ------------------------------------------------------------------ both */

static PyObject *Ring_flags(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->base == NULL || self->zombie || self->role == ROLE_NONE)
        return PyErr_Format(PyExc_ValueError, "flags() on a closed or uninitialised mapping");
    return PyLong_FromUnsignedLong(dpm_load_flags(&self->r));
}

static PyObject *Ring_set_flags(RingObject *self, PyObject *arg)
{
    unsigned long bits = PyLong_AsUnsignedLong(arg);
    if (bits == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (self->base == NULL || self->zombie || self->role == ROLE_NONE)
        return PyErr_Format(PyExc_ValueError, "set_flags() on a closed or uninitialised mapping");
    if (bits & ~(unsigned long)(DPM_RING_PRODUCER_CLOSED | DPM_RING_CONSUMER_CLOSED))
        return PyErr_Format(PyExc_ValueError, "unknown flag bits 0x%lx", bits);
    dpm_ring_set_flags(&self->r, (uint32_t)bits);
    Py_RETURN_NONE;
}

static PyObject *Ring_wake(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->base == NULL || self->zombie || self->role == ROLE_NONE)
        return PyErr_Format(PyExc_ValueError, "wake() on a closed or uninitialised mapping");
    dpm_ring_wake_all(&self->r);
    Py_RETURN_NONE;
}

static PyObject *Ring_positions(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->base == NULL || self->zombie || self->role == ROLE_NONE)
        return PyErr_Format(PyExc_ValueError, "positions() on a closed or uninitialised mapping");
    struct dpm_ring_header *h = self->r.hdr;
    return Py_BuildValue(
        "KKKKKKk", (unsigned long long)__atomic_load_n(&h->head, __ATOMIC_ACQUIRE),
        (unsigned long long)__atomic_load_n(&h->head_seq, __ATOMIC_RELAXED),
        (unsigned long long)__atomic_load_n(&h->tail, __ATOMIC_ACQUIRE),
        (unsigned long long)__atomic_load_n(&h->tail_seq, __ATOMIC_RELAXED),
        (unsigned long long)self->r.read, (unsigned long long)self->r.read_seq,
        (unsigned long)dpm_load_flags(&self->r));
}

static PyObject *Ring_get_closed(RingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->base == NULL || self->zombie);
}

static PyMethodDef Ring_methods[] = {
    {"init_producer", (PyCFunction)Ring_init_producer, METH_VARARGS,
     "init_producer(data_bytes, capacity, max_message[, first_seq]): write a fresh header."},
    {"attach_consumer", (PyCFunction)Ring_attach_consumer, METH_NOARGS,
     "attach_consumer() -> None or a str saying why the header is unacceptable."},
    {"push", (PyCFunction)Ring_push, METH_O, "push(msg) -> 1 pushed, 0 full, -1 consumer closed."},
    {"push_burst", (PyCFunction)Ring_push_burst, METH_O,
     "push_burst(msgs) -> how many were pushed (as many as fit), -1 if the consumer closed."},
    {"wait_space", (PyCFunction)Ring_wait_space, METH_VARARGS,
     "wait_space(nbytes, timeout_ms) -> bool: room for nbytes (nbytes<0: all committed)."},
    {"pop", (PyCFunction)(void (*)(void))Ring_pop, METH_FASTCALL,
     "pop(commit[, spin]) -> bytes or None (spin: watch an empty ring for the spin budget)."},
    {"pop_burst", (PyCFunction)(void (*)(void))Ring_pop_burst, METH_FASTCALL,
     "pop_burst(max_n, commit[, spin]) -> list of up to max_n messages."},
    {"pop_views", (PyCFunction)(void (*)(void))Ring_pop_views, METH_FASTCALL,
     "pop_views(max_n, commit[, spin]) -> Views of up to max_n records, valid until next call."},
    {"expire_views", (PyCFunction)Ring_expire_views, METH_NOARGS,
     "expire_views(): end the live Views batch; ViewsHeld if its memory is still in use."},
    {"commit", (PyCFunction)Ring_commit, METH_NOARGS, "commit(): publish the read cursor."},
    {"commit_upto", (PyCFunction)Ring_commit_upto, METH_O,
     "commit_upto(seq): publish the committed position just below seq (<= read cursor)."},
    {"wait_data", (PyCFunction)Ring_wait_data, METH_VARARGS,
     "wait_data(timeout_ms) -> bool: data beyond the read cursor or a flag is set."},
    {"resync", (PyCFunction)Ring_resync, METH_VARARGS,
     "resync(next_expected) -> (code, skipped, committed_seq)."},
    {"flags", (PyCFunction)Ring_flags, METH_NOARGS, "flags() -> header flag bits."},
    {"set_flags", (PyCFunction)Ring_set_flags, METH_O, "set_flags(bits): set bits, wake both."},
    {"wake", (PyCFunction)Ring_wake, METH_NOARGS, "wake(): wake both sides."},
    {"positions", (PyCFunction)Ring_positions, METH_NOARGS,
     "positions() -> (head, head_seq, tail, tail_seq, read, read_seq, flags)."},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "close(): unmap (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Ring_members[] = {
    {"messages", T_ULONGLONG, offsetof(RingObject, messages), READONLY,
     "messages pushed or popped through this mapping"},
    {"bytes", T_ULONGLONG, offsetof(RingObject, bytes), READONLY, "payload bytes of those"},
    {"peak", T_ULONGLONG, offsetof(RingObject, peak), READONLY, "highest occupancy seen"},
    {"spins", T_ULONGLONG, offsetof(RingObject, r.spins), READONLY,
     "spins (before a futex sleep, or of a spinning pop) this end began"},
    {"role", T_INT, offsetof(RingObject, role), READONLY, "0 none, 1 producer, 2 consumer"},
    {"map_bytes", T_PYSSIZET, offsetof(RingObject, map_bytes), READONLY, "mapping size"},
    {"exports", T_PYSSIZET, offsetof(RingObject, exports), READONLY,
     "buffers of the data area still exported (views alive)"},
    {"name", T_OBJECT, offsetof(RingObject, name), 0, "the ring's name (for messages)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"closed", (getter)Ring_get_closed, NULL, "True once unmapped", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dpmigrate.native._ring.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(fd, map_bytes): a MAP_SHARED mapping of a ring memfd.",
    .tp_methods = Ring_methods,
    .tp_members = Ring_members,
    .tp_getset = Ring_getset,
    .tp_as_buffer = &Ring_as_buffer,
    .tp_init = (initproc)Ring_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ module */

static PyObject *mod_memfd_create(PyObject *Py_UNUSED(m), PyObject *args)
{
    const char *name;
    Py_ssize_t nbytes;
    int huge;
    if (!PyArg_ParseTuple(args, "snp", &name, &nbytes, &huge))
        return NULL;
    if (nbytes <= 0)
        return PyErr_Format(PyExc_ValueError, "nbytes must be > 0, got %zd", nbytes);
    if (huge && nbytes % DPM_RING_HUGE_PAGE != 0)
        return PyErr_Format(PyExc_ValueError,
                            "a hugepage memfd needs a multiple of %u bytes, got %zd",
                            DPM_RING_HUGE_PAGE, nbytes);
    unsigned int flags = MFD_CLOEXEC | MFD_ALLOW_SEALING;
    if (huge)
        flags |= MFD_HUGETLB | MFD_HUGE_2MB;
    int fd, err = 0;
    const char *call = "memfd_create";
    Py_BEGIN_ALLOW_THREADS
    fd = memfd_create(name, flags);
    if (fd < 0) {
        err = errno;
    } else if (ftruncate(fd, (off_t)nbytes) < 0) {
        err = errno;
        call = "ftruncate";
        close(fd);
        fd = -1;
    }
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return syscall_error(call, err);
    return PyLong_FromLong(fd);
}

static PyObject *mod_record_bytes(PyObject *Py_UNUSED(m), PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(dpm_record_bytes(n));
}

static PyObject *mod_layout(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
#define F(name) #name, (Py_ssize_t)offsetof(struct dpm_ring_header, name)
    return Py_BuildValue("{snsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsn}", F(magic), F(abi_version),
                         F(header_bytes), F(data_bytes), F(capacity), F(max_message), F(flags),
                         F(head), F(head_seq), F(data_ec), F(producer_waiting), F(tail),
                         F(tail_seq), F(space_ec), F(consumer_waiting), "sizeof_header",
                         (Py_ssize_t)sizeof(struct dpm_ring_header), "sizeof_record",
                         (Py_ssize_t)sizeof(struct dpm_record));
#undef F
}

static PyMethodDef module_methods[] = {
    {"memfd_create", mod_memfd_create, METH_VARARGS,
     "memfd_create(name, nbytes, hugepages) -> fd sized to nbytes (close-on-exec, sealable)."},
    {"record_bytes", mod_record_bytes, METH_O,
     "record_bytes(n) -> bytes a record with n payload bytes occupies."},
    {"layout", mod_layout, METH_NOARGS, "layout() -> header field offsets and sizes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT, "_ring",
    "C core of dpmigrate's shared-memory ring: layout, atomics, futexes (see ring.h).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ring(void)
{
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&ViewsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ring_module);
    if (m == NULL)
        return NULL;
    RingCorrupt = PyErr_NewExceptionWithDoc(
        "dpmigrate.native._ring.RingCorrupt",
        "Shared memory of a ring does not follow the layout of ring.h.", NULL, NULL);
    if (RingCorrupt == NULL || PyModule_AddObjectRef(m, "RingCorrupt", RingCorrupt) < 0 ||
        PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObjectRef(m, "Views", (PyObject *)&ViewsType) < 0 ||
        PyModule_AddIntConstant(m, "ABI_VERSION", DPM_RING_ABI_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "MAGIC", (long long)DPM_RING_MAGIC) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_BYTES", DPM_RING_HEADER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MIN_DATA_BYTES", DPM_RING_MIN_DATA) < 0 ||
        PyModule_AddIntConstant(m, "HUGE_PAGE_BYTES", DPM_RING_HUGE_PAGE) < 0 ||
        PyModule_AddIntConstant(m, "SPIN_MAX_NS", DPM_SPIN_MAX_NS) < 0 ||
        PyModule_AddIntConstant(m, "RECORD_HEADER_BYTES", sizeof(struct dpm_record)) < 0 ||
        PyModule_AddIntConstant(m, "PRODUCER_CLOSED", DPM_RING_PRODUCER_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "CONSUMER_CLOSED", DPM_RING_CONSUMER_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "OK", DPM_OK) < 0 ||
        PyModule_AddIntConstant(m, "CORRUPT", DPM_CORRUPT) < 0 ||
        PyModule_AddIntConstant(m, "GAP", DPM_GAP) < 0 ||
        PyModule_AddIntConstant(m, "AHEAD", DPM_AHEAD) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
