/* The native kernels of optim/native.py, over float32 tensors.
 *
 * paramreg_select: a sparsity target's one selection pass (Note [Native selection]). Per element i, with u = max(sqrt(v), floor)*scale + shift (NaN kept) and
 *
 *     y = w                                  (mode 0)
 *     y = w == 0 ? 0 : w + factor*(w - x)    (mode 1, x the origin: extended points)
 *     y = w == 0 ? 0 : w - factor*(x / u)    (mode 2, x the first moment: points ahead)
 *
 * the score s = y*y*u/2, each operation rounded as the compiled kernels of optim/fused.py round
 * it (no contraction into FMA: built with -ffp-contract=off). It counts s < lo, s < hi, and the
 * entries kept: a weight whose bits are not +0.0 scoring below lo (value -1), or a score in
 * [lo, hi) that is not 0 (value s); it writes their flat indices and values in increasing order
 * of index, each thread into its own region of `cap` + 16 entries (the last 16 taken by whole
 * stores of 8 or 16 entries; past `cap` entries are counted, not written). With keep_fresh = 0 only the scores in [lo, hi) are written and counted as kept.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && !defined(PARAMREG_PORTABLE)
#include <immintrin.h>
#define PARAMREG_AVX512 1
#endif
#if defined(__AVX2__) && !defined(PARAMREG_PORTABLE)
#include <immintrin.h>
#define PARAMREG_AVX2 1
#endif

#define CHUNK 256

typedef struct {
    float floor, scale, shift, factor, lo, hi;
    int mode, keep_fresh;
} params;

/* the scores of w[0..n) into s: a loop the compiler vectorizes, one per mode (a constant where it is inlined) */
static inline __attribute__((always_inline)) void scores_of(const float *restrict w, const float *restrict v,
                                                           const float *restrict x, int64_t n, const params *q,
                                                           float *restrict s, const int mode) {
    const float f = q->floor, scale = q->scale, shift = q->shift, a = q->factor;
    for (int64_t i = 0; i < n; i++) {
        float r = sqrtf(v[i]);
        float m = r != r ? r : (f != f ? f : (r > f ? r : f));
        float u = m * scale + shift;
        float y = w[i];
        if (mode) { /* y = +0.0 where w is ±0.0, by a mask on the bits (no control flow: vectorized for AVX2 too) */
            float e = mode == 1 ? a * (w[i] - x[i]) : a * (x[i] / u);
            float z = mode == 1 ? w[i] + e : w[i] - e;
            uint32_t zb, wb;
            memcpy(&zb, &z, sizeof zb);
            memcpy(&wb, w + i, sizeof wb);
            zb &= -(uint32_t)((wb << 1) != 0);
            memcpy(&y, &zb, sizeof y);
        }
        float yy = y * y;
        float su = yy * u;
        s[i] = su / 2.0f;
    }
}

static void scores(const float *restrict w, const float *restrict v, const float *restrict x, int64_t n,
                   const params *q, float *restrict s) {
    if (q->mode == 1)
        scores_of(w, v, x, n, q, s, 1);
    else if (q->mode == 2)
        scores_of(w, v, x, n, q, s, 2);
    else
        scores_of(w, v, NULL, n, q, s, 0);
}

typedef struct {
    int64_t below, under, marked, kept; /* scores below lo, below hi; fresh or inside; entries kept (written up to cap) */
} counts;

#ifdef PARAMREG_AVX2
/* pack_table[m]: the lanes of the bits set in the 8-bit mask m, in increasing order (the rest 0):
 * AVX2 has no compress, so 8 entries are packed by a permutation looked up here */
static int32_t pack_table[256][8] __attribute__((aligned(32)));

__attribute__((constructor)) static void pack_table_init(void) {
    for (int m = 0; m < 256; m++) {
        int k = 0;
        for (int b = 0; b < 8; b++)
            if (m >> b & 1)
                pack_table[m][k++] = b;
        while (k < 8)
            pack_table[m][k++] = 0;
    }
}
#endif

/* One entry of code c (0: not kept, 2: fresh, 1: a kept score s) at flat index at: written while
 * fewer than cap are, counted either way. */
static inline void keep_entry(int64_t *restrict idx, float *restrict val, int64_t *kept, int64_t cap, int64_t at,
                              uint8_t c, float s) {
    if (c) {
        if (*kept < cap) {
            idx[*kept] = at;
            val[*kept] = c == 2 ? -1.0f : s;
        }
        (*kept)++;
    }
}

