/* Block kernels for mer_runtime: W @ x with W in raw ggml Q4_0 / Q8_0 blocks, x float32, exact activations.
 *
 * Loaded with ctypes (no Python C-API): ctypes releases the GIL, so the caller splits rows across threads.
 * An AVX2+FMA+F16C path is chosen at run time when the CPU has it; otherwise portable C.
 * Block layouts (ggml-common.h): Q4_0 = f16 d, 16 bytes, element j is the low nibble of byte j and element j+16
 * its high nibble, value d*(q-8); Q8_0 = f16 d, 32 int8, value d*q.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MER_X86 1
#endif

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; exp--; } man &= 0x3ff; bits = sign | (exp << 23) | (man << 13); }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4); return f;
}

static void q4_0_rows_generic(const uint8_t *raw, const float *x, float *out, int64_t cols, int64_t r0, int64_t r1) {
    int64_t nblk = cols / 32, rowbytes = nblk * 18;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = raw + r * rowbytes;
        float acc = 0.f;
        for (int64_t b = 0; b < nblk; b++) {
            const uint8_t *blk = row + b * 18;
            float d = f16_to_f32((uint16_t)(blk[0] | (blk[1] << 8)));
            const float *xb = x + b * 32;
            float s = 0.f;
            for (int j = 0; j < 16; j++) {
                s += (float)((blk[2 + j] & 15) - 8) * xb[j] + (float)((blk[2 + j] >> 4) - 8) * xb[j + 16];
            }
            acc += d * s;
        }
        out[r] = acc;
    }
}

#ifdef MER_X86
__attribute__((target("avx2,fma,f16c")))
static inline float hsum256(__m256 acc) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

__attribute__((target("avx2,fma,f16c")))
static void q4_0_rows_avx2(const uint8_t *raw, const float *x, float *out, int64_t cols, int64_t r0, int64_t r1) {
    int64_t nblk = cols / 32, rowbytes = nblk * 18;
    const __m128i mask = _mm_set1_epi8(15);
    const __m256 eight = _mm256_set1_ps(8.f);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = raw + r * rowbytes;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < nblk; b++) {
            const uint8_t *blk = row + b * 18;
            uint16_t dh; memcpy(&dh, blk, 2);
            __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
            __m128i lo = _mm_and_si128(q, mask);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            const float *xb = x + b * 32;
            __m256 l0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), eight);
            __m256 l1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), eight);
            __m256 h0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), eight);
            __m256 h1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), eight);
            __m256 s = _mm256_mul_ps(l0, _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xb + 8), s);
            s = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xb + 16), s);
            s = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xb + 24), s);
            acc = _mm256_fmadd_ps(d, s, acc);
        }
        out[r] = hsum256(acc);
    }
}
#endif

static void q8_0_rows_generic(const uint8_t *raw, const float *x, float *out, int64_t cols, int64_t r0, int64_t r1) {
    int64_t nblk = cols / 32, rowbytes = nblk * 34;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = raw + r * rowbytes;
        float acc = 0.f;
        for (int64_t b = 0; b < nblk; b++) {
            const uint8_t *blk = row + b * 34;
            float d = f16_to_f32((uint16_t)(blk[0] | (blk[1] << 8)));
            const float *xb = x + b * 32;
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += (float)(int8_t)blk[2 + j] * xb[j];
            acc += d * s;
        }
        out[r] = acc;
    }
}

#ifdef MER_X86
__attribute__((target("avx2,fma,f16c")))
static void q8_0_rows_avx2(const uint8_t *raw, const float *x, float *out, int64_t cols, int64_t r0, int64_t r1) {
    int64_t nblk = cols / 32, rowbytes = nblk * 34;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = raw + r * rowbytes;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < nblk; b++) {
            const uint8_t *blk = row + b * 34;
            uint16_t dh; memcpy(&dh, blk, 2);
            __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
            const float *xb = x + b * 32;
            __m128i q0 = _mm_loadu_si128((const __m128i *)(blk + 2));
            __m128i q1 = _mm_loadu_si128((const __m128i *)(blk + 18));
            __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), _mm256_loadu_ps(xb + 8), s);
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), _mm256_loadu_ps(xb + 16), s);
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), _mm256_loadu_ps(xb + 24), s);
            acc = _mm256_fmadd_ps(d, s, acc);
        }
        out[r] = hsum256(acc);
    }
}
#endif

int mer_has_avx2(void) {
#ifdef MER_X86
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* use_simd: -1 = best available, 0 = portable C (so tests can check both paths on an AVX2 machine) */
void mer_q4_0_rows(const uint8_t *raw, const float *x, float *out, int64_t cols, int64_t r0, int64_t r1, int use_simd) {
#ifdef MER_X86
    if (use_simd != 0 && mer_has_avx2()) { q4_0_rows_avx2(raw, x, out, cols, r0, r1); return; }
#endif
    q4_0_rows_generic(raw, x, out, cols, r0, r1);
}

void mer_q8_0_rows(const uint8_t *raw, const float *x, float *out, int64_t cols, int64_t r0, int64_t r1, int use_simd) {
#ifdef MER_X86
    if (use_simd != 0 && mer_has_avx2()) { q8_0_rows_avx2(raw, x, out, cols, r0, r1); return; }
#endif
    q8_0_rows_generic(raw, x, out, cols, r0, r1);
}
