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

/* dtype codes; the float8 types are widened and rounded into (widen, cast, blend; ties'
 * output), never taken by the other loops */
enum { F32 = 0, F16 = 1, BF16 = 2, F8E4M3 = 3, F8E5M2 = 4 };
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
static int has_f16c = -1, has_avx2 = 0;
#endif

/* every float8 value as float32 (exact), by code - F8E4M3; filled at import */
static float float8_values[2][256];

/* the float32 value of float8 bits: `mantissa` bits of fraction, exponent bias `bias`;
 * e4m3fn (`finite`) has no inf and one NaN per sign (all exponent and fraction bits set),
 * e5m2 has IEEE inf and NaN */
static float float8_value(unsigned bits, int mantissa, int bias, int finite) {
    int exponent = (int)(bits & 0x7fu) >> mantissa;
    unsigned fraction = bits & ((1u << mantissa) - 1u);
    int top = (1 << (7 - mantissa)) - 1;
    float value;
    if (exponent == top && (!finite || fraction == (1u << mantissa) - 1u))
        value = finite || fraction ? NAN : INFINITY;
    else if (exponent == 0) /* zero and subnormals: fraction · 2^(1 − bias − mantissa) */
        value = ldexpf((float)fraction, 1 - bias - mantissa);
    else
        value = ldexpf((float)(fraction | (1u << mantissa)), exponent - bias - mantissa);
    return bits & 0x80u ? -value : value;
}

static void fill_float8_values(void) {
    for (unsigned bits = 0; bits < 256; bits++) {
        float8_values[0][bits] = float8_value(bits, 3, 7, 1);
        float8_values[1][bits] = float8_value(bits, 2, 15, 0);
    }
}

#ifdef WM_X86
/* float8 to float32 8 at a time through float16 (F16C): e5m2 is the top byte of a float16;
 * e4m3fn's magnitude bits shifted into a float16 are its value / 256 for normal and
 * subnormal values alike (exponent bias 15 against 7), so × 256 restores it exactly; its
 * NaN (magnitude bits all set) is set apart, the sign put back. The rest by the table. */
__attribute__((target("avx2,f16c")))
static Py_ssize_t widen_float8_f16c(float *out, const uint8_t *in, Py_ssize_t n, int code) {
    const __m128i magnitude_mask = _mm_set1_epi16(0x7f), sign_mask = _mm_set1_epi16(0x80);
    const __m256i all_set = _mm256_set1_epi32(0x7f), nan = _mm256_set1_epi32(0x7fc00000);
    const __m256 scale = _mm256_set1_ps(256.0f);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(in + i)));
        if (code == F8E5M2) {
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_slli_epi16(bytes, 8)));
            continue;
        }
        __m128i magnitude = _mm_and_si128(bytes, magnitude_mask);
        __m256 value = _mm256_mul_ps(_mm256_cvtph_ps(_mm_slli_epi16(magnitude, 7)), scale);
        __m256i is_nan = _mm256_cmpeq_epi32(_mm256_cvtepu16_epi32(magnitude), all_set);
        __m256i bits = _mm256_blendv_epi8(_mm256_castps_si256(value), nan, is_nan);
        __m256i sign = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_and_si128(bytes, sign_mask)),
                                         24);
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_or_si256(bits, sign));
    }
    return i;
}
#endif

#ifdef WM_X86
/* bfloat16 to float32 (the bits shifted up) 8 at a time; returns how many it did */
__attribute__((target("avx2")))
static Py_ssize_t widen_bfloat_avx2(uint32_t *out, const uint16_t *in, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(in + i)));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_slli_epi32(wide, 16));
    }
    return i;
}
#endif

/* n elements of `in` (any dtype code) as float32 into `out` */
static void widen(float *out, const void *in, int code, Py_ssize_t n) {
    if (code == F8E4M3 || code == F8E5M2) {
        const float *table = float8_values[code - F8E4M3];
        const uint8_t *b = (const uint8_t *)in;
        Py_ssize_t i = 0;
#ifdef WM_X86
        if (has_f16c && has_avx2) i = widen_float8_f16c(out, b, n, code);
#endif
        for (; i < n; i++) out[i] = table[b[i]];
    } else if (code == F32) {
        memcpy(out, in, (size_t)n * sizeof(float));
    } else if (code == BF16) {
        const uint16_t *h = (const uint16_t *)in;
        uint32_t *o = (uint32_t *)out;
        Py_ssize_t i = 0;
#ifdef WM_X86
        if (has_avx2) i = widen_bfloat_avx2(o, h, n);
#endif
        for (; i < n; i++) o[i] = (uint32_t)h[i] << 16;
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

static Py_ssize_t itemsize(int code) { return code == F32 ? 4 : code >= F8E4M3 ? 1 : 2; }

static const void *offset(const void *base, int code, Py_ssize_t i) {
    return (const char *)base + i * itemsize(code);
}

/* n float32 results rounded into `out` (any dtype code), defined below with the casts */
static Py_ssize_t narrow(void *out, int code, const float *in, Py_ssize_t n);

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

#ifdef WM_X86
/* the float32 bits of |m - b| for 8 float16 pairs, every NaN as 0x7FC00000 (the same IEEE
 * operations as magnitude_bits' scalar loop) */
__attribute__((target("avx2,f16c")))
static inline __m256i magnitude8(const uint16_t *b, const uint16_t *m) {
    const __m256 signless = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i inf = _mm256_set1_epi32(0x7f800000), nan = _mm256_set1_epi32(0x7fc00000);
    __m256 vb = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
    __m256 vm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)m));
    __m256i bits = _mm256_castps_si256(_mm256_and_ps(_mm256_sub_ps(vm, vb), signless));
    return _mm256_blendv_epi8(bits, nan, _mm256_cmpgt_epi32(bits, inf));
}

/* magnitude_bits for two float16 vectors, 8 elements a step */
__attribute__((target("avx2,f16c")))
static void magnitude_bits_f16(uint32_t *u, const uint16_t *b, const uint16_t *m, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_si256((__m256i *)(u + i), magnitude8(b + i, m + i));
    for (; i < n; i++) u[i] = quiet(bits_of(fabsf(half_to_float(m[i]) - half_to_float(b[i]))));
}

/* the radix stage 1 counts of two float16 vectors: the low 16 bits of the magnitudes whose
 * top 16 bits are `prefix`, found 8 at a time */
__attribute__((target("avx2,f16c")))
static void low_counts_f16(int64_t *counts, const uint16_t *b, const uint16_t *m, Py_ssize_t n,
                           uint32_t prefix) {
    const __m256i top = _mm256_set1_epi32((int)prefix);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i bits = magnitude8(b + i, m + i);
        __m256i hit = _mm256_cmpeq_epi32(_mm256_srli_epi32(bits, 16), top);
        int mask = _mm256_movemask_ps(_mm256_castsi256_ps(hit));
        if (mask) {
            uint32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, bits);
            for (int l = 0; l < 8; l++)
                if (mask & (1 << l)) counts[lanes[l] & 0xffffu]++;
        }
    }
    for (; i < n; i++) {
        uint32_t u = quiet(bits_of(fabsf(half_to_float(m[i]) - half_to_float(b[i]))));
        if ((u >> 16) == prefix) counts[u & 0xffffu]++;
    }
}
#endif

