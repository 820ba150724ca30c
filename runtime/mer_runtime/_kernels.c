/* Block kernels and the one-call MoE step for mer_runtime (and, at the end, the strided 2-D copy the converter
 * uses for transposed SafeTensors projections).
 *
 * Loaded with ctypes (no Python C-API; ctypes releases the GIL for the whole call). Weights stay in their raw ggml
 * blocks; activations stay float32 unless the caller asks for Q8_0 activations (MER_FLAG_ACT_Q8).
 *
 * Types (ggml ids, layouts in ggml-common.h / gguf's quants.py):
 *   F32 0, F16 1, Q4_0 2, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14, BF16 30, MXFP4 39.
 * Each has a portable C path (dequantize a block, dot it) and an AVX2+FMA+F16C path that works on the blocks in
 * registers, one row per pass (one sequential stream per thread: see rows_per_pass) with a software prefetch a
 * fixed distance ahead; AVX-512 kernels for Q4_0 and MXFP4 (exact and with Q8_0 activations) and the exact
 * K-quants where the CPU has AVX-512 F/BW/VL/DQ/VNNI. The SIMD path is picked at run time with
 * __builtin_cpu_supports (the build never uses -march=native), so one binary runs on any x86-64 and elsewhere.
 *
 * Threads: one persistent pthread pool (threads from sched_getaffinity, or mer_set_threads). A job is a list of
 * tasks handed out by an atomic counter; the caller works too and waits for the rest (that join is the barrier).
 * One job at a time: a caller that finds the pool busy runs its job alone on its own thread (same result).
 *
 * Every entry point takes buffer lengths and returns MER_E* (negative) instead of reading past an end.
 */
#define _GNU_SOURCE
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if (defined(__x86_64__) || defined(__i386__)) && !defined(MER_NO_X86) /* -DMER_NO_X86: check the portable build */
#include <immintrin.h>
#define MER_X86 1
#endif

#define MER_OK 0
#define MER_EUNKNOWN_TYPE -1
#define MER_ESHAPE -2
#define MER_ESHORT -3
#define MER_ENOMEM -4
#define MER_EARG -5

#define MER_FLAG_PORTABLE 1 /* force the portable C path (tests check both on an AVX2 machine) */
#define MER_FLAG_ACT_Q8 2   /* quantize activations to Q8_0 blocks (Q4_0, Q8_0, MXFP4, Q4_K, Q5_K, Q6_K weights) */
#define MER_FLAG_NO_VNNI 4  /* with ACT_Q8: AVX2 maddubs even where AVX-VNNI or AVX512-VNNI exists */
#define MER_FLAG_SERIAL 8   /* run on the calling thread only */
#define MER_FLAG_NO_PERM 16 /* the byte-widening kernels instead of the permuted-x ones (tests; fallback on ENOMEM) */
#define MER_FLAG_NO_AVX512 32 /* the AVX2 kernels even where AVX-512 exists (tests and the A/B benchmark) */

/* layouts of x permuted for the kernels that read quantized bytes as dwords (see perm_prepare) */
enum { L_NONE = 0, L_Q4_0 = 1, L_Q8_0 = 2, L_QK45 = 3, L_Q4_0X = 4, L_Q6K = 5, L_NAT = 6, N_LAYOUTS = 7 };

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30, T_MXFP4 = 39 };

/* elements and bytes per block; 0 if the type has no kernel here */
static int type_block(int type, int64_t *qk, int64_t *bb) {
    switch (type) {
    case T_F32: *qk = 1; *bb = 4; return 1;
    case T_F16: *qk = 1; *bb = 2; return 1;
    case T_BF16: *qk = 1; *bb = 2; return 1;
    case T_Q4_0: *qk = 32; *bb = 18; return 1;
    case T_Q8_0: *qk = 32; *bb = 34; return 1;
    case T_MXFP4: *qk = 32; *bb = 17; return 1;
    case T_Q4_K: *qk = 256; *bb = 144; return 1;
    case T_Q5_K: *qk = 256; *bb = 176; return 1;
    case T_Q6_K: *qk = 256; *bb = 210; return 1;
    default: return 0;
    }
}

int mer_has_type(int type) { int64_t a, b; return type_block(type, &a, &b); }

/* bytes ahead in each row. 2048 over 1024, alternated under the bench lock (2-core Zen 3, streaming 0.7 GB, medians
 * of 4-6 rounds): Q4_0 act="q8" 19.4 -> 20.8 and 19.5 -> 21.7 GB/s, Q4_K q8 22.1 -> 24.2, Q6_K q8 17.7 -> 18.8,
 * Q8_0 exact 16.8 -> 17.8, Q4_0 exact 12.7 -> 13.2 (4096: as 2048 within noise). 8192 over 2048 on the 2-core Zen 5
 * with AVX-512 (2 threads, distances alternated in one process, medians of 5 rounds, 2026-11-30 08:27 UTC): Q4_0
 * exact 29.7 -> 38.6 GB/s, Q8_0 exact 29.5 -> 41.3, q8 Q8_0 41.3 -> 44.1, Q6_K q8 26.6 -> 30.5, the others equal
 * or a little faster; moe() Q4_0 steps/s 75.7 -> 94.9 exact, 113.5 -> 134.6 q8 (docs/runtime.md) */
static int64_t tuning_prefetch = 8192;
static int64_t tuning_chunk = 64;     /* rows per task */

void mer_set_prefetch(int64_t bytes) { tuning_prefetch = bytes < 0 ? 0 : bytes; }
int64_t mer_get_prefetch(void) { return tuning_prefetch; }
void mer_set_chunk(int64_t rows) { tuning_chunk = rows < 4 ? 4 : (rows + 3) / 4 * 4; }

/* Rows per pass of the AVX2 kernels: 1 or 4 (0 = the per-type default of rows_per_pass). */
static int tuning_rows = 0;
void mer_set_rows(int n) { tuning_rows = n == 1 || n == 4 ? n : 0; }


static int rows_per_pass(int type, int q8) {
    if (tuning_rows) return tuning_rows;
    (void)type; (void)q8;
    /* One row at a time for every type and both activation forms: each thread then reads one sequential stream,
     * which the hardware prefetcher follows best. Four interleaved rows (four streams a row apart, meant to keep
     * more reads in flight) measured slower on the 2-core AMD EPYC development machine, alternated under the
     * bench lock (GB/s, 14336x4096, 0.4 GB streamed, 4 rows -> 1 row): Q4_K q8 14.7 -> 24.7, Q6_K q8 15.0 -> 27.7,
     * Q4_K exact 7.5 -> 11.5, Q6_K exact 7.8 -> 12.3, Q4_0 q8 13.3 -> 17.4; Q4_0 exact 10.0 -> 9.8 (a tie). */
    return 1;
}

/* ------------------------------------------------------------------------------------------------------------
 * scalar helpers and the portable path
 * ---------------------------------------------------------------------------------------------------------- */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; exp--; } man &= 0x3ff; bits = sign | (exp << 23) | (man << 13); }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4); return f;
}

/* every f16 as float32: the SIMD kernels read a block's scale with one scalar load and one broadcast from memory
 * (no vector instruction) instead of an insert, a conversion and a shuffle on the vector pipes they are bound by */
static float f16_table[65536];
static float e8m0_table[256]; /* MXFP4's block scales, the same way */

static inline float rd_f16(const uint8_t *p) { return f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

static inline float bf16_to_f32(const uint8_t *p) {
    uint32_t bits = (uint32_t)(p[0] | (p[1] << 8)) << 16; float f; memcpy(&f, &bits, 4); return f;
}

/* 2^(e-128), as ggml's GGML_E8M0_TO_FP32_HALF (denormal for e < 2) */
static inline float e8m0_half(uint8_t e) {
    uint32_t bits = e < 2 ? (0x00200000u << e) : ((uint32_t)(e - 1) << 23); float f; memcpy(&f, &bits, 4); return f;
}

static const int8_t kvalues_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) { *d = q[j] & 63; *m = q[j + 4] & 63; }
    else { *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

/* one element of a float type (the SIMD driver's tail when cols is not a multiple of 8) */
static inline float elem_at(int type, const uint8_t *p) {
    float f;
    switch (type) {
    case T_F32: memcpy(&f, p, 4); return f;
    case T_F16: return rd_f16(p);
    case T_BF16: return bf16_to_f32(p);
    default: return 0.f; /* block types cover each row exactly: no tail */
    }
}

/* one block of `type` to float32 (portable path and tests) */
static void dequant_block(int type, const uint8_t *b, float *y) {
    switch (type) {
    case T_F32: memcpy(y, b, 4); return;
    case T_F16: y[0] = rd_f16(b); return;
    case T_BF16: y[0] = bf16_to_f32(b); return;
    case T_Q4_0: {
        float d = rd_f16(b);
        for (int j = 0; j < 16; j++) { y[j] = d * ((b[2 + j] & 15) - 8); y[j + 16] = d * ((b[2 + j] >> 4) - 8); }
        return;
    }
    case T_Q8_0: {
        float d = rd_f16(b);
        for (int j = 0; j < 32; j++) y[j] = d * (int8_t)b[2 + j];
        return;
    }
    case T_MXFP4: {
        float d = e8m0_half(b[0]);
        for (int j = 0; j < 16; j++) { y[j] = d * kvalues_mxfp4[b[1 + j] & 15]; y[j + 16] = d * kvalues_mxfp4[b[1 + j] >> 4]; }
        return;
    }
    case T_Q4_K: case T_Q5_K: {
        float d = rd_f16(b), dmin = rd_f16(b + 2);
        const uint8_t *sc = b + 4, *qh = b + 16, *qs = b + (type == T_Q5_K ? 48 : 16);
        for (int c = 0; c < 4; c++) {
            uint8_t s1, m1, s2, m2;
            scale_min_k4(2 * c, sc, &s1, &m1); scale_min_k4(2 * c + 1, sc, &s2, &m2);
            float d1 = d * s1, dm1 = dmin * m1, d2 = d * s2, dm2 = dmin * m2;
            for (int l = 0; l < 32; l++) {
                int h1 = 0, h2 = 0;
                if (type == T_Q5_K) { h1 = ((qh[l] >> (2 * c)) & 1) << 4; h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4; }
                y[64 * c + l] = d1 * ((qs[32 * c + l] & 15) + h1) - dm1;
                y[64 * c + 32 + l] = d2 * ((qs[32 * c + l] >> 4) + h2) - dm2;
            }
        }
        return;
    }
    case T_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = rd_f16(b + 208);
        for (int n = 0; n < 2; n++) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[128 * n + l] = d * sc[is] * q1;
                y[128 * n + l + 32] = d * sc[is + 2] * q2;
                y[128 * n + l + 64] = d * sc[is + 4] * q3;
                y[128 * n + l + 96] = d * sc[is + 6] * q4;
            }
            ql += 64; qh += 32; sc += 8;
        }
        return;
    }
    }
}

/* A matrix: `rows` rows of `nblk` blocks of `type`. */
typedef struct {
    const uint8_t *data;
    int64_t rows, cols, nblk, qk, bb, rowbytes;
    int type;
} mat_t;

static int mat_init(mat_t *m, int type, const void *data, int64_t nbytes, int64_t rows, int64_t cols) {
    if (!type_block(type, &m->qk, &m->bb)) return MER_EUNKNOWN_TYPE;
    if (rows < 0 || cols <= 0 || cols % m->qk) return MER_ESHAPE;
    if (!data && rows) return MER_EARG;
    m->data = data; m->type = type; m->rows = rows; m->cols = cols;
    m->nblk = cols / m->qk; m->rowbytes = m->nblk * m->bb;
    if (rows && m->rowbytes > INT64_MAX / rows) return MER_ESHAPE;
    if (nbytes < m->rowbytes * rows) return MER_ESHORT;
    return MER_OK;
}

/* activations quantized to Q8_0 blocks (32 values, one float32 scale, not f16) with s8[i] = 8 * the sum of q over
 * values 4i..4i+3: the lane sums of a maddubs + madd, so Q4_0 weights can be taken as their unsigned nibbles 0..15
 * and the -8 applied as one widening and one subtraction per block (no sign trick). 64 bytes, q first and 32-byte
 * aligned: int32 sums (96 bytes) put the 43 KB of a 14336-wide h past L1 in the down projection; int16 made the
 * moe() step with act="q8" 5.9% faster (Q4_0, 6 of 6 alternated rounds, 20.7 -> 22.0 GB/s). */
typedef struct {
    int8_t q[32];
    int16_t s8[8];  /* |8 * 4 * 127| < 2^15 */
    float d;
    uint8_t pad[12];
} q80_t;

#ifdef MER_X86
/* quantize_amax for n a multiple of 32, the same int8 values bit for bit: max of |x|, then roundf's rule (half away
 * from zero) built from a truncation and the exact remainder, not the vector unit's ties-to-even. A block holding
 * a NaN returns scale NaN and zeros, as the scalar loop does (the conversion would make NaN -128, which the sign
 * trick of the Q8_0/MXFP4 kernels cannot take). The scalar loop called roundf per value: a moe() step with
 * act="q8" spent 0.1-0.25 ms between its phases quantizing h (28672 values) on one thread. */
__attribute__((target("avx2,fma,f16c"))) static float quantize_amax_avx2(const float *x, int n, int8_t *q) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        m = _mm256_max_ps(_mm256_and_ps(v, absm), m);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    if (_mm256_movemask_ps(nan)) { memset(q, 0, (size_t)n); return NAN; }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float s = amax / 127.f, inv = s >= FLT_MIN ? 1.f / s : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int j = 0; j < n; j += 32) {
        __m256i r[4];
        for (int i = 0; i < 4; i++) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * i), vinv);
            const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __m256 up = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(v, t), absm), half, _CMP_GE_OQ);
            const __m256 away = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(v, sign))); /* copysign(1, v) or 0 */
            r[i] = _mm256_cvttps_epi32(_mm256_add_ps(t, away));
        }
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_permutevar8x32_epi32(p, order));
    }
    return s;
}
#endif

/* n values to int8 with one scale amax/127, round to nearest (ggml's rule for Q8_0 and Q8_K); returns the scale.
 * simd: the caller's choice (MER_FLAG_PORTABLE and the CPU, asked once per call), so simd=0 runs this loop. A block
 * holding a NaN gets scale NaN and zeros: its products are then NaN, as in float arithmetic, on every path. */
static float quantize_amax(const float *x, int n, int8_t *q, int simd) {
#ifdef MER_X86
    if (simd && n % 32 == 0) return quantize_amax_avx2(x, n, q);
#endif
    (void)simd;
    float amax = 0.f;
    int nan = 0;
    for (int j = 0; j < n; j++) { float a = fabsf(x[j]); if (a > amax) amax = a; nan |= a != a; }
    if (nan) { memset(q, 0, (size_t)n); return NAN; }
    /* below FLT_MIN, 1/s overflows and a cast of inf to int8 is undefined: such a block quantizes to zeros */
    float s = amax / 127.f, inv = s >= FLT_MIN ? 1.f / s : 0.f;
    for (int j = 0; j < n; j++) q[j] = (int8_t)roundf(x[j] * inv);
    return s;
}

/* Returns 1 if a block of x holds an infinity (its scale is then inf and its quants 0: inf * 0 would make every
 * output of its vector NaN, where float64 gives +-inf or NaN row by row), for the caller to compute that x with
 * float32 activations instead (q8_fallback); the scale is inf only then (|x| <= FLT_MAX gives amax / 127 finite). */
static int quantize_q8(const float *x, int64_t n, q80_t *y, int simd) {
    int inf = 0;
    for (int64_t b = 0; b < n / 32; b++, x += 32) {
        y[b].d = quantize_amax(x, 32, y[b].q, simd);
        inf |= isinf(y[b].d) != 0;
        for (int i = 0; i < 8; i++)
            y[b].s8[i] = (int16_t)(8 * (y[b].q[4 * i] + y[b].q[4 * i + 1] + y[b].q[4 * i + 2] + y[b].q[4 * i + 3]));
    }
    return inf;
}

_Static_assert(sizeof(q80_t) % 64 == 0, "q80_t keeps q 32-byte aligned and each block in one line (aligned_alloc)");

static q80_t *alloc_q80(int64_t nblocks) { /* 64: a block is one cache line, never two */
    return aligned_alloc(64, sizeof(q80_t) * (size_t)(nblocks > 0 ? nblocks : 1));
}

/* Q8_0 activations rearranged once per call for the AVX-512 two-block kernels (q8_pairs): per two blocks their 64
 * bytes of q, one load, and their lane sums s8 negated as int32, which Q4_0's vpdpbusd starts from (the same int32
 * as the product less s8, without the widening and the subtraction per pair); every block's float scale in an array
 * of its own, so that eight blocks' scales meet the weights' in one multiply. 128 + 8 bytes per two blocks. */
typedef struct { int8_t q[64]; int32_t s[16]; } q8pair_t;
typedef struct { q8pair_t *p; float *d; } q8p_t; /* vector v: pairs p + v * (nb / 2), scales d + v * nb */

/* room for n vectors of nb blocks; 0, or MER_ENOMEM with nothing left allocated */
static int q8_pairs_alloc(int64_t n, int64_t nb, q8p_t *out) {
    out->p = aligned_alloc(64, sizeof(q8pair_t) * (size_t)(n * (nb / 2) > 0 ? n * (nb / 2) : 1));
    out->d = aligned_alloc(64, (sizeof(float) * (size_t)(n * nb) + 63) / 64 * 64);
    if (out->p && out->d) return MER_OK;
    free(out->p); free(out->d); out->p = NULL; out->d = NULL;
    return MER_ENOMEM;
}

/* n vectors of nb Q8_0 blocks (a) into out's first n vectors */
static void q8_pairs_fill(const q80_t *a, int64_t n, int64_t nb, q8p_t out) {
    const int64_t np = nb / 2;
    for (int64_t v = 0; v < n; v++) {
        const q80_t *av = a + v * nb;
        for (int64_t j = 0; j < np; j++) {
            q8pair_t *pr = out.p + v * np + j;
            for (int h = 0; h < 2; h++) {
                memcpy(pr->q + 32 * h, av[2 * j + h].q, 32);
                for (int i = 0; i < 8; i++) pr->s[8 * h + i] = -(int32_t)av[2 * j + h].s8[i];
            }
        }
        for (int64_t b = 0; b < nb; b++) out.d[v * nb + b] = av[b].d;
    }
}

/* vectors [v, ...) of a pair buffer made for vectors of nb blocks */
static q8p_t q8_pairs_at(q8p_t a, int64_t v, int64_t nb) {
    if (a.p) { a.p += v * (nb / 2); a.d += v * nb; }
    return a;
}

static void q8_pairs_free(q8p_t *p) { free(p->p); free(p->d); p->p = NULL; p->d = NULL; }

/* activations for K-quant weights, one per 256 values (ggml's Q8_K idea: one float scale per weight block, so the
 * integer sums of a whole block are formed before one conversion to float; the per-16 and per-32 sums of q let the
 * kernels apply Q6_K's offset and Q4_K/Q5_K's minimums in integers). 320 bytes, q first and 32-byte aligned. */
typedef struct {
    int8_t q[256];
    int16_t bs16[16]; /* sum of q over each 16 */
    int16_t bs32[8];  /* sum of q over each 32 */
    float d;
    uint8_t pad[12];
} q8k_t;

/* Returns 1 if a block holds an infinity, as quantize_q8. */
static int quantize_q8k(const float *x, int64_t n, q8k_t *y, int simd) {
    int inf = 0;
    for (int64_t b = 0; b < n / 256; b++, x += 256) {
        y[b].d = quantize_amax(x, 256, y[b].q, simd);
        inf |= isinf(y[b].d) != 0;
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += y[b].q[16 * g + j];
            y[b].bs16[g] = (int16_t)sum;
        }
        for (int g = 0; g < 8; g++) y[b].bs32[g] = (int16_t)(y[b].bs16[2 * g] + y[b].bs16[2 * g + 1]);
    }
    return inf;
}

_Static_assert(sizeof(q8k_t) % 32 == 0, "q8k_t keeps q 32-byte aligned in an array (aligned loads, aligned_alloc)");

static q8k_t *alloc_q8k(int64_t nblocks) {
    return aligned_alloc(32, sizeof(q8k_t) * (size_t)(nblocks > 0 ? nblocks : 1));
}

