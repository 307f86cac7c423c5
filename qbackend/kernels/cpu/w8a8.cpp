// W8A8 (SmoothQuant) linear on CPU: int8 activations x int8 per-channel weights -> exact int32 sums
// with AVX512-VNNI (vpdpbusd), then y = float(acc) * s_x[m] * scale[n] (+ bias[n]) in the
// reference's operation order (so the result matches qbackend.kernels.reference.w8a8_linear bit for bit).
//
// vpdpbusd multiplies unsigned by signed bytes. The weight is the unsigned operand: w ^ 0x80 == w + 128
// (the canonical kernel: one vpxorq per 64 weights on the [N, K] codes; the packed kernel below
// qbw8_pack: stored as w + 128 in a prepared panel copy), and the bias this adds, 128 * sum_k xq[m, k],
// is taken off per row of x (computed in the prologue). int32 wrap-around is harmless: the true sum fits in int32
// for K <= 131072 (127 * 127 * K < 2^31), and modular arithmetic gives it exactly.
//
// Prologue: each row of x is quantized here (per-token scale amax / 127, or a static scale), with a
// true division and round-half-to-even as the reference, into a zero-padded int8 copy (K rounded up to 64).
// Rows holding NaN (or, with per-token scales, Inf) give NaN rows, as the reference does.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define QBW8_AVX512 1
#else
#define QBW8_AVX512 0
#endif

extern "C" {
int qb_all_finite(const float* p, int64_t n);  // finite_check.cpp
void qb_pool_run(int64_t nchunks, int nthreads, void (*fn)(void*, int64_t, int), void* ctx);  // qlinear.cpp
}

namespace {

template <typename F>
void par_chunks(int64_t n, int nthreads, F&& f) {
    using G = typename std::remove_reference<F>::type;
    qb_pool_run(n, nthreads, [](void* c, int64_t i, int slot) { (*static_cast<G*>(c))(i, slot); }, &f);
}

constexpr int64_t kMaxK = 131072;  // 127 * 127 * K < 2^31: the exact sum fits int32

// Row m of x quantized: xq (Kp bytes, zero padded), its sum, its scale; returns false for a NaN row.
// Same arithmetic as the reference: s = amax / 127 (or the static scale), q = clamp(round(x / s)),
// a true division and rounding half to even.
bool quantize_row(const float* x, int64_t K, int64_t Kp, const float* act_scale, int8_t* xq, int32_t* xsum,
                  float* sx) {
    constexpr float fmax = std::numeric_limits<float>::max();
    float s;
    if (act_scale == nullptr) {
        float amax = 0.0f;
        bool finite = true;
        int64_t k = 0;
#if QBW8_AVX512
        __m512 va = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (; k < K; k += 16) {
            const __mmask16 mk = (K - k) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, x + k));
            bad |= _mm512_mask_cmp_ps_mask(mk, a, _mm512_set1_ps(fmax), _CMP_NLE_UQ);  // NaN or Inf
            va = _mm512_max_ps(va, a);
        }
        amax = _mm512_reduce_max_ps(va);
        finite = bad == 0;
#endif
        for (; k < K; ++k) {
            const float a = std::fabs(x[k]);
            if (!(a <= fmax)) finite = false;
            amax = a > amax ? a : amax;
        }
        if (!finite) {  // reference: s_x = NaN or Inf, and every product NaN
            *sx = std::numeric_limits<float>::quiet_NaN();
            return false;
        }
        s = amax / 127.0f;
    } else {
        s = *act_scale;
    }
    *sx = s;
    const float safe = s > 0.0f ? s : 1.0f;
    int32_t sum = 0;
    int64_t k = 0;
#if QBW8_AVX512
    {
        const __m512 vs = _mm512_set1_ps(safe), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        __m512i vsum = _mm512_setzero_si512();
        __mmask16 nan = 0;
        for (; k < K; k += 16) {
            const __mmask16 mk = (K - k) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + k), vs);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
            const __m512i q = _mm512_cvtps_epi32(r);
            vsum = _mm512_add_epi32(vsum, q);
            _mm512_mask_cvtepi32_storeu_epi8(xq + k, mk, q);
        }
        if (nan) return false;
        sum = _mm512_reduce_add_epi32(vsum);
    }