/* counts[u >> 16]++ for n patterns of magnitudes (so u >> 16 < 2^15), every other one
 * counted in the upper half of counts instead (empty: the sign bit is 0), so that
 * neighbours in one bin wait on two chains of increments rather than one; fold_top() then
 * adds the upper half into the lower */
static void count_top(int64_t *counts, const uint32_t *u, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 2 <= n; i += 2) {
        counts[u[i] >> 16]++;
        counts[(u[i + 1] >> 16) | 0x8000u]++;
    }
    if (i < n) counts[u[i] >> 16]++;
}

static void fold_top(int64_t *counts) {
    for (Py_ssize_t b = 0; b < 0x8000; b++) {
        counts[b] += counts[b + 0x8000];
        counts[b + 0x8000] = 0;
    }
}

/* u[i] = the float32 bits of |model[i] - base[i]| (each widened to float32), every NaN as
 * the quiet NaN 0x7FC00000 (as StreamedTopK._bits); n <= BLOCK */
static void magnitude_bits(uint32_t *u, const void *base, int base_code, const void *model,
                           int model_code, Py_ssize_t n) {
#ifdef WM_X86
    if (has_avx2 && has_f16c && base_code == F16 && model_code == F16) {
        magnitude_bits_f16(u, (const uint16_t *)base, (const uint16_t *)model, n);
        return;
    }
#endif
    float b[BLOCK], m[BLOCK];
    widen(b, base, base_code, n);
    widen(m, model, model_code, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        u[i] = quiet(bits_of(fabsf(m[i] - b[i]))); /* fabsf clears the sign bit, as torch's abs */
    }
}

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
    uint32_t u[BLOCK];
    uint8_t match[BLOCK];
#ifdef WM_X86
    if (stage == 1 && has_avx2 && has_f16c && base_code == F16 && model_code == F16) {
        low_counts_f16(counts, (const uint16_t *)base, (const uint16_t *)model, n, prefix);
        n = 0;
    }
#endif
    for (Py_ssize_t first = 0; first < n; first += BLOCK) {
        Py_ssize_t count = n - first < BLOCK ? n - first : BLOCK;
        magnitude_bits(u, offset(base, base_code, first), base_code,
                       offset(model, model_code, first), model_code, count);
        if (stage == 0) {
            count_top(counts, u, count);
        } else { /* few elements match: find them 8 at a time after a vectorised pass */
            for (Py_ssize_t i = 0; i < count; i++) match[i] = (u[i] >> 16) == prefix;
            Py_ssize_t i = 0;
            for (; i + 8 <= count; i += 8) {
                uint64_t word;
                memcpy(&word, match + i, sizeof word);
                if (word == 0) continue;
                for (Py_ssize_t j = i; j < i + 8; j++)
                    if (match[j]) counts[u[j] & 0xffffu]++;
            }
            for (; i < count; i++)
                if (match[i]) counts[u[i] & 0xffffu]++;
        }
    }
    if (stage == 0) fold_top(counts);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* for each 8-bit mask, the indices of its set bits in order, 4 bits each (filled at import):
 * the permutation that moves the chosen lanes of a vector to its front */
static uint32_t packing[256];

static void fill_packing(void) {
    for (unsigned mask = 0; mask < 256; mask++) {
        uint32_t order = 0;
        int at = 0;
        for (unsigned lane = 0; lane < 8; lane++)
            if (mask & (1u << lane)) order |= lane << (4 * at++);
        packing[mask] = order;
    }
}

#ifdef WM_X86
/* collect()'s window test 8 patterns at a time (the top 16 bits of a magnitude's pattern are
 * below 2^15, so signed compares serve); the few inside written one by one while there is
 * room, every one counted in *hits. Returns how many patterns it looked at. */
__attribute__((target("avx2")))
static Py_ssize_t keep_window_avx2(uint32_t *into, Py_ssize_t *hits, Py_ssize_t *above,
                                   Py_ssize_t room, const uint32_t *u, Py_ssize_t n,
                                   unsigned low, unsigned high) {
    const __m256i first = _mm256_set1_epi32((int)low), last = _mm256_set1_epi32((int)high);
    const __m256i nibble = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i seven = _mm256_set1_epi32(7);
    Py_ssize_t i = 0, found = *hits, higher = *above;
    for (; i + 8 <= n; i += 8) {
        __m256i bits = _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(u + i)), 16);
        __m256i over = _mm256_cmpgt_epi32(bits, last);
        __m256i outside = _mm256_or_si256(over, _mm256_cmpgt_epi32(first, bits));
        higher += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(over)));
        unsigned mask = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(outside)) & 0xffu;
        if (found + 8 <= room) { /* the lanes inside moved to the front, all 8 stored */
            __m256i lanes = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32((int)packing[mask]), nibble), seven);
            __m256i packed = _mm256_permutevar8x32_epi32(
                _mm256_loadu_si256((const __m256i *)(u + i)), lanes);
            _mm256_storeu_si256((__m256i *)(into + found), packed);
            found += __builtin_popcount(mask);
            continue;
        }
        while (mask) {
            int lane = __builtin_ctz(mask);
            if (found < room) into[found] = u[i + lane];
            found++;
            mask &= mask - 1;
        }
    }
    *hits = found;
    *above = higher;
    return i;
}
#endif

/* collect(base, base_code, model, model_code, n, counts, low, high, into, room)
 *   -> (hits, above):
 * the bit patterns of |model - base| (as histogram() makes them) whose top 16 bits lie in
 * [low, high], written in index order to the uint32 array `into` (at most `room` of them,
 * room >= 1), with stage 0's counts of all n added to `counts` unless it is 0. Returns how
 * many lay in the window (all of them are written when that is less than room, else the
 * last slot holds an arbitrary element) and how many lay above it. A radix select whose
 * cut's top bits fall in the window takes its second stage from these instead of a second
 * pass over the data. */
