/*
 * _frames.c - the tcp ring consumer's hot loop: cut consecutive DATA frames out of its
 * receive buffer (wire format: dpmigrate/transports/frames.py).
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define HEADER_SIZE 16 /* u32 magic+version+type, u64 seq, u32 length; big-endian */
#define STOP_LIMIT 1
#define STOP_GAP 2

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

static PyMethodDef module_methods[] = {
    {"cut_data", cut_data, METH_VARARGS,
     "cut_data(buf, src, pos, end, cursor, max_n, limit, data_word, out) -> "
     "(pos, cursor, dups, nbytes, stop, seq): cut consecutive DATA frames (see the module)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef frames_module = {
    PyModuleDef_HEAD_INIT, "_frames", "The tcp ring consumer's frame cutter (see frames.py).",
    -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__frames(void)
{
    PyObject *m = PyModule_Create(&frames_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "STOP_LIMIT", STOP_LIMIT) < 0 ||
        PyModule_AddIntConstant(m, "STOP_GAP", STOP_GAP) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