#endif
    for (; k < K; ++k) {
        const float v = x[k] / safe;
        if (v != v) return false;
        float r = std::nearbyint(v);  // default rounding mode: half to even, as torch.round
        r = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
        const int q = (int)r;
        xq[k] = (int8_t)q;
        sum += q;
    }
    std::memset(xq + K, 0, (size_t)(Kp - K));
    *xsum = sum;
    return true;
}

#if QBW8_AVX512

#define QBW8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// The lane sums of a, b, c, d as [sum a, sum b, sum c, sum d]: one transposing tree (13 operations)
// instead of four separate reductions (~9 each), which cost as much as the dot products at short K
// (MiniLM's K = 384: 6 steps of 64 per tile). Integer adds: the same sums exactly.
QBW8_TARGET inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    // per 128-bit lane: [a, b, c, d] partial sums
    const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// NR rows of W x MT rows of xq per register tile, the whole of K per tile; int32 sums out.
template <int NR, int MT>
QBW8_TARGET void tile(const int8_t* w, int64_t K, const int8_t* xq, int64_t Kp, int32_t* acc_out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[NR][MT];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_si512();
    const int64_t K64 = K / 64 * 64;
    for (int64_t k = 0; k < K64; k += 64) {
        __m512i wv[NR];
        for (int r = 0; r < NR; ++r) {
            const int8_t* p = w + r * K + k;
            if (MT <= 2) _mm_prefetch((const char*)(p + 2048), _MM_HINT_T0);
            wv[r] = _mm512_xor_si512(_mm512_loadu_si512(p), flip);
        }
        for (int m = 0; m < MT; ++m) {
            const __m512i xv = _mm512_load_si512(xq + m * Kp + k);
            for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], wv[r], xv);
        }
    }
    if (K64 < K) {
        const __mmask64 mk = ~0ULL >> (64 - (K - K64));
        __m512i wv[NR];
        for (int r = 0; r < NR; ++r) wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + r * K + K64), flip);
        for (int m = 0; m < MT; ++m) {
            const __m512i xv = _mm512_load_si512(xq + m * Kp + K64);  // zero padded: the flipped 0 lanes add 0
            for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], wv[r], xv);
        }
    }
    if constexpr (NR == 4) {  // (M >= 2) four sums per transposing reduction
        for (int m = 0; m < MT; ++m)
            _mm_storeu_si128((__m128i*)(acc_out + m * NR), reduce4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
    } else {
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MT; ++m) acc_out[m * NR + r] = _mm512_reduce_add_epi32(acc[r][m]);
    }
}

template <int NR, int MT>
QBW8_TARGET void tile_epilogue(const int8_t* codes, const float* scale, const float* bias, int64_t N, int64_t K,
                               const int8_t* xq, int64_t Kp, const int32_t* xsum, const float* sx, int64_t m0,
                               int64_t n, float* y) {
    int32_t acc[NR * MT];
    tile<NR, MT>(codes + n * K, K, xq + m0 * Kp, Kp, acc);
    for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NR; ++r) {
            const int32_t a = (int32_t)((uint32_t)acc[m * NR + r] - 128u * (uint32_t)xsum[m0 + m]);
            // The reference's order: float(acc) * s_x, then * scale, then + bias (no FMA contraction).
            float t = (float)a * sx[m0 + m];
            t = t * scale[n + r];
            if (bias) t = t + bias[n + r];
            y[(m0 + m) * N + n + r] = t;
        }
}