WM_CLONES static PyObject *collect(PyObject *self, PyObject *args) {
    unsigned long long base_at, model_at, counts_at, into_at;
    int base_code, model_code;
    Py_ssize_t n, room;
    unsigned int low, high;
    if (!PyArg_ParseTuple(args, "KiKinKIIKn", &base_at, &base_code, &model_at, &model_code,
                          &n, &counts_at, &low, &high, &into_at, &room))
        return NULL;
    if (base_code < F32 || base_code > BF16 || model_code < F32 || model_code > BF16 ||
        room < 1 || low > high || high > 0xffffu) {
        PyErr_SetString(PyExc_ValueError,
                        "collect: dtype codes are 0-2, room at least 1, low <= high < 2^16");
        return NULL;
    }
    const void *base = (const void *)(uintptr_t)base_at;
    const void *model = (const void *)(uintptr_t)model_at;
    int64_t *counts = (int64_t *)(uintptr_t)counts_at;
    uint32_t *into = (uint32_t *)(uintptr_t)into_at;
    Py_ssize_t hits = 0, above = 0, last = room - 1;
    Py_BEGIN_ALLOW_THREADS
    uint32_t u[BLOCK];
    for (Py_ssize_t first = 0; first < n; first += BLOCK) {
        Py_ssize_t size = n - first < BLOCK ? n - first : BLOCK;
        magnitude_bits(u, offset(base, base_code, first), base_code,
                       offset(model, model_code, first), model_code, size);
        if (counts != NULL) count_top(counts, u, size);
        Py_ssize_t i = 0;
#ifdef WM_X86
        if (has_avx2) i = keep_window_avx2(into, &hits, &above, room, u, size, low, high);
#endif
        for (; i < size; i++) { /* written always, kept where it lies inside */
            into[hits < last ? hits : last] = u[i];
            hits += (u[i] >> 16) - low <= high - low;
            above += (u[i] >> 16) > high;
        }
    }
    if (counts != NULL) fold_top(counts);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("nn", hits, above);
}

static int read_addresses(PyObject *list, unsigned long long *into, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        into[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(list, i));
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

/* ties(out, out_code, base, base_code, n, models, codes, cuts, modes, remainders, weights,
 *      consensus_count, normalize, lambda) -> (elements taken at each cut, how many outputs
 *      are inf or NaN), or None for a float16 `out` on a machine without F16C:
 * the TIES output of one chunk rounded to nearest into `out` (any dtype code, as cast()
 * rounds it), as MagnitudeCutStreamer.apply computes it in float32:
 * for each model m, d = M_m - base, t_m = d * keep_m where keep_m (mode 0: 1; mode 1:
 * sign(relu(|d| - cut)); mode 2: 1 - sign(relu(cut - |d|)); mode 3: mode 1's, and 1 for the
 * first `remainder` elements with |d| = cut, in index order; mode 4, DARE's random drop:
 * (d * sign(relu(cut - u))) / cut, the cut being the density and u the model's uniform
 * numbers, float32 at its address in `uniforms`), times its weight unless the
 * weight is None; the sign s elected by the sum (or, with consensus_count, by the sum of the signs);
 * a_m = relu(t_m * s) with NaN read as 0; total = sum of a_m * s; with normalize, divided by
 * D + (1 - |sign(D)|), D = sum of sign(a_m) * w_m; out = base + total (lambda = 1) or base +
 * total * lambda. Sums run in model order. models, codes, cuts, modes, weights, uniforms
 * (an address per model, 0 where its mode is not 4): lists. None as well where a mode 4 model
 * drops to a delta that is not finite or keeps one too large to sum without overflow (the
 * torch code then chooses its elements otherwise: the caller runs it). */
WM_CLONES static PyObject *ties(PyObject *self, PyObject *args) {
    unsigned long long out_at, base_at;
    int out_code, base_code, consensus_count, normalize;
    Py_ssize_t n;
    PyObject *models, *codes, *cuts, *modes, *weights;
    double lambda;
    PyObject *remainders;
    PyObject *uniforms;
    if (!PyArg_ParseTuple(args, "KiKinO!O!O!O!O!O!ppdO!", &out_at, &out_code, &base_at,
                          &base_code, &n,
                          &PyList_Type, &models, &PyList_Type, &codes, &PyList_Type, &cuts,
                          &PyList_Type, &modes, &PyList_Type, &remainders, &PyList_Type,
                          &weights, &consensus_count, &normalize, &lambda, &PyList_Type,
                          &uniforms))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(models);
    if (count < 1 || count > MAX_MODELS || PyList_GET_SIZE(codes) != count ||
        PyList_GET_SIZE(cuts) != count || PyList_GET_SIZE(modes) != count ||
        PyList_GET_SIZE(remainders) != count || PyList_GET_SIZE(weights) != count ||
        PyList_GET_SIZE(uniforms) != count) {
        PyErr_SetString(PyExc_ValueError,
                        "ties: 1 to 16 models, one code, cut, mode, remainder, weight each");
        return NULL;
    }
    unsigned long long model_at[MAX_MODELS];
    int code[MAX_MODELS], mode[MAX_MODELS], weighted[MAX_MODELS];
    long long remaining[MAX_MODELS], taken[MAX_MODELS];
    float cut[MAX_MODELS], weight[MAX_MODELS];
    unsigned long long uniform_at[MAX_MODELS];
    if (read_addresses(models, model_at, count) < 0) return NULL;
    if (read_addresses(uniforms, uniform_at, count) < 0) return NULL;
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
        if (code[k] < F32 || code[k] > BF16 || mode[k] < 0 || mode[k] > 4 ||
            (mode[k] == 4 && uniform_at[k] == 0)) {
            PyErr_SetString(PyExc_ValueError, "ties: dtype codes 0-2, modes 0-4 (4: uniforms)");
            return NULL;
        }
    }
    if (base_code < F32 || base_code > BF16 || out_code < F32 || out_code > F8E5M2) {
        PyErr_SetString(PyExc_ValueError, "ties: dtype codes are 0-2 (out: 0-4)");
        return NULL;
    }
#ifdef WM_X86
    if (out_code == F16 && !(has_f16c && has_avx2)) Py_RETURN_NONE;
#else
    if (out_code == F16) Py_RETURN_NONE;
#endif
    char *out = (char *)(uintptr_t)out_at;
    Py_ssize_t nonfinite = 0;
    const void *base = (const void *)(uintptr_t)base_at;
    float lam = (float)lambda;
    float (*t)[BLOCK] = PyMem_RawMalloc(sizeof(float[BLOCK]) * (size_t)count);
    if (t == NULL) return PyErr_NoMemory();
    uint32_t largest = 0; /* mode 4: the bits of the largest kept magnitude (inf, NaN above) */
    Py_BEGIN_ALLOW_THREADS
    float b[BLOCK], total[BLOCK], elected[BLOCK], divisor[BLOCK], delta[BLOCK];
    uint8_t at_cut[BLOCK];
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
                /* the elements at the cut found by a vectorised pass, then 8 at a time */
                for (Py_ssize_t i = 0; i < size; i++) at_cut[i] = fabsf(delta[i]) == c;
                for (Py_ssize_t i = 0; i < size && remaining[k] > 0; i += 8) {
                    uint64_t word = 1; /* the last few elements: looked at one by one */
                    if (i + 8 <= size) memcpy(&word, at_cut + i, 8);
                    if (word == 0) continue;
                    Py_ssize_t end = size - i < 8 ? size : i + 8;
                    for (Py_ssize_t j = i; j < end && remaining[k] > 0; j++) {
                        if (at_cut[j]) {
                            tk[j] = delta[j] * 1.0f;
                            remaining[k]--;
                            taken[k]++;
                        }
                    }
                }
            } else if (mode[k] == 2) {
                for (Py_ssize_t i = 0; i < size; i++) {
                    float d = tk[i] - b[i];
                    tk[i] = d * (1.0f - positive(c - fabsf(d)));
                }
            } else if (mode[k] == 4) { /* kept where u < density, then rescaled */
                const float *u = (const float *)(uintptr_t)uniform_at[k] + first;
                uint32_t top = largest; /* magnitudes' bits order as they do (NaN last) */
                for (Py_ssize_t i = 0; i < size; i++) {
                    float kept = (tk[i] - b[i]) * positive(c - u[i]);
                    uint32_t magnitude = bits_of(kept) & 0x7fffffffu;
                    top = magnitude > top ? magnitude : top;
                    tk[i] = kept / c;
                }
                largest = top;
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
        if (lam == 1.0f && lambda == 1.0) {
            for (Py_ssize_t i = 0; i < size; i++) total[i] = b[i] + total[i];
        } else {
            for (Py_ssize_t i = 0; i < size; i++) total[i] = b[i] + total[i] * lam;
        }
        nonfinite += narrow(out + first * itemsize(out_code), out_code, total, size);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(t);
    /* the torch code sums the kept deltas to look for a non-finite one: with each finite and
     * below FLT_MAX / n, no order of that sum overflows, and it keeps d * keep as done here */
    if (largest > 0x7f7fffffu) Py_RETURN_NONE; /* inf or NaN */
    float top;
    memcpy(&top, &largest, sizeof top);
    if ((double)top * (double)n >= 3.0e38) Py_RETURN_NONE;
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
    return Py_BuildValue("(Nn)", counts, nonfinite);
}

