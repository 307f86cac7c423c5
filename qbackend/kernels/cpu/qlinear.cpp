// qbackend CPU kernels for 4-bit (NF4/FP4 codebook, int4) and int8 weight-only linears.
//
// Plain C ABI (loaded with ctypes, no libtorch headers): it builds in a few seconds on any
// machine with g++ and does not depend on torch's C++ ABI. Threads: torch's own OpenMP team where
// torch runs on OpenMP (handed over at load time, see qb_set_omp), else a small pool of its own
// (RowPool below); torch's BLAS is called single-threaded from those threads.
//
// Layout: 4-bit codes are bitsandbytes' flat layout (element i of the row-major [N, K] weight in
// the high nibble of byte i/2 when i is even). Codebook blocks run over the flattened weight
// (they may straddle rows); int4 groups run along K within a row.
//
// Kernels (AVX-512 builds; AVX2 builds have their own fused kernels in qlinear_avx2.cpp, other
// CPUs the exact scalar dequantization + BLAS path only):
// * fused 4-bit GEMV / small-M GEMM (K % 32 == 0, power-of-two blocks/groups >= 32): see the
//   comment above gemv4_row; codes are decoded in registers and never materialised.
// * int8 GEMV / small-M GEMM: vpmovsxbd + cvt + FMA, per-channel scale once per output.
// * exact dequantization of row panels (any shape), used with BLAS sgemm for large M.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <unistd.h>

#include "qlinear_common.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define QB_AVX512 1
#else
#define QB_AVX512 0
#endif

extern "C" {

int qb_abi_version() { return 6; }
int qb_has_avx512() { return QB_AVX512; }
int qb4_fast_ok(const QW4* q);

}  // extern "C"

namespace {

inline int ilog2(int64_t v) {
    int l = 0;
    while ((int64_t(1) << l) < v) ++l;
    return l;
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

int g_nr = 0;  // rows of W per small-M register tile; 0 = by M (tuning knob, see qb_set_nr)

inline float nested_const(const QW4& q, int64_t blk) {
    // Same operation order as the reference (table * absmax2, then + offset; no FMA contraction).
    float t = q.ntable[q.ncodes[blk]] * q.nabsmax[blk / q.nbs];
    return t + *q.noffset;
}

inline float block_const(const QW4& q, int64_t blk) {
    return q.absmax ? q.absmax[blk] : nested_const(q, blk);
}

// Per-row constants: s[j] (scale) and z[j] (int4: zero point as float) for the blocks/groups that
// row n touches, j relative to `first`; `off` is the row's first element's offset in its block.
struct RowConsts {
    int64_t first = 0;
    int64_t off = 0;
    int64_t count = 0;
};

inline RowConsts fill_row_consts(const QW4& q, int64_t n, float* s, float* z) {
    RowConsts r;
    if (q.layout == LAYOUT_CODEBOOK) {
        const int64_t e0 = n * q.K;
        r.first = e0 / q.bs;
        r.off = e0 - r.first * q.bs;
        r.count = (e0 + q.K - 1) / q.bs - r.first + 1;
        int64_t j = 0;
        if (q.absmax) {
            std::memcpy(s, q.absmax + r.first, sizeof(float) * r.count);
            j = r.count;
        } else if (is_pow2(q.nbs)) {
            // Scalar de-nesting measured faster than 16-wide gathers here.
            const int lnb = ilog2(q.nbs);
            const float off = *q.noffset;
            for (; j < r.count; ++j) {
                const int64_t b = r.first + j;
                const float t = q.ntable[q.ncodes[b]] * q.nabsmax[b >> lnb];
                s[j] = t + off;
            }
        }
        for (; j < r.count; ++j) s[j] = block_const(q, r.first + j);
    } else {
        r.count = q.G;
        const float* sr = q.scale + n * q.G;
        std::memcpy(s, sr, sizeof(float) * q.G);
        if (q.zp) {
            const uint8_t* zr = q.zp + n * q.G;
            for (int64_t j = 0; j < q.G; ++j) z[j] = (float)zr[j];
        } else {
            for (int64_t j = 0; j < q.G; ++j) z[j] = 8.0f;
        }
    }
    // Zero padding: the 16-wide permutexvar window may read past the last block.
    for (int64_t j = r.count; j < r.count + 17; ++j) {
        s[j] = 0.0f;
        z[j] = 0.0f;
    }
    return r;
}

inline int shift_of(const QW4& q) {
    // Power-of-two blocks/groups use shifts; one int4 group per row maps every lane to group 0.
    if (q.layout == LAYOUT_INT4 && q.G == 1) return 30;
    return ilog2(q.bs);
}

inline float lut_value(const QW4& q, int code, bool affine) {
    if (q.layout == LAYOUT_CODEBOOK) return q.table[code];
    return affine ? (float)code : (float)(code - 8);
}

inline int nibble(const uint8_t* codes, int64_t e) {
    const uint8_t b = codes[e >> 1];
    return (e & 1) ? (b & 0xF) : (b >> 4);
}

// Generic dequantization of rows [n0, n1) into out[(n-n0)*K + k] (any shape). Exact: one rounding
// per element, as the reference (table[c] * absmax, (q - zp) * scale).
void dequant4_rows_scalar(const QW4& q, int64_t n0, int64_t n1, float* out, float* s, float* z) {
    for (int64_t n = n0; n < n1; ++n) {
        float* o = out + (n - n0) * q.K;
        const int64_t e0 = n * q.K;
        // Walk the row block by block (group by group): one constant per run, no division per element.
        int64_t k = 0;
        if (q.layout == LAYOUT_CODEBOOK) {
            while (k < q.K) {
                const int64_t b = (e0 + k) / q.bs;
                const int64_t kend = std::min<int64_t>(q.K, (b + 1) * q.bs - e0);
                const float sc = block_const(q, b);
                for (; k < kend; ++k) o[k] = q.table[nibble(q.codes, e0 + k)] * sc;
            }
        } else {
            fill_row_consts(q, n, s, z);  // z: the zero point (8 if symmetric)
            for (int64_t g = 0; k < q.K; ++g) {
                const int64_t kend = std::min<int64_t>(q.K, (g + 1) * q.bs);
                for (; k < kend; ++k) o[k] = ((float)nibble(q.codes, e0 + k) - z[g]) * s[g];
            }
        }
    }
}

#if QB_AVX512

inline __m512 lut_vec(const QW4& q, bool affine) {
    alignas(64) float l[16];
    for (int c = 0; c < 16; ++c) l[c] = lut_value(q, c, affine);
    return _mm512_load_ps(l);
}

// Fast dequantization of rows [n0, n1) (needs K % 8 == 0 and power-of-two blocks/groups or G == 1):
// 16 code bytes -> 32 weights per step, re-interleaved to natural order.
void dequant4_rows_avx512(const QW4& q, int64_t n0, int64_t n1, float* out, float* s, float* z) {
    const int64_t K = q.K;
    const bool affine = q.layout == LAYOUT_INT4 && q.zp;
    const __m512 lut = lut_vec(q, affine);
    const int lb = shift_of(q);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const int64_t K32 = K / 32 * 32;
    for (int64_t n = n0; n < n1; ++n) {
        const RowConsts r = fill_row_consts(q, n, s, z);
        const uint8_t* cr = q.codes + n * K / 2;
        float* o = out + (n - n0) * K;
        for (int64_t k = 0; k < K32; k += 32) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(cr + k / 2)));
            __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            __m512 lo = _mm512_permutexvar_ps(v, lut);
            __m512 w[2] = {_mm512_permutex2var_ps(hi, ilo, lo), _mm512_permutex2var_ps(hi, ihi, lo)};
            for (int h = 0; h < 2; ++h) {
                const int64_t p = r.off + k + 16 * h;
                const int64_t base = p >> lb;
                const __m512i idx =
                    _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int32_t)(p - (base << lb))), iota), lb);
                __m512 sv = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(s + base));
                __m512 wv = w[h];
                if (affine) wv = _mm512_sub_ps(wv, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(z + base)));
                _mm512_storeu_ps(o + k + 16 * h, _mm512_mul_ps(wv, sv));
            }
        }
        for (int64_t k = K32; k < K; ++k) {
            const int64_t j = (r.off + k) >> lb;
            const float c = lut_value(q, nibble(q.codes, n * K + k), affine);
            o[k] = (affine ? c - z[j] : c) * s[j];
        }
    }
}

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// ---- fused 4-bit kernels (K % 32 == 0; blocks/groups of 32 * 2^k weights, or one group per row) ----
//
// 16 code bytes (32 weights) are zero-extended to dwords (vpmovzxbd from memory); the low nibble
// is then already an index for the vpermps LUT (which reads only the low 4 bits) and the high
// nibble needs one shift. This costs half the shifts of shifting every nibble of a 64-byte load to
// the bottom, which measured as the bottleneck. The decoded vectors hold weights 32g + 2i (high
// nibbles) and 32g + 2i + 1 (low nibbles), so x is split into even/odd halves per 32 once per call
// (xq). A group of 32 never straddles a block, so each group needs one broadcast scale.