// Rows [n0, n1) of W against rows [m0, m1) of xq.
template <int NR>
QBW8_TARGET void rows(const int8_t* codes, const float* scale, const float* bias, int64_t N, int64_t K,
                      const int8_t* xq, int64_t Kp, const int32_t* xsum, const float* sx, int64_t m0, int64_t m1,
                      int64_t n0, int64_t n1, float* y) {
    constexpr int MTMAX = 6;
    for (int64_t m = m0; m < m1; m += MTMAX) {
        const int mt = (int)std::min<int64_t>(MTMAX, m1 - m);
        int64_t n = n0;
        for (; n + NR <= n1; n += NR) {
            switch (mt) {
#define QBW8_CASE(MT) case MT: tile_epilogue<NR, MT>(codes, scale, bias, N, K, xq, Kp, xsum, sx, m, n, y); break;
                QBW8_CASE(1) QBW8_CASE(2) QBW8_CASE(3) QBW8_CASE(4) QBW8_CASE(5) QBW8_CASE(6)
                default: break;
#undef QBW8_CASE
            }
        }
        for (; n < n1; ++n) {
            switch (mt) {
#define QBW8_CASE(MT) case MT: tile_epilogue<1, MT>(codes, scale, bias, N, K, xq, Kp, xsum, sx, m, n, y); break;
                QBW8_CASE(1) QBW8_CASE(2) QBW8_CASE(3) QBW8_CASE(4) QBW8_CASE(5) QBW8_CASE(6)
#undef QBW8_CASE
                default: break;
            }
        }
    }
}


// ---- the packed-weight kernel (a prepared copy of the weight, see qbw8_pack) --------------------------------
// Panel layout: for each block of 16 output columns, for each group of 4 k, the 16 columns' 4 bytes
// (64 bytes, one zmm), as unsigned w + 128. One broadcast of 4 bytes of a row of xq then feeds vpdpbusd
// against 16 columns: the accumulators are [MR rows of x] x [NB blocks of 16 columns] with no horizontal
// reduction (MLAS/ggml style). The same int32 sums (minus 128 * sum_k xq) as the canonical kernel.

// The int32 sums of MR rows of xq x NB blocks (16 columns each) starting at packed block b, into out
// [MR][NB][16]. (Loops fully unrolled so that GCC keeps acc in registers, not in a stack array; with the
// epilogue in the same function GCC spills acc to the stack on every step of k.)
template <int MR, int NB>
QBW8_TARGET inline void psums(const uint8_t* packed, int64_t K4, const int8_t* xr, int64_t ld, int64_t b,
                              int32_t* out) {
    __m512i acc[MR][NB];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_si512();
    const int64_t panel = 16 * K4;  // bytes per block of 16 columns
    const uint8_t* w = packed + b * panel;
    for (int64_t kb = 0; kb < K4; kb += 4) {
        __m512i wv[NB];
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) wv[j] = _mm512_load_si512(w + j * panel + kb * 16);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            int32_t x4;
            std::memcpy(&x4, xr + m * ld + kb, 4);
            const __m512i xb = _mm512_set1_epi32(x4);
#pragma GCC unroll 4
            for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], wv[j], xb);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) _mm512_store_si512(out + (m * NB + j) * 16, acc[m][j]);
}

// MR rows of xq x NB blocks of 16 columns starting at block b; epilogue applied, columns >= N not stored.
template <int MR, int NB>
QBW8_TARGET void ptile(const uint8_t* packed, int64_t K4, const int8_t* xq, int64_t ld, const int32_t* xsum,
                       const float* sx, const float* scale, const float* bias, int64_t N, int64_t m0, int64_t b,
                       float* y) {
    alignas(64) int32_t sums[MR * NB * 16];
    psums<MR, NB>(packed, K4, xq + m0 * ld, ld, b, sums);
    for (int j = 0; j < NB; ++j) {
        const int64_t n = (b + j) * 16;
        const __mmask16 mk = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
        const __m512 sc = _mm512_maskz_loadu_ps(mk, scale + n);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + n) : _mm512_setzero_ps();
        for (int m = 0; m < MR; ++m) {
            const int32_t corr = (int32_t)(128u * (uint32_t)xsum[m0 + m]);
            const __m512i acc = _mm512_load_si512(sums + (m * NB + j) * 16);
            const __m512i a = _mm512_sub_epi32(acc, _mm512_set1_epi32(corr));  // wraps: exact mod 2^32
            // The reference's order: float(acc) * s_x, then * scale, then + bias (-ffp-contract=off: no FMA).
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sx[m0 + m]));
            t = _mm512_mul_ps(t, sc);
            if (bias) t = _mm512_add_ps(t, bv);
            _mm512_mask_storeu_ps(y + (m0 + m) * N + n, mk, t);
        }
    }
}