enum { LANES = 8 };

/* acc[l] += x[e] * y[e] (in float64) for e = l, l + LANES, ... < n (n a multiple of LANES);
 * the partial sums stay in registers through the loop */
WM_CLONES static void dot_lanes(double *acc, const float *x, const float *y, Py_ssize_t n) {
    double a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    double a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
    for (Py_ssize_t e = 0; e < n; e += LANES) {
        a0 = a0 + (double)x[e] * (double)y[e];
        a1 = a1 + (double)x[e + 1] * (double)y[e + 1];
        a2 = a2 + (double)x[e + 2] * (double)y[e + 2];
        a3 = a3 + (double)x[e + 3] * (double)y[e + 3];
        a4 = a4 + (double)x[e + 4] * (double)y[e + 4];
        a5 = a5 + (double)x[e + 5] * (double)y[e + 5];
        a6 = a6 + (double)x[e + 6] * (double)y[e + 6];
        a7 = a7 + (double)x[e + 7] * (double)y[e + 7];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
    acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
}

#ifdef WM_X86
enum { PAIRED = 3 }; /* up to this many vectors, every pair's products in one loop */

/* dot_lanes() for every pair i <= j of N <= PAIRED vectors at once (row by row into sums):
 * each vector's 8 elements loaded and widened once, and 2 N (N + 1) / 2 independent sums in
 * flight where one pair has 2 (a float64 add waits for the previous one). The same lanes,
 * the same order, the same bits. */
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) void
dot_pairs_avx2(const int N, double (*sums)[LANES], float (*v)[BLOCK], Py_ssize_t n) {
    __m256d low[PAIRED * (PAIRED + 1) / 2], high[PAIRED * (PAIRED + 1) / 2];
    int pair = 0;
    for (int i = 0; i < N; i++)
        for (int j = i; j < N; j++, pair++) {
            low[pair] = _mm256_loadu_pd(sums[pair]);
            high[pair] = _mm256_loadu_pd(sums[pair] + 4);
        }
    for (Py_ssize_t e = 0; e < n; e += LANES) {
        __m256d x_low[PAIRED], x_high[PAIRED];
        for (int k = 0; k < N; k++) {
            __m256 x = _mm256_loadu_ps(v[k] + e);
            x_low[k] = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
            x_high[k] = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        }
        pair = 0;
        for (int i = 0; i < N; i++)
            for (int j = i; j < N; j++, pair++) {
                low[pair] = _mm256_add_pd(low[pair], _mm256_mul_pd(x_low[i], x_low[j]));
                high[pair] = _mm256_add_pd(high[pair], _mm256_mul_pd(x_high[i], x_high[j]));
            }
    }
    pair = 0;
    for (int i = 0; i < N; i++)
        for (int j = i; j < N; j++, pair++) {
            _mm256_storeu_pd(sums[pair], low[pair]);
            _mm256_storeu_pd(sums[pair] + 4, high[pair]);
        }
}

/* dot_pairs_avx2 for 1 to PAIRED vectors; 0 (nothing done) for more */
__attribute__((target("avx2"))) static int dot_pairs(Py_ssize_t count, double (*sums)[LANES],
                                                   float (*v)[BLOCK], Py_ssize_t n) {
    switch (count) {
    case 1: dot_pairs_avx2(1, sums, v, n); return 1;
    case 2: dot_pairs_avx2(2, sums, v, n); return 1;
    case 3: dot_pairs_avx2(3, sums, v, n); return 1;
    default: return 0;
    }
}
#endif

/* gram(vectors, codes, base, base_code, n) -> [<v_i, v_j> for i <= j, row by row]:
 * the dot products of 1 to 16 vectors of n elements in float64. Each vector is v_k widened to
 * float32, or with a base (not None) the float32 difference v_k - base (one rounding, as torch's
 * subtraction of widened chunks); each element then widened to float64 and the products added
 * into LANES partial sums by index mod LANES, each in index order, and the partial sums added
 * in lane order: a fixed order whatever the vector width of the machine. */
