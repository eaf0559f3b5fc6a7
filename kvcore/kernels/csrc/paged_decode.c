/*
 * Paged decode attention on CPU over fp32 or 2/4/8-bit pools: the C kernel of kvcore/kernels/native_paged.py.
 *
 * Follows vLLM PagedAttention (Kwon et al., SOSP 2023) for the layout and flash-decoding (Dao et al.
 * 2023) for the split-K softmax. The caller plans a step's work once: a list of spans (sequence, first
 * token, tokens, partial slot); each of `workers` OpenMP threads (the team torch's ops use, when built with
 * -fopenmp; else the calling thread alone) takes the next span from a shared counter until none is left,
 * leaving each span's partial softmax state (m, l, o); kvlab_merge then reduces every sequence's partials
 * into its output. K and V rows are read once, straight from their blocks, into registers: no gathered copy,
 * no score row per sequence.
 *
 * Layout: pools [num_blocks, block_size, Hkv, D] contiguous (quantized: codes [.., Hkv, D * bits / 8],
 * fp16 scales and zeros [.., Hkv, ng]); q [B, Hkv, G, D] unscaled, rows q_stride floats apart; block tables int64
 * [B, table_stride]; partials m, l [slots, Hkv * G] and o [slots, Hkv * G, D].
 *
 * Register blocking: R = 16 / G' tokens of one KV head against G' of its query heads make at most 16 dot
 * products, summed by one shuffle tree; any G runs (3 for SmolLM2, 7 for Qwen2.5), in subgroups of G'
 * (1, 2, 3, 4, 8 or 16: six register layouts, so the library builds in seconds). Requirements (checked by the caller): D % 16 == 0.
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
#define MAX_GROUPS 64

typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));
typedef uint8_t bytes16 __attribute__((vector_size(16)));

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

/* A step's shared inputs. bits 0: fp32 pools; 2, 4, 8: key and value are codes (zeros NULL: symmetric). */
typedef struct {
    const void *key, *value;
    const uint16_t *kscales, *kzeros, *vscales, *vzeros;
    const float *q;
    const int64_t *tables, *spans;
    int64_t q_stride, table_stride, block_size, heads, group, dim, bits, groups;
    float scale;
    float *m, *l, *o;
    float *out;           /* every sequence has one span: write its normalized rows here (else partials) */
    const int64_t *order; /* output channel of each plane-order position (quantized), or NULL */
} Step;

/* Slots (block * block_size + offset) of the R tokens of the register group at position t; rows past stop repeat t
   (read, then weighed 0). One division per group: the positions are consecutive. */
static inline void group_slots(const Step *st, const int64_t *table, int R, int64_t t, int64_t stop,
                               int64_t *slot) {
    int64_t bs = st->block_size, block = t / bs, offset = t % bs;
    for (int r = 0; r < R; r++) {
        slot[r] = t + r < stop ? table[block] * bs + offset : slot[0];
        if (++offset == bs) { offset = 0; block++; }
    }
}

typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

/* exp(x) for x <= 0 (softmax arguments), 16 lanes: 2^k * p(r) with the Cephes expf polynomial (relative
   error ~1e-7); x below -87 gives exp(-87) ~ 1.6e-38, nothing next to the row's maximum term of 1. */
static inline vec vexp(vec x) {
    const vec lo = (vec){0} - 87.0f;
    ivec below = x < lo;
    x = (vec)(((ivec)x & ~below) | ((ivec)lo & below));
    ivec k = -__builtin_convertvector(0.5f - x * 1.44269504f, ivec); /* round(x / ln 2), x <= 0 */
    vec kf = __builtin_convertvector(k, vec);
    vec r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
    vec p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vec)((k + 127) << 23);
}

/* Online softmax over n tokens of scores s[t * hg + i]: s becomes p; m, l, o (and the nz floats per row of
   zsum, when given) are rescaled to the new maxima. work: 3 * hg + LANES floats; s has LANES * hg floats of
   room past its n rows (the vector loop runs past the last row; those rows are never read as scores). */