template <int MR>
QBW8_TARGET void ptile_nb(int nb, const uint8_t* packed, int64_t K4, const int8_t* xq, int64_t ld,
                          const int32_t* xsum, const float* sx, const float* scale, const float* bias, int64_t N,
                          int64_t m0, int64_t b, float* y) {
    switch (nb) {
        case 4: ptile<MR, 4>(packed, K4, xq, ld, xsum, sx, scale, bias, N, m0, b, y); break;
        case 3: ptile<MR, 3>(packed, K4, xq, ld, xsum, sx, scale, bias, N, m0, b, y); break;
        case 2: ptile<MR, 2>(packed, K4, xq, ld, xsum, sx, scale, bias, N, m0, b, y); break;
        case 1: ptile<MR, 1>(packed, K4, xq, ld, xsum, sx, scale, bias, N, m0, b, y); break;
        default: break;
    }
}

// Rows [m0, m1) of xq x blocks [b0, b1) of the packed weight, in tiles of up to 6 rows x 4 blocks.
QBW8_TARGET void packed_range(const uint8_t* packed, int64_t K4, const int8_t* xq, int64_t ld, const int32_t* xsum,
                              const float* sx, const float* scale, const float* bias, int64_t N, int64_t m0,
                              int64_t m1, int64_t b0, int64_t b1, float* y) {
    constexpr int NBMAX = 4, MRMAX = 6;
    for (int64_t b = b0; b < b1; b += NBMAX) {
        const int nb = (int)std::min<int64_t>(NBMAX, b1 - b);
        // tiles of even height (8 rows: 4 + 4, not 6 + 2: each weight load feeds as many rows as it can)
        const int64_t ntiles = (m1 - m0 + MRMAX - 1) / MRMAX, mr = (m1 - m0 + ntiles - 1) / ntiles;
        for (int64_t m = m0; m < m1; m += mr) {
            switch ((int)std::min<int64_t>(mr, m1 - m)) {
#define QBW8_CASE(MR) case MR: ptile_nb<MR>(nb, packed, K4, xq, ld, xsum, sx, scale, bias, N, m, b, y); break;
                QBW8_CASE(1) QBW8_CASE(2) QBW8_CASE(3) QBW8_CASE(4) QBW8_CASE(5) QBW8_CASE(6)
#undef QBW8_CASE
                default: break;
            }
        }
    }
}

#endif  // QBW8_AVX512

// Rows of x holding NaN (bad[m]) give NaN rows of y, as the reference does.
void nan_rows(const uint8_t* bad, int64_t M, int64_t N, float* y) {
    const float qnan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t m = 0; m < M; ++m)
        if (bad[m])
            for (int64_t n = 0; n < N; ++n) y[m * N + n] = qnan;
}

// The prologue's heap buffers.
void free_prologue(void* xq, void* xsum, void* sx, void* bad) {
    std::free(xq);
    std::free(xsum);
    std::free(sx);
    std::free(bad);
}

}  // namespace

