/* Fused loops for the streamed magnitude-cut methods (TIES): the statistics passes' histogram of
 * delta magnitudes and the output chunk, each in one pass over a chunk instead of one torch op
 * (and one temporary) per step. weightmix/kernels.py calls them; weightmix/methods/sparsify.py
 * and selection.py hold the torch code they must equal bit for bit (tests/test_kernels.py).
 *
 * Every float step is a single IEEE operation in float32, in the order of the torch code, with
 * torch's conventions: relu(x) = x < 0 ? 0 : x (so relu(-0) = -0, relu(NaN) = NaN) and
 * sign(x) = (0 < x) - (x < 0) (sign(NaN) = 0). Built with -ffp-contract=off: no fused
 * multiply-add. Inputs are float32, float16 or bfloat16 (widened exactly); addresses come as
 * integers from torch's data_ptr(); the GIL is released while a loop runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define WM_X86 1
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };
enum { BLOCK = 1024, MAX_MODELS = 16 };

#if defined(WM_X86) && defined(__GNUC__) && !defined(__clang__)
#define WM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define WM_CLONES
#endif

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t rest = h & 0x7fffu;
    union { uint32_t u; float f; } o;
    if (rest >= 0x7c00u) {          /* inf, NaN: payload kept */
        o.u = sign | 0x7f800000u | ((rest & 0x3ffu) << 13);
    } else if (rest >= 0x0400u) {   /* normal: rebias the exponent by 127 - 15 */
        o.u = sign | ((rest + (112u << 10)) << 13);
    } else {                        /* zero, subnormal: rest * 2^-24 is exact */
        o.f = (float)rest * 0x1p-24f;
        o.u |= sign;
    }
    return o.f;
}

static void widen_half_plain(float *out, const uint16_t *in, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) out[i] = half_to_float(in[i]);
}

#ifdef WM_X86
__attribute__((target("avx,f16c")))
static void widen_half_f16c(float *out, const uint16_t *in, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(in + i));
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) out[i] = half_to_float(in[i]);
}
static int has_f16c = -1;
#endif

/* n elements of `in` (code F32, F16 or BF16) as float32 into `out` */
static void widen(float *out, const void *in, int code, Py_ssize_t n) {
    if (code == F32) {
        memcpy(out, in, (size_t)n * sizeof(float));
    } else if (code == BF16) {
        const uint16_t *h = (const uint16_t *)in;
        uint32_t *o = (uint32_t *)out;
        for (Py_ssize_t i = 0; i < n; i++) o[i] = (uint32_t)h[i] << 16;
    } else {
#ifdef WM_X86
        if (has_f16c) {
            widen_half_f16c(out, (const uint16_t *)in, n);
            return;
        }
#endif
        widen_half_plain(out, (const uint16_t *)in, n);
    }
}

static const void *offset(const void *base, int code, Py_ssize_t i) {
    return (const char *)base + i * (code == F32 ? 4 : 2);
}

static inline float relu(float x) { return x < 0.0f ? 0.0f : x; }
static inline float sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
/* sign(relu(x)): 1 where x > 0, else +0 (NaN included) */
static inline float positive(float x) { return x > 0.0f ? 1.0f : 0.0f; }

static inline uint32_t bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

/* a magnitude's bits with every NaN as the one quiet NaN (as StreamedTopK._bits) */
static inline uint32_t quiet(uint32_t u) { return u > 0x7f800000u ? 0x7fc00000u : u; }

/* histogram(base, base_code, model, model_code, n, stage, prefix, counts):
 * the radix-select counts of |model - base| (float32 bit patterns) over n elements, added to
 * the int64 array at `counts` (65,536 bins): stage 0 counts the top 16 bits (the sign bit is 0:
 * bins from 32,768 on stay empty), stage 1 the low 16 bits of the elements whose top 16 bits
 * equal `prefix`. */