static void softmax_update(float *s, int64_t n, int64_t hg, int64_t d, float *m, float *l, float *o,
                           float *zsum, int64_t nz, float *work) {
    float *mx = work, *sum = work + hg, *rep = work + 2 * hg;
    for (int64_t i = 0; i < hg; i++) { mx[i] = m[i]; sum[i] = 0.f; }
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < hg; i++) mx[i] = fmaxf(mx[i], s[t * hg + i]);
    for (int64_t i = 0; i < hg + LANES; i++) rep[i] = mx[i % hg]; /* the maxima repeated: any 16-lane window */
    for (int64_t j = 0; j < n * hg; j += LANES) store(s + j, vexp(load(s + j) - load(rep + j % hg)));
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < hg; i++) sum[i] += s[t * hg + i];
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

/* out[x] (or out[order[x]]) = o[x] / l for one row of d floats: a span that is its sequence's only one. */
static inline void finish_row(const float *o, float l, int64_t d, const int64_t *order, float *out) {
    for (int64_t x = 0; x < d; x++) out[order ? order[x] : x] = o[x] / l;
}

/* ---------------------------------------------------------------------------------------- fp32 pools */

/* out[r * stride + j] = q_j . rows[r] for R rows and g queries of d floats (R * g <= 16). */
static inline __attribute__((always_inline)) void dot_rows(int R, int g, const float *const *rows,
                                                           const float *q, int64_t d, float *out, int64_t stride) {
    vec acc[LANES];
    for (int i = 0; i < LANES; i++) acc[i] = (vec){0};
    for (int64_t x = 0; x < d; x += LANES) {
        vec qv[LANES];
        for (int j = 0; j < g; j++) qv[j] = load(q + j * d + x);
        for (int r = 0; r < R; r++) {
            vec k = load(rows[r] + x);
            for (int j = 0; j < g; j++) acc[r * g + j] += qv[j] * k;
        }
    }
    vec s = reduce16(acc);
    for (int r = 0; r < R; r++)
        for (int j = 0; j < g; j++) out[r * stride + j] = s[r * g + j];
}

/* o_j += sum_r p[r * stride + j] * rows[r] for g outputs of d floats. */
static inline __attribute__((always_inline)) void add_rows(int R, int g, const float *const *rows, const float *p,
                                                           int64_t stride, float *o, int64_t d) {
    for (int64_t x = 0; x < d; x += LANES) {
        vec v[LANES];
        for (int r = 0; r < R; r++) v[r] = load(rows[r] + x);
        for (int j = 0; j < g; j++) {
            vec acc = load(o + j * d + x);
            for (int r = 0; r < R; r++) acc += p[r * stride + j] * v[r];
            store(o + j * d + x, acc);
        }
    }
}

/* ----------------------------------------------------------------------------------- quantized pools */
/*
 * Codes are read plane by plane (bit field p of every byte), so q and o are in that "plane order"
 * (position p * D / planes + byte); q is permuted once per span and kvlab_merge un-permutes o. Scales and
 * zeros are folded in as in KIVI's fused kernels (Liu et al. 2024), never building fp32 K or V:
 *     q . k = sum_g s_g (q_g . c_g) + sum_g z_g sum(q_g)
 *     sum_t p_t v_t = sum_t (p_t s_tg) c_t + sum_t p_t z_tg      (z sums added once, at the end)
 * Requirements (checked by the caller): every group covers a multiple of 16 bytes of each plane.
 */

static inline float half_to_float(uint16_t bits) { _Float16 h; memcpy(&h, &bits, sizeof h); return (float)h; }

/* Codes of plane `shift / bits` of 16 bytes, as floats. */
static inline vec unpack16(const uint8_t *bytes, int shift, uint8_t mask) {
    bytes16 b;
    memcpy(&b, bytes, sizeof b);
    return __builtin_convertvector((b >> shift) & mask, vec);
}

