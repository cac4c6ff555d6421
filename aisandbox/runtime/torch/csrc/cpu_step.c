/* The parts of a Llama-family decoder layer between its matrix multiplies, for the torch backend on CPU.
 *
 * Built at load by aisandbox/runtime/torch/cpu_kernels.py with the machine's own compiler (-O3 -march=native
 * -fopenmp) and called through ctypes: one call where the PyTorch forward makes 5 to 20 small ops, each of
 * which costs more in dispatch than in arithmetic at decode sizes. OpenMP here is the libgomp that PyTorch
 * already loaded (same soname), so both share one thread pool and torch.set_num_threads.
 *
 * All tensors are float32 and contiguous, in the layouts named at each function.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x to about 1 ulp for x in [-87, 88] (Cephes' expf polynomial), written so that the compiler vectorizes
 * the loops that call it; libm's expf is a scalar call per element. */
static inline float exp_f(float x) {
    x = fminf(fmaxf(x, -87.f), 88.f);
    float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f; /* round to nearest: 1.5 * 2^23 */
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500E-4f;
    p = fmaf(p, r, 1.3981999507E-3f);
    p = fmaf(p, r, 8.3334519073E-3f);
    p = fmaf(p, r, 4.1665795894E-2f);
    p = fmaf(p, r, 1.6666665459E-1f);
    p = fmaf(p, r, 5.0000001201E-1f);
    p = fmaf(p, r * r, r) + 1.f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* x: [n, dim]; out = x / sqrt(mean(x^2) + eps) * w. */
void rms_norm(const float *x, const float *w, float *out, int64_t n, int64_t dim, float eps) {
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < dim; i++) s += xr[i] * xr[i];
        float inv = 1.f / sqrtf(s / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* The residual add and the next norm in one pass: x += d; out = rms_norm(x) * w. x, d, out: [n, dim]. */
void add_rms_norm(float *x, const float *d, const float *w, float *out, int64_t n, int64_t dim, float eps) {
    for (int64_t r = 0; r < n; r++) {
        float *xr = x + r * dim;
        const float *dr = d + r * dim;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < dim; i++) {
            xr[i] += dr[i];
            s += xr[i] * xr[i];
        }
        float inv = 1.f / sqrtf(s / (float)dim + eps);
        float *o = out + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* gu: [n, 2 * inter] (gate then up); out: [n, inter] = silu(gate) * up. */
void silu_mul(const float *gu, float *out, int64_t n, int64_t inter) {
#pragma omp parallel for if (n * inter > 65536)
    for (int64_t r = 0; r < n; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.f + exp_f(-g[i])) * u[i];
    }
}

/* out = x * cos + rotate_half(x) * sin over one head of d values (transformers' Llama rotary). */
static inline void rope(const float *x, const float *c, const float *s, float *out, int64_t d) {
    int64_t h = d / 2;
#pragma omp simd
    for (int64_t i = 0; i < h; i++) {
        out[i] = x[i] * c[i] - x[i + h] * s[i];
        out[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
    }
}

/* Attention of g query heads q [g, d] that share one KV head, over n cached columns K, V [n, d]: o [g, d], by
 * attend() below. p: scratch [g, n] for the scores. K and V hold float32, or float16 where the caller says `half`
 * (the half-size KV cache: llama.cpp's default too; only builds with F16C read it, see kv_half_supported). */

/* The KV cache holds float16 only in builds that convert in hardware (F16C: every AVX2 CPU has it). */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HALF_KV 1
static inline float kv_at(const void *base, int64_t i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}
#else
#define HALF_KV 0
static inline float kv_at(const void *base, int64_t i, int half) {
    (void)half;
    return ((const float *)base)[i];
}
#endif

/* 1 where this build reads and writes a float16 KV cache (the caller then allocates one). */
int kv_half_supported(void) { return HALF_KV; }

static inline __attribute__((always_inline)) void scores_plain(const float *q, const void *K, int64_t n, int64_t g,
                                                               int64_t d, float scale, float *p, int half) {
    for (int64_t j = 0; j < n; j++) { /* scores for the g heads, reading K once */
        for (int64_t h = 0; h < g; h++) {
            const float *qh = q + h * d;
            float s = 0.f;
            for (int64_t e = 0; e < d; e++) s += qh[e] * kv_at(K, j * d + e, half);
            p[h * n + j] = s * scale;
        }
    }
}

static void softmax_rows(float *p, int64_t g, int64_t n) {
    for (int64_t h = 0; h < g; h++) {
        float *ph = p + h * n, m = -FLT_MAX, sum = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; j++) m = ph[j] > m ? ph[j] : m;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) {
            ph[j] = exp_f(ph[j] - m);
            sum += ph[j];
        }
        float inv = 1.f / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) ph[j] *= inv;
    }
}

