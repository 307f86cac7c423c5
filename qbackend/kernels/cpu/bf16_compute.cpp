// "bf16" compute mode of the weight-only linears on CPU: codes decoded to bf16 in registers, AVX512-BF16
// dot products (vdpbf16ps) with fp32 accumulation, block/group constants applied per block to the fp32
// accumulator (lane-wise). Numerics: qbackend.kernels.reference ("bf16": x rounded to bf16, NF4/FP4
// table values rounded to bf16, block constants fp32, int4/int8 codes exact).
//
// 4-bit decode, 128 weights per step: one 64-byte load of codes read as 32 words; word j holds elements
// 4j+1 (bits 0-3), 4j (4-7), 4j+3 (8-11), 4j+2 (12-15) of the step. vpermw reads index bits 0-4, so with
// the 16-entry bf16 table stored twice (32 words) the word itself, >> 4, >> 8 and >> 12 are ready
// indices: 3 shifts + 4 vpermw give the 128 bf16 weights, no masks. x is permuted to match once per
// call (xp[32 t + j] = x[4 j + t] per step of 128). Each fp32 lane then holds the products of 8
// consecutive elements (8i .. 8i+7 of the step), so with blocks/groups of >= 8 aligned elements a lane
// never straddles a block and the block constant multiplies the lane (no horizontal sum per block).
//
// Large M: panels of W decoded to bf16 (the weight rounded to bf16, which the contract allows), multiplied
// by a bf16 x bf16 -> fp32 GEMM, single-threaded per pool thread (MKL's cblas_gemm_bf16bf16f32, handed in
// by the Python side; see bf16_compute.py).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define QBBF_AVX512 1
#else
#define QBBF_AVX512 0
#endif

extern "C" {

void qb_pool_run(int64_t nchunks, int nthreads, void (*fn)(void*, int64_t, int), void* ctx);  // qlinear.cpp

// Mirrors qbackend.kernels.cpu.bf16_compute.QBF (ctypes.Structure); keep the two in sync.
struct QBF {
    const uint8_t* codes;   // 4-bit: (N*K+1)/2 packed bytes (bitsandbytes flat layout)
    const float* absmax;    // codebook, plain constants [ceil(N*K/bs)], else null
    const uint8_t* ncodes;  // codebook, nested constants: 8-bit codes
    const float* nabsmax;   // codebook, nested: absmax per nested block
    const float* ntable;    // codebook, nested: 256-entry table
    const float* noffset;   // codebook, nested: offset (1 value)
    const float* table;     // codebook: 16-entry code table (fp32; rounded to bf16 here)
    const float* scale;     // int4: [N, G]
    const uint8_t* zp;      // int4 affine: [N, G], else null (zero point 8)
    int32_t is_int4;
    int64_t N, K, bs, nbs, G;
};

// bf16 x bf16 -> fp32 GEMM in MKL's CBLAS form, and MKL's per-thread thread count.
// (MKL_INT is a 32-bit int in torch's LP64 MKL, as for the sgemm_ that qlinear.cpp calls.)
typedef void (*gemm_bf16_fn)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                             const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
typedef int (*set_threads_fn)(int);
}

