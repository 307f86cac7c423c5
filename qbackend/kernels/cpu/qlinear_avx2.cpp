// Fused fp32 kernels for CPUs with AVX2 + FMA but no AVX-512 (the "avx2" build variant): the
// same jobs as qlinear.cpp's AVX-512 kernels, in 256-bit registers.
//
// * 4-bit GEMV (M = 1) and small-M GEMM (NF4/FP4 with plain or nested block constants, int4 with
//   symmetric or affine groups): K % 32 == 0, power-of-two blocks/groups >= 32 (or one group per
//   row). Codes are decoded in registers and never materialised.
// * int8 per-channel GEMV / small-M GEMM, any K.
//
// Decoding: AVX2 has no 16-entry float permute. A codebook value is assembled from the table's 4
// byte planes: the 32 nibbles of 16 code bytes index each plane with one vpshufb (16 entries per
// 128-bit lane) and two rounds of unpacks rebuild the floats (QBA2_PSHUFB=0: vpermps on each table
// half + vblendvps on bit 3, ~10% slower at M = 1 on Zen 4). int4 codes are converted directly
// (code - 8, or code for affine groups: exact integers). The decoded lanes hold the nibbles in a
// fixed permuted order, so x is permuted to match once per call (xq). A group of 32 never
// straddles a block, so each needs one constant.
//
// Numerics are those of the AVX-512 kernels: per group sum(table[c] * x) * constant, affine int4
// as sum(c * x) * s - zp * s * sum(x) (GEMV) or (c * s - zp * s) * x (GEMM); nested constants
// decoded exactly as the reference (table * absmax2, then + offset). Only the fp32 summation order
// differs from the reference.
//
// In any other build the entry points exist but return 1 ("not covered"): the AVX-512 build keeps
// its own kernels, the generic build the scalar dequantization + BLAS path.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qlinear_common.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#define QBA2 1
#else
#define QBA2 0
#endif

extern "C" {
int qba2_available();
int qba2_fast4_ok(const QW4* q);
int qba2_linear4(const QW4* q, const float* x, int64_t M, const float* bias, float* y, int nthreads);
int qba2_linear8(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                 const float* bias, float* y, int nthreads);
}

namespace {

inline int ilog2(int64_t v) {
    int l = 0;
    while ((int64_t(1) << l) < v) ++l;
    return l;
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// The shapes the fused 4-bit kernels cover (the same as the AVX-512 ones).
bool fused4_ok(const QW4& q) {
    if (q.K % 32 != 0 || q.N <= 0) return false;
    if (q.layout == LAYOUT_CODEBOOK) {
        if (!q.absmax && !is_pow2(q.nbs)) return false;  // inline de-nesting shifts by log2(nbs)
        return is_pow2(q.bs) && q.bs >= 32;
    }
    return q.G == 1 || (is_pow2(q.bs) && q.bs >= 32);
}

#if QBA2

inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}

// How codes become values: a 16-entry table (nf4, fp4), code - 8 (symmetric int4), code (affine int4).
enum Dec { DEC_TABLE = 0, DEC_SYM = 1, DEC_AFF = 2 };

#ifndef QBA2_PSHUFB
#define QBA2_PSHUFB 1  // codebook decode by byte-plane vpshufb (1) or vpermps + vblendvps (0)
#endif

struct Lut {
    __m256 lo, hi;      // table[0..7], table[8..15]
    __m256i plane[4];   // byte b of the 16 table values, in both 128-bit lanes
};

inline Lut make_lut(const QW4& q) {
    Lut l;
    if (q.layout == LAYOUT_CODEBOOK) {
        l.lo = _mm256_loadu_ps(q.table);
        l.hi = _mm256_loadu_ps(q.table + 8);
        alignas(32) uint8_t b[4][32];
        for (int c = 0; c < 16; ++c) {
            uint32_t u;
            std::memcpy(&u, q.table + c, 4);
            for (int p = 0; p < 4; ++p) b[p][c] = b[p][c + 16] = (uint8_t)(u >> (8 * p));
        }
        for (int p = 0; p < 4; ++p) l.plane[p] = _mm256_load_si256((const __m256i*)b[p]);
    } else {
        l.lo = l.hi = _mm256_setzero_ps();
        for (int p = 0; p < 4; ++p) l.plane[p] = _mm256_setzero_si256();
    }
    return l;
}

// 8 code bytes at p -> wh (high nibbles: even k) and wl (low nibbles: odd k), as fp32.
template <int DEC>
inline void decode16(const uint8_t* p, const Lut& L, __m256& wh, __m256& wl) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    const __m256i h = _mm256_srli_epi32(v, 4);
    if (DEC == DEC_TABLE) {
        // vpermps reads the low 3 bits of each index; bit 3 of the nibble picks the table half.
        wh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(L.lo, h), _mm256_permutevar8x32_ps(L.hi, h),
                              _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
        wl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(L.lo, v), _mm256_permutevar8x32_ps(L.hi, v),
                              _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
    } else {
        wh = _mm256_cvtepi32_ps(h);
        wl = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
        if (DEC == DEC_SYM) {
            const __m256 eight = _mm256_set1_ps(8.0f);
            wh = _mm256_sub_ps(wh, eight);
            wl = _mm256_sub_ps(wl, eight);
        }
    }
}