extern "C" {

int qbw8_abi_version() { return 1; }

// 1 if this build and CPU run the VNNI kernel.
int qbw8_available() {
#if QBW8_AVX512
    return __builtin_cpu_supports("avx512vnni") ? 1 : 0;
#else
    return 0;
#endif
}

// Prologue alone: xq [M, ld] (ld >= K, zero padded), xsum [M], sx [M], bad [M] (1: NaN row; its xq is zeros).
// Used by the kernel below and, for large M, before a library int8 GEMM (then ld = K).
void qbw8_quantize(const float* x, int64_t M, int64_t K, const float* act_scale, int8_t* xq, int64_t ld,
                   int32_t* xsum, float* sx, uint8_t* bad, int nthreads) {
    const int64_t Kp = ld;
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
    par_chunks((M + grain - 1) / grain, nthreads, [&](int64_t c, int) {
        for (int64_t m = c * grain; m < std::min(M, (c + 1) * grain); ++m)
            if (!quantize_row(x + m * K, K, Kp, act_scale, xq + m * Kp, xsum + m, sx + m)) {
                bad[m] = 1;
                std::memset(xq + m * Kp, 0, (size_t)Kp);  // the GEMM stays finite; the row becomes NaN after
                xsum[m] = 0;
            } else {
                bad[m] = 0;
            }
    });
}

// Epilogue after an int32 GEMM: y[m, n] = float(acc[m, n]) * sx[m] * scale[n] (+ bias[n]); NaN rows where bad.
void qbw8_epilogue(const int32_t* acc, int64_t M, int64_t N, const float* sx, const float* scale, const float* bias,
                   const uint8_t* bad, float* y, int nthreads) {
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(N, 1));
    const float qnan = std::numeric_limits<float>::quiet_NaN();
    par_chunks((M + grain - 1) / grain, nthreads, [&](int64_t c, int) {
        for (int64_t m = c * grain; m < std::min(M, (c + 1) * grain); ++m) {
            const int32_t* a = acc + m * N;
            float* o = y + m * N;
            if (bad[m]) {
                for (int64_t n = 0; n < N; ++n) o[n] = qnan;
                continue;
            }
            const float s = sx[m];
            for (int64_t n = 0; n < N; ++n) {
                float t = (float)a[n] * s;  // the reference's order, no FMA contraction
                t = t * scale[n];
                if (bias) t = t + bias[n];
                o[n] = t;
            }
        }
    });
}

// y[M, N] = w8a8(x[M, K], codes[N, K] int8, scale[N]) (+ bias) with x fp32 contiguous; act_scale null for
// per-token scales. Returns 0, or 1 (nothing done) when this build/CPU/shape is not covered.
int qbw8_linear(const float* x, int64_t M, int64_t K, const int8_t* codes, const float* scale, int64_t N,
                const float* bias, const float* act_scale, float* y, int nthreads) {
#if QBW8_AVX512
    if (!qbw8_available() || K > kMaxK || K <= 0) return 1;
    const int64_t Kp = (K + 63) / 64 * 64;
    int8_t* xq = (int8_t*)std::aligned_alloc(64, (size_t)(std::max<int64_t>(M, 1) * Kp));
    int32_t* xsum = (int32_t*)std::malloc(sizeof(int32_t) * (size_t)std::max<int64_t>(M, 1));
    float* sx = (float*)std::malloc(sizeof(float) * (size_t)std::max<int64_t>(M, 1));
    uint8_t* bad = (uint8_t*)std::malloc((size_t)std::max<int64_t>(M, 1));
    qbw8_quantize(x, M, K, act_scale, xq, Kp, xsum, sx, bad, nthreads);
    // Threads split N; each chunk runs all of M in tiles (x stays in cache, W streams once for small M).
    // Large M: chunks of (m block, n block) so W's block is reused from L2 across the m tiles.
    const int64_t nb = M <= 8 ? 32 : 64;
    const int64_t mb = M <= 8 ? M : 96;
    const int64_t nchunks_n = (N + nb - 1) / nb, nchunks_m = (M + mb - 1) / mb;
    par_chunks(nchunks_n * nchunks_m, nthreads, [&](int64_t c, int) {
        const int64_t cn = c % nchunks_n, cm = c / nchunks_n;
        const int64_t n0 = cn * nb, n1 = std::min(N, n0 + nb);
        const int64_t m0 = cm * mb, m1 = std::min(M, m0 + mb);
        if (M == 1) rows<8>(codes, scale, bias, N, K, xq, Kp, xsum, sx, m0, m1, n0, n1, y);
        else rows<4>(codes, scale, bias, N, K, xq, Kp, xsum, sx, m0, m1, n0, n1, y);
    });
    nan_rows(bad, M, N, y);
    free_prologue(xq, xsum, sx, bad);
    return 0;
#else
    (void)x, (void)M, (void)K, (void)codes, (void)scale, (void)N, (void)bias, (void)act_scale, (void)y;
    (void)nthreads;
    return 1;
#endif
}


