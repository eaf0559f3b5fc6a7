/*
 * A step's linear layers on CPU over half-width weights: y = x @ W.T + b for a few rows (a decode step), the C kernel
 * of kvcore/kernels/native_linear.py. W is fp16 or bf16 packed once into panels of 16 outputs ([K, 16] each);
 * the caller packs only weights that every one of them is an fp16 (bf16) value, so widening them to fp32 in
 * registers gives back the fp32 weights exactly and the products and sums are fp32, as in torch's GEMM (in another
 * order). Half the bytes of fp32 weights cross the memory bus per step.
 *
 * Register blocking as in Goto & van de Geijn (2008): x is transposed once per call so input k of 16 rows is one
 * vector; a block keeps at most 16 accumulators (rows x panels: 4 panels at 1-4 rows, 2 at 5-8, 1 at 9-16
 * rows, full chunks as two halves of 8) so the FMAs of a block are independent. `workers` OpenMP threads (the team
 * torch's ops use; one without -fopenmp) take contiguous runs of panels. A block asks for the next block's weights
 * while it computes: in a step the weights come from L3 or memory, and without it the bundled model's projections
 * took 1.22-1.30 ms a step on one thread against 0.84 ms with every weight in L2 (with it: 0.88-0.93 ms).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16

typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));
typedef uint16_t hvec __attribute__((vector_size(LANES * sizeof(uint16_t)), aligned(sizeof(uint16_t))));
typedef uint32_t uvec __attribute__((vector_size(LANES * sizeof(uint32_t))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* 16 fp16 (FP16 = 1) or bf16 (FP16 = 0) weights as fp32: exact either way. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vec fp16_lanes(const uint16_t *p) { return (vec)_mm512_cvtph_ps(_mm256_loadu_si256((const void *)p)); }
#elif defined(__F16C__)
#include <immintrin.h>
static inline vec fp16_lanes(const uint16_t *p) {
    __m256 half[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const void *)p)),
                      _mm256_cvtph_ps(_mm_loadu_si128((const void *)(p + 8)))};
    vec v;
    memcpy(&v, half, sizeof v);
    return v;
}
#else /* GCC's generic conversion of a _Float16 vector goes lane by lane on x86, hence the two paths above */
typedef _Float16 fvec __attribute__((vector_size(LANES * sizeof(_Float16)), aligned(sizeof(_Float16))));
static inline vec fp16_lanes(const uint16_t *p) { fvec h; memcpy(&h, p, sizeof h); return __builtin_convertvector(h, vec); }
#endif
static inline vec widen(int FP16, const uint16_t *p) {
    if (FP16) return fp16_lanes(p);
    hvec h;
    memcpy(&h, p, sizeof h);
    return (vec)(__builtin_convertvector(h, uvec) << 16);
}

/* What a block adds its products to: the outputs' bias and each row's residual (either NULL), offset to its panels. */
typedef struct {
    const float *bias, *residual;
} Base;

static inline Base shifted(Base b, int64_t outputs, int64_t rows) {
    return (Base){b.bias ? b.bias + outputs : NULL, b.residual ? b.residual + rows + outputs : NULL};
}

/* y[r, p * 16 + j] = base + sum_k xt[k * 16 + r] * panel_p[k, j] for M rows and P panels. */
static inline __attribute__((always_inline)) void block(int M, int P, int FP16, const float *xt, int64_t K,
                                                        const uint16_t *w, Base base, float *y, int64_t N, int ahead) {
    vec acc[LANES];
    for (int p = 0; p < P; p++)
        for (int r = 0; r < M; r++) {
            acc[p * M + r] = base.bias ? load(base.bias + p * LANES) : (vec){0};
            if (base.residual) acc[p * M + r] += load(base.residual + r * N + p * LANES);
        }
    for (int64_t k = 0; k < K; k++) {
        if (ahead) /* the next block's weights into L2, as far into them as this block has read */
            for (int b = 0; b < P * LANES; b += 32) __builtin_prefetch(w + (P * K + k * P) * LANES + b, 0, 2);
        for (int p = 0; p < P; p++) {
            vec wv = widen(FP16, w + (p * K + k) * LANES);
            for (int r = 0; r < M; r++) acc[p * M + r] += xt[k * LANES + r] * wv;
        }
    }
    for (int p = 0; p < P; p++)
        for (int r = 0; r < M; r++) store(y + r * N + p * LANES, acc[p * M + r]);
}

