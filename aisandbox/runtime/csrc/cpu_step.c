/* The parts of a Llama-family decoder layer between its matrix multiplies, for the torch backend on CPU.
 *
 * Built at load by aisandbox/runtime/cpu_kernels.py with the machine's own compiler (-O3 -march=native
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

/* Rotary on q and k, K and V stored in the layer's cache, then attention for each query.
 *
 * qkv: [R, Q, (hq + 2 hk) * d], the fused projection's output (q heads, then k heads, then v heads).
 * cos, sin: [R, Q, d] for each query's position.
 * kbuf, vbuf: the layer's cache [rows_cap, hk, cols_cap, d]; row r of this call is cache row row0 + r, and its
 *   query i sits at column write_col + i. start[r] is the row's first column: a query sees columns
 *   start[r] .. its own. A query is valid when its column is >= start[r] and valid (if given, [R, Q]) says so;
 *   an invalid one (left padding, or a position whose KV came from the prefix cache) stores nothing and
 *   outputs zeros.
 * qout: [R, Q, hq, d], the rotated queries (for a caller that attends itself; always written).
 * out: [R, Q, hq * d] attention output, or NULL to store only.
 */
void rope_store_attend(const float *qkv, const float *cos, const float *sin, float *kbuf, float *vbuf,
                       int64_t cols_cap, int64_t row0, int64_t write_col, const int64_t *start,
                       const uint8_t *valid, int64_t R, int64_t Q, int64_t hq, int64_t hk, int64_t d, float *qout,
                       float *out, float scale) {
    const int64_t width = (hq + 2 * hk) * d;
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
                rope(src + (hq + h) * d, c, s, kbuf + at, d);
                memcpy(vbuf + at, src + (hq + hk + h) * d, d * sizeof(float));
            }
        }
    }
    if (out == NULL) return;
    const int64_t g = hq / hk;
#pragma omp parallel
    {
        float *p = malloc(sizeof(float) * (size_t)(g * (write_col + Q)));
        float *acc = malloc(sizeof(float) * (size_t)(g * d));
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
                    const float *K = kbuf + (((row0 + r) * hk + kh) * cols_cap + lo) * d;
                    const float *V = vbuf + (((row0 + r) * hk + kh) * cols_cap + lo) * d;
                    const float *q = qout + (t * hq + kh * g) * d;
                    /* scores for the g query heads that share this KV head, reading K once */
                    for (int64_t j = 0; j < n; j++) {
                        const float *k = K + j * d;
                        for (int64_t h = 0; h < g; h++) {
                            const float *qh = q + h * d;
                            float s = 0.f;
#pragma omp simd reduction(+ : s)
                            for (int64_t e = 0; e < d; e++) s += qh[e] * k[e];
                            p[h * n + j] = s * scale;
                        }
                    }
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
                    memset(acc, 0, sizeof(float) * (size_t)(g * d));
                    for (int64_t j = 0; j < n; j++) {
                        const float *v = V + j * d;
                        for (int64_t h = 0; h < g; h++) {
                            float w = p[h * n + j], *a = acc + h * d;
#pragma omp simd
                            for (int64_t e = 0; e < d; e++) a[e] += w * v[e];
                        }
                    }
                    memcpy(o, acc, sizeof(float) * (size_t)(g * d));
                }
            }
        }
        free(p);
        free(acc);
    }
}

/* ---- Block-quantized matrix multiplies: y[R, N] = x[R, K] @ W[N, K]^T ----
 *
 * PyTorch's 4-bit CPU kernel wants bfloat16 activations (8 bits of mantissa) and spends most of a one-row call
 * unpacking. Here the weights stay in their GGUF blocks and the activations are quantized per block of 32 to
 * int16 (a scale per block; error about 1/65536 of the block's largest value, where llama.cpp's int8 Q8_1 costs
 * 1/256 and measured 0 of 32 greedy continuations identical to float32 on SmolLM2). Each block's dot product
 * is two vpmaddwd in integers, scaled once per block in float32.
 *
 * Q4_1 (GGUF): per row n and block b, 16 bytes qs (element j is byte j's low nibble, element j + 16 its high
 * nibble), a scale d and a minimum m: w = d * q + m. A block's dot product with x = dx * qx is
 * d * dx * (q . qx) + m * sum(x), where sum(x) per block is taken once per row of x for all N outputs.
 * Q8_0 (GGUF): per block 32 int8 values and a scale d: w = d * q.
 * "Q8_1" here: Q4_1's layout one value per byte (u8, w = d * q + m): holds a Q4_1 weight exactly and skips the
 * nibble unpacking, which is half the work of a block once several rows of x share it.
 *
 * Four outputs are computed together for one row of x at a time: four independent accumulator chains (one
 * would wait on each fused multiply-add), and those four rows of weights stay in L1 across the rows of x.
 */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* x [R, K] -> xq int16 [R, K], dx [R, K/32] (block scale), sx [R, K/32] (block sum of x). */