static void rows_portable(const mat_t *m, const float *x, int64_t nvec, int64_t xstride, float *out,
                          int64_t ostride, int64_t r0, int64_t r1) {
    float buf[256];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = m->data + r * m->rowbytes;
        for (int64_t v = 0; v < nvec; v++) {
            const float *xv = x + v * xstride;
            float acc = 0.f;
            for (int64_t b = 0; b < m->nblk; b++) {
                dequant_block(m->type, row + b * m->bb, buf);
                float s = 0.f;
                for (int64_t j = 0; j < m->qk; j++) s += buf[j] * xv[b * m->qk + j];
                acc += s;
            }
            out[v * ostride + r] = acc;
        }
    }
}

/* One K-quant block (256 weights) against a Q8_K activation block: the same integer sums the SIMD path forms,
 * scaled once per block. */
static float kq_block_q8k(int type, const uint8_t *b, const q8k_t *y) {
    if (type == T_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        int32_t sumi = 0;
        for (int e = 0; e < 256; e++) {
            int n = e / 128, j = (e % 128) / 32, l = e % 32;
            int nib = (j & 2) ? ql[64 * n + l + 32 * (j & 1)] >> 4 : ql[64 * n + l + 32 * (j & 1)] & 15;
            int q = nib | (((qh[32 * n + l] >> (2 * j)) & 3) << 4); /* 0..63; the -32 offset via bs16 */
            sumi += sc[e / 16] * q * y->q[e];
        }
        for (int k = 0; k < 16; k++) sumi -= 32 * sc[k] * y->bs16[k];
        return rd_f16(b + 208) * y->d * (float)sumi;
    }
    const uint8_t *sc = b + 4, *qh = b + 16, *qs = b + (type == T_Q5_K ? 48 : 16);
    int32_t sumi = 0, summ = 0;
    for (int g = 0; g < 8; g++) {
        int c = g / 2, hi = g & 1;
        uint8_t scale, mn;
        scale_min_k4(g, sc, &scale, &mn);
        int32_t isum = 0;
        for (int l = 0; l < 32; l++) {
            int q = hi ? qs[32 * c + l] >> 4 : qs[32 * c + l] & 15;
            if (type == T_Q5_K) q |= ((qh[l] >> g) & 1) << 4;
            isum += q * y->q[32 * g + l];
        }
        sumi += scale * isum;
        summ += mn * y->bs32[g];
    }
    return rd_f16(b) * y->d * (float)sumi - rd_f16(b + 2) * y->d * (float)summ;
}

/* portable Q8 activations: integer dot per block, as the SIMD path computes it */
static void rows_portable_q8(const mat_t *m, const q80_t *ax, const q8k_t *kx, int64_t nvec,
                             int64_t xstride, float *out, int64_t ostride, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = m->data + r * m->rowbytes;
        for (int64_t v = 0; v < nvec; v++) {
            float acc = 0.f;
            if (m->qk == 256) { /* K-quants: Q8_K activations, one block per weight block */
                const q8k_t *kv = kx + v * (xstride / 256);
                for (int64_t b = 0; b < m->nblk; b++) acc += kq_block_q8k(m->type, row + b * m->bb, kv + b);
                out[v * ostride + r] = acc;
                continue;
            }
            const q80_t *av = ax + v * (xstride / 32);
            for (int64_t b = 0; b < m->nblk; b++) {
                const uint8_t *blk = row + b * m->bb;
                const int8_t *qv = av[b].q;
                int32_t s = 0;
                float d;
                if (m->type == T_Q4_0) {
                    d = rd_f16(blk);
                    for (int j = 0; j < 16; j++) s += ((blk[2 + j] & 15) - 8) * qv[j] + ((blk[2 + j] >> 4) - 8) * qv[j + 16];
                } else if (m->type == T_Q8_0) {
                    d = rd_f16(blk);
                    for (int j = 0; j < 32; j++) s += (int8_t)blk[2 + j] * qv[j];
                } else { /* MXFP4 */
                    d = e8m0_half(blk[0]);
                    for (int j = 0; j < 16; j++) s += kvalues_mxfp4[blk[1 + j] & 15] * qv[j] + kvalues_mxfp4[blk[1 + j] >> 4] * qv[j + 16];
                }
                acc += d * av[b].d * (float)s;
            }
            out[v * ostride + r] = acc;
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * AVX2 path: per-type block functions accumulate one block of one row into an 8-lane accumulator; a driver
 * generated per type and rows-per-pass count (1, the default, or 4) walks the rows with a prefetch `pf` bytes ahead.
 * ---------------------------------------------------------------------------------------------------------- */
#ifdef MER_X86
#define AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline
#define AVX2_FN __attribute__((target("avx2,fma,f16c"))) static

AVX2 float hsum256(__m256 acc) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

AVX2 __m256 h2f(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return _mm256_set1_ps(_cvtsh_ss(h)); }
AVX2 __m256 h2f_t(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return _mm256_broadcast_ss(&f16_table[h]); }

/* sum of 32 products q[j] * x[j], q signed bytes in a __m256i, as 8 float lanes */
AVX2 __m256 dot32_i8(__m256i q, const float *x) {
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(x));
    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), s);
    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(x + 16), s);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24), s);
}

/* 16 products of signed bytes (low 16 of a __m128i) */
AVX2 __m256 dot16_i8(__m128i q, const float *x) {
    __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_loadu_ps(x));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), _mm256_loadu_ps(x + 8), s);
}

AVX2 __m256 sum32(const float *x) {
    return _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)),
                         _mm256_add_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)));
}

/* Q4_0 / MXFP4 nibbles: element j = low nibble of byte j, element j+16 = high nibble: one __m256i in element order */
AVX2 __m256i nibbles32(const uint8_t *p) {
    __m128i q = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

AVX2 void blk_q4_0(const uint8_t *b, const float *x, __m256 *acc) {
    __m256i q = _mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8));
    *acc = _mm256_fmadd_ps(h2f(b), dot32_i8(q, x), *acc);
}

AVX2 void blk_q8_0(const uint8_t *b, const float *x, __m256 *acc) {
    __m256i q = _mm256_loadu_si256((const __m256i *)(b + 2));
    *acc = _mm256_fmadd_ps(h2f(b), dot32_i8(q, x), *acc);
}

AVX2 __m256i mxfp4_vals(const uint8_t *p) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)kvalues_mxfp4));
    return _mm256_shuffle_epi8(table, nibbles32(p));
}

AVX2 void blk_mxfp4(const uint8_t *b, const float *x, __m256 *acc) {
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(e8m0_half(b[0])), dot32_i8(mxfp4_vals(b + 1), x), *acc);
}

/* Q4_K and Q5_K: 4 chunks of 64; each chunk is 32 bytes of nibbles (low: elements 0-31, high: 32-63), with its own
 * 6-bit scale and min per 32 elements; Q5_K adds the 5th bit from qh. */
AVX2 void blk_qk45(const uint8_t *b, const float *x, __m256 *acc, int five) {
    float d = _cvtsh_ss(*(const uint16_t *)b), dmin = _cvtsh_ss(*(const uint16_t *)(b + 2));
    const uint8_t *sc = b + 4, *qs = b + (five ? 48 : 16);
    const __m256i m4 = _mm256_set1_epi8(15), sixteen = _mm256_set1_epi8(16);
    __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
    __m256 a = *acc;
    for (int c = 0; c < 4; c++) {
        uint8_t s1, m1, s2, m2;
        scale_min_k4(2 * c, sc, &s1, &m1); scale_min_k4(2 * c + 1, sc, &s2, &m2);
        __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if (five) {
            __m256i b1 = _mm256_set1_epi8((char)(1 << (2 * c))), b2 = _mm256_set1_epi8((char)(2 << (2 * c)));
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen));
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b2), b2), sixteen));
        }
        const float *x1 = x + 64 * c, *x2 = x1 + 32;
        /* values are 0..31: signed-byte conversion is exact */
        a = _mm256_fmadd_ps(_mm256_set1_ps(d * s1), dot32_i8(lo, x1), a);
        a = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * m1), sum32(x1), a);
        a = _mm256_fmadd_ps(_mm256_set1_ps(d * s2), dot32_i8(hi, x2), a);
        a = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * m2), sum32(x2), a);
    }
    *acc = a;
}

AVX2 void blk_q4_k(const uint8_t *b, const float *x, __m256 *acc) { blk_qk45(b, x, acc, 0); }
AVX2 void blk_q5_k(const uint8_t *b, const float *x, __m256 *acc) { blk_qk45(b, x, acc, 1); }

AVX2 void blk_q6_k(const uint8_t *b, const float *x, __m256 *acc) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = _cvtsh_ss(*(const uint16_t *)(b + 208));
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    __m256 a = *acc;
    for (int n = 0; n < 2; n++) {
        __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
        __m256i h = _mm256_loadu_si256((const __m256i *)qh);
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
        q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4));
        for (int i = 0; i < 4; i++) {
            __m256i s = _mm256_sub_epi8(q[i], off);
            const float *xq = x + 128 * n + 32 * i;
            a = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[2 * i]), dot16_i8(_mm256_castsi256_si128(s), xq), a);
            a = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[2 * i + 1]), dot16_i8(_mm256_extracti128_si256(s, 1), xq + 16), a);
        }
        ql += 64; qh += 32; sc += 8;
    }
    *acc = a;
}

/* F32 / F16 / BF16: 8 elements a "block" */
AVX2 void blk8_f32(const uint8_t *b, const float *x, __m256 *acc) {
    *acc = _mm256_fmadd_ps(_mm256_loadu_ps((const float *)b), _mm256_loadu_ps(x), *acc);
}
AVX2 void blk8_f16(const uint8_t *b, const float *x, __m256 *acc) {
    *acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b)), _mm256_loadu_ps(x), *acc);
}
AVX2 void blk8_bf16(const uint8_t *b, const float *x, __m256 *acc) {
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)b)), 16);
    *acc = _mm256_fmadd_ps(_mm256_castsi256_ps(w), _mm256_loadu_ps(x), *acc);
}

#define PF(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define PF_L2(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)

/* Driver: rows [r0, r1) x nvec vectors. QK/BB: elements/bytes per block step; TAIL: scalar tail for the
 * 8-element float types when cols is not a multiple of 8 (blocks always cover a row exactly otherwise). */
#define DEFINE_ROWS(NAME, BLK, QK, BB, TAILTYPE, NR)                                                                   \
    AVX2_FN void NAME(const mat_t *m, const float *x, int64_t nvec, int64_t xs, float *out, int64_t os,           \
                      int64_t r0, int64_t r1, int64_t pf) {                                                       \
        const int64_t nb = m->cols / (QK), rb = m->rowbytes, tail = m->cols - nb * (QK);                          \
        int64_t r = r0;                                                                                           \
        for (; r + (NR) <= r1; r += (NR)) {                                                                             \
            const uint8_t *p[NR];                                                                               \
            for (int i = 0; i < (NR); i++) p[i] = m->data + (r + i) * rb;                    \
            for (int64_t v = 0; v < nvec; v++) {                                                                  \
                const float *xv = x + v * xs;                                                                     \
                __m256 a[NR];                                                                                     \
                for (int i = 0; i < (NR); i++) a[i] = _mm256_setzero_ps();                                       \
                for (int64_t b = 0; b < nb; b++) {                                                                \
                    if (pf && v == 0 && (((b * (BB)) & 63) < (BB) || (BB) >= 64)) {                               \
                        for (int o = 0; o < (BB); o += 64) {                                                      \
                            for (int i = 0; i < (NR); i++) PF(p[i] + b * (BB) + pf + o);                          \
                        }                                                                                         \
                    }                                                                                             \
                    for (int i = 0; i < (NR); i++) BLK(p[i] + b * (BB), xv + b * (QK), &a[i]);                    \
                }                                                                                                 \
                float t[NR];                                                                                      \
                for (int i = 0; i < (NR); i++) t[i] = hsum256(a[i]);                                \
                for (int i = 0; tail && i < (NR); i++) {                                                             \
                    const uint8_t *row = m->data + (r + i) * rb;                                                  \
                    for (int64_t j = nb * (QK); j < m->cols; j++) t[i] += elem_at(TAILTYPE, row + j * m->bb) * xv[j]; \
                }                                                                                                 \
                for (int i = 0; i < (NR); i++) out[v * os + r + i] = t[i];                                           \
            }                                                                                                     \
        }                                                                                                         \
        for (; r < r1; r++) {                                                                                     \
            const uint8_t *p0 = m->data + r * rb;                                                                 \
            for (int64_t v = 0; v < nvec; v++) {                                                                  \
                const float *xv = x + v * xs;                                                                     \
                __m256 a0 = _mm256_setzero_ps();                                                                  \
                for (int64_t b = 0; b < nb; b++) BLK(p0 + b * (BB), xv + b * (QK), &a0);                          \
                float t = hsum256(a0);                                                                            \
                for (int64_t j = nb * (QK); j < m->cols; j++) t += elem_at(TAILTYPE, p0 + j * m->bb) * xv[j];     \
                out[v * os + r] = t;                                                                              \
            }                                                                                                     \
        }                                                                                                         \
    }

DEFINE_ROWS(rows_q4_0, blk_q4_0, 32, 18, T_Q4_0, 4)
DEFINE_ROWS(rows_q4_0_1, blk_q4_0, 32, 18, T_Q4_0, 1)
DEFINE_ROWS(rows_q8_0, blk_q8_0, 32, 34, T_Q8_0, 4)
DEFINE_ROWS(rows_q8_0_1, blk_q8_0, 32, 34, T_Q8_0, 1)
DEFINE_ROWS(rows_mxfp4, blk_mxfp4, 32, 17, T_MXFP4, 4)
DEFINE_ROWS(rows_mxfp4_1, blk_mxfp4, 32, 17, T_MXFP4, 1)
DEFINE_ROWS(rows_q4_k, blk_q4_k, 256, 144, T_Q4_K, 4)
DEFINE_ROWS(rows_q4_k_1, blk_q4_k, 256, 144, T_Q4_K, 1)
DEFINE_ROWS(rows_q5_k, blk_q5_k, 256, 176, T_Q5_K, 4)
DEFINE_ROWS(rows_q5_k_1, blk_q5_k, 256, 176, T_Q5_K, 1)
DEFINE_ROWS(rows_q6_k, blk_q6_k, 256, 210, T_Q6_K, 4)
DEFINE_ROWS(rows_q6_k_1, blk_q6_k, 256, 210, T_Q6_K, 1)
DEFINE_ROWS(rows_f32, blk8_f32, 8, 32, T_F32, 4)
DEFINE_ROWS(rows_f32_1, blk8_f32, 8, 32, T_F32, 1)
DEFINE_ROWS(rows_f16, blk8_f16, 8, 16, T_F16, 4)
DEFINE_ROWS(rows_f16_1, blk8_f16, 8, 16, T_F16, 1)
DEFINE_ROWS(rows_bf16, blk8_bf16, 8, 16, T_BF16, 4)
DEFINE_ROWS(rows_bf16_1, blk8_bf16, 8, 16, T_BF16, 1)

/* ---- permuted-x kernels: no byte shuffles ----
 * The cross-lane byte-to-dword widening (vpmovzxbd) runs on one port and limits the kernels above (in-cache,
 * one thread, indicative: Q4_0 +47%, Q8_0 +27%, Q4_K +43%, Q5_K +17%; Q6_K's first permuted form was not faster,
 * its masked one is (pblk_q6k);
 * MXFP4 is, with its table in a vpermps instead of a byte shuffle: streaming, 2 threads, 7.2 -> 7.6 GB/s). These read
 * the quantized bytes as dwords instead (broadcast load, variable shift, mask: no shuffle) and so visit elements
 * in the dwords' natural order; x is permuted once per call into that order (and, for the K-quants, per-lane sums
 * of x are stored beside it for the min term). The arithmetic is unchanged: float32 products and sums. */
#define XP_Q4_0 32
#define XP_Q8_0 32
static const float pow2m8[4] = {1.f, 0x1p-8f, 0x1p-16f, 0x1p-24f}; /* the pre-scalings 2^-8k (no libm call per block) */
#define XP_QK45 (256 + 64) /* 256 permuted values, then 4 chunks x (low, high) x 8 lanes of sums of x */

/* Q4_0: lane i < 4, group g: low nibble of byte 4i+g (element 4i+g); lane 4+i: high nibble (element 16+4i+g) */
static void perm_q4_0(const float *x, float *xp, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 32, xp += 32)
        for (int g = 0; g < 4; g++)
            for (int i = 0; i < 4; i++) { xp[8 * g + i] = x[4 * i + g]; xp[8 * g + 4 + i] = x[16 + 4 * i + g]; }
}

/* Q8_0: 32 bytes as 8 dwords; group k: byte k of dword i = element 4i+k */
static void perm_q8_0(const float *x, float *xp, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 32, xp += 32)
        for (int k = 0; k < 4; k++)
            for (int i = 0; i < 8; i++) xp[8 * k + i] = x[4 * i + k];
}

/* Q4_K/Q5_K chunk c (64 elements): its 32 bytes of qs as 8 dwords; group k: byte k of dword i, low nibble =
 * element 64c+4i+k (scale 2c), high nibble = element 64c+32+4i+k (scale 2c+1). Both values of group k are stored
 * times 2^-8k (pblk_qk45 reads their quants where they lie, bits 8k..; exact, see QK45_TINY). After the 256 values,
 * per chunk the 8-lane sums of x over the low and over the high elements, unscaled (for the min term). */
static void perm_qk45(const float *x, float *xp, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 256, xp += XP_QK45) {
        for (int c = 0; c < 4; c++) {
            float *slo = xp + 256 + 16 * c, *shi = slo + 8;
            for (int i = 0; i < 8; i++) { slo[i] = 0.f; shi[i] = 0.f; }
            for (int k = 0; k < 4; k++) {
                const float f = pow2m8[k];
                for (int i = 0; i < 8; i++) {
                    float lo = x[64 * c + 4 * i + k], hi = x[64 * c + 32 + 4 * i + k];
                    xp[64 * c + 8 * k + i] = lo * f; xp[64 * c + 32 + 8 * k + i] = hi * f;
                    slo[i] += lo; shi[i] += hi;
                }
            }
        }
    }
}

/* Q4_0, exact: the same float32 products (q - 8) * x as a plain decode, with two vector instructions fewer per 8
 * values than shifting each nibble down, and no shift at all: in the broadcast 16 bytes, lane i < 4 takes the low
 * nibble of byte g of its dword and lane 4 + i the high one, each masked where it lies (bits 8g + 4h .. +3, h = 0
 * low, 1 high) with 8 << (8g + 4h) subtracted (at g = 3, h = 1 the subtraction wraps to the right signed value):
 * the integer (q - 8) * 2^(8g+4h), exact in float32. x is permuted with the factor 2^-(8g+4h) already applied (a
 * power of two: exact), so each product equals (q - 8) * x. The block's scale is one broadcast from f16_table.
 * Down-scaling cannot overflow; it makes values below 2^-98 subnormal in the last group (2^-28), so a vector with
 * ANY nonzero |value| below Q4_0X_TINY is first scaled up by a power of two (perm_prepare_x86): testing only the
 * largest value let a tiny element beside a large one (or a tiny token in a batch) lose bits.
 * Measured and not kept (2-core Zen 3, alternated under the bench lock, streaming 0.7 GB): taking the nibbles
 * unsigned and the -8 through stored lane sums of x (one instruction fewer per 8 values, +7% over the first form
 * of this kernel, which still had a shift a block) loses
 * exactness where it matters: an outlier 10^4 x the rest of its block on a column whose weights are all 0 gave
 * 8e-5 relative error (1e-3 outlier: 6e-6; this kernel: 1.6e-7 on both); two blocks a pass (one 256-bit load, no
 * broadcast or shift, 16 constants) ran 10% slower than this. */
#define XP_Q4_0X 32
#define Q4_0X_TINY 0x1p-98f /* 2^-126 (smallest normal) / 2^-28 (the largest down-scaling) */

static void perm_q4_0x(const float *x, float *xp, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 32, xp += XP_Q4_0X)
        for (int g = 0; g < 4; g++) {
            const float f = pow2m8[g], fh = pow2m8[g] * 0x1p-4f;
            for (int i = 0; i < 4; i++) { xp[8 * g + i] = x[4 * i + g] * f; xp[8 * g + 4 + i] = x[16 + 4 * i + g] * fh; }
        }
}