static inline __attribute__((always_inline)) void weigh_plain(const float *p, const void *V, int64_t n, int64_t g,
                                                              int64_t d, float *acc, int half) {
    memset(acc, 0, sizeof(float) * (size_t)(g * d)); /* acc: the output, [g, d] */
    for (int64_t j = 0; j < n; j++) {
        for (int64_t h = 0; h < g; h++) {
            float w = p[h * n + j], *a = acc + h * d;
            for (int64_t e = 0; e < d; e++) a[e] += w * kv_at(V, j * d + e, half);
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The four sums of a0..a3, in order. */
static inline __m128 hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* Eight KV values from element i on, as float32. `half` is a constant once inlined. */
static inline __attribute__((always_inline)) __m256 kv_load8(const void *base, int64_t i, int half) {
#if HALF_KV
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
#endif
    (void)half;
    return _mm256_loadu_ps((const float *)base + i);
}

/* Scores of heads h0..h0+hg-1 (hg <= 3, a constant once inlined) against columns j..j+3: twelve accumulators,
 * each column's K read once for all the heads, four sums reduced at once. d % 8 == 0. */
static inline __attribute__((always_inline)) void scores4(const float *q, const void *K, int64_t n, int64_t d,
                                                          float scale, float *p, int64_t h0, int hg, int64_t j,
                                                          int half) {
    __m256 a[3][4];
    for (int h = 0; h < 3; h++)
        for (int c = 0; c < 4; c++) a[h][c] = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; e += 8) {
        __m256 k[4];
        for (int c = 0; c < 4; c++) k[c] = kv_load8(K, (j + c) * d + e, half);
        for (int h = 0; h < hg; h++) {
            __m256 qv = _mm256_loadu_ps(q + (h0 + h) * d + e);
            for (int c = 0; c < 4; c++) a[h][c] = _mm256_fmadd_ps(qv, k[c], a[h][c]);
        }
    }
    for (int h = 0; h < hg; h++)
        _mm_storeu_ps(p + (h0 + h) * n + j, _mm_mul_ps(hsum4x8(a[h][0], a[h][1], a[h][2], a[h][3]), _mm_set1_ps(scale)));
}

/* acc[h0..h0+hg-1, e0..e0+31] = sum_j p[h, j] V[j, e]: twelve accumulators, each V row read once for the heads. */
static inline __attribute__((always_inline)) void weigh32(const float *p, const void *V, int64_t n, int64_t d,
                                                          float *acc, int64_t h0, int hg, int64_t e0, int half) {
    __m256 a[3][4];
    for (int h = 0; h < 3; h++)
        for (int c = 0; c < 4; c++) a[h][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m256 v[4];
        for (int c = 0; c < 4; c++) v[c] = kv_load8(V, j * d + e0 + 8 * c, half);
        for (int h = 0; h < hg; h++) {
            __m256 w = _mm256_broadcast_ss(p + (h0 + h) * n + j);
            for (int c = 0; c < 4; c++) a[h][c] = _mm256_fmadd_ps(w, v[c], a[h][c]);
        }
    }
    for (int h = 0; h < hg; h++)
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(acc + (h0 + h) * d + e0 + 8 * c, a[h][c]);
}

#if defined(__AVX512F__)
/* 512-bit versions for heads of a multiple of 64: half the instructions of the 256-bit ones, and V read once. */
static inline __m256 fold512(__m512 v) { /* the sum of the two 256-bit halves */
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

static inline __attribute__((always_inline)) __m512 kv_load16(const void *base, int64_t i, int half) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    return _mm512_loadu_ps((const float *)base + i);
}

static inline __attribute__((always_inline)) void scores4w(const float *q, const void *K, int64_t n, int64_t d,
                                                           float scale, float *p, int64_t h0, int hg, int64_t j,
                                                           int half) {
    __m512 a[3][4];
    for (int h = 0; h < 3; h++)
        for (int c = 0; c < 4; c++) a[h][c] = _mm512_setzero_ps();
    for (int64_t e = 0; e < d; e += 16) {
        __m512 k[4];
        for (int c = 0; c < 4; c++) k[c] = kv_load16(K, (j + c) * d + e, half);
        for (int h = 0; h < hg; h++) {
            __m512 qv = _mm512_loadu_ps(q + (h0 + h) * d + e);
            for (int c = 0; c < 4; c++) a[h][c] = _mm512_fmadd_ps(qv, k[c], a[h][c]);
        }
    }
    for (int h = 0; h < hg; h++) {
        __m128 sums = hsum4x8(fold512(a[h][0]), fold512(a[h][1]), fold512(a[h][2]), fold512(a[h][3]));
        _mm_storeu_ps(p + (h0 + h) * n + j, _mm_mul_ps(sums, _mm_set1_ps(scale)));
    }
}

/* acc[h0..h0+hg-1, e0..e0+63] = sum_j p[h, j] V[j, e]. */
static inline __attribute__((always_inline)) void weigh64(const float *p, const void *V, int64_t n, int64_t d,
                                                          float *acc, int64_t h0, int hg, int64_t e0, int half) {
    __m512 a[3][4];
    for (int h = 0; h < 3; h++)
        for (int c = 0; c < 4; c++) a[h][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 v[4];
        for (int c = 0; c < 4; c++) v[c] = kv_load16(V, j * d + e0 + 16 * c, half);
        for (int h = 0; h < hg; h++) {
            __m512 w = _mm512_set1_ps(p[(h0 + h) * n + j]);
            for (int c = 0; c < 4; c++) a[h][c] = _mm512_fmadd_ps(w, v[c], a[h][c]);
        }
    }
    for (int h = 0; h < hg; h++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + (h0 + h) * d + e0 + 16 * c, a[h][c]);
}
#endif

static inline __attribute__((always_inline)) void attend_kv(const float *q, const void *K, const void *V, int64_t n,
                                                            int64_t g, int64_t d, float scale, float *p, float *o,
                                                            int half) {
#if defined(__AVX512F__)
    if (d % 64 == 0) {
        for (int64_t h0 = 0; h0 < g; h0 += 3) {
            const int hg = g - h0 < 3 ? (int)(g - h0) : 3;
            int64_t j = 0;
            for (; j + 4 <= n; j += 4) {
                if (hg == 3) scores4w(q, K, n, d, scale, p, h0, 3, j, half);
                else if (hg == 2) scores4w(q, K, n, d, scale, p, h0, 2, j, half);
                else scores4w(q, K, n, d, scale, p, h0, 1, j, half);
            }
            for (; j < n; j++)
                for (int64_t h = h0; h < h0 + hg; h++) {
                    __m512 sv = _mm512_setzero_ps();
                    for (int64_t e = 0; e < d; e += 16)
                        sv = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + e), kv_load16(K, j * d + e, half), sv);
                    p[h * n + j] = _mm512_reduce_add_ps(sv) * scale;
                }
        }
        softmax_rows(p, g, n);
        for (int64_t h0 = 0; h0 < g; h0 += 3) {
            const int hg = g - h0 < 3 ? (int)(g - h0) : 3;
            for (int64_t e0 = 0; e0 < d; e0 += 64) {
                if (hg == 3) weigh64(p, V, n, d, o, h0, 3, e0, half);
                else if (hg == 2) weigh64(p, V, n, d, o, h0, 2, e0, half);
                else weigh64(p, V, n, d, o, h0, 1, e0, half);
            }
        }
        return;
    }
#endif
    if (d % 32 != 0) {
        scores_plain(q, K, n, g, d, scale, p, half);
        softmax_rows(p, g, n);
        weigh_plain(p, V, n, g, d, o, half);
        return;
    }
    for (int64_t h0 = 0; h0 < g; h0 += 3) {
        const int hg = g - h0 < 3 ? (int)(g - h0) : 3;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            if (hg == 3) scores4(q, K, n, d, scale, p, h0, 3, j, half);
            else if (hg == 2) scores4(q, K, n, d, scale, p, h0, 2, j, half);
            else scores4(q, K, n, d, scale, p, h0, 1, j, half);
        }
        for (; j < n; j++)
            for (int64_t h = h0; h < h0 + hg; h++) {
                __m256 s = _mm256_setzero_ps();
                for (int64_t e = 0; e < d; e += 8)
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + e), kv_load8(K, j * d + e, half), s);
                p[h * n + j] = hsum8(s) * scale;
            }
    }
    softmax_rows(p, g, n);
    for (int64_t h0 = 0; h0 < g; h0 += 3) {
        const int hg = g - h0 < 3 ? (int)(g - h0) : 3;
        for (int64_t e0 = 0; e0 < d; e0 += 32) {
            if (hg == 3) weigh32(p, V, n, d, o, h0, 3, e0, half);
            else if (hg == 2) weigh32(p, V, n, d, o, h0, 2, e0, half);
            else weigh32(p, V, n, d, o, h0, 1, e0, half);
        }
    }
}
#else
static inline __attribute__((always_inline)) void attend_kv(const float *q, const void *K, const void *V, int64_t n,
                                                            int64_t g, int64_t d, float scale, float *p, float *o,
                                                            int half) {
    scores_plain(q, K, n, g, d, scale, p, half);
    softmax_rows(p, g, n);
    weigh_plain(p, V, n, g, d, o, half);
}
#endif

/* One body each for a float32 and a float16 cache: `half` is a constant inside. */
static void attend_f32(const float *q, const void *K, const void *V, int64_t n, int64_t g, int64_t d, float scale,
                       float *p, float *o) {
    attend_kv(q, K, V, n, g, d, scale, p, o, 0);
}

#if HALF_KV
static void attend_f16(const float *q, const void *K, const void *V, int64_t n, int64_t g, int64_t d, float scale,
                       float *p, float *o) {
    attend_kv(q, K, V, n, g, d, scale, p, o, 1);
}

/* x [d] float32 -> out [d] float16, rounded to nearest. */
static void to_half(const float *x, uint16_t *out, int64_t d) {
    int64_t e = 0;
    for (; e + 8 <= d; e += 8)
        _mm_storeu_si128((__m128i *)(out + e), _mm256_cvtps_ph(_mm256_loadu_ps(x + e), _MM_FROUND_TO_NEAREST_INT));
    for (; e < d; e++) out[e] = _cvtss_sh(x[e], _MM_FROUND_TO_NEAREST_INT);
}
#endif