// One row of W against one row of x, 128 weights (4 groups of 32) per step. GPB: groups sharing a
// block constant within a step (4: the whole step, one scale FMA; 2: two; 1: one per group).
// sc(j) gives the constant of the row's j-th block: for nested constants it is decoded right here,
// a few scalar loads and flops per block that overlap with the vector work (a separate per-row
// de-nesting pass measured at a third of the GEMV time).
template <int GPB, typename Scale>
inline float gemv4_row(const uint8_t* cr, const float* xq, int64_t G32, int64_t off, int lb, Scale&& sc,
                       const __m512 lut) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= G32; g += 4) {
        __m512 a[4];
        for (int u = 0; u < 4; ++u) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(cr + 16 * (g + u))));
            a[u] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), _mm512_load_ps(xq + 32 * (g + u)));
            a[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, lut), _mm512_load_ps(xq + 32 * (g + u) + 16), a[u]);
        }
        const int64_t j = (off + 32 * g) >> lb;
        if (GPB == 4) {
            acc0 = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
                                   _mm512_set1_ps(sc(j)), acc0);
        } else if (GPB == 2) {
            acc0 = _mm512_fmadd_ps(_mm512_add_ps(a[0], a[1]), _mm512_set1_ps(sc(j)), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_add_ps(a[2], a[3]), _mm512_set1_ps(sc(j + 1)), acc1);
        } else {
            for (int u = 0; u < 4; ++u) {
                const __m512 sv = _mm512_set1_ps(sc((off + 32 * (g + u)) >> lb));
                if (u & 1) acc1 = _mm512_fmadd_ps(a[u], sv, acc1);
                else acc0 = _mm512_fmadd_ps(a[u], sv, acc0);
            }
        }
    }
    for (; g < G32; ++g) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(cr + 16 * g)));
        __m512 a = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), _mm512_load_ps(xq + 32 * g));
        a = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, lut), _mm512_load_ps(xq + 32 * g + 16), a);
        acc0 = _mm512_fmadd_ps(a, _mm512_set1_ps(sc((off + 32 * g) >> lb)), acc0);
    }
    return hsum(_mm512_add_ps(acc0, acc1));
}

template <typename Scale>
inline float gemv4_row_any(const uint8_t* cr, const float* xq, int64_t G32, int64_t off, int lb, Scale&& sc,
                           const __m512 lut) {
    if (lb >= 7 && off % 128 == 0) return gemv4_row<4>(cr, xq, G32, off, lb, sc, lut);
    if (lb == 6 && off % 64 == 0) return gemv4_row<2>(cr, xq, G32, off, lb, sc, lut);
    return gemv4_row<1>(cr, xq, G32, off, lb, sc, lut);
}