WM_CLONES static PyObject *gram(PyObject *self, PyObject *args) {
    PyObject *vectors, *codes, *base_obj;
    int base_code;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "O!O!Oin", &PyList_Type, &vectors, &PyList_Type, &codes,
                          &base_obj, &base_code, &n))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(vectors);
    if (count < 1 || count > MAX_MODELS || PyList_GET_SIZE(codes) != count) {
        PyErr_SetString(PyExc_ValueError, "gram: 1 to 16 vectors, one code each");
        return NULL;
    }
    unsigned long long vector_at[MAX_MODELS];
    int code[MAX_MODELS];
    if (read_addresses(vectors, vector_at, count) < 0) return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        code[k] = (int)PyLong_AsLong(PyList_GET_ITEM(codes, k));
        if (PyErr_Occurred()) return NULL;
        if (code[k] < F32 || code[k] > BF16) {
            PyErr_SetString(PyExc_ValueError, "gram: dtype codes are 0-2");
            return NULL;
        }
    }
    const void *base = NULL;
    if (base_obj != Py_None) {
        base = (const void *)(uintptr_t)PyLong_AsUnsignedLongLong(base_obj);
        if (PyErr_Occurred()) return NULL;
        if (base_code < F32 || base_code > BF16) {
            PyErr_SetString(PyExc_ValueError, "gram: dtype codes are 0-2");
            return NULL;
        }
    }
    Py_ssize_t pairs = count * (count + 1) / 2;
    double sums[MAX_MODELS * (MAX_MODELS + 1) / 2][LANES];
    memset(sums, 0, sizeof sums);
    float (*v)[BLOCK] = PyMem_RawMalloc(sizeof(float[BLOCK]) * (size_t)count);
    if (v == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    float b[BLOCK];
    for (Py_ssize_t first = 0; first < n; first += BLOCK) {
        Py_ssize_t size = n - first < BLOCK ? n - first : BLOCK;
        if (base != NULL) widen(b, offset(base, base_code, first), base_code, size);
        for (Py_ssize_t k = 0; k < count; k++) {
            widen(v[k], offset((const void *)(uintptr_t)vector_at[k], code[k], first), code[k],
                  size);
            if (base != NULL)
                for (Py_ssize_t i = 0; i < size; i++) v[k][i] = v[k][i] - b[i];
        }
        Py_ssize_t whole = size - size % LANES; /* BLOCK is a multiple of LANES */
        int paired = 0;
#ifdef WM_X86
        if (has_avx2) paired = dot_pairs(count, sums, v, whole);
#endif
        Py_ssize_t pair = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            for (Py_ssize_t j = i; j < count; j++, pair++) {
                if (!paired) dot_lanes(sums[pair], v[i], v[j], whole);
                for (Py_ssize_t e = whole; e < size; e++)
                    sums[pair][e % LANES] += (double)v[i][e] * (double)v[j][e];
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(v);
    PyObject *result = PyList_New(pairs);
    if (result == NULL) return NULL;
    for (Py_ssize_t p = 0; p < pairs; p++) {
        double total = sums[p][0];
        for (int l = 1; l < LANES; l++) total = total + sums[p][l];
        PyObject *number = PyFloat_FromDouble(total);
        if (number == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, p, number);
    }
    return result;
}

#ifdef WM_X86
/* float32 to float16, rounded to nearest even (F16C, as torch's vectorised cast), 8 at a
 * time (the remainder through a padded block); returns how many results are inf or NaN */
__attribute__((target("avx2,f16c")))
static Py_ssize_t narrow_half_f16c(uint16_t *out, const float *in, Py_ssize_t n) {
    const __m128i exponent = _mm_set1_epi16(0x7c00);
    Py_ssize_t nonfinite = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(out + i), h);
        __m128i special = _mm_cmpeq_epi16(_mm_and_si128(h, exponent), exponent);
        nonfinite += __builtin_popcount((unsigned)_mm_movemask_epi8(special)) / 2;
    }
    if (i < n) {
        float rest[8] = {0};
        uint16_t halves[8];
        memcpy(rest, in + i, (size_t)(n - i) * sizeof(float));
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(rest), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)halves, h);
        for (Py_ssize_t k = 0; k < n - i; k++) {
            out[i + k] = halves[k];
            nonfinite += (halves[k] & 0x7c00u) == 0x7c00u;
        }
    }
    return nonfinite;
}
#endif

/* float32 to bfloat16, rounded to nearest even (NaN: 0x7FC0, as torch's scalar cast) */
#ifdef WM_X86
/* narrow_bfloat 8 at a time with AVX2: returns how many it did, their inf and NaN count
 * added to *nonfinite */
__attribute__((target("avx2")))
static Py_ssize_t narrow_bfloat_avx2(uint16_t *out, const uint32_t *u, Py_ssize_t n,
                                     Py_ssize_t *nonfinite) {
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i nan = _mm256_set1_epi32(0x7fc0), exponent = _mm256_set1_epi32(0x7f80);
    Py_ssize_t i = 0, found = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(u + i));
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), one);
        __m256i h = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, bias), odd), 16);
        /* |x| > inf bits: NaN (signed compare: both sides below 2^31) */
        __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, magnitude), inf);
        h = _mm256_blendv_epi8(h, nan, is_nan);
        __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(h, exponent), exponent);
        found += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(special)));
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
        _mm_storeu_si128((__m128i *)(out + i), _mm256_castsi256_si128(packed));
    }
    *nonfinite += found;
    return i;
}
#endif