// Whether x is laid out per 8 as [x0 x2 x4 x6 x1 x3 x5 x7] (byte-plane decode) rather than per 16
// as 8 even then 8 odd elements.
template <int DEC>
constexpr bool by_planes() {
    return DEC == DEC_TABLE && QBA2_PSHUFB;
}

// 16 code bytes at p (32 weights) -> w[0..3], to be multiplied with xq[0..7], [8..15], ... of the
// group. Byte planes: the 32 nibbles index the table's 4 byte planes (vpshufb: 16 entries per
// lane, 2 per cycle), and two rounds of unpacks reassemble the floats: lane 0 of w[i] holds
// elements 8i + 0, 2, 4, 6 (high nibbles), lane 1 elements 8i + 1, 3, 5, 7 (low nibbles).
template <int DEC>
inline void decode32(const uint8_t* p, const Lut& L, __m256 w[4]) {
    if (by_planes<DEC>()) {
        const __m128i c = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(0x0F);
        const __m256i idx = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(_mm_srli_epi16(c, 4), m)),
                                                    _mm_and_si128(c, m), 1);
        const __m256i b0 = _mm256_shuffle_epi8(L.plane[0], idx), b1 = _mm256_shuffle_epi8(L.plane[1], idx);
        const __m256i b2 = _mm256_shuffle_epi8(L.plane[2], idx), b3 = _mm256_shuffle_epi8(L.plane[3], idx);
        const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
        const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
        w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
        w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
        w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
        w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
    } else {
        decode16<DEC>(p, L, w[0], w[1]);
        decode16<DEC>(p + 8, L, w[2], w[3]);
    }
}

// sum over one group of 32 weights (16 code bytes at c) of value * x, x in xq order.
template <int DEC>
inline __m256 group_dot(const uint8_t* c, const float* xq, const Lut& L) {
    __m256 w[4];
    decode32<DEC>(c, L, w);
    __m256 a = _mm256_mul_ps(w[0], _mm256_load_ps(xq));
    __m256 b = _mm256_mul_ps(w[2], _mm256_load_ps(xq + 16));
    a = _mm256_fmadd_ps(w[1], _mm256_load_ps(xq + 8), a);
    b = _mm256_fmadd_ps(w[3], _mm256_load_ps(xq + 24), b);
    return _mm256_add_ps(a, b);
}

inline int shift_of(const QW4& q) {
    // One int4 group per row maps every group of 32 to constant 0.
    if (q.layout == LAYOUT_INT4 && q.G == 1) return 30;
    return ilog2(q.bs);
}

