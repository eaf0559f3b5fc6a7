/*
 * Paged decode attention over one span of one sequence, fp32: the fused CPU kernel.
 *
 * Follows vLLM PagedAttention (Kwon et al., SOSP 2023) for the layout and flash-decoding
 * (Dao et al. 2023) for the split-K softmax: the caller cuts each sequence into spans, this
 * function returns one span's partial state (m, l, o) and the caller merges the partials
 * (kvcore/kernels/paged_native.py). Each K and V row is read once, straight from its block, into
 * registers: no gathered copy, no score row for the whole sequence.
 *
 * Layout: key_cache/value_cache [num_blocks, block_size, Hkv, D] contiguous; q [Hkv, G, D] already
 * multiplied by the softmax scale; blocks: the span's block ids (its first token is at slot 0 of
 * blocks[0]); outputs m, l [Hkv, G] and o [Hkv, G, D].
 *
 * Register blocking: R = 16 / G tokens of one KV head against its G query heads make 16 dot
 * products, summed by one shuffle tree into one vector; the value pass adds R rows per load and
 * store of the output. Requirements (checked by the caller): D % 16 == 0, G in {1, 2, 4, 8, 16}.
 * Built with -ffast-math but linked without it, so loading never sets flush-to-zero for the process;
 * -FLT_MAX (not -inf) marks "no score yet" so finite-math optimizations stay exact.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 128 /* tokens whose scores are held before one online-softmax update */
#define LANES 16

typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

#define EVEN 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODD 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31

/* Lanes 0-7: sums of a's adjacent lane pairs; lanes 8-15: b's. */
static inline vec pair_sum(vec a, vec b) {
    return __builtin_shufflevector(a, b, EVEN) + __builtin_shufflevector(a, b, ODD);
}

/* Lane i of the result is the sum of acc[i]'s lanes (four levels of pair sums). */
static inline vec reduce16(const vec *acc) {
    vec a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = pair_sum(acc[2 * i], acc[2 * i + 1]);
    for (int i = 0; i < 4; i++) b[i] = pair_sum(a[2 * i], a[2 * i + 1]);
    for (int i = 0; i < 2; i++) c[i] = pair_sum(b[2 * i], b[2 * i + 1]);
    return pair_sum(c[0], c[1]);
}

/* out[r * stride + j] = q_j . rows[r] for R rows and G queries of d floats (R * G == 16). */
static inline __attribute__((always_inline)) void dot_rows(int R, int G, const float *const *rows,
                                                           const float *q, int64_t d, float *out,
                                                           int64_t stride) {
    vec acc[LANES];
    for (int i = 0; i < LANES; i++) acc[i] = (vec){0};
    for (int64_t x = 0; x < d; x += LANES) {
        vec qv[LANES];
        for (int j = 0; j < G; j++) qv[j] = load(q + j * d + x);
        for (int r = 0; r < R; r++) {
            vec k = load(rows[r] + x);
            for (int j = 0; j < G; j++) acc[r * G + j] += qv[j] * k;
        }
    }
    vec s = reduce16(acc);
    for (int r = 0; r < R; r++)
        for (int j = 0; j < G; j++) out[r * stride + j] = s[r * G + j];
}

/* o_j += sum_r p[r * stride + j] * rows[r] for G outputs of d floats. */
static inline __attribute__((always_inline)) void add_rows(int R, int G, const float *const *rows,
                                                           const float *p, int64_t stride, float *o,
                                                           int64_t d) {
    for (int64_t x = 0; x < d; x += LANES) {
        vec v[LANES];
        for (int r = 0; r < R; r++) v[r] = load(rows[r] + x);
        for (int j = 0; j < G; j++) {
            vec acc = load(o + j * d + x);
            for (int r = 0; r < R; r++) acc += p[r * stride + j] * v[r];
            store(o + j * d + x, acc);
        }
    }
}

typedef struct {
    const float *key_cache, *value_cache;
    const int64_t *blocks;
    int64_t tokens, block_size, heads, dim;
} Span;

/* Pool slots (block * block_size + offset) of the R tokens of the register group at tile token t; rows
   past the tile's n tokens repeat token t: read, then weighed 0 (clear_padding). */
static inline void group_slots(const int64_t *blocks, int64_t block_size, int R, int64_t t0, int64_t t, int64_t n,
                               int64_t *slot) {
    for (int r = 0; r < R; r++) {
        int64_t tok = t0 + (t + r < n ? t + r : t);
        slot[r] = blocks[tok / block_size] * block_size + tok % block_size;
    }
}

/* An empty partial state: m = -FLT_MAX (no score yet), l = 0, o = 0. */
static inline void start_partial(float *m, float *l, float *o, int64_t hg, int64_t d) {
    for (int64_t i = 0; i < hg; i++) { m[i] = -FLT_MAX; l[i] = 0.f; }
    memset(o, 0, hg * d * sizeof(float));
}