static void quantize_rows(const float *x, int16_t *xq, float *dx, float *sx, int64_t R, int64_t K) {
    const int64_t B = K / 32;
    for (int64_t t = 0; t < R * B; t++) {
        const float *v = x + t * 32;
        float amax = 0.f, sum = 0.f;
#pragma omp simd reduction(max : amax) reduction(+ : sum)
        for (int j = 0; j < 32; j++) {
            float a = fabsf(v[j]);
            amax = a > amax ? a : amax;
            sum += v[j];
        }
        float d = amax / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
#pragma omp simd
        for (int j = 0; j < 32; j++) xq[t * 32 + j] = (int16_t)lrintf(v[j] * inv);
        dx[t] = d;
        sx[t] = sum;
    }
}

static void q4_1_tile(const uint8_t *wq, const float *wd, const float *wm, const int16_t *xq, const float *dx,
                      const float *sx, float *y, int64_t R, int64_t n, int64_t N, int64_t K) {
    const int64_t B = K / 32;
    for (int64_t r = 0; r < R; r++) {
        const int16_t *xr = xq + r * K;
        const float *dr = dx + r * B, *sr = sx + r * B;
        float out[4];
#if defined(__AVX2__) && defined(__FMA__)
        const __m128i low4 = _mm_set1_epi8(0x0F);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < B; b++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xr + b * 32));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xr + b * 32 + 16));
            for (int j = 0; j < 4; j++) {
                __m128i raw = _mm_loadu_si128((const __m128i *)(wq + (j * B + b) * 16));
                __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low4));
                __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low4));
                __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(wd[j * B + b] * dr[b]), _mm256_cvtepi32_ps(s), acc[j]);
            }
        }
        for (int j = 0; j < 4; j++) out[j] = hsum8(acc[j]);
#else
        for (int j = 0; j < 4; j++) {
            out[j] = 0.f;
            for (int64_t b = 0; b < B; b++) {
                int32_t s = 0;
                for (int e = 0; e < 16; e++) {
                    uint8_t v = wq[(j * B + b) * 16 + e];
                    s += (v & 15) * xr[b * 32 + e] + (v >> 4) * xr[b * 32 + e + 16];
                }
                out[j] += wd[j * B + b] * dr[b] * (float)s;
            }
        }
#endif
        for (int j = 0; j < 4; j++) {
            const float *mj = wm + j * B;
            float ms = 0.f;
#pragma omp simd reduction(+ : ms)
            for (int64_t b = 0; b < B; b++) ms += mj[b] * sr[b];
            y[r * N + n + j] = out[j] + ms;
        }
    }
}

/* The same blocks one value per byte (u8 in 0..255, w = d * q + m): no nibbles to unpack. */
static void q8_1_tile(const uint8_t *wq, const float *wd, const float *wm, const int16_t *xq, const float *dx,
                      const float *sx, float *y, int64_t R, int64_t n, int64_t N, int64_t K) {
    const int64_t B = K / 32;
    for (int64_t r = 0; r < R; r++) {
        const int16_t *xr = xq + r * K;
        const float *dr = dx + r * B, *sr = sx + r * B;
        float out[4];
#if defined(__AVX2__) && defined(__FMA__)
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < B; b++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xr + b * 32));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xr + b * 32 + 16));
            for (int j = 0; j < 4; j++) {
                const uint8_t *q = wq + j * K + b * 32;
                __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
                __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
                __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(wd[j * B + b] * dr[b]), _mm256_cvtepi32_ps(s), acc[j]);
            }
        }
        for (int j = 0; j < 4; j++) out[j] = hsum8(acc[j]);