// One row of W against one row of x, 4 groups of 32 per step; GPB: groups sharing a constant
// within a step (4, 2 or 1). sc(j): the row's j-th block constant (nested ones decoded here).
template <int DEC, int GPB, typename Scale>
inline float gemv4_row(const uint8_t* cr, const float* xq, int64_t G32, int64_t off, int lb, Scale&& sc,
                       const Lut& L) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= G32; g += 4) {
        __m256 a[4];
        for (int u = 0; u < 4; ++u) a[u] = group_dot<DEC>(cr + 16 * (g + u), xq + 32 * (g + u), L);
        const int64_t j = (off + 32 * g) >> lb;
        if (GPB == 4) {
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                                   _mm256_set1_ps(sc(j)), acc0);
        } else if (GPB == 2) {
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(a[0], a[1]), _mm256_set1_ps(sc(j)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_add_ps(a[2], a[3]), _mm256_set1_ps(sc(j + 1)), acc1);
        } else {
            for (int u = 0; u < 4; ++u) {
                const __m256 sv = _mm256_set1_ps(sc((off + 32 * (g + u)) >> lb));
                if (u & 1) acc1 = _mm256_fmadd_ps(a[u], sv, acc1);
                else acc0 = _mm256_fmadd_ps(a[u], sv, acc0);
            }
        }
    }
    for (; g < G32; ++g) {
        const __m256 a = group_dot<DEC>(cr + 16 * g, xq + 32 * g, L);
        acc0 = _mm256_fmadd_ps(a, _mm256_set1_ps(sc((off + 32 * g) >> lb)), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

template <int DEC, typename Scale>
inline float gemv4_row_any(const uint8_t* cr, const float* xq, int64_t G32, int64_t off, int lb, Scale&& sc,
                           const Lut& L) {
    if (lb >= 7 && off % 128 == 0) return gemv4_row<DEC, 4>(cr, xq, G32, off, lb, sc, L);
    if (lb == 6 && off % 64 == 0) return gemv4_row<DEC, 2>(cr, xq, G32, off, lb, sc, L);
    return gemv4_row<DEC, 1>(cr, xq, G32, off, lb, sc, L);
}

// Rows [n0, n1) of W against one row of x. Affine int4: - zp * s * sum(x over the group) is added
// from the per-group sums of x (xg).
template <int DEC>
void gemv4(const QW4& q, const float* xq, const float* xg, const float* bias, float* y, int64_t n0, int64_t n1) {
    const int64_t K = q.K, G32 = K / 32;
    const Lut L = make_lut(q);
    const int lb = shift_of(q);
    const int lnb = q.nbs > 0 ? ilog2(q.nbs) : 0;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* cr = q.codes + n * K / 2;
        float t;
        if (q.layout == LAYOUT_CODEBOOK) {
            const int64_t e0 = n * K, first = e0 >> lb, off = e0 - (first << lb);
            if (q.absmax) {
                const float* a = q.absmax + first;
                t = gemv4_row_any<DEC>(cr, xq, G32, off, lb, [a](int64_t j) { return a[j]; }, L);
            } else {
                const uint8_t* nc = q.ncodes + first;
                const float *nt = q.ntable, *na = q.nabsmax, o = *q.noffset;
                // The reference's operations: table * absmax2, then + offset (no FMA contraction).
                t = gemv4_row_any<DEC>(cr, xq, G32, off, lb,
                                       [=](int64_t j) { return nt[nc[j]] * na[(first + j) >> lnb] + o; }, L);
            }
        } else {
            const float* sr = q.scale + n * q.G;
            t = gemv4_row_any<DEC>(cr, xq, G32, 0, lb, [sr](int64_t j) { return sr[j]; }, L);
            if (DEC == DEC_AFF) {
                const uint8_t* zr = q.zp + n * q.G;
                float c = 0.0f;
                for (int64_t j = 0; j < q.G; ++j) c += ((float)zr[j] * sr[j]) * xg[j];
                t -= c;
            }
        }
        if (bias) t += bias[n];
        y[n] = t;
    }
}

// Small M: one row of W x MT rows of x per register tile (MT accumulators + the decoded weights
// fit the 16 ymm registers); decoding costs more than the FMAs, so it is shared by MT rows, and
// the weights are scaled once (w = q * s, or q * s - zp * s for affine int4). The sums over
// groups [g0, g1) are added into y. (Walking K in L1-sized chunks, so that the rows of x stay in
// L1, measured slower on a loaded Zen 4 at M = 8..64: one chunk is the whole row.)
constexpr int MT4 = 8;  // rows of x per 4-bit tile

template <int MT, int DEC>
void gemm4_block(const QW4& q, const float* xq, int64_t m0, float* y, int64_t n0, int64_t n1, int64_t g0,
                 int64_t g1) {
    const int64_t K = q.K, N = q.N;
    const Lut L = make_lut(q);
    const int lb = shift_of(q);
    const int lnb = q.nbs > 0 ? ilog2(q.nbs) : 0;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* cr = q.codes + n * K / 2;
        // Block/group j of this row (j from the row's first one): the constant, and -zp * s (affine).
        int64_t first = 0, off = 0;
        if (q.layout == LAYOUT_CODEBOOK) {
            first = (n * K) >> lb;
            off = n * K - (first << lb);
        }
        __m256 acc[MT];
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
        for (int64_t g = g0; g < g1; ++g) {
            const int64_t j = (off + 32 * g) >> lb;
            float sc, zs = 0.0f;
            if (q.layout == LAYOUT_CODEBOOK) {
                const int64_t b = first + j;
                if (q.absmax) {
                    sc = q.absmax[b];
                } else {  // the reference's operations: table * absmax2, then + offset
                    const float t = q.ntable[q.ncodes[b]] * q.nabsmax[b >> lnb];
                    sc = t + *q.noffset;
                }
            } else {
                sc = q.scale[n * q.G + j];
                if (DEC == DEC_AFF) zs = -(float)q.zp[n * q.G + j] * sc;
            }
            const __m256 sv = _mm256_set1_ps(sc);
            __m256 w[4];
            decode32<DEC>(cr + 16 * g, L, w);
            for (int i = 0; i < 4; ++i) w[i] = DEC == DEC_AFF ? _mm256_fmadd_ps(w[i], sv, _mm256_set1_ps(zs))
                                                              : _mm256_mul_ps(w[i], sv);
            for (int m = 0; m < MT; ++m) {
                const float* xm = xq + (m0 + m) * K + 32 * g;
                for (int i = 0; i < 4; ++i) acc[m] = _mm256_fmadd_ps(w[i], _mm256_load_ps(xm + 8 * i), acc[m]);
            }
        }
        for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n] += hsum(acc[m]);
    }
}