namespace {

template <typename F>
void par_chunks(int64_t n, int nthreads, F&& f) {
    using G = typename std::remove_reference<F>::type;
    qb_pool_run(n, nthreads, [](void* c, int64_t i, int slot) { (*static_cast<G*>(c))(i, slot); }, &f);
}

inline int ilog2(int64_t v) {
    int l = 0;
    while ((int64_t(1) << l) < v) ++l;
    return l;
}
inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

bool qbbf_ok_cpu() {
#if QBBF_AVX512
    static const bool ok = __builtin_cpu_supports("avx512bf16");
    return ok;
#else
    return false;
#endif
}

// bf16 of an fp32 value, round to nearest even (NaN kept quiet), as torch's .bfloat16().
inline uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Block/group constants of row n (index j relative to the row's first block), zero padded by 17.
// Returns the row's first element's offset within its block (0 for int4). Nested constants are
// decoded as the reference does: table * absmax2, then + offset.
int64_t row_consts(const QBF& q, int64_t n, float* s, float* z, int64_t* count_out) {
    int64_t first, off, count;
    if (!q.is_int4) {
        const int64_t e0 = n * q.K;
        first = e0 / q.bs;
        off = e0 - first * q.bs;
        count = (e0 + q.K - 1) / q.bs - first + 1;
        if (q.absmax) {
            std::memcpy(s, q.absmax + first, sizeof(float) * (size_t)count);
        } else {
            const float o = *q.noffset;
            if (is_pow2(q.nbs)) {  // a shift, not a 64-bit division per block (measured: a third of the GEMV)
                const int lnb = ilog2(q.nbs);
                for (int64_t j = 0; j < count; ++j) {
                    const int64_t b = first + j;
                    const float t = q.ntable[q.ncodes[b]] * q.nabsmax[b >> lnb];
                    s[j] = t + o;
                }
            } else {
                for (int64_t j = 0; j < count; ++j) {
                    const int64_t b = first + j;
                    const float t = q.ntable[q.ncodes[b]] * q.nabsmax[b / q.nbs];
                    s[j] = t + o;
                }
            }
        }
    } else {
        off = 0;
        count = q.G;
        std::memcpy(s, q.scale + n * q.G, sizeof(float) * (size_t)q.G);
        if (q.zp && z)
            for (int64_t j = 0; j < q.G; ++j) z[j] = (float)q.zp[n * q.G + j];
    }
    for (int64_t j = count; j < count + 17; ++j) {
        s[j] = 0.0f;
        if (z) z[j] = 0.0f;
    }
    if (count_out) *count_out = count;
    return off;
}

inline int shift_of(const QBF& q) { return (q.is_int4 && q.G == 1) ? 40 : ilog2(q.bs); }

#if QBBF_AVX512

#define QBBF_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Rows of x as bf16 in the decoded order (xp[32 t + j] = x[4 j + t] per step of 128), zero padded to Kp:
// a step of 128 fp32 -> 4 x 32 bf16 (natural order) -> the permuted order, by
// two-source word permutes (two values of t per permute) and 256-bit half swaps.
QBBF_TARGET void prep_x4_avx512(const float* x, int64_t M, int64_t K, int64_t Kp, uint16_t* xp) {
    alignas(64) uint16_t ia[32], ib[32];
    for (int i = 0; i < 16; ++i) {
        ia[i] = (uint16_t)(4 * i), ia[i + 16] = (uint16_t)(4 * i + 1);
        ib[i] = (uint16_t)(4 * i + 2), ib[i + 16] = (uint16_t)(4 * i + 3);
    }
    const __m512i idx01 = _mm512_load_si512(ia), idx23 = _mm512_load_si512(ib);
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        uint16_t* o = xp + m * Kp;
        for (int64_t k = 0; k < Kp; k += 128) {
            alignas(64) float tail[128];
            const float* src = xr + k;
            if (K - k < 128) {
                std::memset(tail, 0, sizeof(tail));
                if (K > k) std::memcpy(tail, xr + k, sizeof(float) * (size_t)(K - k));
                src = tail;
            }
            __m512i v[4];
            for (int i = 0; i < 4; ++i)
                v[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 32 * i + 16), _mm512_loadu_ps(src + 32 * i));
            const __m512i a01 = _mm512_permutex2var_epi16(v[0], idx01, v[1]);  // t0 | t1 of elements 0..63
            const __m512i a23 = _mm512_permutex2var_epi16(v[0], idx23, v[1]);
            const __m512i b01 = _mm512_permutex2var_epi16(v[2], idx01, v[3]);  // the same of 64..127
            const __m512i b23 = _mm512_permutex2var_epi16(v[2], idx23, v[3]);
            _mm512_storeu_si512(o + k, _mm512_shuffle_i64x2(a01, b01, 0x44));
            _mm512_storeu_si512(o + k + 32, _mm512_shuffle_i64x2(a01, b01, 0xEE));
            _mm512_storeu_si512(o + k + 64, _mm512_shuffle_i64x2(a23, b23, 0x44));
            _mm512_storeu_si512(o + k + 96, _mm512_shuffle_i64x2(a23, b23, 0xEE));
        }
    }
}