#else
        for (int j = 0; j < 4; j++) {
            out[j] = 0.f;
            for (int64_t b = 0; b < B; b++) {
                int32_t s = 0;
                for (int e = 0; e < 32; e++) s += wq[j * K + b * 32 + e] * xr[b * 32 + e];
                out[j] += wd[j * B + b] * dr[b] * (float)s;
            }
        }
#endif
        for (int j = 0; j < 4; j++) {
            const float *mj = wm + j * B;
            float ms = 0.f;
#pragma omp simd reduction(+ : ms)
            for (int64_t b = 0; b < B; b++) ms += mj[b] * sr[b];
            y[r * N + n + j] = out[j] + ms;
        }
    }
}

static void q8_0_tile(const int8_t *wq, const float *wd, const int16_t *xq, const float *dx, float *y, int64_t R,
                      int64_t n, int64_t N, int64_t K) {
    const int64_t B = K / 32;
    for (int64_t r = 0; r < R; r++) {
        const int16_t *xr = xq + r * K;
        const float *dr = dx + r * B;
        float out[4];
#if defined(__AVX2__) && defined(__FMA__)
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < B; b++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xr + b * 32));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xr + b * 32 + 16));
            for (int j = 0; j < 4; j++) {
                const int8_t *q = wq + j * K + b * 32;
                __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
                __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
                __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(wd[j * B + b] * dr[b]), _mm256_cvtepi32_ps(s), acc[j]);
            }
        }
        for (int j = 0; j < 4; j++) out[j] = hsum8(acc[j]);
#else
        for (int j = 0; j < 4; j++) {
            out[j] = 0.f;
            for (int64_t b = 0; b < B; b++) {
                int32_t s = 0;
                for (int e = 0; e < 32; e++) s += wq[j * K + b * 32 + e] * xr[b * 32 + e];
                out[j] += wd[j * B + b] * dr[b] * (float)s;
            }
        }
#endif
        for (int j = 0; j < 4; j++) y[r * N + n + j] = out[j];
    }
}

/* qs: [N, K/32, 16] bytes; d, m: [N, K/32]; x: [R, K]; y: [R, N]. N % 4 == 0, K % 32 == 0. */
void q4_1_matmul(const uint8_t *qs, const float *d, const float *m, const float *x, float *y, int64_t R,
                 int64_t N, int64_t K) {
    const int64_t B = K / 32;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(R * K));
    float *dx = malloc(sizeof(float) * (size_t)(R * B)), *sx = malloc(sizeof(float) * (size_t)(R * B));
    quantize_rows(x, xq, dx, sx, R, K);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n += 4) q4_1_tile(qs + n * B * 16, d + n * B, m + n * B, xq, dx, sx, y, R, n, N, K);
    free(xq);
    free(dx);
    free(sx);
}

/* qs: [N, K] u8; d, m: [N, K/32]; x: [R, K]; y: [R, N]. N % 4 == 0, K % 32 == 0. */
void q8_1_matmul(const uint8_t *qs, const float *d, const float *m, const float *x, float *y, int64_t R,
                 int64_t N, int64_t K) {
    const int64_t B = K / 32;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(R * K));
    float *dx = malloc(sizeof(float) * (size_t)(R * B)), *sx = malloc(sizeof(float) * (size_t)(R * B));
    quantize_rows(x, xq, dx, sx, R, K);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n += 4) q8_1_tile(qs + n * K, d + n * B, m + n * B, xq, dx, sx, y, R, n, N, K);
    free(xq);
    free(dx);
    free(sx);
}

/* qs: [N, K] int8; d: [N, K/32]; x: [R, K]; y: [R, N]. N % 4 == 0, K % 32 == 0. */
void q8_0_matmul(const int8_t *qs, const float *d, const float *x, float *y, int64_t R, int64_t N, int64_t K) {
    const int64_t B = K / 32;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(R * K));
    float *dx = malloc(sizeof(float) * (size_t)(R * B)), *sx = malloc(sizeof(float) * (size_t)(R * B));
    quantize_rows(x, xq, dx, sx, R, K);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n += 4) q8_0_tile(qs + n * K, d + n * B, xq, dx, y, R, n, N, K);
    free(xq);
    free(dx);
    free(sx);
}