AVX2 void pblk_q4_0x(const uint8_t *b, const float *xp, __m256 *acc) {
    const __m256i B = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 2)));
    __m256 s = _mm256_setzero_ps();
    _Pragma("GCC unroll 4") for (int g = 0; g < 4; g++) {
        const int lo = 15 << (8 * g), hi = (int)(240u << (8 * g)), l8 = 8 << (8 * g), h8 = (int)(128u << (8 * g));
        __m256i q = _mm256_sub_epi32(_mm256_and_si256(B, _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi)),
                                     _mm256_setr_epi32(l8, l8, l8, l8, h8, h8, h8, h8));
        s = g ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(xp + 8 * g), s)
              : _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(xp));
    }
    *acc = _mm256_fmadd_ps(h2f_t(b), s, *acc);
}

/* MXFP4 on the Q4_0 permutation (same nibble order): the magnitude's 3 bits index a float table with one
 * in-register permute (vpermps reads only the low 3 bits, so no mask), the 4th bit is moved to the sign */
AVX2 void pblk_mxfp4(const uint8_t *b, const float *xp, __m256 *acc) {
    const __m256i B = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 1)));
    const __m256 T = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 6.f, 8.f, 12.f);
    const __m256i sgn = _mm256_set1_epi32((int)0x80000000u);
    __m256 s = _mm256_setzero_ps();
    for (int g = 0; g < 4; g++) {
        __m256i sh = _mm256_setr_epi32(8 * g, 8 * g, 8 * g, 8 * g, 8 * g + 4, 8 * g + 4, 8 * g + 4, 8 * g + 4);
        __m256i D = _mm256_srlv_epi32(B, sh);
        __m256 v = _mm256_permutevar8x32_ps(T, D);
        v = _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(D, 28), sgn)));
        s = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp + 8 * g), s);
    }
    *acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&e8m0_table[b[0]]), s, *acc);
}

AVX2 void pblk_q8_0(const uint8_t *b, const float *xp, __m256 *acc) {
    const __m256i W = _mm256_loadu_si256((const __m256i *)(b + 2));
    __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(W, 24), 24)), _mm256_loadu_ps(xp));
    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(W, 16), 24)), _mm256_loadu_ps(xp + 8), s);
    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(W, 8), 24)), _mm256_loadu_ps(xp + 16), s);
    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(W, 24)), _mm256_loadu_ps(xp + 24), s);
    *acc = _mm256_fmadd_ps(h2f_t(b), s, *acc);
}

/* Q4_K/Q5_K, exact, as pblk_q4_0x: the quant of group k is masked where it lies (bits 8k..8k+3, or +4 with Q5_K's
 * fifth bit), the integer q * 2^8k (below 2^29: exact in float32, never the sign bit) times x stored times 2^-8k
 * is the float32 product q * x. The high nibbles are shifted down 4 once per chunk (srli, no mask needed: the mask
 * of group k drops what came down from byte k + 1), so low and high share one scaling and one mask constant. Q5_K's
 * fifth bits (bit 8k + 2c of H for the low values, + 1 for the high) are moved once per chunk to bit 8k + 4 and
 * or-ed in under the nibbles: per 8 values and + cvt + fma, against srli, and (and srli, and, slli, or) before.
 * Down-scaling cannot overflow; below 2^-102 the scaled x would be subnormal, so a vector with any nonzero |value|
 * below QK45_TINY is first scaled up by a power of two (perm_prepare_x86). */
#define QK45_TINY 0x1p-102f /* 2^-126 (smallest normal) / 2^-24 (the deepest down-scaling) */

AVX2 __m256i shift_epi32(__m256i v, int n) { return n >= 0 ? _mm256_slli_epi32(v, n) : _mm256_srli_epi32(v, -n); }

/* Q4_K/Q5_K: the block's 12 bytes of 6-bit scales and mins unpacked to bytes: scales 0..7, then mins 0..7 (as
 * ggml's scale_min_k4), for both exact kernels */
AVX2 __m128i qk45_scales_mins(const uint8_t *b) {
    uint32_t u[4];
    memcpy(u, b + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0F0F0F0F) | (((u[1] >> 6) & 0x03030303) << 4);
    const uint32_t m03 = u[1] & 0x3F3F3F3F;
    u[1] = (u[2] & 0x0F0F0F0F) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = m03;
    u[0] &= 0x3F3F3F3F;
    return _mm_loadu_si128((const __m128i *)u);
}

/* f[0..7]: the block's 8 scales times d, f[8..15]: its 8 mins times dmin, in two vector multiplies, each then read
 * by one broadcast load: a scalar conversion, multiply and broadcast per scale took as many vector-pipe slots as a
 * third of the decode (both exact kernels, AVX2 and AVX-512) */
AVX2 void qk45_dm(const uint8_t *b, float f[16]) {
    const __m128i sm = qk45_scales_mins(b);
    _mm256_storeu_ps(f, _mm256_mul_ps(h2f_t(b), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm))));
    _mm256_storeu_ps(f + 8, _mm256_mul_ps(h2f_t(b + 2), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)))));
}

/* chunk c (64 values) of a Q4_K/Q5_K block, for both exact kernels: L holds the low nibbles of its 32 bytes, U the
 * high ones shifted down 4 (unmasked: each group's mask drops what came down from the next byte); Q5_K's fifth bits
 * or-ed in at bit 4 of each byte, the nibbles masked first */
AVX2 void qk45_chunk(const uint8_t *b, int five, int c, __m256i *L, __m256i *U) {
    const __m256i l = _mm256_loadu_si256((const __m256i *)(b + (five ? 48 : 16) + 32 * c)), u = _mm256_srli_epi32(l, 4);
    if (!five) {
        *L = l, *U = u;
        return;
    }
    const __m256i n4 = _mm256_set1_epi32(0x0F0F0F0F), b4 = _mm256_set1_epi32(0x10101010);
    const __m256i H = _mm256_loadu_si256((const __m256i *)(b + 16));
    *L = _mm256_or_si256(_mm256_and_si256(l, n4), _mm256_and_si256(shift_epi32(H, 4 - 2 * c), b4));
    *U = _mm256_or_si256(_mm256_and_si256(u, n4), _mm256_and_si256(shift_epi32(H, 3 - 2 * c), b4));
}

AVX2 void pblk_qk45(const uint8_t *b, const float *xp, __m256 *acc, int five) {
    float f[16];
    qk45_dm(b, f);
    __m256 a = *acc;
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
        __m256i L, U;
        qk45_chunk(b, five, c, &L, &U);
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            const __m256i m = _mm256_set1_epi32((five ? 31 : 15) << (8 * k));
            lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(L, m)), _mm256_loadu_ps(xp + 64 * c + 8 * k), lo);
            hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(U, m)), _mm256_loadu_ps(xp + 64 * c + 32 + 8 * k), hi);
        }
        a = _mm256_fmadd_ps(_mm256_broadcast_ss(f + 2 * c), lo, a);
        a = _mm256_fnmadd_ps(_mm256_broadcast_ss(f + 8 + 2 * c), _mm256_loadu_ps(xp + 256 + 16 * c), a);
        a = _mm256_fmadd_ps(_mm256_broadcast_ss(f + 2 * c + 1), hi, a);
        a = _mm256_fnmadd_ps(_mm256_broadcast_ss(f + 9 + 2 * c), _mm256_loadu_ps(xp + 256 + 16 * c + 8), a);
    }
    *acc = a;
}

AVX2 void pblk_q4_k(const uint8_t *b, const float *xp, __m256 *acc) { pblk_qk45(b, xp, acc, 0); }
AVX2 void pblk_q5_k(const uint8_t *b, const float *xp, __m256 *acc) { pblk_qk45(b, xp, acc, 1); }

/* Q6_K, exact, as pblk_q4_0x: each half (128 values) is ql[0..63] and qh[0..31] read as dwords; dword i of ql,
 * ql + 32 and qh holds l = 4i..4i+3, byte k = l 4i+k. The four 6-bit quants of a byte position (j = 0..3: low
 * nibble of ql, of ql + 32, high nibble of ql, of ql + 32, with qh's bits 2j..2j+1 on top) are assembled once per
 * 32 values in the byte where they lie (and, shift, and, or); per 8 values group k is masked where it lies and
 * 32 << 8k subtracted: the integer (q - 32) * 2^8k (|.| <= 2^29: exact), times x stored times 2^-8k, is the
 * float32 product (q - 32) * x of a plain decode. Lanes 0-3 hold l < 16 and lanes 4-7 l >= 16, which is exactly
 * the split between the sub-block scales 2j and 2j + 1: each j's 8-lane sum is multiplied by the vector of those
 * two scales (d * sc, one permute of the block's 8 scales a half), so the per-16 scale costs no broadcast.
 * Before (the bytes widened with vpmovsxbd, a scale broadcast per 16 values, every product on one accumulator
 * chain): see docs/runtime.md. Below 2^-102 the scaled x would be subnormal: a vector holding such a value is
 * first scaled up by a power of two (Q6K_TINY, every element tested, as QK45_TINY; perm_prepare_x86). */
#define XP_Q6K 256
#define Q6K_TINY 0x1p-102f /* 2^-126 (smallest normal) / 2^-24 (the deepest down-scaling) */

/* position 128n + 32j + 8k + i holds x[128n + 32j + 4i + k] * 2^-8k */
static void perm_q6k(const float *x, float *xp, int64_t nb) {
    for (int64_t b = 0; b < nb * 8; b++, x += 32, xp += 32)
        for (int k = 0; k < 4; k++) {
            const float f = pow2m8[k];
            for (int i = 0; i < 8; i++) xp[8 * k + i] = x[4 * i + k] * f;
        }
}

/* Q6_K: block b's 16 int8 scales times d, those of half 0 in S[0] and of half 1 in S[1], for both Q6_K kernels */
AVX2 void q6k_scales(const uint8_t *b, __m256 S[2]) {
    const __m256 d = h2f_t(b + 208);
    const __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
    S[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
    S[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
}

/* Q6_K: the quants of half n of block b (128 values), as the 4 x 32 bytes 0..63 both Q6_K kernels decode from
 * (low nibbles from ql, the two high bits from qh) */
AVX2 void q6k_quants(const uint8_t *b, int n, __m256i Q[4]) {
    const __m256i n4 = _mm256_set1_epi32(0x0F0F0F0F), h2 = _mm256_set1_epi32(0x30303030);
    const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
    const __m256i L0 = _mm256_loadu_si256((const __m256i *)ql), L1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
    const __m256i H = _mm256_loadu_si256((const __m256i *)qh);
    Q[0] = _mm256_or_si256(_mm256_and_si256(L0, n4), _mm256_and_si256(_mm256_slli_epi32(H, 4), h2));
    Q[1] = _mm256_or_si256(_mm256_and_si256(L1, n4), _mm256_and_si256(_mm256_slli_epi32(H, 2), h2));
    Q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(L0, 4), n4), _mm256_and_si256(H, h2));
    Q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(L1, 4), n4), _mm256_and_si256(_mm256_srli_epi32(H, 2), h2));
}

AVX2 void pblk_q6k(const uint8_t *b, const float *xp, __m256 *acc) {
    __m256 S01[2];
    q6k_scales(b, S01);
    const __m256 S0 = S01[0], S1 = S01[1];
    __m256 a = *acc;
    _Pragma("GCC unroll 2") for (int n = 0; n < 2; n++) {
        __m256i Q[4];
        q6k_quants(b, n, Q);
        const __m256 S = n ? S1 : S0;
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
            const float *xj = xp + 128 * n + 32 * j;
            __m256 s = _mm256_setzero_ps();
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                const __m256i q = _mm256_sub_epi32(_mm256_and_si256(Q[j], _mm256_set1_epi32(63 << (8 * k))),
                                                   _mm256_set1_epi32(32 << (8 * k)));
                s = k ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(xj + 8 * k), s)
                      : _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(xj));
            }
            const int lo = 2 * j, hi = 2 * j + 1;
            a = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(S, _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi)), s, a);
        }
    }
    *acc = a;
}

/* Same walk as DEFINE_ROWS over vectors already permuted for the type (perm_prepare: once per call, so a batch
 * is permuted once, not once per task). Two accumulators, blocks alternating between them, measured slower here
 * (Q4_K and Q5_K exact 0.75x, Q8_0 0.87x; Q4_0 a tie in cache). */
#define DEFINE_ROWS_P(NAME, BLK, PERM, QK, BB, XPB, NR)                                                               \
    AVX2_FN void NAME(const mat_t *m, const float *xp, int64_t nvec, float *out, int64_t os, int64_t r0,          \
                      int64_t r1, int64_t pf) {                                                                   \
        const int64_t nb = m->nblk, rb = m->rowbytes;                                                             \
        const float *vs = xp + nvec * nb * (XPB); /* per vector: 2^-E of perm_prepare_x86 */                      \
        for (int64_t r = r0; r < r1; r += (NR)) {                                                                 \
            int nr = r1 - r < (NR) ? (int)(r1 - r) : (NR);                                                        \
            const uint8_t *p[NR];                                                                                 \
            for (int i = 0; i < (NR); i++) p[i] = m->data + (r + (i < nr ? i : 0)) * rb;                          \
            for (int64_t v = 0; v < nvec; v++) {                                                                  \
                const float *xv = xp + v * nb * (XPB);                                                            \
                __m256 a[NR];                                                                                     \
                for (int i = 0; i < (NR); i++) a[i] = _mm256_setzero_ps();                                        \
                for (int64_t b = 0; b < nb; b++) {                                                                \
                    if (pf && v == 0 && (((b * (BB)) & 63) < (BB) || (BB) >= 64)) {                               \
                        for (int o = 0; o < (BB); o += 64) {                                                      \
                            for (int i = 0; i < (NR); i++) PF(p[i] + b * (BB) + pf + o);                          \
                        }                                                                                         \
                    }                                                                                             \
                    const float *xb = xv + b * (XPB);                                                             \
                    for (int i = 0; i < (NR); i++) BLK(p[i] + b * (BB), xb, &a[i]);                               \
                }                                                                                                 \
                for (int i = 0; i < nr; i++) out[v * os + r + i] = hsum256(a[i]) * vs[v];                         \
            }                                                                                                     \
        }                                                                                                         \
    }

DEFINE_ROWS_P(prows_q4_0x, pblk_q4_0x, perm_q4_0x, 32, 18, XP_Q4_0X, 4)
DEFINE_ROWS_P(prows_q4_0x_1, pblk_q4_0x, perm_q4_0x, 32, 18, XP_Q4_0X, 1)
DEFINE_ROWS_P(prows_mxfp4, pblk_mxfp4, perm_q4_0, 32, 17, XP_Q4_0, 4)
DEFINE_ROWS_P(prows_mxfp4_1, pblk_mxfp4, perm_q4_0, 32, 17, XP_Q4_0, 1)
DEFINE_ROWS_P(prows_q8_0, pblk_q8_0, perm_q8_0, 32, 34, XP_Q8_0, 4)
DEFINE_ROWS_P(prows_q8_0_1, pblk_q8_0, perm_q8_0, 32, 34, XP_Q8_0, 1)
DEFINE_ROWS_P(prows_q4_k, pblk_q4_k, perm_qk45, 256, 144, XP_QK45, 4)
DEFINE_ROWS_P(prows_q4_k_1, pblk_q4_k, perm_qk45, 256, 144, XP_QK45, 1)
DEFINE_ROWS_P(prows_q5_k, pblk_q5_k, perm_qk45, 256, 176, XP_QK45, 4)
DEFINE_ROWS_P(prows_q5_k_1, pblk_q5_k, perm_qk45, 256, 176, XP_QK45, 1)
DEFINE_ROWS_P(prows_q6_k, pblk_q6k, perm_q6k, 256, 210, XP_Q6K, 4)
DEFINE_ROWS_P(prows_q6_k_1, pblk_q6k, perm_q6k, 256, 210, XP_Q6K, 1)


/* x [n, cols] permuted for `layout`, then n floats: the factor each vector's outputs are multiplied by.
 * The pre-scaled layouts store x times 2^-s (s up to D = 28 for Q4_0, 24 for the K-quants), so a nonzero |x| below
 * 2^(D-126) (the layout's TINY) would turn subnormal and lose bits. Such a vector is stored times 2^E first (E the
 * smallest that lifts its smallest nonzero |value| to TINY; a power of two: exact, and every product and sum is
 * then the plain kernel's times 2^E) and its outputs are multiplied by 2^-E. Only a vector whose largest |value|
 * would then pass 2^64 (a range within one vector beyond about 2^160: products and sums stay far below float32's
 * overflow below that) goes to the kernel that reads x as it is (NULL). Before, any tiny value sent the whole
 * vector there: the down projection of a SwiGLU step whose gate saw one value below about -75 (silu of it is
 * below 2^-102) ran at the slower kernel's speed.
 * *inf: set to 1 when a vector holds +-inf, to 0 when the pre-scaled layouts scanned every vector and found none
 * (left as it was otherwise: not scanned, or stopped early). The Q4_K/Q5_K layout then returns NULL: see
 * kq45_unfactored. The scan is the one that finds the largest |value| anyway. */
static float *perm_prepare_x86(int layout, const float *x, int64_t n, int64_t cols, int *inf) {
    int64_t xpb = layout == L_QK45 ? XP_QK45 : layout == L_Q6K ? XP_Q6K : layout == L_Q4_0X ? XP_Q4_0X : 32;
    int64_t qk = layout == L_QK45 || layout == L_Q6K ? 256 : 32, nb = cols / qk;
    const int scaled = layout == L_Q4_0X || layout == L_QK45 || layout == L_Q6K;
    const float tiny = layout == L_QK45 ? QK45_TINY : layout == L_Q6K ? Q6K_TINY : Q4_0X_TINY;
    /* 64-byte aligned: every layout's block is a whole number of cache lines, so no 512-bit load of x splits
     * across two (malloc's 16-byte alignment split every one: the AVX-512 exact Q4_0 kernel ran 1.36x faster in
     * cache, one thread, once aligned) */
    float *xp = aligned_alloc(64, (sizeof(float) * (size_t)(n * nb * xpb + n) + 63) / 64 * 64), *tmp = NULL;
    if (!xp) return NULL;
    float *vscale = xp + n * nb * xpb;
    int seen_inf = 0;
    for (int64_t v = 0; v < n; v++) {
        const float *xv = x + v * cols;
        int E = 0;
        vscale[v] = 1.f;
        if (scaled) { /* every element: one tiny value beside a large one counts too */
            float mn = FLT_MAX, mx = 0.f;
            for (int64_t j = 0; j < cols; j++) {
                float a = fabsf(xv[j]);
                if (a != 0.f && a < mn) mn = a;
                if (a > mx) mx = a;
            }
            if (mx > FLT_MAX) {
                if (layout == L_QK45) { *inf = 1; free(xp); free(tmp); return NULL; }
                seen_inf = 1;
            }
            if (mn < tiny) {
                int et, em, ex;
                frexpf(tiny, &et); frexpf(mn, &em); frexpf(mx, &ex);
                E = et - em + 1; /* mn >= 2^(em-1), tiny = 2^(et-1) */
                if (!(mx <= FLT_MAX) || ex + E > 64) { if (seen_inf) *inf = 1; free(xp); free(tmp); return NULL; }
                if (!tmp && !(tmp = malloc(sizeof(float) * (size_t)cols))) { free(xp); return NULL; }
                const float up = ldexpf(1.f, E); /* E <= 53 (mn >= 2^-149); x * up exact: no overflow, see above */
                for (int64_t j = 0; j < cols; j++) tmp[j] = xv[j] * up;
                xv = tmp;
                vscale[v] = ldexpf(1.f, -E);
            }
        }
        float *out = xp + v * nb * xpb;
        if (layout == L_Q4_0) perm_q4_0(xv, out, nb);
        else if (layout == L_NAT) memcpy(out, xv, sizeof(float) * (size_t)cols); /* only aligned */
        else if (layout == L_Q4_0X) perm_q4_0x(xv, out, nb);
        else if (layout == L_Q8_0) perm_q8_0(xv, out, nb);
        else if (layout == L_Q6K) perm_q6k(xv, out, nb);
        else perm_qk45(xv, out, nb);
    }
    free(tmp);
    if (scaled) *inf = seen_inf;
    return xp;
}