// The 16-entry table as bf16 words, twice (vpermw reads 5 index bits).
QBBF_TARGET inline __m512i lut_words(const QBF& q, bool affine) {
    alignas(64) uint16_t l[32];
    for (int c = 0; c < 16; ++c) {
        float v = q.is_int4 ? (affine ? (float)c : (float)(c - 8)) : q.table[c];
        l[c] = l[c + 16] = to_bf16(v);
    }
    return _mm512_load_si512(l);
}

// NR rows of W (4-bit) x MT rows of x per register tile, over the whole of K.
template <int NR, int MT>
QBBF_TARGET void tile4(const QBF& q, const __m512i lut, int lb, const uint16_t* xp, int64_t Kp, int64_t n,
                       float* const* s, const int64_t* off, float* out /* [MT][NR] */) {
    const int64_t K = q.K;
    const __m512i lane8 = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    const uint8_t* cr[NR];
    for (int r = 0; r < NR; ++r) cr[r] = q.codes + (n + r) * K / 2;
    const int64_t nsteps = Kp / 128;
    for (int64_t c = 0; c < nsteps; ++c) {
        const int64_t k = c * 128;
        const int64_t rem = K - k;
        __m512i w[NR][4];
        __m512 sv[NR];
        for (int r = 0; r < NR; ++r) {
            __m512i v;
            if (rem >= 128) {
                if (MT <= 2) _mm_prefetch((const char*)(cr[r] + k / 2 + 1024), _MM_HINT_T0);
                v = _mm512_loadu_si512(cr[r] + k / 2);
            } else {
                v = _mm512_maskz_loadu_epi8(~0ULL >> (64 - rem / 2), cr[r] + k / 2);  // x is 0 past K
            }
            w[r][1] = _mm512_permutexvar_epi16(v, lut);
            w[r][0] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
            w[r][3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
            w[r][2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
            const int64_t p = off[r] + k;
            if (lb >= 40) {
                sv[r] = _mm512_set1_ps(s[r][0]);
            } else {
                const int64_t base = p >> lb;
                const __m512i idx = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int32_t)(p - (base << lb))), lane8), lb);
                sv[r] = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(s[r] + base));
            }
        }
        for (int m = 0; m < MT; ++m) {
            const uint16_t* xm = xp + m * Kp + k;
            const __m512bh x0 = (__m512bh)_mm512_load_si512(xm), x1 = (__m512bh)_mm512_load_si512(xm + 32);
            const __m512bh x2 = (__m512bh)_mm512_load_si512(xm + 64), x3 = (__m512bh)_mm512_load_si512(xm + 96);
            for (int r = 0; r < NR; ++r) {
                __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[r][0], x0);
                t = _mm512_dpbf16_ps(t, (__m512bh)w[r][1], x1);
                t = _mm512_dpbf16_ps(t, (__m512bh)w[r][2], x2);
                t = _mm512_dpbf16_ps(t, (__m512bh)w[r][3], x3);
                acc[r][m] = _mm512_fmadd_ps(t, sv[r], acc[r][m]);
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NR; ++r) out[m * NR + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// Rows [n0, n1) of a 4-bit W against all M rows of xp. Affine int4: - sum_g s*zp*xg[m, g] per output.
template <int NR>
QBBF_TARGET void rows4(const QBF& q, const uint16_t* xp, int64_t Kp, int64_t M, const float* xg, const float* bias,
                       float* y, int64_t n0, int64_t n1, float* sbuf, float* zbuf, int64_t cl) {
    const bool affine = q.is_int4 && q.zp;
    const __m512i lut = lut_words(q, affine);
    const int lb = shift_of(q);
    constexpr int MTMAX = NR >= 4 ? 4 : 6;
    for (int64_t n = n0; n < n1; n += NR) {
        const int nr = (int)std::min<int64_t>(NR, n1 - n);
        float* s[NR];
        int64_t off[NR];
        for (int r = 0; r < NR; ++r) {
            s[r] = sbuf + r * cl;
            off[r] = r < nr ? row_consts(q, n + r, s[r], affine ? zbuf + r * cl : nullptr, nullptr) : 0;
        }
        for (int64_t m = 0; m < M; m += MTMAX) {
            const int mt = (int)std::min<int64_t>(MTMAX, M - m);
            float out[NR * MTMAX];
            if (nr == NR) {
                switch (mt) {
#define QBBF_CASE(MT) case MT: tile4<NR, MT>(q, lut, lb, xp + m * Kp, Kp, n, s, off, out); break;
                    QBBF_CASE(1) QBBF_CASE(2) QBBF_CASE(3) QBBF_CASE(4)
                    default:
                        if constexpr (MTMAX > 4) {
                            switch (mt) { QBBF_CASE(5) QBBF_CASE(6) default: break; }
                        }
                        break;
#undef QBBF_CASE
                }
            } else {
                for (int r = 0; r < nr; ++r)
                    for (int mm = 0; mm < mt; ++mm) {
                        float o1;
                        tile4<1, 1>(q, lut, lb, xp + (m + mm) * Kp, Kp, n + r, &s[r], &off[r], &o1);
                        out[mm * NR + r] = o1;
                    }
            }
            for (int mm = 0; mm < mt; ++mm)
                for (int r = 0; r < nr; ++r) {
                    float t = out[mm * NR + r];
                    if (affine) {
                        const float* xr = xg + (m + mm) * q.G;
                        float c = 0.0f;
                        for (int64_t g = 0; g < q.G; ++g) c += s[r][g] * zbuf[r * cl + g] * xr[g];
                        t -= c;
                    }
                    if (bias) t += bias[n + r];
                    y[(m + mm) * q.N + n + r] = t;
                }
        }
    }
}

// int8 weights: 32 codes -> 2 x 16 fp32 (exact) -> 32 bf16 (exact), dot with natural-order bf16 x.
template <int NR, int MT>
QBBF_TARGET void tile8(const int8_t* codes, int64_t K, const uint16_t* xb, int64_t Kp, float* out) {
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kp; k += 32) {
        const int64_t rem = K - k;
        const __mmask32 mk = rem >= 32 ? ~0u : (__mmask32)((1u << rem) - 1);
        __m512bh w[NR];
        for (int r = 0; r < NR; ++r) {
            const __m256i b = _mm256_maskz_loadu_epi8(mk, codes + r * K + k);
            if (MT <= 2) _mm_prefetch((const char*)(codes + r * K + k + 1024), _MM_HINT_T0);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
            w[r] = _mm512_cvtne2ps_pbh(hi, lo);  // words 0-15 from lo, 16-31 from hi
        }
        for (int m = 0; m < MT; ++m) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(xb + m * Kp + k);
            for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w[r], xv);
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NR; ++r) out[m * NR + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int NR>
QBBF_TARGET void rows8(const int8_t* codes, const float* scale, int64_t N, int64_t K, const uint16_t* xb, int64_t Kp,
                       int64_t M, const float* bias, float* y, int64_t n0, int64_t n1) {
    constexpr int MTMAX = 6;
    for (int64_t n = n0; n < n1; n += NR) {
        const int nr = (int)std::min<int64_t>(NR, n1 - n);
        for (int64_t m = 0; m < M; m += MTMAX) {
            const int mt = (int)std::min<int64_t>(MTMAX, M - m);
            float out[NR * MTMAX];
            if (nr == NR) {
                switch (mt) {
#define QBBF_CASE(MT) case MT: tile8<NR, MT>(codes + n * K, K, xb + m * Kp, Kp, out); break;
                    QBBF_CASE(1) QBBF_CASE(2) QBBF_CASE(3) QBBF_CASE(4) QBBF_CASE(5) QBBF_CASE(6)
                    default: break;
#undef QBBF_CASE
                }
            } else {
                for (int r = 0; r < nr; ++r)
                    for (int mm = 0; mm < mt; ++mm) tile8<1, 1>(codes + (n + r) * K, K, xb + (m + mm) * Kp, Kp, &out[mm * NR + r]);
            }
            for (int mm = 0; mm < mt; ++mm)
                for (int r = 0; r < nr; ++r) {
                    float t = out[mm * NR + r] * scale[n + r];
                    if (bias) t += bias[n + r];
                    y[(m + mm) * N + n + r] = t;
                }
        }
    }
}

#endif  // QBBF_AVX512

gemm_bf16_fn g_gemm = nullptr;
set_threads_fn g_local_threads = nullptr;

// Row n of a 4-bit W decoded to bf16 in natural order: bf16(bf16(table)[c] * const) / bf16((c - zp) * s).
void decode4_row_bf16_scalar(const QBF& q, int64_t n, int64_t k0, float* s, float* z, int64_t off, uint16_t* o) {
    const bool affine = q.is_int4 && q.zp;
    float lut[16];
    for (int c = 0; c < 16; ++c)
        lut[c] = q.is_int4 ? (affine ? (float)c : (float)(c - 8)) : from_bf16(to_bf16(q.table[c]));
    const int64_t e0 = n * q.K;
    for (int64_t k = k0; k < q.K; ++k) {
        const int64_t e = e0 + k;
        const uint8_t b = q.codes[e >> 1];
        const int c = (e & 1) ? (b & 0xF) : (b >> 4);
        const int64_t j = q.is_int4 ? (q.G == 1 ? 0 : k / q.bs) : (off + k) / q.bs;
        const float v = affine ? (lut[c] - z[j]) * s[j] : lut[c] * s[j];
        o[k] = to_bf16(v);
    }
}

#if QBBF_AVX512
// The same, 32 elements per step (needs K % 2 == 0 and power-of-two blocks/groups, or one group per row).
QBBF_TARGET void decode4_row_bf16_avx512(const QBF& q, int64_t n, float* s, float* z, uint16_t* o) {
    const bool affine = q.is_int4 && q.zp;
    alignas(64) float l[16];
    for (int c = 0; c < 16; ++c)
        l[c] = q.is_int4 ? (affine ? (float)c : (float)(c - 8)) : from_bf16(to_bf16(q.table[c]));
    const __m512 lut = _mm512_load_ps(l);
    const int64_t off = row_consts(q, n, s, affine ? z : nullptr, nullptr);
    const int lb = shift_of(q);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const uint8_t* cr = q.codes + n * q.K / 2;
    const int64_t K32 = q.K / 32 * 32;
    for (int64_t k = 0; k < K32; k += 32) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(cr + k / 2)));
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
        const __m512 lo = _mm512_permutexvar_ps(v, lut);
        __m512 w[2] = {_mm512_permutex2var_ps(hi, ilo, lo), _mm512_permutex2var_ps(hi, ihi, lo)};
        for (int h = 0; h < 2; ++h) {
            __m512 sv, zv = _mm512_setzero_ps();
            if (lb >= 40) {
                sv = _mm512_set1_ps(s[0]);
                if (affine) zv = _mm512_set1_ps(z[0]);
            } else {
                const int64_t p = off + k + 16 * h;
                const int64_t base = p >> lb;
                const __m512i idx =
                    _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int32_t)(p - (base << lb))), iota), lb);
                sv = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(s + base));
                if (affine) zv = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(z + base));
            }
            w[h] = _mm512_mul_ps(affine ? _mm512_sub_ps(w[h], zv) : w[h], sv);
        }
        _mm512_storeu_si512(o + k, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
    }
    if (K32 < q.K) decode4_row_bf16_scalar(q, n, K32, s, z, off, o);
}