/* Panels [n, stop) for M rows, P of them per block. */
static inline __attribute__((always_inline)) void rows(int M, int FP16, const float *xt, int64_t K, const uint16_t *w,
                                                       Base base, float *y, int64_t N, int64_t n, int64_t stop,
                                                       int ahead) {
    const int P = M <= 4 ? 4 : M <= 8 ? 2 : 1;
    for (; n < stop; n += P) {
        if (n + P <= stop) block(M, P, FP16, xt, K, w + n * K * LANES, shifted(base, n * LANES, 0), y + n * LANES, N,
                                 ahead);
        else for (int64_t i = n; i < stop; i++)
            block(M, 1, FP16, xt, K, w + i * K * LANES, shifted(base, i * LANES, 0), y + i * LANES, N, ahead);
    }
}

/* One chunk of m <= 16 rows (m a compile-time constant in each case). */
#define ROWS(M) case M: rows(M, FP16, xt, K, w, base, y, N, n, stop, 1); break;
static inline __attribute__((always_inline)) void chunk(int FP16, int m, const float *xt, int64_t K,
                                                        const uint16_t *w, Base base, float *y, int64_t N,
                                                        int64_t n, int64_t stop) {
    switch (m) {
    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
    ROWS(9) ROWS(10) ROWS(11) ROWS(12) ROWS(13) ROWS(14) ROWS(15)
    default: /* two halves of 8 rows over each pair of panels, the pair read from memory once */
        for (int64_t pair = n; pair < stop; pair += 2) {
            int64_t end = pair + 2 < stop ? pair + 2 : stop;
            rows(8, FP16, xt, K, w, base, y, N, pair, end, 1);
            rows(8, FP16, xt + 8, K, w, shifted(base, 0, 8 * N), y + 8 * N, N, pair, end, 0);
        }
    }
}

/* Row x of a layer's input as the step would have computed it first: x itself, RMSNorm(x) * norm (as transformers'
   LlamaRMSNorm: norm * (x / sqrt(mean(x^2) + eps))), or, gated, SiLU(gate) * up of x = [gate | up] (LlamaMLP). */
static void input_row(const float *x, int64_t K, const float *norm, float eps, int gated, float *out) {
    if (gated) {
        for (int64_t k = 0; k < K; k++) out[k] = x[k] / (1.f + expf(-x[k])) * x[K + k];
    } else if (norm) {
        float squares = 0.f;
        for (int64_t k = 0; k < K; k++) squares += x[k] * x[k];
        float inverse = 1.f / sqrtf(squares / (float)K + eps);
        for (int64_t k = 0; k < K; k++) out[k] = norm[k] * (x[k] * inverse);
    } else {
        memcpy(out, x, K * sizeof(float));
    }
}

/* Returns 0, or 1 if out of memory. x [M, K] fp32 rows x_stride floats apart ([M, 2K] gate | up when gated), taken
   through input_row (norm: the RMSNorm weight [K], or NULL); w: N / 16 panels [K, 16] of fp16 (fp16 = 1) or bf16
   bits; bias [N] and residual [M, N] fp32, added to the products (either NULL); y [M, N] fp32; workers: threads that
   split the panels. */
int kvlab_linear(const float *x, int64_t M, int64_t K, int64_t x_stride, const float *norm, float eps, int64_t gated,
                 const uint16_t *w, int64_t fp16, const float *bias, const float *residual, float *y, int64_t N,
                 int64_t workers) {
    int64_t chunks = (M + LANES - 1) / LANES, panels = N / LANES;
    float *xt = malloc((chunks * LANES + 1) * K * sizeof(float)), *row = xt + chunks * LANES * K;
    if (!xt) return 1;
    for (int64_t r = 0; r < M; r++) { /* input k of row c * 16 + i at xt[(c * K + k) * 16 + i] */
        float *dst = xt + (r / LANES) * K * LANES + r % LANES;
        input_row(x + r * x_stride, K, norm, eps, (int)gated, row);
        for (int64_t k = 0; k < K; k++) dst[k * LANES] = row[k];
    }
#pragma omp parallel num_threads(workers) if (workers > 1)
    {
#ifdef _OPENMP
        int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        int64_t t = 0, T = 1;
#endif
        int64_t n = panels * t / T, stop = panels * (t + 1) / T;
        for (int64_t c = 0; c < chunks; c++) {
            int m = M - c * LANES < LANES ? (int)(M - c * LANES) : LANES;
            Base base = {bias, residual ? residual + c * LANES * N : NULL};
            if (fp16) chunk(1, m, xt + c * K * LANES, K, w, base, y + c * LANES * N, N, n, stop);
            else chunk(0, m, xt + c * K * LANES, K, w, base, y + c * LANES * N, N, n, stop);
        }
    }
    free(xt);
    return 0;
}