/* Rotary on q and k, K and V stored in the layer's cache, then attention for each query.
 *
 * qkv: [R, Q, (hq + 2 hk) * d], the fused projection's output (q heads, then k heads, then v heads).
 * cos, sin: [R, Q, d] for each query's position.
 * kbuf, vbuf: the layer's cache [rows_cap, hk, cols_cap, d], float32, or float16 when kv_half (only where
 *   kv_half_supported()); row r of this call is cache row row0 + r, and its
 *   query i sits at column write_col + i. start[r] is the row's first column: a query sees columns
 *   start[r] .. its own. A query is valid when its column is >= start[r] and valid (if given, [R, Q]) says so;
 *   an invalid one (left padding, or a position whose KV came from the prefix cache) stores nothing and
 *   outputs zeros.
 * qout: [R, Q, hq, d], the rotated queries (for a caller that attends itself; always written).
 * out: [R, Q, hq * d] attention output, or NULL to store only.
 */
void rope_store_attend(const float *qkv, const float *cos, const float *sin, void *kbuf, void *vbuf,
                       int64_t cols_cap, int64_t row0, int64_t write_col, const int64_t *start,
                       const uint8_t *valid, int64_t R, int64_t Q, int64_t hq, int64_t hk, int64_t d, float *qout,
                       float *out, float scale, int64_t kv_half) {
    const int64_t width = (hq + 2 * hk) * d;
    const int half = HALF_KV && kv_half;
    const size_t esize = half ? sizeof(uint16_t) : sizeof(float);
#pragma omp parallel for collapse(2) if (R * Q > 1)
    for (int64_t r = 0; r < R; r++) {
        for (int64_t i = 0; i < Q; i++) {
            const int64_t t = r * Q + i, col = write_col + i;
            const float *src = qkv + t * width, *c = cos + t * d, *s = sin + t * d;
            for (int64_t h = 0; h < hq; h++) rope(src + h * d, c, s, qout + (t * hq + h) * d, d);
            int ok = col >= start[r] && (valid == NULL || valid[t]);
            if (!ok) continue;
            for (int64_t h = 0; h < hk; h++) {
                int64_t at = (((row0 + r) * hk + h) * cols_cap + col) * d;
#if HALF_KV
                if (half) {
                    float k[d];
                    rope(src + (hq + h) * d, c, s, k, d);
                    to_half(k, (uint16_t *)kbuf + at, d);
                    to_half(src + (hq + hk + h) * d, (uint16_t *)vbuf + at, d);
                    continue;
                }
#endif
                rope(src + (hq + h) * d, c, s, (float *)kbuf + at, d);
                memcpy((float *)vbuf + at, src + (hq + hk + h) * d, d * sizeof(float));
            }
        }
    }
    if (out == NULL) return;
    const int64_t g = hq / hk;
#pragma omp parallel
    {
        float *p = malloc(sizeof(float) * (size_t)(g * (write_col + Q)));
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t r = 0; r < R; r++) {
            for (int64_t kh = 0; kh < hk; kh++) {
                for (int64_t i = 0; i < Q; i++) {
                    const int64_t t = r * Q + i, col = write_col + i;
                    float *o = out + t * hq * d + kh * g * d;
                    int ok = col >= start[r] && (valid == NULL || valid[t]);
                    if (!ok) {
                        memset(o, 0, sizeof(float) * (size_t)(g * d));
                        continue;
                    }
                    const int64_t lo = start[r], n = col + 1 - lo;
                    const size_t at = (size_t)((((row0 + r) * hk + kh) * cols_cap + lo) * d) * esize;
                    const char *K = (const char *)kbuf + at, *V = (const char *)vbuf + at;
                    /* The step streams every weight between two uses of a row's KV, so K and V come from memory:
                     * ask for all of both now, so that the loads overlap (measured: 3.39 -> 2.86 ms for 16 rows x
                     * 80 columns x 30 layers of SmolLM2 in float32). */
                    for (size_t off = 0; off < (size_t)(n * d) * esize; off += 64) {
                        __builtin_prefetch(K + off, 0, 2);
                        __builtin_prefetch(V + off, 0, 2);
                    }
#if HALF_KV
                    if (half) {
                        attend_f16(qout + (t * hq + kh * g) * d, K, V, n, g, d, scale, p, o);
                        continue;
                    }
#endif
                    attend_f32(qout + (t * hq + kh * g) * d, K, V, n, g, d, scale, p, o);
                }
            }
        }
        free(p);
    }
}

/* ---- Block-quantized matrix multiplies: y[R, N] = x[R, K] @ W[N, K]^T ----
 *
 * PyTorch's 4-bit CPU kernel wants bfloat16 activations (8 bits of mantissa) and spends most of a one-row call
 * unpacking. Here the weights stay in their GGUF blocks of 32 and each row of activations is quantized to int16
 * with one scale per row (error about 1/65536 of the row's largest value; llama.cpp's int8 Q8_1 costs 1/256
 * per block and measured 0 of 32 greedy continuations identical to float32 on SmolLM2, this 32 of 32). A
 * block's dot product is two vpmaddwd in integers, then one fused multiply-add by the block's weight scale.
 *
 * Q4_1 (GGUF): per row n and block b, 16 bytes qs (element j is byte j's low nibble, element j + 16 its high
 * nibble), a scale d and a minimum m: w = d * q + m. So a block's dot product with x is
 * d * dx * (q . qx) + m * sum(x), with sum(x) per block taken once per row of x for all N outputs.
 * "Q8_1" here: the same with one value per byte (u8): holds a Q4_1 weight exactly, with no nibbles to unpack.
 * Q8_0 (GGUF): per block 32 int8 values and a scale d: w = d * q.
 *
 * One row of x: four outputs at a time (four independent accumulator chains; one would wait on each fused
 * multiply-add). Several rows: tiles of two (AVX-512: four) outputs by four rows, so that each block of weights is widened
 * once for four rows (rows are padded to a multiple of four with zeros).
 */
enum { Q4_1 = 0, Q8_1 = 1, Q8_0 = 2 };
/* With AVX-512 (F and BW) the blocks take 512-bit registers: a block of 32 widens to one register of int16 and
 * one vpmaddwd, with activations in their natural order; several rows take tiles of four outputs by four rows
 * (32 registers hold the 16 accumulators). The integer sums are the same as the AVX2 path's, so the results
 * differ only by float32 summation order. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define BLOCKS_512 1
#define TILE_OUT 4
#else
#define TILE_OUT 2
#endif
#ifndef PREFETCH_TILES
#define PREFETCH_TILES 2
#endif

/* x [R, K] -> xq int16 [Rp, K] (rows R..Rp-1 zero), dx [Rp] (row scale), sx [Rp, K/32] (block sums of x). */
/* Row r of x [R, K] -> xq int16 [K], its scale dx[r] and block sums sx [K/32]. */
static void quantize_row(const float *x, int16_t *xq, float *dx, float *sx, int64_t r, int64_t K, int reorder) {
    const int64_t B = K / 32;
    const float *v = x + r * K;
    xq += r * K;
    sx += r * B;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t j = 0; j < K; j++) {
        float a = fabsf(v[j]);
        amax = a > amax ? a : amax;
    }
    float d = amax / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
    if (reorder) {
        /* In each block, the order the AVX2 widen() unpacks the weights in: 0-7, 16-23, 8-15, 24-31. */
        for (int64_t b = 0; b < B; b++)
            for (int part = 0; part < 4; part++) {
                const int64_t from = b * 32 + (part & 1) * 16 + (part >> 1) * 8, to = b * 32 + part * 8;
#pragma omp simd
                for (int j = 0; j < 8; j++) xq[to + j] = (int16_t)lrintf(v[from + j] * inv);
            }
    } else {
#pragma omp simd
        for (int64_t j = 0; j < K; j++) xq[j] = (int16_t)lrintf(v[j] * inv);
    }
    dx[r] = d;
    for (int64_t b = 0; b < B; b++) {
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < 32; j++) sum += v[b * 32 + j];
        sx[b] = sum;
    }
}