/* ---- Q8_0 activations: integer dot per block. w signed bytes, y signed bytes: ggml's sign trick for maddubs ---- */
AVX2 __m256 dot_i8_maddubs(__m256i w, __m256i y, const q80_t *a) {
    (void)a;
    __m256i ax = _mm256_sign_epi8(w, w), sy = _mm256_sign_epi8(y, w);
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1));
    return _mm256_cvtepi32_ps(p);
}

/* Q4_0 nibbles unsigned (0..15), element order as nibbles32: one broadcast load, one shift, one mask */
AVX2 __m256i nibbles32_u(const uint8_t *p) {
    const __m256i B = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi32(B, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
}

/* unsigned Q4_0 nibbles times Q8_0 activations, less 8 * the activations' lane sums: the same integers as
 * (w - 8) * y, without the two sign instructions the signed form needs for maddubs */
AVX2 __m256 dot_u4_q8(__m256i w, __m256i y, const q80_t *a) {
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), _mm256_set1_epi16(1));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(p, _mm256_cvtepi16_epi32(_mm_load_si128((const __m128i *)a->s8))));
}

/* the q8 walks' four accumulators (block b in a[b mod 4]) summed in one fixed order, (a0 + a2) + (a1 + a3), which
 * the 512-bit kernels reproduce lane for lane (DEFINE_ROWS_Q8_512) */
#define Q8_SUM4(a) hsum256(_mm256_add_ps(_mm256_add_ps((a)[0], (a)[2]), _mm256_add_ps((a)[1], (a)[3])))

#define DEFINE_ROWS_Q8(NAME, WLOAD, SCALE, BB, TGT, DOT, NR)                                                            \
    __attribute__((target(TGT))) static void NAME(const mat_t *m, const q80_t *ax, int64_t nvec,                    \
                                                  int64_t xs, float *out, int64_t os, int64_t r0, int64_t r1,       \
                                                  int64_t pf) {                                                      \
        const int64_t nb = m->nblk, rb = m->rowbytes;                                                                \
        for (int64_t r = r0; r < r1; r += (NR)) {                                                                       \
            int nr = r1 - r < (NR) ? (int)(r1 - r) : (NR);                                                                 \
            const uint8_t *p[NR];                                                                                     \
            for (int i = 0; i < (NR); i++) p[i] = m->data + (r + (i < nr ? i : 0)) * rb;                                \
            for (int64_t v = 0; v < nvec; v++) {                                                                     \
                const q80_t *av = ax + v * (xs / 32);                                                                \
                __m256 a[NR][4]; /* blocks apart by b mod 4, as the one-row walk: the same sums to the bit */      \
                for (int i = 0; i < (NR); i++) a[i][0] = a[i][1] = a[i][2] = a[i][3] = _mm256_setzero_ps();          \
                for (int64_t b0 = 0; b0 < nb; b0 += 4)                                                               \
                    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) { /* a[i][k] in registers: k constant */     \
                        const int64_t b = b0 + k;                                                                    \
                        if (b >= nb) break;                                                                          \
                        __m256i y = _mm256_load_si256((const __m256i *)av[b].q);                                     \
                        if (pf && v == 0 && ((b * (BB)) & 63) < (BB))                                                \
                            for (int i = 0; i < (NR); i++) PF(p[i] + b * (BB) + pf);                                 \
                        for (int i = 0; i < (NR); i++) {                                                             \
                            const uint8_t *blk = p[i] + b * (BB);                                                    \
                            a[i][k] = _mm256_fmadd_ps(_mm256_set1_ps(SCALE * av[b].d), DOT(WLOAD, y, av + b), a[i][k]); \
                        }                                                                                            \
                    }                                                                                                \
                for (int i = 0; i < nr; i++) out[v * os + r + i] = Q8_SUM4(a[i]);                                   \
            }                                                                                                        \
        }                                                                                                            \
    }

/* One row a pass, for the default: both scales broadcast straight from memory (the weight's through f16_table), so
 * no vector instruction converts or shuffles them, and four accumulators, block b into a[b mod 4] (two, for
 * alternate blocks, left the 512-bit kernel's one dependent FMA a pair on its critical path: 14% slower in cache). */
#define DEFINE_ROWS_Q8_1(NAME, WLOAD, SCALEP, BB, TGT, DOT)                                                          \
    __attribute__((target(TGT))) static void NAME(const mat_t *m, const q80_t *ax, int64_t nvec,                    \
                                                  int64_t xs, float *out, int64_t os, int64_t r0, int64_t r1,       \
                                                  int64_t pf) {                                                      \
        const int64_t nb = m->nblk, rb = m->rowbytes;                                                                \
        for (int64_t r = r0; r < r1; r++) {                                                                          \
            const uint8_t *p = m->data + r * rb;                                                                     \
            for (int64_t v = 0; v < nvec; v++) {                                                                     \
                const q80_t *av = ax + v * (xs / 32);                                                                \
                __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};  \
                int64_t b = 0;                                                                                       \
                for (; b + 4 <= nb; b += 4) {                                                                        \
                    for (int i = 0; i < 4; i++) {                                                                    \
                        const uint8_t *blk = p + (b + i) * (BB);                                                     \
                        if (pf && v == 0 && (((b + i) * (BB)) & 63) < (BB)) PF(blk + pf);                           \
                        const __m256i y = _mm256_load_si256((const __m256i *)av[b + i].q);                           \
                        const __m256 t = _mm256_mul_ps(_mm256_broadcast_ss(SCALEP), _mm256_broadcast_ss(&av[b + i].d)); \
                        a[i] = _mm256_fmadd_ps(t, DOT(WLOAD, y, av + b + i), a[i]);                                 \
                    }                                                                                                \
                }                                                                                                    \
                _Pragma("GCC unroll 3") for (int k = 0; k < 3; k++) { /* b is a multiple of 4 */                    \
                    if (b + k >= nb) break;                                                                          \
                    const uint8_t *blk = p + (b + k) * (BB);                                                         \
                    const __m256i y = _mm256_load_si256((const __m256i *)av[b + k].q);                               \
                    const __m256 t = _mm256_mul_ps(_mm256_broadcast_ss(SCALEP), _mm256_broadcast_ss(&av[b + k].d)); \
                    a[k] = _mm256_fmadd_ps(t, DOT(WLOAD, y, av + b + k), a[k]);                                     \
                }                                                                                                    \
                out[v * os + r] = Q8_SUM4(a);                                                                        \
            }                                                                                                        \
        }                                                                                                            \
    }

/* K-quants with Q8_K activations (one scale per 256): per 32 (Q6_K: per 16) values maddubs + madd by the 16-bit
 * sub-block scale, summed in int32 over the whole block, converted and scaled once. Q4_K/Q5_K values are 0..31
 * (unsigned, as maddubs wants); their minimums are one madd of the 8 mins with the activation's per-32 sums. Q6_K's
 * values are taken 0..63 and its -32 offset is one madd of the 16 scales with the per-16 sums. Bounds: a maddubs
 * pair is at most 2*63*127 < 32768, a block's int32 sum at most 256*63*127*128 < 2^31. */

/* the 8 scales and 8 mins of a Q4_K/Q5_K block (12 bytes, 6 bits each) as bytes: scale_min_k4, four at a time */
AVX2 void kq_scales_mins(const uint8_t *p, uint32_t sm[4]) {
    uint32_t w0, w1, w2;
    memcpy(&w0, p, 4); memcpy(&w1, p + 4, 4); memcpy(&w2, p + 8, 4);
    sm[0] = w0 & 0x3f3f3f3fu;                                              /* scales 0-3 */
    sm[1] = (w2 & 0x0f0f0f0fu) | (((w0 >> 6) & 0x03030303u) << 4);         /* scales 4-7 */
    sm[2] = w1 & 0x3f3f3f3fu;                                              /* mins 0-3 */
    sm[3] = ((w2 >> 4) & 0x0f0f0f0fu) | (((w1 >> 6) & 0x03030303u) << 4);  /* mins 4-7 */
}

AVX2 void kq8k_qk45(const uint8_t *b, const q8k_t *y, __m256 *acc, int five) {
    uint32_t sm[4];
    kq_scales_mins(b + 4, sm);
    const __m128i sc16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sm));
    const __m128i mn16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(sm + 2)));
    const __m256i S = _mm256_broadcastsi128_si256(sc16);
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
    const uint8_t *qs = b + (five ? 48 : 16);
    __m256i sumi = _mm256_setzero_si256();
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
        const __m256i W = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        __m256i lo = _mm256_and_si256(W, m4), hi = _mm256_and_si256(_mm256_srli_epi16(W, 4), m4);
        if (five) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4));
        }
        const __m256i s0 = _mm256_shuffle_epi8(S, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c))));
        const __m256i s1 = _mm256_shuffle_epi8(S, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c + 1))));
        const __m256i y0 = _mm256_load_si256((const __m256i *)(y->q + 64 * c));
        const __m256i y1 = _mm256_load_si256((const __m256i *)(y->q + 64 * c + 32));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), s0));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), s1));
    }
    const __m128i mins = _mm_madd_epi16(mn16, _mm_loadu_si128((const __m128i *)y->bs32));
    const float dy = y->d;
    __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(*(const uint16_t *)b) * dy), _mm256_cvtepi32_ps(sumi), *acc);
    *acc = _mm256_fnmadd_ps(_mm256_set1_ps(_cvtsh_ss(*(const uint16_t *)(b + 2)) * dy),
                            _mm256_cvtepi32_ps(_mm256_inserti128_si256(_mm256_setzero_si256(), mins, 0)), a);
}

AVX2 void kq8k_q4_k(const uint8_t *b, const q8k_t *y, __m256 *acc) { kq8k_qk45(b, y, acc, 0); }
AVX2 void kq8k_q5_k(const uint8_t *b, const q8k_t *y, __m256 *acc) { kq8k_qk45(b, y, acc, 1); }

AVX2 void kq8k_q6_k(const uint8_t *b, const q8k_t *y, __m256 *acc) {
    const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    /* the offset: 32 * sum_k sc[k] * bs16[k] */
    __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(),
                                    _mm256_slli_epi32(_mm256_madd_epi16(s16, _mm256_loadu_si256((const __m256i *)y->bs16)), 5));
    _Pragma("GCC unroll 2") for (int n = 0; n < 2; n++) {
        const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
        const __m256i S = _mm256_permute2x128_si256(s16, s16, n ? 0x11 : 0x00); /* scales 8n..8n+7 in both lanes */
        __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
        __m256i h = _mm256_loadu_si256((const __m256i *)qh);
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
        q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4));
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
            /* low lane: scale 2j (16-bit word 2j of S), high lane: scale 2j+1 */
            const short lo = (short)(0x0100 + 0x0202 * (2 * j)), hi = (short)(0x0100 + 0x0202 * (2 * j + 1));
            const __m256i sv = _mm256_shuffle_epi8(S, _mm256_setr_epi16(lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi));
            const __m256i yv = _mm256_load_si256((const __m256i *)(y->q + 128 * n + 32 * j));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q[j], yv), sv));
        }
    }
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(*(const uint16_t *)(b + 208)) * y->d), _mm256_cvtepi32_ps(sumi), *acc);
}

#define DEFINE_ROWS_KQ8(NAME, BLK, BB, NR)                                                                            \
    AVX2_FN void NAME(const mat_t *m, const q8k_t *kx, int64_t nvec, int64_t xs, float *out, int64_t os,          \
                      int64_t r0, int64_t r1, int64_t pf) {                                                       \
        const int64_t nb = m->nblk, rb = m->rowbytes;                                                             \
        for (int64_t r = r0; r < r1; r += (NR)) {                                                                    \
            int nr = r1 - r < (NR) ? (int)(r1 - r) : (NR);                                                              \
            const uint8_t *p[NR];                                                                                  \
            for (int i = 0; i < (NR); i++) p[i] = m->data + (r + (i < nr ? i : 0)) * rb;                             \
            for (int64_t v = 0; v < nvec; v++) {                                                                  \
                const q8k_t *kv = kx + v * (xs / 256);                                                            \
                __m256 a[NR];                                                                                     \
                for (int i = 0; i < (NR); i++) a[i] = _mm256_setzero_ps(); \
                for (int64_t b = 0; b < nb; b++) {                                                                \
                    if (pf && v == 0)                                                                             \
                        for (int o = 0; o < (BB); o += 64)                                                        \
                            for (int i = 0; i < (NR); i++) PF(p[i] + b * (BB) + pf + o);                             \
                    for (int i = 0; i < (NR); i++) BLK(p[i] + b * (BB), kv + b, &a[i]);                              \
                }                                                                                                 \
                for (int i = 0; i < nr; i++) out[v * os + r + i] = hsum256(a[i]);                                 \
            }                                                                                                     \
        }                                                                                                         \
    }

DEFINE_ROWS_KQ8(rows_q8a_q4_k, kq8k_q4_k, 144, 4)
DEFINE_ROWS_KQ8(rows_q8a_q4_k_1, kq8k_q4_k, 144, 1)
DEFINE_ROWS_KQ8(rows_q8a_q5_k, kq8k_q5_k, 176, 4)
DEFINE_ROWS_KQ8(rows_q8a_q5_k_1, kq8k_q5_k, 176, 1)
DEFINE_ROWS_KQ8(rows_q8a_q6_k, kq8k_q6_k, 210, 4)
DEFINE_ROWS_KQ8(rows_q8a_q6_k_1, kq8k_q6_k, 210, 1)

#define W_Q4_0 _mm256_sub_epi8(nibbles32(blk + 2), _mm256_set1_epi8(8))
#define W_Q4_0U nibbles32_u(blk + 2)
#define W_Q8_0 _mm256_loadu_si256((const __m256i *)(blk + 2))
#define W_MXFP4 mxfp4_vals(blk + 1)
#define S_F16 _cvtsh_ss(*(const uint16_t *)blk)
#define S_E8M0 e8m0_half(blk[0])

DEFINE_ROWS_Q8(rows_q8a_q4_0, W_Q4_0U, S_F16, 18, "avx2,fma,f16c", dot_u4_q8, 4)
AVX2 const float *f16_at(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return &f16_table[h]; }
#define SP_F16 f16_at(blk)
#define SP_E8M0 &e8m0_table[blk[0]]
DEFINE_ROWS_Q8_1(rows_q8a_q4_0_1, W_Q4_0U, SP_F16, 18, "avx2,fma,f16c", dot_u4_q8)
DEFINE_ROWS_Q8_1(rows_q8a_q8_0_1, W_Q8_0, SP_F16, 34, "avx2,fma,f16c", dot_i8_maddubs)
DEFINE_ROWS_Q8_1(rows_q8a_mxfp4_1, W_MXFP4, SP_E8M0, 17, "avx2,fma,f16c", dot_i8_maddubs)
DEFINE_ROWS_Q8(rows_q8a_q8_0, W_Q8_0, S_F16, 34, "avx2,fma,f16c", dot_i8_maddubs, 4)
DEFINE_ROWS_Q8(rows_q8a_mxfp4, W_MXFP4, S_E8M0, 17, "avx2,fma,f16c", dot_i8_maddubs, 4)

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MER_HAVE_VNNI 1
/* AVX-VNNI: one dpbusd does maddubs + madd (and cannot saturate). Each lane holds the same integers as the maddubs
 * paths' and the walks are theirs (one row: two accumulators; four rows: one each), so a result does not depend on
 * whether the CPU has AVX-VNNI, to the bit (test_vnni_equals_maddubs) */
__attribute__((target("avx2,fma,f16c,avxvnni"), always_inline)) static inline __m256 dot_i8_vnni(__m256i w, __m256i y, const q80_t *a) {
    (void)a;
    __m256i ax = _mm256_sign_epi8(w, w), sy = _mm256_sign_epi8(y, w);
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ax, sy));
}
DEFINE_ROWS_Q8(rows_vnni_q4_0, W_Q4_0, S_F16, 18, "avx2,fma,f16c,avxvnni", dot_i8_vnni, 4)
DEFINE_ROWS_Q8_1(rows_vnni_q4_0_1, W_Q4_0, SP_F16, 18, "avx2,fma,f16c,avxvnni", dot_i8_vnni)
DEFINE_ROWS_Q8(rows_vnni_q8_0, W_Q8_0, S_F16, 34, "avx2,fma,f16c,avxvnni", dot_i8_vnni, 4)
DEFINE_ROWS_Q8_1(rows_vnni_q8_0_1, W_Q8_0, SP_F16, 34, "avx2,fma,f16c,avxvnni", dot_i8_vnni)
DEFINE_ROWS_Q8(rows_vnni_mxfp4, W_MXFP4, S_E8M0, 17, "avx2,fma,f16c,avxvnni", dot_i8_vnni, 4)
DEFINE_ROWS_Q8_1(rows_vnni_mxfp4_1, W_MXFP4, SP_E8M0, 17, "avx2,fma,f16c,avxvnni", dot_i8_vnni)
#endif

/* -DMER_NO_AVX512: check the build a compiler without these intrinsics makes (AVX2 kernels only) */
#if ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12)) && \
    !defined(MER_NO_AVX512)
#define MER_HAVE_AVX512 1
/* AVX-512 (F, BW, VL, DQ, VNNI): 16 float or 64 byte lanes a register. Chosen at run time where the CPU has all
 * five (mer_has_avx512) and MER_FLAG_NO_AVX512 is not set; the AVX2 kernels above stay for every other CPU. */
#define T512 "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"
#define AVX512 __attribute__((target(T512), always_inline)) static inline
#define AVX512_FN __attribute__((target(T512))) static

AVX512 float hsum512(__m512 a) {
    return hsum256(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)));
}

/* ---- Q8_0 activations, two blocks an instruction: lanes 0-7 hold block b, lanes 8-15 block b + 1, each lane the
 * same int32 as the AVX2 paths' lane (one vpdpbusd = their maddubs + madd; neither can saturate here). Pairs
 * alternate between two accumulators, and block b's float products go to the low half of one and block b + 1's to
 * the high half: the four halves are exactly the AVX2 walks' four accumulators (block b in a[b mod 4]), an odd last
 * block goes to its own, and they are summed in the same order (Q8_SUM4): the result equals the AVX2 kernels' to the
 * bit, whatever the rows per pass (test_avx512_q8_equals_avx2_to_the_bit). */

/* two Q4_0 (or MXFP4) blocks' nibbles, unsigned, in element order: [b0 low | b0 high | b1 low | b1 high] */
AVX512 __m512i nibbles64_u(const uint8_t *p0, const uint8_t *p1) {
    __m512i B = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p0));
    B = _mm512_mask_broadcast_i32x4(B, 0xFF00, _mm_loadu_si128((const __m128i *)p1));
    return _mm512_and_si512(_mm512_srlv_epi64(B, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(15));
}

AVX512 __m512i mxfp4_vals64(const uint8_t *p0, const uint8_t *p1) {
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)kvalues_mxfp4));
    return _mm512_shuffle_epi8(table, nibbles64_u(p0, p1));
}

/* unsigned nibbles times the activations, less 8 * their lane sums: as dot_u4_q8, starting from -s8 (q8_pairs) */
AVX512 __m512 dot2_u4(__m512i w, const q8pair_t *pr) {
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_load_si512(pr->s), w, _mm512_load_si512(pr->q)));
}

/* signed weights: |w| times y with w's sign (ggml's sign trick, with a mask: AVX-512 has no vpsignb) */
AVX512 __m512 dot2_i8(__m512i w, const q8pair_t *pr) {
    const __m512i y = _mm512_load_si512(pr->q);
    const __m512i sy = _mm512_mask_sub_epi8(y, _mm512_movepi8_mask(w), _mm512_setzero_si512(), y);
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sy));
}

/* the f16 scales of eight Q4_0 blocks (144 bytes from q; the words 9 apart): two loads, one vpermt2w and one
 * vcvtph2ps instead of eight table loads and four merges (the same floats: f16 converts exactly) */
AVX512 __m256 scales8_f16(const uint8_t *q) {
    const __m512i idx = _mm512_setr_epi32(0 | 9 << 16, 18 | 27 << 16, 36 | 45 << 16, 54 | 63 << 16, 0, 0, 0, 0, 0, 0,
                                          0, 0, 0, 0, 0, 0);
    const __m512i h = _mm512_permutex2var_epi16(_mm512_loadu_si512(q), idx, _mm512_loadu_si512(q + 64));
    return _mm256_cvtph_ps(_mm512_castsi512_si128(h));
}