// y rows [m0, m0 + mt), columns [n0, n1): bias (or 0), to which the tiles add their sums.
inline void init_y(float* y, int64_t N, int64_t m0, int64_t mt, const float* bias, int64_t n0, int64_t n1) {
    for (int64_t m = m0; m < m0 + mt; ++m)
        for (int64_t n = n0; n < n1; ++n) y[m * N + n] = bias ? bias[n] : 0.0f;
}

template <int DEC>
void gemm4_rows(const QW4& q, const float* xq, const float* xg, int64_t M, const float* bias, float* y, int64_t n0,
                int64_t n1) {
    if (M == 1) {
        gemv4<DEC>(q, xq, xg, bias, y, n0, n1);
        return;
    }
    const int64_t G32 = q.K / 32;
    for (int64_t m = 0; m < M; m += MT4) {
        const int64_t mt = std::min<int64_t>(MT4, M - m);
        init_y(y, q.N, m, mt, bias, n0, n1);
        switch (mt) {
#define QBA2_CASE(MT) case MT: gemm4_block<MT, DEC>(q, xq, m, y, n0, n1, 0, G32); break;
            QBA2_CASE(1) QBA2_CASE(2) QBA2_CASE(3) QBA2_CASE(4) QBA2_CASE(5) QBA2_CASE(6) QBA2_CASE(7) QBA2_CASE(8)
#undef QBA2_CASE
            default: break;
        }
    }
}

// ---- int8 per channel: vpmovsxbd + cvt + FMA; the scale once per output --------------------------

#ifndef QBA2_PF8
#define QBA2_PF8 2048
#endif

// sum over k in [K8, K) of codes[k] * x[k] (the K % 8 tail), scalar.
inline float tail8(const int8_t* cr, const float* xr, int64_t K8, int64_t K) {
    float t = 0.0f;
    for (int64_t k = K8; k < K; ++k) t += (float)cr[k] * xr[k];
    return t;
}

inline __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

void gemv8(const int8_t* codes, const float* scale, int64_t K, const float* x, const float* bias, float* y,
           int64_t n0, int64_t n1) {
    const int64_t K32 = K / 32 * 32, K8 = K / 8 * 8;
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t* cr = codes + n * K;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t k = 0;
        for (; k < K32; k += 32) {
            // Memory-bound: prefetch 2 KiB ahead (as the AVX-512 kernel).
            _mm_prefetch((const char*)(cr + k + QBA2_PF8), _MM_HINT_T0);
            for (int u = 0; u < 4; ++u)
                acc[u] = _mm256_fmadd_ps(load8(cr + k + 8 * u), _mm256_loadu_ps(x + k + 8 * u), acc[u]);
        }
        for (; k < K8; k += 8) acc[0] = _mm256_fmadd_ps(load8(cr + k), _mm256_loadu_ps(x + k), acc[0]);
        float t = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        t = (t + tail8(cr, x, K8, K)) * scale[n];
        if (bias) t += bias[n];
        y[n] = t;
    }
}