// Bytes of the packed copy qbw8_pack writes for an [N, K] weight: N and K rounded up to 16 and 4.
int64_t qbw8_packed_bytes(int64_t N, int64_t K) { return (N + 15) / 16 * 16 * ((K + 3) / 4 * 4); }

// The packed copy (layout above ptile) of codes [N, K] int8, into packed (64-byte aligned,
// qbw8_packed_bytes long). Padding: w = 0 (stored 128), against zero-padded xq.
void qbw8_pack(const int8_t* codes, int64_t N, int64_t K, uint8_t* packed) {
    const int64_t K4 = (K + 3) / 4 * 4, nblk = (N + 15) / 16;
    for (int64_t b = 0; b < nblk; ++b)
        for (int64_t kb = 0; kb < K4; kb += 4)
            for (int64_t c = 0; c < 16; ++c)
                for (int64_t i = 0; i < 4; ++i) {
                    const int64_t n = b * 16 + c, k = kb + i;
                    const int w = (n < N && k < K) ? codes[n * K + k] : 0;
                    packed[b * 16 * K4 + kb * 16 + c * 4 + i] = (uint8_t)(w + 128);
                }
}

// qbw8_linear on the packed copy of the weight (qbw8_pack). Returns 0, or 1 (nothing done) when this
// build/CPU/shape is not covered.
int qbw8_linear_packed(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* scale, int64_t N,
                       const float* bias, const float* act_scale, float* y, int nthreads) {
#if QBW8_AVX512
    if (!qbw8_available() || K > kMaxK || K <= 0 || M <= 0 || N <= 0 || ((uintptr_t)packed & 63)) return 1;
    const int64_t K4 = (K + 3) / 4 * 4, nblk = (N + 15) / 16;
    // stack buffers for the common small call (no allocation), else the heap
    constexpr int64_t kStack = 16384;
    alignas(64) int8_t xq_s[kStack];
    int32_t xsum_s[64];
    float sx_s[64];
    uint8_t bad_s[64];
    const bool small = M <= 64 && M * K4 <= kStack;
    int8_t* xq = small ? xq_s : (int8_t*)std::aligned_alloc(64, (size_t)((M * K4 + 63) / 64 * 64));
    int32_t* xsum = small ? xsum_s : (int32_t*)std::malloc(sizeof(int32_t) * (size_t)M);
    float* sx = small ? sx_s : (float*)std::malloc(sizeof(float) * (size_t)M);
    uint8_t* bad = small ? bad_s : (uint8_t*)std::malloc((size_t)M);
    qbw8_quantize(x, M, K, act_scale, xq, K4, xsum, sx, bad, M >= 32 ? nthreads : 1);
    // Chunks: 4 blocks (64 columns) x up to 48 rows; the 64-column panel stays in L1/L2 across the row tiles.
    const int64_t cb = 4, mb = 48;
    const int64_t ncb = (nblk + cb - 1) / cb, nmb = (M + mb - 1) / mb;
    par_chunks(ncb * nmb, nthreads, [&](int64_t c, int) {
        const int64_t ci = c % ncb, cm = c / ncb;
        packed_range(packed, K4, xq, K4, xsum, sx, scale, bias, N, cm * mb, std::min(M, (cm + 1) * mb), ci * cb,
                     std::min(nblk, (ci + 1) * cb), y);
    });
    nan_rows(bad, M, N, y);
    if (!small) free_prologue(xq, xsum, sx, bad);
    return 0;
#else
    (void)x, (void)M, (void)K, (void)packed, (void)scale, (void)N, (void)bias, (void)act_scale, (void)y;
    (void)nthreads;
    return 1;
#endif
}

// qbw8_linear_packed for the fast call: returns 0 only when it ran and every output is finite (else the
// caller's regular path, with its overflow retry, computes the call); one ctypes call instead of two.
int qbw8_linear_packed_finite(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* scale,
                              int64_t N, const float* bias, const float* act_scale, float* y, int nthreads) {
    const int rc = qbw8_linear_packed(x, M, K, packed, scale, N, bias, act_scale, y, nthreads);
    if (rc != 0) return rc;
    return qb_all_finite(y, M * N) ? 0 : 2;
}

}  // extern "C"