QBBF_TARGET void decode8_row_bf16_avx512(const int8_t* cr, float sc, int64_t K, uint16_t* o) {
    const __m512 sv = _mm512_set1_ps(sc);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(cr + k)))), sv);
        const __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(cr + k + 16)))), sv);
        _mm512_storeu_si512(o + k, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    for (; k < K; ++k) o[k] = to_bf16((float)cr[k] * sc);
}
#endif

void decode4_row_bf16(const QBF& q, int64_t n, float* s, float* z, uint16_t* o) {
#if QBBF_AVX512
    if (qbbf_ok_cpu() && q.K % 2 == 0 && ((q.is_int4 && q.G == 1) || is_pow2(q.bs))) {
        decode4_row_bf16_avx512(q, n, s, z, o);
        return;
    }
#endif
    const int64_t off = row_consts(q, n, s, (q.is_int4 && q.zp) ? z : nullptr, nullptr);
    decode4_row_bf16_scalar(q, n, 0, s, z, off, o);
}

void decode8_row_bf16(const int8_t* cr, float sc, int64_t K, uint16_t* o) {
#if QBBF_AVX512
    if (qbbf_ok_cpu()) {
        decode8_row_bf16_avx512(cr, sc, K, o);
        return;
    }
#endif
    for (int64_t k = 0; k < K; ++k) o[k] = to_bf16((float)cr[k] * sc);
}

}  // namespace

