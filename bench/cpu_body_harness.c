/* The body's multiplies alone, in C: one call per linear layer of SmolLM2-135M's 30 decoder layers (qkv 960x576,
 * o 576x576, gate_up 3072x576, down 576x1536), each layer its own weights (53 MB of 4-bit values in all, read from
 * memory as a step reads them), at R rows of activations; prints the best of 15 passes. The weights are random:
 * this times, it does not check (tests/unit/test_cpu_kernels.py does).
 *
 *   bench/cpu_body_ab.sh 16 q4_1v_matmul            # this tree's kernels
 *   bench/cpu_body_ab.sh 16 q4_1v_matmul old.c      # and another source of csrc/cpu_step.c, alternated
 */
#include SRC
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    const int R = argc > 1 ? atoi(argv[1]) : 16, L = 30;
    if (R < 1 || R > 256) return 2;
    const int64_t NK[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
    uint8_t *q[30][4];
    float *d[30][4], *m[30][4];
    float *x = malloc(sizeof(float) * (size_t)R * 1536), *y = malloc(sizeof(float) * (size_t)R * 3072);
    srand(1);
    for (int64_t i = 0; i < (int64_t)R * 1536; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    for (int l = 0; l < L; l++)
        for (int j = 0; j < 4; j++) {
            const int64_t N = NK[j][0], K = NK[j][1];
            q[l][j] = aligned_alloc(64, (size_t)(N * K)); /* a byte a weight: enough for every layout */
            for (int64_t i = 0; i < N * K; i++) q[l][j][i] = (uint8_t)(rand() & 15);
            d[l][j] = malloc(sizeof(float) * (size_t)(N * K / 32));
            m[l][j] = malloc(sizeof(float) * (size_t)(N * K / 32));
            /* Bits that are normal numbers read as float32 (about +-1e-19) and as two float16 (+-0.0078), so that
             * a kernel with either kind of scale computes on ordinary values. */
            const uint32_t dbits = 0x20002000u, mbits = 0xA000A000u;
            for (int64_t i = 0; i < N * K / 32; i++) {
                memcpy(&d[l][j][i], &dbits, sizeof dbits);
                memcpy(&m[l][j][i], &mbits, sizeof mbits);
            }
        }
    double best = 1e9;
    for (int rep = 0; rep < 15; rep++) {
        const double t0 = now();
        for (int l = 0; l < L; l++)
            for (int j = 0; j < 4; j++)
                KERNEL((void *)q[l][j], (void *)d[l][j], (void *)m[l][j], x, y, R, NK[j][0], NK[j][1]);
        const double t = now() - t0;
        best = t < best ? t : best;
    }
    double mac = 0;
    for (int j = 0; j < 4; j++) mac += (double)NK[j][0] * NK[j][1] * L * R;
    printf("%.3f ms  %.1f GMAC/s\n", best * 1e3, mac / best / 1e9);
    return 0;
}