// NR rows of W x MT rows of x per register tile over k in [k0, k1); each x load feeds NR FMAs. The
// sum times the channel scale is added into y.
template <int NR, int MT>
void gemm8_block(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t m0,
                 float* y, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
    const int64_t k8 = k0 + (k1 - k0) / 8 * 8;
    for (int64_t n = n0; n < n1; n += NR) {
        __m256 acc[NR][MT];
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
        for (int64_t k = k0; k < k8; k += 8) {
            __m256 w[NR];
            for (int r = 0; r < NR; ++r) w[r] = load8(codes + (n + r) * K + k);
            for (int m = 0; m < MT; ++m) {
                const __m256 xv = _mm256_loadu_ps(x + (m0 + m) * K + k);
                for (int r = 0; r < NR; ++r) acc[r][m] = _mm256_fmadd_ps(w[r], xv, acc[r][m]);
            }
        }
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MT; ++m) {
                const int8_t* cr = codes + (n + r) * K;
                y[(m0 + m) * N + n + r] += (hsum(acc[r][m]) + tail8(cr, x + (m0 + m) * K, k8, k1)) * scale[n + r];
            }
    }
}

constexpr int NR8 = 2, MT8 = 6;  // 12 accumulators + 2 weight vectors + x: the 16 ymm registers

template <int NR>
void gemm8_blocks(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t m,
                  int64_t mt, float* y, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
    switch (mt) {
#define QBA2_CASE(MT) case MT: gemm8_block<NR, MT>(codes, scale, N, K, x, m, y, n0, n1, k0, k1); break;
        QBA2_CASE(1) QBA2_CASE(2) QBA2_CASE(3) QBA2_CASE(4) QBA2_CASE(5) QBA2_CASE(6)
#undef QBA2_CASE
        default: break;
    }
}

void gemm8_rows(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                const float* bias, float* y, int64_t n0, int64_t n1) {
    if (M == 1) {
        gemv8(codes, scale, K, x, bias, y, n0, n1);
        return;
    }
    const int64_t nfull = n0 + (n1 - n0) / NR8 * NR8;
    for (int64_t m = 0; m < M; m += MT8) {
        const int64_t mt = std::min<int64_t>(MT8, M - m);
        init_y(y, N, m, mt, bias, n0, n1);
        gemm8_blocks<NR8>(codes, scale, N, K, x, m, mt, y, n0, nfull, 0, K);
        if (nfull < n1) gemm8_blocks<1>(codes, scale, N, K, x, m, mt, y, nfull, n1, 0, K);
    }
}