extern "C" {

int qbbf_abi_version() { return 1; }

// 1 if this build and CPU run the AVX512-BF16 kernels.
int qbbf_available() { return qbbf_ok_cpu() ? 1 : 0; }

// Shapes the fused 4-bit kernel covers: K % 8 == 0 and power-of-two blocks/groups >= 8 (or one group per row).
int qbbf_fast4_ok(const QBF* qp) {
    const QBF& q = *qp;
    if (q.K % 8 != 0 || q.K <= 0) return 0;
    if (q.is_int4 && q.G == 1) return 1;
    if (!is_pow2(q.bs) || q.bs < 8) return 0;
    if (!q.is_int4 && !q.absmax && q.nbs <= 0) return 0;
    return 1;
}

// Fused small-M kernel: y[M, N] = x[M, K] @ W^T (+ bias). Returns 0, or 1 (nothing done).
int qbbf_linear4(const QBF* qp, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
#if QBBF_AVX512
    const QBF& q = *qp;
    if (!qbbf_available() || !qbbf_fast4_ok(qp)) return 1;
    const int64_t K = q.K, Kp = (K + 127) / 128 * 128;
    const bool affine = q.is_int4 && q.zp;
    uint16_t* xp = (uint16_t*)std::aligned_alloc(64, sizeof(uint16_t) * (size_t)(std::max<int64_t>(M, 1) * Kp));
    const int64_t xgrain = std::max<int64_t>(1, 32768 / Kp);
    par_chunks((M + xgrain - 1) / xgrain, nthreads, [&](int64_t c, int) {
        const int64_t m0 = c * xgrain, m1 = std::min(M, m0 + xgrain);
        prep_x4_avx512(x + m0 * K, m1 - m0, K, Kp, xp + m0 * Kp);
    });
    std::vector<float> xg;
    if (affine) {  // sums of the bf16 x per group, for the zero point term
        xg.assign((size_t)(M * q.G), 0.0f);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k)
                xg[(size_t)(m * q.G + (q.G == 1 ? 0 : k / q.bs))] += from_bf16(to_bf16(x[m * K + k]));
    }
    const int64_t cl = (q.is_int4 ? q.G : K / q.bs + 2) + 32;
    const int64_t grain = 16;
    par_chunks((q.N + grain - 1) / grain, nthreads, [&](int64_t c, int) {
        thread_local std::vector<float> sb, zb;
        if ((int64_t)sb.size() < 4 * cl) sb.resize((size_t)(4 * cl));
        if ((int64_t)zb.size() < 4 * cl) zb.resize((size_t)(4 * cl));
        const int64_t n0 = c * grain, n1 = std::min(q.N, n0 + grain);
        if (M == 1) rows4<4>(q, xp, Kp, M, xg.data(), bias, y, n0, n1, sb.data(), zb.data(), cl);
        else rows4<2>(q, xp, Kp, M, xg.data(), bias, y, n0, n1, sb.data(), zb.data(), cl);
    });
    std::free(xp);
    return 0;
#else
    (void)qp, (void)x, (void)M, (void)bias, (void)y, (void)nthreads;
    return 1;
#endif
}