/* x [R, K] -> xq int16 [Rp, K] (rows R..Rp-1 zero), dx [Rp] (row scale), sx [Rp, K/32] (block sums of x). */
static void quantize_rows(const float *x, int16_t *xq, float *dx, float *sx, int64_t R, int64_t Rp, int64_t K,
                          int reorder) {
    const int64_t B = K / 32;
    for (int64_t r = 0; r < R; r++) quantize_row(x, xq, dx, sx, r, K, reorder);
    for (int64_t r = R; r < Rp; r++) {
        memset(xq + r * K, 0, sizeof(int16_t) * (size_t)K);
        dx[r] = 0.f;
        memset(sx + r * B, 0, sizeof(float) * (size_t)B);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* Ask for bytes [0, size) of p ahead of their use (prefetches never fault). */
static inline void prefetch(const void *p, int64_t size) {
    for (int64_t off = 0; off < size; off += 64) _mm_prefetch((const char *)p + off, _MM_HINT_T0);
}
#endif

#if defined(BLOCKS_512)
/* Block b of output row n as 32 int16 in order (a Q4_1 block's low nibbles are elements 0-15). */
static inline __attribute__((always_inline)) __m512i widen(int kind, const uint8_t *qs, int64_t n, int64_t b,
                                                           int64_t K) {
    if (kind == Q4_1) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(qs + (n * (K / 32) + b) * 16)), low4 = _mm_set1_epi8(0x0F);
        return _mm512_cvtepu8_epi16(
            _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4)));
    }
    const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + n * K + b * 32));
    return kind == Q8_0 ? _mm512_cvtepi8_epi16(v) : _mm512_cvtepu8_epi16(v);
}

static inline __attribute__((always_inline)) __m512 block_dot(__m512i w, const int16_t *x) {
    return _mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512((const void *)x)));
}

/* Outputs n..n+3 for one row r. */
static inline __attribute__((always_inline)) void tile_4x1(int kind, const uint8_t *qs, const float *d,
                                                           const int16_t *xq, int64_t r, int64_t n, int64_t K,
                                                           float out[4]) {
    const int64_t B = K / 32;
    const int16_t *xr = xq + r * K;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const int64_t row_bytes = kind == Q4_1 ? K / 2 : K, tile_bytes = 4 * row_bytes;
    const char *ahead = (const char *)qs + (n + 4 * PREFETCH_TILES) * row_bytes;
    prefetch(d + (n + 4 * PREFETCH_TILES) * B, 4 * B * (int64_t)sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t off = b * tile_bytes / B / 64 * 64; off < (b + 1) * tile_bytes / B; off += 64)
            _mm_prefetch(ahead + off, _MM_HINT_T0);
        for (int j = 0; j < 4; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(d[(n + j) * B + b]), block_dot(widen(kind, qs, n + j, b, K), xr + b * 32),
                                     acc[j]);
    }
    for (int j = 0; j < 4; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
}

/* Outputs n..n+3 for rows r..r+3. */
static inline __attribute__((always_inline)) void tile_rows4(int kind, const uint8_t *qs, const float *d,
                                                             const int16_t *xq, int64_t r, int64_t n, int64_t K,
                                                             float out[TILE_OUT][4]) {
    const int64_t B = K / 32;
    __m512 a[4][4];
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) a[j][i] = _mm512_setzero_ps();
    const int16_t *x0 = xq + r * K;
    for (int64_t b = 0; b < B; b++) {
        __m512i w[4];
        __m512 dv[4];
        for (int j = 0; j < 4; j++) {
            w[j] = widen(kind, qs, n + j, b, K);
            dv[j] = _mm512_set1_ps(d[(n + j) * B + b]);
        }
        for (int i = 0; i < 4; i++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(x0 + i * K + b * 32));
            for (int j = 0; j < 4; j++)
                a[j][i] = _mm512_fmadd_ps(dv[j], _mm512_cvtepi32_ps(_mm512_madd_epi16(w[j], xv)), a[j][i]);
        }
    }
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) out[j][i] = _mm512_reduce_add_ps(a[j][i]);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* Block b of output row n, widened to int16 with in-lane unpacks (a lane-crossing widen costs more): elements
 * 0-7 and 16-23 in *w0, 8-15 and 24-31 in *w1, the order quantize_rows() puts the activations in. */
static inline __attribute__((always_inline)) void widen(int kind, const uint8_t *qs, int64_t n, int64_t b, int64_t K,
                                                        __m256i *w0, __m256i *w1) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i v;
    if (kind == Q4_1) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(qs + (n * (K / 32) + b) * 16));
        v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    } else {
        v = _mm256_loadu_si256((const __m256i *)(qs + n * K + b * 32));
    }
    const __m256i high = kind == Q8_0 ? _mm256_cmpgt_epi8(zero, v) : zero; /* sign bytes for int8 */
    *w0 = _mm256_unpacklo_epi8(v, high);
    *w1 = _mm256_unpackhi_epi8(v, high);
}

static inline __attribute__((always_inline)) __m256 block_dot(__m256i w0, __m256i w1, const int16_t *x) {
    __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 16));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)));
}

/* Outputs n..n+3 for one row r. */
static inline __attribute__((always_inline)) void tile_4x1(int kind, const uint8_t *qs, const float *d, const int16_t *xq, int64_t r, int64_t n,
                            int64_t K, float out[4]) {
    const int64_t B = K / 32;
    const int16_t *xr = xq + r * K;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    /* One row reads each weight once, from memory: ask for the tile PREFETCH_TILES ahead while this one runs
     * (the hardware prefetcher alone kept the 32 MB output layer at about 6 GB/s). */
    const int64_t row_bytes = kind == Q4_1 ? K / 2 : K, tile_bytes = 4 * row_bytes;
    const char *ahead = (const char *)qs + (n + 4 * PREFETCH_TILES) * row_bytes;
    prefetch(d + (n + 4 * PREFETCH_TILES) * B, 4 * B * (int64_t)sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t off = b * tile_bytes / B / 64 * 64; off < (b + 1) * tile_bytes / B; off += 64)
            _mm_prefetch(ahead + off, _MM_HINT_T0);
        for (int j = 0; j < 4; j++) {
            __m256i w0, w1;
            widen(kind, qs, n + j, b, K, &w0, &w1);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d[(n + j) * B + b]), block_dot(w0, w1, xr + b * 32), acc[j]);
        }
    }
    for (int j = 0; j < 4; j++) out[j] = hsum8(acc[j]);
}