AVX512 __m256 dot1_u4(__m256i w, __m256i y, const q80_t *a) {
    __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, y);
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(p, _mm256_cvtepi16_epi32(_mm_load_si128((const __m128i *)a->s8))));
}

AVX512 __m256 dot1_i8(__m256i w, __m256i y, const q80_t *a) {
    (void)a;
    __m256i ax = _mm256_sign_epi8(w, w), sy = _mm256_sign_epi8(y, w);
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
}

#define W2_Q4_0 nibbles64_u(b0 + 2, b1 + 2)
#define W2_MXFP4 mxfp4_vals64(b0 + 1, b1 + 1)

/* one pair of blocks (c, c + 1) of every row of the pass into accumulator k, scales one pair at a time */
#define Q8_PAIR_512(c, k, NR, BB, SP, W2, DOT2)                                                              \
    do {                                                                                                             \
        const __m512 d = _mm512_mask_broadcastss_ps(_mm512_set1_ps(dv[c]), 0xFF00, _mm_set_ss(dv[(c) + 1]));         \
        for (int i = 0; i < (NR); i++) {                                                                             \
            const uint8_t *b0 = p[i] + (c) * (BB), *b1 = b0 + (BB);                                                  \
            if (pf && v == 0) {                                                                                      \
                if ((((c) * (BB)) & 63) < (BB)) PF(b0 + pf);                                                         \
                if (((((c) + 1) * (BB)) & 63) < (BB)) PF(b1 + pf);                                                   \
            }                                                                                                        \
            const __m512 s = _mm512_mask_broadcastss_ps(_mm512_set1_ps(*SP(b0)), 0xFF00, _mm_set_ss(*SP(b1)));       \
            a[i][k] = _mm512_fmadd_ps(_mm512_mul_ps(s, d), DOT2(W2, pv + ((c) >> 1)), a[i][k]);                      \
        }                                                                                                            \
    } while (0)

/* NR rows a pass, each row the one-row walk above (see the comment before nibbles64_u). ap: the activations as
 * q8_pairs made them (ax, the Q8_0 blocks, only for a last odd block). With SC8 (Q4_0), eight blocks at a time: their
 * scales times the activations' in one multiply (the same float products as one pair at a time), and each pair's
 * two products picked from those eight by one vpermps; the pairs left over, and MXFP4's, one pair at a time. */
#define DEFINE_ROWS_Q8_512(NAME, W2, W1, SP, BB, DOT2, DOT1, SC8, NR)                                                 \
    AVX512_FN void NAME(const mat_t *m, const q80_t *ax, q8p_t ap, int64_t nvec, int64_t xs, float *out,           \
                        int64_t os, int64_t r0, int64_t r1, int64_t pf) {                                            \
        const int64_t nb = m->nblk, rb = m->rowbytes, np = nb / 2;                                                   \
        for (int64_t r = r0; r < r1; r += (NR)) {                                                                    \
            const int nr = r1 - r < (NR) ? (int)(r1 - r) : (NR);                                                     \
            const uint8_t *p[NR];                                                                                    \
            for (int i = 0; i < (NR); i++) p[i] = m->data + (r + (i < nr ? i : 0)) * rb;                             \
            for (int64_t v = 0; v < nvec; v++) {                                                                     \
                const q80_t *av = ax + v * (xs / 32);                                                                \
                const q8pair_t *pv = ap.p + v * np;                                                                  \
                const float *dv = ap.d + v * nb;                                                                     \
                __m512 a[NR][2]; /* pair j into a[j mod 2]: lanes 0-7 of a[0] hold blocks 4k, 8-15 blocks 4k + 1 */  \
                for (int i = 0; i < (NR); i++) a[i][0] = a[i][1] = _mm512_setzero_ps();                              \
                int64_t b = 0;                                                                                       \
                if (SC8)                                                                                             \
                    for (; b + 8 <= nb; b += 8) {                                                                    \
                        if (pf && v == 0) /* every line that starts within the eight blocks */                      \
                            for (int64_t o = -(b * (BB)) & 63; o < 8 * (BB); o += 64)                                \
                                for (int i = 0; i < (NR); i++) PF(p[i] + b * (BB) + pf + o);                         \
                        const __m256 d8 = _mm256_loadu_ps(dv + b);                                                   \
                        for (int i = 0; i < (NR); i++) {                                                             \
                            const uint8_t *q = p[i] + b * (BB);                                                      \
                            const __m512 t8 = _mm512_castps256_ps512(_mm256_mul_ps(scales8_f16(q), d8));             \
                            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {                                    \
                                const uint8_t *b0 = q + 2 * (BB) * j, *b1 = b0 + (BB);                               \
                                const __m512i lh = _mm512_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, \
                                    2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, \
                                    2 * j + 1);                                                                      \
                                a[i][j & 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lh, t8), DOT2(W2, pv + (b >> 1) + j), \
                                                              a[i][j & 1]);                                          \
                            }                                                                                        \
                        }                                                                                            \
                    }                                                                                                \
                /* pairs one at a time from an even pair on (b is a multiple of 8 or 0), alternate accumulators */  \
                for (; b + 4 <= nb; b += 4) {                                                                        \
                    Q8_PAIR_512(b, 0, NR, BB, SP, W2, DOT2);                                                         \
                    Q8_PAIR_512(b + 2, 1, NR, BB, SP, W2, DOT2);                                                     \
                }                                                                                                    \
                if (b + 2 <= nb) { Q8_PAIR_512(b, 0, NR, BB, SP, W2, DOT2); b += 2; }                                \
                for (int i = 0; i < nr; i++) {                                                                       \
                    __m256 t4[4] = {_mm512_castps512_ps256(a[i][0]), _mm512_extractf32x8_ps(a[i][0], 1),             \
                                    _mm512_castps512_ps256(a[i][1]), _mm512_extractf32x8_ps(a[i][1], 1)};            \
                    if (b < nb) { /* a last odd block, b even: into block b's accumulator, t4[b mod 4] */           \
                        const uint8_t *blk = p[i] + b * (BB);                                                        \
                        const __m256i y = _mm256_load_si256((const __m256i *)av[b].q);                               \
                        const __m256 t = _mm256_mul_ps(_mm256_broadcast_ss(SP(blk)), _mm256_broadcast_ss(&av[b].d)); \
                        t4[b & 3] = _mm256_fmadd_ps(t, DOT1(W1, y, av + b), t4[b & 3]);                              \
                    }                                                                                                \
                    out[v * os + r + i] = Q8_SUM4(t4);                                                               \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
    }

#define SPF_F16(p) f16_at(p)
#define SPF_E8M0(p) (&e8m0_table[(p)[0]])
DEFINE_ROWS_Q8_512(rows_512_q4_0, W2_Q4_0, W_Q4_0U, SPF_F16, 18, dot2_u4, dot1_u4, 1, 4)
DEFINE_ROWS_Q8_512(rows_512_q4_0_1, W2_Q4_0, W_Q4_0U, SPF_F16, 18, dot2_u4, dot1_u4, 1, 1)
DEFINE_ROWS_Q8_512(rows_512_mxfp4, W2_MXFP4, W_MXFP4, SPF_E8M0, 17, dot2_i8, dot1_i8, 0, 4)
DEFINE_ROWS_Q8_512(rows_512_mxfp4_1, W2_MXFP4, W_MXFP4, SPF_E8M0, 17, dot2_i8, dot1_i8, 0, 1)

/* 4-bit codes through a table, exact, 16 lanes, x in its own order (L_NAT: unscaled, 64-byte aligned): a 512-bit
 * vpermps takes 4 index bits, so it reads byte j's low nibble (element j) straight from the zero-extended bytes
 * (vpmovzxbd, lane j = byte j; the bits above are ignored) and, after one shift by 4, its high nibble (element j +
 * 16), each through a table of the 16 values, sign included. Per 16 values a widening or a shift, a permute and an
 * FMA: the AVX2 kernels need per 8 values and, sub, cvt, fma (Q4_0) or a shift, a permute, three for MXFP4's sign
 * and an FMA. Each product is the float32 value * x of a plain decode; elements j and j + 16 meet in one lane
 * before the lanes are summed. The first form (a broadcast of the 16 bytes and a variable shift per 16 values, on
 * the Q4_0 permutation) was 8-10% slower in cache (below). x0, x1: the block's x, elements 0-15 and 16-31. */
AVX512 void pblk_sum16_512(__m512 lo, __m512 hi, float d, __m512 x0, __m512 x1, __m512 *acc) {
    *acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0)), *acc);
}

AVX512 __m512i pblk_bytes_512(const uint8_t *q) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q)); }

AVX512 void pblk_tab16x_512(const uint8_t *q, __m512 T, float d, __m512 x0, __m512 x1, __m512 *acc) {
    const __m512i z = pblk_bytes_512(q); /* lane j: byte j, both nibbles */
    pblk_sum16_512(_mm512_permutexvar_ps(z, T), _mm512_permutexvar_ps(_mm512_srli_epi32(z, 4), T), d, x0, x1, acc);
}

#define T_Q4_0_512 _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f)
#define T_MXFP4_512 _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 6.f, 8.f, 12.f, -0.f, -1.f, -2.f, -3.f, -4.f, -6.f, -8.f, -12.f)

/* x read from memory (gcc folds the loads into the multiplies): the column-tiled walk's blocks */
AVX512 void pblk_q4_0_512(const uint8_t *b, const float *xp, __m512 *acc) {
    pblk_tab16x_512(b + 2, T_Q4_0_512, *f16_at(b), _mm512_load_ps(xp), _mm512_load_ps(xp + 16), acc);
}

AVX512 void pblk_mxfp4_512(const uint8_t *b, const float *xp, __m512 *acc) {
    pblk_tab16x_512(b + 1, T_MXFP4_512, e8m0_table[b[0]], _mm512_load_ps(xp), _mm512_load_ps(xp + 16), acc);
}

/* x in registers, loaded once for the rows of a pass (DEFINE_ROWS_X512). Q4_0's high nibble without the shift and
 * the second permute (both on the shuffle pipes with the widening and the first permute): masked where it lies
 * (bits 4-7) into the mantissa of 2^19, whose last bit weighs 2^-4, it is the float 2^19 + q, and one subtraction
 * of 2^19 + 8 leaves q - 8, exactly the table's float, from the logic and add pipes. */
AVX512 void xblk_q4_0_512(const uint8_t *b, __m512 x0, __m512 x1, __m512 *acc) {
    const __m512i z = pblk_bytes_512(b + 2);
    const __m512 lo = _mm512_permutexvar_ps(z, T_Q4_0_512); /* before the ternary logic, which overwrites z */
    const __m512i m = _mm512_ternarylogic_epi32(z, _mm512_set1_epi32(0xF0), _mm512_set1_epi32(0x49000000), 0xEA);
    pblk_sum16_512(lo, _mm512_sub_ps(_mm512_castsi512_ps(m), _mm512_set1_ps(524288.f + 8.f)), *f16_at(b), x0, x1, acc);
}

AVX512 void xblk_mxfp4_512(const uint8_t *b, __m512 x0, __m512 x1, __m512 *acc) {
    pblk_tab16x_512(b + 1, T_MXFP4_512, e8m0_table[b[0]], x0, x1, acc);
}

/* Q8_0, exact: each half of the block's 32 signed bytes widened (vpmovsxbd) and converted, x in its own order (the
 * AVX2 kernel reads x permuted, L_Q8_0) */
AVX512 void xblk_q8_0_512(const uint8_t *b, __m512 x0, __m512 x1, __m512 *acc) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18))));
    pblk_sum16_512(lo, hi, *f16_at(b), x0, x1, acc);
}

/* Q4_K/Q5_K, exact, as pblk_qk45 with groups k and k + 1 of a chunk side by side in 16 lanes (their permuted x are
 * adjacent): per 16 values an AND, a conversion and an FMA. The block's scale terms and its min terms are summed
 * apart and meet once per block, so a block adds one dependent operation to the row's accumulator, not sixteen. */
AVX512 void pblk_qk45_512(const uint8_t *b, const float *xp, __m512 *acc, int five) {
    float f[16];
    qk45_dm(b, f);
    __m512 sc = _mm512_setzero_ps(), mn = _mm512_setzero_ps();
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
        __m256i L, U;
        qk45_chunk(b, five, c, &L, &U);
        const __m512i L2 = _mm512_broadcast_i64x4(L), U2 = _mm512_broadcast_i64x4(U);
        __m512 lo, hi;
        _Pragma("GCC unroll 2") for (int k = 0; k < 4; k += 2) {
            const int q0 = (five ? 31 : 15) << (8 * k), q1 = (five ? 31 : 15) << (8 * k + 8);
            const __m512i m = _mm512_setr_epi32(q0, q0, q0, q0, q0, q0, q0, q0, q1, q1, q1, q1, q1, q1, q1, q1);
            const __m512 vl = _mm512_cvtepi32_ps(_mm512_and_si512(L2, m)), vh = _mm512_cvtepi32_ps(_mm512_and_si512(U2, m));
            lo = k ? _mm512_fmadd_ps(vl, _mm512_loadu_ps(xp + 64 * c + 8 * k), lo) : _mm512_mul_ps(vl, _mm512_loadu_ps(xp + 64 * c));
            hi = k ? _mm512_fmadd_ps(vh, _mm512_loadu_ps(xp + 64 * c + 32 + 8 * k), hi)
                   : _mm512_mul_ps(vh, _mm512_loadu_ps(xp + 64 * c + 32));
        }
        sc = _mm512_fmadd_ps(_mm512_set1_ps(f[2 * c]), lo, sc);
        sc = _mm512_fmadd_ps(_mm512_set1_ps(f[2 * c + 1]), hi, sc);
        const __m512 mv = _mm512_insertf32x8(_mm512_set1_ps(f[8 + 2 * c]), _mm256_set1_ps(f[9 + 2 * c]), 1);
        mn = _mm512_fmadd_ps(mv, _mm512_loadu_ps(xp + 256 + 16 * c), mn); /* low 8: sums of the low x, high 8: high */
    }
    *acc = _mm512_add_ps(*acc, _mm512_sub_ps(sc, mn));
}

AVX512 void pblk_q4_k_512(const uint8_t *b, const float *xp, __m512 *acc) { pblk_qk45_512(b, xp, acc, 0); }
AVX512 void pblk_q5_k_512(const uint8_t *b, const float *xp, __m512 *acc) { pblk_qk45_512(b, xp, acc, 1); }

/* Q6_K, exact, as pblk_q6k with groups k and k + 1 side by side in 16 lanes; lanes 0-3 and 8-11 hold l < 16 (scale
 * 2j), 4-7 and 12-15 l >= 16 (scale 2j + 1). Scale terms summed per block, then one add to the row's accumulator. */
AVX512 void pblk_q6k_512(const uint8_t *b, const float *xp, __m512 *acc) {
    __m256 S01[2];
    q6k_scales(b, S01);
    const __m512 S0 = _mm512_castps256_ps512(S01[0]), S1 = _mm512_castps256_ps512(S01[1]);
    __m512 a = _mm512_setzero_ps();
    _Pragma("GCC unroll 2") for (int n = 0; n < 2; n++) {
        __m256i Q[4];
        q6k_quants(b, n, Q);
        const __m512 S = n ? S1 : S0;
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
            const float *xj = xp + 128 * n + 32 * j;
            const __m512i Q2 = _mm512_broadcast_i64x4(Q[j]);
            __m512 s;
            _Pragma("GCC unroll 2") for (int k = 0; k < 4; k += 2) {
                const int m0 = 63 << (8 * k), m1 = 63 << (8 * k + 8), o0 = 32 << (8 * k), o1 = 32 << (8 * k + 8);
                const __m512i q = _mm512_sub_epi32(
                    _mm512_and_si512(Q2, _mm512_setr_epi32(m0, m0, m0, m0, m0, m0, m0, m0, m1, m1, m1, m1, m1, m1, m1, m1)),
                    _mm512_setr_epi32(o0, o0, o0, o0, o0, o0, o0, o0, o1, o1, o1, o1, o1, o1, o1, o1));
                s = k ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_loadu_ps(xj + 8 * k), s)
                      : _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_loadu_ps(xj));
            }
            const int lo = 2 * j, hi = 2 * j + 1;
            const __m512i idx = _mm512_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi, lo, lo, lo, lo, hi, hi, hi, hi);
            a = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, S), s, a);
        }
    }
    *acc = _mm512_add_ps(*acc, a);
}

/* One vector whose x outgrows L1 (over XTILE_MIN: a down projection's 14336 columns are 56 KB of float32, which
 * every row read again from L2; Q4_0 exact ran 22 GB/s there against 36 on the 4096 columns of gate and up) is
 * walked in column tiles of XTILE bytes of x: up to 64 rows at a time, each row's blocks of one tile, then the next
 * tile. Each row's two accumulators wait in memory between tiles, so every lane sees the same FMAs in the same
 * order as in the untiled walk: the same result, to the bit. The prefetch goes to the same place k rows ahead, k
 * the distance in row segments (the walk reads one row's segment, then the next row's). */