int qbbf_linear8(const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                 const float* bias, float* y, int nthreads) {
#if QBBF_AVX512
    if (!qbbf_available() || K <= 0) return 1;
    const int64_t Kp = (K + 31) / 32 * 32;
    uint16_t* xb = (uint16_t*)std::aligned_alloc(64, sizeof(uint16_t) * (size_t)(std::max<int64_t>(M, 1) * Kp));
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < K; ++k) xb[m * Kp + k] = to_bf16(x[m * K + k]);
        for (int64_t k = K; k < Kp; ++k) xb[m * Kp + k] = 0;
    }
    const int64_t grain = 16;
    par_chunks((N + grain - 1) / grain, nthreads, [&](int64_t c, int) {
        const int64_t n0 = c * grain, n1 = std::min(N, n0 + grain);
        if (M == 1) rows8<4>(codes, scale, N, K, xb, Kp, M, bias, y, n0, n1);
        else rows8<2>(codes, scale, N, K, xb, Kp, M, bias, y, n0, n1);
    });
    std::free(xb);
    return 0;
#else
    (void)codes, (void)scale, (void)N, (void)K, (void)x, (void)M, (void)bias, (void)y, (void)nthreads;
    return 1;
#endif
}

// Install the bf16 GEMM (MKL's cblas_gemm_bf16bf16f32) and MKL's per-thread thread setter after a
// check multiply; returns 1, or 0 (nothing installed) if the result is wrong.
int qbbf_set_gemm(void* gemm, void* set_local_threads) {
    if (gemm == nullptr || set_local_threads == nullptr) return 0;
    uint16_t a[6], b[6];
    const float af[6] = {1, 2, 3, 4, 5, 6}, bf[6] = {1, 0, 2, 0, 1, 3};  // x [2, 3], W [2, 3] row-major
    for (int i = 0; i < 6; ++i) a[i] = to_bf16(af[i]), b[i] = to_bf16(bf[i]);
    float c[4] = {0, 0, 0, 0};
    // Row-major (101), x no-trans (111), W trans (112): c = x @ W^T.
    ((gemm_bf16_fn)gemm)(101, 111, 112, 2, 2, 3, 1.0f, a, 3, b, 3, 0.0f, c, 2);
    // x @ W^T = [[1*1+2*0+3*2, 1*0+2*1+3*3], [4+0+12, 0+5+18]] = [[7, 11], [16, 23]]
    if (!(c[0] == 7.0f && c[1] == 11.0f && c[2] == 16.0f && c[3] == 23.0f)) return 0;
    g_gemm = (gemm_bf16_fn)gemm;
    g_local_threads = (set_threads_fn)set_local_threads;
    return 1;
}