/* Outputs n, n+1 for rows r..r+3. */
static inline __attribute__((always_inline)) void tile_rows4(int kind, const uint8_t *qs, const float *d, const int16_t *xq, int64_t r, int64_t n,
                            int64_t K, float out[TILE_OUT][4]) {
    const int64_t B = K / 32;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    const int16_t *x0 = xq + r * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
    for (int64_t b = 0; b < B; b++) {
        __m256i u0, u1, v0, v1;
        widen(kind, qs, n, b, K, &u0, &u1);
        widen(kind, qs, n + 1, b, K, &v0, &v1);
        __m256 du = _mm256_set1_ps(d[n * B + b]), dv = _mm256_set1_ps(d[(n + 1) * B + b]);
        const int64_t o = b * 32;
        a00 = _mm256_fmadd_ps(du, block_dot(u0, u1, x0 + o), a00);
        a10 = _mm256_fmadd_ps(dv, block_dot(v0, v1, x0 + o), a10);
        a01 = _mm256_fmadd_ps(du, block_dot(u0, u1, x1 + o), a01);
        a11 = _mm256_fmadd_ps(dv, block_dot(v0, v1, x1 + o), a11);
        a02 = _mm256_fmadd_ps(du, block_dot(u0, u1, x2 + o), a02);
        a12 = _mm256_fmadd_ps(dv, block_dot(v0, v1, x2 + o), a12);
        a03 = _mm256_fmadd_ps(du, block_dot(u0, u1, x3 + o), a03);
        a13 = _mm256_fmadd_ps(dv, block_dot(v0, v1, x3 + o), a13);
    }
    out[0][0] = hsum8(a00), out[0][1] = hsum8(a01), out[0][2] = hsum8(a02), out[0][3] = hsum8(a03);
    out[1][0] = hsum8(a10), out[1][1] = hsum8(a11), out[1][2] = hsum8(a12), out[1][3] = hsum8(a13);
}
#else
/* Output n for row r, in plain C (a CPU without AVX2 and FMA). */
static float dot_plain(int kind, const uint8_t *qs, const float *d, const int16_t *xq, int64_t r, int64_t n,
                       int64_t K) {
    const int64_t B = K / 32;
    float out = 0.f;
    for (int64_t b = 0; b < B; b++) {
        int32_t s = 0;
        for (int e = 0; e < 32; e++) {
            int32_t w;
            if (kind == Q4_1) {
                uint8_t v = qs[(n * B + b) * 16 + (e & 15)];
                w = e < 16 ? (v & 15) : (v >> 4);
            } else if (kind == Q8_1) {
                w = qs[n * K + b * 32 + e];
            } else {
                w = ((const int8_t *)qs)[n * K + b * 32 + e];
            }
            s += w * xq[r * K + b * 32 + e];
        }
        out += d[n * B + b] * (float)s;
    }
    return out;
}
#endif

static inline float min_term(const float *m, const float *sx, int64_t r, int64_t n, int64_t B) {
    if (m == NULL) return 0.f;
    const float *mn = m + n * B, *sr = sx + r * B;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t b = 0; b < B; b++) s += mn[b] * sr[b];
    return s;
}

static void block_matmul(int kind, const uint8_t *qs, const float *d, const float *m, const float *x, float *y,
                         int64_t R, int64_t N, int64_t K) {
    const int64_t B = K / 32, Rp = R == 1 ? 1 : (R + 3) / 4 * 4;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(Rp * K));
    float *dx = malloc(sizeof(float) * (size_t)Rp), *sx = malloc(sizeof(float) * (size_t)(Rp * B));
#if defined(__AVX2__) && defined(__FMA__) && !defined(BLOCKS_512)
    quantize_rows(x, xq, dx, sx, R, Rp, K, 1);
#else
    quantize_rows(x, xq, dx, sx, R, Rp, K, 0);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (R == 1) {
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n += 4) {
            float out[4];
            if (m != NULL) prefetch(m + (n + 4 * PREFETCH_TILES) * B, 4 * B * (int64_t)sizeof(float));
            /* one specialized copy per kind: a kind tested inside the block loop costs a third of the speed */
            if (kind == Q4_1) tile_4x1(Q4_1, qs, d, xq, 0, n, K, out);
            else if (kind == Q8_1) tile_4x1(Q8_1, qs, d, xq, 0, n, K, out);
            else tile_4x1(Q8_0, qs, d, xq, 0, n, K, out);
            for (int j = 0; j < 4; j++) y[n + j] = dx[0] * out[j] + min_term(m, sx, 0, n + j, B);
        }
    } else {
        /* The minimum terms of four rows at once: block sums transposed to [B, Rp]. */
        float *st = malloc(sizeof(float) * (size_t)(B * Rp));
        for (int64_t r = 0; r < Rp; r++)
            for (int64_t b = 0; b < B; b++) st[b * Rp + r] = sx[r * B + b];
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n += TILE_OUT) {
            /* the tile's outputs 4 * PREFETCH_TILES ahead, as tile_4x1 does for one row */
            const int64_t ahead = n + 4 * PREFETCH_TILES, row_bytes = kind == Q4_1 ? K / 2 : K;
            prefetch(qs + ahead * row_bytes, TILE_OUT * row_bytes);
            prefetch(d + ahead * B, TILE_OUT * B * (int64_t)sizeof(float));
            if (m != NULL) prefetch(m + ahead * B, TILE_OUT * B * (int64_t)sizeof(float));
            for (int64_t r = 0; r < Rp; r += 4) {
                float out[TILE_OUT][4], mt[TILE_OUT][4];
                if (kind == Q4_1) tile_rows4(Q4_1, qs, d, xq, r, n, K, out);
                else if (kind == Q8_1) tile_rows4(Q8_1, qs, d, xq, r, n, K, out);
                else tile_rows4(Q8_0, qs, d, xq, r, n, K, out);
                for (int j = 0; j < TILE_OUT; j++) {
                    __m128 acc = _mm_setzero_ps();
                    if (m != NULL)
                        for (int64_t b = 0; b < B; b++)
                            acc = _mm_fmadd_ps(_mm_set1_ps(m[(n + j) * B + b]), _mm_loadu_ps(st + b * Rp + r), acc);
                    _mm_storeu_ps(mt[j], acc);
                }
                for (int64_t i = 0; i < 4 && r + i < R; i++)
                    for (int j = 0; j < TILE_OUT; j++) y[(r + i) * N + n + j] = dx[r + i] * out[j][i] + mt[j][i];
            }
        }
        free(st);
    }
#else
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t r = 0; r < R; r++) y[r * N + n] = dx[r] * dot_plain(kind, qs, d, xq, r, n, K) + min_term(m, sx, r, n, B);
#endif
    free(xq);
    free(dx);
    free(sx);
}

/* qs: [N, K/32, 16] bytes; d, m: [N, K/32]; x: [R, K]; y: [R, N]. N % 4 == 0, K % 32 == 0. */
void q4_1_matmul(const uint8_t *qs, const float *d, const float *m, const float *x, float *y, int64_t R,
                 int64_t N, int64_t K) {
    block_matmul(Q4_1, qs, d, m, x, y, R, N, K);
}

/* qs: [N, K] u8; d, m: [N, K/32]; x: [R, K]; y: [R, N]. N % 4 == 0, K % 32 == 0. */
void q8_1_matmul(const uint8_t *qs, const float *d, const float *m, const float *x, float *y, int64_t R,
                 int64_t N, int64_t K) {
    block_matmul(Q8_1, qs, d, m, x, y, R, N, K);
}

/* qs: [N, K] int8; d: [N, K/32]; x: [R, K]; y: [R, N]. N % 4 == 0, K % 32 == 0. */
void q8_0_matmul(const int8_t *qs, const float *d, const float *x, float *y, int64_t R, int64_t N, int64_t K) {
    block_matmul(Q8_0, (const uint8_t *)qs, d, NULL, x, y, R, N, K);
}

/* ---- Q4_1 in panels of 16 outputs, for several rows: y[R, N] = x[R, K] @ W[N, K]^T in float32 ----
 *
 * The same values as q4_1_matmul's blocks, laid out for a register-tiled float32 multiply: each thread unpacks
 * a panel of 16 outputs into float32 once per call (w = d * q + m, exactly the weight's value up to one
 * rounding), then every group of six rows takes it with broadcast activations and twelve accumulators (six rows
 * x two vectors of eight outputs). Activations stay float32, so the result differs from float32 weights only by
 * the order of the sums. Unpacking costs about one operation per weight per call, so this wins from a few rows
 * (the load-time timing decides where).
 *
 * qp: [N/16, K, 8] bytes, byte j of (panel p, column k) = q[16p + j, k] | q[16p + 8 + j, k] << 4;
 * dp, mp: [N/16, K/32, 16] float32 (scale and minimum of output 16p + j over columns 32b..32b+31).
 * N % 16 == 0, K % 32 == 0.
 */