static Py_ssize_t narrow_bfloat(uint16_t *out, const float *in, Py_ssize_t n) {
    const uint32_t *u = (const uint32_t *)in;
    Py_ssize_t nonfinite = 0, i = 0;
#ifdef WM_X86
    if (has_avx2) i = narrow_bfloat_avx2(out, u, n, &nonfinite);
#endif
    for (; i < n; i++) {
        uint32_t x = u[i];
        uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
        uint16_t h = (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
        out[i] = h;
        nonfinite += (h & 0x7f80u) == 0x7f80u;
    }
    return nonfinite;
}

WM_CLONES static Py_ssize_t copy_float(float *out, const float *in, Py_ssize_t n) {
    const uint32_t *u = (const uint32_t *)in;
    Py_ssize_t nonfinite = 0;
    for (Py_ssize_t i = 0; i < n; i++) nonfinite += (u[i] & 0x7f800000u) == 0x7f800000u;
    memcpy(out, in, (size_t)n * sizeof(float));
    return nonfinite;
}

/* cast(out, out_code, in, n) -> how many of the n results are inf or NaN, or None where the
 * machine lacks F16C for a float16 output: float32 `in` rounded to nearest into `out` (any
 * dtype code) */
static PyObject *cast(PyObject *self, PyObject *args) {
    unsigned long long out_at, in_at;
    int code;
    Py_ssize_t n, nonfinite = 0;
    if (!PyArg_ParseTuple(args, "KiKn", &out_at, &code, &in_at, &n)) return NULL;
    if (code < F32 || code > F8E5M2) {
        PyErr_SetString(PyExc_ValueError, "cast: dtype codes are 0-4");
        return NULL;
    }
#ifdef WM_X86
    if (code == F16 && !(has_f16c && has_avx2)) Py_RETURN_NONE;
#else
    if (code == F16) Py_RETURN_NONE;
#endif
    Py_BEGIN_ALLOW_THREADS
    nonfinite = narrow((void *)(uintptr_t)out_at, code, (const float *)(uintptr_t)in_at, n);
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(nonfinite);
}

#ifdef WM_X86
static int has_fma = 0;
#endif

/* float32 to a float8 type, rounded to nearest even as torch 2.13 casts on the CPU:
 * `mantissa` fraction bits, exponent bias `bias`. NaN stays NaN (sign kept). e4m3fn
 * (`saturate`: it has no inf) turns what is too big for it, inf included, into ±448, its
 * largest value; e5m2 rounds it to ±inf. Below the smallest normal, adding a power of two
 * puts the rounded subnormal in the low bits; else the exponent is rebiased and the dropped
 * fraction bits rounded by adding half an ulp less one, plus the kept fraction's last bit
 * (ties to even). Returns how many results are inf or NaN. */
#ifdef WM_X86
/* narrow_float8's selection 8 elements at a time with AVX2: returns how many it did, their
 * inf and NaN count added to *nonfinite */
__attribute__((target("avx2")))
static Py_ssize_t narrow_float8_avx2(uint8_t *out, const uint32_t *u, Py_ssize_t n,
                                     const uint32_t *constants, Py_ssize_t *nonfinite) {
    const __m128i drop = _mm_cvtsi32_si128((int)constants[0]);
    const __m256i smallest_normal = _mm256_set1_epi32((int)constants[1]);
    const __m256i below_too_big = _mm256_set1_epi32((int)constants[2] - 1);
    const __m256i largest = _mm256_set1_epi32((int)constants[3]);
    const __m256i nan = _mm256_set1_epi32((int)constants[4]);
    const __m256i rebias = _mm256_set1_epi32((int)constants[5]);
    const __m256i magic_bits = _mm256_set1_epi32((int)constants[6]);
    const __m256i special = _mm256_set1_epi32((int)constants[7]);
    const __m256i sign_bit = _mm256_set1_epi32((int)0x80000000u), one = _mm256_set1_epi32(1);
    const __m256i infinity = _mm256_set1_epi32(0x7f800000), low_byte = _mm256_set1_epi32(0xff);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    Py_ssize_t i = 0, found = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(u + i));
        __m256i sign = _mm256_and_si256(x, sign_bit), bits = _mm256_xor_si256(x, sign);
        __m256 shifted = _mm256_add_ps(_mm256_castsi256_ps(bits), _mm256_castsi256_ps(magic_bits));
        __m256i subnormal = _mm256_sub_epi32(_mm256_castps_si256(shifted), magic_bits);
        __m256i odd = _mm256_and_si256(_mm256_srl_epi32(bits, drop), one);
        __m256i normal = _mm256_srl_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, rebias), odd),
                                          drop);
        /* bits < 2^31 here: signed comparisons order them as unsigned ones would */
        __m256i h = _mm256_blendv_epi8(normal, subnormal,
                                       _mm256_cmpgt_epi32(smallest_normal, bits));
        h = _mm256_blendv_epi8(h, largest, _mm256_cmpgt_epi32(bits, below_too_big));
        h = _mm256_blendv_epi8(h, nan, _mm256_cmpgt_epi32(bits, infinity));
        h = _mm256_or_si256(_mm256_and_si256(h, low_byte), _mm256_srli_epi32(sign, 24));
        __m256i is_special = _mm256_cmpeq_epi32(_mm256_and_si256(h, special), special);
        found += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(is_special)));
        __m256i packed = _mm256_packus_epi16(_mm256_packus_epi32(h, h), _mm256_setzero_si256());
        packed = _mm256_permutevar8x32_epi32(packed, order); /* bytes 0-3, 4-7 side by side */
        _mm_storel_epi64((__m128i *)(out + i), _mm256_castsi256_si128(packed));
    }
    *nonfinite += found;
    return i;
}
#endif

static Py_ssize_t narrow_float8(uint8_t *out, const float *in, Py_ssize_t n,
                                int mantissa, int bias, int saturate) {
    const int drop = 23 - mantissa;
    const uint32_t smallest_normal = (uint32_t)(127 + 1 - bias) << 23;
    /* from here up, rounding passes the largest finite value: 464 (e4m3fn), 61440 (e5m2) */
    const uint32_t too_big = saturate ? UINT32_C(0x43e80000) : UINT32_C(0x47700000);
    const uint32_t largest = saturate ? 0x7eu : 0x7cu, nan = 0x7fu;
    const uint32_t rebias = ((uint32_t)(bias - 127) << 23) + ((1u << (drop - 1)) - 1u);
    const uint32_t magic_bits = (uint32_t)(127 - bias + drop + 1) << 23;
    const uint32_t special = saturate ? 0x7fu : 0x7cu;
    union { uint32_t u; float f; } magic = {magic_bits};
    const uint32_t *u = (const uint32_t *)in;
    Py_ssize_t nonfinite = 0;
    Py_ssize_t i = 0;
#ifdef WM_X86
    if (has_avx2) {
        const uint32_t constants[8] = {(uint32_t)drop, smallest_normal, too_big, largest, nan,
                                       rebias, magic_bits, special};
        i = narrow_float8_avx2(out, u, n, constants, &nonfinite);
    }
#endif
    /* both roundings computed and one selected, without branches */
    for (; i < n; i++) {
        uint32_t sign = u[i] & 0x80000000u, bits = u[i] ^ sign;
        float magnitude;
        memcpy(&magnitude, &bits, 4);
        float shifted = magnitude + magic.f;
        uint32_t low;
        memcpy(&low, &shifted, 4);
        uint32_t subnormal = low - magic_bits;
        uint32_t normal = (bits + rebias + ((bits >> drop) & 1u)) >> drop;
        uint32_t h = bits < smallest_normal ? subnormal : normal;
        h = bits >= too_big ? largest : h;
        h = bits > 0x7f800000u ? nan : h;
        h = (h & 0xffu) | (sign >> 24);
        out[i] = (uint8_t)h;
        nonfinite += (h & special) == special;
    }
    return nonfinite;
}

/* n float32 results into `out` (any dtype code), rounded to nearest; returns how many are
 * inf or NaN. F16 needs F16C (the caller checks). */
static Py_ssize_t narrow(void *out, int code, const float *in, Py_ssize_t n) {
    if (code == F8E4M3) return narrow_float8((uint8_t *)out, in, n, 3, 7, 1);
    if (code == F8E5M2) return narrow_float8((uint8_t *)out, in, n, 2, 15, 0);
    if (code == BF16) return narrow_bfloat((uint16_t *)out, in, n);
    if (code == F32) return copy_float((float *)out, in, n);
#ifdef WM_X86
    return narrow_half_f16c((uint16_t *)out, in, n);
#else
    return -1;
#endif
}

enum { SUM = 0, DIFFERENCE = 1, STOCK = 2 }; /* what blend computes */