#define XTILE (24 << 10)     /* 24 over 16 KB: Q4_0 4096 x 14336 x1.05, moe() exact x1.04; 8 and 32 KB slower */
#define XTILE_MIN (32 << 10) /* x of a 4096-wide gate or up (16 KB of float32, 20 KB as Q4_K's layout) stays whole */
#define XTILE_ROWS 64
#define DEFINE_ROWS_P512_TILED(NAME, BLK, BB, XPB)                                                                    \
    AVX512_FN void NAME(const mat_t *m, const float *xv, float *out, int64_t r0, int64_t r1, int64_t pf) {         \
        const int64_t nb = m->nblk, rb = m->rowbytes, tb = (XTILE / (4 * (XPB))) & ~(int64_t)1;                     \
        const float vs = xv[nb * (XPB)];                                                                            \
        __m512 acc[XTILE_ROWS][2];                                                                                  \
        for (int64_t g = r0; g < r1; g += XTILE_ROWS) {                                                             \
            const int nr = r1 - g < XTILE_ROWS ? (int)(r1 - g) : XTILE_ROWS;                                        \
            for (int i = 0; i < nr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();                               \
            for (int64_t t = 0; t < nb; t += tb) {                                                                  \
                const int64_t te = t + tb < nb ? t + tb : nb, ahead = (1 + pf / ((te - t) * (BB))) * rb;           \
                for (int i = 0; i < nr; i++) {                                                                      \
                    const uint8_t *p = m->data + (g + i) * rb;                                                      \
                    __m512 a = acc[i][0], a1 = acc[i][1];                                                           \
                    int64_t b = t;                                                                                  \
                    for (; b + 2 <= te; b += 2) {                                                                   \
                        if (pf)                                                                                     \
                            for (int64_t o = -(b * (BB)) & 63; o < 2 * (BB); o += 64) PF(p + ahead + b * (BB) + o); \
                        BLK(p + b * (BB), xv + b * (XPB), &a);                                                      \
                        BLK(p + (b + 1) * (BB), xv + (b + 1) * (XPB), &a1);                                         \
                    }                                                                                               \
                    if (b < te) BLK(p + b * (BB), xv + b * (XPB), &a); /* the last tile only: tb is even */       \
                    acc[i][0] = a; acc[i][1] = a1;                                                                  \
                }                                                                                                   \
            }                                                                                                       \
            for (int i = 0; i < nr; i++) out[g + i] = hsum512(_mm512_add_ps(acc[i][0], acc[i][1])) * vs;           \
        }                                                                                                           \
    }

/* The untiled walk of the x-in-registers blocks (xblk_*: Q4_0, MXFP4, Q8_0): NR rows a pass (Q4_0, MXFP4: 2; 4
 * for the sweeps' walk) and the pass loads each block's x once for all its rows: a Q4_0 block then costs a row
 * three vector loads (its 16 bytes, its scale, half of x's two) instead of four; the Zen 5 issues two a cycle.
 * Every row keeps its own two accumulators (alternate blocks): the result is one row a pass's, and the tiled
 * walk's, to the bit. The asm statement keeps x in registers: without it gcc folds each load into every row's
 * multiply again (then two rows a pass ran no faster). A pass short of rows repeats its first row (computed, not
 * stored). Two prefetches per line: into L1 at pf bytes of the thread's stream ahead and into L2 at 3 pf (the L2
 * one x1.08 streaming; a row's pointer moves at 1/NR of the stream's pace, hence the division). docs/runtime.md,
 * "Third pass". */
#define X_512(X, xv, n)                                                                                               \
    __m512 X[4];                                                                                                    \
    for (int k = 0; k < 4; k++) X[k] = k < (n) ? _mm512_load_ps((xv) + 16 * k) : _mm512_setzero_ps();              \
    if ((n) == 4) __asm__("" : "+v"(X[0]), "+v"(X[1]), "+v"(X[2]), "+v"(X[3]));                                    \
    else __asm__("" : "+v"(X[0]), "+v"(X[1]))
/* TILED: the column-tiled walk for one vector wider than XTILE_MIN, or NULL (the four-row walk, kept for sweeps) */
#define DEFINE_ROWS_X512(NAME, BLK, BB, NR, TILED)                                                                    \
    AVX512_FN void NAME(const mat_t *m, const float *xp, int64_t nvec, float *out, int64_t os, int64_t r0,         \
                        int64_t r1, int64_t pf) {                                                                   \
        const int64_t nb = m->nblk, rb = m->rowbytes, pf1 = pf / (NR), pf2 = 3 * pf / (NR);                         \
        const float *vs = xp + nvec * nb * 32;                                                                      \
        void (*tiled)(const mat_t *, const float *, float *, int64_t, int64_t, int64_t) = TILED;                    \
        if (tiled && nvec == 1 && nb * 32 * 4 > XTILE_MIN) { tiled(m, xp, out, r0, r1, pf); return; }              \
        for (int64_t r = r0; r < r1; r += (NR)) {                                                                   \
            const int nr = r1 - r < (NR) ? (int)(r1 - r) : (NR);                                                    \
            const uint8_t *p[NR];                                                                                   \
            for (int i = 0; i < (NR); i++) p[i] = m->data + (r + (i < nr ? i : 0)) * rb;                            \
            for (int64_t v = 0; v < nvec; v++) {                                                                    \
                const float *xv = xp + v * nb * 32;                                                                 \
                __m512 a[NR], a1[NR];                                                                               \
                for (int i = 0; i < (NR); i++) a[i] = a1[i] = _mm512_setzero_ps();                                  \
                int64_t b = 0;                                                                                      \
                for (; b + 2 <= nb; b += 2) {                                                                       \
                    if (pf && v == 0) /* every line that starts within the two blocks */                          \
                        for (int64_t o = -(b * (BB)) & 63; o < 2 * (BB); o += 64)                                   \
                            for (int i = 0; i < (NR); i++) {                                                        \
                                PF(p[i] + b * (BB) + pf1 + o);                                                      \
                                PF_L2(p[i] + b * (BB) + pf2 + o);                                                   \
                            }                                                                                       \
                    X_512(X, xv + b * 32, 4);                                                                       \
                    for (int i = 0; i < (NR); i++) {                                                                \
                        BLK(p[i] + b * (BB), X[0], X[1], &a[i]);                                                    \
                        BLK(p[i] + (b + 1) * (BB), X[2], X[3], &a1[i]);                                             \
                    }                                                                                               \
                }                                                                                                   \
                if (b < nb) {                                                                                       \
                    X_512(X, xv + b * 32, 2);                                                                       \
                    for (int i = 0; i < (NR); i++) BLK(p[i] + b * (BB), X[0], X[1], &a[i]);                         \
                }                                                                                                   \
                for (int i = 0; i < nr; i++) out[v * os + r + i] = hsum512(_mm512_add_ps(a[i], a1[i])) * vs[v];     \
            }                                                                                                       \
        }                                                                                                           \
    }

/* TILED: the function above, for one vector wider than XTILE_MIN, or NULL (the four-row walk, kept for sweeps) */
#define DEFINE_ROWS_P512(NAME, BLK, BB, XPB, NR, TILED)                                                               \
    AVX512_FN void NAME(const mat_t *m, const float *xp, int64_t nvec, float *out, int64_t os, int64_t r0,         \
                        int64_t r1, int64_t pf) {                                                                   \
        const int64_t nb = m->nblk, rb = m->rowbytes;                                                               \
        const float *vs = xp + nvec * nb * (XPB);                                                                   \
        void (*tiled)(const mat_t *, const float *, float *, int64_t, int64_t, int64_t) = TILED;                    \
        if (tiled && nvec == 1 && nb * (XPB) * 4 > XTILE_MIN) { tiled(m, xp, out, r0, r1, pf); return; }        \
        for (int64_t r = r0; r < r1; r += (NR)) {                                                                   \
            const int nr = r1 - r < (NR) ? (int)(r1 - r) : (NR);                                                    \
            const uint8_t *p[NR];                                                                                   \
            for (int i = 0; i < (NR); i++) p[i] = m->data + (r + (i < nr ? i : 0)) * rb;                            \
            for (int64_t v = 0; v < nvec; v++) {                                                                    \
                const float *xv = xp + v * nb * (XPB);                                                              \
                __m512 a[NR], a1[NR];                                                                               \
                for (int i = 0; i < (NR); i++) a[i] = a1[i] = _mm512_setzero_ps();                                  \
                int64_t b = 0;                                                                                      \
                for (; b + 2 <= nb; b += 2) {                                                                       \
                    if (pf && v == 0) /* every line that starts within the two blocks */                          \
                        for (int64_t o = -(b * (BB)) & 63; o < 2 * (BB); o += 64)                                   \
                            for (int i = 0; i < (NR); i++) PF(p[i] + b * (BB) + pf + o);                            \
                    for (int i = 0; i < (NR); i++) {                                                                \
                        BLK(p[i] + b * (BB), xv + b * (XPB), &a[i]);                                                \
                        BLK(p[i] + (b + 1) * (BB), xv + (b + 1) * (XPB), &a1[i]);                                   \
                    }                                                                                               \
                }                                                                                                   \
                for (int i = 0; i < (NR); i++) {                                                                    \
                    if (b < nb) BLK(p[i] + b * (BB), xv + b * (XPB), &a[i]);                                        \
                    a[i] = _mm512_add_ps(a[i], a1[i]);                                                              \
                }                                                                                                   \
                for (int i = 0; i < nr; i++) out[v * os + r + i] = hsum512(a[i]) * vs[v];                           \
            }                                                                                                       \
        }                                                                                                           \
    }

DEFINE_ROWS_P512_TILED(trows_512_q4_0, pblk_q4_0_512, 18, 32)
DEFINE_ROWS_P512_TILED(trows_512_mxfp4, pblk_mxfp4_512, 17, 32)
DEFINE_ROWS_P512_TILED(trows_512_q4_k, pblk_q4_k_512, 144, XP_QK45)
DEFINE_ROWS_P512_TILED(trows_512_q5_k, pblk_q5_k_512, 176, XP_QK45)
DEFINE_ROWS_P512_TILED(trows_512_q6_k, pblk_q6k_512, 210, XP_Q6K)
DEFINE_ROWS_X512(prows_512_q4_0, xblk_q4_0_512, 18, 4, NULL)
DEFINE_ROWS_X512(prows_512_q4_0_1, xblk_q4_0_512, 18, 2, trows_512_q4_0) /* the default walk: two rows a pass */
DEFINE_ROWS_X512(prows_512_mxfp4, xblk_mxfp4_512, 17, 4, NULL)
DEFINE_ROWS_X512(prows_512_mxfp4_1, xblk_mxfp4_512, 17, 2, trows_512_mxfp4)
DEFINE_ROWS_X512(prows_512_q8_0, xblk_q8_0_512, 34, 4, NULL)
/* Q8_0 one row a pass: two, which moves each row's pointer half as fast over rows of 4352 bytes, streamed x0.94
 * against AVX2 where one row gives x1.08 (alternated, 14336 x 4096). No column tiles: x wider than XTILE_MIN takes
 * the AVX2 kernel (rows_any; docs/runtime.md) */
DEFINE_ROWS_X512(prows_512_q8_0_1, xblk_q8_0_512, 34, 1, NULL)
DEFINE_ROWS_P512(prows_512_q4_k, pblk_q4_k_512, 144, XP_QK45, 4, NULL)
DEFINE_ROWS_P512(prows_512_q4_k_1, pblk_q4_k_512, 144, XP_QK45, 1, trows_512_q4_k)
DEFINE_ROWS_P512(prows_512_q5_k, pblk_q5_k_512, 176, XP_QK45, 4, NULL)
DEFINE_ROWS_P512(prows_512_q5_k_1, pblk_q5_k_512, 176, XP_QK45, 1, trows_512_q5_k)
DEFINE_ROWS_P512(prows_512_q6_k, pblk_q6k_512, 210, XP_Q6K, 4, NULL)
DEFINE_ROWS_P512(prows_512_q6_k_1, pblk_q6k_512, 210, XP_Q6K, 1, trows_512_q6_k)
#endif /* MER_HAVE_AVX512 */
#endif /* MER_X86 */

int mer_has_avx2(void) {
#ifdef MER_X86
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* the AVX2 paths run: the CPU has them and the caller did not ask for the portable one (asked once per call) */
static int use_simd(int flags) { return !(flags & MER_FLAG_PORTABLE) && mer_has_avx2(); }

int mer_has_vnni(void) {
#if defined(MER_X86) && defined(MER_HAVE_VNNI)
    return mer_has_avx2() && __builtin_cpu_supports("avxvnni");
#else
    return 0;
#endif
}

/* F, BW, VL, DQ and VNNI: every AVX-512 kernel here needs all five (asked once, then cached) */
int mer_has_avx512(void) {
#if defined(MER_X86) && defined(MER_HAVE_AVX512)
    static int known = -1; /* read and written by the pool's threads too: relaxed atomics (every writer stores
                              the same value, but a plain racing access is undefined behaviour in C11) */
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (k < 0) {
        k = mer_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512vnni");
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k;
#else
    return 0;
#endif
}

/* the AVX-512 kernels run: the AVX2 ones would, the CPU has AVX-512 and the caller did not refuse it */
static int avx512_ok(int flags) { return use_simd(flags) && !(flags & MER_FLAG_NO_AVX512) && mer_has_avx512(); }

/* the q8 kernel for `type` under `flags` reads the activations as q8_pairs makes them (the AVX-512 Q4_0 and MXFP4
 * ones); rows_any runs the AVX-VNNI or AVX2 kernel, the same bits, where they were not made */
static int q8_pairs_wanted(int type, int flags) {
    return (type == T_Q4_0 || type == T_MXFP4) && avx512_ok(flags) && !(flags & MER_FLAG_NO_VNNI);
}

static int q8_type(int type) {
    return type == T_Q4_0 || type == T_Q8_0 || type == T_MXFP4 || type == T_Q4_K || type == T_Q5_K || type == T_Q6_K;
}

/* The permuted-x layout the kernel for `type` under `flags` reads, or 0 when it reads x as it is. */
static int perm_layout(int type, int flags) {
#ifdef MER_X86
    if ((flags & (MER_FLAG_PORTABLE | MER_FLAG_NO_PERM)) || !mer_has_avx2()) return 0;
    if ((flags & MER_FLAG_ACT_Q8) && q8_type(type)) return 0;
    /* the AVX-512 Q4_0, MXFP4 and Q8_0 kernels read x in its own order, unscaled (a 64-byte aligned copy) */
    if (type == T_Q4_0) return avx512_ok(flags) ? L_NAT : L_Q4_0X;
    if (type == T_MXFP4) return avx512_ok(flags) ? L_NAT : L_Q4_0; /* MXFP4's nibbles are in Q4_0's order */
    if (type == T_Q8_0) return avx512_ok(flags) ? L_NAT : L_Q8_0;
    if (type == T_Q4_K || type == T_Q5_K) return L_QK45;
    if (type == T_Q6_K) return L_Q6K;
#else
    (void)type; (void)flags;
#endif
    return 0;
}

/* x [n, cols] permuted for `layout` (caller frees); NULL if layout is 0, memory is short or a vector is too wide
 * to scale (the kernels that read x as it is then run: same results). *inf as perm_prepare_x86 says. */
static float *perm_prepare(int layout, const float *x, int64_t n, int64_t cols, int *inf) {
#ifdef MER_X86
    if (layout) return perm_prepare_x86(layout, x, n, cols, inf);
#else
    (void)x; (void)n; (void)cols; (void)inf;
#endif
    (void)layout;
    return NULL;
}

static int is_kq45(int type) { return type == T_Q4_K || type == T_Q5_K; }

static int has_inf(const float *x, int64_t len) {
    for (int64_t j = 0; j < len; j++) if (fabsf(x[j]) > FLT_MAX) return 1;
    return 0;
}

/* Whether the float32 (not Q8) Q4_K/Q5_K product with x must take the unfactored (portable) path: the AVX2
 * kernels subtract dmin * m * sum(x) from d * sc * sum(q * x), which is inf - inf = NaN where w * inf is +-inf
 * in the float64 reference. known: what perm_prepare found (1, 0, or -1 when it did not scan); only the fallbacks
 * that prepare nothing (MER_FLAG_NO_PERM, no memory) scan here. Activations that overflow are an error upstream
 * anyway, so such a call may be slow; it must not be wrong. */
static int kq45_unfactored(int type, int flags, int known, const float *x, int64_t len) {
    if (!is_kq45(type) || !use_simd(flags)) return 0;
    return known >= 0 ? known : has_inf(x, len);
}

/* rows [r0, r1) of m times nvec vectors; ax (Q8_0) / kx (Q8_K) non-NULL = Q8 activations (only for q8_type) */
/* xp: x prepared by perm_prepare for perm_layout(m->type, flags), or NULL; xinf: kq45_unfactored's answer */
static void rows_any(const mat_t *m, const float *x, const float *xp, const q80_t *ax, q8p_t ap, const q8k_t *kx,
                     int64_t nvec, int64_t xs, float *out, int64_t os, int64_t r0, int64_t r1, int flags, int xinf) {
    int simd = use_simd(flags);
    const int avx512 = avx512_ok(flags);
    int64_t pf = tuning_prefetch;
    int one = rows_per_pass(m->type, q8_type(m->type) && (m->qk == 256 ? kx != NULL : ax != NULL)) == 1;
#define PICK(f) (one ? f##_1 : f)
    if (q8_type(m->type) && (m->qk == 256 ? kx != NULL : ax != NULL)) {
        /* at least a row and a half ahead: a down projection's rows (8064 bytes of Q4_0 for 14336 columns) are
         * near the 8192 of the short gate and up rows' best; 1.5 rows made moe()'s Q4_0 phase 2 (down) x1.08-1.12
         * faster and Q4_K_M's (Q6_K down) x1.04 (docs/runtime.md). The exact walks keep pf: their long rows take the
         * column-tiled walk, whose distance counts rows ahead. */
        if (pf && pf < m->rowbytes + m->rowbytes / 2) pf = m->rowbytes + m->rowbytes / 2;
#ifdef MER_X86
        if (simd && m->qk == 256) {
            if (m->type == T_Q4_K) PICK(rows_q8a_q4_k)(m, kx, nvec, xs, out, os, r0, r1, pf);
            else if (m->type == T_Q5_K) PICK(rows_q8a_q5_k)(m, kx, nvec, xs, out, os, r0, r1, pf);
            else PICK(rows_q8a_q6_k)(m, kx, nvec, xs, out, os, r0, r1, pf);
            return;
        }
        if (simd) {
#ifdef MER_HAVE_AVX512
            /* VNNI kernels too; none for Q8_0: 512 bits measured no faster than AVX-VNNI's 256 (docs/runtime.md) */
            if (avx512 && !(flags & MER_FLAG_NO_VNNI) && m->type != T_Q8_0 && ap.p) {
                if (m->type == T_Q4_0) PICK(rows_512_q4_0)(m, ax, ap, nvec, xs, out, os, r0, r1, pf);
                else PICK(rows_512_mxfp4)(m, ax, ap, nvec, xs, out, os, r0, r1, pf);
                return;
            }
#endif
#ifdef MER_HAVE_VNNI
            if (!(flags & MER_FLAG_NO_VNNI) && mer_has_vnni()) {
                if (m->type == T_Q4_0) PICK(rows_vnni_q4_0)(m, ax, nvec, xs, out, os, r0, r1, pf);
                else if (m->type == T_Q8_0) PICK(rows_vnni_q8_0)(m, ax, nvec, xs, out, os, r0, r1, pf);
                else PICK(rows_vnni_mxfp4)(m, ax, nvec, xs, out, os, r0, r1, pf);
                return;
            }
#endif
            if (m->type == T_Q4_0) PICK(rows_q8a_q4_0)(m, ax, nvec, xs, out, os, r0, r1, pf);
            else if (m->type == T_Q8_0) PICK(rows_q8a_q8_0)(m, ax, nvec, xs, out, os, r0, r1, pf);
            else PICK(rows_q8a_mxfp4)(m, ax, nvec, xs, out, os, r0, r1, pf);
            return;
        }
#endif
        rows_portable_q8(m, ax, kx, nvec, xs, out, os, r0, r1);
        return;
    }
    if (xinf > 0 && is_kq45(m->type)) simd = 0;
#ifdef MER_X86
    if (simd) {
        switch (m->type) {
/* exact: the AVX-512 kernel where there is one and the CPU has it, else AVX2, on the permuted x (xp) or plain x */
#ifdef MER_HAVE_AVX512
#define TRY_512(T) if (xp && avx512) { PICK(prows_512_##T)(m, xp, nvec, out, os, r0, r1, pf); return; }
#else
#define TRY_512(T)
#endif
#define ROWS_2(P, T) { if (xp) { PICK(P)(m, xp, nvec, out, os, r0, r1, pf); } \
                       else { PICK(rows_##T)(m, x, nvec, xs, out, os, r0, r1, pf); } \
                       return; }
        case T_Q4_0: TRY_512(q4_0) ROWS_2(prows_q4_0x, q4_0)
        case T_Q8_0:
#ifdef MER_HAVE_AVX512
            /* x wider than XTILE_MIN (a down projection): the AVX2 kernel on x as it is, which streamed 4096 x 14336
             * x1.07 faster than the AVX-512 kernel in column tiles (x0.80 without them) and x1.02 than AVX2's on
             * the permuted x (alternated; docs/runtime.md). Memory sets Q8_0's pace there, and whole rows in turn
             * suit it better than tiles. */
            if (xp && avx512 && m->cols * 4 > XTILE_MIN) {
                PICK(rows_q8_0)(m, x, nvec, xs, out, os, r0, r1, pf);
                return;
            }
#endif
            TRY_512(q8_0) ROWS_2(prows_q8_0, q8_0)
        case T_MXFP4: TRY_512(mxfp4) ROWS_2(prows_mxfp4, mxfp4)
        case T_Q4_K: TRY_512(q4_k) ROWS_2(prows_q4_k, q4_k)
        case T_Q5_K: TRY_512(q5_k) ROWS_2(prows_q5_k, q5_k)
        case T_Q6_K: TRY_512(q6_k) ROWS_2(prows_q6_k, q6_k)
#undef TRY_512
#undef ROWS_2
        case T_F32: PICK(rows_f32)(m, x, nvec, xs, out, os, r0, r1, pf); return;
        case T_F16: PICK(rows_f16)(m, x, nvec, xs, out, os, r0, r1, pf); return;
        case T_BF16: PICK(rows_bf16)(m, x, nvec, xs, out, os, r0, r1, pf); return;
        }
    }
#endif
#undef PICK
    (void)simd; (void)avx512; (void)pf; (void)xp; (void)one; (void)ap;
    rows_portable(m, x, nvec, xs, out, os, r0, r1);
}

/* ------------------------------------------------------------------------------------------------------------
 * the thread pool
 * ---------------------------------------------------------------------------------------------------------- */
typedef void (*task_fn)(void *ctx, int64_t task);

#define SPIN 1000 /* pause loops (tens of microseconds) a thread stays awake after a job before blocking */
static inline void cpu_relax(void) {
#ifdef MER_X86
    _mm_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static struct {
    pthread_mutex_t run;  /* one job at a time */
    pthread_mutex_t m;
    pthread_cond_t start, done;
    pthread_t *tids;
    int nworkers;         /* threads besides the caller */
    int want;             /* total threads wanted (0 = from sched_getaffinity) */
    int started, stop, active;
    uint64_t gen;
    task_fn fn;
    void *ctx;
    int64_t ntasks;
    atomic_int_fast64_t next;
} P = {.run = PTHREAD_MUTEX_INITIALIZER, .m = PTHREAD_MUTEX_INITIALIZER, .start = PTHREAD_COND_INITIALIZER,
       .done = PTHREAD_COND_INITIALIZER};

static void run_tasks(void) {
    int64_t t;
    while ((t = atomic_fetch_add(&P.next, 1)) < P.ntasks) P.fn(P.ctx, t);
}

/* arg: the job generation when the thread was made, so a job posted before it first waits is not missed */
static void *worker(void *arg) {
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    pthread_mutex_lock(&P.m);
    for (;;) {
        while (P.gen == seen && !P.stop) pthread_cond_wait(&P.start, &P.m);
        if (P.stop) break;
        seen = P.gen;
        pthread_mutex_unlock(&P.m);
        run_tasks();
        pthread_mutex_lock(&P.m);
        if (__atomic_sub_fetch(&P.active, 1, __ATOMIC_ACQ_REL) == 0) pthread_cond_signal(&P.done);
        /* a layer step posts its second phase right after the first: wait briefly awake before sleeping */
        pthread_mutex_unlock(&P.m);
        for (int i = 0; i < SPIN && __atomic_load_n(&P.gen, __ATOMIC_ACQUIRE) == seen &&
                        !__atomic_load_n(&P.stop, __ATOMIC_ACQUIRE); i++)
            cpu_relax();
        pthread_mutex_lock(&P.m);
    }
    pthread_mutex_unlock(&P.m);
    return NULL;
}

static int affinity_threads(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) { int n = CPU_COUNT(&set); if (n > 0) return n; }
    return 1;
}

int mer_threads(void) { return P.want > 0 ? P.want : affinity_threads(); }

/* called with P.run held */
static void pool_stop_locked(void) {
    if (!P.started) return;
    pthread_mutex_lock(&P.m);
    __atomic_store_n(&P.stop, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&P.start);
    pthread_mutex_unlock(&P.m);
    for (int i = 0; i < P.nworkers; i++) pthread_join(P.tids[i], NULL);
    free(P.tids);
    P.tids = NULL; P.nworkers = 0; P.started = 0; P.stop = 0;
}

static void pool_start_locked(void) {
    if (P.started) return;
    int n = mer_threads() - 1;
    P.tids = n > 0 ? calloc((size_t)n, sizeof(pthread_t)) : NULL;
    P.nworkers = 0;
    for (int i = 0; P.tids && i < n; i++) {
        if (pthread_create(&P.tids[i], NULL, worker, (void *)(uintptr_t)P.gen) != 0) break; /* fewer threads: still correct */
        P.nworkers++;
    }
    P.started = 1;
}

/* 0 = as many as sched_getaffinity allows. Stops the pool; it restarts with the new count on the next job. */
void mer_set_threads(int n) {
    pthread_mutex_lock(&P.run);
    pool_stop_locked();
    P.want = n > 0 ? n : 0;
    pthread_mutex_unlock(&P.run);
}

void mer_shutdown(void) {
    pthread_mutex_lock(&P.run);
    pool_stop_locked();
    pthread_mutex_unlock(&P.run);
}

static void pool_run(task_fn fn, void *ctx, int64_t ntasks, int flags) {
    if (ntasks <= 0) return;
    if (ntasks == 1 || (flags & MER_FLAG_SERIAL) || pthread_mutex_trylock(&P.run) != 0) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t);
        return;
    }
    pool_start_locked();
    if (P.nworkers == 0) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t);
        pthread_mutex_unlock(&P.run);
        return;
    }
    pthread_mutex_lock(&P.m);
    P.fn = fn; P.ctx = ctx; P.ntasks = ntasks;
    atomic_store(&P.next, 0);
    __atomic_store_n(&P.active, P.nworkers, __ATOMIC_RELEASE);
    __atomic_add_fetch(&P.gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&P.start);
    pthread_mutex_unlock(&P.m);
    run_tasks();
    for (int i = 0; i < SPIN && __atomic_load_n(&P.active, __ATOMIC_ACQUIRE) > 0; i++) cpu_relax();
    if (__atomic_load_n(&P.active, __ATOMIC_ACQUIRE) > 0) {
        pthread_mutex_lock(&P.m);
        while (P.active > 0) pthread_cond_wait(&P.done, &P.m);
        pthread_mutex_unlock(&P.m);
    }
    pthread_mutex_unlock(&P.run);
}