#if defined(BLOCKS_512)
/* A panel's 16 outputs fill one 512-bit register: twelve rows at a time, one accumulator each. */
#define PANEL_ROWS 12
static inline __attribute__((always_inline)) void panel_rows(const float *w, const float *x, float *y, int64_t K,
                                                             int64_t N, int rows) {
    __m512 c[PANEL_ROWS];
    for (int i = 0; i < PANEL_ROWS; i++) c[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m512 w0 = _mm512_load_ps(w + k * 16);
        for (int i = 0; i < rows; i++) c[i] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[i * K + k]), c[i]);
    }
    for (int i = 0; i < rows; i++) _mm512_storeu_ps(y + i * N, c[i]);
}

static void unpack_panel(const uint8_t *q, const float *dp, const float *mp, int64_t K, float *w) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < K / 32; b++) {
        const __m512 d = _mm512_loadu_ps(dp + b * 16), m = _mm512_loadu_ps(mp + b * 16);
        for (int64_t k = b * 32; k < b * 32 + 32; k++) {
            const __m128i raw = _mm_loadl_epi64((const __m128i *)(q + k * 8));
            const __m128i v = _mm_unpacklo_epi64(_mm_and_si128(raw, low4), _mm_and_si128(_mm_srli_epi16(raw, 4), low4));
            _mm512_store_ps(w + k * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)), d, m));
        }
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define PANEL_ROWS 6
static inline __attribute__((always_inline)) void panel_rows(const float *w, const float *x, float *y, int64_t K,
                                                             int64_t N, int rows) {
    __m256 c[6][2];
    for (int i = 0; i < 6; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_load_ps(w + k * 16), w1 = _mm256_load_ps(w + k * 16 + 8);
        for (int i = 0; i < rows; i++) {
            const __m256 b = _mm256_broadcast_ss(x + i * K + k);
            c[i][0] = _mm256_fmadd_ps(w0, b, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(w1, b, c[i][1]);
        }
    }
    for (int i = 0; i < rows; i++) {
        _mm256_storeu_ps(y + i * N, c[i][0]);
        _mm256_storeu_ps(y + i * N + 8, c[i][1]);
    }
}

static void unpack_panel(const uint8_t *q, const float *dp, const float *mp, int64_t K, float *w) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < K / 32; b++) {
        const __m256 d0 = _mm256_loadu_ps(dp + b * 16), d1 = _mm256_loadu_ps(dp + b * 16 + 8);
        const __m256 m0 = _mm256_loadu_ps(mp + b * 16), m1 = _mm256_loadu_ps(mp + b * 16 + 8);
        for (int64_t k = b * 32; k < b * 32 + 32; k++) {
            const __m128i raw = _mm_loadl_epi64((const __m128i *)(q + k * 8));
            const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
            _mm256_store_ps(w + k * 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d0, m0));
            _mm256_store_ps(w + k * 16 + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d1, m1));
        }
    }
}
#else
static void unpack_panel(const uint8_t *q, const float *dp, const float *mp, int64_t K, float *w) {
    for (int64_t k = 0; k < K; k++)
        for (int j = 0; j < 16; j++) {
            const uint8_t v = q[k * 8 + (j & 7)];
            const int64_t at = (k / 32) * 16 + j;
            w[k * 16 + j] = (float)(j < 8 ? v & 15 : v >> 4) * dp[at] + mp[at];
        }
}
#endif

void q4_1p_matmul(const uint8_t *qp, const float *dp, const float *mp, const float *x, float *y, int64_t R,
                  int64_t N, int64_t K) {
    const int64_t B = K / 32;
#pragma omp parallel
    {
        float *w = aligned_alloc(64, sizeof(float) * (size_t)(K * 16));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < N / 16; p++) {
            unpack_panel(qp + p * K * 8, dp + p * B * 16, mp + p * B * 16, K, w);
            float *yp = y + p * 16;
#if defined(PANEL_ROWS)
            int64_t r = 0;
            for (; r + PANEL_ROWS <= R; r += PANEL_ROWS) panel_rows(w, x + r * K, yp + r * N, K, N, PANEL_ROWS);
            /* the rest, with the row count a constant in each copy */
            switch (R - r) {
#define REST(k) case k: panel_rows(w, x + r * K, yp + r * N, K, N, k); break;
            REST(1) REST(2) REST(3) REST(4) REST(5)
#if PANEL_ROWS > 6
            REST(6) REST(7) REST(8) REST(9) REST(10) REST(11)
#endif
#undef REST
            default: break;
            }
#else
            for (int64_t r = 0; r < R; r++)
                for (int j = 0; j < 16; j++) {
                    float s = 0.f;
                    for (int64_t k = 0; k < K; k++) s += w[k * 16 + j] * x[r * K + k];
                    yp[r * N + j] = s;
                }
#endif
        }
        free(w);
    }
}

/* ---- Q4_1 in panels of 16 outputs x int16 activations, for several rows (AVX-512 or AVX2, VNNI where present) ----
 *
 * The same sums as q4_1_matmul (activations quantized to int16 per row, integer dot products per block, then
 * d * dot + m * sum(x)), with the outputs across the register instead of the block: lane j of a 512-bit register
 * holds output j's values at columns k and k+1 as two int16, and each row takes 16 such registers per block with
 * one vpdpwssd each (vpmaddwd + vpaddd without VNNI): 32 multiply-adds an instruction and one int32 sum per block
 * and output, where q4_1_matmul's blocks spend a conversion and a float multiply-add per 32. The scale and minimum
 * of a block are one register for all 16 outputs.
 *
 * The 4-bit values are stored so that widening them takes no shuffle: each 16-bit lane of a 64-byte chunk holds
 * four values, one per nibble, that land in the same lane of four registers; a chunk is 8 columns of the panel,
 * and its four registers come from one load, three shifts and three ands. (Widening the GGUF's own nibble order
 * per call took about 10 shuffle-port operations per register and made the 16-row body 1.6x slower.)
 *
 * qv: [N/16, K/8, 32] uint16: lane L = 2j + e of chunk c holds q[16p + j, 8c + 2i + e] in bits 4i..4i+3, i = 0..3.
 * dp, mp: [N/16, K/32, 16] float16 (scale and minimum of output 16p + j over columns 32b..32b+31: the GGUF's
 * own Q4_1 keeps them in float16, so this is exact, and at one row, where a step is a read of every weight, the
 * body is 66 MB instead of 80 MB with float32 scales). N % 16 == 0, K % 32 == 0.
 */