/* Code rows, fp32 scales and zeros of head h for the R tokens in `slot`. */
static inline void quant_rows(const Step *st, const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                              int R, const int64_t *slot, int64_t h, const uint8_t **rows,
                              float scale[][MAX_GROUPS], float zero[][MAX_GROUPS]) {
    int64_t rb = st->dim * st->bits / 8, ng = st->groups;
    float offset = -(float)(1 << (st->bits - 1));
    for (int r = 0; r < R; r++) {
        int64_t at = (slot[r] * st->heads + h) * ng;
        rows[r] = codes + (slot[r] * st->heads + h) * rb;
        for (int64_t g = 0; g < ng; g++) {
            scale[r][g] = half_to_float(scales[at + g]);
            zero[r][g] = zeros ? half_to_float(zeros[at + g]) : offset * scale[r][g];
        }
    }
}

/* out[r * stride + j] = q_j . k_r for R quantized rows and g queries (plane order). */
static inline __attribute__((always_inline)) void qdot_rows(int R, int g, const Step *st, const uint8_t *const *rows,
                                                            float scale[][MAX_GROUPS], float zero[][MAX_GROUPS],
                                                            const float *q, const float *qsum, float *out,
                                                            int64_t stride) {
    int planes = (int)(8 / st->bits), bits = (int)st->bits;
    uint8_t mask = (uint8_t)((1 << bits) - 1);
    int64_t ng = st->groups, rb = st->dim / planes, gb = rb / ng;
    float res[LANES] = {0};
    for (int64_t gi = 0; gi < ng; gi++) {
        vec acc[LANES];
        for (int i = 0; i < LANES; i++) acc[i] = (vec){0};
        for (int p = 0; p < planes; p++)
            for (int64_t x = gi * gb; x < (gi + 1) * gb; x += LANES) {
                vec qv[LANES];
                for (int j = 0; j < g; j++) qv[j] = load(q + j * st->dim + p * rb + x);
                for (int r = 0; r < R; r++) {
                    vec c = unpack16(rows[r] + x, p * bits, mask);
                    for (int j = 0; j < g; j++) acc[r * g + j] += qv[j] * c;
                }
            }
        vec red = reduce16(acc);
        for (int r = 0; r < R; r++)
            for (int j = 0; j < g; j++)
                res[r * g + j] += scale[r][gi] * red[r * g + j] + zero[r][gi] * qsum[j * ng + gi];
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < g; j++) out[r * stride + j] = res[r * g + j];
}

/* o_j += sum_r p_rj s_rg c_r (plane order) and zsum_jg += sum_r p_rj z_rg, for R rows and g outputs. */
static inline __attribute__((always_inline)) void qadd_rows(int R, int g, const Step *st, const uint8_t *const *rows,
                                                            float scale[][MAX_GROUPS], float zero[][MAX_GROUPS],
                                                            const float *p, int64_t stride, float *o, float *zsum) {
    int planes = (int)(8 / st->bits), bits = (int)st->bits;
    uint8_t mask = (uint8_t)((1 << bits) - 1);
    int64_t ng = st->groups, rb = st->dim / planes, gb = rb / ng;
    for (int64_t gi = 0; gi < ng; gi++) {
        float w[LANES];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < g; j++) {
                w[r * g + j] = p[r * stride + j] * scale[r][gi];
                zsum[j * ng + gi] += p[r * stride + j] * zero[r][gi];
            }
        for (int pl = 0; pl < planes; pl++)
            for (int64_t x = gi * gb; x < (gi + 1) * gb; x += LANES) {
                vec c[LANES];
                for (int r = 0; r < R; r++) c[r] = unpack16(rows[r] + x, pl * bits, mask);
                for (int j = 0; j < g; j++) {
                    float *oj = o + j * st->dim + pl * rb + x;
                    vec acc = load(oj);
                    for (int r = 0; r < R; r++) acc += w[r * g + j] * c[r];
                    store(oj, acc);
                }
            }
    }
}