/* A forked child has none of the parent's threads: forget them (the pool restarts on first use). */
static void atfork_child(void) {
    pthread_mutex_init(&P.run, NULL);
    pthread_mutex_init(&P.m, NULL);
    pthread_cond_init(&P.start, NULL);
    pthread_cond_init(&P.done, NULL);
    P.tids = NULL; P.nworkers = 0; P.started = 0; P.stop = 0; P.active = 0;
}

__attribute__((constructor)) static void mer_init(void) {
    for (uint32_t h = 0; h < 65536; h++) f16_table[h] = f16_to_f32((uint16_t)h);
    for (int e = 0; e < 256; e++) e8m0_table[e] = e8m0_half((uint8_t)e);
    pthread_atfork(NULL, NULL, atfork_child);
}

/* ------------------------------------------------------------------------------------------------------------
 * entry points
 * ---------------------------------------------------------------------------------------------------------- */
#define PARALLEL_MIN_BYTES (256 << 10) /* below this a matrix is done on one thread: a hand-out costs more */

typedef struct {
    const mat_t *m;
    const float *x, *xp;
    const q80_t *ax;
    q8p_t ap;
    const q8k_t *kx;
    int64_t nvec, chunk;
    float *out;
    int flags, xinf;
} mv_ctx;

static void mv_task(void *c_, int64_t t) {
    mv_ctx *c = c_;
    int64_t r0 = t * c->chunk, r1 = r0 + c->chunk < c->m->rows ? r0 + c->chunk : c->m->rows;
    rows_any(c->m, c->x, c->xp, c->ax, c->ap, c->kx, c->nvec, c->m->cols, c->out, c->m->rows, r0, r1, c->flags,
             c->xinf);
}

/* out[v, r] = sum_c W[r, c] x[v, c] for v < n: W `rows` x `cols` of `type` in `nbytes` bytes, x float32 [n, cols]
 * (x_len floats), out float32 [n, rows] (out_len floats). */
int mer_matvec(int type, const void *w, int64_t nbytes, int64_t rows, int64_t cols, const float *x, int64_t x_len,
               int64_t n, float *out, int64_t out_len, int flags) {
    mat_t m;
    int rc = mat_init(&m, type, w, nbytes, rows, cols);
    if (rc) return rc;
    if (n < 0 || !x || !out) return MER_EARG;
    if ((n && cols > INT64_MAX / n) || (n && rows > INT64_MAX / n)) return MER_ESHAPE;
    if (x_len < n * cols || out_len < n * rows) return MER_ESHORT;
    if (!n || !rows) return MER_OK;
    q80_t *ax = NULL; q8k_t *kx = NULL;
    int inf = 0;
    if ((flags & MER_FLAG_ACT_Q8) && q8_type(type) && m.qk == 256) {
        if (!(kx = alloc_q8k(n * cols / 256))) return MER_ENOMEM;
        inf = quantize_q8k(x, n * cols, kx, use_simd(flags));
    } else if ((flags & MER_FLAG_ACT_Q8) && q8_type(type)) {
        if (!(ax = alloc_q80(n * cols / 32))) return MER_ENOMEM;
        inf = quantize_q8(x, n * cols, ax, use_simd(flags));
    }
    if (inf) { /* x holds an infinity: the call is computed exactly as with float32 activations (q8_fallback) */
        free(ax); free(kx); ax = NULL; kx = NULL;
        flags &= ~MER_FLAG_ACT_Q8;
    }
    q8p_t ap = {NULL, NULL};
    if (ax && q8_pairs_wanted(type, flags)) {
        if (q8_pairs_alloc(n, cols / 32, &ap)) { free(ax); return MER_ENOMEM; }
        q8_pairs_fill(ax, n, cols / 32, ap);
    }
    int xinf = -1;
    float *xp = perm_prepare(perm_layout(type, flags), x, n, cols, &xinf);
    xinf = ax || kx ? 0 : kq45_unfactored(type, flags, xinf, x, n * cols);
    mv_ctx c = {&m, x, xp, ax, ap, kx, n, tuning_chunk, out, flags, xinf};
    int64_t ntasks = (rows + c.chunk - 1) / c.chunk;
    pool_run(mv_task, &c, ntasks, m.rowbytes * rows < PARALLEL_MIN_BYTES ? flags | MER_FLAG_SERIAL : flags);
    free(ax); free(kx); free(xp); q8_pairs_free(&ap);
    return MER_OK;
}

/* One projection as the MoE call sees it. bias: float32 [rows] or NULL. */
typedef struct {
    const void *data;
    int64_t nbytes;
    int64_t rows, cols;
    const float *bias;
    int64_t bias_len;
    int32_t type;
    int32_t pad;
} mer_proj;

typedef struct { mer_proj gate, up, down; } mer_expert;

enum { ACT_SWIGLU = 0, ACT_SWIGLU_OAI = 1 };

typedef struct {
    mat_t g[8], u[8], dn[8];
    const mer_expert *ex;
    const float *wk;
    int k, act, flags;
    float alpha, limit;
    const float *x;
    const q80_t *ax; q80_t *ah;                /* x and h as Q8_0 blocks */
    q8p_t apx, aph;                            /* and as q8_pairs, where a kernel wants them (q8_pairs_wanted) */
    const q8k_t *kx; q8k_t *kh;                /* x and h as Q8_K blocks, for K-quant weights */
    float *xpl[N_LAYOUTS];                     /* x permuted per layout the gate/up kernels read (phase 1) */
    float *hp[8];                              /* h of each expert permuted for its down kernel (phase 2) */
    int x_inf, h_inf[8];                       /* kq45_unfactored for x (gate/up) and each expert's h (down) */
    int xflags, hflags[8];                     /* flags for phase 1 and each expert's down: without ACT_Q8 where
                                                  x (h) holds an infinity, so that it runs with float32 values */
    int64_t n, d_model, d_ff, chunk, nchunk_ff, chunk2; /* rows per task: phase 1 (gate, up), phase 2 (down) */
    float *h, *u_tmp, *y_tmp, *out;
} moe_ctx;

static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* phase 1: rows [r0, r1) of gate and up of expert e for every vector, then the activation, into h */
static void moe_phase1(void *c_, int64_t t) {
    moe_ctx *c = c_;
    int e = (int)(t / c->nchunk_ff);
    int64_t r0 = (t % c->nchunk_ff) * c->chunk, r1 = r0 + c->chunk < c->d_ff ? r0 + c->chunk : c->d_ff;
    int64_t n = c->n, F = c->d_ff;
    float *h = c->h + (int64_t)e * n * F, *u = c->u_tmp + (int64_t)e * n * F;
    rows_any(&c->g[e], c->x, c->xpl[perm_layout(c->g[e].type, c->xflags)], c->ax, c->apx, c->kx, n, c->d_model, h,
             F, r0, r1, c->xflags, c->x_inf);
    rows_any(&c->u[e], c->x, c->xpl[perm_layout(c->u[e].type, c->xflags)], c->ax, c->apx, c->kx, n, c->d_model, u,
             F, r0, r1, c->xflags, c->x_inf);
    const float *bg = c->ex[e].gate.bias, *bu = c->ex[e].up.bias;
    for (int64_t v = 0; v < n; v++) {
        for (int64_t r = r0; r < r1; r++) {
            float g = h[v * F + r] + (bg ? bg[r] : 0.f), uu = u[v * F + r] + (bu ? bu[r] : 0.f);
            if (c->act == ACT_SWIGLU) h[v * F + r] = silu(g) * uu;
            else {
                g = g < c->limit ? g : c->limit;
                uu = uu < -c->limit ? -c->limit : (uu > c->limit ? c->limit : uu);
                h[v * F + r] = (uu + 1.f) * g / (1.f + expf(-c->alpha * g));
            }
        }
    }
}

/* phase 2: a band of down rows, all k experts, summed in a fixed order into out (this task owns the band) */
static void moe_phase2(void *c_, int64_t t) {
    moe_ctx *c = c_;
    int64_t D = c->d_model, F = c->d_ff, n = c->n;
    int64_t r0 = t * c->chunk2, r1 = r0 + c->chunk2 < D ? r0 + c->chunk2 : D;
    for (int e = 0; e < c->k; e++) {
        float *y = c->y_tmp + (int64_t)e * n * D;
        const int q8 = (c->hflags[e] & MER_FLAG_ACT_Q8) != 0;
        rows_any(&c->dn[e], c->h + (int64_t)e * n * F, c->hp[e], q8 && c->ah ? c->ah + (int64_t)e * n * (F / 32) : NULL,
                 q8_pairs_at(c->aph, (int64_t)e * n, F / 32), q8 && c->kh ? c->kh + (int64_t)e * n * (F / 256) : NULL,
                 n, F, y, D, r0, r1, c->hflags[e], c->h_inf[e]);
    }
    for (int64_t v = 0; v < n; v++) {
        for (int64_t r = r0; r < r1; r++) {
            float s = 0.f;
            for (int e = 0; e < c->k; e++) {
                const float *bd = c->ex[e].down.bias;
                s += c->wk[e] * (c->y_tmp[(int64_t)e * n * D + v * D + r] + (bd ? bd[r] : 0.f));
            }
            c->out[v * D + r] = s;
        }
    }
}

static int proj_init(mat_t *m, const mer_proj *p, int64_t rows, int64_t cols) {
    if (p->rows != rows || p->cols != cols) return MER_ESHAPE;
    int rc = mat_init(m, p->type, p->data, p->nbytes, rows, cols);
    if (rc) return rc;
    if (p->bias && p->bias_len < rows) return MER_ESHORT;
    return MER_OK;
}

#ifdef MER_PROFILE
/* -DMER_PROFILE (never in the shipped build): microseconds summed over calls in phase 1, between the phases, in
 * phase 2, and the call count, read with ctypes; how docs/runtime.md's "Where moe() spends its time" was measured */
#include <time.h>
double prof_us[4];
#endif
/* Rows per moe() task, for a phase of `rows` rows in all: up to MOE_CHUNK_MAX, but at least 8 tasks a thread (so
 * many threads still share out a 4096-row down projection) and never under tuning_chunk. 256 over matvec's 64 on the
 * 2-core Zen 5 (Q4_0 Mixtral-shaped steps, alternated in one process, medians of 31-41 rounds): q8 x1.027, exact
 * x1.016-1.036, most of it in phase 1, whose task reads a band of gate and then one of up: longer bands, fewer
 * stream starts (docs/runtime.md). */
#define MOE_CHUNK_MAX 256
static int64_t moe_chunk(int64_t rows) {
    int64_t c = rows / (8 * (int64_t)mer_threads());
    c = c > MOE_CHUNK_MAX ? MOE_CHUNK_MAX : c;
    return c < tuning_chunk ? tuning_chunk : (c + 3) / 4 * 4;
}

/* out[v] = sum_e wk[e] * down_e(act(gate_e x[v] + bg, up_e x[v] + bu)) + bd  for v < n, in one call.
 * k <= 8 experts; x float32 [n, d_model] (x_len floats); out float32 [n, d_model] (out_len floats).
 * act: 0 SwiGLU, 1 GPT-OSS clamped (alpha, limit). On error returns MER_E* and *bad = 3*e + projection
 * (0 gate, 1 up, 2 down) of the first projection at fault, or -1. */
int mer_moe(int k, const mer_expert *ex, const float *wk, const float *x, int64_t x_len, int64_t n,
            int64_t d_model, int64_t d_ff, float *out, int64_t out_len, int act, float alpha, float limit,
            int flags, int *bad) {
    static moe_ctx zero;
    moe_ctx c = zero;
    *bad = -1;
    if (k < 1 || k > 8 || !ex || !wk || !x || !out || n < 0 || d_model <= 0 || d_ff <= 0) return MER_EARG;
    if (act != ACT_SWIGLU && act != ACT_SWIGLU_OAI) return MER_EARG;
    if (n > INT64_MAX / 8 / (d_model > d_ff ? d_model : d_ff)) return MER_ESHAPE;
    if (x_len < n * d_model || out_len < n * d_model) return MER_ESHORT;
    for (int e = 0; e < k; e++) {
        int rc;
        if ((rc = proj_init(&c.g[e], &ex[e].gate, d_ff, d_model))) { *bad = 3 * e; return rc; }
        if ((rc = proj_init(&c.u[e], &ex[e].up, d_ff, d_model))) { *bad = 3 * e + 1; return rc; }
        if ((rc = proj_init(&c.dn[e], &ex[e].down, d_model, d_ff))) { *bad = 3 * e + 2; return rc; }
    }
    if (!n) return MER_OK;
    c.ex = ex; c.wk = wk; c.k = k; c.act = act; c.flags = flags; c.alpha = alpha; c.limit = limit;
    c.x = x; c.n = n; c.d_model = d_model; c.d_ff = d_ff; c.out = out;
    c.chunk = moe_chunk(k * d_ff); c.chunk2 = moe_chunk(d_model);
    c.nchunk_ff = (d_ff + c.chunk - 1) / c.chunk;
    size_t nh = (size_t)k * n * d_ff, ny = (size_t)k * n * d_model;
    c.h = malloc(sizeof(float) * nh); c.u_tmp = malloc(sizeof(float) * nh); c.y_tmp = malloc(sizeof(float) * ny);
    int rc = MER_OK;
    int q8 = (flags & MER_FLAG_ACT_Q8) && d_model % 32 == 0 && d_ff % 32 == 0;
    q80_t *ax = NULL; q8k_t *kx = NULL;
    /* which activation forms the weights want: Q8_0 blocks for Q4_0/Q8_0/MXFP4, Q8_K for the K-quants (a K-quant
     * projection's columns are a multiple of 256, so the Q8_K forms always fit) */
    int x0 = 0, xk = 0, h0 = 0, hk = 0, xpairs = 0, hpairs = 0;
    for (int e = 0; q8 && e < k; e++) {
        const mat_t *gu[2] = {&c.g[e], &c.u[e]};
        for (int i = 0; i < 2; i++) {
            if (q8_type(gu[i]->type)) { if (gu[i]->qk == 256) xk = 1; else x0 = 1; }
            xpairs |= q8_pairs_wanted(gu[i]->type, flags);
        }
        if (q8_type(c.dn[e].type)) { if (c.dn[e].qk == 256) hk = 1; else h0 = 1; }
        hpairs |= q8_pairs_wanted(c.dn[e].type, flags);
    }
    if (!c.h || !c.u_tmp || !c.y_tmp) { rc = MER_ENOMEM; goto done; }
    int xinf_q8 = 0; /* x holds an infinity: gate and up run with float32 activations (q8_fallback) */
    c.xflags = flags;
    if (x0 || h0) {
        ax = alloc_q80(n * d_model / 32); c.ah = alloc_q80((int64_t)nh / 32);
        if (!ax || !c.ah) { rc = MER_ENOMEM; goto done; }
        xinf_q8 |= quantize_q8(x, n * d_model, ax, use_simd(flags));
        c.ax = ax;
    }
    if (xk || hk) {
        kx = alloc_q8k(n * d_model / 256); c.kh = alloc_q8k((int64_t)nh / 256);
        if (!kx || !c.kh) { rc = MER_ENOMEM; goto done; }
        if (xk) xinf_q8 |= quantize_q8k(x, n * d_model, kx, use_simd(flags));
        c.kx = kx;
    }
    if (xinf_q8) { c.ax = NULL; c.kx = NULL; xk = 0; c.xflags = flags & ~MER_FLAG_ACT_Q8; }
    if (c.ax && xpairs) {
        if ((rc = q8_pairs_alloc(n, d_model / 32, &c.apx))) goto done;
        q8_pairs_fill(c.ax, n, d_model / 32, c.apx);
    }
    if (hpairs && (rc = q8_pairs_alloc((int64_t)k * n, d_ff / 32, &c.aph))) goto done;
    int64_t bytes = 0;
    for (int e = 0; e < k; e++) bytes += c.g[e].rowbytes * d_ff * 2 + c.dn[e].rowbytes * d_model;
    int pflags = bytes < PARALLEL_MIN_BYTES ? flags | MER_FLAG_SERIAL : flags;
    unsigned tried = 0; /* layouts prepared or refused (NULL: too wide to scale, no memory): each scanned once */
    int known = -1;
    for (int e = 0; e < k; e++) {
        int lg = perm_layout(c.g[e].type, c.xflags), lu = perm_layout(c.u[e].type, c.xflags);
        if (lg && !(tried & 1u << lg)) { tried |= 1u << lg; c.xpl[lg] = perm_prepare(lg, x, n, d_model, &known); }
        if (lu && !(tried & 1u << lu)) { tried |= 1u << lu; c.xpl[lu] = perm_prepare(lu, x, n, d_model, &known); }
    }
    /* with Q8_K activations (xk) every K-quant gate and up takes the q8 path */
    for (int e = 0; !xk && e < k && !c.x_inf; e++)
        c.x_inf = kq45_unfactored(c.g[e].type, c.xflags, known, x, n * d_model) ||
                  kq45_unfactored(c.u[e].type, c.xflags, known, x, n * d_model);
#ifdef MER_PROFILE
    struct timespec T0, T1, T2, T3; clock_gettime(CLOCK_MONOTONIC, &T0);
#endif
    pool_run(moe_phase1, &c, (int64_t)k * c.nchunk_ff, pflags);
#ifdef MER_PROFILE
    clock_gettime(CLOCK_MONOTONIC, &T1);
#endif
    /* the barrier is pool_run's join: h is complete */
    for (int e = 0; e < k; e++) {
        const float *he = c.h + (int64_t)e * n * d_ff;
        /* per expert: an infinite h (from an infinite x, or an overflow) sends that expert's down to float32 */
        int hinf_q8 = 0;
        if (h0) hinf_q8 |= quantize_q8(he, n * d_ff, c.ah + (int64_t)e * n * (d_ff / 32), use_simd(flags));
        if (hpairs && !hinf_q8)
            q8_pairs_fill(c.ah + (int64_t)e * n * (d_ff / 32), n, d_ff / 32, q8_pairs_at(c.aph, (int64_t)e * n, d_ff / 32));
        if (hk) hinf_q8 |= quantize_q8k(he, n * d_ff, c.kh + (int64_t)e * n * (d_ff / 256), use_simd(flags));
        c.hflags[e] = hinf_q8 ? flags & ~MER_FLAG_ACT_Q8 : flags;
        int hinf = -1;
        c.hp[e] = perm_prepare(perm_layout(c.dn[e].type, c.hflags[e]), he, n, d_ff, &hinf);
        c.h_inf[e] = hk && !hinf_q8 ? 0 : kq45_unfactored(c.dn[e].type, c.hflags[e], hinf, he, n * d_ff);
    }
#ifdef MER_PROFILE
    clock_gettime(CLOCK_MONOTONIC, &T2);
#endif
    pool_run(moe_phase2, &c, (d_model + c.chunk2 - 1) / c.chunk2, pflags);
#ifdef MER_PROFILE
    clock_gettime(CLOCK_MONOTONIC, &T3);
#define DT(a, b) ((b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3)
    prof_us[0] += DT(T0, T1); prof_us[1] += DT(T1, T2); prof_us[2] += DT(T2, T3); prof_us[3] += 1;
#endif
done:
    for (int l = 0; l < N_LAYOUTS; l++) free(c.xpl[l]);
    for (int e = 0; e < 8; e++) free(c.hp[e]);
    free(c.h); free(c.u_tmp); free(c.y_tmp); free(ax); free(c.ah); free(kx); free(c.kh);
    q8_pairs_free(&c.apx); q8_pairs_free(&c.aph);
    return rc;
}

