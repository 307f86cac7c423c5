// qbackend fused CPU attention for few query positions (LLM decode): F.scaled_dot_product_attention
// semantics (GQA head mapping, scale, additive float or bool mask, top-left is_causal) in fp32.
//
// One task = (batch, KV head, span of KV positions). The task's query rows are every query head that
// reads this KV head times every query position (n_rep * L rows), so each K/V row is read once for
// all of them, in place (any batch/head/position strides, unit stride along the head dim): no
// copies of repeated heads. Online softmax over chunks of KV positions: scores for the chunk, a
// running max and sum per row, the output accumulated in registers. Long KV spans are split over
// several tasks (flash-decoding) and the partial (max, sum, output) combined at the end.
//
// A bool mask is applied as sdpa does it (False -> -inf added to the score, so a NaN score stays
// NaN); a row with every score -inf gives zeros, like sdpa. Masked positions count as in sdpa: NaN/Inf
// in K or V there propagate. The positions after the last one any query row attends (a static KV
// cache's unused tail) add exactly zero to every sum, so when K and V are finite there they are not
// computed (a finiteness scan, ~10x cheaper); else they are, and NaN comes out as in sdpa. With
// is_causal the positions after the last query row's are never read (as sdpa's CPU kernel).
//
// Widths: AVX-512 (16 lanes) in the avx512 build, AVX2+FMA (8) in the avx2 build, scalar otherwise.
// Threads: the library's RowPool (qb_pool_run in qlinear.cpp).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define QBA_W 16
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QBA_W 8
#else
#define QBA_W 1
#endif

extern "C" {
void qb_pool_run(int64_t nchunks, int nthreads, void (*fn)(void*, int64_t, int), void* ctx);  // qlinear.cpp
int qb_all_finite(const float* p, int64_t n);                                                  // finite_check.cpp
}