/* A float16 value as float32, for the loops without F16C (the vector loops convert 8 or 16 at once). */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13); /* inf, nan */
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign; /* zero */
    else { /* subnormal: normalize */
        int e = -1;
        uint32_t mm = man;
        do { e++; mm <<= 1; } while (!(mm & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mm & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(BLOCKS_512)
#define V_ROWS 16
static inline __m512 scales16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
/* w: a panel's chunks (q4_1v), or (mp == NULL, q8_0v) its columns k, k+1 as pairs of signed bytes, [K/2, 32];
 * dp, mp: the panel's float16 scales and minima.
 * mp NULL also drops the minimum's term. Up to 16 rows take one pass over the panel: their int32 sums fill 16
 * registers and the float32 sums wait in an L1 scratch between blocks (16 rows 8.6-9.9 -> 7.9-8.1 ms for the
 * body, 8 rows 5.0 -> 4.4, against 8 rows a pass with the float sums in registers). */
static inline __attribute__((always_inline)) void v_rows(const void *w, const uint16_t *dp, const uint16_t *mp,
                                                         const int16_t *xq, const float *dx, const float *sxs,
                                                         float *y, int64_t K, int64_t N, int rows) {
    const int64_t B = K / 32;
    const __m512i low4 = _mm512_set1_epi16(0x0F);
    __attribute__((aligned(64))) float cm[V_ROWS * 16];
    for (int i = 0; i < rows; i++) _mm512_store_ps(cm + 16 * i, _mm512_setzero_ps());
    for (int64_t b = 0; b < B; b++) {
        __m512i t[V_ROWS];
        for (int i = 0; i < V_ROWS; i++) t[i] = _mm512_setzero_si512();
        for (int64_t kk = 0; kk < 16; kk += 4) { /* columns b * 32 + 2 kk .. + 7 */
            __m512i wv[4];
            if (mp == NULL) {
                for (int e = 0; e < 4; e++)
                    wv[e] = _mm512_cvtepi8_epi16(
                        _mm256_loadu_si256((const __m256i *)((const int8_t *)w + (b * 16 + kk + e) * 32)));
            } else {
                const __m512i raw = _mm512_loadu_si512((const void *)((const uint16_t *)w + (b * 4 + kk / 4) * 32));
                wv[0] = _mm512_and_si512(raw, low4);
                wv[1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
                wv[2] = _mm512_and_si512(_mm512_srli_epi16(raw, 8), low4);
                wv[3] = _mm512_srli_epi16(raw, 12);
            }
            for (int e = 0; e < 4; e++)
                for (int i = 0; i < rows; i++) {
                    const int16_t *pair = xq + i * K + b * 32 + 2 * (kk + e); /* columns k, k+1 of row i */
#if defined(__AVX512VNNI__)
                    /* As asm, with the pair as a broadcast memory operand: GCC 12 wraps the intrinsic in two
                     * register copies an instruction in this loop (the accumulator is tied to the output). */
                    __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(t[i]) : "v"(wv[e]), "m"(*(const int32_t *)pair));
#else
                    int32_t v;
                    memcpy(&v, pair, sizeof v);
                    t[i] = _mm512_add_epi32(t[i], _mm512_madd_epi16(wv[e], _mm512_set1_epi32(v)));
#endif
                }
        }
        const __m512 d = scales16(dp + b * 16);
        if (mp == NULL)
            for (int i = 0; i < rows; i++)
                _mm512_store_ps(cm + 16 * i, _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[i]), d, _mm512_load_ps(cm + 16 * i)));
        else {
            const __m512 m = scales16(mp + b * 16);
            for (int i = 0; i < rows; i++)
                _mm512_store_ps(cm + 16 * i,
                                _mm512_fmadd_ps(m, _mm512_set1_ps(sxs[i * B + b]),
                                                _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[i]), d, _mm512_load_ps(cm + 16 * i))));
        }
    }
    for (int i = 0; i < rows; i++)
        _mm512_storeu_ps(y + i * N, _mm512_mul_ps(_mm512_load_ps(cm + 16 * i), _mm512_set1_ps(dx[i])));
}
#define V_CASES ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) \
    ROWS(9) ROWS(10) ROWS(11) ROWS(12) ROWS(13) ROWS(14) ROWS(15) ROWS(16)
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 scales8(const uint16_t *p) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    float f[8];
    for (int e = 0; e < 8; e++) f[e] = half_to_float(p[e]);
    return _mm256_loadu_ps(f);
#endif
}
/* The same with 256-bit registers (AVX2; vpdpwssd where the CPU has AVX-VNNI, else vpmaddwd + vpaddd): a panel's
 * 16 outputs are two registers, lanes 0-15 and 16-31 of a chunk; with 16 registers, four rows a pass. */
#define V_ROWS 4
#define V_CASES ROWS(1) ROWS(2) ROWS(3) ROWS(4)
static inline __attribute__((always_inline)) void v_rows(const void *w, const uint16_t *dp, const uint16_t *mp,
                                                         const int16_t *xq, const float *dx, const float *sxs,
                                                         float *y, int64_t K, int64_t N, int rows) {
    const int64_t B = K / 32;
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    __attribute__((aligned(32))) float cm[V_ROWS * 16];
    for (int i = 0; i < rows * 2; i++) _mm256_store_ps(cm + 8 * i, _mm256_setzero_ps());
    for (int64_t b = 0; b < B; b++) {
        __m256i t[V_ROWS][2];
        for (int i = 0; i < V_ROWS; i++) t[i][0] = t[i][1] = _mm256_setzero_si256();
        for (int64_t kk = 0; kk < 16; kk += 4) { /* columns b * 32 + 2 kk .. + 7 */
            __m256i raw[2];
            if (mp != NULL)
                for (int h = 0; h < 2; h++)
                    raw[h] = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + (b * 4 + kk / 4) * 32 + 16 * h));
            for (int e = 0; e < 4; e++) {
                __m256i wv[2];
                for (int h = 0; h < 2; h++) {
                    if (mp == NULL)
                        wv[h] = _mm256_cvtepi8_epi16(
                            _mm_loadu_si128((const __m128i *)((const int8_t *)w + (b * 16 + kk + e) * 32 + 16 * h)));
                    else
                        wv[h] = _mm256_and_si256(_mm256_srli_epi16(raw[h], 4 * e), low4);
                }
                for (int i = 0; i < rows; i++) {
                    int32_t v;
                    memcpy(&v, xq + i * K + b * 32 + 2 * (kk + e), sizeof v); /* columns k, k+1 of row i */
                    const __m256i x2 = _mm256_set1_epi32(v);
                    for (int h = 0; h < 2; h++) {
#if defined(__AVXVNNI__)
                        /* As asm: GCC 12 wraps the intrinsic in register copies, as in the 512-bit loop. */
                        __asm__("%{vex%} vpdpwssd %2, %1, %0" : "+x"(t[i][h]) : "x"(wv[h]), "x"(x2));
#else
                        t[i][h] = _mm256_add_epi32(t[i][h], _mm256_madd_epi16(wv[h], x2));
#endif
                    }
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 d = scales8(dp + b * 16 + 8 * h);
            if (mp == NULL)
                for (int i = 0; i < rows; i++)
                    _mm256_store_ps(cm + 16 * i + 8 * h,
                                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[i][h]), d, _mm256_load_ps(cm + 16 * i + 8 * h)));
            else {
                const __m256 m = scales8(mp + b * 16 + 8 * h);
                for (int i = 0; i < rows; i++)
                    _mm256_store_ps(cm + 16 * i + 8 * h,
                                    _mm256_fmadd_ps(m, _mm256_set1_ps(sxs[i * B + b]),
                                                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[i][h]), d,
                                                                    _mm256_load_ps(cm + 16 * i + 8 * h))));
            }
        }
    }
    for (int i = 0; i < rows; i++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_ps(y + i * N + 8 * h, _mm256_mul_ps(_mm256_load_ps(cm + 16 * i + 8 * h), _mm256_set1_ps(dx[i])));
}
#endif

void q4_1v_matmul(const uint16_t *qv, const uint16_t *dp, const uint16_t *mp, const float *x, float *y, int64_t R,
                  int64_t N, int64_t K) {
    const int64_t B = K / 32;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(R * K));
    float *dx = malloc(sizeof(float) * (size_t)R), *sx = malloc(sizeof(float) * (size_t)(R * B));
    /* y = dx * (sum_b d * dot_b + m * sum_b(x) / dx): the minimum's term inside the row's scale */
#define QUANTIZE_ROW(r)                                                                                            \
    do {                                                                                                           \
        quantize_row(x, xq, dx, sx, r, K, 0);                                                                      \
        for (int64_t b = 0; b < B; b++) sx[(r) * B + b] = dx[r] > 0.f ? sx[(r) * B + b] / dx[r] : 0.f;            \
    } while (0)
    if (R < 8)
        for (int64_t r = 0; r < R; r++) QUANTIZE_ROW(r);
