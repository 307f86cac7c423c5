// qbackend CPU kernels of the "int8" compute mode (see qbackend.kernels.reference): dynamic int8
// activations times integer weights with AVX512-VNNI vpdpbusd (u8 x s8 -> s32).
//
// Numerics (the reference's): each row of x is quantized symmetrically per block of 32 along K
// (scale = amax / 127, round(x / scale) half to even, clamp +-127); weights are integers already
// (int4: code - zero point; int8: code) or the int8 image of the NF4/FP4 table. Products are summed
// exactly in int32 per 32-block, then scaled by (activation scale * weight block scale) in fp32.
//
// Layout tricks (no weight repacking; the canonical tensors are read directly):
// * Weights go to vpdpbusd as UNSIGNED bytes: 4-bit codes through a 16-entry vpshufb LUT holding the
//   table image + 128 (NF4/FP4) or as the code itself (int4), int8 codes xor 0x80 (= w + 128). The
//   offset costs one correction per int32 lane, - offset * sum(the xq of that lane), shared by all
//   rows of W and made the accumulator's start value (affine int4: - zp * sum per row, vpmaddwd).
// * Canonical 4-bit codes hold element 2i in the high nibble of byte i: the activations of each
//   128-element chunk are stored as [64 even k, 64 odd k] once per call, so one 64-byte code load
//   gives two u8 vectors (high and low nibbles) that line up with the two activation vectors.
//   Lanes 4b..4b+3 of the int32 accumulator then hold block b of the chunk: the block scales are
//   applied per lane (fma with a 16-lane scale vector), one horizontal sum per output only.
//   This is the kernel for M < 6 (4-bit weights) or M < 8 (int8): GEMV-like, no per-call work on W.
//   With cold weights (LLM decode) each tile software-prefetches the codes and block constants of rows
//   ahead: a row of codes is a stream too short for the hardware prefetchers (measured 1.2-2x). M <= 5:
//   tiles of 16 rows walked chunk-major, one 16-row reduction (run4_16); M = 1 with long rows (K > 1536)
//   in groups of 4 rows; the codes prefetched in address order into L2. The rows after the last whole
//   16 take the older tiles (M = 1: run4_gemv, one row at a time).
// * Larger M: a GEMM (see gemm_tile): x transposed once per call so that each vector holds L rows of
//   x (L = 8 from M = 6 (4-bit), 16 from M = 9; 4 and 2 when the threshold is lowered), nested NF4
//   constants of a unit's rows decoded 64 at a time, rows of W decoded once per work unit (up to 128
//   rows of x) into a small per-thread buffer (unsigned bytes; 4-bit rows in the order the nibbles
//   unpack, which the activations already have: no permute; int4 zero points folded into the bytes),
//   the bytes of one vpdpbusd step broadcast against the L-row vectors, so an int32 lane sums its
//   share of a whole 32-block; the codes of the next rows are prefetched
//   while a tile computes (the weight streams from L3/DRAM under the compute). No copy of W outlives
//   the call.
// Threads: the library's RowPool (qb_pool_run in qlinear.cpp), rows of W split into units.
// Groups (qbi8_linear_group: weights reading one x, as q/k/v at LLM decode): at small M, x quantized
// once and the members' rows walked as one range in one region (measured at hidden 896, M = 1, hot:
// q/k/v 12 us against 18.5 us in three calls).
//
// The code is compiled for the library's variant flags; the VNNI/VBMI parts carry target
// attributes and run only when the CPU has them (qbi8_supported).
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#include <immintrin.h>

extern "C" {
// The library's thread pool (qlinear.cpp).
void qb_pool_run(int64_t nchunks, int nthreads, void (*fn)(void*, int64_t, int), void* ctx);
int qb_all_finite(const float* p, int64_t n);  // finite_check.cpp

// Weight kinds; mirrors qbackend.kernels.cpu.int8_compute.
enum QI8Kind : int32_t { KIND_CODEBOOK = 0, KIND_INT4 = 1, KIND_INT8 = 2 };

// Mirrors qbackend.kernels.cpu.int8_compute.QI8W (ctypes.Structure); keep the two in sync.
struct QI8W {
    const uint8_t* codes;   // 4-bit: (N*K+1)/2 packed bytes; int8: N*K int8
    const float* absmax;    // codebook, plain constants [ceil(N*K/bs)]
    const uint8_t* ncodes;  // codebook, nested: 8-bit codes of the centred constants
    const float* nabsmax;   // codebook, nested: absmax per nested block
    const float* ntable;    // codebook, nested: 256-entry map
    const float* noffset;   // codebook, nested: offset (1 value)
    const float* scale;     // int4: [N, G]; int8: [N]
    const uint8_t* zp;      // int4 affine: [N, G]; null: symmetric (zero point 8)
    int8_t lut[16];         // codebook: int8 image of the table (round(c * t))
    float inv_c;            // codebook: 1 / c
    int32_t kind;           // QI8Kind
    int64_t N, K, bs, nbs, G;  // bs: codebook blocksize or int4 groupsize
};
}

namespace {

#define QBI8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma,bmi2")))

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }
int ilog2(int64_t v) {
    int s = 0;
    while ((int64_t(1) << s) < v) ++s;
    return s;
}

// Quantized activations of one call. Chunks of CH = 128 (4-bit weights: [64 even k, 64 odd k]) or
// 64 (int8 weights: natural order) elements of K; per chunk a 16-lane fp32 scale vector (the scale
// of the block each int32 lane of the accumulator belongs to) and a 16-lane int32 start vector
// (-offset * the sum of the int8 values that lane multiplies, or the bare sum for affine int4).
struct Act {
    int64_t M = 0, K = 0, Kp = 0, nch = 0, ch = 0;
    int8_t* xq = nullptr;   // [M, Kp]
    float* sv = nullptr;    // [M, nch, 16]
    int32_t* cv = nullptr;  // [M, nch, 16]
    uint8_t* bad = nullptr; // [M]: row holds NaN/Inf
};

// Per-thread scratch, grown as needed and reused across calls.
template <typename T>
T* scratch(int slot, size_t n) {
    thread_local std::vector<T> bufs[5];
    if (bufs[slot].size() < n + 64) bufs[slot].resize(n + 64);
    T* p = bufs[slot].data();
    return p;
}

// Quantizes rows [m0, m1) of x into a; off: weight offset folded into cv (0 with affine: bare sums).
QBI8_TARGET void quantize_rows(const float* x, Act& a, int64_t m0, int64_t m1, int32_t off, bool affine, float sv_mul) {
    const int64_t K = a.K, ch = a.ch, nch = a.nch;
    const int bpc = (int)(ch / 32);  // blocks per chunk
    const int lanes_per_block = 16 / bpc;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 fmax = _mm512_set1_ps(FLT_MAX);
    const __m512i lo127 = _mm512_set1_epi32(-127), hi127 = _mm512_set1_epi32(127);
    // Byte permutation of a 128-byte chunk into [even, odd].
    alignas(64) uint8_t ev_idx[64], od_idx[64];
    for (int i = 0; i < 64; ++i) ev_idx[i] = (uint8_t)(2 * i), od_idx[i] = (uint8_t)(2 * i + 1);
    const __m512i ev = _mm512_load_si512(ev_idx), od = _mm512_load_si512(od_idx);
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr = x + m * K;
        int8_t* qr = a.xq + m * a.Kp;
        bool bad = false;
        for (int64_t c = 0; c < nch; ++c) {
            alignas(64) int8_t q[128];
            alignas(64) float s[4];
            for (int b = 0; b < bpc; ++b) {
                const int64_t k0 = c * ch + 32 * b;
                const int64_t rem = K - k0;
                __m512 v0, v1;
                if (rem >= 32) {
                    v0 = _mm512_loadu_ps(xr + k0);
                    v1 = _mm512_loadu_ps(xr + k0 + 16);
                } else {
                    const int r0 = (int)std::max<int64_t>(0, std::min<int64_t>(16, rem));
                    const int r1 = (int)std::max<int64_t>(0, std::min<int64_t>(16, rem - 16));
                    v0 = _mm512_maskz_loadu_ps((__mmask16)((1u << r0) - 1), rem > 0 ? xr + k0 : xr);
                    v1 = _mm512_maskz_loadu_ps((__mmask16)((1u << r1) - 1), rem > 16 ? xr + k0 + 16 : xr);
                }
                const __m512 a0 = _mm512_and_ps(v0, absmask), a1 = _mm512_and_ps(v1, absmask);
                // not (|x| <= FLT_MAX) holds for NaN and +-Inf
                if (_mm512_cmp_ps_mask(a0, fmax, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(a1, fmax, _CMP_NLE_UQ)) bad = true;
                const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
                const float sc = amax / 127.0f;
                __m512i q0 = _mm512_setzero_si512(), q1 = _mm512_setzero_si512();
                if (sc > 0.0f) {
                    const __m512 d = _mm512_set1_ps(sc);
                    // true division and round half to even, as the reference
                    q0 = _mm512_cvt_roundps_epi32(_mm512_div_ps(v0, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    q1 = _mm512_cvt_roundps_epi32(_mm512_div_ps(v1, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo127), hi127);
                    q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo127), hi127);
                }
                s[b] = sc;
                _mm_store_si128((__m128i*)(q + 32 * b), _mm512_cvtepi32_epi8(q0));
                _mm_store_si128((__m128i*)(q + 32 * b + 16), _mm512_cvtepi32_epi8(q1));
            }
            // Lane sums of the int8 values: the offset correction of each int32 lane is made in that
            // lane, so every lane holds an exact signed partial dot product (no large offset terms
            // cancelling across lanes in fp32).
            __m512i lsum;
            const __m512i ones = _mm512_set1_epi8(1);
            if (ch == 128) {
                const __m512i lo = _mm512_load_si512(q), hi = _mm512_load_si512(q + 64);
                const __m512i xe = _mm512_permutex2var_epi8(lo, ev, hi), xo = _mm512_permutex2var_epi8(lo, od, hi);
                _mm512_storeu_si512(qr + c * 128, xe);
                _mm512_storeu_si512(qr + c * 128 + 64, xo);
                lsum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, xe), ones, xo);
            } else {
                const __m512i xv = _mm512_load_si512(q);
                _mm512_storeu_si512(qr + c * 64, xv);
                lsum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, xv);
            }
            alignas(64) float svl[16];
            for (int l = 0; l < 16; ++l) svl[l] = s[l / lanes_per_block] * sv_mul;
            _mm512_storeu_ps(a.sv + (m * nch + c) * 16, _mm512_load_ps(svl));
            const __m512i cvv = affine ? lsum : _mm512_mullo_epi32(lsum, _mm512_set1_epi32(-off));
            _mm512_storeu_si512(a.cv + (m * nch + c) * 16, cvv);
        }
        a.bad[m] = bad;
    }
}

// ---- weight block scales of one row, in the form the kernels read -------------------------------
//
// ws[j] is the scale of the weight block j of the row in steps of (1 << sh) 32-blocks: chunk c uses
// ws[(4c) >> sh ...] through a lane permutation; padded with zeros past the row's end.
struct RowScales {
    int sh = 0;               // log2(32-blocks per entry), <= 2 handled by the lane index, more by the base shift
    bool compact = true;      // entries are whole weight blocks (else one per 32-block)
};

inline float nested_const(const QI8W& w, int64_t blk) {
    const float t = w.ntable[w.ncodes[blk]] * w.nabsmax[blk / w.nbs];  // the reference's order, no FMA
    return t + w.noffset[0];
}