// Rows [n0, n1) of W against one row of x (GEMV). Affine int4: - zp * s * sum(x over the group) is
// added from the per-group sums of x (xg).
template <bool AFF>
void gemv4(const QW4& q, const float* xq, const float* xg, const float* bias, float* y, int64_t n0, int64_t n1) {
    const int64_t K = q.K, G32 = K / 32;
    const __m512 lut = lut_vec(q, AFF);
    const int lb = shift_of(q);
    const int lnb = q.nbs > 0 ? ilog2(q.nbs) : 0;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* cr = q.codes + n * K / 2;
        float t;
        if (q.layout == LAYOUT_CODEBOOK) {
            const int64_t e0 = n * K, first = e0 >> lb, off = e0 - (first << lb);
            if (q.absmax) {
                const float* a = q.absmax + first;
                t = gemv4_row_any(cr, xq, G32, off, lb, [a](int64_t j) { return a[j]; }, lut);
            } else {
                const uint8_t* nc = q.ncodes + first;
                const float *nt = q.ntable, *na = q.nabsmax, o = *q.noffset;
                // Same operations as the reference: table * absmax2, then + offset (no FMA contraction).
                t = gemv4_row_any(cr, xq, G32, off, lb,
                                  [=](int64_t j) { return nt[nc[j]] * na[(first + j) >> lnb] + o; }, lut);
            }
        } else {
            const float* sr = q.scale + n * q.G;
            t = gemv4_row_any(cr, xq, G32, 0, lb, [sr](int64_t j) { return sr[j]; }, lut);
            if (AFF) {
                const uint8_t* zr = q.zp + n * q.G;
                __m512 c = _mm512_setzero_ps();
                for (int64_t j = 0; j < q.G; j += 16) {
                    const __mmask16 mk = (q.G - j) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (q.G - j)) - 1);
                    const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, zr + j)));
                    c = _mm512_fmadd_ps(_mm512_mul_ps(zf, _mm512_maskz_loadu_ps(mk, sr + j)), _mm512_maskz_loadu_ps(mk, xg + j), c);
                }
                t -= hsum(c);
            }
        }
        if (bias) t += bias[n];
        y[n] = t;
    }
}

// Small M: NR rows of W x MT rows of x per register tile. Decoded weights are scaled first
// (w = q * s, or q * s - zp * s for affine int4), so each x load feeds NR FMAs.
template <int NR, int MT, bool AFF>
void gemm4_block(const QW4& q, const float* xq, int64_t m0, const float* bias, float* y, int64_t n0, int64_t n1,
                 float* s, float* z, size_t cl) {
    const int64_t K = q.K, N = q.N, G32 = K / 32;
    const __m512 lut = lut_vec(q, AFF);
    const int lb = shift_of(q);
    for (int64_t n = n0; n < n1; n += NR) {
        RowConsts rc[NR];
        const uint8_t* cr[NR];
        float* sr[NR];
        float* zr[NR];
        for (int r = 0; r < NR; ++r) {
            sr[r] = s + r * cl;
            zr[r] = z + r * cl;
            rc[r] = fill_row_consts(q, n + r, sr[r], zr[r]);
            if (AFF)
                for (int64_t j = 0; j < rc[r].count; ++j) zr[r][j] = -zr[r][j] * sr[r][j];
            cr[r] = q.codes + (n + r) * K / 2;
        }
        __m512 acc[NR][MT];
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G32; ++g) {
            __m512 w0[NR], w1[NR];
            for (int r = 0; r < NR; ++r) {
                const int64_t j = (rc[r].off + 32 * g) >> lb;
                const __m512 sv = _mm512_set1_ps(sr[r][j]);
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(cr[r] + 16 * g)));
                const __m512 d0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
                const __m512 d1 = _mm512_permutexvar_ps(v, lut);
                if (AFF) {
                    const __m512 bv = _mm512_set1_ps(zr[r][j]);
                    w0[r] = _mm512_fmadd_ps(d0, sv, bv);
                    w1[r] = _mm512_fmadd_ps(d1, sv, bv);
                } else {
                    w0[r] = _mm512_mul_ps(d0, sv);
                    w1[r] = _mm512_mul_ps(d1, sv);
                }
            }
            for (int m = 0; m < MT; ++m) {
                const float* xm = xq + (m0 + m) * K + 32 * g;
                const __m512 x0 = _mm512_load_ps(xm), x1 = _mm512_load_ps(xm + 16);
                for (int r = 0; r < NR; ++r) {
                    acc[r][m] = _mm512_fmadd_ps(w0[r], x0, acc[r][m]);
                    acc[r][m] = _mm512_fmadd_ps(w1[r], x1, acc[r][m]);
                }
            }
        }
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MT; ++m) {
                float t = hsum(acc[r][m]);
                if (bias) t += bias[n + r];
                y[(m0 + m) * N + n + r] = t;
            }
    }
}

template <int NR, bool AFF>
void gemm4_blocks(const QW4& q, const float* xq, int64_t M, const float* bias, float* y, int64_t n0, int64_t n1,
                  float* s, float* z, size_t cl) {
    for (int64_t m = 0; m < M; m += 8) {
        switch (std::min<int64_t>(8, M - m)) {
#define QB_CASE(MT) case MT: gemm4_block<NR, MT, AFF>(q, xq, m, bias, y, n0, n1, s, z, cl); break;
            QB_CASE(1) QB_CASE(2) QB_CASE(3) QB_CASE(4) QB_CASE(5) QB_CASE(6) QB_CASE(7) QB_CASE(8)
#undef QB_CASE
            default: break;
        }
    }
}