/* The scaled query in plane order and each query's sum over each group's positions. */
static void plane_query(const Step *st, const float *src, float *q, float *qsum) {
    int64_t hg = st->heads * st->group, d = st->dim, planes = 8 / st->bits, rb = d / planes, gb = rb / st->groups;
    for (int64_t i = 0; i < hg; i++)
        for (int64_t p = 0; p < planes; p++)
            for (int64_t x = 0; x < rb; x++) q[i * d + p * rb + x] = src[i * d + x * planes + p] * st->scale;
    for (int64_t i = 0; i < hg; i++)
        for (int64_t gi = 0; gi < st->groups; gi++) {
            float sum = 0.f;
            for (int64_t p = 0; p < planes; p++)
                for (int64_t x = gi * gb; x < (gi + 1) * gb; x++) sum += q[i * d + p * rb + x];
            qsum[i * st->groups + gi] = sum;
        }
}

/* ---------------------------------------------------------------------------------------- one span */

/* Ask for the fp32 rows of the register group at t while the current one is computed: they lie in a block
   anywhere in the pool, which no hardware prefetcher can guess (bundled model, batch 16: attention 0.93 -> 0.74 ms
   a step on one thread). */
static inline void prefetch_group(const Step *st, const int64_t *table, int R, int64_t t, int64_t stop,
                                  const void *pool, int64_t row_bytes) {
    int64_t slot[LANES];
    if (t >= stop) return;
    group_slots(st, table, R, t, stop, slot);
    for (int r = 0; r < R; r++)
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch((const char *)pool + slot[r] * row_bytes + b);
}

/* One span, its query heads in subgroups of GS (R = 16 / GS tokens per register group); QUANT: quantized pools
   (a compile-time choice: each caller's branch is the only one built). */