// Nested block constants b0 .. b0 + 16 * (n / 16) - 1 decoded 16 at a time (the 256-entry table through
// eight 32-entry vpermt2ps lookups, selected by the code's top 3 bits); the same products and sums
// as the scalar form, so bit-exact. Returns how many were written (the caller does the rest).
QBI8_TARGET int64_t denest16(const QI8W& w, int64_t b0, int64_t n, int nsh, float* out) {
    if (n < 16) return 0;
    __m512 tab[16];
    for (int t = 0; t < 16; ++t) tab[t] = _mm512_loadu_ps(w.ntable + 16 * t);
    const __m512 off = _mm512_set1_ps(w.noffset[0]);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const int64_t b = b0 + j;
        const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w.ncodes + b)));
        const __m512i top = _mm512_srli_epi32(code, 5);
        __m512 t = _mm512_permutex2var_ps(tab[0], code, tab[1]);
        for (int g = 1; g < 8; ++g)
            t = _mm512_mask_mov_ps(t, _mm512_cmpeq_epi32_mask(top, _mm512_set1_epi32(g)),
                                   _mm512_permutex2var_ps(tab[2 * g], code, tab[2 * g + 1]));
        __m512 na;
        if ((b >> nsh) == ((b + 15) >> nsh)) {
            na = _mm512_set1_ps(w.nabsmax[b >> nsh]);
        } else {
            const __m512i gi = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(b & ((int64_t(1) << nsh) - 1))), iota), nsh);
            const int cnt = (int)(((b + 15) >> nsh) - (b >> nsh) + 1);  // nested blocks spanned, <= 16
            na = _mm512_permutexvar_ps(gi, _mm512_maskz_loadu_ps((__mmask16)((1u << cnt) - 1), w.nabsmax + (b >> nsh)));
        }
        _mm512_storeu_ps(out + j, _mm512_add_ps(_mm512_mul_ps(t, na), off));
    }
    return j;
}

// The nested table as 4 byte planes (plane p = byte p of each fp32 entry; 1 KB, 64-byte aligned), so that
// denest64 looks up 64 codes with two vpermi2b per plane; built once per call.
constexpr size_t NPLANES_BYTES = 1024;
QBI8_TARGET void nested_planes(const QI8W& w, uint8_t* planes) {
    for (int p = 0; p < 4; ++p)
        for (int i = 0; i < 16; ++i) {
            const __m512i v = _mm512_castps_si512(_mm512_loadu_ps(w.ntable + 16 * i));
            _mm_store_si128((__m128i*)(planes + 256 * p + 16 * i), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8 * p)));
        }
}

// As denest16, 64 constants at a time from the byte planes: a byte lookup of 64 codes (2 vpermi2b + a
// blend on the code's top bit per plane) and the bytes interleaved into fp32 (8 unpacks; the codes are
// permuted first so that the unpacks' in-lane order comes out natural). The same table values, products
// and sums as denest16: bit-exact. Measured 2.3x less time than denest16 (M = 1 profile: 19% of the
// kernel's time before, 8% after).
QBI8_TARGET int64_t denest64(const QI8W& w, const uint8_t* planes, int64_t b0, int64_t n, int nsh, float* out) {
    if (n < 64 || planes == nullptr) return 0;
    __m512i P[4][4];
    for (int p = 0; p < 4; ++p)
        for (int q = 0; q < 4; ++q) P[p][q] = _mm512_load_si512(planes + 256 * p + 64 * q);
    // byte 16L + 4q + i of the permuted codes is code 16q + 4L + i
    alignas(64) uint8_t pidx[64];
    for (int L = 0; L < 4; ++L)
        for (int q = 0; q < 4; ++q)
            for (int i = 0; i < 4; ++i) pidx[16 * L + 4 * q + i] = (uint8_t)(16 * q + 4 * L + i);
    const __m512i perm = _mm512_load_si512(pidx);
    const __m512 off = _mm512_set1_ps(w.noffset[0]);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
        const int64_t b = b0 + j;
        const __m512i cp = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(w.ncodes + b));
        const __mmask64 top = _mm512_movepi8_mask(cp);
        __m512i B[4];
        for (int p = 0; p < 4; ++p)
            B[p] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(P[p][0], cp, P[p][1]),
                                          _mm512_permutex2var_epi8(P[p][2], cp, P[p][3]));
        const __m512i w01l = _mm512_unpacklo_epi8(B[0], B[1]), w01h = _mm512_unpackhi_epi8(B[0], B[1]);
        const __m512i w23l = _mm512_unpacklo_epi8(B[2], B[3]), w23h = _mm512_unpackhi_epi8(B[2], B[3]);
        __m512 t[4];
        t[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01l, w23l));
        t[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01l, w23l));
        t[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01h, w23h));
        t[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01h, w23h));
        const bool one = (b >> nsh) == ((b + 63) >> nsh);
        const __m512 na1 = _mm512_set1_ps(w.nabsmax[b >> nsh]);
        for (int q = 0; q < 4; ++q) {
            const int64_t bq = b + 16 * q;
            __m512 na = na1;
            if (!one) {
                const __m512i gi = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(bq & ((int64_t(1) << nsh) - 1))), iota), nsh);
                const int cnt = (int)(((bq + 15) >> nsh) - (bq >> nsh) + 1);  // nested blocks spanned, <= 16
                na = _mm512_permutexvar_ps(gi, _mm512_maskz_loadu_ps((__mmask16)((1u << cnt) - 1), w.nabsmax + (bq >> nsh)));
            }
            _mm512_storeu_ps(out + j + 16 * q, _mm512_add_ps(_mm512_mul_ps(t[q], na), off));
        }
    }
    return j;
}

// -zp as the low int16 of an int32 lane, high half zero (the vpmaddwd operand against block sums).
inline int32_t neg16(uint8_t zp) { return (int32_t)(uint16_t)(int16_t)(-(int32_t)zp); }

// Fills ws (and zb for affine int4) for row n; returns the entries written (<= K/32 + 4 padding).
QBI8_TARGET void row_scales(const QI8W& w, const RowScales& rs, int64_t n, float* ws, int32_t* zb) {
    const int64_t K = w.K, nb32 = K / 32;
    if (w.kind == KIND_INT4) {
        const float* s = w.scale + n * w.G;
        if (rs.compact) {
            std::memcpy(ws, s, sizeof(float) * (size_t)w.G);
            std::memset(ws + w.G, 0, sizeof(float) * 8);
            if (zb) {
                const uint8_t* z = w.zp + n * w.G;
                for (int64_t j = 0; j < w.G; ++j) zb[j] = neg16(z[j]);
                std::memset(zb + w.G, 0, sizeof(int32_t) * 8);
            }
        } else {
            for (int64_t b = 0; b < nb32; ++b) ws[b] = s[(32 * b) / w.bs];
            std::memset(ws + nb32, 0, sizeof(float) * 8);
            if (zb) {
                const uint8_t* z = w.zp + n * w.G;
                for (int64_t b = 0; b < nb32; ++b) zb[b] = neg16(z[(32 * b) / w.bs]);
                std::memset(zb + nb32, 0, sizeof(int32_t) * 8);
            }
        }
        return;
    }
    // codebook
    if (rs.compact) {
        const int64_t nblk = K / w.bs, b0 = n * nblk;
        if (w.ncodes == nullptr) {
            std::memcpy(ws, w.absmax + b0, sizeof(float) * (size_t)nblk);
        } else if (is_pow2(w.nbs)) {
            const int nsh = ilog2(w.nbs);
            const float off = w.noffset[0];
            const int64_t done = denest16(w, b0, nblk, nsh, ws);
            for (int64_t j = done; j < nblk; ++j) {
                const int64_t b = b0 + j;
                const float t = w.ntable[w.ncodes[b]] * w.nabsmax[b >> nsh];
                ws[j] = t + off;
            }
        } else {
            for (int64_t j = 0; j < nblk; ++j) ws[j] = nested_const(w, b0 + j);
        }
        std::memset(ws + nblk, 0, sizeof(float) * 8);
    } else {
        for (int64_t b = 0; b < nb32; ++b) {
            const int64_t blk = (n * K + 32 * b) / w.bs;
            ws[b] = w.ncodes ? nested_const(w, blk) : w.absmax[blk];
        }
        std::memset(ws + nb32, 0, sizeof(float) * 8);
    }
}

// ---- the 4-bit tile: MR rows of x times NR rows of W ----------------------------------------------

struct Ctx4 {
    const QI8W* w;
    const Act* a;
    const float* bias;
    float* y;
    int sh;
    __mmask64 tail_mask;  // code bytes of the last (partial) chunk; 0 when K % 128 == 0
    int64_t nfull;        // full chunks
    int pf_tiles = 0;     // small M: software prefetch of the codes this many tiles ahead (0: none)
    const uint8_t* nplanes = nullptr;  // nested codebook: the table's byte planes (nested_planes)
    int64_t pf_rows = 0;  // run4_16: prefetch distance in rows of W (pf_tiles * pf_rows_ahead(K / 2))
};

// KIND: 0 LUT, 1 int4 symmetric, 2 int4 affine. From MR = 2 (M = 1's streaming path kept as it was
// measured): the codebook decoded with vpermb (no nibble mask), and with SPLAT (sh >= 2: one constant
// per chunk, the lane index all zero) the constants broadcast.
template <int MR, int NR, int KIND, bool SPLAT = false>
QBI8_TARGET void tile4(const Ctx4& cx, int64_t m0, int64_t n0, const float* const* ws, const int32_t* const* zb) {
    const QI8W& w = *cx.w;
    const Act& a = *cx.a;
    const int64_t K = w.K, nch = a.nch, Kp = a.Kp;
    const int sh = cx.sh;
    const __m512i lane_idx = _mm512_srli_epi32(
        _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2), std::min(sh, 2));
    const __m512i lut = _mm512_broadcast_i32x4(_mm_add_epi8(_mm_loadu_si128((const __m128i*)w.lut), _mm_set1_epi8((char)0x80)));
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const uint8_t* wr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = w.codes + (n0 + r) * (K / 2);
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    // Cold weights: the NR rows are NR short streams (a row of codes is K/2 bytes, often less than a
    // page, where the hardware prefetchers stop): fetch the same chunk of the rows pf_tiles tiles on.
    const int64_t pf = (int64_t)cx.pf_tiles * NR * (K / 2);
    for (int64_t c = 0; c < nch; ++c) {
        __m512i hi[NR], lo[NR], zv[NR];
        __m512 wsv[NR];
        const int64_t base = (4 * c) >> sh;
        if (pf)
            for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(wr[r] + 64 * c + pf), _MM_HINT_T0);
        for (int r = 0; r < NR; ++r) {
            const __m512i v = c < cx.nfull ? _mm512_loadu_si512(wr[r] + 64 * c)
                                           : _mm512_maskz_loadu_epi8(cx.tail_mask, wr[r] + 64 * c);
            if (MR >= 2 && KIND == 0) {  // vpermb reads the low 6 bits: lut holds the 16 entries 4 times
                lo[r] = _mm512_permutexvar_epi8(v, lut);
                hi[r] = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), lut);
            } else {
                lo[r] = _mm512_and_si512(v, nib);
                hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                if (KIND == 0) {
                    lo[r] = _mm512_shuffle_epi8(lut, lo[r]);
                    hi[r] = _mm512_shuffle_epi8(lut, hi[r]);
                }
            }
            if (SPLAT) {
                wsv[r] = _mm512_set1_ps(ws[r][base]);
                if (KIND == 2) zv[r] = _mm512_set1_epi32(zb[r][base]);
                continue;
            }
            wsv[r] = _mm512_permutexvar_ps(lane_idx, _mm512_broadcast_f32x4(_mm_loadu_ps(ws[r] + base)));
            if (KIND == 2) zv[r] = _mm512_permutexvar_epi32(lane_idx, _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(zb[r] + base))));
        }
        for (int i = 0; i < MR; ++i) {
            const int8_t* xr = a.xq + (m0 + i) * Kp + 128 * c;
            const __m512i xe = _mm512_loadu_si512(xr), xo = _mm512_loadu_si512(xr + 64);
            const __m512 sv = _mm512_loadu_ps(a.sv + ((m0 + i) * nch + c) * 16);
            const __m512i cv = _mm512_loadu_si512(a.cv + ((m0 + i) * nch + c) * 16);
            for (int r = 0; r < NR; ++r) {
                __m512i ia = KIND == 2 ? _mm512_madd_epi16(cv, zv[r]) : cv;
                ia = _mm512_dpbusd_epi32(ia, hi[r], xe);
                ia = _mm512_dpbusd_epi32(ia, lo[r], xo);
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), _mm512_mul_ps(sv, wsv[r]), acc[i][r]);
            }
        }
    }
    const int64_t N = w.N;
    for (int i = 0; i < MR; ++i)
        for (int r = 0; r < NR; ++r) {
            float v = _mm512_reduce_add_ps(acc[i][r]);
            if (cx.bias) v += cx.bias[n0 + r];
            cx.y[(m0 + i) * N + n0 + r] = v;
        }
}