/* one thread's range [start, end) of the tensor: its kept entries into idx and val */
static void range_pass(const float *w, const float *v, const float *x, int64_t start, int64_t end, const params *q,
                       int64_t *restrict idx, float *restrict val, int64_t cap, counts *out) {
    int64_t below = 0, under = 0, marked = 0, kept = 0;
    const float lo = q->lo, hi = q->hi;
    const uint32_t fresh_bits = q->keep_fresh ? 0xffffffffu : 0u;
    float s[CHUNK];
    uint8_t code[CHUNK];
    int64_t i = start;
#ifdef PARAMREG_AVX512
    const __m512 vf = _mm512_set1_ps(q->floor), vs = _mm512_set1_ps(q->scale), vh = _mm512_set1_ps(q->shift);
    const __m512 va = _mm512_set1_ps(q->factor), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    const __m512 half = _mm512_set1_ps(0.5f), zero = _mm512_setzero_ps(), minus_one = _mm512_set1_ps(-1.0f);
    const __mmask16 floor_nan = q->floor != q->floor ? 0xffff : 0, fresh_lanes = q->keep_fresh ? 0xffff : 0;
    const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), eight = _mm512_set1_epi64(8);
    for (; i + 16 <= end; i += 16) {
        __m512 wi = _mm512_loadu_ps(w + i);
        __m512 r = _mm512_sqrt_ps(_mm512_loadu_ps(v + i));
        __m512 m = _mm512_mask_mov_ps(_mm512_max_ps(vf, r), floor_nan, vf); /* max_ps(f, r) is r where r is NaN */
        __m512 u = _mm512_add_ps(_mm512_mul_ps(m, vs), vh);
        __m512 y = wi;
        if (q->mode == 1) {
            y = _mm512_add_ps(wi, _mm512_mul_ps(va, _mm512_sub_ps(wi, _mm512_loadu_ps(x + i))));
            y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(wi, zero, _CMP_EQ_OQ), zero);
        } else if (q->mode == 2) {
            y = _mm512_sub_ps(wi, _mm512_mul_ps(va, _mm512_div_ps(_mm512_loadu_ps(x + i), u)));
            y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(wi, zero, _CMP_EQ_OQ), zero);
        }
        __m512 si = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(y, y), u), half); /* exactly /2 */
        __mmask16 b = _mm512_cmp_ps_mask(si, vlo, _CMP_LT_OQ), un = _mm512_cmp_ps_mask(si, vhi, _CMP_LT_OQ);
        __mmask16 fresh = b & _mm512_test_epi32_mask(_mm512_castps_si512(wi), _mm512_castps_si512(wi)) & fresh_lanes;
        __mmask16 inside = un & (__mmask16)~b;
        __mmask16 keep = fresh | (inside & _mm512_cmp_ps_mask(si, zero, _CMP_NEQ_UQ));
        below += __builtin_popcount(b);
        under += __builtin_popcount(un);
        marked += __builtin_popcount(fresh | inside);
        if (keep) { /* compressed in registers, then stored whole: the lanes past the kept ones are overwritten next */
            int k = __builtin_popcount(keep), low = __builtin_popcount(keep & 0xff);
            if (kept + k <= cap) {
                __m512i first = _mm512_add_epi64(_mm512_set1_epi64(i), lanes);
                _mm512_storeu_ps(val + kept, _mm512_maskz_compress_ps(keep, _mm512_mask_mov_ps(si, fresh, minus_one)));
                _mm512_storeu_si512(idx + kept, _mm512_maskz_compress_epi64((__mmask8)(keep & 0xff), first));
                _mm512_storeu_si512(idx + kept + low, _mm512_maskz_compress_epi64((__mmask8)(keep >> 8), _mm512_add_epi64(first, eight)));
            }
            kept += k;
        }
    }