WM_CLONES static PyObject *histogram(PyObject *self, PyObject *args) {
    unsigned long long base_at, model_at, counts_at;
    int base_code, model_code, stage;
    Py_ssize_t n;
    unsigned int prefix;
    if (!PyArg_ParseTuple(args, "KiKinIIK", &base_at, &base_code, &model_at, &model_code, &n,
                          &stage, &prefix, &counts_at))
        return NULL;
    if (base_code < F32 || base_code > BF16 || model_code < F32 || model_code > BF16 ||
        stage < 0 || stage > 1) {
        PyErr_SetString(PyExc_ValueError, "histogram: dtype codes are 0-2, stages 0-1");
        return NULL;
    }
    const void *base = (const void *)(uintptr_t)base_at;
    const void *model = (const void *)(uintptr_t)model_at;
    int64_t *counts = (int64_t *)(uintptr_t)counts_at;
    Py_BEGIN_ALLOW_THREADS
    float b[BLOCK], m[BLOCK];
    for (Py_ssize_t first = 0; first < n; first += BLOCK) {
        Py_ssize_t count = n - first < BLOCK ? n - first : BLOCK;
        widen(b, offset(base, base_code, first), base_code, count);
        widen(m, offset(model, model_code, first), model_code, count);
        for (Py_ssize_t i = 0; i < count; i++) {
            m[i] = fabsf(m[i] - b[i]); /* clears the sign bit, as torch's abs */
        }
        if (stage == 0) {
            for (Py_ssize_t i = 0; i < count; i++) counts[quiet(bits_of(m[i])) >> 16]++;
        } else {
            for (Py_ssize_t i = 0; i < count; i++) {
                uint32_t u = quiet(bits_of(m[i]));
                if ((u >> 16) == prefix) counts[u & 0xffffu]++;
            }
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int read_addresses(PyObject *list, unsigned long long *into, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        into[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(list, i));
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

/* ties(out, base, base_code, n, models, codes, cuts, modes, remainders, weights,
 *      consensus_count, normalize, lambda) -> elements taken at each cut:
 * the TIES output of one chunk into float32 `out`, as MagnitudeCutStreamer.apply computes it:
 * for each model m, d = M_m - base, t_m = d * keep_m where keep_m (mode 0: 1; mode 1:
 * sign(relu(|d| - cut)); mode 2: 1 - sign(relu(cut - |d|)); mode 3: mode 1's, and 1 for the
 * first `remainder` elements with |d| = cut, in index order), times its weight unless the
 * weight is None; the sign s elected by the sum (or, with consensus_count, by the sum of the signs);
 * a_m = relu(t_m * s) with NaN read as 0; total = sum of a_m * s; with normalize, divided by
 * D + (1 - |sign(D)|), D = sum of sign(a_m) * w_m; out = base + total (lambda = 1) or base +
 * total * lambda. Sums run in model order. models, codes, cuts, modes, weights: lists. */
WM_CLONES static PyObject *ties(PyObject *self, PyObject *args) {
    unsigned long long out_at, base_at;
    int base_code, consensus_count, normalize;
    Py_ssize_t n;
    PyObject *models, *codes, *cuts, *modes, *weights;
    double lambda;
    PyObject *remainders;
    if (!PyArg_ParseTuple(args, "KKinO!O!O!O!O!O!ppd", &out_at, &base_at, &base_code, &n,
                          &PyList_Type, &models, &PyList_Type, &codes, &PyList_Type, &cuts,
                          &PyList_Type, &modes, &PyList_Type, &remainders, &PyList_Type,
                          &weights, &consensus_count, &normalize, &lambda))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(models);
    if (count < 1 || count > MAX_MODELS || PyList_GET_SIZE(codes) != count ||
        PyList_GET_SIZE(cuts) != count || PyList_GET_SIZE(modes) != count ||
        PyList_GET_SIZE(remainders) != count || PyList_GET_SIZE(weights) != count) {
        PyErr_SetString(PyExc_ValueError,
                        "ties: 1 to 16 models, one code, cut, mode, remainder, weight each");
        return NULL;
    }
    unsigned long long model_at[MAX_MODELS];
    int code[MAX_MODELS], mode[MAX_MODELS], weighted[MAX_MODELS];
    long long remaining[MAX_MODELS], taken[MAX_MODELS];
    float cut[MAX_MODELS], weight[MAX_MODELS];
    if (read_addresses(models, model_at, count) < 0) return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        code[k] = (int)PyLong_AsLong(PyList_GET_ITEM(codes, k));
        if (PyErr_Occurred()) return NULL;
        mode[k] = (int)PyLong_AsLong(PyList_GET_ITEM(modes, k));
        remaining[k] = PyLong_AsLongLong(PyList_GET_ITEM(remainders, k));
        taken[k] = 0;
        cut[k] = (float)PyFloat_AsDouble(PyList_GET_ITEM(cuts, k));
        PyObject *w = PyList_GET_ITEM(weights, k);
        weighted[k] = w != Py_None;
        weight[k] = weighted[k] ? (float)PyFloat_AsDouble(w) : 1.0f;
        if (PyErr_Occurred()) return NULL;
        if (code[k] < F32 || code[k] > BF16 || mode[k] < 0 || mode[k] > 3) {
            PyErr_SetString(PyExc_ValueError, "ties: dtype codes are 0-2, modes 0-3");
            return NULL;
        }
    }
    if (base_code < F32 || base_code > BF16) {
        PyErr_SetString(PyExc_ValueError, "ties: dtype codes are 0-2");
        return NULL;
    }
    float *out = (float *)(uintptr_t)out_at;
    const void *base = (const void *)(uintptr_t)base_at;
    float lam = (float)lambda;
    float (*t)[BLOCK] = PyMem_RawMalloc(sizeof(float[BLOCK]) * (size_t)count);
    if (t == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    float b[BLOCK], total[BLOCK], elected[BLOCK], divisor[BLOCK], delta[BLOCK];
    for (Py_ssize_t first = 0; first < n; first += BLOCK) {
        Py_ssize_t size = n - first < BLOCK ? n - first : BLOCK;
        widen(b, offset(base, base_code, first), base_code, size);
        for (Py_ssize_t k = 0; k < count; k++) {
            float *tk = t[k];
            widen(tk, offset((const void *)(uintptr_t)model_at[k], code[k], first), code[k], size);
            float c = cut[k];
            if (mode[k] == 1 || (mode[k] == 3 && remaining[k] == 0)) {
                for (Py_ssize_t i = 0; i < size; i++) {
                    float d = tk[i] - b[i];
                    tk[i] = d * positive(fabsf(d) - c);
                }
            } else if (mode[k] == 3) { /* above the cut, and the first `remaining` at it */
                for (Py_ssize_t i = 0; i < size; i++) delta[i] = tk[i] - b[i];
                for (Py_ssize_t i = 0; i < size; i++)
                    tk[i] = delta[i] * positive(fabsf(delta[i]) - c);
                for (Py_ssize_t i = 0; i < size && remaining[k] > 0; i++) {
                    if (fabsf(delta[i]) == c) {
                        tk[i] = delta[i] * 1.0f;
                        remaining[k]--;
                        taken[k]++;
                    }
                }
            } else if (mode[k] == 2) {
                for (Py_ssize_t i = 0; i < size; i++) {
                    float d = tk[i] - b[i];
                    tk[i] = d * (1.0f - positive(c - fabsf(d)));
                }
            } else {
                for (Py_ssize_t i = 0; i < size; i++) tk[i] = tk[i] - b[i];
            }
            if (weighted[k]) {
                float w = weight[k];
                for (Py_ssize_t i = 0; i < size; i++) tk[i] = tk[i] * w;
            }
        }
        if (consensus_count) {
            for (Py_ssize_t i = 0; i < size; i++) total[i] = sign(t[0][i]);
            for (Py_ssize_t k = 1; k < count; k++)
                for (Py_ssize_t i = 0; i < size; i++) total[i] = total[i] + sign(t[k][i]);
        } else {
            for (Py_ssize_t i = 0; i < size; i++) total[i] = t[0][i];
            for (Py_ssize_t k = 1; k < count; k++)
                for (Py_ssize_t i = 0; i < size; i++) total[i] = total[i] + t[k][i];
        }
        for (Py_ssize_t i = 0; i < size; i++) elected[i] = sign(total[i]);
        for (Py_ssize_t k = 0; k < count; k++) {
            float *tk = t[k];
            for (Py_ssize_t i = 0; i < size; i++) {
                float a = relu(tk[i] * elected[i]);
                tk[i] = a != a ? 0.0f : a; /* NaN agrees with nothing */
            }
        }
        for (Py_ssize_t i = 0; i < size; i++) total[i] = t[0][i] * elected[i];
        for (Py_ssize_t k = 1; k < count; k++)
            for (Py_ssize_t i = 0; i < size; i++) total[i] = total[i] + t[k][i] * elected[i];
        if (normalize) {
            for (Py_ssize_t i = 0; i < size; i++) divisor[i] = sign(t[0][i]) * weight[0];
            for (Py_ssize_t k = 1; k < count; k++) {
                float w = weight[k];
                for (Py_ssize_t i = 0; i < size; i++)
                    divisor[i] = divisor[i] + sign(t[k][i]) * w;
            }
            for (Py_ssize_t i = 0; i < size; i++) {
                float s = sign(divisor[i]);
                float d = divisor[i] + (1.0f - fabsf(s));
                total[i] = total[i] / d;
            }
        }
        float *o = out + first;
        if (lam == 1.0f && lambda == 1.0) {
            for (Py_ssize_t i = 0; i < size; i++) o[i] = b[i] + total[i];
        } else {
            for (Py_ssize_t i = 0; i < size; i++) o[i] = b[i] + total[i] * lam;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(t);
    PyObject *counts = PyList_New(count);
    if (counts == NULL) return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *number = PyLong_FromLongLong(taken[k]);
        if (number == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyList_SET_ITEM(counts, k, number);
    }
    return counts;
}

/* widen(out, in, code, n): n elements as float32 (for tests of the exact conversion) */
static PyObject *widen_py(PyObject *self, PyObject *args) {
    unsigned long long out_at, in_at;
    int code;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKin", &out_at, &in_at, &code, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    widen((float *)(uintptr_t)out_at, (const void *)(uintptr_t)in_at, code, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"histogram", histogram, METH_VARARGS, "Radix-select counts of |model - base| bits."},
    {"ties", ties, METH_VARARGS, "The TIES output of one chunk."},
    {"widen", widen_py, METH_VARARGS, "float16/bfloat16/float32 to float32."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#ifdef WM_X86
    __builtin_cpu_init();
    has_f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#endif
    return PyModule_Create(&module);
}