template <bool AFF>
void gemm4_rows(const QW4& q, const float* xq, const float* xg, int64_t M, const float* bias, float* y, int64_t n0,
                int64_t n1, float* s, float* z, size_t cl) {
    if (M == 1) {
        gemv4<AFF>(q, xq, xg, bias, y, n0, n1);
        return;
    }
    const int nr = g_nr > 0 ? g_nr : (M >= 6 ? 4 : 2);  // measured: 4 rows of W per tile from M = 6 up
    const int64_t nfull = n0 + (n1 - n0) / nr * nr;
    if (nr == 4) gemm4_blocks<4, AFF>(q, xq, M, bias, y, n0, nfull, s, z, cl);
    else if (nr == 2) gemm4_blocks<2, AFF>(q, xq, M, bias, y, n0, nfull, s, z, cl);
    else gemm4_blocks<1, AFF>(q, xq, M, bias, y, n0, nfull, s, z, cl);
    if (nfull < n1) gemm4_blocks<1, AFF>(q, xq, M, bias, y, nfull, n1, s, z, cl);
}

// int8: 16 codes per vpmovsxbd, converted and FMA'd; the per-channel scale is applied once per row.
#ifndef QB_PF8
#define QB_PF8 2048
#endif
template <int MT>
void gemm8_tile(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t m0,
                const float* bias, float* y, int64_t n0, int64_t n1) {
    const int64_t K64 = K / 64 * 64;
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t* cr = codes + n * K;
        __m512 acc[MT][2];
        for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K64; k += 64) {
            // The int8 GEMV is DRAM-bound: software prefetch 2 KiB ahead (measured 10-20% faster on one core).
            _mm_prefetch((const char*)(cr + k + QB_PF8), _MM_HINT_T0);
            __m512 w[4];
            for (int u = 0; u < 4; ++u)
                w[u] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(cr + k + 16 * u))));
            for (int m = 0; m < MT; ++m) {
                const float* xr = x + (m0 + m) * K + k;
                acc[m][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr), acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr + 16), acc[m][1]);
                acc[m][0] = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(xr + 32), acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(xr + 48), acc[m][1]);
            }
        }
        for (int64_t k = K64; k < K; k += 16) {
            const __mmask16 mk = (K - k) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, cr + k)));
            for (int m = 0; m < MT; ++m)
                acc[m][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, x + (m0 + m) * K + k), acc[m][0]);
        }
        for (int m = 0; m < MT; ++m) {
            float t = hsum(_mm512_add_ps(acc[m][0], acc[m][1])) * scale[n];
            if (bias) t += bias[n];
            y[(m0 + m) * N + n] = t;
        }
    }
}

// int8 small-M tile: NR rows of W x MT rows of x; each x load feeds NR FMAs. The per-channel scale
// is applied once per output.
template <int NR, int MT>
void gemm8_block(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t m0,
                 const float* bias, float* y, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n += NR) {
        __m512 acc[NR][MT];
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
        const int64_t K16 = K / 16 * 16;
        for (int64_t k = 0; k < K16; k += 16) {
            __m512 w[NR];
            for (int r = 0; r < NR; ++r)
                w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(codes + (n + r) * K + k))));
            for (int m = 0; m < MT; ++m) {
                const __m512 xv = _mm512_loadu_ps(x + (m0 + m) * K + k);
                for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], xv, acc[r][m]);
            }
        }
        if (K16 < K) {
            const __mmask16 mk = (__mmask16)((1u << (K - K16)) - 1);
            __m512 w[NR];
            for (int r = 0; r < NR; ++r)
                w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, codes + (n + r) * K + K16)));
            for (int m = 0; m < MT; ++m) {
                const __m512 xv = _mm512_maskz_loadu_ps(mk, x + (m0 + m) * K + K16);
                for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], xv, acc[r][m]);
            }
        }
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MT; ++m) {
                float t = hsum(acc[r][m]) * scale[n + r];
                if (bias) t += bias[n + r];
                y[(m0 + m) * N + n + r] = t;
            }
    }
}

#ifndef QB8_NR
#define QB8_NR 4
#endif
template <int NR>
void gemm8_blocks(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                  const float* bias, float* y, int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += 8) {
        switch (std::min<int64_t>(8, M - m)) {
#define QB_CASE(MT) case MT: gemm8_block<NR, MT>(codes, scale, N, K, x, m, bias, y, n0, n1); break;
            QB_CASE(1) QB_CASE(2) QB_CASE(3) QB_CASE(4) QB_CASE(5) QB_CASE(6) QB_CASE(7) QB_CASE(8)
#undef QB_CASE
            default: break;
        }
    }
}

void gemm8_rows(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                const float* bias, float* y, int64_t n0, int64_t n1) {
    if (M == 1) {
        gemm8_tile<1>(codes, scale, N, K, x, 0, bias, y, n0, n1);
        return;
    }
    const int64_t nfull = n0 + (n1 - n0) / QB8_NR * QB8_NR;
    gemm8_blocks<QB8_NR>(codes, scale, N, K, x, M, bias, y, n0, nfull);
    if (nfull < n1) gemm8_blocks<1>(codes, scale, N, K, x, M, bias, y, nfull, n1);
}

#endif  // QB_AVX512

// The fused kernels: K % 32 == 0 and power-of-two blocks/groups of at least 32 (or one group per row).
bool fused4_ok(const QW4& q) {
    if (q.K % 32 != 0) return false;
    if (q.layout == LAYOUT_CODEBOOK && !q.absmax && !is_pow2(q.nbs)) return false;  // inline de-nesting shifts by log2(nbs)
    if (q.layout == LAYOUT_CODEBOOK) return is_pow2(q.bs) && q.bs >= 32;
    return q.G == 1 || (is_pow2(q.bs) && q.bs >= 32);
}