#ifdef WM_X86
/* blend()'s arithmetic a block at a time, each block rounded into `out` while in cache */
__attribute__((target("avx2,fma")))
static Py_ssize_t blend_fma(void *out, int out_code, const unsigned long long *at,
                            const int *code, const float *coefficient, Py_ssize_t count,
                            Py_ssize_t coefficients, int form, Py_ssize_t n) {
    float r[BLOCK], x[BLOCK], y[BLOCK];
    Py_ssize_t nonfinite = 0;
    for (Py_ssize_t first = 0; first < n; first += BLOCK) {
        Py_ssize_t size = n - first < BLOCK ? n - first : BLOCK;
        const void *in[MAX_MODELS];
        for (Py_ssize_t k = 0; k < count; k++)
            in[k] = offset((const void *)(uintptr_t)at[k], code[k], first);
        if (form == DIFFERENCE) {
            float alpha = coefficient[0];
            widen(r, in[1], code[1], size);
            widen(x, in[2], code[2], size);
            widen(y, in[0], code[0], size);
            for (Py_ssize_t i = 0; i < size; i++) r[i] = fmaf(r[i] - x[i], alpha, y[i]);
        } else if (form == STOCK) {
            /* the offset from the first model, from +0: o = Σ α·(m_k − m_1) one fused
             * multiply-add each; the mean m_1 + o; then base + (mean − base)·t unless t = 1 */
            float alpha = coefficient[0];
            widen(y, in[1], code[1], size);
            for (Py_ssize_t i = 0; i < size; i++) r[i] = 0.0f;
            for (Py_ssize_t k = 2; k < count; k++) {
                widen(x, in[k], code[k], size);
                for (Py_ssize_t i = 0; i < size; i++) r[i] = fmaf(x[i] - y[i], alpha, r[i]);
            }
            for (Py_ssize_t i = 0; i < size; i++) r[i] = y[i] + r[i];
            if (coefficients == 2) {
                float t = coefficient[1];
                widen(x, in[0], code[0], size);
                for (Py_ssize_t i = 0; i < size; i++) r[i] = x[i] + (r[i] - x[i]) * t;
            }
        } else {
            widen(x, in[0], code[0], size);
            float c = coefficient[0];
            for (Py_ssize_t i = 0; i < size; i++) r[i] = x[i] * c;
            for (Py_ssize_t k = 1; k < count; k++) {
                widen(x, in[k], code[k], size);
                c = coefficient[k];
                for (Py_ssize_t i = 0; i < size; i++) r[i] = fmaf(x[i], c, r[i]);
            }
        }
        nonfinite += narrow((char *)out + first * itemsize(out_code), out_code, r, size);
    }
    return nonfinite;
}
#endif

/* blend(out, out_code, inputs, codes, coefficients, form, n) -> how many of the n results
 * are inf or NaN, or None where the machine lacks AVX2, FMA or F16C; rounded to nearest
 * into `out` as cast() rounds, in one pass; any dtype codes. Forms, each as torch computes
 * it in float32 on AVX2 machines (tests/test_kernels.py):
 *   SUM: Σ c_k·x_k, a coefficient per input, as torch's `torch.mul(x_0, c_0)` then
 *     `.add_(x_k, alpha=c_k)`: the first product rounded, then each term added by a fused
 *     multiply-add (one rounding), the coefficients as float32 (kernels.combine: a float32
 *     `out`);
 *   DIFFERENCE: a + α·(b − c) of three inputs (torch.add(a, b − c, alpha=α): the difference
 *     rounded, then one fused multiply-add), coefficients [α];
 *   STOCK: model stock's step from base and models m_1..m_N (N >= 1), coefficients [α] (the
 *     mean's weight 1/N) for the mean alone or [α, t] for base + (mean − base)·t. */
static PyObject *blend(PyObject *self, PyObject *args) {
    unsigned long long out_at;
    int out_code, form;
    PyObject *inputs, *codes, *coefficients;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KiO!O!O!in", &out_at, &out_code, &PyList_Type, &inputs,
                          &PyList_Type, &codes, &PyList_Type, &coefficients, &form, &n))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(inputs), given = PyList_GET_SIZE(coefficients);
    int fits = form == SUM          ? given == count
               : form == DIFFERENCE ? count == 3 && given == 1
               : form == STOCK      ? count >= 2 && (given == 1 || given == 2)
                                    : 0;
    if (count < 1 || count > MAX_MODELS || PyList_GET_SIZE(codes) != count || !fits) {
        PyErr_SetString(PyExc_ValueError, "blend: 1 to 16 vectors, coefficients as the form needs");
        return NULL;
    }
    if (out_code < F32 || out_code > F8E5M2) {
        PyErr_SetString(PyExc_ValueError, "blend: dtype codes are 0-4");
        return NULL;
    }
    unsigned long long at[MAX_MODELS];
    int code[MAX_MODELS];
    float coefficient[MAX_MODELS];
    if (read_addresses(inputs, at, count) < 0) return NULL;
    for (Py_ssize_t k = 0; k < given; k++) {
        coefficient[k] = (float)PyFloat_AsDouble(PyList_GET_ITEM(coefficients, k));
        if (PyErr_Occurred()) return NULL;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        code[k] = (int)PyLong_AsLong(PyList_GET_ITEM(codes, k));
        if (PyErr_Occurred()) return NULL;
        if (code[k] < F32 || code[k] > F8E5M2) {
            PyErr_SetString(PyExc_ValueError, "blend: dtype codes are 0-4");
            return NULL;
        }
    }
#ifdef WM_X86
    if (!(has_fma && has_avx2 && has_f16c)) Py_RETURN_NONE;
    Py_ssize_t nonfinite;
    Py_BEGIN_ALLOW_THREADS
    nonfinite = blend_fma((void *)(uintptr_t)out_at, out_code, at, code, coefficient, count,
                          given, form, n);
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(nonfinite);
#else
    Py_RETURN_NONE;
#endif
}

#ifdef __SIZEOF_INT128__
#define PCG_CHEAP 0xda942042e4dd58b5ULL

/* numpy's PCG64DXSM step: the DXSM output of the state, then the state advanced */
static inline uint64_t pcg_next(unsigned __int128 *state, unsigned __int128 inc) {
    uint64_t hi = (uint64_t)(*state >> 64), lo = (uint64_t)*state | 1u;
    hi ^= hi >> 32;
    hi *= PCG_CHEAP;
    hi ^= hi >> 48;
    hi *= lo;
    *state = *state * PCG_CHEAP + inc;
    return hi;
}

static inline float upper_24(uint32_t half) { return (float)(half >> 8) * 0x1p-24f; }

static void fill_uniform(float *out, unsigned __int128 state, unsigned __int128 inc,
                         Py_ssize_t skip, Py_ssize_t n);

/* n numbers of the stream at this state into float32 `out` (the first `skip` halves passed
 * over): each 64-bit output of numpy's PCG64DXSM split into its 32-bit halves, low half
 * first, each giving its top 24 bits times 2^-24 (uniform in [0, 1)) */