/* Probabilities of the padded rows of the tile's last register group (rows n .. up to a multiple of R) := 0. */
static inline void clear_padding(float *p, int64_t n, int R, int64_t hg) {
    memset(p + n * hg, 0, ((n + R - 1) / R * R - n) * hg * sizeof(float));
}

/* Online softmax over n tokens of scores s[t * hg + i]: s becomes p; m, l, o (and the nz floats per
   row of zsum, when given) are rescaled to the new maxima. */
static void softmax_update(float *s, int64_t n, int64_t hg, int64_t d, float *m, float *l, float *o,
                           float *zsum, int64_t nz, float *work) {
    float *mx = work, *sum = work + hg;
    for (int64_t i = 0; i < hg; i++) { mx[i] = m[i]; sum[i] = 0.f; }
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < hg; i++) mx[i] = fmaxf(mx[i], s[t * hg + i]);
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < hg; i++) {
            float p = expf(s[t * hg + i] - mx[i]);
            s[t * hg + i] = p;
            sum[i] += p;
        }
    for (int64_t i = 0; i < hg; i++) {
        float c = expf(m[i] - mx[i]);
        l[i] = l[i] * c + sum[i];
        m[i] = mx[i];
        if (c != 1.f) {
            for (int64_t x = 0; x < d; x++) o[i * d + x] *= c;
            for (int64_t z = 0; z < nz; z++) zsum[i * nz + z] *= c;
        }
    }
}

static inline __attribute__((always_inline)) int span_g(int G, const Span *sp, const float *q, float *m,
                                                        float *l, float *o) {
    const int R = LANES / G;
    int64_t heads = sp->heads, d = sp->dim, hg = heads * G, row = heads * d;
    float *s = malloc(((TILE + LANES) * hg + 2 * hg) * sizeof(float)); /* scores, then mx and sum */
    if (!s) return 1;
    const float *rows[LANES];
    int64_t slot[LANES];
    start_partial(m, l, o, hg, d);
    for (int64_t t0 = 0; t0 < sp->tokens; t0 += TILE) {
        int64_t n = sp->tokens - t0 < TILE ? sp->tokens - t0 : TILE;
        for (int64_t t = 0; t < n; t += R) {
            group_slots(sp->blocks, sp->block_size, R, t0, t, n, slot);
            for (int64_t h = 0; h < heads; h++) {
                for (int r = 0; r < R; r++) rows[r] = sp->key_cache + slot[r] * row + h * d;
                dot_rows(R, G, rows, q + h * G * d, d, s + t * hg + h * G, hg);
            }
        }
        softmax_update(s, n, hg, d, m, l, o, NULL, 0, s + (TILE + LANES) * hg);
        clear_padding(s, n, R, hg);
        for (int64_t t = 0; t < n; t += R) {
            group_slots(sp->blocks, sp->block_size, R, t0, t, n, slot);
            for (int64_t h = 0; h < heads; h++) {
                for (int r = 0; r < R; r++) rows[r] = sp->value_cache + slot[r] * row + h * d;
                add_rows(R, G, rows, s + t * hg + h * G, hg, o + h * G * d, d);
            }
        }
    }
    free(s);
    return 0;
}

/* Returns 0 on success, 1 if out of memory, 2 for an unsupported shape. */
int kvlab_paged_span_f32(const float *q, const float *key_cache, const float *value_cache,
                         const int64_t *blocks, int64_t tokens, int64_t block_size, int64_t heads,
                         int64_t group, int64_t dim, float *m, float *l, float *o) {
    if (tokens < 1 || dim % LANES != 0) return 2;
    Span sp = {key_cache, value_cache, blocks, tokens, block_size, heads, dim};
    switch (group) {
    case 1: return span_g(1, &sp, q, m, l, o);
    case 2: return span_g(2, &sp, q, m, l, o);
    case 4: return span_g(4, &sp, q, m, l, o);
    case 8: return span_g(8, &sp, q, m, l, o);
    case 16: return span_g(16, &sp, q, m, l, o);
    default: return 2;
    }
}

/*
 * Quantized pools (kvcore/kernels/quantized.py's layout): packed codes [num_blocks, block_size, Hkv,
 * D * bits / 8] and fp16 scales and zero points [num_blocks, block_size, Hkv, ng], per token and head.
 * Codes are read plane by plane (bit field p of every byte), so q and o are in that "plane order"
 * (position p * D / planes + byte); the caller permutes q once and un-permutes o once. Scales and
 * zeros are folded in as in KIVI's fused kernels (Liu et al. 2024), never building fp32 K or V:
 *     q . k = sum_g s_g (q_g . c_g) + sum_g z_g sum(q_g)
 *     sum_t p_t v_t = sum_t (p_t s_tg) c_t + sum_t p_t z_tg      (z sums added once, at the end)
 * Requirements (checked): bits 2, 4 or 8; every group covers a multiple of 16 bytes of each plane.
 */