namespace {

constexpr int W = QBA_W;
constexpr int64_t CHUNK = 64;  // KV positions per online-softmax step (K/V chunk stays in L1)
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// exp(x) below this is flushed to 0 (|result| < 1.2e-38, vs the row max's exp(0) = 1): keeps exp(-inf) = 0.
constexpr float EXP_LO = -87.33654f;

// ---- SIMD wrapper: V = W floats ----------------------------------------------------------------------
#if QBA_W == 16
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float x) { return _mm512_set1_ps(x); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
inline float vmaxall(V a) { return _mm512_reduce_max_ps(a); }
inline __m256 fold(V a) { return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)); }
inline V vexp(V x) {
    // Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-7 polynomial; ~1 ulp. NaN stays NaN.
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, vset(EXP_LO), _CMP_LT_OQ);
    x = _mm512_max_ps(vset(EXP_LO), x);  // second operand returned for NaN: NaN kept
    V n = _mm512_roundscale_ps(_mm512_mul_ps(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, vset(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, vset(-2.12194440e-4f), r);
    V p = vset(1.9875691500E-4f);
    p = vfma(p, r, vset(1.3981999507E-3f));
    p = vfma(p, r, vset(8.3334519073E-3f));
    p = vfma(p, r, vset(4.1665795894E-2f));
    p = vfma(p, r, vset(1.6666665459E-1f));
    p = vfma(p, r, vset(5.0000001201E-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
    return _mm512_maskz_scalef_ps((__mmask16)~tiny, p, n);
}
#elif QBA_W == 8
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float x) { return _mm256_set1_ps(x); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vload_n(const float* p, int n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
}
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float vsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vmaxall(V a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline __m256 fold(V a) { return a; }
inline V vexp(V x) {
    const V tiny = _mm256_cmp_ps(x, vset(EXP_LO), _CMP_LT_OQ);
    x = _mm256_max_ps(vset(EXP_LO), x);  // NaN kept (second operand)
    V n = _mm256_round_ps(_mm256_mul_ps(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, vset(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, vset(-2.12194440e-4f), r);
    V p = vset(1.9875691500E-4f);
    p = vfma(p, r, vset(1.3981999507E-3f));
    p = vfma(p, r, vset(8.3334519073E-3f));
    p = vfma(p, r, vset(4.1665795894E-2f));
    p = vfma(p, r, vset(1.6666665459E-1f));
    p = vfma(p, r, vset(5.0000001201E-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
    // 2^n for n in [-126, 0] (x >= EXP_LO, x <= 0 here; NaN lanes give NaN through p)
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(_mm256_max_ps(n, vset(-126.0f))),
                                                   _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

#if QBA_W > 1
// Four dot-product accumulators -> their four sums.
inline void hsum4(V a0, V a1, V a2, V a3, float* out) {
    __m256 h01 = _mm256_hadd_ps(fold(a0), fold(a1));
    __m256 h23 = _mm256_hadd_ps(fold(a2), fold(a3));
    __m256 h = _mm256_hadd_ps(h01, h23);  // [s0 s1 s2 s3 | s0 s1 s2 s3] (per 128-bit half)
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#endif

inline float exp1(float x) { return x < EXP_LO ? 0.0f : std::exp(x); }

struct Args {
    const float *q, *k, *v;
    const void* mask;
    float* out;
    int64_t B, Hq, Hk, L, S, D, Dv;
    int64_t qsb, qsh, qsl, ksb, ksh, kss, vsb, vsh, vss;
    int64_t msb, msh, msl, mss;
    int mask_kind;  // 0 none, 1 bool (uint8: nonzero = attend), 2 additive fp32
    float scale;
    int causal;  // top-left aligned, as sdpa: row l attends positions <= l
    int64_t nsplit, span;
    float* part;  // nsplit > 1: per task and row, [max, sum, out[Dv]]
};

// Query rows per register block: scores (GB_S rows x 4 positions of accumulators) and p @ V (GB_V rows x
// 4 vectors); AVX2 has 16 registers, AVX-512 32.
#if QBA_W == 16
constexpr int GB_S = 4, GB_V = 4;
#else
constexpr int GB_S = 2, GB_V = 2;
#endif

// s[r * CHUNK + t] = q_r . k_t for GB rows of q (stride Dp, zero padded) and positions t < n of k.
template <int GB>
inline void scores(const float* q, int64_t Dp, const float* k, int64_t kss, int64_t n, int64_t D, float* s) {
#if QBA_W > 1
    const int64_t nfull = D / W;
    const int tail = (int)(D - nfull * W);
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const float* k0 = k + t * kss;
        const float* k1 = k0 + kss;
        const float* k2 = k1 + kss;
        const float* k3 = k2 + kss;
        V c[GB][4];
        for (int r = 0; r < GB; ++r) c[r][0] = c[r][1] = c[r][2] = c[r][3] = vzero();
        int64_t d = 0;
        for (int64_t i = 0; i < nfull; ++i, d += W) {
            const V x0 = vload(k0 + d), x1 = vload(k1 + d), x2 = vload(k2 + d), x3 = vload(k3 + d);
            for (int r = 0; r < GB; ++r) {
                const V qv = vload(q + r * Dp + d);
                c[r][0] = vfma(qv, x0, c[r][0]);
                c[r][1] = vfma(qv, x1, c[r][1]);
                c[r][2] = vfma(qv, x2, c[r][2]);
                c[r][3] = vfma(qv, x3, c[r][3]);
            }
        }
        if (tail) {
            const V x0 = vload_n(k0 + d, tail), x1 = vload_n(k1 + d, tail), x2 = vload_n(k2 + d, tail),
                    x3 = vload_n(k3 + d, tail);
            for (int r = 0; r < GB; ++r) {
                const V qv = vload(q + r * Dp + d);
                c[r][0] = vfma(qv, x0, c[r][0]);
                c[r][1] = vfma(qv, x1, c[r][1]);
                c[r][2] = vfma(qv, x2, c[r][2]);
                c[r][3] = vfma(qv, x3, c[r][3]);
            }
        }
        for (int r = 0; r < GB; ++r) hsum4(c[r][0], c[r][1], c[r][2], c[r][3], s + r * CHUNK + t);
    }
    for (; t < n; ++t) {
        const float* k0 = k + t * kss;
        for (int r = 0; r < GB; ++r) {
            V c0 = vzero();
            int64_t d = 0;
            for (int64_t i = 0; i < nfull; ++i, d += W) c0 = vfma(vload(q + r * Dp + d), vload(k0 + d), c0);
            if (tail) c0 = vfma(vload(q + r * Dp + d), vload_n(k0 + d, tail), c0);
            s[r * CHUNK + t] = vsum(c0);
        }
    }
#else
    (void)Dp;
    for (int r = 0; r < GB; ++r)
        for (int64_t t = 0; t < n; ++t) {
            const float* k0 = k + t * kss;
            float c = 0.0f;
            for (int64_t d = 0; d < D; ++d) c += q[r * Dp + d] * k0[d];
            s[r * CHUNK + t] = c;
        }
#endif
}

// acc[r] += sum_t p[r * CHUNK + t] * v_t for GB rows (acc stride Dvp, zero padded past Dv).
template <int GB>
inline void pv(const float* p, const float* v, int64_t vss, int64_t n, int64_t Dv, float* acc, int64_t Dvp) {
#if QBA_W > 1
    const int64_t nv = Dvp / W;
    const int tail = (int)(Dv - (nv - 1) * W);  // lanes of the last vector (W when Dv % W == 0)
    int64_t i = 0;
    for (; i + 4 <= nv && (i + 4 < nv || tail == W); i += 4) {  // 4 full vectors per row in registers
        const int64_t d = i * W;
        V o[GB][4];
        for (int r = 0; r < GB; ++r)
            for (int j = 0; j < 4; ++j) o[r][j] = vload(acc + r * Dvp + d + j * W);
        for (int64_t t = 0; t < n; ++t) {
            const float* vr = v + t * vss + d;
            const V x0 = vload(vr), x1 = vload(vr + W), x2 = vload(vr + 2 * W), x3 = vload(vr + 3 * W);
            for (int r = 0; r < GB; ++r) {
                const V pt = vset(p[r * CHUNK + t]);
                o[r][0] = vfma(pt, x0, o[r][0]);
                o[r][1] = vfma(pt, x1, o[r][1]);
                o[r][2] = vfma(pt, x2, o[r][2]);
                o[r][3] = vfma(pt, x3, o[r][3]);
            }
        }
        for (int r = 0; r < GB; ++r)
            for (int j = 0; j < 4; ++j) vstore(acc + r * Dvp + d + j * W, o[r][j]);
    }
    for (; i < nv; ++i) {  // the rest one vector at a time (the last may be partial: masked loads)
        const int64_t d = i * W;
        const int lanes = i + 1 == nv ? tail : W;
        V o[GB];
        for (int r = 0; r < GB; ++r) o[r] = vload(acc + r * Dvp + d);
        for (int64_t t = 0; t < n; ++t) {
            const V x = lanes == W ? vload(v + t * vss + d) : vload_n(v + t * vss + d, lanes);
            for (int r = 0; r < GB; ++r) o[r] = vfma(vset(p[r * CHUNK + t]), x, o[r]);
        }
        for (int r = 0; r < GB; ++r) vstore(acc + r * Dvp + d, o[r]);
    }
#else
    (void)Dvp;
    for (int r = 0; r < GB; ++r)
        for (int64_t t = 0; t < n; ++t) {
            const float* vr = v + t * vss;
            for (int64_t d = 0; d < Dv; ++d) acc[r * Dvp + d] += p[r * CHUNK + t] * vr[d];
        }
#endif
}

// s[t] += -inf where the bool mask is False (as sdpa: a NaN score stays NaN).
inline void add_bool_mask(float* s, const uint8_t* m, int64_t mss, int64_t n) {
    int64_t t = 0;
#if QBA_W == 16
    if (mss == 1)
        for (; t + 16 <= n; t += 16) {
            const __mmask16 off = _mm_cmpeq_epi8_mask(_mm_loadu_si128((const __m128i*)(m + t)), _mm_setzero_si128());
            vstore(s + t, _mm512_mask_add_ps(vload(s + t), off, vload(s + t), vset(NEG_INF)));
        }
#elif QBA_W == 8
    if (mss == 1)
        for (; t + 8 <= n; t += 8) {
            const __m256i mi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(m + t)));
            const V off = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mi, _mm256_setzero_si256()));
            vstore(s + t, vadd(vload(s + t), _mm256_and_ps(off, vset(NEG_INF))));  // s + 0 or s + -inf
        }
#endif
    for (; t < n; ++t)
        if (!m[t * mss]) s[t] += NEG_INF;
}

inline void add_float_mask(float* s, const float* m, int64_t mss, int64_t n) {
    int64_t t = 0;
#if QBA_W > 1
    if (mss == 1)
        for (; t + W <= n; t += W) vstore(s + t, vadd(vload(s + t), vload(m + t)));
#endif
    for (; t < n; ++t) s[t] += m[t * mss];
}

// max of s[0, n) over its non-NaN values (-inf when none)
inline float max_ignoring_nan(const float* s, int64_t n) {
    float r = NEG_INF;
    int64_t t = 0;
#if QBA_W > 1
    V c = vset(NEG_INF);
    for (; t + W <= n; t += W) c = vmax(vload(s + t), c);  // maxps returns its second operand for NaN
    r = vmaxall(c);
#endif
    for (; t < n; ++t) r = std::max(r, s[t]);  // std::max(r, NaN) keeps r
    return r;
}

// s[t] = exp(s[t] - m) for t < n; returns their sum.
inline float exp_sum(float* s, int64_t n, float m) {
    float sum = 0.0f;
    int64_t t = 0;
#if QBA_W > 1
    V acc = vzero();
    for (; t + W <= n; t += W) {
        const V p = vexp(vsub(vload(s + t), vset(m)));
        vstore(s + t, p);
        acc = vadd(acc, p);
    }
    sum = vsum(acc);
#endif
    for (; t < n; ++t) {
        s[t] = exp1(s[t] - m);
        sum += s[t];
    }
    return sum;
}

// rows: the task's query rows (G), qs: [G, Dp] scaled queries (zero padded), acc: [G, Dvp].
void run_task(const Args& a, int64_t task, std::vector<float>& buf) {
    const int64_t n_rep = a.Hq / a.Hk;
    const int64_t split = task % a.nsplit, bh = task / a.nsplit, hk = bh % a.Hk, b = bh / a.Hk;
    const int64_t t_begin = split * a.span, t_end = std::min(a.S, t_begin + a.span);
    const int64_t G = n_rep * a.L;
    const int64_t Dp = (a.D + W - 1) / W * W, Dvp = (a.Dv + W - 1) / W * W;
    const size_t need = (size_t)(G * Dp + G * Dvp + G * CHUNK + 2 * G + 64);
    if (buf.size() < need) buf.resize(need);
    float* qs = buf.data();
    float* acc = qs + G * Dp;
    float* sc = acc + G * Dvp;
    float* mrun = sc + G * CHUNK;
    float* lrun = mrun + G;
    for (int64_t g = 0; g < G; ++g) {  // row g: query head hk * n_rep + g / L, position g % L
        const float* src = a.q + b * a.qsb + (hk * n_rep + g / a.L) * a.qsh + (g % a.L) * a.qsl;
        float* dst = qs + g * Dp;
        for (int64_t d = 0; d < a.D; ++d) dst[d] = src[d] * a.scale;
        for (int64_t d = a.D; d < Dp; ++d) dst[d] = 0.0f;
        std::fill(acc + g * Dvp, acc + (g + 1) * Dvp, 0.0f);
        mrun[g] = NEG_INF;
        lrun[g] = 0.0f;
    }
    const float* kb = a.k + b * a.ksb + hk * a.ksh;
    const float* vb = a.v + b * a.vsb + hk * a.vsh;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += CHUNK) {
        const int64_t n = std::min(CHUNK, t_end - t0);
        const float* kc = kb + t0 * a.kss;
        // scores, GB_S rows at a time (each K vector loaded once for them)
        int64_t g = 0;
#if QBA_W > 1
        for (; g + GB_S <= G; g += GB_S) scores<GB_S>(qs + g * Dp, Dp, kc, a.kss, n, a.D, sc + g * CHUNK);
#endif
        for (; g < G; ++g) scores<1>(qs + g * Dp, Dp, kc, a.kss, n, a.D, sc + g * CHUNK);
        for (g = 0; g < G; ++g) {
            float* s = sc + g * CHUNK;
            // mask, causality (added, as sdpa does: a NaN score stays NaN)
            if (a.mask_kind != 0) {
                const int64_t h = hk * n_rep + g / a.L, l = g % a.L;
                const int64_t off = b * a.msb + h * a.msh + l * a.msl + t0 * a.mss;
                if (a.mask_kind == 1) add_bool_mask(s, static_cast<const uint8_t*>(a.mask) + off, a.mss, n);
                else add_float_mask(s, static_cast<const float*>(a.mask) + off, a.mss, n);
            }
            if (a.causal) {
                const int64_t l = g % a.L;
                for (int64_t t = std::max<int64_t>(0, l + 1 - t0); t < n; ++t) s[t] += NEG_INF;
            }
            // online softmax: p = exp(s - m_new), rescale the running sum and output
            const float mnew = std::max(mrun[g], max_ignoring_nan(s, n));  // NaN scores stay in s
            const float msafe = mnew == NEG_INF ? 0.0f : mnew;
            const float alpha = exp1(mrun[g] - msafe);
            lrun[g] = lrun[g] * alpha + exp_sum(s, n, msafe);
            mrun[g] = mnew;
            if (alpha != 1.0f) {
                float* ag = acc + g * Dvp;
                for (int64_t d = 0; d < Dvp; ++d) ag[d] *= alpha;
            }
        }
        // out += p @ V[chunk], GB_V rows at a time (each V vector loaded once for them)
        const float* vc = vb + t0 * a.vss;
        g = 0;
#if QBA_W > 1
        for (; g + GB_V <= G; g += GB_V) pv<GB_V>(sc + g * CHUNK, vc, a.vss, n, a.Dv, acc + g * Dvp, Dvp);
#endif
        for (; g < G; ++g) pv<1>(sc + g * CHUNK, vc, a.vss, n, a.Dv, acc + g * Dvp, Dvp);
    }
    // write the rows: final (nsplit == 1) or partial for the combine
    for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * n_rep + g / a.L, l = g % a.L;
        const float* ag = acc + g * Dvp;
        if (a.nsplit == 1) {
            float* o = a.out + ((b * a.Hq + h) * a.L + l) * a.Dv;
            const float inv = lrun[g] == 0.0f ? 0.0f : 1.0f / lrun[g];  // every score -inf: zeros, like sdpa
            for (int64_t d = 0; d < a.Dv; ++d) o[d] = ag[d] * inv;
        } else {
            float* pr = a.part + (((b * a.Hq + h) * a.L + l) * a.nsplit + split) * (a.Dv + 2);
            pr[0] = mrun[g];
            pr[1] = lrun[g];
            std::memcpy(pr + 2, ag, sizeof(float) * a.Dv);
        }
    }
}

void combine(const Args& a, int64_t row) {
    const float* pr = a.part + row * a.nsplit * (a.Dv + 2);
    float m = NEG_INF;
    for (int64_t i = 0; i < a.nsplit; ++i) m = std::max(m, pr[i * (a.Dv + 2)]);
    const float msafe = m == NEG_INF ? 0.0f : m;
    float* o = a.out + row * a.Dv;
    std::fill(o, o + a.Dv, 0.0f);
    float l = 0.0f;
    for (int64_t i = 0; i < a.nsplit; ++i) {
        const float* p = pr + i * (a.Dv + 2);
        const float w = exp1(p[0] - msafe);
        l += p[1] * w;
        for (int64_t d = 0; d < a.Dv; ++d) o[d] += p[2 + d] * w;
    }
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
    for (int64_t d = 0; d < a.Dv; ++d) o[d] *= inv;
}

// 1 + the last KV position some query row attends by the mask (bool: nonzero; float: not -inf); 0 when
// none does. msize/mstr: the mask's 4-D sizes (1: broadcast) and strides.
int64_t mask_end(const void* mask, int mask_kind, const int64_t* msize, const int64_t* mstr, int64_t S) {
    const int64_t ss = msize[3] == 1 ? 0 : mstr[3];
    int64_t last = -1;
    for (int64_t b = 0; b < msize[0]; ++b)
        for (int64_t h = 0; h < msize[1]; ++h)
            for (int64_t l = 0; l < msize[2]; ++l) {
                const int64_t base = b * mstr[0] + h * mstr[1] + l * mstr[2];
                for (int64_t t = S - 1; t > last; --t) {
                    const bool on = mask_kind == 1 ? static_cast<const uint8_t*>(mask)[base + t * ss] != 0
                                                   : static_cast<const float*>(mask)[base + t * ss] != NEG_INF;
                    if (on) {
                        last = t;
                        break;
                    }
                }
                if (last == S - 1) return S;
            }
    return last + 1;
}

// 1 + the last KV position some query row attends by the mask and causality (top-left: row l sees <= l).
int64_t attended_end(const void* mask, int mask_kind, const int64_t* msize, const int64_t* mstr, int64_t S,
                     int64_t L, int causal) {
    const int64_t end = mask_kind != 0 ? mask_end(mask, mask_kind, msize, mstr, S) : S;
    return causal ? std::min(end, L) : end;
}

// Whether p[0, n) is all finite (x - x is 0 for a finite x, NaN for NaN/Inf).
inline bool finite_run(const float* p, int64_t n) {
#if QBA_W > 1
    V a0 = vzero(), a1 = vzero();
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
        const V x = vload(p + i), y = vload(p + i + W);
        a0 = vadd(a0, vsub(x, x));
        a1 = vadd(a1, vsub(y, y));
    }
    for (; i < n; i += W) {
        const V x = vload_n(p + i, (int)std::min<int64_t>(W, n - i));
        a0 = vadd(a0, vsub(x, x));
    }
    return vsum(vadd(a0, a1)) == 0.0f;
#else
    return qb_all_finite(p, n) != 0;
#endif
}

// Whether K and V hold only finite values at positions [t0, S) of every (batch, KV head).
bool tail_finite(const float* base, int64_t B, int64_t Hk, int64_t sb, int64_t sh, int64_t ss, int64_t d, int64_t t0,
                 int64_t S) {
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hk; ++h) {
            const float* p = base + b * sb + h * sh + t0 * ss;
            if (ss == d) {
                if (!finite_run(p, (S - t0) * d)) return false;
            } else {
                for (int64_t t = t0; t < S; ++t, p += ss)
                    if (!finite_run(p, d)) return false;
            }
        }
    return true;
}

std::atomic<int64_t> g_trimmed{0};  // calls that skipped an unattended tail (tests)

}  // namespace

