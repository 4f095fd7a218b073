/*
 * _frames.c - the tcp ring's two hot loops: the consumer's, which cuts consecutive DATA
 * frames out of its receive buffer, and the producer's, which writes them (wire format:
 * dpmigrate/transports/frames.py).
 *
 * In Python the loop cost about a microsecond per frame (a struct unpack, three
 * comparisons, a slice and an append), which made the consumer, not the kernel, the limit
 * of a tcp ring moving 4 KiB messages. Here it is the same loop with the same decisions;
 * everything that is not the common case (a header that is not DATA, a payload above the
 * limit, a gap) only stops the loop and is reported back, so the wording of every error
 * stays in frames.py.
 *
 *   cut_data(buf, src, pos, end, cursor, max_n, limit, data_word, out)
 *       -> (pos, cursor, dups, nbytes, stop, seq)
 *
 * buf: the receive buffer (any contiguous buffer; headers are read from it).
 * src: None to append each payload as a new bytes object, or a memoryview of buf to append
 *      a slice of it per payload (zero-copy; the caller owns their expiry).
 * pos..end: the unparsed bytes; cursor: the seq expected next; at most max_n payloads are
 * appended to the list `out`. Frames with seq < cursor are duplicates: skipped and counted.
 * stop says why the loop ended: 0 for an incomplete frame, a non-DATA header, or max_n;
 * STOP_LIMIT for a DATA header announcing more than `limit` bytes (pos is at it);
 * STOP_GAP for a DATA frame whose seq (returned) is above cursor (pos is at it).
 *
 *   send_data(fd, seq, payloads, data_word) -> bytes written
 *
 * The tcp ring producer's common case: DATA frames for a list of at most SEND_MAX bytes
 * objects (seq, seq+1, ...) written with one sendmsg (MSG_DONTWAIT | MSG_NOSIGNAL), the
 * headers packed on the stack and gathered with the payloads by the kernel. In Python the
 * same cost a struct pack, two appends and a list per message and then sendmsg's own walk
 * over the list. It writes what the socket takes now and says how much; the caller queues
 * the rest. OSError as from socket.sendmsg (BlockingIOError when it takes nothing).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define HEADER_SIZE 16 /* u32 magic+version+type, u64 seq, u32 length; big-endian */
#define STOP_LIMIT 1
#define STOP_GAP 2
#define SEND_MAX 256 /* frames per send_data call: 512 iovecs, half of Linux's IOV_MAX */

static uint32_t be32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return __builtin_bswap32(v);
}

static uint64_t be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return __builtin_bswap64(v);
}

static PyObject *cut_data(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer view;
    PyObject *src, *out;
    Py_ssize_t pos, end, max_n;
    unsigned long long cursor, limit;
    unsigned int data_word;
    if (!PyArg_ParseTuple(args, "y*OnnKnKIO!", &view, &src, &pos, &end, &cursor, &max_n, &limit,
                          &data_word, &PyList_Type, &out))
        return NULL;
    if (pos < 0 || end < pos || end > view.len || max_n < 0) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "cut_data: bad range %zd..%zd of %zd bytes", pos,
                            end, view.len);
    }
    int views = src != Py_None;
    Py_ssize_t before = PyList_GET_SIZE(out);
    const uint8_t *base = view.buf;
    unsigned long long dups = 0, nbytes = 0, seq = 0;
    Py_ssize_t taken = 0;
    int stop = 0;
    while (end - pos >= HEADER_SIZE && taken < max_n) {
        const uint8_t *h = base + pos;
        if (be32(h) != data_word)
            break;
        seq = be64(h + 4);
        uint32_t length = be32(h + 12);
        if (length > limit) {
            stop = STOP_LIMIT;
            break;
        }
        Py_ssize_t body = pos + HEADER_SIZE, next = body + (Py_ssize_t)length;
        if (next > end)
            break;
        if (seq == cursor) {
            PyObject *item = views ? PySequence_GetSlice(src, body, next)
                                   : PyBytes_FromStringAndSize((const char *)base + body, length);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                PyBuffer_Release(&view);
                /* as if nothing was cut: the caller's pos is unchanged, so out must be too */
                PyList_SetSlice(out, before, PY_SSIZE_T_MAX, NULL);
                return NULL;
            }
            Py_DECREF(item);
            nbytes += length;
            cursor++;
            taken++;
        } else if (seq < cursor) {
            dups++;
        } else {
            stop = STOP_GAP;
            break;
        }
        pos = next;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nKKKiK", pos, cursor, dups, nbytes, stop, seq);
}

static void put_be32(uint8_t *p, uint32_t v)
{
    v = __builtin_bswap32(v);
    memcpy(p, &v, sizeof(v));
}

static void put_be64(uint8_t *p, uint64_t v)
{
    v = __builtin_bswap64(v);
    memcpy(p, &v, sizeof(v));
}

static PyObject *send_data(PyObject *Py_UNUSED(m), PyObject *args)
{
    int fd;
    unsigned long long seq;
    PyObject *payloads;
    unsigned int data_word;
    if (!PyArg_ParseTuple(args, "iKO!I", &fd, &seq, &PyList_Type, &payloads, &data_word))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(payloads);
    if (n > SEND_MAX)
        return PyErr_Format(PyExc_ValueError, "send_data: %zd payloads, at most %d per call", n,
                            SEND_MAX);
    uint8_t headers[SEND_MAX][HEADER_SIZE];
    struct iovec iov[2 * SEND_MAX];
    PyObject *held[SEND_MAX];
    int niov = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_CheckExact(item) || PyBytes_GET_SIZE(item) > UINT32_MAX)
            return PyErr_Format(PyExc_TypeError, "send_data: payload %zd is not bytes", i);
        Py_ssize_t len = PyBytes_GET_SIZE(item);
        put_be32(headers[i], data_word);
        put_be64(headers[i] + 4, seq + (unsigned long long)i);
        put_be32(headers[i] + 12, (uint32_t)len);
        iov[niov].iov_base = headers[i];
        iov[niov++].iov_len = HEADER_SIZE;
        if (len > 0) {
            iov[niov].iov_base = PyBytes_AS_STRING(item);
            iov[niov++].iov_len = (size_t)len;
        }
    }
    /* The list may change while the GIL is released: hold the payloads themselves. */
    for (Py_ssize_t i = 0; i < n; i++)
        held[i] = Py_NewRef(PyList_GET_ITEM(payloads, i));
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
    ssize_t sent;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    sent = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(held[i]);
    if (sent < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef module_methods[] = {
    {"send_data", send_data, METH_VARARGS,
     "send_data(fd, seq, payloads, data_word) -> bytes written: DATA frames for a list of "
     "bytes in one sendmsg (see the module)."},
    {"cut_data", cut_data, METH_VARARGS,
     "cut_data(buf, src, pos, end, cursor, max_n, limit, data_word, out) -> "
     "(pos, cursor, dups, nbytes, stop, seq): cut consecutive DATA frames (see the module)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef frames_module = {
    PyModuleDef_HEAD_INIT, "_frames", "The tcp ring's frame cutter and DATA writer (see frames.py).",
    -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__frames(void)
{
    PyObject *m = PyModule_Create(&frames_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "STOP_LIMIT", STOP_LIMIT) < 0 ||
        PyModule_AddIntConstant(m, "STOP_GAP", STOP_GAP) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SEND_MAX", SEND_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