static inline __attribute__((always_inline)) int span(int GS, int QUANT, const Step *st, const int64_t *sp, float *q,
                                                      float *s, float *m, float *l, float *o) {
    const int R = LANES / GS;
    int64_t heads = st->heads, G = st->group, d = st->dim, hg = heads * G, ng = st->groups, row = heads * d;
    const int64_t *table = st->tables + sp[0] * st->table_stride;
    float *work = s + (TILE + LANES) * hg, *zsum = work + 3 * hg + LANES, *qsum = zsum + hg * ng;
    float scale[LANES][MAX_GROUPS], zero[LANES][MAX_GROUPS];
    const float *rows[LANES];
    const uint8_t *codes[LANES];
    int64_t slot[LANES];
    if (QUANT) {
        plane_query(st, st->q + sp[0] * st->q_stride, q, qsum);
        memset(zsum, 0, hg * ng * sizeof(float));
    } else {
        for (int64_t x = 0; x < hg * d; x++) q[x] = st->q[sp[0] * st->q_stride + x] * st->scale;
    }
    for (int64_t t0 = sp[1]; t0 < sp[1] + sp[2]; t0 += TILE) {
        int64_t stop = sp[1] + sp[2] < t0 + TILE ? sp[1] + sp[2] : t0 + TILE, n = stop - t0;
        for (int64_t t = t0; t < stop; t += R) { /* scores of keys */
            if (!QUANT) prefetch_group(st, table, R, t + R, stop, st->key, row * sizeof(float));
            group_slots(st, table, R, t, stop, slot);
            for (int64_t h = 0; h < heads; h++) {
                if (QUANT) quant_rows(st, st->key, st->kscales, st->kzeros, R, slot, h, codes, scale, zero);
                else for (int r = 0; r < R; r++) rows[r] = (const float *)st->key + slot[r] * row + h * d;
                for (int64_t j = 0; j < G; j += GS) {
                    int g = G - j < GS ? (int)(G - j) : GS;
                    float *out = s + (t - t0) * hg + h * G + j;
                    if (QUANT) qdot_rows(R, g, st, codes, scale, zero, q + (h * G + j) * d, qsum + (h * G + j) * ng,
                                         out, hg);
                    else dot_rows(R, g, rows, q + (h * G + j) * d, d, out, hg);
                }
            }
        }
        softmax_update(s, n, hg, d, m, l, o, QUANT ? zsum : NULL, QUANT ? ng : 0, work);
        memset(s + n * hg, 0, ((n + R - 1) / R * R - n) * hg * sizeof(float)); /* padded rows weigh 0 */
        for (int64_t t = t0; t < stop; t += R) { /* values, weighed */
            if (!QUANT) prefetch_group(st, table, R, t + R, stop, st->value, row * sizeof(float));
            group_slots(st, table, R, t, stop, slot);
            for (int64_t h = 0; h < heads; h++) {
                if (QUANT) quant_rows(st, st->value, st->vscales, st->vzeros, R, slot, h, codes, scale, zero);
                else for (int r = 0; r < R; r++) rows[r] = (const float *)st->value + slot[r] * row + h * d;
                for (int64_t j = 0; j < G; j += GS) {
                    int g = G - j < GS ? (int)(G - j) : GS;
                    const float *p = s + (t - t0) * hg + h * G + j;
                    if (QUANT) qadd_rows(R, g, st, codes, scale, zero, p, hg, o + (h * G + j) * d,
                                         zsum + (h * G + j) * ng);
                    else add_rows(R, g, rows, p, hg, o + (h * G + j) * d, d);
                }
            }
        }
    }
    if (QUANT) {
        int64_t rb = d * st->bits / 8, gb = rb / ng;
        for (int64_t i = 0; i < hg; i++) /* the zero-point sums, onto each group's positions of every plane */
            for (int64_t x = 0; x < d; x++) o[i * d + x] += zsum[i * ng + (x % rb) / gb];
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- the work loop */

/* The query heads of a KV head run in subgroups of GS (a compile-time register layout): 1 to 4 as they are,
   5-15 in subgroups of 4 or 8 (the last one smaller), 16 and more in subgroups of 16. */
#define CASES(Q, st, sp, q, s, m, l, o)                                                                       \
    switch ((st)->group) {                                                                                  \
    case 1: span(1, Q, st, sp, q, s, m, l, o); break;   case 2: span(2, Q, st, sp, q, s, m, l, o); break;     \
    case 3: span(3, Q, st, sp, q, s, m, l, o); break;                                                        \
    case 4: case 5: case 6: case 7: span(4, Q, st, sp, q, s, m, l, o); break;                                \
    default:                                                                                                \
        if ((st)->group < 16) span(8, Q, st, sp, q, s, m, l, o); else span(16, Q, st, sp, q, s, m, l, o);     \
        break;                                                                                              \
    }

/* Take spans from the shared counter until none is left; each writes partial slot sp[3]. */
static int work(Step *st, int64_t num_spans, int64_t *next) {
    int64_t hg = st->heads * st->group, d = st->dim, ng = st->groups;
    float *buf = malloc((hg * d + (TILE + LANES) * hg + 3 * hg + LANES + 2 * hg * ng) * sizeof(float));
    if (!buf) return 1;
    float *q = buf, *s = buf + hg * d;
    for (;;) {
        int64_t i = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
        if (i >= num_spans) break;
        const int64_t *sp = st->spans + 4 * i;
        float *m = st->m + sp[3] * hg, *l = st->l + sp[3] * hg, *o = st->o + sp[3] * hg * d;
        for (int64_t x = 0; x < hg; x++) { m[x] = -FLT_MAX; l[x] = 0.f; }
        memset(o, 0, hg * d * sizeof(float));
        if (st->bits) {
            CASES(1, st, sp, q, s, m, l, o)
        } else {
            CASES(0, st, sp, q, s, m, l, o)
        }
        if (st->out)
            for (int64_t x = 0; x < hg; x++) finish_row(o + x * d, l[x], d, st->order, st->out + (sp[0] * hg + x) * d);
    }
    free(buf);
    return 0;
}

/* Returns 0 on success, 1 if out of memory, 2 for an unsupported shape. bits 0: fp32 pools (key, value float; the
   scale and zero pointers and groups unused); 2, 4, 8: key and value are codes with fp16 scales and zeros (zeros
   NULL: symmetric), partials stay in plane order and out gets channels in order (order[x]: the channel at plane
   position x). spans [num_spans, 4]; out: NULL to leave partials for kvlab_merge, or (every sequence one span)
   where the normalized rows go; workers: threads that take spans (next: their shared counter, zeroed). */
int kvlab_decode(const float *q, int64_t q_stride, const void *key, const void *value, const uint16_t *key_scales,
                 const uint16_t *key_zeros, const uint16_t *value_scales, const uint16_t *value_zeros,
                 const int64_t *tables, const int64_t *spans, int64_t num_spans, int64_t *next, int64_t table_stride,
                 int64_t block_size, int64_t heads, int64_t group, int64_t dim, int64_t bits, int64_t groups,
                 float scale, float *m, float *l, float *o, float *out, const int64_t *order, int64_t workers) {
    if (dim % LANES != 0 || group < 1) return 2;
    if (bits && ((bits != 2 && bits != 4 && bits != 8) || groups < 1 || groups > MAX_GROUPS ||
                 (dim * bits / 8) % (groups * LANES) != 0)) return 2;
    Step st = {key, value, key_scales, key_zeros, value_scales, value_zeros, q, tables, spans, q_stride, table_stride,
               block_size, heads, group, dim, bits, bits ? groups : 1, scale, m, l, o, out, order};
    int status = 0;
#pragma omp parallel num_threads(workers) if (workers > 1) reduction(| : status)
    status |= work(&st, num_spans, next);
    return status;
}

/* out[b] = merge of partial slots first[b] .. first[b] + count[b] - 1 (flash-decoding's reduction), rows of
   hg x d floats; channel x of a merged row goes to position order[x] (NULL: x), undoing the plane order. */
int kvlab_merge(const float *m, const float *l, const float *o, const int64_t *first, const int64_t *count,
                int64_t batch, int64_t hg, int64_t d, const int64_t *order, float *out) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < hg; i++) {
            float top = -FLT_MAX, denominator = 0.f, *dst = out + (b * hg + i) * d;
            for (int64_t s = first[b]; s < first[b] + count[b]; s++) top = fmaxf(top, m[s * hg + i]);
            for (int64_t x = 0; x < d; x++) dst[x] = 0.f;
            for (int64_t s = first[b]; s < first[b] + count[b]; s++) {
                float w = expf(m[s * hg + i] - top);
                const float *src = o + (s * hg + i) * d;
                denominator += w * l[s * hg + i];
                if (order)
                    for (int64_t x = 0; x < d; x++) dst[order[x]] += w * src[x];
                else
                    for (int64_t x = 0; x < d; x++) dst[x] += w * src[x];
            }
            for (int64_t x = 0; x < d; x++) dst[x] /= denominator;
        }
    return 0;
}