// The vectorised dequantization: K % 8 == 0 and power-of-two blocks/groups of at least 8.
bool fast4_ok(const QW4& q) {
    if (q.K % 8 != 0) return false;
    if (q.layout == LAYOUT_CODEBOOK) return is_pow2(q.bs) && q.bs >= 8;
    return q.G == 1 || (is_pow2(q.bs) && q.bs >= 8);
}

size_t const_buf_len(const QW4& q) {
    // Blocks one row can touch, plus the zero padding for the 16-wide window.
    const int64_t per_row = q.layout == LAYOUT_CODEBOOK ? (q.K + q.bs - 1) / q.bs + 1 : q.G;
    return (size_t)per_row + 40;
}

// Per-thread scratch, grown as needed and reused across calls (no allocation per row block).
float* scratch(int slot, size_t n) {
    thread_local std::vector<float> bufs[3];
    if (bufs[slot].size() < n) bufs[slot].resize(n);
    return bufs[slot].data();
}

// torch's OpenMP runtime (libgomp in the Linux wheels), handed over by qb_set_omp. torch's own ops
// run on its OpenMP team, whose threads spin for a while after each region; a second pool of ours
// would then fight them for the same cores (on 2 quiet cores decode ran ~1.5x slower that way).
// So chunks run on torch's team where there is one. Not inside a running region (nested teams
// would oversubscribe), and not in a forked child (libgomp's team does not survive fork).
// A region ends with a barrier that waits for every team thread, also one the OS has not
// scheduled (other jobs on the cores): that costs a scheduler time slice (ms) per call, where the
// own pool (RowPool) loses nothing. So each region measures how long the caller waited at that
// barrier; a wait far beyond a chunk's time sends the next calls to RowPool for a while (doubling
// while the cores stay busy, halving after each good region).
struct OmpEntry {
    void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
    int (*thread_num)() = nullptr;                                            // omp_get_thread_num
    int (*in_parallel)() = nullptr;                                           // omp_in_parallel
    pid_t pid = 0;
};
OmpEntry g_omp;
std::atomic<int64_t> g_omp_skip{0};     // calls left to run on RowPool
std::atomic<int64_t> g_omp_backoff{0};  // length of the next such period
// The first period's length. Short: on a quiet machine a lone late thread (a VM's stolen time slice)
// should cost a few calls on RowPool, which decodes at about one thread's speed next to the team's
// spinning workers, not a token's worth; a machine that stays busy doubles it to the cap within a
// few regions anyway.
std::atomic<int64_t> g_omp_skip_min{16};
std::atomic<int64_t> g_omp_regions{0}, g_omp_slow{0};  // counters for tests and tuning

using Clock = std::chrono::steady_clock;

struct OmpJob {
    void (*fn)(void*, int64_t, int);
    void* ctx;
    int64_t n;
    std::atomic<int64_t> next{0};
    Clock::time_point start, caller_done;
    int64_t caller_chunks = 0;
};

void omp_body(void* p) {
    OmpJob& j = *static_cast<OmpJob*>(p);
    const int slot = g_omp.thread_num();
    int64_t done = 0;
    for (int64_t c = j.next.fetch_add(1); c < j.n; c = j.next.fetch_add(1), ++done) j.fn(j.ctx, c, slot);
    if (slot == 0) {
        j.caller_done = Clock::now();
        j.caller_chunks = done;
    }
}

// Chunks [0, n) on torch's OpenMP team of nthreads; false (nothing run) where that is not possible.
bool omp_run(int64_t n, int nthreads, void (*fn)(void*, int64_t, int), void* ctx) {
    if (g_omp.parallel == nullptr || g_omp.pid != getpid() || g_omp.in_parallel()) return false;
    if (g_omp_skip.load(std::memory_order_relaxed) > 0 && g_omp_skip.fetch_sub(1, std::memory_order_relaxed) > 0)
        return false;
    OmpJob job;
    job.fn = fn;
    job.ctx = ctx;
    job.n = n;
    job.start = Clock::now();
    job.caller_done = job.start;
    // Chunks are claimed dynamically, so a thread the OS runs late finds none left to do.
    g_omp.parallel(omp_body, &job, (unsigned)nthreads, 0);
    const auto end = Clock::now();
    const auto us = [](Clock::duration d) { return std::chrono::duration_cast<std::chrono::microseconds>(d).count(); };
    const int64_t wait = us(end - job.caller_done);
    const int64_t chunk = us(job.caller_done - job.start) / std::max<int64_t>(1, job.caller_chunks);
    g_omp_regions.fetch_add(1, std::memory_order_relaxed);
    int64_t b = g_omp_backoff.load(std::memory_order_relaxed);
    if (wait > 300 + 4 * chunk) {
        g_omp_slow.fetch_add(1, std::memory_order_relaxed);
        b = std::min<int64_t>(std::max<int64_t>(g_omp_skip_min.load(std::memory_order_relaxed), 2 * b), int64_t(1) << 16);
        g_omp_skip.store(b, std::memory_order_relaxed);
    } else {
        b /= 2;
    }
    g_omp_backoff.store(b, std::memory_order_relaxed);
    return true;
}

