// The kernels of the "int16" compute mode at one vector width; included twice by int16_compute.cpp:
// QBI16_WIDE 1 (namespace qbi16_avx512: zmm, AVX512-VNNI vpdpwssd) and 0 (namespace qbi16_avx2: ymm,
// vpmaddwd + vpaddd). QBI16_NS names the namespace and QBI16_ATTR the target attribute each function
// carries, so each body only contains its own instructions. No include guard: included on purpose twice.
//
// Numerics (the reference's "int16"): x quantized per row and per block of Bq along K to int16 (scale
// = amax / 32767, true division, round half to even, clamp +-32767), int8 weights sign-extended to
// int16 in registers; the exact products of one accumulation block (Ba <= 512 elements of K:
// |sum| <= 512 * 32767 * 128 < 2^31) summed in int32, converted to fp32 and scaled by
// (activation block scale * weight row scale).

namespace QBI16_NS {

#if QBI16_WIDE
typedef __m512i VI;
typedef __m512 VF;
constexpr int L = 16;  // int32 lanes per vector
QBI16_ATTR inline VI vzero() { return _mm512_setzero_si512(); }
QBI16_ATTR inline VF fzero() { return _mm512_setzero_ps(); }
QBI16_ATTR inline VI loadi(const void* p) { return _mm512_loadu_si512(p); }
QBI16_ATTR inline void storei(void* p, VI v) { _mm512_storeu_si512(p, v); }
// 2L int8 weights sign-extended to 2L int16
QBI16_ATTR inline VI sext(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
QBI16_ATTR inline VI dp(VI acc, VI a, VI b) { return _mm512_dpwssd_epi32(acc, a, b); }
QBI16_ATTR inline VI bcast(const int16_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
QBI16_ATTR inline VF cvt(VI a) { return _mm512_cvtepi32_ps(a); }
QBI16_ATTR inline VF fset(float v) { return _mm512_set1_ps(v); }
QBI16_ATTR inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
QBI16_ATTR inline VF fmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
QBI16_ATTR inline VF loadf(const float* p) { return _mm512_loadu_ps(p); }
QBI16_ATTR inline void storef(float* p, VF v) { _mm512_storeu_ps(p, v); }
QBI16_ATTR inline float hsum(VF v) { return _mm512_reduce_add_ps(v); }
QBI16_ATTR inline float hmax(VF v) { return _mm512_reduce_max_ps(v); }
QBI16_ATTR inline VF fabsv(VF v) { return _mm512_abs_ps(v); }
QBI16_ATTR inline VF fmaxv(VF a, VF b) { return _mm512_max_ps(a, b); }
// not (|x| <= FLT_MAX): NaN or +-Inf in any lane
QBI16_ATTR inline bool nonfinite(VF absv) { return _mm512_cmp_ps_mask(absv, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ) != 0; }
// L floats -> L int16 at q: round(v / s) half to even, clamped to +-32767
QBI16_ATTR inline void quant_store(int16_t* q, VF v, VF s) {
    __m512i r = _mm512_cvt_roundps_epi32(_mm512_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_epi32(_mm512_max_epi32(r, _mm512_set1_epi32(-32767)), _mm512_set1_epi32(32767));
    _mm256_storeu_si256((__m256i*)q, _mm512_cvtepi32_epi16(r));
}
constexpr int GEMM_NR = 4, GEMM_MV = 4;  // 16 int32 accumulators + 4 x vectors + 1 broadcast
#else
typedef __m256i VI;
typedef __m256 VF;
constexpr int L = 8;
QBI16_ATTR inline VI vzero() { return _mm256_setzero_si256(); }
QBI16_ATTR inline VF fzero() { return _mm256_setzero_ps(); }
QBI16_ATTR inline VI loadi(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
QBI16_ATTR inline void storei(void* p, VI v) { _mm256_storeu_si256((__m256i*)p, v); }
QBI16_ATTR inline VI sext(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
QBI16_ATTR inline VI dp(VI acc, VI a, VI b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
QBI16_ATTR inline VI bcast(const int16_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
QBI16_ATTR inline VF cvt(VI a) { return _mm256_cvtepi32_ps(a); }
QBI16_ATTR inline VF fset(float v) { return _mm256_set1_ps(v); }
QBI16_ATTR inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
QBI16_ATTR inline VF fmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
QBI16_ATTR inline VF loadf(const float* p) { return _mm256_loadu_ps(p); }
QBI16_ATTR inline void storef(float* p, VF v) { _mm256_storeu_ps(p, v); }
QBI16_ATTR inline float hsum(VF v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
QBI16_ATTR inline float hmax(VF v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
QBI16_ATTR inline VF fabsv(VF v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
QBI16_ATTR inline VF fmaxv(VF a, VF b) { return _mm256_max_ps(a, b); }
QBI16_ATTR inline bool nonfinite(VF absv) {
    return _mm256_movemask_ps(_mm256_cmp_ps(absv, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ)) != 0;
}
QBI16_ATTR inline void quant_store(int16_t* q, VF v, VF s) {
    // cvtps rounds in the current mode (round to nearest even)
    __m256i r = _mm256_cvtps_epi32(_mm256_div_ps(v, s));
    r = _mm256_min_epi32(_mm256_max_epi32(r, _mm256_set1_epi32(-32767)), _mm256_set1_epi32(32767));
    _mm_storeu_si128((__m128i*)q, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packs_epi32(r, r), 0xD8)));
}
constexpr int GEMM_NR = 3, GEMM_MV = 3;
#endif
constexpr int KV = 2 * L;  // int16 elements of K per vector

// Quantizes rows [m0, m1) of x into a (row-major int16, zero-padded to Kp; scales per accumulation block).
QBI16_ATTR void quantize_rows(const float* x, const Act16& a, int64_t m0, int64_t m1) {
    const int64_t K = a.K, Bq = a.Bq;
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr = x + m * K;
        int16_t* qr = a.xq + m * a.Kp;
        bool bad = false;
        for (int64_t q0 = 0; q0 < K; q0 += Bq) {
            const int64_t q1 = std::min(K, q0 + Bq);
            VF mx = fzero();
            int64_t k = q0;
            for (; k + L <= q1; k += L) {
                const VF v = fabsv(loadf(xr + k));
                bad |= nonfinite(v);
                mx = fmaxv(mx, v);
            }
            float amax = hmax(mx);
            for (; k < q1; ++k) {
                const float v = std::fabs(xr[k]);
                bad |= !(v <= FLT_MAX);
                amax = std::max(amax, v);
            }
            const float s = amax / 32767.0f;
            k = q0;
            if (s > 0.0f) {
                const VF sv = fset(s);
                for (; k + L <= q1; k += L) quant_store(qr + k, loadf(xr + k), sv);
                for (; k < q1; ++k) {
                    const float r = std::nearbyint(xr[k] / s);  // half to even in the default rounding mode
                    qr[k] = (int16_t)(r != r ? -32767 : std::min(32767.0f, std::max(-32767.0f, r)));
                }
            } else {
                std::memset(qr + q0, 0, sizeof(int16_t) * (size_t)(q1 - q0));
            }
            for (int64_t b = q0 / a.Ba; b * a.Ba < q1; ++b) a.sa[m * a.nab + b] = s;
        }
        std::memset(qr + K, 0, sizeof(int16_t) * (size_t)(a.Kp - K));
        a.bad[m] = bad;
    }
}

// ---- small M: MR rows of x times NR rows of W, lanes along K -----------------------------------
//
// The int32 accumulators stay in registers for a whole accumulation block (up to 16 vectors of K);
// the fp32 sums live in a small stack array, touched once per block. All MR <= GEMV_MR_MAX rows of
// x share each sign-extended weight vector, so W is read once per GEMV_MR_MAX rows of x.

// Blocks [b0, b1) of K; first: write y (+ bias), else add to it.
template <int MR, int NR>
QBI16_ATTR void gemv_tile(const W16& w, const Act16& a, const float* bias, float* y, int64_t m0, int64_t n0,
                          int64_t b0, int64_t b1, bool first) {
    const int64_t K = w.K;
    const int8_t* wr[NR];
    float wsr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = w.codes + (n0 + r) * K, wsr[r] = w.scale[n0 + r];
    alignas(64) float acc[MR][NR][L];
    for (int i = 0; i < MR; ++i)
        for (int r = 0; r < NR; ++r) storef(acc[i][r], fzero());
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t k0 = b * a.Ba, k1 = std::min(K, k0 + a.Ba);
        VI ia[MR][NR];
        for (int i = 0; i < MR; ++i)
            for (int r = 0; r < NR; ++r) ia[i][r] = vzero();
        for (int64_t k = k0; k < k1; k += KV) {
            VI wv[NR];
            if (k + KV <= K) {
                // W streams from DRAM/L3 at small M: prefetch 2 KiB ahead (as the fp32 int8 GEMV does)
                if ((k & 63) == 0)
                    for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(wr[r] + k + 2048), _MM_HINT_T0);
                for (int r = 0; r < NR; ++r) wv[r] = sext(wr[r] + k);
            } else {  // the row's last partial vector: zero-padded copy (x is zero-padded too)
                alignas(64) int8_t t[KV];
                for (int r = 0; r < NR; ++r) {
                    std::memset(t, 0, sizeof t);
                    std::memcpy(t, wr[r] + k, (size_t)(K - k));
                    wv[r] = sext(t);
                }
            }
            for (int i = 0; i < MR; ++i) {
                const VI xv = loadi(a.xq + (m0 + i) * a.Kp + k);
                for (int r = 0; r < NR; ++r) ia[i][r] = dp(ia[i][r], xv, wv[r]);
            }
        }
        for (int i = 0; i < MR; ++i) {
            const float s = a.sa[(m0 + i) * a.nab + b];
            for (int r = 0; r < NR; ++r)
                storef(acc[i][r], fmadd(cvt(ia[i][r]), fset(s * wsr[r]), loadf(acc[i][r])));
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int r = 0; r < NR; ++r) {
            float* out = y + (m0 + i) * w.N + n0 + r;
            const float v = hsum(loadf(acc[i][r]));
            if (!first) *out += v;
            else *out = bias ? v + bias[n0 + r] : v;
        }
}

// Rows of W per tile for MR rows of x: MR * NR int32 accumulators + NR weight vectors + 1 fit the registers.
#if QBI16_WIDE
constexpr int GEMV_MR_MAX = 8;
constexpr int gemv_nr(int mr) { return mr <= 2 ? 8 : mr <= 4 ? 4 : 2; }
#else
constexpr int GEMV_MR_MAX = 4;
constexpr int gemv_nr(int mr) { return mr <= 2 ? 4 : 2; }
#endif

// K is walked in slices of about 1024 elements (whole accumulation blocks) so that the slice of
// the MR rows of x stays in L1 while the rows of W stream past it.
template <int MR>
QBI16_ATTR void gemv_n(const W16& w, const Act16& a, const float* bias, float* y, int64_t m0, int64_t n0, int64_t n1) {
    constexpr int NR = gemv_nr(MR);
    const int64_t bps = std::max<int64_t>(1, 1024 / a.Ba);  // blocks per slice
    if (MR == 1) {
        // One row of x (decode): x is small and stays in L1 anyway, so the rows of W are read one after
        // the other, whole: one sequential stream that the hardware prefetchers follow (slices of
        // NR interleaved rows made 2 * NR short streams). The same slices per row: the same sums.
        for (int64_t n = n0; n < n1; ++n)
            for (int64_t b0 = 0; b0 < a.nab; b0 += bps)
                gemv_tile<1, 1>(w, a, bias, y, m0, n, b0, std::min(a.nab, b0 + bps), b0 == 0);
        return;
    }
    for (int64_t b0 = 0; b0 < a.nab; b0 += bps) {
        const int64_t b1 = std::min(a.nab, b0 + bps);
        int64_t n = n0;
        for (; n + NR <= n1; n += NR) gemv_tile<MR, NR>(w, a, bias, y, m0, n, b0, b1, b0 == 0);
        for (; n < n1; ++n) gemv_tile<MR, 1>(w, a, bias, y, m0, n, b0, b1, b0 == 0);
    }
}

QBI16_ATTR void gemv_range(const W16& w, const Act16& a, const float* bias, float* y, int64_t m0, int64_t m1,
                           int64_t n0, int64_t n1) {
    for (int64_t m = m0; m < m1; m += GEMV_MR_MAX) {
        switch (std::min<int64_t>(GEMV_MR_MAX, m1 - m)) {
#if QBI16_WIDE
            case 8: gemv_n<8>(w, a, bias, y, m, n0, n1); break;
            case 7: gemv_n<7>(w, a, bias, y, m, n0, n1); break;
            case 6: gemv_n<6>(w, a, bias, y, m, n0, n1); break;
            case 5: gemv_n<5>(w, a, bias, y, m, n0, n1); break;
#endif
            case 4: gemv_n<4>(w, a, bias, y, m, n0, n1); break;
            case 3: gemv_n<3>(w, a, bias, y, m, n0, n1); break;
            case 2: gemv_n<2>(w, a, bias, y, m, n0, n1); break;
            default: gemv_n<1>(w, a, bias, y, m, n0, n1); break;
        }
    }
}

// ---- larger M: lanes along M ---------------------------------------------------------------------
//
// x transposed once per call into groups of L rows, one int32 lane = a pair of int16 (k, k+1) of
// one row: xT[group][pair][L]; block scales sT[group][block][L]. Rows of W sign-extended to int16
// per tile (a small per-thread buffer, zero-padded to Kp) and each weight pair broadcast against
// the L-row vectors: an int32 lane sums a whole accumulation block of one row of x.

struct ActT16 {
    int64_t G = 0, np = 0, nab = 0;
    int32_t* xT = nullptr;
    float* sT = nullptr;
};

QBI16_ATTR void transpose_groups(const Act16& a, const ActT16& t, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t rows = std::min<int64_t>(L, a.M - L * g);
        for (int64_t l = 0; l < L; ++l) {
            int32_t* xo = t.xT + g * t.np * L + l;
            float* so = t.sT + g * t.nab * L + l;
            if (l < rows) {
                const int64_t m = L * g + l;
                const int16_t* src = a.xq + m * a.Kp;
                for (int64_t p = 0; p < t.np; ++p) std::memcpy(xo + p * L, src + 2 * p, 4);
                for (int64_t b = 0; b < t.nab; ++b) so[b * L] = a.sa[m * a.nab + b];
            } else {
                for (int64_t p = 0; p < t.np; ++p) xo[p * L] = 0;
                for (int64_t b = 0; b < t.nab; ++b) so[b * L] = 0.0f;
            }
        }
    }
}

template <int NR, int MV>
QBI16_ATTR void gemm_tile(const W16& w, const ActT16& t, int64_t Ba, const int16_t* const* d, const float* ws,
                          const float* bias, float* y, int64_t M, int64_t n0, int64_t g0) {
    alignas(64) float acc[NR][MV][L];
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < MV; ++v) storef(acc[r][v], fzero());
    const int64_t ppb = Ba / 2;
    for (int64_t b = 0; b < t.nab; ++b) {
        const int64_t p0 = b * ppb, p1 = std::min(t.np, p0 + ppb);
        VI ia[NR][MV];
        for (int r = 0; r < NR; ++r)
            for (int v = 0; v < MV; ++v) ia[r][v] = vzero();
        const int32_t* xg = t.xT + g0 * t.np * L;
        for (int64_t p = p0; p < p1; ++p) {
            VI xv[MV];
            for (int v = 0; v < MV; ++v) xv[v] = loadi(xg + (v * t.np + p) * L);
            for (int r = 0; r < NR; ++r) {
                const VI wb = bcast(d[r] + 2 * p);
                for (int v = 0; v < MV; ++v) ia[r][v] = dp(ia[r][v], xv[v], wb);
            }
        }
        for (int v = 0; v < MV; ++v) {
            const VF st = loadf(t.sT + ((g0 + v) * t.nab + b) * L);
            for (int r = 0; r < NR; ++r)
                storef(acc[r][v], fmadd(cvt(ia[r][v]), fmul(st, fset(ws[r])), loadf(acc[r][v])));
        }
    }
    // NR consecutive outputs per row of y (the rows of y are N apart: one line per row, not per value)
    float bn[NR];
    for (int r = 0; r < NR; ++r) bn[r] = bias ? bias[n0 + r] : 0.0f;
    for (int v = 0; v < MV; ++v) {
        const int64_t mbase = L * (g0 + v);
        const int64_t cnt = std::min<int64_t>(L, M - mbase);
        for (int64_t l = 0; l < cnt; ++l) {
            float* out = y + (mbase + l) * w.N + n0;
            for (int r = 0; r < NR; ++r) out[r] = acc[r][v][l] + bn[r];
        }
    }
}

template <int NR>
QBI16_ATTR void gemm_groups(const W16& w, const ActT16& t, int64_t Ba, const int16_t* const* d, const float* ws,
                            const float* bias, float* y, int64_t M, int64_t n0, int64_t g0, int64_t g1) {
    int64_t g = g0;
    for (; g + GEMM_MV <= g1; g += GEMM_MV) gemm_tile<NR, GEMM_MV>(w, t, Ba, d, ws, bias, y, M, n0, g);
    for (; g < g1; ++g) gemm_tile<NR, 1>(w, t, Ba, d, ws, bias, y, M, n0, g);
}

QBI16_ATTR void gemm_range(const W16& w, const ActT16& t, int64_t Ba, const float* bias, float* y, int64_t M,
                           int64_t n0, int64_t n1, int64_t g0, int64_t g1, int64_t Kp) {
    const size_t row = (size_t)Kp;
    int16_t* buf = scratch16(GEMM_NR * row);
    const int16_t* d[GEMM_NR];
    float ws[GEMM_NR];
    for (int64_t n = n0; n < n1; n += GEMM_NR) {
        const int nr = (int)std::min<int64_t>(GEMM_NR, n1 - n);
        for (int r = 0; r < nr; ++r) {
            int16_t* dr = buf + r * row;
            const int8_t* src = w.codes + (n + r) * w.K;
            int64_t k = 0;
            for (; k + KV <= w.K; k += KV) storei(dr + k, sext(src + k));
            for (; k < w.K; ++k) dr[k] = src[k];
            for (; k < Kp; ++k) dr[k] = 0;
            d[r] = dr;
            ws[r] = w.scale[n + r];
        }
        switch (nr) {
            case GEMM_NR: gemm_groups<GEMM_NR>(w, t, Ba, d, ws, bias, y, M, n, g0, g1); break;
#if QBI16_WIDE
            case 3: gemm_groups<3>(w, t, Ba, d, ws, bias, y, M, n, g0, g1); break;
#endif
            case 2: gemm_groups<2>(w, t, Ba, d, ws, bias, y, M, n, g0, g1); break;
            default: gemm_groups<1>(w, t, Ba, d, ws, bias, y, M, n, g0, g1); break;
        }
    }
}

#if QBI16_WIDE
// ---- the packed-weight kernel (a prepared copy of the weight, qbi16_pack) --------------------------------
//
// Layout: for each block of 16 output columns, for each pair of k (K zero padded to Kp), the 16 columns'
// two int8 codes (32 bytes, (column, k, k + 1) order). Sign-extended on load (vpmovsxbw) it is one zmm of
// 16 int32 lanes = 16 columns x (k, k + 1), so one broadcast of a pair of a row of xq feeds vpdpwssd
// against 16 columns: accumulators [MR rows of x] x [NB blocks of 16 columns], no horizontal reduction.
// The scales as the GEMM above (per accumulation block: fmadd(float(sum), s_x * s_w, acc), then + bias):
// the same results as gemm_range, bit for bit.

// The int32 sums over pairs [p0, p1) of MR rows of xq (row stride ld) x NB blocks from w (panel bytes
// apart), into out [MR][NB][16]. (Fully unrolled so that GCC keeps acc in registers; the epilogue is in the
// caller, else GCC spills acc to the stack on every step.)
template <int MR, int NB>
QBI16_ATTR inline void psums(const int8_t* w, int64_t panel, int64_t p0, int64_t p1, const int16_t* xr, int64_t ld,
                             int32_t* out) {
    __m512i acc[MR][NB];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_si512();
    for (int64_t p = p0; p < p1; ++p) {
        __m512i wv[NB];
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) wv[j] = _mm512_cvtepi8_epi16(_mm256_load_si256((const __m256i*)(w + j * panel + p * 32)));
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            const __m512i xb = bcast(xr + m * ld + 2 * p);
#pragma GCC unroll 4
            for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpwssd_epi32(acc[m][j], wv[j], xb);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) _mm512_store_si512(out + (m * NB + j) * 16, acc[m][j]);
}

// MR rows of x from m0 x NB blocks of 16 columns from block b; columns >= N not stored.
template <int MR, int NB>
QBI16_ATTR void ptile(const int8_t* packed, const Act16& a, const float* scale, const float* bias, int64_t N, int64_t m0,
                      int64_t b, float* y) {
    const int64_t panel = 16 * a.Kp, np = a.Kp / 2, ppb = a.Ba / 2;
    alignas(64) int32_t sums[MR * NB * 16];
    alignas(64) float acc[MR * NB * 16];
    __mmask16 mk[NB];
    VF ws[NB];
    for (int j = 0; j < NB; ++j) {
        const int64_t n = (b + j) * 16;
        mk[j] = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
        ws[j] = _mm512_maskz_loadu_ps(mk[j], scale + n);
    }
    for (int64_t blk = 0; blk < a.nab; ++blk) {
        const int64_t p0 = blk * ppb, p1 = std::min(np, p0 + ppb);
        psums<MR, NB>(packed + b * panel, panel, p0, p1, a.xq + m0 * a.Kp, a.Kp, sums);
        for (int m = 0; m < MR; ++m) {
            const VF st = fset(a.sa[(m0 + m) * a.nab + blk]);
            for (int j = 0; j < NB; ++j) {
                float* ap = acc + (m * NB + j) * 16;
                const VF prev = blk == 0 ? fzero() : _mm512_load_ps(ap);
                _mm512_store_ps(ap, fmadd(cvt(_mm512_load_si512(sums + (m * NB + j) * 16)), fmul(st, ws[j]), prev));
            }
        }
    }
    for (int j = 0; j < NB; ++j) {
        const int64_t n = (b + j) * 16;
        const VF bv = bias ? _mm512_maskz_loadu_ps(mk[j], bias + n) : fzero();
        for (int m = 0; m < MR; ++m)
            _mm512_mask_storeu_ps(y + (m0 + m) * N + n, mk[j], _mm512_add_ps(_mm512_load_ps(acc + (m * NB + j) * 16), bv));
    }
}

template <int MR>
QBI16_ATTR void ptile_nb(int nb, const int8_t* packed, const Act16& a, const float* scale, const float* bias, int64_t N,
                         int64_t m0, int64_t b, float* y) {
    switch (nb) {
        case 4: ptile<MR, 4>(packed, a, scale, bias, N, m0, b, y); break;
        case 3: ptile<MR, 3>(packed, a, scale, bias, N, m0, b, y); break;
        case 2: ptile<MR, 2>(packed, a, scale, bias, N, m0, b, y); break;
        case 1: ptile<MR, 1>(packed, a, scale, bias, N, m0, b, y); break;
        default: break;
    }
}

constexpr int64_t PACKED_NB = 4;  // blocks of 16 columns per tile (4 x 6 int32 accumulators + 4 weights + 1)

// Rows [m0, m1) of x x blocks [b0, b1) of the packed weight, in tiles of up to 6 rows x 4 blocks.
QBI16_ATTR void packed_range(const int8_t* packed, const Act16& a, const float* scale, const float* bias, int64_t N,
                             int64_t m0, int64_t m1, int64_t b0, int64_t b1, float* y) {
    constexpr int64_t MRMAX = 6;
    for (int64_t b = b0; b < b1; b += PACKED_NB) {
        const int nb = (int)std::min<int64_t>(PACKED_NB, b1 - b);
        // tiles of even height (8 rows: 4 + 4, not 6 + 2: each weight load feeds as many rows as it can)
        const int64_t ntiles = (m1 - m0 + MRMAX - 1) / MRMAX, mr = (m1 - m0 + ntiles - 1) / ntiles;
        for (int64_t m = m0; m < m1; m += mr) {
            switch ((int)std::min<int64_t>(mr, m1 - m)) {
                case 6: ptile_nb<6>(nb, packed, a, scale, bias, N, m, b, y); break;
                case 5: ptile_nb<5>(nb, packed, a, scale, bias, N, m, b, y); break;
                case 4: ptile_nb<4>(nb, packed, a, scale, bias, N, m, b, y); break;
                case 3: ptile_nb<3>(nb, packed, a, scale, bias, N, m, b, y); break;
                case 2: ptile_nb<2>(nb, packed, a, scale, bias, N, m, b, y); break;
                default: ptile_nb<1>(nb, packed, a, scale, bias, N, m, b, y); break;
            }
        }
    }
}
#endif

}  // namespace QBI16_NS