#endif
    while (i < end) {
        int64_t len = end - i < CHUNK ? end - i : CHUNK;
        scores(w + i, v + i, q->mode ? x + i : NULL, len, q, s);
        const uint32_t *bits = (const uint32_t *)(w + i);
        int64_t first = 0; /* the chunk's first weight the loops below take */
#ifdef PARAMREG_AVX2
        { /* 8 weights at once: their counts, and the kept ones packed by a permutation and stored whole (no branch) */
            const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), zero = _mm256_setzero_ps();
            const __m256 minus_one = _mm256_set1_ps(-1.0f);
            const __m256i fresh_mask = _mm256_set1_epi32((int32_t)fresh_bits), ones = _mm256_set1_epi32(-1);
            for (; first + 8 <= len; first += 8) {
                __m256 sj = _mm256_loadu_ps(s + first);
                __m256i wb = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(bits + first)), fresh_mask);
                __m256 b = _mm256_cmp_ps(sj, vlo, _CMP_LT_OQ), un = _mm256_cmp_ps(sj, vhi, _CMP_LT_OQ);
                __m256 fresh = _mm256_and_ps(b, _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(wb, _mm256_setzero_si256()), ones)));
                __m256 inside = _mm256_andnot_ps(b, un);
                int keep = _mm256_movemask_ps(_mm256_or_ps(fresh, _mm256_and_ps(inside, _mm256_cmp_ps(sj, zero, _CMP_NEQ_UQ))));
                below += __builtin_popcount(_mm256_movemask_ps(b));
                under += __builtin_popcount(_mm256_movemask_ps(un));
                marked += __builtin_popcount(_mm256_movemask_ps(_mm256_or_ps(fresh, inside)));
                if (kept + 8 <= cap + 16) {
                    __m256i lanes = _mm256_load_si256((const __m256i *)pack_table[keep]);
                    __m256i at = _mm256_set1_epi64x(i + first);
                    _mm256_storeu_ps(val + kept, _mm256_permutevar8x32_ps(_mm256_blendv_ps(sj, minus_one, fresh), lanes));
                    _mm256_storeu_si256((__m256i *)(idx + kept), _mm256_add_epi64(at, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(lanes))));
                    _mm256_storeu_si256((__m256i *)(idx + kept + 4),
                                        _mm256_add_epi64(at, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(lanes, 1))));
                }
                kept += __builtin_popcount(keep);
            }
        }
#endif
        int32_t b_sum = 0, un_sum = 0, marked_sum = 0;
        for (int64_t j = first; j < len; j++) { /* the counts and each entry's code (2: fresh, 1: a kept score), vectorized */
            int b = s[j] < lo, un = s[j] < hi;
            int fresh = b & ((bits[j] & fresh_bits) != 0);
            int inside = un & !b;
            b_sum += b;
            un_sum += un;
            marked_sum += fresh | inside;
            code[j] = (uint8_t)(2 * fresh | (inside & (s[j] != 0.0f)));
        }
        below += b_sum;
        under += un_sum;
        marked += marked_sum;
        int64_t j = first;
        for (; j + 8 <= len; j += 8) { /* the kept entries in order, 8 codes looked at at once */
            uint64_t word;
            memcpy(&word, code + j, 8);
            if (!word)
                continue;
            if (kept + 8 <= cap + 16) { /* 8 whole stores, no branch per entry: those past the kept ones are overwritten next */
                for (int b = 0; b < 8; b++) {
                    uint8_t c = (uint8_t)(word >> (8 * b));
                    idx[kept] = i + j + b;
                    val[kept] = c == 2 ? -1.0f : s[j + b];
                    kept += c != 0;
                }
                continue;
            }
            for (int64_t k = j; k < j + 8; k++) /* near cap: one at a time */
                keep_entry(idx, val, &kept, cap, i + k, code[k], s[k]);
        }
        for (; j < len; j++) /* the last codes of the tensor */
            keep_entry(idx, val, &kept, cap, i + j, code[j], s[j]);
        i += len;
    }
    out->below = below;
    out->under = under;
    out->marked = marked;
    out->kept = kept;
}

/* The pass over w[0..n) in `threads` equal ranges (multiples of 16 elements): thread t writes its
 * kept entries at idx + t*(cap + 16) and val + t*(cap + 16), its counts at out[t]. */
void paramreg_select(const float *w, const float *v, const float *x, int64_t n, float floor, float scale, float shift,
                     float factor, float lo, float hi, int mode, int keep_fresh, int64_t *idx, float *val, int64_t cap,
                     counts *out, int threads) {
    params q = {floor, scale, shift, factor, lo, hi, mode, keep_fresh};
    int64_t per = ((n + threads - 1) / threads + 15) / 16 * 16;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
    for (int t = 0; t < threads; t++) {
        int64_t start = t * per < n ? t * per : n, end = start + per < n ? start + per : n;
        range_pass(w, v, x, start, end, &q, idx + t * (cap + 16), val + t * (cap + 16), cap, out + t);
    }
}

/* paramreg_split (Note [Native selection] in optim/native.py): the entries a pass kept, in order,
 * parted as numpy's masks part them: those whose value is not >= 0 (the new zeros, -1) into fresh,
 * the others into at, with their values into inside; returns how many went to fresh. Each output
 * has room for one entry more than goes to it (every entry is written to both sides, the side
 * it is not on overwritten by the next). */
int64_t paramreg_split(const int64_t *restrict idx, const float *restrict val, int64_t n, int64_t *restrict fresh,
                       int64_t *restrict at, float *restrict inside) {
    int64_t f = 0, k = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t is_fresh = !(val[i] >= 0.0f);
        fresh[f] = idx[i];
        at[k] = idx[i];
        inside[k] = val[i];
        f += is_fresh;
        k += 1 - is_fresh;
    }
    return f;
}