// x [M, K] -> xq in the decoded lane order: each 16 elements as 8 even then 8 odd ones, or
// (by_planes) each 8 as [x0 x2 x4 x6 x1 x3 x5 x7].
void split_even_odd(const float* x, int64_t n16, float* xq, bool planes) {
    if (planes) {
        const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        for (int64_t i = 0; i < 2 * n16; ++i)
            _mm256_store_ps(xq + 8 * i, _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8 * i), perm));
        return;
    }
    for (int64_t i = 0; i < n16; ++i) {
        const __m256 a = _mm256_loadu_ps(x + 16 * i), b = _mm256_loadu_ps(x + 16 * i + 8);
        // shuffle_ps works per 128-bit lane: [a0 a2 b0 b2 | a4 a6 b4 b6] -> qwords (0, 2, 1, 3).
        const __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
        const __m256 od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
        _mm256_store_ps(xq + 16 * i, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
        _mm256_store_ps(xq + 16 * i + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
    }
}

template <int DEC>
void linear4(const QW4& q, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
    const int64_t K = q.K;
    const size_t nx = (size_t)(M * K);
    float* xq = (float*)std::aligned_alloc(32, sizeof(float) * std::max<size_t>(16, (nx + 15) / 16 * 16));
    split_even_odd(x, (int64_t)(nx / 16), xq, by_planes<DEC>());
    std::vector<float> xg;  // affine int4 at M == 1: sums of x per group
    if (DEC == DEC_AFF && M == 1) {
        xg.assign((size_t)q.G, 0.0f);
        for (int64_t k = 0; k < K; ++k) xg[(size_t)(q.G == 1 ? 0 : k / q.bs)] += x[k];
    }
    auto body = [&](int64_t n0, int64_t n1) { gemm4_rows<DEC>(q, xq, xg.data(), M, bias, y, n0, n1); };
    qb::pool_rows(q.N, 16, nthreads, body);
    std::free(xq);
}

// Rows [n0, n1) of W in natural order, exactly as the reference: table[c] * constant, or
// (c - zero point) * scale (one rounding each).
template <int DEC>
void dequant4_rows(const QW4& q, int64_t n0, int64_t n1, float* out) {
    const int64_t K = q.K, G32 = K / 32;
    const Lut L = make_lut(q);
    const int lb = shift_of(q);
    const int lnb = q.nbs > 0 ? ilog2(q.nbs) : 0;
    const __m256i unplane = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // inverse of [0 2 4 6 1 3 5 7]
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* cr = q.codes + n * K / 2;
        float* o = out + (n - n0) * K;
        int64_t first = 0, off = 0;
        if (q.layout == LAYOUT_CODEBOOK) {
            first = (n * K) >> lb;
            off = n * K - (first << lb);
        }
        for (int64_t g = 0; g < G32; ++g) {
            const int64_t j = (off + 32 * g) >> lb;
            float sc, zp = 8.0f;
            if (q.layout == LAYOUT_CODEBOOK) {
                const int64_t b = first + j;
                if (q.absmax) {
                    sc = q.absmax[b];
                } else {
                    const float t = q.ntable[q.ncodes[b]] * q.nabsmax[b >> lnb];
                    sc = t + *q.noffset;
                }
            } else {
                sc = q.scale[n * q.G + j];
                if (DEC == DEC_AFF) zp = (float)q.zp[n * q.G + j];
            }
            const __m256 sv = _mm256_set1_ps(sc);
            __m256 w[4];
            decode32<DEC>(cr + 16 * g, L, w);
            if (DEC == DEC_AFF)
                for (int i = 0; i < 4; ++i) w[i] = _mm256_sub_ps(w[i], _mm256_set1_ps(zp));
            if (by_planes<DEC>()) {
                for (int i = 0; i < 4; ++i)
                    _mm256_storeu_ps(o + 32 * g + 8 * i, _mm256_mul_ps(_mm256_permutevar8x32_ps(w[i], unplane), sv));
            } else {
                for (int h = 0; h < 2; ++h) {  // 8 even + 8 odd elements -> 16 in order
                    const __m256 lo = _mm256_unpacklo_ps(w[2 * h], w[2 * h + 1]);
                    const __m256 hi = _mm256_unpackhi_ps(w[2 * h], w[2 * h + 1]);
                    _mm256_storeu_ps(o + 32 * g + 16 * h, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x20), sv));
                    _mm256_storeu_ps(o + 32 * g + 16 * h + 8, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x31), sv));
                }
            }
        }
    }
}

#endif  // QBA2

}  // namespace

bool qb::avx2_dequant4_rows(const QW4& q, int64_t n0, int64_t n1, float* out) {
#if QBA2
    if (!fused4_ok(q)) return false;
    if (q.layout == LAYOUT_CODEBOOK) dequant4_rows<DEC_TABLE>(q, n0, n1, out);
    else if (q.zp) dequant4_rows<DEC_AFF>(q, n0, n1, out);
    else dequant4_rows<DEC_SYM>(q, n0, n1, out);
    return true;
#else
    (void)q, (void)n0, (void)n1, (void)out;
    return false;
#endif
}

extern "C" {

int qba2_available() { return QBA2; }

int qba2_fast4_ok(const QW4* q) { return QBA2 && fused4_ok(*q); }

// y[M, N] = x[M, K] @ W^T (+ bias), fp32 contiguous. Returns 0, or 1 (nothing computed) when this
// build or shape has no fused kernel: the caller then uses another path.
int qba2_linear4(const QW4* qp, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
#if QBA2
    const QW4& q = *qp;
    if (M <= 0 || !fused4_ok(q)) return 1;
    if (q.layout == LAYOUT_CODEBOOK) linear4<DEC_TABLE>(q, x, M, bias, y, nthreads);
    else if (q.zp) linear4<DEC_AFF>(q, x, M, bias, y, nthreads);
    else linear4<DEC_SYM>(q, x, M, bias, y, nthreads);
    return 0;
#else
    (void)qp, (void)x, (void)M, (void)bias, (void)y, (void)nthreads;
    return 1;
#endif
}

int qba2_linear8(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                 const float* bias, float* y, int nthreads) {
#if QBA2
    if (M <= 0 || N <= 0 || K <= 0) return 1;
    auto body = [&](int64_t n0, int64_t n1) { gemm8_rows(codes, scale, N, K, x, M, bias, y, n0, n1); };
    qb::pool_rows(N, 16, nthreads, body);
    return 0;
#else
    (void)codes, (void)scale, (void)N, (void)K, (void)x, (void)M, (void)bias, (void)y, (void)nthreads;
    return 1;
#endif
}

}  // extern "C"