// A small thread pool for the fused kernels where there is no OpenMP team to use (see above).
// The cores are often shared (CI machines, other jobs): an OpenMP region ends with a barrier that
// waits for every team thread, also one the OS has not scheduled yet. Here the calling thread
// claims row blocks itself; a worker joins only if it wakes up while blocks remain, and the caller
// waits only for blocks a worker has actually started. Idle workers sleep on a condition variable
// after a short spin, so they cost nothing between calls.
class RowPool {
  public:
    template <typename F>
    void run(int64_t nchunks, int nthreads, F& body) {
        if (nthreads > 1 && nchunks > 1 &&
            omp_run(nchunks, nthreads, [](void* ctx, int64_t c, int slot) { (*static_cast<F*>(ctx))(c, slot); }, &body))
            return;
        std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
        if (nthreads <= 1 || nchunks <= 1 || !busy.owns_lock()) {  // a concurrent caller runs serially
            for (int64_t c = 0; c < nchunks; ++c) body(c, 0);
            return;
        }
        ensure_workers(nthreads - 1);
        Job job;
        job.fn = [](void* ctx, int64_t c, int slot) { (*static_cast<F*>(ctx))(c, slot); };
        job.ctx = &body;
        job.n = nchunks;
        job.max_workers = nthreads - 1;
        {
            std::lock_guard<std::mutex> g(mu_);
            job_ = &job;
            gen_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        work(job, 0);
        {
            std::lock_guard<std::mutex> g(mu_);  // after this no worker can enter the job
            job_ = nullptr;
        }
        for (int spins = 0; job.active.load(std::memory_order_acquire) != 0; ++spins) {
            if (spins > 64) std::this_thread::yield();
        }
    }

    static RowPool& get() {
        // Re-created after fork (the child has no worker threads); the old one is leaked on purpose.
        static std::atomic<RowPool*> pool{nullptr};
        RowPool* p = pool.load(std::memory_order_acquire);
        while (p == nullptr || p->pid_ != getpid()) {
            RowPool* fresh = new RowPool();
            if (pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
            delete fresh;  // another thread installed one first (no workers started yet: safe)
        }
        return *p;
    }

  private:
    struct Job {
        void (*fn)(void*, int64_t, int) = nullptr;
        void* ctx = nullptr;
        int64_t n = 0;
        int max_workers = 0;
        std::atomic<int64_t> next{0};
        std::atomic<int> active{0};
        int entered = 0;  // guarded by mu_
    };

    // slot: 0 for the caller, 1.. for workers in the order they joined (< nthreads).
    static void work(Job& j, int slot) {
        for (int64_t c = j.next.fetch_add(1); c < j.n; c = j.next.fetch_add(1)) j.fn(j.ctx, c, slot);
    }

    void ensure_workers(int n) {
        while (nworkers_ < n) {
            std::thread([this] { worker(); }).detach();
            ++nworkers_;
        }
    }

    void worker() {
        uint64_t seen = gen_.load(std::memory_order_acquire);
        for (;;) {
            // Spin briefly (back-to-back layers), then sleep.
            for (int i = 0; i < 2000 && gen_.load(std::memory_order_acquire) == seen; ++i) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            }
            Job* j = nullptr;
            int slot = 0;
            {
                std::unique_lock<std::mutex> g(mu_);
                cv_.wait(g, [&] { return gen_.load(std::memory_order_acquire) != seen; });
                seen = gen_.load(std::memory_order_acquire);
                if (job_ != nullptr && job_->entered < job_->max_workers) {
                    j = job_;
                    slot = ++j->entered;
                    j->active.fetch_add(1, std::memory_order_acq_rel);
                }
            }
            if (j != nullptr) {
                work(*j, slot);
                j->active.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }

    std::mutex run_mu_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<uint64_t> gen_{0};
    Job* job_ = nullptr;
    int nworkers_ = 0;
    const pid_t pid_ = getpid();
};

// Row blocks of `grain` rows on the RowPool (see above); body(n0, n1), or body(n0, n1, slot) with
// the running thread's slot in [0, pool_threads(N, grain, nthreads)).
inline int pool_threads(int64_t N, int64_t grain, int nthreads) {
    const int64_t nblk = (N + grain - 1) / grain;
    return (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, nblk));
}

template <typename F>
void pool_rows_slot(int64_t N, int64_t grain, int nthreads, F&& body) {
    const int64_t nblk = (N + grain - 1) / grain;
    auto chunk = [&](int64_t b, int slot) { body(b * grain, std::min(N, (b + 1) * grain), slot); };
    RowPool::get().run(nblk, pool_threads(N, grain, nthreads), chunk);
}

template <typename F>
void pool_rows(int64_t N, int64_t grain, int nthreads, F&& body) {
    pool_rows_slot(N, grain, nthreads, [&](int64_t n0, int64_t n1, int) { body(n0, n1); });
}

}  // namespace

// The pool for the other kernel files (declared in qlinear_common.h).
void qb::pool_rows_fn(int64_t N, int64_t grain, int nthreads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
    ::pool_rows(N, grain, nthreads, [&](int64_t a, int64_t b) { fn(ctx, a, b); });
}

namespace {

// Exact dequantization of rows [n0, n1) into buf (defined with the panel paths below).
void dequant4_rows(const QW4& q, int64_t n0, int64_t n1, float* buf, int force_portable);
void dequant8_rows(const int8_t* codes, const float* scale, int64_t K, int64_t n0, int64_t n1, float* buf);

}  // namespace

extern "C" {

// y[M, N] = x[M, K] @ W^T (+ bias), x and y fp32 contiguous, by the fused kernels. Returns 0, or 1
// (nothing computed) if this build or shape has none: the caller then uses dequantized panels.
int qb4_linear(const QW4* qp, const float* x, int64_t M, const float* bias, float* y, int nthreads, int force_portable) {
    const QW4& q = *qp;
#if QB_AVX512
    const size_t cl = const_buf_len(q);
    if (!force_portable && fused4_ok(q)) {
        const int64_t K = q.K, G32 = K / 32;
        const bool affine = q.layout == LAYOUT_INT4 && q.zp != nullptr;
        // x split into even/odd halves per 32 (matches the decoded lane order), once per call.
        float* xq = (float*)std::aligned_alloc(64, sizeof(float) * (size_t)std::max<int64_t>(16, M * K));
        const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for (int64_t i = 0; i < M * G32; ++i) {
            const __m512 a = _mm512_loadu_ps(x + 32 * i), b = _mm512_loadu_ps(x + 32 * i + 16);
            _mm512_store_ps(xq + 32 * i, _mm512_permutex2var_ps(a, ev, b));
            _mm512_store_ps(xq + 32 * i + 16, _mm512_permutex2var_ps(a, od, b));
        }
        // Affine int4 at M == 1: sums of x per group, for the - zp * s * sum(x) term.
        std::vector<float> xg;
        if (affine && M == 1) {
            xg.assign((size_t)q.G, 0.0f);
            for (int64_t k = 0; k < K; ++k) xg[(size_t)(q.G == 1 ? 0 : k / q.bs)] += x[k];
        }
        pool_rows(q.N, 16, nthreads, [&](int64_t n0, int64_t n1) {
            float* s = scratch(0, 4 * cl);
            float* z = scratch(1, 4 * cl);
            if (affine) gemm4_rows<true>(q, xq, xg.data(), M, bias, y, n0, n1, s, z, cl);
            else gemm4_rows<false>(q, xq, nullptr, M, bias, y, n0, n1, s, z, cl);
        });
        std::free(xq);
        return 0;
    }
#endif
    (void)q, (void)x, (void)M, (void)bias, (void)y, (void)nthreads, (void)force_portable;
    return 1;  // not covered by the fused kernels: the caller uses dequantized panels
}

void qb_set_nr(int nr) { g_nr = nr; }

// Run the kernels' threads on torch's OpenMP team: the addresses of GOMP_parallel,
// omp_get_thread_num and omp_in_parallel in the runtime torch loaded (all null: own RowPool).
// Returns 1 if in use.
int qb_set_omp(void* parallel, void* thread_num, void* in_parallel) {
    OmpEntry e;
    if (parallel != nullptr && thread_num != nullptr && in_parallel != nullptr) {
        e.parallel = reinterpret_cast<void (*)(void (*)(void*), void*, unsigned, unsigned)>(parallel);
        e.thread_num = reinterpret_cast<int (*)()>(thread_num);
        e.in_parallel = reinterpret_cast<int (*)()>(in_parallel);
        e.pid = getpid();
    }
    g_omp = e;
    g_omp_skip = 0;
    g_omp_backoff = 0;
    return g_omp.parallel != nullptr;
}

// The first RowPool period after a slow region, in calls (see omp_run; a tuning knob for A/B runs).
void qb_set_omp_skip_min(int64_t calls) { g_omp_skip_min = std::max<int64_t>(1, calls); }

// Regions run on the OpenMP team so far, and those whose end waited for a thread the OS had not
// scheduled (see omp_run).
void qb_omp_stats(int64_t* out) {
    out[0] = g_omp_regions.load();
    out[1] = g_omp_slow.load();
}

// The RowPool for the other kernel files of this library (w8a8.cpp, bf16_compute.cpp, ...): runs
// fn(ctx, chunk, slot) for chunk in [0, nchunks) on up to nthreads threads, slot in [0, nthreads).
void qb_pool_run(int64_t nchunks, int nthreads, void (*fn)(void*, int64_t, int), void* ctx) {
    auto body = [&](int64_t c, int slot) { fn(ctx, c, slot); };
    RowPool::get().run(nchunks, (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, nchunks)), body);
}

int qb4_fast_ok(const QW4* q) { return QB_AVX512 && fused4_ok(*q); }

// out[(n - n0) * K + k] = W[n, k] in fp32 for n in [n0, n1); exact (matches the reference bit for bit).
void qb4_dequant(const QW4* qp, int64_t n0, int64_t n1, float* out, int nthreads, int force_portable) {
    const QW4& q = *qp;
    pool_rows(n1 - n0, 8, nthreads, [&](int64_t a, int64_t b) { dequant4_rows(q, n0 + a, n0 + b, out + a * q.K, force_portable); });
}

int qb8_linear(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
               const float* bias, float* y, int nthreads, int force_portable) {
#if QB_AVX512
    if (!force_portable) {
        pool_rows(N, 16, nthreads, [&](int64_t n0, int64_t n1) { gemm8_rows(codes, scale, N, K, x, M, bias, y, n0, n1); });
        return 0;
    }
#endif
    (void)codes, (void)scale, (void)N, (void)K, (void)x, (void)M, (void)bias, (void)y, (void)nthreads;
    (void)force_portable;
    return 1;  // no fused kernel in this build: the caller uses dequantized panels
}

// Fortran BLAS sgemm (column-major, LP64 ints), the one torch's libtorch_cpu exports (MKL), and
// MKL's mkl_set_num_threads_local. Passed in by qb_set_blas, so this library never links against
// libtorch. Each sgemm runs with 1 local thread from our pool threads: MKL then never starts an
// OpenMP team of its own (no oversubscription, and nothing that hangs in a forked child).
typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
typedef int (*set_threads_fn)(int);

}  // extern "C"