// Large M: y[M, N] = xb[M, K] (bf16) @ W^T (+ bias), W decoded panel by panel (P rows) to bf16 per thread.
// codes8 != null: an int8 weight (codes8 [N, K], scale8 [N]); else the 4-bit weight q.
int qbbf_panel(const QBF* qp, const int8_t* codes8, const float* scale8, int64_t N, int64_t K, const uint16_t* xb,
               int64_t M, const float* bias, float* y, int nthreads, int64_t P) {
    if (g_gemm == nullptr) return 1;
    const int64_t nchunks = (N + P - 1) / P;
    const int64_t cl = qp ? (qp->is_int4 ? qp->G : K / std::max<int64_t>(qp->bs, 1) + 2) + 32 : 0;
    par_chunks(nchunks, nthreads, [&](int64_t c, int) {
        thread_local std::vector<uint16_t> buf;
        thread_local std::vector<float> sb, zb;
        if ((int64_t)buf.size() < P * K) buf.resize((size_t)(P * K));
        if ((int64_t)sb.size() < cl) sb.resize((size_t)cl), zb.resize((size_t)cl);
        const int64_t n0 = c * P, n1 = std::min(N, n0 + P);
        for (int64_t n = n0; n < n1; ++n) {
            uint16_t* o = buf.data() + (n - n0) * K;
            if (codes8) {
                decode8_row_bf16(codes8 + n * K, scale8[n], K, o);
            } else {
                decode4_row_bf16(*qp, n, sb.data(), zb.data(), o);
            }
        }
        float beta = 0.0f;
        if (bias) {
            for (int64_t i = 0; i < M; ++i)
                for (int64_t j = n0; j < n1; ++j) y[i * N + j] = bias[j];
            beta = 1.0f;
        }
        const int prev = g_local_threads(1);
        // y[:, n0:n1] = xb @ panel^T, row-major, ldc = N.
        g_gemm(101, 111, 112, (int)M, (int)(n1 - n0), (int)K, 1.0f, xb, (int)K, buf.data(), (int)K, beta, y + n0,
               (int)N);
        g_local_threads(prev);
    });
    return 0;
}

}  // extern "C"