// ---- the int8 tile ---------------------------------------------------------------------------------

struct Ctx8 {
    const QI8W* w;
    const Act* a;
    const float* bias;
    float* y;
    __mmask64 tail_mask;
    int64_t nfull;
    int pf_tiles = 0;  // as Ctx4::pf_tiles
};

template <int MR, int NR>
QBI8_TARGET void tile8(const Ctx8& cx, int64_t m0, int64_t n0) {
    const QI8W& w = *cx.w;
    const Act& a = *cx.a;
    const int64_t K = w.K, nch = a.nch, Kp = a.Kp;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t* wr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = (const int8_t*)w.codes + (n0 + r) * K;
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    const int64_t pf = (int64_t)cx.pf_tiles * NR * K;
    for (int64_t c = 0; c < nch; ++c) {
        __m512i wv[NR];
        if (pf)
            for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(wr[r] + 64 * c + pf), _MM_HINT_T0);
        for (int r = 0; r < NR; ++r) {
            const __m512i v = c < cx.nfull ? _mm512_loadu_si512(wr[r] + 64 * c)
                                           : _mm512_maskz_loadu_epi8(cx.tail_mask, wr[r] + 64 * c);
            wv[r] = _mm512_xor_si512(v, flip);
        }
        for (int i = 0; i < MR; ++i) {
            const __m512i xv = _mm512_loadu_si512(a.xq + (m0 + i) * Kp + 64 * c);
            const __m512 sv = _mm512_loadu_ps(a.sv + ((m0 + i) * nch + c) * 16);
            const __m512i cv = _mm512_loadu_si512(a.cv + ((m0 + i) * nch + c) * 16);
            for (int r = 0; r < NR; ++r)
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cv, wv[r], xv)), sv, acc[i][r]);
        }
    }
    const int64_t N = w.N;
    for (int i = 0; i < MR; ++i)
        for (int r = 0; r < NR; ++r) {
            float v = _mm512_reduce_add_ps(acc[i][r]) * w.scale[n0 + r];
            if (cx.bias) v += cx.bias[n0 + r];
            cx.y[(m0 + i) * N + n0 + r] = v;
        }
}

// ---- larger M: a GEMM with the rows of x across the lanes ---------------------------------------
//
// For M >= g_gemm_min_m the activations are transposed once per call into groups of L rows of x
// (L = 16, 8, 4 or 2: the smallest that holds M, up to 16; 16 from M = 9): each row owns 16 / L int32
// lanes of a vector, and one vpdpbusd step covers 64 / L bytes of K per row, L / 2 steps per 32-block:
// xT[group][block j][step s][16 lanes]. Rows of W are decoded once per work unit into unsigned bytes
// in the same word order (decode_row) (reused by every group of the unit); the 64 / L bytes of a step
// are broadcast against the group vectors, so each int32 lane sums its share of a whole 32-block of
// one row of x before the one fp32 scaling of that block (a row's 16 / L lanes are added at the end).
// Small M fills every lane too (M = 8: two words per row per step), with the same tile template.
// 4-bit weights (tuning knob, qbi8_set_gemm_min_m): below, the GEMV-like tile4 (measured faster at M = 3,
// at M = 4 on K = 384..1536 layers, at M = 5 on 4096x4096 and K = 1536; slower from M = 6)
int64_t g_gemm_min_m = 6;
int64_t g_gemm_min_m8 = 8;  // int8 weights (below: tile8)

struct ActT {
    int L = 16;               // rows of x per vector: 16, 8, 4 or 2
    int64_t G = 0, nblk = 0;  // groups of L rows, 32-blocks of K
    int32_t* xT = nullptr;    // [G, nblk, L / 2, 16]
    int32_t* cT = nullptr;    // [G, nblk, 16]: start values, -128 * the lane's sum of x (the weights' offset)
    float* sT = nullptr;      // [G, nblk, 16]: the activation block scale of the lane's row (times the table's 1/c)
};

// Byte offset in a row of Act.xq of word w (0..7) of block j, in the order the decoded weights use:
// block_base(j) + word_in_block(w).
inline int64_t block_base(int64_t ch, int64_t j) { return ch == 64 ? 32 * j : 128 * (j / 4) + 16 * (j % 4); }
inline int word_in_block(int64_t ch, int w) { return ch == 64 || w < 4 ? 4 * w : 64 + 4 * (w - 4); }

// Groups [g0, g1) of x into t (see ActT).
QBI8_TARGET void transpose_groups(const Act& a, ActT& t, int64_t g0, int64_t g1) {
    const int bpc = (int)(a.ch / 32), lpb = 16 / bpc;
    const int L = t.L, lpr = 16 / L, S = L / 2;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lrow = _mm512_srli_epi32(iota, ilog2(lpr));                // row of the group per lane
    const __m512i lword = _mm512_and_si512(iota, _mm512_set1_epi32(lpr - 1));  // word of the step per lane
    const __m512i ones = _mm512_set1_epi8(1);
    alignas(64) int32_t wib[8];
    for (int w = 0; w < 8; ++w) wib[w] = word_in_block(a.ch, w);
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t rows = std::min<int64_t>(L, a.M - L * g);
        const __mmask16 mk = (__mmask16)((1u << (rows * lpr)) - 1);
        const __m512i m = _mm512_add_epi32(_mm512_set1_epi32((int)(L * g)), lrow);
        const __m512i xrow = _mm512_mullo_epi32(m, _mm512_set1_epi32((int)a.Kp));
        const __m512i vrow = _mm512_mullo_epi32(m, _mm512_set1_epi32((int)(a.nch * 16)));
        __m512i idx[8];
        for (int s = 0; s < S; ++s)
            idx[s] = _mm512_add_epi32(xrow, _mm512_permutexvar_epi32(_mm512_add_epi32(lword, _mm512_set1_epi32(s * lpr)),
                                                                     _mm512_maskz_loadu_epi32(0xff, wib)));
        for (int64_t j = 0; j < t.nblk; ++j) {
            const __m512i base = _mm512_set1_epi32((int)block_base(a.ch, j));
            int32_t* xo = t.xT + (g * t.nblk + j) * S * 16;
            __m512i lsum = _mm512_setzero_si512();
            for (int s = 0; s < S; ++s) {
                const __m512i xv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, _mm512_add_epi32(idx[s], base), a.xq, 1);
                _mm512_store_si512(xo + 16 * s, xv);
                lsum = _mm512_dpbusd_epi32(lsum, ones, xv);
            }
            _mm512_store_si512(t.cT + (g * t.nblk + j) * 16, _mm512_mullo_epi32(lsum, _mm512_set1_epi32(-128)));
            const int64_t c = j / bpc, b = j % bpc;
            const __m512i vi = _mm512_add_epi32(vrow, _mm512_set1_epi32((int)(c * 16 + b * lpb)));
            _mm512_store_ps(t.sT + (g * t.nblk + j) * 16, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, vi, a.sv, 4));
        }
    }
}

// Rows n0 .. n0 + nr - 1 of W as unsigned bytes (weight + offset) at dst, dst + dstride, ... (one call:
// a short K spent a good part of each row's decode setting up the constants). NAT (4-bit): each
// 128-chunk as it unpacks, [64 high nibbles (even k), 64 low nibbles (odd k)], the order of Act.xq, so
// no permute (gemm_tile's soff reads a block's words there). Else block-major: block j at 32 j, its 8
// words in word_in_block order.
template <int KIND, bool NAT = false>  // 0 codebook, 1/2 int4, 3 int8
QBI8_TARGET void decode_row(const QI8W& w, int64_t n0, uint8_t* dst, int nr = 1, size_t dstride = 0) {
    const int64_t K = w.K;
    if (KIND == 3) {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        for (int r = 0; r < nr; ++r) {
            const uint8_t* src = w.codes + (n0 + r) * K;
            uint8_t* d = dst + r * dstride;
            for (int64_t k = 0; k < K; k += 64) {
                const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (__mmask64)((uint64_t(1) << (K - k)) - 1);
                _mm512_store_si512(d + k, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, src + k), flip));
            }
        }
        return;
    }
    const __m512i lut = _mm512_broadcast_i32x4(_mm_add_epi8(_mm_loadu_si128((const __m128i*)w.lut), _mm_set1_epi8((char)0x80)));
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const __m512i i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    const __m512i lane_q = _mm512_set_epi32(0x03030303, 0x03030303, 0x03030303, 0x03030303, 0x02020202, 0x02020202,
                                            0x02020202, 0x02020202, 0x01010101, 0x01010101, 0x01010101, 0x01010101, 0, 0, 0, 0);
    // int4: the byte added per 32-block, 128 - zero point (groups are whole 32-blocks), looked up per
    // chunk (a per-row table cost a thread-local lookup and memsets: ~8% of a 384x384 call at M = 8).
    // Blocks past K read no zero point: their codes are masked to 0 against zero activations.
    const int64_t nb32 = K / 32;
    const int zsh = is_pow2(w.bs) ? ilog2(w.bs / 32) : -1;
    // groups of 128 or more (powers of 2): chunk c lies in group c >> zch (a chunk past K reads group G - 1 at most)
    const int zch = zsh >= 2 ? zsh - 2 : -1;
    for (int r = 0; r < nr; ++r) {
        const int64_t n = n0 + r;
        uint8_t* d = dst + r * dstride;
        const uint8_t* src = w.codes + n * (K / 2);
        const uint8_t* z = KIND == 2 ? w.zp + n * w.G : nullptr;
        auto zb_of = [&](int64_t b) -> char {
            if (KIND == 1 || b >= nb32) return (char)120;
            return (char)(uint8_t)(128 - z[zsh >= 0 ? b >> zsh : (32 * b) / w.bs]);
        };
        for (int64_t c = 0; 128 * c < K; ++c) {
            const int64_t nb = std::min<int64_t>(64, (K - 128 * c) / 2);
            const __mmask64 mk = nb == 64 ? ~(__mmask64)0 : (__mmask64)((uint64_t(1) << nb) - 1);
            const __m512i v = _mm512_maskz_loadu_epi8(mk, src + 64 * c);
            __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            if (KIND == 0) {
                lo = _mm512_shuffle_epi8(lut, lo);
                hi = _mm512_shuffle_epi8(lut, hi);
            }
            if constexpr (NAT) {
                // 128-bit lane q of hi and of lo holds block 4c + q: its int4 byte offset, one per lane
                if (KIND == 1) {
                    hi = _mm512_add_epi8(hi, _mm512_set1_epi8((char)120));
                    lo = _mm512_add_epi8(lo, _mm512_set1_epi8((char)120));
                } else if (KIND == 2 && zch >= 0) {  // a whole chunk in one group: one byte
                    const __m512i zv = _mm512_set1_epi8((char)(uint8_t)(128 - z[c >> zch]));
                    hi = _mm512_add_epi8(hi, zv);
                    lo = _mm512_add_epi8(lo, zv);
                } else if (KIND == 2) {
                    const int64_t b = 4 * c;
                    const uint32_t zz = (uint32_t)(uint8_t)zb_of(b) | (uint32_t)(uint8_t)zb_of(b + 1) << 8 |
                                        (uint32_t)(uint8_t)zb_of(b + 2) << 16 | (uint32_t)(uint8_t)zb_of(b + 3) << 24;
                    const __m512i zv = _mm512_shuffle_epi8(_mm512_set1_epi32((int)zz), lane_q);
                    hi = _mm512_add_epi8(hi, zv);
                    lo = _mm512_add_epi8(lo, zv);
                }
                _mm512_store_si512(d + 128 * c, hi);
                _mm512_store_si512(d + 128 * c + 64, lo);
                continue;
            }
            __m512i d0 = _mm512_permutex2var_epi64(hi, i0, lo), d1 = _mm512_permutex2var_epi64(hi, i1, lo);
            if (KIND != 0) {  // int4: code - zero point + 128, per 32-block (groups are multiples of 32)
                const __mmask64 upper = ~(__mmask64)0xffffffffu;
                const int64_t b = 4 * c;
                d0 = _mm512_add_epi8(d0, _mm512_mask_blend_epi8(upper, _mm512_set1_epi8(zb_of(b)), _mm512_set1_epi8(zb_of(b + 1))));
                d1 = _mm512_add_epi8(d1, _mm512_mask_blend_epi8(upper, _mm512_set1_epi8(zb_of(b + 2)), _mm512_set1_epi8(zb_of(b + 3))));
            }
            _mm512_store_si512(d + 128 * c, d0);
            _mm512_store_si512(d + 128 * c + 64, d1);
        }
    }
}