namespace {

sgemm_fn g_sgemm = nullptr;
set_threads_fn g_blas_local_threads = nullptr;

void sgemm1(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
            int ldb, float beta, float* c, int ldc) {
    const int prev = g_blas_local_threads(1);
    g_sgemm(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
    g_blas_local_threads(prev);
}

// y[M, N] (row-major) = x[M, K] @ W^T (+ bias) for large M: each thread dequantizes panels of P rows
// of W into its own cache-sized buffer and multiplies it with a single-threaded sgemm.
template <typename Dequant>
void panel_gemm(int64_t N, int64_t K, int64_t M, const float* x, const float* bias, float* y, int nthreads, int64_t P,
                Dequant&& dequant) {
    pool_rows(N, P, nthreads, [&](int64_t n0, int64_t n1) {
        float* buf = scratch(2, (size_t)(P * K));
        dequant(n0, n1, buf);
        float beta = 0.0f;
        if (bias) {
            for (int64_t i = 0; i < M; ++i)
                for (int64_t j = n0; j < n1; ++j) y[i * N + j] = bias[j];
            beta = 1.0f;
        }
        // Column-major C is y^T at column offset n0: C(j, i) = y[i, n0 + j].
        sgemm1("T", "N", (int)(n1 - n0), (int)M, (int)K, 1.0f, buf, (int)K, x, (int)K, beta, y + n0, (int)N);
    });
}

// grad_x[M, K] = g[M, N] @ W: panels of P rows of W are dequantized per thread and accumulated with
// sgemm into that thread's own partial sum out[slot] (zeroed by the caller, who adds the partials).
template <typename Dequant>
void panel_grad(int64_t N, int64_t K, int64_t M, const float* g, float* out, int nthreads, int64_t P,
                Dequant&& dequant) {
    pool_rows_slot(N, P, nthreads, [&](int64_t n0, int64_t n1, int slot) {
        float* buf = scratch(2, (size_t)(P * K));
        dequant(n0, n1, buf);
        sgemm1("N", "N", (int)K, (int)M, (int)(n1 - n0), 1.0f, buf, (int)K, g + n0, (int)N, 1.0f,
               out + (int64_t)slot * M * K, (int)K);
    });
}

void dequant4_rows(const QW4& q, int64_t n0, int64_t n1, float* buf, int force_portable) {
    const size_t cl = const_buf_len(q);
    float* s = scratch(0, cl);
    float* z = scratch(1, cl);
#if QB_AVX512
    if (!force_portable && fast4_ok(q)) {
        dequant4_rows_avx512(q, n0, n1, buf, s, z);
        return;
    }
#endif
    if (!force_portable && qb::avx2_dequant4_rows(q, n0, n1, buf)) return;  // false outside the avx2 build
    dequant4_rows_scalar(q, n0, n1, buf, s, z);
}

void dequant8_rows(const int8_t* codes, const float* scale, int64_t K, int64_t n0, int64_t n1, float* buf) {
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t* cr = codes + n * K;
        float* o = buf + (n - n0) * K;
        const float sc = scale[n];
        for (int64_t k = 0; k < K; ++k) o[k] = (float)cr[k] * sc;
    }
}

}  // namespace