#define MAX_GROUPS 64

typedef uint8_t bytes16 __attribute__((vector_size(16)));

static inline float half_to_float(uint16_t bits) { _Float16 h; memcpy(&h, &bits, sizeof h); return (float)h; }

/* Codes of plane `shift / bits` of 16 bytes, as floats. */
static inline vec unpack16(const uint8_t *bytes, int shift, uint8_t mask) {
    bytes16 b;
    memcpy(&b, bytes, sizeof b);
    return __builtin_convertvector((b >> shift) & mask, vec);
}

typedef struct {
    const uint8_t *codes;
    const uint16_t *scales, *zeros; /* zeros NULL: symmetric codes, zero = -2^(bits-1) * scale */
} QCache;

typedef struct {
    QCache key, value;
    const int64_t *blocks;
    int64_t tokens, block_size, heads, dim, bits, groups, row_bytes, group_bytes;
} QSpan;

/* fp32 scales and zeros of one token (pool slot) and head. */
static inline void row_params(const QSpan *sp, const QCache *c, int64_t slot, int64_t h, float *scale,
                              float *zero) {
    int64_t at = (slot * sp->heads + h) * sp->groups;
    float offset = -(float)(1 << (sp->bits - 1));
    for (int64_t g = 0; g < sp->groups; g++) {
        scale[g] = half_to_float(c->scales[at + g]);
        zero[g] = c->zeros ? half_to_float(c->zeros[at + g]) : offset * scale[g];
    }
}

/* out[r * stride + j] = q_j . k_r for R quantized rows and G queries (plane order). */
static inline __attribute__((always_inline)) void qdot_rows(int R, int G, const QSpan *sp,
                                                            const uint8_t *const *rows,
                                                            float scale[][MAX_GROUPS],
                                                            float zero[][MAX_GROUPS], const float *q,
                                                            const float *qsum, float *out, int64_t stride) {
    int planes = (int)(8 / sp->bits), bits = (int)sp->bits;
    uint8_t mask = (uint8_t)((1 << bits) - 1);
    int64_t rb = sp->row_bytes, gb = sp->group_bytes, ng = sp->groups;
    float res[LANES] = {0};
    for (int64_t g = 0; g < ng; g++) {
        vec acc[LANES];
        for (int i = 0; i < LANES; i++) acc[i] = (vec){0};
        for (int p = 0; p < planes; p++)
            for (int64_t x = g * gb; x < (g + 1) * gb; x += LANES) {
                vec qv[LANES];
                for (int j = 0; j < G; j++) qv[j] = load(q + j * sp->dim + p * rb + x);
                for (int r = 0; r < R; r++) {
                    vec c = unpack16(rows[r] + x, p * bits, mask);
                    for (int j = 0; j < G; j++) acc[r * G + j] += qv[j] * c;
                }
            }
        vec red = reduce16(acc);
        for (int r = 0; r < R; r++)
            for (int j = 0; j < G; j++)
                res[r * G + j] += scale[r][g] * red[r * G + j] + zero[r][g] * qsum[j * ng + g];
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < G; j++) out[r * stride + j] = res[r * G + j];
}

/* o_j += sum_r p_rj s_rg c_r (plane order) and zsum_jg += sum_r p_rj z_rg, for R rows and G outputs. */
static inline __attribute__((always_inline)) void qadd_rows(int R, int G, const QSpan *sp,
                                                            const uint8_t *const *rows,
                                                            float scale[][MAX_GROUPS],
                                                            float zero[][MAX_GROUPS], const float *p,
                                                            int64_t stride, float *o, float *zsum) {
    int planes = (int)(8 / sp->bits), bits = (int)sp->bits;
    uint8_t mask = (uint8_t)((1 << bits) - 1);
    int64_t rb = sp->row_bytes, gb = sp->group_bytes, ng = sp->groups;
    for (int64_t g = 0; g < ng; g++) {
        float w[LANES];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < G; j++) {
                w[r * G + j] = p[r * stride + j] * scale[r][g];
                zsum[j * ng + g] += p[r * stride + j] * zero[r][g];
            }
        for (int pl = 0; pl < planes; pl++)
            for (int64_t x = g * gb; x < (g + 1) * gb; x += LANES) {
                vec c[LANES];
                for (int r = 0; r < R; r++) c[r] = unpack16(rows[r] + x, pl * bits, mask);
                for (int j = 0; j < G; j++) {
                    float *oj = o + j * sp->dim + pl * rb + x;
                    vec acc = load(oj);
                    for (int r = 0; r < R; r++) acc += w[r * G + j] * c[r];
                    store(oj, acc);
                }
            }
    }
}