static void fill_uniform(float *out, unsigned __int128 state, unsigned __int128 inc,
                         Py_ssize_t skip, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < skip / 2; i++) state = state * PCG_CHEAP + inc;
    Py_ssize_t written = 0;
    if (skip % 2 && n > 0) out[written++] = upper_24(pcg_next(&state, inc) >> 32);
    for (; written + 2 <= n; written += 2) {
        uint64_t value = pcg_next(&state, inc);
        out[written] = upper_24((uint32_t)value);
        out[written + 1] = upper_24((uint32_t)(value >> 32));
    }
    if (written < n) out[written] = upper_24((uint32_t)pcg_next(&state, inc));
}
#endif

#ifdef __SIZEOF_INT128__
/* numpy's SeedSequence (pool of 4 words) over up to 4 entropy words, then PCG64DXSM seeded
 * from its generate_state(4, uint64), as numpy/random/bit_generator.pyx and pcg64.c do */
static uint32_t hashmix(uint32_t value, uint32_t *hash) {
    value ^= *hash;
    *hash *= 0x931e8875u;
    value *= *hash;
    return value ^ (value >> 16);
}

static uint32_t mix(uint32_t x, uint32_t y) {
    uint32_t result = 0xca01f9ddu * x - 0x4973f715u * y;
    return result ^ (result >> 16);
}

static void seed_pcg(const uint32_t *entropy, int words, unsigned __int128 *state,
                     unsigned __int128 *inc) {
    uint32_t pool[4], hash = 0x43b0d7e5u;
    for (int i = 0; i < 4; i++) pool[i] = hashmix(i < words ? entropy[i] : 0u, &hash);
    for (int src = 0; src < 4; src++)
        for (int dst = 0; dst < 4; dst++)
            if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], &hash));
    for (int src = 4; src < words; src++)
        for (int dst = 0; dst < 4; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src], &hash));
    uint32_t out[8], constant = 0x8b51f9ddu;
    for (int i = 0; i < 8; i++) {
        uint32_t value = pool[i % 4] ^ constant;
        constant *= 0x58f38dedu;
        value *= constant;
        out[i] = value ^ (value >> 16);
    }
    uint64_t words64[4];
    for (int i = 0; i < 4; i++) words64[i] = (uint64_t)out[2 * i] | ((uint64_t)out[2 * i + 1] << 32);
    unsigned __int128 seed = ((unsigned __int128)words64[0] << 64) | words64[1];
    unsigned __int128 sequence = ((unsigned __int128)words64[2] << 64) | words64[3];
    const unsigned __int128 multiplier =
        ((unsigned __int128)0x2360ED051FC65DA4ULL << 64) | 0x4385DF649FCCF645ULL;
    *inc = (sequence << 1) | 1u;
    *state = 0;
    *state = *state * multiplier + *inc;
    *state += seed;
    *state = *state * multiplier + *inc;
}

static int words_of(uint64_t value, uint32_t *into) {  /* numpy's uint32 words of an int */
    int count = 0;
    do {
        into[count++] = (uint32_t)value;
        value >>= 32;
    } while (value);
    return count;
}

/* stream_uniform(out, stream, start, n): rounding.uniform()'s numbers for elements
 * start..start+n of a stream (stream as an unsigned 64-bit value): element i takes number
 * i mod 65,536 of block i / 65,536, from PCG64DXSM seeded by SeedSequence([stream, block]) */
static PyObject *stream_uniform(PyObject *self, PyObject *args) {
    unsigned long long out_at, stream;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "KKnn", &out_at, &stream, &start, &n)) return NULL;
    if (start < 0 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "stream_uniform: start and n are not negative");
        return NULL;
    }
    float *out = (float *)(uintptr_t)out_at;
    Py_BEGIN_ALLOW_THREADS
    const Py_ssize_t block_size = 1 << 16;
    Py_ssize_t position = start, end = start + n;
    while (position < end) {
        Py_ssize_t block = position / block_size, offset = position % block_size;
        Py_ssize_t stop = (block + 1) * block_size < end ? (block + 1) * block_size : end;
        uint32_t entropy[4];
        int words = words_of(stream, entropy);
        words += words_of((uint64_t)block, entropy + words);
        unsigned __int128 state, inc;
        seed_pcg(entropy, words, &state, &inc);
        fill_uniform(out + (position - start), state, inc, offset, stop - position);
        position = stop;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* pcg_state(entropy words) -> (state_high, state_low, inc_high, inc_low): for tests */
static PyObject *pcg_state(PyObject *self, PyObject *args) {
    PyObject *list;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list)) return NULL;
    Py_ssize_t words = PyList_GET_SIZE(list);
    if (words < 1 || words > 8) {
        PyErr_SetString(PyExc_ValueError, "pcg_state: 1 to 8 entropy words");
        return NULL;
    }
    uint32_t entropy[8];
    for (Py_ssize_t i = 0; i < words; i++) {
        entropy[i] = (uint32_t)PyLong_AsUnsignedLong(PyList_GET_ITEM(list, i));
        if (PyErr_Occurred()) return NULL;
    }
    unsigned __int128 state, inc;
    seed_pcg(entropy, (int)words, &state, &inc);
    return Py_BuildValue("KKKK", (unsigned long long)(state >> 64), (unsigned long long)state,
                         (unsigned long long)(inc >> 64), (unsigned long long)inc);
}
#endif

/* widen(out, in, code, n): n elements as float32 (for tests of the exact conversion) */
static PyObject *widen_py(PyObject *self, PyObject *args) {
    unsigned long long out_at, in_at;
    int code;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKin", &out_at, &in_at, &code, &n)) return NULL;
    if (code < F32 || code > F8E5M2) {
        PyErr_SetString(PyExc_ValueError, "widen: dtype codes are 0-4");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    widen((float *)(uintptr_t)out_at, (const void *)(uintptr_t)in_at, code, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"histogram", histogram, METH_VARARGS, "Radix-select counts of |model - base| bits."},
    {"collect", collect, METH_VARARGS, "histogram() stage 0, keeping the bits in a window."},
    {"ties", ties, METH_VARARGS, "The TIES output of one chunk."},
    {"gram", gram, METH_VARARGS, "Dot products of a few vectors in float64, in a fixed order."},
    {"cast", cast, METH_VARARGS, "float32 to a float dtype, rounded, counting inf and NaN."},
    {"blend", blend, METH_VARARGS, "A sum, add-difference or stock step, rounded into out."},
#ifdef __SIZEOF_INT128__
    {"pcg_state", pcg_state, METH_VARARGS, "PCG64DXSM's state from SeedSequence words."},
    {"stream_uniform", stream_uniform, METH_VARARGS, "rounding.uniform() in one loop."},
#endif
    {"widen", widen_py, METH_VARARGS, "A float dtype to float32 (exact)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    fill_float8_values();
    fill_packing();
#ifdef WM_X86
    __builtin_cpu_init();
    has_f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    has_avx2 = __builtin_cpu_supports("avx2");
    has_fma = __builtin_cpu_supports("fma");
#endif
    return PyModule_Create(&module);
}