/* paramreg_hold and paramreg_squares (Note [Native hold] in optim/native.py): the sum of squares
 * of g in chunks of SQUARES_CHUNK elements, each chunk in LANES float lanes (lane j adds the
 * squares of the elements j, j + LANES, ... of the chunk, in order), the lanes added in order in
 * double, then the chunks in order: the same sum whatever the number of threads and however the
 * compiler vectorizes it (64 float lanes kept the pass at a dot product's speed, where 16 double
 * lanes did not: 8.1 and 12.2 ms over 25M values on one thread, a dot product 7.4; ad hoc). */
#define SQUARES_CHUNK 4096
#define LANES 64

static double lanes_total(const float *lanes) {
    double total = 0.0;
    for (int j = 0; j < LANES; j++)
        total += lanes[j];
    return total;
}

static int64_t chunk_end(int64_t start, int64_t n) {
    return start + SQUARES_CHUNK < n ? start + SQUARES_CHUNK : n;
}

static double chunks_total(const double *partials, int64_t chunks) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; c++)
        total += partials[c];
    return total;
}

static double chunk_squares(const float *restrict g, int64_t start, int64_t end) {
    float lanes[LANES] = {0};
    int64_t i = start;
    for (; i + LANES <= end; i += LANES)
        for (int j = 0; j < LANES; j++) {
            float x = g[i + j];
            lanes[j] += x * x;
        }
    for (int j = 0; i + j < end; j++) {
        float x = g[i + j];
        lanes[j] += x * x;
    }
    return lanes_total(lanes);
}

/* The sum of squares of g[0..n); partials: room for one double per chunk. */
double paramreg_squares(const float *g, int64_t n, double *partials, int threads) {
    int64_t chunks = (n + SQUARES_CHUNK - 1) / SQUARES_CHUNK;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t c = 0; c < chunks; c++) {
        int64_t start = c * SQUARES_CHUNK, end = chunk_end(start, n);
        partials[c] = chunk_squares(g, start, end);
    }
    return chunks_total(partials, chunks);
}

/* Element i of the hold: g[i] (and m[i], with_m) +0.0 where w[i] is 0, written back either way; the held g[i]'s square. */
static inline __attribute__((always_inline)) float hold_one(const float *restrict w, float *restrict g, float *restrict m,
                                                           int64_t i, const int with_m) {
    /* on the bits, with no control flow (gcc vectorizes it so for AVX2 too): all ones where w[i] is not ±0.0 */
    uint32_t keep = -(uint32_t)((((const uint32_t *)w)[i] << 1) != 0);
    uint32_t xb = ((uint32_t *)g)[i] & keep;
    ((uint32_t *)g)[i] = xb;
    if (with_m)
        ((uint32_t *)m)[i] &= keep;
    float x;
    memcpy(&x, &xb, sizeof x);
    return x * x;
}

/* One chunk of the hold: g (and m) +0.0 where w is 0 (-0.0 too), every value written back (the
 * others as they were, NaN's bits too); the held g's squares summed as chunk_squares sums them.
 * with_m a constant at each call, so that each loop has no branch (gcc vectorizes it for AVX2 only so). */
static inline __attribute__((always_inline)) double chunk_hold_of(const float *restrict w, float *restrict g,
                                                                 float *restrict m, int64_t start, int64_t end,
                                                                 const int with_m) {
    float lanes[LANES] = {0};
    int64_t i = start;
    for (; i + LANES <= end; i += LANES)
        for (int j = 0; j < LANES; j++)
            lanes[j] += hold_one(w, g, m, i + j, with_m);
    for (int j = 0; i + j < end; j++)
        lanes[j] += hold_one(w, g, m, i + j, with_m);
    return lanes_total(lanes);
}

static double chunk_hold(const float *restrict w, float *restrict g, float *restrict m, int64_t start, int64_t end) {
    return m != NULL ? chunk_hold_of(w, g, m, start, end, 1) : chunk_hold_of(w, g, NULL, start, end, 0);
}

/* Before a step: g[i] (and m[i], m not NULL) set to +0.0 where w[i] == 0, the values masked_fill_
 * writes; returns the sum of squares of the held g, as paramreg_squares sums it. */
double paramreg_hold(const float *w, float *g, float *m, int64_t n, double *partials, int threads) {
    int64_t chunks = (n + SQUARES_CHUNK - 1) / SQUARES_CHUNK;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t c = 0; c < chunks; c++) {
        int64_t start = c * SQUARES_CHUNK, end = chunk_end(start, n);
        partials[c] = chunk_hold(w, g, m, start, end);
    }
    return chunks_total(partials, chunks);
}