// The block constants of rows [n, n + nr) of a nested codebook weight with whole blocks per row
// (rs.compact) into ws, row r at ws + r * (K / bs): the same products and sums as row_scales, bit-exact.
// The zero padding after the last row is what a tile reads past a row's end.
QBI8_TARGET void nested_scales(const QI8W& w, int64_t n, int nr, float* ws, const uint8_t* planes) {
    const int64_t nblk = w.K / w.bs, b0 = n * nblk, cnt = nr * nblk;
    const int nsh = ilog2(w.nbs);
    const float off = w.noffset[0];
    int64_t j = denest64(w, planes, b0, cnt, nsh, ws);
    j += denest16(w, b0 + j, cnt - j, nsh, ws + j);
    for (; j < cnt; ++j)
        ws[j] = w.ntable[w.ncodes[b0 + j]] * w.nabsmax[(b0 + j) >> nsh] + off;
    std::memset(ws + cnt, 0, sizeof(float) * 8);
}

struct CtxG {
    const QI8W* w;
    const ActT* t;
    const float* bias;
    float* y;
    int64_t M;
    int sh;
    const uint8_t* nplanes = nullptr;  // as Ctx4::nplanes
};

// A unit's outputs (L = 16) gathered column-major, [row of W][row of x], then written to y row by
// row: a scalar store straight from the tiles touched a new cache line of y each (stride N); the
// buffer measured 5-10% faster at 4096x4096, M = 480, one thread.
struct YT {
    float* p = nullptr;  // null: the tiles store into y
    int64_t ld = 0, n0 = 0, m0 = 0;
};

// The BB bytes at p repeated over a vector (BB = 64 / L: one step of one row of W for every row of x).
template <int BB>
QBI8_TARGET inline __m512i bcast_bytes(const uint8_t* p) {
    if constexpr (BB == 4) {
        int32_t v;
        std::memcpy(&v, p, 4);
        return _mm512_set1_epi32(v);
    } else if constexpr (BB == 8) {
        int64_t v;
        std::memcpy(&v, p, 8);
        return _mm512_set1_epi64(v);
    } else if constexpr (BB == 16) {
        return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p));
    } else {
        return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
    }
}

// NR rows of W (decoded: d; block scales ws, none for int8) times MV groups of L rows of x from group g0.
// pf, pf_lines: cache lines to prefetch (the codes of the rows of W decoded next), spread over the blocks.
template <int L, int NR, int MV, bool ROWSCALE>
QBI8_TARGET void gemm_tile(const CtxG& cx, int64_t n0, int64_t g0, const uint8_t* const* d, const float* const* ws,
                           const uint8_t* pf, int64_t pf_lines, const YT& yt) {
    constexpr int S = L / 2, BB = 64 / L, LPR = 16 / L;
    // 4-bit rows decoded in the NAT order (decode_row): a block's first S / 2 steps in the high-nibble
    // half of its chunk, the rest in the low-nibble half (L = 2: one step spans both, block-major then)
    constexpr bool NAT = !ROWSCALE && L >= 4;
    int soff[S];
    for (int s = 0; s < S; ++s) soff[s] = NAT && s >= S / 2 ? 64 + BB * (s - S / 2) : BB * s;
    const ActT& t = *cx.t;
    const int64_t nblk = t.nblk;
    const int sh = cx.sh;
    __m512 acc[NR][MV];
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < MV; ++v) acc[r][v] = _mm512_setzero_ps();
    // Blocks in spans of one weight scale (1 << sh 32-blocks; 1 where scales are per 32-block): the
    // activation-scaled block sums of a span are added first, then scaled once by the weight's scale.
    const int64_t span = ROWSCALE ? nblk : int64_t(1) << sh;  // measured: 10-20% faster than scaling per block
    const int64_t pf_per = (pf_lines + nblk - 1) / nblk;  // prefetched lines per block
    for (int64_t jb = 0; jb < nblk; jb += span) {
        const int64_t je = std::min(nblk, jb + span);
        __m512 part[NR][MV];
        for (int64_t j = jb; j < je; ++j) {
            for (int64_t l = j * pf_per, le = std::min(pf_lines, l + pf_per); l < le; ++l)
                _mm_prefetch((const char*)pf + 64 * l, _MM_HINT_T1);
            __m512i ia[NR][MV];
            for (int v = 0; v < MV; ++v) {
                const __m512i c0 = _mm512_load_si512(t.cT + ((g0 + v) * nblk + j) * 16);
                for (int r = 0; r < NR; ++r) ia[r][v] = c0;
            }
            for (int s = 0; s < S; ++s) {
                __m512i xv[MV];
                for (int v = 0; v < MV; ++v) xv[v] = _mm512_load_si512(t.xT + (((g0 + v) * nblk + j) * S + s) * 16);
                for (int r = 0; r < NR; ++r) {
                    const __m512i wb = bcast_bytes<BB>(d[r] + (NAT ? 128 * (j >> 2) + 16 * (j & 3) : 32 * j) + soff[s]);
                    for (int v = 0; v < MV; ++v) ia[r][v] = _mm512_dpbusd_epi32(ia[r][v], wb, xv[v]);
                }
            }
            for (int v = 0; v < MV; ++v) {
                const __m512 st = _mm512_load_ps(t.sT + ((g0 + v) * nblk + j) * 16);
                for (int r = 0; r < NR; ++r) {
                    const __m512 f = _mm512_cvtepi32_ps(ia[r][v]);
                    if (ROWSCALE) acc[r][v] = _mm512_fmadd_ps(f, st, acc[r][v]);
                    else part[r][v] = j == jb ? _mm512_mul_ps(f, st) : _mm512_fmadd_ps(f, st, part[r][v]);
                }
            }
        }
        if (!ROWSCALE)
            for (int r = 0; r < NR; ++r) {
                const __m512 wsv = _mm512_set1_ps(ws[r][jb >> sh]);
                for (int v = 0; v < MV; ++v) acc[r][v] = _mm512_fmadd_ps(part[r][v], wsv, acc[r][v]);
            }
    }
    const QI8W& w = *cx.w;
    for (int r = 0; r < NR; ++r) {
        const int64_t n = n0 + r;
        const float rs = ROWSCALE ? w.scale[n] : 1.0f;
        const float b = cx.bias ? cx.bias[n] : 0.0f;
        if (L == 16 && yt.p) {  // the same operations as the scalar form below (one lane per row of x)
            for (int v = 0; v < MV; ++v) {
                const __m512 o = ROWSCALE ? _mm512_mul_ps(acc[r][v], _mm512_set1_ps(rs)) : acc[r][v];
                _mm512_storeu_ps(yt.p + (n - yt.n0) * yt.ld + (16 * (g0 + v) - yt.m0), _mm512_add_ps(o, _mm512_set1_ps(b)));
            }
            continue;
        }
        for (int v = 0; v < MV; ++v) {
            alignas(64) float out[16];
            _mm512_store_ps(out, acc[r][v]);
            const int64_t mbase = (int64_t)L * (g0 + v);
            const int64_t cnt = std::min<int64_t>(L, cx.M - mbase);
            for (int64_t l = 0; l < cnt; ++l) {
                float sum = out[l * LPR];
                for (int q = 1; q < LPR; ++q) sum += out[l * LPR + q];
                cx.y[(mbase + l) * w.N + n] = (ROWSCALE ? sum * rs : sum) + b;
            }
        }
    }
}

template <int L, int NR, bool ROWSCALE>
QBI8_TARGET void gemm_rows(const CtxG& cx, int64_t n0, int64_t g0, int64_t g1, const uint8_t* const* d,
                           const float* const* ws, const uint8_t* pf, int64_t pf_lines, const YT& yt) {
    int64_t g = g0;
    for (; g + 2 <= g1; g += 2, pf_lines = 0) gemm_tile<L, NR, 2, ROWSCALE>(cx, n0, g, d, ws, pf, pf_lines, yt);
    if (g < g1) gemm_tile<L, NR, 1, ROWSCALE>(cx, n0, g, d, ws, pf, pf_lines, yt);
}

// Rows [n0, n1) of W times groups [g0, g1) of x: 8 rows of W decoded at a time, then tiles of
// 4 rows x 2 groups (8 rows x 1 group when the unit has one group of fewer than 16 rows: more
// independent accumulator chains than 4 x 1).
template <int L, int KIND>
QBI8_TARGET void run_gemm(const CtxG& cx, const RowScales& rs, int64_t n0, int64_t n1, int64_t g0, int64_t g1) {
    const QI8W& w = *cx.w;
    constexpr int NRD = 8;
    constexpr bool ROWSCALE = KIND == 3;
    const size_t len = (size_t)(w.K / 32 + 16);
    const size_t dlen = (size_t)((w.K + 127) / 128 * 128);
    // Nested NF4 constants of the unit's rows are consecutive blocks: decoded in one pass, 64 at a time
    // (per 8 rows, a short K left them to denest16: ~13% of a MiniLM-sized call at M = 8).
    const bool nested_rows = KIND == 0 && rs.compact && w.ncodes != nullptr && is_pow2(w.nbs);
    float* wsb = scratch<float>(0, std::max(NRD * len, nested_rows ? (size_t)((n1 - n0) * (w.K / w.bs) + 16) : 0));
    if (nested_rows) nested_scales(w, n0, (int)(n1 - n0), wsb, cx.nplanes);
    uint8_t* db = (uint8_t*)(((uintptr_t)scratch<uint8_t>(2, NRD * dlen + 64) + 63) & ~(uintptr_t)63);
    const uint8_t* d[NRD];
    const float* ws[NRD];
    YT yt;
    if (L == 16) {
        yt.ld = 16 * (g1 - g0);
        yt.p = (float*)(((uintptr_t)scratch<float>(4, (size_t)((n1 - n0) * yt.ld + 16)) + 63) & ~(uintptr_t)63);
        yt.n0 = n0;
        yt.m0 = 16 * g0;
    }
    int64_t n = n0;
    while (n < n1) {
        const int nr = (int)std::min<int64_t>(NRD, n1 - n);
        decode_row<KIND, KIND != 3 && L >= 4>(w, n, db, nr, dlen);
        for (int r = 0; r < nr; ++r) {
            uint8_t* dr = db + r * dlen;
            if (nested_rows) ws[r] = wsb + (n - n0 + r) * (w.K / w.bs);
            else {
                if (!ROWSCALE) row_scales(w, rs, n + r, wsb + r * len, nullptr);
                ws[r] = wsb + r * len;
            }
            d[r] = dr;
        }
        // The codes of the next rows stream in while these are computed.
        const int64_t row_bytes = KIND == 3 ? w.K : w.K / 2;
        const int64_t nnext = std::min<int64_t>(NRD, w.N - (n + nr));
        const uint8_t* pf = w.codes + (n + nr) * row_bytes;
        // (only for weights beyond the L2 caches: a small layer's codes stay in cache between calls)
        int64_t pf_lines = nnext > 0 && w.N * row_bytes > (int64_t(4) << 20) ? (nnext * row_bytes + 63) / 64 : 0;
        if (nr == 8 && g1 - g0 == 1) {  // measured: 8 rows of W best for one group (3-5% at M = 16), 4 from 2
            gemm_tile<L, 8, 1, ROWSCALE>(cx, n, g0, d, ws, pf, pf_lines, yt);
        } else {
            for (int q = 0; q < nr; q += 4) {
                const int nq = std::min(4, nr - q);
                // the prefetch split over the quads of rows
                const uint8_t* pq = pf + 64 * (q / 4) * ((pf_lines + 1) / 2);
                const int64_t lq = std::max<int64_t>(0, std::min<int64_t>((pf_lines + 1) / 2, pf_lines - (q / 4) * ((pf_lines + 1) / 2)));
                if (nq == 4) gemm_rows<L, 4, ROWSCALE>(cx, n + q, g0, g1, d + q, ws + q, pq, lq, yt);
                else if (nq == 3) gemm_rows<L, 3, ROWSCALE>(cx, n + q, g0, g1, d + q, ws + q, pq, lq, yt);
                else if (nq == 2) gemm_rows<L, 2, ROWSCALE>(cx, n + q, g0, g1, d + q, ws + q, pq, lq, yt);
                else gemm_rows<L, 1, ROWSCALE>(cx, n + q, g0, g1, d + q, ws + q, pq, lq, yt);
            }
        }
        n += nr;
    }
    if (yt.p) {  // 16 outputs of a row of y per gather (a scalar copy took ~5% of the GEMM's profile)
        const int64_t m1 = std::min(cx.M, 16 * g1);
        const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32((int)yt.ld));
        for (int64_t m = yt.m0; m < m1; ++m)
            for (int64_t j = n0; j < n1; j += 16) {
                const __mmask16 mk = n1 - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n1 - j)) - 1);
                const float* src = yt.p + (j - n0) * yt.ld + (m - yt.m0);
                _mm512_mask_storeu_ps(cx.y + m * w.N + j, mk, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, col, src, 4));
            }
    }
}