/* Code rows, scales and zeros of head h for the R tokens in `slot`. */
static inline void quant_rows(const QSpan *sp, const QCache *c, int R, const int64_t *slot, int64_t h,
                              const uint8_t **rows, float scale[][MAX_GROUPS], float zero[][MAX_GROUPS]) {
    for (int r = 0; r < R; r++) {
        rows[r] = c->codes + (slot[r] * sp->heads + h) * sp->row_bytes;
        row_params(sp, c, slot[r], h, scale[r], zero[r]);
    }
}

static inline __attribute__((always_inline)) int qspan_g(int G, const QSpan *sp, const float *q,
                                                         const float *qsum, float *m, float *l, float *o) {
    const int R = LANES / G;
    int64_t heads = sp->heads, d = sp->dim, hg = heads * G, ng = sp->groups;
    float *s = malloc(((TILE + LANES) * hg + 2 * hg + hg * ng) * sizeof(float)); /* scores, work, zsum */
    if (!s) return 1;
    float *work = s + (TILE + LANES) * hg, *zsum = work + 2 * hg;
    float scale[LANES][MAX_GROUPS], zero[LANES][MAX_GROUPS];
    const uint8_t *rows[LANES];
    int64_t slot[LANES];
    start_partial(m, l, o, hg, d);
    memset(zsum, 0, hg * ng * sizeof(float));
    for (int64_t t0 = 0; t0 < sp->tokens; t0 += TILE) {
        int64_t n = sp->tokens - t0 < TILE ? sp->tokens - t0 : TILE;
        for (int64_t t = 0; t < n; t += R) {
            group_slots(sp->blocks, sp->block_size, R, t0, t, n, slot);
            for (int64_t h = 0; h < heads; h++) {
                quant_rows(sp, &sp->key, R, slot, h, rows, scale, zero);
                qdot_rows(R, G, sp, rows, scale, zero, q + h * G * d, qsum + h * G * ng, s + t * hg + h * G, hg);
            }
        }
        softmax_update(s, n, hg, d, m, l, o, zsum, ng, work);
        clear_padding(s, n, R, hg);
        for (int64_t t = 0; t < n; t += R) {
            group_slots(sp->blocks, sp->block_size, R, t0, t, n, slot);
            for (int64_t h = 0; h < heads; h++) {
                quant_rows(sp, &sp->value, R, slot, h, rows, scale, zero);
                qadd_rows(R, G, sp, rows, scale, zero, s + t * hg + h * G, hg, o + h * G * d, zsum + h * G * ng);
            }
        }
    }
    for (int64_t i = 0; i < hg; i++) /* the zero-point sums, onto each group's positions of every plane */
        for (int64_t x = 0; x < d; x++) o[i * d + x] += zsum[i * ng + (x % sp->row_bytes) / sp->group_bytes];
    free(s);
    return 0;
}

/* Returns 0 on success, 1 if out of memory, 2 for an unsupported shape. q and o in plane order;
   qsum [Hkv, G, ng]: each query's sum over each group's channels. */
int kvlab_paged_span_quantized(const float *q, const float *qsum, const uint8_t *key_codes,
                               const uint16_t *key_scales, const uint16_t *key_zeros,
                               const uint8_t *value_codes, const uint16_t *value_scales,
                               const uint16_t *value_zeros, const int64_t *blocks, int64_t tokens,
                               int64_t block_size, int64_t heads, int64_t group, int64_t dim, int64_t bits,
                               int64_t groups, float *m, float *l, float *o) {
    if (tokens < 1 || (bits != 2 && bits != 4 && bits != 8) || groups < 1 || groups > MAX_GROUPS) return 2;
    int64_t planes = 8 / bits;
    if (dim % planes != 0 || (dim / planes) % groups != 0 || (dim / planes / groups) % LANES != 0) return 2;
    QSpan sp = {{key_codes, key_scales, key_zeros}, {value_codes, value_scales, value_zeros}, blocks, tokens,
                block_size, heads, dim, bits, groups, dim / planes, dim / planes / groups};
    switch (group) {
    case 1: return qspan_g(1, &sp, q, qsum, m, l, o);
    case 2: return qspan_g(2, &sp, q, qsum, m, l, o);
    case 4: return qspan_g(4, &sp, q, qsum, m, l, o);
    case 8: return qspan_g(8, &sp, q, qsum, m, l, o);
    case 16: return qspan_g(16, &sp, q, qsum, m, l, o);
    default: return 2;
    }
}