#pragma omp parallel
    {
        /* From 8 rows the team quantizes them too (alone, at 16 rows, the four a layer took ~1 ms of a step);
         * below, the barrier this costs is the larger part. */
        if (R >= 8) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) QUANTIZE_ROW(r);
        }
#undef QUANTIZE_ROW
#pragma omp for schedule(static)
        for (int64_t p = 0; p < N / 16; p++) {
            const uint16_t *q = qv + p * K * 4;
            const uint16_t *dpp = dp + p * B * 16, *mpp = mp + p * B * 16;
#if defined(V_ROWS)
            for (int64_t r = 0; r < R; r += V_ROWS) {
                const int16_t *xr = xq + r * K;
                float *yr = y + r * N + p * 16;
                switch (R - r < V_ROWS ? R - r : V_ROWS) {
#define ROWS(k) case k: v_rows(q, dpp, mpp, xr, dx + r, sx + r * B, yr, K, N, k); break;
                V_CASES
#undef ROWS
                default: break;
                }
            }
#else
            for (int64_t r = 0; r < R; r++)
                for (int j = 0; j < 16; j++) {
                    float s = 0.f;
                    for (int64_t b = 0; b < B; b++) {
                        int32_t dot = 0;
                        for (int64_t k = b * 32; k < b * 32 + 32; k++) {
                            const int32_t v = (q[(k / 8) * 32 + 2 * j + (k & 1)] >> (4 * ((k % 8) / 2))) & 15;
                            dot += v * xq[r * K + k];
                        }
                        s += (float)dot * half_to_float(dpp[b * 16 + j]) + half_to_float(mpp[b * 16 + j]) * sx[r * B + b];
                    }
                    y[r * N + p * 16 + j] = s * dx[r];
                }
#endif
        }
    }
    free(xq);
    free(dx);
    free(sx);
}

/* ---- Q8_0 in panels of 16 outputs x int16 activations, for several rows (AVX-512 or AVX2, VNNI where present) ----
 *
 * q4_1v's loop for a GGUF's 8-bit output layer: the same sums as q8_0_matmul (activations quantized to int16 per
 * row, integer dot products per block of 32, then d * dot), the outputs across the register. The values are stored
 * in the widened layout a signed byte each (no unpacking per call: they are bytes already), so a load and one
 * sign extension feed a vpdpwssd per row.
 *
 * qp: [N/16, K/2, 32] int8, qp[p][k/2][2j + (k & 1)] = q[16p + j, k]; dp: [N/16, K/32, 16] float16 (the scale of
 * output 16p + j over columns 32b..32b+31, as GGUF's Q8_0 keeps it). N % 16 == 0, K % 32 == 0.
 */
void q8_0v_matmul(const int8_t *qp, const uint16_t *dp, const float *x, float *y, int64_t R, int64_t N, int64_t K) {
    const int64_t B = K / 32;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(R * K));
    float *dx = malloc(sizeof(float) * (size_t)R), *sx = malloc(sizeof(float) * (size_t)(R * B));
    if (R < 8)
        for (int64_t r = 0; r < R; r++) quantize_row(x, xq, dx, sx, r, K, 0);
#pragma omp parallel
    {
        if (R >= 8) { /* as in q4_1v_matmul */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) quantize_row(x, xq, dx, sx, r, K, 0);
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < N / 16; p++) {
            const int8_t *q = qp + p * K * 16;
            const uint16_t *dpp = dp + p * B * 16;
#if defined(V_ROWS)
            for (int64_t r = 0; r < R; r += V_ROWS) {
                const int16_t *xr = xq + r * K;
                float *yr = y + r * N + p * 16;
                switch (R - r < V_ROWS ? R - r : V_ROWS) {
#define ROWS(k) case k: v_rows(q, dpp, NULL, xr, dx + r, NULL, yr, K, N, k); break;
                V_CASES
#undef ROWS
                default: break;
                }
            }
#else
            for (int64_t r = 0; r < R; r++)
                for (int j = 0; j < 16; j++) {
                    float s = 0.f;
                    for (int64_t b = 0; b < B; b++) {
                        int32_t dot = 0;
                        for (int64_t k = b * 32; k < b * 32 + 32; k++) dot += (int32_t)q[(k / 2) * 32 + 2 * j + (k & 1)] * xq[r * K + k];
                        s += (float)dot * half_to_float(dpp[b * 16 + j]);
                    }
                    y[r * N + p * 16 + j] = s * dx[r];
                }
#endif
        }
    }
    free(xq);
    free(dx);
    free(sx);
}

/* ---- A whole decoder stack in one call, when every body layer of the call's row count is one of ours ----
 *
 * The same sequence as CpuForward._fused's loop (norm, qkv, rotary + KV store + attention, o, residual + norm,
 * gate_up, SiLU, down, residual + the next norm), without its ~270 Python-level calls a step: at one decode row
 * each cost 2 to 7 microseconds, about a fifth of the step. h ends as the final norm of every position.
 */
typedef struct {
    int64_t kind; /* 0 q4_1, 1 q8_1, 2 q8_0, 3 q4_1p, 4 q4_1v */
    int64_t n, k;
    const void *qs;
    const void *d, *m; /* float32, or float16 for q4_1v */
} Linear;

typedef struct {
    const float *ln_in, *ln_post;
    Linear qkv, o, gate_up, down;
} Layer;

static void linear(const Linear *l, const float *x, float *y, int64_t R) {
    switch (l->kind) {
    case 0: q4_1_matmul(l->qs, l->d, l->m, x, y, R, l->n, l->k); break;
    case 1: q8_1_matmul(l->qs, l->d, l->m, x, y, R, l->n, l->k); break;
    case 2: q8_0_matmul(l->qs, l->d, x, y, R, l->n, l->k); break;
    case 3: q4_1p_matmul(l->qs, l->d, l->m, x, y, R, l->n, l->k); break;
    default: q4_1v_matmul(l->qs, l->d, l->m, x, y, R, l->n, l->k); break;
    }
}

void forward_layers(const Layer *layers, int64_t L, void *const *kbufs, void *const *vbufs,
                    const float *final_norm, float *x, float *h, float *qrot, float *att, const float *cos,
                    const float *sin, int64_t cols_cap, int64_t row0, int64_t write_col, const int64_t *start,
                    const uint8_t *valid, int64_t R, int64_t Q, int64_t hq, int64_t hk, int64_t d, int64_t dim,
                    int64_t inter, float eps, float scale, int64_t kv_half) {
    const int64_t n = R * Q;
    float *qkv = malloc(sizeof(float) * (size_t)(n * (hq + 2 * hk) * d));
    float *o = malloc(sizeof(float) * (size_t)(n * dim)), *down = malloc(sizeof(float) * (size_t)(n * dim));
    float *gu = malloc(sizeof(float) * (size_t)(n * 2 * inter)), *act = malloc(sizeof(float) * (size_t)(n * inter));
    rms_norm(x, layers[0].ln_in, h, n, dim, eps);
    for (int64_t i = 0; i < L; i++) {
        const Layer *l = layers + i;
        linear(&l->qkv, h, qkv, n);
        rope_store_attend(qkv, cos, sin, kbufs[i], vbufs[i], cols_cap, row0, write_col, start, valid, R, Q, hq, hk, d,
                          qrot, att, scale, kv_half);
        linear(&l->o, att, o, n);
        add_rms_norm(x, o, l->ln_post, h, n, dim, eps);
        linear(&l->gate_up, h, gu, n);
        silu_mul(gu, act, n, inter);
        linear(&l->down, act, down, n);
        add_rms_norm(x, down, i + 1 < L ? layers[i + 1].ln_in : final_norm, h, n, dim, eps);
    }
    free(qkv);
    free(o);
    free(down);
    free(gu);
    free(act);
}