// ---- drivers ----------------------------------------------------------------------------------------

constexpr int MR_MAX = 4;

template <int NR, int KIND>
QBI8_TARGET void rows4_mtile(const Ctx4& cx, int64_t m0, int64_t m1, int64_t n0, const float* const* ws,
                             const int32_t* const* zb) {
    if (m1 - m0 == 5) {  // one pass over the weights (4 + 1 decoded them twice)
        if (cx.sh >= 2) tile4<5, NR, KIND, true>(cx, m0, n0, ws, zb);
        else tile4<5, NR, KIND>(cx, m0, n0, ws, zb);
        return;
    }
    if ((m1 - m0 == 3 || m1 - m0 == 4) && cx.sh >= 2) {
        if (m1 - m0 == 4) tile4<4, NR, KIND, true>(cx, m0, n0, ws, zb);
        else tile4<3, NR, KIND, true>(cx, m0, n0, ws, zb);
        return;
    }
    int64_t m = m0;
    for (; m + MR_MAX <= m1; m += MR_MAX) tile4<MR_MAX, NR, KIND>(cx, m, n0, ws, zb);
    switch (m1 - m) {
        case 5: tile4<5, NR, KIND>(cx, m, n0, ws, zb); break;
        case 4: tile4<4, NR, KIND>(cx, m, n0, ws, zb); break;
        case 3: tile4<3, NR, KIND>(cx, m, n0, ws, zb); break;
        case 2: tile4<2, NR, KIND>(cx, m, n0, ws, zb); break;
        case 1: tile4<1, NR, KIND>(cx, m, n0, ws, zb); break;
        default: break;
    }
}

int g_small_nr = 4;  // rows of W per tile when M <= 2 (tuning knob, qbi8_set_small_nr): 2 or 4
int g_pf_tiles = 1;  // small M: prefetch distance in tiles of W rows (tuning knob, qbi8_set_stream; 0: none)
int g_lanes = 1;     // small M: contiguous per-thread lanes (1) or interleaved units of rows (0)

// The block constants of rows [n0, n1) of W into the cache: with cold weights they are small
// separate streams next to the codes (nested NF4: one code byte per block).
inline void prefetch_bytes(const void* p, int64_t bytes) {
    const char* c = (const char*)p;
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
    if (bytes > 0) _mm_prefetch(c + bytes - 1, _MM_HINT_T0);
}

inline void prefetch_consts(const QI8W& w, int64_t n0, int64_t n1) {
    n1 = std::min(n1, w.N);
    if (n0 >= n1) return;
    if (w.kind == KIND_INT4) {
        prefetch_bytes(w.scale + n0 * w.G, (n1 - n0) * w.G * 4);
        if (w.zp) prefetch_bytes(w.zp + n0 * w.G, (n1 - n0) * w.G);
    } else if (w.kind == KIND_CODEBOOK) {
        const int64_t b0 = n0 * w.K / w.bs, b1 = (n1 * w.K + w.bs - 1) / w.bs;
        if (w.ncodes) {
            prefetch_bytes(w.ncodes + b0, b1 - b0);
            prefetch_bytes(w.nabsmax + b0 / w.nbs, ((b1 - 1) / w.nbs - b0 / w.nbs + 1) * 4);
        } else {
            prefetch_bytes(w.absmax + b0, (b1 - b0) * 4);
        }
    }
}

// Block constants of rows [n, n + nr) into wsb (zero points into zbb), ws[r] / zb[r] pointing at row
// r's. Nested codebook constants of consecutive rows are consecutive blocks: decoded in one pass
// (nested_scales); row r's window may read into row r + 1's constants (finite, against zero
// activations) and the last row's padding.
template <int KIND>
QBI8_TARGET inline void tile_scales(const QI8W& w, const RowScales& rs, int64_t n, int nr, bool nested, size_t len,
                                    float* wsb, int32_t* zbb, const float** ws, const int32_t** zb,
                                    const uint8_t* planes) {
    if (nested) {
        nested_scales(w, n, nr, wsb, planes);
        for (int r = 0; r < nr; ++r) ws[r] = wsb + r * (w.K / w.bs);
        return;
    }
    for (int r = 0; r < nr; ++r) {
        row_scales(w, rs, n + r, wsb + r * len, KIND == 2 ? zbb + r * len : nullptr);
        ws[r] = wsb + r * len;
        zb[r] = zbb + r * len;
    }
}

// M <= 2: the only tile heights.
template <int NR, int KIND>
QBI8_TARGET void rows4_small(const Ctx4& cx, int64_t m0, int64_t m1, int64_t n0, const float* const* ws,
                             const int32_t* const* zb) {
    if (m1 - m0 == 2 && cx.sh >= 2) tile4<2, NR, KIND, true>(cx, m0, n0, ws, zb);
    else if (m1 - m0 == 2) tile4<2, NR, KIND>(cx, m0, n0, ws, zb);
    else tile4<1, NR, KIND>(cx, m0, n0, ws, zb);
}

template <int NR, int KIND>
QBI8_TARGET void run4_nr(const Ctx4& cx, const RowScales& rs, int64_t n0, int64_t n1, int64_t m0, int64_t m1) {
    const QI8W& w = *cx.w;
    const size_t len = (size_t)(w.K / 32 + 16);
    float* wsb = scratch<float>(0, NR * len);
    int32_t* zbb = scratch<int32_t>(1, NR * len);
    const float* ws[NR];
    const int32_t* zb[NR];
    const bool small = m1 - m0 <= 2;
    const bool tile_nested = KIND == 0 && rs.compact && w.ncodes != nullptr && is_pow2(w.nbs);
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) {
        if (cx.pf_tiles) prefetch_consts(w, n + cx.pf_tiles * NR, n + (cx.pf_tiles + 1) * NR);
        tile_scales<KIND>(w, rs, n, NR, tile_nested, len, wsb, zbb, ws, zb, cx.nplanes);
        if (small) rows4_small<NR, KIND>(cx, m0, m1, n, ws, zb);
        else rows4_mtile<NR, KIND>(cx, m0, m1, n, ws, zb);
    }
    for (; n < n1; ++n) {
        row_scales(w, rs, n, wsb, KIND == 2 ? zbb : nullptr);
        ws[0] = wsb;
        zb[0] = zbb;
        rows4_mtile<1, KIND>(cx, m0, m1, n, ws, zb);
    }
}

// M = 1 (decode): one row of W at a time, so that each thread reads its rows as one sequential
// stream (rows are contiguous), which the hardware prefetchers follow; tiles of several rows made
// that many interleaved streams and lost 1.1-1.5x with cold weights. Now only the rows after the last
// whole 16 (and all with the knob qbi8_set_gemv_long(0)): run4_16 in groups of 4 rows with a prefetch
// in address order replaced it (gemv16_chunks). The block constants are decoded
// for GEMV_RB rows at once (the nested table is loaded into registers once per GEMV_RB rows).
constexpr int GEMV_RB = 8;

template <int KIND>
QBI8_TARGET void run4_gemv(const Ctx4& cx, const RowScales& rs, int64_t n0, int64_t n1, int64_t m0) {
    const QI8W& w = *cx.w;
    const size_t len = (size_t)(w.K / 32 + 16);
    float* wsb = scratch<float>(0, GEMV_RB * len);
    int32_t* zbb = scratch<int32_t>(1, GEMV_RB * len);
    const float* ws[GEMV_RB];
    const int32_t* zb[GEMV_RB];
    const bool tile_nested = KIND == 0 && rs.compact && w.ncodes != nullptr && is_pow2(w.nbs);
    for (int64_t n = n0; n < n1; n += GEMV_RB) {
        const int64_t nr = std::min<int64_t>(GEMV_RB, n1 - n);
        if (cx.pf_tiles) prefetch_consts(w, n + GEMV_RB, n + 2 * GEMV_RB);
        tile_scales<KIND>(w, rs, n, (int)nr, tile_nested, len, wsb, zbb, ws, zb, cx.nplanes);
        for (int r = 0; r < nr; ++r) tile4<1, 1, KIND>(cx, m0, n + r, ws + r, zb + r);
    }
}