extern "C" {

// out [B, Hq, L, Dv] (contiguous) = sdpa(q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv]). dims (24 values,
// one array: a ctypes call costs ~0.15 us per argument): B, Hq, Hk, L, S, D, Dv; the batch, head and
// position strides of q, k, v (elements; unit stride along D/Dv assumed); the mask's sizes and strides
// as 4-D (a size-1 dim broadcasts). Returns 0, or 1 for arguments it does not take (the caller then
// uses the reference).
int qb_decode_attention(const float* q, const float* k, const float* v, const void* mask, float* out,
                        const int64_t* dims, int mask_kind, float scale, int causal, int nthreads) {
    const int64_t B = dims[0], Hq = dims[1], Hk = dims[2], L = dims[3], D = dims[5], Dv = dims[6];
    int64_t S = dims[4];
    const int64_t qsb = dims[7], qsh = dims[8], qsl = dims[9], ksb = dims[10], ksh = dims[11], kss = dims[12];
    const int64_t vsb = dims[13], vsh = dims[14], vss = dims[15];
    const int64_t* msize = dims + 16;
    const int64_t* mstr = dims + 20;
    if (mask_kind != 0) {
        const int64_t want[4] = {B, Hq, L, S};
        for (int i = 0; i < 4; ++i)
            if (msize[i] != 1 && msize[i] != want[i]) return 1;
    }
    auto bstride = [&](int i) { return msize[i] == 1 ? int64_t(0) : mstr[i]; };
    const int64_t msb = bstride(0), msh = bstride(1), msl = bstride(2), mss = bstride(3);
    if (B < 0 || Hk <= 0 || Hq % Hk != 0 || L < 0 || S < 0 || D <= 0 || Dv <= 0 || mask_kind < 0 || mask_kind > 2)
        return 1;
    if (B == 0 || Hq == 0 || L == 0) return 0;
    if (S == 0) {  // softmax over nothing: sdpa gives zeros
        std::fill(out, out + B * Hq * L * Dv, 0.0f);
        return 0;
    }
    // sdpa's is_causal (no mask) never reads the positions past the last row's: not even for NaN
    const int64_t end = attended_end(mask, mask_kind, msize, mstr, S, L, causal);
    if (end > 0 && end < S && ((causal && mask_kind == 0) || (tail_finite(k, B, Hk, ksb, ksh, kss, D, end, S) &&
                                                               tail_finite(v, B, Hk, vsb, vsh, vss, Dv, end, S)))) {
        S = end;
        g_trimmed.fetch_add(1, std::memory_order_relaxed);
    }
    Args a{q, k, v, mask, out, B, Hq, Hk, L, S, D, Dv, qsb, qsh, qsl, ksb, ksh, kss, vsb, vsh, vss,
           msb, msh, msl, mss, mask_kind, scale, causal, 1, S, nullptr};
    nthreads = std::max(1, nthreads);
    // Split the KV positions when there are fewer (batch, KV head) tasks than threads: spans of >= 128
    // positions (the combine and per-task set-up stay small next to them).
    const int64_t tasks = B * Hk;
    if (tasks < 2 * nthreads && nthreads > 1) {
        const int64_t want = (2 * nthreads + tasks - 1) / tasks;
        a.nsplit = std::max<int64_t>(1, std::min<int64_t>(want, S / 128));
        a.span = (S + a.nsplit - 1) / a.nsplit;
        a.span = (a.span + CHUNK - 1) / CHUNK * CHUNK;
        a.nsplit = (S + a.span - 1) / a.span;
    }
    std::vector<float> part;
    if (a.nsplit > 1) {
        part.resize((size_t)(B * Hq * L * a.nsplit * (Dv + 2)));
        a.part = part.data();
    }
    auto body = [&](int64_t c, int) {
        thread_local std::vector<float> buf;
        run_task(a, c, buf);
    };
    qb_pool_run(tasks * a.nsplit, nthreads, [](void* ctx, int64_t c, int slot) { (*static_cast<decltype(body)*>(ctx))(c, slot); },
                &body);
    if (a.nsplit > 1)
        for (int64_t r = 0; r < B * Hq * L; ++r) combine(a, r);
    return 0;
}

int qb_decode_attention_width() { return QBA_W; }

// Calls that skipped an unattended, finite tail of the KV positions since the library loaded (tests).
int64_t qb_decode_attention_trimmed() { return g_trimmed.load(std::memory_order_relaxed); }

}  // extern "C"