/* Tests: one block row of `type` to float32 by the portable decoder (checked against gguf's dequantize). */
int mer_dequantize(int type, const void *w, int64_t nbytes, int64_t n, float *out, int64_t out_len) {
    mat_t m;
    int rc = mat_init(&m, type, w, nbytes, 1, n);
    if (rc) return rc;
    if (!out || out_len < n) return MER_ESHORT;
    for (int64_t b = 0; b < m.nblk; b++) dequant_block(type, m.data + b * m.bb, out + b * m.qk);
    return MER_OK;
}

/* ------------------------------------------------------------------------------------------------------------
 * strided 2-D copy: out[i, j] = *(src + off + i*sr + j*sc), elements of 1, 2, 4 or 8 bytes, any byte strides.
 * The converter's transposed SafeTensors projections (Llama 4's [d_model, 2 d_ff] gate_up and [d_ff, d_model]
 * down; GPT-OSS BF16's interleaved gate_up[:, :, 0::2] then transposed) are such views. NumPy copies them one
 * element at a time striding across the whole source (0.3-1 GB/s); here the output is made in bands of SC_BAND rows
 * (one pool task each), and inside a band the source is read along its short stride: for a transposed view each
 * source row gives SC_BAND contiguous elements (a few cache lines). Where the short stride is one element or two (an
 * even/odd take) of 2 or 4 bytes, 8x8 (2-byte) and 4x4 (4-byte) blocks are transposed in SSE2 registers (baseline
 * x86-64, so no run-time dispatch) into an L1 tile (sc_blocks); everything else element by element, through the
 * same tile buffer where the source's short stride runs down the output's columns (sc_tiles), and the edges directly
 * (sc_rect). Only loads, shuffles and stores: bytes move unchanged (NaN payloads included).
 * ---------------------------------------------------------------------------------------------------------- */
#define SC_BAND 128   /* output rows per task (a multiple of 8) */
#define SC_TILE_J 128 /* output columns per tile of a band (a multiple of 8) */
#define SC_AHEAD 16   /* source rows prefetched ahead: each is a separate stride the hardware prefetcher misses
                         (5120 x 16384 BF16 transposed: 2 threads 8.8 -> 12.3 GB/s; 8 to 128 all helped, 16-32 most) */

typedef struct {
    const uint8_t *src, *end; /* src: element [0, 0]; end: one past the caller's buffer */
    uint8_t *out;
    int64_t rows, cols, sr, sc, es;
    int flags;
} sc_ctx;

/* no x ni elements of es bytes: element (o, i) from p + o*po + i*pi to q + o*qo + i*qi (the inner walk along the
 * source's shorter stride) */
static void sc_walk(const uint8_t *p, int64_t po, int64_t pi, uint8_t *q, int64_t qo, int64_t qi, int64_t no,
                    int64_t ni, int64_t es) {
#define SC_WALK(T)                                                                                                    \
    do {                                                                                                              \
        for (int64_t o = 0; o < no; o++)                                                                              \
            for (int64_t i = 0; i < ni; i++) {                                                                        \
                T v;                                                                                                  \
                memcpy(&v, p + o * po + i * pi, sizeof v);                                                            \
                memcpy(q + o * qo + i * qi, &v, sizeof v);                                                            \
            }                                                                                                         \
    } while (0)
    switch (es) {
    case 1: SC_WALK(uint8_t); break;
    case 2: SC_WALK(uint16_t); break;
    case 4: SC_WALK(uint32_t); break;
    default: SC_WALK(uint64_t); break;
    }
#undef SC_WALK
}

/* rows [i0, i1) x columns [j0, j1), element by element, walking the source along its shorter stride */
static void sc_rect(const sc_ctx *c, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t es = c->es, os = c->cols * es;
    const uint8_t *p = c->src + i0 * c->sr + j0 * c->sc;
    uint8_t *q = c->out + i0 * os + j0 * es;
    if (llabs(c->sr) < llabs(c->sc))
        sc_walk(p, c->sc, c->sr, q, es, os, j1 - j0, i1 - i0, es);
    else
        sc_walk(p, c->sr, c->sc, q, os, es, i1 - i0, j1 - j0, es);
}

#if defined(MER_X86) && defined(__SSE2__)
/* 8 consecutive 2-byte elements (step 1) or every other one of 16 (step 2: the low halves of 8 dwords, sign-extended
 * and packed back, which is exact since each fits in int16) */
static inline __m128i sc_load16(const uint8_t *p, int step2) {
    if (!step2) return _mm_loadu_si128((const __m128i *)p);
    __m128i a = _mm_loadu_si128((const __m128i *)p), b = _mm_loadu_si128((const __m128i *)(p + 16));
    return _mm_packs_epi32(_mm_srai_epi32(_mm_slli_epi32(a, 16), 16), _mm_srai_epi32(_mm_slli_epi32(b, 16), 16));
}

static inline __m128i sc_load32(const uint8_t *p, int step2) {
    if (!step2) return _mm_loadu_si128((const __m128i *)p);
    __m128 a = _mm_loadu_ps((const float *)p), b = _mm_loadu_ps((const float *)(p + 16));
    return _mm_castps_si128(_mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))); /* a shuffle: bits unchanged */
}

/* the `bytes` of each of `n` source rows from p on, into L1 */
static inline void sc_prefetch(const uint8_t *p, int64_t sc, int n, int64_t bytes) {
    for (int k = 0; k < n; k++)
        for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(p + k * sc + o), _MM_HINT_T0);
}

/* rows [i0, i0 + ni) x columns [0, nj) with ni, nj multiples of the block (8 for 2 bytes, 4 for 4 bytes); the source
 * runs along i with a step of 1 or 2 elements. Tile by tile (ni x SC_TILE_J): each source row of the tile gives ni
 * contiguous elements, transposed in registers into `tmp`, whose rows then go out whole. Both the source's and the
 * output's row strides are often multiples of 2 KiB, so their rows share a few L1 sets: going through a small
 * contiguous tile instead of writing 16 bytes into each output row at a time keeps the lines from evicting each
 * other. `tmp`: SC_BAND x SC_TILE_J x 4 bytes, 64-aligned. False (nothing written) when a step-2 load would
 * pass `end`. */
static int sc_blocks(const sc_ctx *c, int64_t i0, int64_t ni, int64_t nj, uint8_t *tmp) {
    const int64_t es = c->es, os = c->cols * es, sr = c->sr, sc = c->sc;
    const int step2 = sr == 2 * es;
    if (step2) { /* the last load of each source row reads one element past the last one it keeps */
        for (int64_t j = 0; j < nj; j += nj - 1 > 0 ? nj - 1 : 1) {
            const uint8_t *p = c->src + j * sc + (i0 + ni - (es == 2 ? 8 : 4)) * sr;
            if (p + 32 > c->end) return 0;
        }
    }
    for (int64_t j0 = 0; j0 < nj; j0 += SC_TILE_J) {
        const int64_t tj = nj - j0 < SC_TILE_J ? nj - j0 : SC_TILE_J, ts = tj * es; /* ts: tmp's row bytes */
        if (es == 2) {
            for (int64_t j = 0; j < tj; j += 8) {
                const uint8_t *p = c->src + (j0 + j) * sc + i0 * sr;
                uint8_t *q = tmp + j * 2;
                if (j0 + j + SC_AHEAD + 8 <= nj) sc_prefetch(p + SC_AHEAD * sc, sc, 8, ni * sr);
                for (int64_t i = 0; i < ni; i += 8, p += 8 * sr, q += 8 * ts) {
                    __m128i r0 = sc_load16(p, step2), r1 = sc_load16(p + sc, step2), r2 = sc_load16(p + 2 * sc, step2),
                            r3 = sc_load16(p + 3 * sc, step2), r4 = sc_load16(p + 4 * sc, step2),
                            r5 = sc_load16(p + 5 * sc, step2), r6 = sc_load16(p + 6 * sc, step2),
                            r7 = sc_load16(p + 7 * sc, step2);
                    __m128i a0 = _mm_unpacklo_epi16(r0, r1), a1 = _mm_unpackhi_epi16(r0, r1);
                    __m128i a2 = _mm_unpacklo_epi16(r2, r3), a3 = _mm_unpackhi_epi16(r2, r3);
                    __m128i a4 = _mm_unpacklo_epi16(r4, r5), a5 = _mm_unpackhi_epi16(r4, r5);
                    __m128i a6 = _mm_unpacklo_epi16(r6, r7), a7 = _mm_unpackhi_epi16(r6, r7);
                    __m128i b0 = _mm_unpacklo_epi32(a0, a2), b1 = _mm_unpackhi_epi32(a0, a2);
                    __m128i b2 = _mm_unpacklo_epi32(a1, a3), b3 = _mm_unpackhi_epi32(a1, a3);
                    __m128i b4 = _mm_unpacklo_epi32(a4, a6), b5 = _mm_unpackhi_epi32(a4, a6);
                    __m128i b6 = _mm_unpacklo_epi32(a5, a7), b7 = _mm_unpackhi_epi32(a5, a7);
                    _mm_store_si128((__m128i *)q, _mm_unpacklo_epi64(b0, b4));
                    _mm_store_si128((__m128i *)(q + ts), _mm_unpackhi_epi64(b0, b4));
                    _mm_store_si128((__m128i *)(q + 2 * ts), _mm_unpacklo_epi64(b1, b5));
                    _mm_store_si128((__m128i *)(q + 3 * ts), _mm_unpackhi_epi64(b1, b5));
                    _mm_store_si128((__m128i *)(q + 4 * ts), _mm_unpacklo_epi64(b2, b6));
                    _mm_store_si128((__m128i *)(q + 5 * ts), _mm_unpackhi_epi64(b2, b6));
                    _mm_store_si128((__m128i *)(q + 6 * ts), _mm_unpacklo_epi64(b3, b7));
                    _mm_store_si128((__m128i *)(q + 7 * ts), _mm_unpackhi_epi64(b3, b7));
                }
            }
        } else {
            for (int64_t j = 0; j < tj; j += 4) {
                const uint8_t *p = c->src + (j0 + j) * sc + i0 * sr;
                uint8_t *q = tmp + j * 4;
                if (j0 + j + SC_AHEAD + 4 <= nj) sc_prefetch(p + SC_AHEAD * sc, sc, 4, ni * sr);
                for (int64_t i = 0; i < ni; i += 4, p += 4 * sr, q += 4 * ts) {
                    __m128i r0 = sc_load32(p, step2), r1 = sc_load32(p + sc, step2),
                            r2 = sc_load32(p + 2 * sc, step2), r3 = sc_load32(p + 3 * sc, step2);
                    __m128i a0 = _mm_unpacklo_epi32(r0, r1), a1 = _mm_unpackhi_epi32(r0, r1);
                    __m128i a2 = _mm_unpacklo_epi32(r2, r3), a3 = _mm_unpackhi_epi32(r2, r3);
                    _mm_store_si128((__m128i *)q, _mm_unpacklo_epi64(a0, a2));
                    _mm_store_si128((__m128i *)(q + ts), _mm_unpackhi_epi64(a0, a2));
                    _mm_store_si128((__m128i *)(q + 2 * ts), _mm_unpacklo_epi64(a1, a3));
                    _mm_store_si128((__m128i *)(q + 3 * ts), _mm_unpackhi_epi64(a1, a3));
                }
            }
        }
        for (int64_t i = 0; i < ni; i++) memcpy(c->out + (i0 + i) * os + j0 * es, tmp + i * ts, (size_t)ts);
    }
    return 1;
}
#endif

/* rows [i0, i1) x every column of a source whose short stride runs along i, element by element through the tile
 * buffer: each source row's piece goes down a column of `tmp` (rows of at most 256 bytes, so a band's lines spread
 * over the L1 sets), then tmp's rows go out whole. sc_rect's direct walk wrote one element into each of 128 output
 * rows per source row, rows whose stride is often a multiple of 4 KiB (one L1 set): for 1-byte elements (FP8) that
 * ran at 0.14 GB/s on one thread, a quarter of NumPy's column tiles. */
static void sc_tiles(const sc_ctx *c, int64_t i0, int64_t i1, uint8_t *tmp) {
    const int64_t es = c->es, os = c->cols * es, ni = i1 - i0, tjm = es == 1 ? SC_TILE_J : 256 / es;
    for (int64_t j0 = 0; j0 < c->cols; j0 += tjm) {
        const int64_t tj = c->cols - j0 < tjm ? c->cols - j0 : tjm, ts = tj * es; /* ts: tmp's row bytes */
        sc_walk(c->src + j0 * c->sc + i0 * c->sr, c->sc, c->sr, tmp, es, ts, tj, ni, es);
        for (int64_t i = 0; i < ni; i++) memcpy(c->out + (i0 + i) * os + j0 * es, tmp + i * ts, (size_t)ts);
    }
}

static void sc_task(void *c_, int64_t t) {
    const sc_ctx *c = c_;
    int64_t i0 = t * SC_BAND, i1 = i0 + SC_BAND < c->rows ? i0 + SC_BAND : c->rows;
    if (c->sc == c->es) { /* rows already contiguous in the source */
        for (int64_t i = i0; i < i1; i++) memcpy(c->out + i * c->cols * c->es, c->src + i * c->sr, (size_t)(c->cols * c->es));
        return;
    }
    /* the tile buffer, 64 KiB: on the heap, not the stack of whichever thread (a Python thread's may be small) */
    uint8_t *tmp = llabs(c->sr) < llabs(c->sc) && i1 - i0 > 1 && c->cols > 1
                       ? aligned_alloc(64, SC_BAND * SC_TILE_J * 4) : NULL;
#if defined(MER_X86) && defined(__SSE2__)
    if (tmp && !(c->flags & MER_FLAG_PORTABLE) && (c->es == 2 || c->es == 4) &&
        (c->sr == c->es || c->sr == 2 * c->es)) {
        int64_t b = c->es == 2 ? 8 : 4, ni = (i1 - i0) / b * b, nj = c->cols / b * b;
        if (ni > 0 && nj > 0 && sc_blocks(c, i0, ni, nj, tmp)) {
            free(tmp);
            sc_rect(c, i0, i0 + ni, nj, c->cols);
            sc_rect(c, i0 + ni, i1, 0, c->cols);
            return;
        }
    }
#endif
    if (tmp)
        sc_tiles(c, i0, i1, tmp);
    else
        sc_rect(c, i0, i1, 0, c->cols);
    free(tmp);
}

/* out (out_len bytes, C order [rows, cols]) = the view whose element [0, 0] is at buf + offset, byte strides
 * stride_r and stride_c (any sign), inside buf (buf_len bytes). Refuses (MER_EARG) an element size other than 1, 2,
 * 4, 8 or a view reaching outside buf, MER_ESHORT an output too small. */
int mer_strided_copy(const void *buf, int64_t buf_len, int64_t offset, int64_t esize, int64_t rows, int64_t cols,
                     int64_t stride_r, int64_t stride_c, void *out, int64_t out_len, int flags) {
    if (esize != 1 && esize != 2 && esize != 4 && esize != 8) return MER_EARG;
    if (rows < 0 || cols < 0 || buf_len < 0 || out_len < 0 || offset < 0) return MER_EARG;
    int64_t n, need;
    if (__builtin_mul_overflow(rows, cols, &n) || __builtin_mul_overflow(n, esize, &need)) return MER_EARG;
    if (out_len < need) return MER_ESHORT;
    if (n == 0) return MER_OK;
    if (!buf || !out) return MER_EARG;
    if (rows == 1) stride_r = 0;     /* a length-1 axis's stride is never used: llabs(INT64_MIN) below would be UB */
    if (cols == 1) stride_c = esize; /* (one element a row: the contiguous-rows path) */
    int64_t dr, dc, lo = offset, hi = offset; /* the first and last byte any element starts at */
    if (__builtin_mul_overflow(rows - 1, stride_r, &dr) || __builtin_mul_overflow(cols - 1, stride_c, &dc)) return MER_EARG;
    if (__builtin_add_overflow(lo, dr < 0 ? dr : 0, &lo) || __builtin_add_overflow(lo, dc < 0 ? dc : 0, &lo) ||
        __builtin_add_overflow(hi, dr > 0 ? dr : 0, &hi) || __builtin_add_overflow(hi, dc > 0 ? dc : 0, &hi))
        return MER_EARG;
    if (lo < 0 || hi > buf_len - esize) return MER_EARG;
    sc_ctx c = {.src = (const uint8_t *)buf + offset, .end = (const uint8_t *)buf + buf_len, .out = out, .rows = rows,
                .cols = cols, .sr = stride_r, .sc = stride_c, .es = esize, .flags = flags};
    pool_run(sc_task, &c, (rows + SC_BAND - 1) / SC_BAND, need < PARALLEL_MIN_BYTES ? flags | MER_FLAG_SERIAL : flags);
    return MER_OK;
}