// The row sums of 16 accumulators, each in the tree order of _mm512_reduce_add_ps (halves 256, 128, 64,
// 32 bits; IEEE addition commutes exactly), so bit-identical to reducing each row on its own, for
// about a quarter of the shuffles and a 16-wide store. Returns row r's sum in lane r.
QBI8_TARGET inline __m512 reduce16(const __m512* A) {
    __m512 B[8], C[4], D[2];
    for (int i = 0; i < 8; ++i)  // rows 2i, 2i+1: [lo 256 of each] + [hi 256 of each]
        B[i] = _mm512_add_ps(_mm512_shuffle_f32x4(A[2 * i], A[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_f32x4(A[2 * i], A[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    for (int i = 0; i < 4; ++i)  // 128-bit lane k of C[i]: row 4i + k's 4 partial sums
        C[i] = _mm512_add_ps(_mm512_shuffle_f32x4(B[2 * i], B[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                             _mm512_shuffle_f32x4(B[2 * i], B[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)));
    for (int i = 0; i < 2; ++i)  // lane k: rows 8i + k and 8i + k + 4, two partial sums each
        D[i] = _mm512_add_ps(_mm512_shuffle_ps(C[2 * i], C[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_ps(C[2 * i], C[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    // lane k: rows k, k + 4, k + 8, k + 12; element 4k + p is row k + 4p
    const __m512 E = _mm512_add_ps(_mm512_shuffle_ps(D[0], D[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(D[0], D[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i rows = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(rows, E);
}

// M = 2..5, and M = 1 with short rows (K <= GEMV16_MAX_K): 16 rows of W at a time, in order (one stream, as
// run4_gemv), each x row's 16 sums reduced together (reduce16) and the block constants decoded for 16
// rows (nested: 64) at once; chunk-major within the tile (gemv16_chunks). With a few chunks per row the
// per-row reduction, call and set-up were most of the time. The same operations per output as tile4
// in the same order: bit-identical to run4_gemv / run4_nr. Rows [n0, n1) must be a multiple of 16 (the
// caller runs the rest).
constexpr int64_t GEMV16_MAX_K = 1536;
constexpr int64_t NB16 = 64;  // rows whose nested constants run4_16 decodes at once
// Rows of W per group in gemv16_chunks by rows of x (M = 1: 16), measured at 384..1536 x 384..1536:
// the MR * R accumulators and 2 * MR x vectors stay in the 32 registers. At M = 2..5 with long rows
// (K 2048..5632) these tiles replaced tile4's: hot 1.04-1.3x faster, cold 1.0-1.5x (2 threads).
constexpr int gemv16_rows(int mr) { return mr == 1 ? 16 : mr <= 3 ? 4 : 2; }
// How far ahead (rows of W) run4_16 prefetches the codes, per pf_tiles: about 12 KB, 16 to 64 rows, a
// multiple of 16 (cold, 2 threads, measured at K = 384..5632: 16 rows of K = 384 (3 KB) left 1536x384
// 1.15x slower, 64 rows of K = 1536 1.05x).
inline int64_t pf_rows_ahead(int64_t row_bytes) {
    return std::clamp<int64_t>((12288 / std::max<int64_t>(row_bytes, 1) + 15) / 16 * 16, 16, 64);
}

// run4_16's tile: 16 rows of W from row n against MR rows of x from m0, chunk-major in groups of R rows
// of W (per chunk: x's MR chunks held in registers for the group, each row of the group decoded once for
// the MR rows of x; MR * R independent accumulators). Per output the same operations in the same order
// as tile4 (bit-identical). The block constants of row r at ws0 + r * wstr (zero points at zb0 + r *
// wstr), each row's window read 16 entries wide: every form of them has at least 16 entries of padding
// or further rows after a row's last used one. SPLAT: sh >= 2, one constant per chunk (tile4's lane
// index is all zero), a broadcast; else a permute of the 16-entry load (measured faster than tile4's
// 4-entry broadcast and permute, or two 8-lane broadcasts). HALVES (M = 1, sh = 1: lanes 0-7 and 8-15
// each one constant): the activation scales times the constants by a multiply and a masked multiply
// with broadcast operands, no permute (measured 4-5% faster at M = 1). acc[i][r]: row r's sums
// against row i. The prefetch walks the rows pf_rows_ahead rows on in address order (line s of the group's
// chunk-major steps), into L2: the R interleaved row streams (several in one page) defeat the hardware
// prefetchers, and per-row prefetches into L1 held the fill buffers (M = 1, cold 4096x4096: 1.8x slower
// than run4_gemv; this way 5-30% faster than it, hot 1.2-1.8x; cold short rows 4096x1024 1.6x faster
// than per-row prefetches into L1, M = 2 1.5x).
template <int MR, int R, int KIND, bool SPLAT, bool HALVES>
QBI8_TARGET inline void gemv16_chunks(const Ctx4& cx, int64_t m0, int64_t n, const float* ws0, const int32_t* zb0,
                                      int64_t wstr, __m512 (*acc)[16]) {
    const QI8W& w = *cx.w;
    const Act& a = *cx.a;
    const int64_t nch = a.nch, half = w.K / 2;
    const int sh = cx.sh;
    const __m512i lane_idx = _mm512_srli_epi32(
        _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2), std::min(sh, 2));
    // vpermb reads the low 6 bits of an index: the 16 entries repeated 4 times need no nibble mask
    const __m512i lut64 = _mm512_broadcast_i32x4(_mm_add_epi8(_mm_loadu_si128((const __m128i*)w.lut), _mm_set1_epi8((char)0x80)));
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const int8_t* xr = a.xq + m0 * a.Kp;
    const float* svp = a.sv + m0 * nch * 16;
    const int32_t* cvp = a.cv + m0 * nch * 16;
    const int64_t pft = cx.pf_rows * half;
    // M >= 4 on long rows waits on L2 (cold nf4, K = 4864..5632, 1.05-1.1x slower than tile4's per-row
    // prefetches into L1): the row's chunk 8 on goes into L1 too
    const bool l1pf = MR >= 4 && pft && w.K > GEMV16_MAX_K;
    for (int g = 0; g < 16; g += R) {
        __m512 ac[MR][R];
        for (int i = 0; i < MR; ++i)
            for (int r = 0; r < R; ++r) ac[i][r] = _mm512_setzero_ps();
        const uint8_t* wt = w.codes + (n + g) * half;
        for (int64_t c = 0; c < nch; ++c) {
            __m512i xe[MR], xo[MR];
            for (int i = 0; i < MR; ++i) {
                xe[i] = _mm512_loadu_si512(xr + i * a.Kp + 128 * c);
                xo[i] = _mm512_loadu_si512(xr + i * a.Kp + 128 * c + 64);
            }
            const __mmask64 mk = c < cx.nfull ? ~(__mmask64)0 : cx.tail_mask;
            const int64_t base = (4 * c) >> sh;
            const float* wsc = ws0 + g * wstr + base;
            const int32_t* zbc = KIND == 2 ? zb0 + g * wstr + base : nullptr;
            const uint8_t* p = wt + 64 * c;
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r, p += half, wsc += wstr) {
                if (pft) _mm_prefetch((const char*)(wt + (c * R + r) * 64 + pft), _MM_HINT_T1);
                if (l1pf) _mm_prefetch((const char*)(p + 512), _MM_HINT_T0);
                const __m512i v = _mm512_maskz_loadu_epi8(mk, p);
                __m512i lo, hi;
                if (KIND == 0) {  // vpermb: measured 11% faster here than vpshufb after a nibble mask
                    lo = _mm512_permutexvar_epi8(v, lut64);
                    hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), lut64);
                } else {
                    lo = _mm512_and_si512(v, nib);
                    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                }
                const __m512 wsv = SPLAT ? _mm512_set1_ps(wsc[0]) : _mm512_permutexvar_ps(lane_idx, _mm512_loadu_ps(wsc));
                __m512i zv = _mm512_setzero_si512();
                if (KIND == 2) {
                    zv = SPLAT ? _mm512_set1_epi32(zbc[0]) : _mm512_permutexvar_epi32(lane_idx, _mm512_loadu_si512(zbc));
                    zbc += wstr;
                }
#pragma GCC unroll 8
                for (int i = 0; i < MR; ++i) {
                    const __m512i cv = _mm512_loadu_si512(cvp + (i * nch + c) * 16);
                    __m512i ia = KIND == 2 ? _mm512_madd_epi16(cv, zv) : cv;
                    ia = _mm512_dpbusd_epi32(ia, hi, xe[i]);
                    ia = _mm512_dpbusd_epi32(ia, lo, xo[i]);
                    const __m512 sv = _mm512_loadu_ps(svp + (i * nch + c) * 16);
                    // HALVES: the same lane products, the 8-lane halves' constants broadcast from memory
                    const __m512 pr = HALVES ? _mm512_mask_mul_ps(_mm512_mul_ps(sv, _mm512_set1_ps(wsc[0])), 0xff00, sv,
                                                                  _mm512_set1_ps(wsc[1]))
                                             : _mm512_mul_ps(sv, wsv);
                    ac[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), pr, ac[i][r]);
                }
            }
        }
        for (int i = 0; i < MR; ++i)
            for (int r = 0; r < R; ++r) acc[i][g + r] = ac[i][r];
    }
}

template <int MR, int KIND, int R = gemv16_rows(MR)>
QBI8_TARGET void run4_16(const Ctx4& cx, const RowScales& rs, int64_t n0, int64_t n1, int64_t m0) {
    const QI8W& w = *cx.w;
    const size_t len = (size_t)(w.K / 32 + 16);
    const float* ws[16];
    const int32_t* zb[16];
    const bool tile_nested = KIND == 0 && rs.compact && w.ncodes != nullptr && is_pow2(w.nbs);
    const int64_t K = w.K;
    // Nested constants with no partial chunk (no row reads past its own constants in a lane it uses,
    // so a tile's last row sees the same values whether the next row's or padding follow): decoded for
    // up to NB16 rows at once (the decoder's table set-up was ~40% of its time with 16 rows).
    const bool batch_nested = tile_nested && K % 128 == 0;
    const int64_t nblk = tile_nested ? K / w.bs : 0;
    float* wsb = scratch<float>(0, (batch_nested ? NB16 : 16) * len);
    int32_t* zbb = scratch<int32_t>(1, 16 * len);
    int64_t bn1 = n0;  // batch_nested: rows [.., bn1) decoded, row j's at wsb + (j - bn0) * nblk
    int64_t bn0 = n0;
    // Compact plain constants (int4, non-nested codebook) with no partial chunk: a row's chunks read only
    // its own entries (the 4-entry loads' unused lanes may see the next row's), so rows need no padding.
    const bool flat = rs.compact && K % 128 == 0 && (KIND != 0 || w.ncodes == nullptr);
    for (int64_t n = n0; n + 16 <= n1; n += 16) {
        if (cx.pf_rows) prefetch_consts(w, n + cx.pf_rows, n + cx.pf_rows + 16);
        if (flat) {  // the 16 rows' constants are one contiguous run
            const int64_t per = KIND == 0 ? K / w.bs : w.G;
            std::memcpy(wsb, (KIND == 0 ? w.absmax : w.scale) + n * per, sizeof(float) * (size_t)(16 * per));
            std::memset(wsb + 16 * per, 0, sizeof(float) * 8);
            if (KIND == 2) {
                const uint8_t* z = w.zp + n * per;
                for (int64_t j = 0; j < 16 * per; ++j) zbb[j] = neg16(z[j]);
                std::memset(zbb + 16 * per, 0, sizeof(int32_t) * 8);
            }
            for (int r = 0; r < 16; ++r) ws[r] = wsb + r * per, zb[r] = zbb + r * per;
        } else if (batch_nested) {
            if (n >= bn1) {
                bn0 = n, bn1 = std::min(n1, n + NB16);
                nested_scales(w, bn0, (int)(bn1 - bn0), wsb, cx.nplanes);
            }
            for (int r = 0; r < 16; ++r) ws[r] = wsb + (n - bn0 + r) * nblk;
        } else {
            tile_scales<KIND>(w, rs, n, 16, tile_nested, len, wsb, zbb, ws, zb, cx.nplanes);
        }
        // every form above lays the rows' constants (and zero points) out at one stride
        const int64_t wstr = ws[1] - ws[0];
        const int32_t* z0 = KIND == 2 ? zb[0] : nullptr;
        __m512 acc[MR][16];
        if (cx.sh >= 2) gemv16_chunks<MR, R, KIND, true, false>(cx, m0, n, ws[0], z0, wstr, acc);
        else if (cx.sh == 1 && MR == 1) gemv16_chunks<MR, R, KIND, false, true>(cx, m0, n, ws[0], z0, wstr, acc);
        else gemv16_chunks<MR, R, KIND, false, false>(cx, m0, n, ws[0], z0, wstr, acc);
        for (int i = 0; i < MR; ++i) {
            __m512 sum = reduce16(acc[i]);
            if (cx.bias) sum = _mm512_add_ps(sum, _mm512_loadu_ps(cx.bias + n));
            _mm512_storeu_ps(cx.y + (m0 + i) * w.N + n, sum);
        }
    }
}

int g_gemv_nr = 1;  // rows of W per tile when M = 1 (tuning knob, qbi8_set_small_nr): 1, 2 or 4
int g_gemv16 = 1;  // M <= 5, short rows: run4_16 (tuning knob for A/B, qbi8_set_gemv16)
int g_gemv_long = 4;  // M = 1, K > GEMV16_MAX_K: run4_16 in groups of 4 (or 2) rows; 0: run4_gemv (knob qbi8_set_gemv_long)

template <int KIND>
QBI8_TARGET void run4_tiles(const Ctx4& cx, const RowScales& rs, int64_t n0, int64_t n1, int64_t m0, int64_t m1) {
    if (m1 - m0 == 1 && g_gemv_nr == 1) run4_gemv<KIND>(cx, rs, n0, n1, m0);
    else if (m1 - m0 <= 2 && g_small_nr == 4) run4_nr<4, KIND>(cx, rs, n0, n1, m0, m1);
    else run4_nr<2, KIND>(cx, rs, n0, n1, m0, m1);
}

template <int KIND>
QBI8_TARGET void run4(const Ctx4& cx, const RowScales& rs, int64_t n0, int64_t n1, int64_t m0, int64_t m1) {
    const int64_t m = m1 - m0, n16 = n0 + (n1 - n0) / 16 * 16;
    if (m == 1 && cx.w->K > GEMV16_MAX_K && g_gemv_long && g_gemv_nr == 1 && n16 > n0) {
        if (g_gemv_long == 2) run4_16<1, KIND, 2>(cx, rs, n0, n16, m0);
        else run4_16<1, KIND, 4>(cx, rs, n0, n16, m0);
        if (n16 < n1) run4_gemv<KIND>(cx, rs, n16, n1, m0);
        return;
    }
    if (!g_gemv16 || m > 5 || (m == 1 && (g_gemv_nr != 1 || cx.w->K > GEMV16_MAX_K)) || n16 == n0) {
        run4_tiles<KIND>(cx, rs, n0, n1, m0, m1);
        return;
    }
    switch (m) {
        case 1: run4_16<1, KIND>(cx, rs, n0, n16, m0); break;
        case 2: run4_16<2, KIND>(cx, rs, n0, n16, m0); break;
        case 3: run4_16<3, KIND>(cx, rs, n0, n16, m0); break;
        case 4: run4_16<4, KIND>(cx, rs, n0, n16, m0); break;
        default: run4_16<5, KIND>(cx, rs, n0, n16, m0); break;
    }
    if (n16 < n1) run4_tiles<KIND>(cx, rs, n16, n1, m0, m1);
}

template <int NR>
QBI8_TARGET void rows8_mtile(const Ctx8& cx, int64_t m0, int64_t m1, int64_t n0) {
    int64_t m = m0;
    for (; m + MR_MAX <= m1; m += MR_MAX) tile8<MR_MAX, NR>(cx, m, n0);
    switch (m1 - m) {
        case 5: tile8<5, NR>(cx, m, n0); break;
        case 4: tile8<4, NR>(cx, m, n0); break;
        case 3: tile8<3, NR>(cx, m, n0); break;
        case 2: tile8<2, NR>(cx, m, n0); break;
        case 1: tile8<1, NR>(cx, m, n0); break;
        default: break;
    }
}

template <int NR>
QBI8_TARGET void run8_nr(const Ctx8& cx, int64_t n0, int64_t n1, int64_t m0, int64_t m1) {
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) {
        if (m1 - m0 == 1) tile8<1, NR>(cx, m0, n);
        else if (m1 - m0 == 2) tile8<2, NR>(cx, m0, n);
        else rows8_mtile<NR>(cx, m0, m1, n);
    }
    for (; n < n1; ++n) rows8_mtile<1>(cx, m0, m1, n);
}

QBI8_TARGET void run8(const Ctx8& cx, int64_t n0, int64_t n1, int64_t m0, int64_t m1) {
    if (m1 - m0 == 1 && g_gemv_nr == 1) run8_nr<1>(cx, n0, n1, m0, m1);  // as run4_gemv: one stream
    else if (m1 - m0 <= 2 && g_small_nr == 4) run8_nr<4>(cx, n0, n1, m0, m1);
    else run8_nr<2>(cx, n0, n1, m0, m1);
}

// Work units: (block of rows of W) x (block of rows of x), W-block major.
struct Units {
    int64_t N, M, nb, mb, n_units_n, n_units_m;
    Units(int64_t N_, int64_t M_, int64_t nb_, int64_t mb_) : N(N_), M(M_), nb(nb_), mb(mb_) {
        n_units_n = (N + nb - 1) / nb;
        n_units_m = (M + mb - 1) / mb;
    }
    int64_t count() const { return n_units_n * n_units_m; }
};

int64_t pick_nb(int64_t N, int64_t M, int nthreads) {
    // Enough units for balance on a shared machine, big enough to amortize the per-row set-up.
    int64_t nb = M <= 16 ? 64 : 32;
    while (nb > 8 && (N + nb - 1) / nb < 4 * nthreads) nb /= 2;
    return nb;
}

template <typename F>
void pool_run(int64_t n, int nthreads, F& f) {
    qb_pool_run(n, nthreads, [](void* ctx, int64_t c, int slot) { (*static_cast<F*>(ctx))(c, slot); }, &f);
}

bool cpu_ok() {
    static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
                           __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    return ok;
}

// Which shapes the kernels cover (else the caller runs the reference).
bool shape_ok(const QI8W& w) {
    if (w.K <= 0 || w.N <= 0 || w.K % 32 != 0) return false;
    if (w.kind == KIND_INT8) return true;
    if (w.bs <= 0 || w.bs % 32 != 0) return false;
    if (w.kind == KIND_CODEBOOK) return w.ncodes == nullptr || w.nbs > 0;
    return w.kind == KIND_INT4;
}

RowScales row_scale_form(const QI8W& w) {
    RowScales rs;
    const bool pow2 = is_pow2(w.bs);
    if (w.kind == KIND_INT4) {
        rs.compact = pow2;  // groups start at each row
    } else {
        rs.compact = pow2 && w.K % w.bs == 0;  // blocks do not straddle rows
    }
    rs.sh = rs.compact ? ilog2(w.bs / 32) : 0;
    return rs;
}

QBI8_TARGET void quantize_all(const float* x, Act& a, int32_t off, bool affine, float sv_mul, int nthreads) {
    if (a.M * a.K < 64 * 1024 || nthreads <= 1) {
        quantize_rows(x, a, 0, a.M, off, affine, sv_mul);
        return;
    }
    const int64_t rb = std::max<int64_t>(1, (16 * 1024) / a.K);
    const int64_t nblk = (a.M + rb - 1) / rb;
    auto body = [&](int64_t b, int) { quantize_rows(x, a, b * rb, std::min(a.M, (b + 1) * rb), off, affine, sv_mul); };
    pool_run(nblk, nthreads, body);
}

template <int L>
QBI8_TARGET void run_gemm_kind(const CtxG& cx, const RowScales& rs, int64_t n0, int64_t n1, int64_t g0, int64_t g1,
                               bool affine) {
    const int32_t kind = cx.w->kind;
    if (kind == KIND_INT8) run_gemm<L, 3>(cx, rs, n0, n1, g0, g1);
    else if (kind == KIND_CODEBOOK) run_gemm<L, 0>(cx, rs, n0, n1, g0, g1);
    else if (affine) run_gemm<L, 2>(cx, rs, n0, n1, g0, g1);
    else run_gemm<L, 1>(cx, rs, n0, n1, g0, g1);
}

QBI8_TARGET void gemm_all(const QI8W& w, const Act& a, const float* bias, float* y, int nthreads, bool affine,
                          const uint8_t* planes) {
    ActT t;
    // From 9 rows 16 (idle lanes at M < 16): two groups of 8 measured ~10% slower at M = 12
    t.L = a.M > 8 ? 16 : a.M > 4 ? 8 : a.M > 2 ? 4 : 2;
    t.G = (a.M + t.L - 1) / t.L;
    t.nblk = w.K / 32;
    thread_local std::vector<int32_t> tbuf;
    const size_t vn = (size_t)(t.G * t.nblk * 16), xn = vn * (size_t)(t.L / 2);
    if (tbuf.size() < xn + 2 * vn + 16) tbuf.resize(xn + 2 * vn + 16);
    int32_t* p = (int32_t*)(((uintptr_t)tbuf.data() + 63) & ~(uintptr_t)63);
    t.xT = p;
    t.cT = p + xn;
    t.sT = (float*)(p + xn + vn);
    auto tr = [&](int64_t g, int) { transpose_groups(a, t, g, g + 1); };
    pool_run(t.G, nthreads, tr);

    const RowScales rs = row_scale_form(w);
    const CtxG cx{&w, &t, bias, y, a.M, rs.sh, planes};
    const int64_t gb = std::max<int64_t>(1, 128 / t.L);  // groups per unit: 128 rows of x stay in L2 while W streams
    const Units u(w.N, t.G, pick_nb(w.N, a.M, nthreads), gb);
    auto body = [&](int64_t i, int) {
        const int64_t in = i / u.n_units_m, im = i % u.n_units_m;
        const int64_t n0 = in * u.nb, n1 = std::min(w.N, n0 + u.nb);
        const int64_t g0 = im * u.mb, g1 = std::min(t.G, g0 + u.mb);
        switch (t.L) {
            case 16: run_gemm_kind<16>(cx, rs, n0, n1, g0, g1, affine); break;
            case 8: run_gemm_kind<8>(cx, rs, n0, n1, g0, g1, affine); break;
            case 4: run_gemm_kind<4>(cx, rs, n0, n1, g0, g1, affine); break;
            default: run_gemm_kind<2>(cx, rs, n0, n1, g0, g1, affine); break;
        }
    };
    pool_run(u.count(), nthreads, body);
}

// Small M: the rows of W in one contiguous lane per thread, so that each thread streams one long
// contiguous range (the hardware prefetchers stay trained; interleaved units made each thread's
// stream jump). A lane is walked in units from its front by its owner; a thread done with its own
// lane takes units from the BACK of the others' (a descheduled thread's rows still get done, and
// both threads keep contiguous streams). front/back packed in one 64-bit word, claimed with CAS.
class Lanes {
  public:
    Lanes(int64_t N, int n, int64_t unit) : n_(n), unit_(unit), st_(new std::atomic<uint64_t>[n]) {
        for (int l = 0; l < n; ++l) {
            const int64_t a = N * l / n / 4 * 4, b = l + 1 == n ? N : N * (l + 1) / n / 4 * 4;
            st_[l].store(((uint64_t)a << 32) | (uint64_t)b, std::memory_order_relaxed);
        }
    }
    int count() const { return n_; }
    // Next rows [a, b) for the thread that started on lane `own`; false when every lane is done.
    bool next(int own, int64_t& a, int64_t& b) {
        for (int i = 0; i < n_; ++i) {
            const int l = (own + i) % n_;
            uint64_t v = st_[l].load(std::memory_order_relaxed);
            for (;;) {
                const int64_t f = (int64_t)(v >> 32), e = (int64_t)(v & 0xffffffffu);
                if (f >= e) break;
                uint64_t nv;
                if (i == 0) {
                    a = f, b = std::min(e, f + unit_);
                    nv = ((uint64_t)b << 32) | (uint64_t)e;
                } else {
                    b = e, a = std::max(f, e - unit_);
                    nv = ((uint64_t)f << 32) | (uint64_t)a;
                }
                if (st_[l].compare_exchange_weak(v, nv, std::memory_order_relaxed)) return true;
            }
        }
        return false;
    }

  private:
    int n_;
    int64_t unit_;
    std::unique_ptr<std::atomic<uint64_t>[]> st_;
};

// The activations' buffers of one call in a per-thread allocation (64-byte aligned pieces), followed by
// `nplanes` nested-table plane sets (NPLANES_BYTES each) at *planes.
Act act_buffers(const QI8W& w, int64_t M, int64_t nplanes, uint8_t** planes) {
    const bool four = w.kind != KIND_INT8;
    Act a;
    a.M = M;
    a.K = w.K;
    a.ch = four ? 128 : 64;
    a.Kp = (w.K + a.ch - 1) / a.ch * a.ch;
    a.nch = a.Kp / a.ch;
    const size_t qbytes = (size_t)(M * a.Kp), vbytes = (size_t)(M * a.nch * 16 * 4);
    thread_local std::vector<uint8_t> buf;
    const size_t need = qbytes + 2 * vbytes + (size_t)M + 256 + (size_t)nplanes * NPLANES_BYTES;
    if (buf.size() < need) buf.resize(need);
    uint8_t* p = (uint8_t*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
    a.xq = (int8_t*)p;
    p += (qbytes + 63) / 64 * 64;
    a.sv = (float*)p;
    p += vbytes;
    a.cv = (int32_t*)p;
    p += vbytes;
    *planes = p;
    a.bad = p + nplanes * NPLANES_BYTES;
    return a;
}

// x quantized into a for weights of w's kind; returns the rows of x holding NaN/Inf.
QBI8_TARGET int64_t quantize_for(const QI8W& w, const float* x, Act& a, int nthreads) {
    const bool affine = w.kind == KIND_INT4 && w.zp != nullptr;
    const int32_t off = w.kind == KIND_INT4 ? 8 : 128;
    quantize_all(x, a, off, affine, w.kind == KIND_CODEBOOK ? w.inv_c : 1.0f, nthreads);
    int64_t nbad = 0;
    for (int64_t m = 0; m < a.M; ++m) nbad += a.bad[m];
    return nbad;
}

bool has_nested(const QI8W& w) { return w.kind == KIND_CODEBOOK && w.ncodes != nullptr; }

Ctx4 ctx4(const QI8W& w, const Act& a, const float* bias, float* y, const RowScales& rs, const uint8_t* planes) {
    const int64_t tail = w.K % a.ch;
    Ctx4 cx{&w, &a, bias, y, rs.sh, tail ? (__mmask64)((uint64_t(1) << (tail / 2)) - 1) : (__mmask64)0, w.K / 128,
            g_pf_tiles, planes};
    cx.pf_rows = (int64_t)g_pf_tiles * pf_rows_ahead(w.K / 2);
    return cx;
}

Ctx8 ctx8(const QI8W& w, const Act& a, const float* bias, float* y) {
    const int64_t tail = w.K % a.ch;
    return Ctx8{&w, &a, bias, y, tail ? (__mmask64)((uint64_t(1) << tail) - 1) : (__mmask64)0, w.K / 64, g_pf_tiles};
}

// Rows [n0, n1) of W against all M rows of x (the small-M kernels).
QBI8_TARGET void run_small(const Ctx4* c4, const Ctx8* c8, const RowScales& rs, int64_t n0, int64_t n1, int64_t M) {
    if (c8 != nullptr) {
        run8(*c8, n0, n1, 0, M);
        return;
    }
    const QI8W& w = *c4->w;
    if (w.kind == KIND_CODEBOOK) run4<0>(*c4, rs, n0, n1, 0, M);
    else if (w.zp != nullptr) run4<2>(*c4, rs, n0, n1, 0, M);
    else run4<1>(*c4, rs, n0, n1, 0, M);
}

QBI8_TARGET int64_t linear_slab(const QI8W& w, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
    const bool four = w.kind != KIND_INT8;
    const bool affine = w.kind == KIND_INT4 && w.zp != nullptr;
    uint8_t* planes = nullptr;
    Act a = act_buffers(w, M, 1, &planes);
    if (has_nested(w)) nested_planes(w, planes);
    else planes = nullptr;
    const int64_t nbad = quantize_for(w, x, a, nthreads);

    if (M >= (four ? g_gemm_min_m : g_gemm_min_m8)) {
        gemm_all(w, a, bias, y, nthreads, affine, planes);
        return nbad;
    }
    const int64_t mb = 64;
    const Units u(w.N, M, pick_nb(w.N, M, nthreads), mb);
    const bool lanes = g_lanes && M <= mb && nthreads > 1 && w.N <= 0x7fffffff;
    // 4-bit: a lane is taken 64 rows at a time (run4_16 then decodes 64 rows' nested constants at once,
    // and a unit's set-up is shared by more rows): hot 1.05-1.35x faster than 16 at M = 1..4 on K <= 1536.
    Lanes ln(w.N, lanes ? std::max(1, std::min<int>(nthreads, (int)((w.N + 15) / 16))) : 1, four ? 64 : 16);
    if (four) {
        const RowScales rs = row_scale_form(w);
        const Ctx4 cx = ctx4(w, a, bias, y, rs, planes);
        auto lane_body = [&](int64_t l, int) {
            int64_t n0, n1;
            while (ln.next((int)l, n0, n1)) run_small(&cx, nullptr, rs, n0, n1, M);
        };
        if (lanes) {
            pool_run(ln.count(), nthreads, lane_body);
            return nbad;
        }
        auto body = [&](int64_t t, int) {
            const int64_t in = t / u.n_units_m, im = t % u.n_units_m;
            const int64_t n0 = in * u.nb, n1 = std::min(w.N, n0 + u.nb);
            const int64_t m0 = im * u.mb, m1 = std::min(M, m0 + u.mb);
            if (w.kind == KIND_CODEBOOK) run4<0>(cx, rs, n0, n1, m0, m1);
            else if (affine) run4<2>(cx, rs, n0, n1, m0, m1);
            else run4<1>(cx, rs, n0, n1, m0, m1);
        };
        pool_run(u.count(), nthreads, body);
    } else {
        const Ctx8 cx = ctx8(w, a, bias, y);
        auto lane_body = [&](int64_t l, int) {
            int64_t n0, n1;
            while (ln.next((int)l, n0, n1)) run_small(nullptr, &cx, RowScales{}, n0, n1, M);
        };
        if (lanes) {
            pool_run(ln.count(), nthreads, lane_body);
            return nbad;
        }
        auto body = [&](int64_t t, int) {
            const int64_t in = t / u.n_units_m, im = t % u.n_units_m;
            const int64_t n0 = in * u.nb, n1 = std::min(w.N, n0 + u.nb);
            const int64_t m0 = im * u.mb, m1 = std::min(M, m0 + u.mb);
            run8(cx, n0, n1, m0, m1);
        };
        pool_run(u.count(), nthreads, body);
    }
    return nbad;
}

}  // namespace

extern "C" {
// One member of a group call (qbi8_linear_group); mirrors qbackend.kernels.cpu.int8_compute.QI8Member.
struct QI8Member {
    const QI8W* w;
    const float* bias;    // null: none
    const void* table;    // the code table w's int8 image was made from (null: none to check)
    const void* saved;    // its bytes then
    int64_t table_bytes;
};
}

namespace {

// Whether members' weights (of one K) take the same quantized activations (kind, int4 zero points,
// table scale).
bool same_activations(const QI8W& a, const QI8W& b) {
    return a.kind == b.kind && (a.zp != nullptr) == (b.zp != nullptr) &&
           (a.kind != KIND_CODEBOOK || a.inv_c == b.inv_c);
}

// Whether the code table (null: none) no longer holds the bytes a descriptor's int8 image was made from.
bool table_changed(const void* table, const void* saved, int64_t bytes) {
    return table != nullptr && std::memcmp(table, saved, (size_t)bytes) != 0;
}

std::atomic<int64_t> g_group_regions{0};  // group_small calls (tests: the one-region path ran)

// Small M, members taking the same activations: x quantized once, and the members' rows (one after
// another, as one N) walked in the lanes of one thread-pool region. Each output row of W is computed by
// the same kernels as a single call's (results bit-identical; tile boundaries never change a value).
QBI8_TARGET int64_t group_small(const QI8Member* ms, int64_t count, const float* x, int64_t M, float* y,
                                int nthreads) {
    g_group_regions.fetch_add(1, std::memory_order_relaxed);
    const QI8W& w0 = *ms[0].w;
    const bool four = w0.kind != KIND_INT8;
    uint8_t* planes = nullptr;
    Act a = act_buffers(w0, M, count, &planes);
    const int64_t nbad = quantize_for(w0, x, a, nthreads);
    if (nbad) return nbad;
    std::vector<Ctx4> c4(four ? count : 0);
    std::vector<Ctx8> c8(four ? 0 : count);
    std::vector<RowScales> rs(count);
    std::vector<int64_t> start(count + 1);
    int64_t total = 0;
    for (int64_t i = 0; i < count; ++i) {
        const QI8W& w = *ms[i].w;
        start[i] = total;
        uint8_t* pl = nullptr;
        if (has_nested(w)) {
            pl = planes + i * NPLANES_BYTES;
            nested_planes(w, pl);
        }
        rs[i] = row_scale_form(w);
        if (four) c4[i] = ctx4(w, a, ms[i].bias, y + M * total, rs[i], pl);
        else c8[i] = ctx8(w, a, ms[i].bias, y + M * total);
        total += w.N;
    }
    start[count] = total;
    const int nl = nthreads > 1 ? std::max(1, std::min<int>(nthreads, (int)((total + 15) / 16))) : 1;
    Lanes ln(total, nl, four ? 64 : 16);
    auto lane_body = [&](int64_t l, int) {
        int64_t n0, n1;
        while (ln.next((int)l, n0, n1)) {
            for (int64_t i = 0; i < count; ++i) {
                const int64_t lo = std::max(n0, start[i]), hi = std::min(n1, start[i + 1]);
                if (lo < hi) run_small(four ? &c4[i] : nullptr, four ? nullptr : &c8[i], rs[i], lo - start[i],
                                       hi - start[i], M);
            }
        }
    };
    if (nl > 1) pool_run(nl, nthreads, lane_body);
    else lane_body(0, 0);
    return 0;
}

}  // namespace

extern "C" {

int qbi8_supported(const QI8W* w) { return cpu_ok() && shape_ok(*w); }

// Rows of x from which the GEMM kernel runs (benchmarks tune it).
void qbi8_set_gemm_min_m(int64_t m4, int64_t m8) { g_gemm_min_m = m4, g_gemm_min_m8 = m8; }
int64_t qbi8_gemm_min_m(int eight) { return eight ? g_gemm_min_m8 : g_gemm_min_m; }

// Rows of W per tile when M <= 2 (benchmarks tune it): 1 (M = 1 only; M = 2 then takes 4), 2 or 4.
void qbi8_set_small_nr(int nr) { g_gemv_nr = nr, g_small_nr = nr == 1 ? 4 : nr; }

// M <= 5 on short rows: 16 rows of W at a time (1, default) or the tiles (0); for A/B measurements.
void qbi8_set_gemv16(int on) { g_gemv16 = on; }
// M = 1 on long rows: run4_16 in groups of 4 (default) or 2 rows, or run4_gemv (0); for A/B measurements.
void qbi8_set_gemv_long(int rows) { g_gemv_long = rows; }

// Small-M streaming (benchmarks tune it): prefetch distance in tiles (0: none), contiguous lanes (0/1).
void qbi8_set_stream(int pf_tiles, int lanes) { g_pf_tiles = pf_tiles, g_lanes = lanes; }

// y[M, N] = x[M, K] @ W^T (+ bias) in the "int8" compute mode. Returns the number of rows of x
// holding NaN/Inf (their y rows are garbage: the caller recomputes them in fp32), or -1 if the
// kernels do not cover this CPU/shape (nothing computed).
int64_t qbi8_linear(const QI8W* wp, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
    const QI8W& w = *wp;
    if (!(cpu_ok() && shape_ok(w))) return -1;
    // Slabs of rows bound the activation buffer (about 2 bytes per element of x).
    const int64_t slab = std::max<int64_t>(64, (int64_t(8) << 20) / w.K);
    int64_t nbad = 0;
    for (int64_t m0 = 0; m0 < M; m0 += slab)
        nbad += linear_slab(w, x + m0 * w.K, std::min(slab, M - m0), bias, y + m0 * w.N, nthreads);
    return nbad;
}

// The prepared call (fast_path.py) in one foreign call: first whether the code table (table_bytes at
// table; none: null) still holds the bytes its int8 image in w was made from (saved), then qbi8_linear,
// then whether y is finite. Returns 0 when y is complete and finite; else nonzero and the caller runs
// the regular kernel: -2 the table changed (prepare again), -3 y not finite, else qbi8_linear's code.
int64_t qbi8_linear_prepared(const QI8W* wp, const float* x, int64_t M, const float* bias, float* y, int nthreads,
                             const void* table, const void* saved, int64_t table_bytes) {
    if (table_changed(table, saved, table_bytes)) return -2;
    const int64_t rc = qbi8_linear(wp, x, M, bias, y, nthreads);
    if (rc != 0) return rc;
    return qb_all_finite(y, M * wp->N) ? 0 : -3;
}

// y = the outputs x @ W_i^T (+ bias_i) of `count` members reading the same x, each [M, N_i] row-major, one
// after another (member i at y + M * (N_0 + ... + N_{i-1})): what qbi8_linear_prepared computes for each,
// in one foreign call. At small M with members of one weight kind (q/k/v, gate/up at decode) x is
// quantized once and one thread-pool region runs them all. Returns 0 when y is complete and finite;
// else nonzero and the caller runs each member's own call: -1 a weight the kernels do not cover or a K
// differing from the first's, -2 a member's code table changed, -3 y not finite, > 0 rows of x with NaN/Inf.
int64_t qbi8_linear_group(const QI8Member* ms, int64_t count, const float* x, int64_t M, float* y, int nthreads) {
    if (count <= 0 || M <= 0) return -1;
    const QI8W& w0 = *ms[0].w;
    bool together = M <= 64 && M < (w0.kind == KIND_INT8 ? g_gemm_min_m8 : g_gemm_min_m);
    int64_t total = 0;
    for (int64_t i = 0; i < count; ++i) {
        const QI8W& w = *ms[i].w;
        if (!(cpu_ok() && shape_ok(w)) || w.K != w0.K) return -1;
        if (table_changed(ms[i].table, ms[i].saved, ms[i].table_bytes)) return -2;
        together = together && same_activations(w0, w);
        total += w.N;
    }
    if (together) {
        const int64_t rc = group_small(ms, count, x, M, y, nthreads);
        if (rc != 0) return rc;
    } else {
        int64_t off = 0;
        for (int64_t i = 0; i < count; ++i) {
            const int64_t rc = qbi8_linear(ms[i].w, x, M, ms[i].bias, y + M * off, nthreads);
            if (rc != 0) return rc;
            off += ms[i].w->N;
        }
    }
    return qb_all_finite(y, M * total) ? 0 : -3;
}

// How many group calls ran as one region (x quantized once) since the library loaded (tests).
int64_t qbi8_group_regions() { return g_group_regions.load(std::memory_order_relaxed); }

}  // extern "C"