extern "C" {

// Install the BLAS (returns 1) after checking the argument convention on a 2x3 @ 3x2 product;
// returns 0 and installs nothing if the result is wrong.
int qb_set_blas(void* sgemm, void* set_local_threads) {
    if (sgemm == nullptr || set_local_threads == nullptr) return 0;
    const float a[6] = {1, 2, 3, 4, 5, 6};  // W [2, 3] row-major
    const float b[6] = {1, 0, 2, 0, 1, 3};  // x [2, 3] row-major
    float c[4] = {0, 0, 0, 0};
    const int m = 2, n = 2, k = 3, ld = 3, ldc = 2;
    const float alpha = 1.0f, beta = 0.0f;
    ((sgemm_fn)sgemm)("T", "N", &m, &n, &k, &alpha, a, &ld, b, &ld, &beta, c, &ldc);
    // y[i, j] = sum_k x[i, k] W[j, k] = [[7, 16], [11, 23]], column-major C(j, i) at c[i * 2 + j].
    if (!(c[0] == 7.0f && c[1] == 16.0f && c[2] == 11.0f && c[3] == 23.0f)) return 0;
    g_sgemm = (sgemm_fn)sgemm;
    g_blas_local_threads = (set_threads_fn)set_local_threads;
    return 1;
}

int qb4_linear_panel(const QW4* qp, const float* x, int64_t M, const float* bias, float* y, int nthreads, int64_t P,
                     int force_portable) {
    if (g_sgemm == nullptr) return 1;
    const QW4& q = *qp;
    panel_gemm(q.N, q.K, M, x, bias, y, nthreads, P,
               [&](int64_t n0, int64_t n1, float* buf) { dequant4_rows(q, n0, n1, buf, force_portable); });
    return 0;
}

int qb8_linear_panel(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                     const float* bias, float* y, int nthreads, int64_t P) {
    if (g_sgemm == nullptr) return 1;
    panel_gemm(N, K, M, x, bias, y, nthreads, P,
               [&](int64_t n0, int64_t n1, float* buf) { dequant8_rows(codes, scale, K, n0, n1, buf); });
    return 0;
}

int qb4_grad_panel(const QW4* qp, const float* g, int64_t M, float* out, int nthreads, int64_t P,
                   int force_portable) {
    if (g_sgemm == nullptr) return 1;
    const QW4& q = *qp;
    panel_grad(q.N, q.K, M, g, out, nthreads, P,
               [&](int64_t n0, int64_t n1, float* buf) { dequant4_rows(q, n0, n1, buf, force_portable); });
    return 0;
}

int qb8_grad_panel(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* g, int64_t M,
                   float* out, int nthreads, int64_t P) {
    if (g_sgemm == nullptr) return 1;
    panel_grad(N, K, M, g, out, nthreads, P,
               [&](int64_t n0, int64_t n1, float* buf) { dequant8_rows(codes, scale, K, n0, n1, buf); });
    return 0;
}

// Threads a panel call may use = partial sums the caller of *_grad_panel must provide.
int qb_panel_threads(int64_t N, int64_t P, int nthreads) { return pool_threads(N, P, nthreads); }

void qb8_dequant(const int8_t* codes, const float* scale, int64_t K, int64_t n0, int64_t n1, float* out, int nthreads) {
    pool_rows(n1 - n0, 8, nthreads, [&](int64_t a, int64_t b) { dequant8_rows(codes, scale, K, n0 + a, n0 + b, out + a * K); });
}

}  // extern "C"