/* RoPE on the queries and keys of T new tokens, in place, then their keys and values into their pool slots: vLLM's
   rotary_embedding and reshape_and_cache in one pass (fp32 pools). qkv [T, hq + 2 * hkv, d] rows `stride` floats
   apart; cos and signed_sin [T, d] (signed_sin: [-sin of the first half, sin of the second]), so channel i becomes
   x_i cos_i + x_(i +- d/2) signed_sin_i, transformers' x * cos + rotate_half(x) * sin; pools [slots, hkv, d].
   Returns 0. */
int kvlab_rope_write(float *qkv, int64_t T, int64_t stride, int64_t hq, int64_t hkv, int64_t d, const float *cos,
                      const float *signed_sin, const int64_t *slots, float *key, float *value) {
    int64_t half = d / 2, row = hkv * d;
    for (int64_t t = 0; t < T; t++) {
        float *x = qkv + t * stride;
        const float *c = cos + t * d, *s = signed_sin + t * d;
        for (int64_t h = 0; h < hq + hkv; h++, x += d)
            for (int64_t i = 0; i < half; i++) {
                float a = x[i], b = x[i + half];
                x[i] = a * c[i] + b * s[i];
                x[i + half] = b * c[i + half] + a * s[i + half];
            }
        memcpy(key + slots[t] * row, x - hkv * d, row * sizeof(float));
        memcpy(value + slots[t] * row, x, row * sizeof(float));
    }
    return 0;
}
