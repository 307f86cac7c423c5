// qbackend CPU kernels of the "int16" compute mode (see qbackend.kernels.reference) for int8 weights:
// dynamic int16 activations times int8 weights sign-extended to int16, exact int32 products per block.
//
// Two widths of the same kernels (int16_kernel_body.h, included twice):
// * AVX512-VNNI: vpdpwssd (pairs of s16 x s16 -> s32), 16 lanes;
// * AVX2: vpmaddwd + vpaddd, 8 lanes (any CPU with AVX2 + FMA; no VNNI needed).
// Small M: a GEMV-like tile (lanes along K, MR rows of x x NR rows of W); from M = g_gemm_min_m: a
// GEMM with lanes along M (x transposed once per call). The weights stay in their canonical layout;
// with AVX512-VNNI the caller may pass a panel-packed copy instead (qbi16_pack, qbi16_linear8_packed: 16
// output columns x 2 values of K per vector, no horizontal reductions, the GEMM's results bit for bit).
// Threads: the library's RowPool (qb_pool_run in qlinear.cpp).
//
// Each width is compiled with target attributes and runs only where the CPU has its instructions
// (qbi16_isa), so the library still loads on any CPU.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <immintrin.h>

extern "C" {
// The library's thread pool (qlinear.cpp).
void qb_pool_run(int64_t nchunks, int nthreads, void (*fn)(void*, int64_t, int), void* ctx);
int qb_all_finite(const float* p, int64_t n);  // finite_check.cpp

// One member of a group call (qbi16_linear8_packed_group); mirrors qbackend.kernels.cpu.int16_compute.QI16Member.
struct QI16Member {
    const int8_t* packed;  // qbi16_pack's copy of the member's codes [N, K]
    const float* scale;    // [N]
    const float* bias;     // [N]; null: none
    int64_t N;
};
}

namespace {

// An int8 weight with one fp32 scale per row (output channel).
struct W16 {
    const int8_t* codes;  // [N, K]
    const float* scale;   // [N]
    int64_t N, K;
};

// Quantized activations of one call (row-major).
struct Act16 {
    int64_t M = 0, K = 0, Kp = 0;  // Kp: K rounded up to 32 (zero-padded)
    int64_t Bq = 0;                // quantization block along K (K: one scale per row)
    int64_t Ba = 0;                // accumulation block (<= 512, a multiple of 32); nab blocks per row
    int64_t nab = 0;
    int16_t* xq = nullptr;  // [M, Kp]
    float* sa = nullptr;    // [M, nab]: the activation scale of each accumulation block
    uint8_t* bad = nullptr; // [M]: row holds NaN/Inf
};

// Per-thread buffer for decoded weight rows, grown as needed and reused across calls.
int16_t* scratch16(size_t n) {
    thread_local std::vector<int16_t> buf;
    if (buf.size() < n + 64) buf.resize(n + 64);
    return (int16_t*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
}

template <typename F>
void pool_run(int64_t n, int nthreads, F& f) {
    qb_pool_run(n, nthreads, [](void* ctx, int64_t c, int slot) { (*static_cast<F*>(ctx))(c, slot); }, &f);
}

}  // namespace

#define QBI16_NS qbi16_avx512
#define QBI16_WIDE 1
#define QBI16_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#include "int16_kernel_body.h"
#undef QBI16_NS
#undef QBI16_WIDE
#undef QBI16_ATTR

#define QBI16_NS qbi16_avx2
#define QBI16_WIDE 0
#define QBI16_ATTR __attribute__((target("avx2,fma")))
#include "int16_kernel_body.h"
#undef QBI16_NS
#undef QBI16_WIDE
#undef QBI16_ATTR

namespace {

enum Isa : int { ISA_NONE = 0, ISA_AVX2 = 2, ISA_AVX512_VNNI = 3 };

int cpu_isa() {
    static const int isa = [] {
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            return (int)ISA_AVX512_VNNI;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return (int)ISA_AVX2;
        return (int)ISA_NONE;
    }();
    return isa;
}

std::atomic<int64_t> g_group_regions{0};  // groups run in one region (tests: that path ran)

// Rows of x from which the GEMM runs, per width (tuning knobs, qbi16_set_gemm_min_m).
int64_t g_gemm_min_m[4] = {0, 0, 16, 16};

bool block_ok(int64_t Bq, int64_t K) { return Bq == 0 || Bq >= K || (Bq % 32 == 0 && Bq <= 512); }

// Work units: (block of rows of W) x (block of rows or groups of x), W-block major.
int64_t pick_nb(int64_t N, int nthreads) {
    int64_t nb = 64;
    while (nb > 8 && (N + nb - 1) / nb < 4 * nthreads) nb /= 2;
    return nb;
}

// x [M, K] quantized into a (buffers per thread, reused across calls); returns the rows holding NaN/Inf.
template <int ISA>
int64_t quantize_act(int64_t K, const float* x, int64_t M, int nthreads, int64_t Bq, Act16& a) {
    a.M = M;
    a.K = K;
    a.Kp = (K + 31) / 32 * 32;
    a.Bq = (Bq == 0 || Bq >= K) ? K : Bq;
    // accumulation blocks: the quantization blocks, or (one scale per row) 512 elements of K at most
    a.Ba = (a.Bq % 32 == 0 && a.Bq <= 512) ? a.Bq : std::min<int64_t>(512, a.Kp);
    a.nab = (K + a.Ba - 1) / a.Ba;
    thread_local std::vector<uint8_t> abuf;
    const size_t qbytes = (size_t)(M * a.Kp) * 2, sbytes = (size_t)(M * a.nab) * 4;
    const size_t need = qbytes + sbytes + (size_t)M + 256;
    if (abuf.size() < need) abuf.resize(need);
    uint8_t* p = (uint8_t*)(((uintptr_t)abuf.data() + 63) & ~(uintptr_t)63);
    a.xq = (int16_t*)p;
    p += (qbytes + 63) / 64 * 64;
    a.sa = (float*)p;
    p += (sbytes + 63) / 64 * 64;
    a.bad = p;

    auto quant = [&](int64_t m0, int64_t m1) {
        if (ISA == ISA_AVX512_VNNI) qbi16_avx512::quantize_rows(x, a, m0, m1);
        else qbi16_avx2::quantize_rows(x, a, m0, m1);
    };
    if (M * K < 64 * 1024 || nthreads <= 1) {
        quant(0, M);
    } else {
        const int64_t rb = std::max<int64_t>(1, (16 * 1024) / K);
        auto body = [&](int64_t b, int) { quant(b * rb, std::min(M, (b + 1) * rb)); };
        pool_run((M + rb - 1) / rb, nthreads, body);
    }
    int64_t nbad = 0;
    for (int64_t m = 0; m < M; ++m) nbad += a.bad[m];
    return nbad;
}

// Units of the packed kernel for one weight: 4 blocks (64 columns) x up to 48 rows; the 64-column panel
// stays in L1/L2 across the row tiles.
constexpr int64_t PACKED_MB = 48;
int64_t packed_units(int64_t N, int64_t M) {
    const int64_t nblk = (N + 15) / 16, cb = qbi16_avx512::PACKED_NB;
    return (nblk + cb - 1) / cb * ((M + PACKED_MB - 1) / PACKED_MB);
}

// Unit c of packed_units(N, M) (column panel major within a row tile).
void packed_unit(const int8_t* packed, const Act16& a, const float* scale, const float* bias, int64_t N, int64_t c,
                 float* y) {
    const int64_t nblk = (N + 15) / 16, cb = qbi16_avx512::PACKED_NB, ncb = (nblk + cb - 1) / cb;
    const int64_t ci = c % ncb, cm = c / ncb;
    qbi16_avx512::packed_range(packed, a, scale, bias, N, cm * PACKED_MB, std::min(a.M, (cm + 1) * PACKED_MB),
                               ci * cb, std::min(nblk, (ci + 1) * cb), y);
}

template <int ISA>
int64_t linear_slab(const W16& w, const float* x, int64_t M, const float* bias, float* y, int nthreads, int64_t Bq,
                    const int8_t* packed = nullptr) {
    Act16 a;
    const int64_t nbad = quantize_act<ISA>(w.K, x, M, nthreads, Bq, a);

    if (ISA == ISA_AVX512_VNNI && packed != nullptr) {
        auto body = [&](int64_t c, int) { packed_unit(packed, a, w.scale, bias, w.N, c, y); };
        pool_run(packed_units(w.N, M), nthreads, body);
        return nbad;
    }
    const int64_t nb = pick_nb(w.N, nthreads);
    const int64_t units_n = (w.N + nb - 1) / nb;
    if (M < g_gemm_min_m[ISA]) {
        const int64_t mb = 64, units_m = (M + mb - 1) / mb;
        auto body = [&](int64_t u, int) {
            const int64_t in = u / units_m, im = u % units_m;
            const int64_t n0 = in * nb, n1 = std::min(w.N, n0 + nb), m0 = im * mb, m1 = std::min(M, m0 + mb);
            if (ISA == ISA_AVX512_VNNI) qbi16_avx512::gemv_range(w, a, bias, y, m0, m1, n0, n1);
            else qbi16_avx2::gemv_range(w, a, bias, y, m0, m1, n0, n1);
        };
        pool_run(units_n * units_m, nthreads, body);
        return nbad;
    }
    constexpr int64_t L = ISA == ISA_AVX512_VNNI ? qbi16_avx512::L : qbi16_avx2::L;
    const int64_t G = (M + L - 1) / L, np = a.Kp / 2;
    thread_local std::vector<int32_t> tbuf;
    const size_t xn = (size_t)(G * np * L), sn = (size_t)(G * a.nab * L);
    if (tbuf.size() < xn + sn + 32) tbuf.resize(xn + sn + 32);
    int32_t* tp = (int32_t*)(((uintptr_t)tbuf.data() + 63) & ~(uintptr_t)63);
    // Both widths' ActT16 have the same fields; each namespace has its own type.
    auto run = [&](auto& t, auto transpose, auto gemm) {
        t.G = G;
        t.np = np;
        t.nab = a.nab;
        t.xT = tp;
        t.sT = (float*)(tp + xn);
        auto tr = [&](int64_t g, int) { transpose(a, t, g, g + 1); };
        pool_run(G, nthreads, tr);
        const int64_t gb = std::max<int64_t>(1, 64 / L);  // 64 rows of x per unit stay in L2 while W streams
        const int64_t units_m = (G + gb - 1) / gb;
        auto body = [&](int64_t u, int) {
            const int64_t in = u / units_m, im = u % units_m;
            const int64_t n0 = in * nb, n1 = std::min(w.N, n0 + nb), g0 = im * gb, g1 = std::min(G, g0 + gb);
            gemm(w, t, a.Ba, bias, y, M, n0, n1, g0, g1, a.Kp);
        };
        pool_run(units_n * units_m, nthreads, body);
    };
    if (ISA == ISA_AVX512_VNNI) {
        qbi16_avx512::ActT16 t;
        run(t, qbi16_avx512::transpose_groups, qbi16_avx512::gemm_range);
    } else {
        qbi16_avx2::ActT16 t;
        run(t, qbi16_avx2::transpose_groups, qbi16_avx2::gemm_range);
    }
    return nbad;
}

}  // namespace

extern "C" {

// The widest int16 kernels this CPU runs: 3 AVX512-VNNI, 2 AVX2 (+FMA), 0 none.
int qbi16_isa() { return cpu_isa(); }

// Whether the kernels at width isa cover this CPU and shape (Bq: the activation block, 0 = per row).
int qbi16_supported(int isa, int64_t N, int64_t K, int64_t Bq) {
    const int have = cpu_isa();
    const bool isa_ok = (isa == ISA_AVX512_VNNI && have == ISA_AVX512_VNNI) ||
                        (isa == ISA_AVX2 && have >= ISA_AVX2);
    return isa_ok && N > 0 && K > 0 && block_ok(Bq, K);
}

void qbi16_set_gemm_min_m(int isa, int64_t m) {
    if (isa == ISA_AVX2 || isa == ISA_AVX512_VNNI) g_gemm_min_m[isa] = m;
}
int64_t qbi16_gemm_min_m(int isa) { return (isa == ISA_AVX2 || isa == ISA_AVX512_VNNI) ? g_gemm_min_m[isa] : 0; }

// y[M, N] = x[M, K] @ (codes * scale)^T (+ bias) in the "int16" compute mode with the kernels of
// width isa. Returns the number of rows of x holding NaN/Inf (their y rows are garbage: the caller
// recomputes them in fp32), or -1 if the kernels do not cover this CPU/shape (nothing computed).
int64_t qbi16_linear8(int isa, const int8_t* codes, const float* scale, int64_t N, int64_t K, const float* x,
                      int64_t M, const float* bias, float* y, int nthreads, int64_t Bq) {
    if (!qbi16_supported(isa, N, K, Bq)) return -1;
    const W16 w{codes, scale, N, K};
    // Slabs of rows bound the activation buffers (about 4 bytes per element of x).
    const int64_t slab = std::max<int64_t>(64, (int64_t(8) << 20) / K);
    int64_t nbad = 0;
    for (int64_t m0 = 0; m0 < M; m0 += slab) {
        const int64_t mm = std::min(slab, M - m0);
        nbad += isa == ISA_AVX512_VNNI ? linear_slab<ISA_AVX512_VNNI>(w, x + m0 * K, mm, bias, y + m0 * N, nthreads, Bq)
                                       : linear_slab<ISA_AVX2>(w, x + m0 * K, mm, bias, y + m0 * N, nthreads, Bq);
    }
    return nbad;
}

// Bytes of the packed copy qbi16_pack writes for [N, K] codes: N rounded up to 16, K to 32.
int64_t qbi16_packed_bytes(int64_t N, int64_t K) { return (N + 15) / 16 * 16 * ((K + 31) / 32 * 32); }

// The packed copy (layout above qbi16_avx512::psums) of codes [N, K] int8 into packed (64-byte aligned,
// qbi16_packed_bytes long); padding 0 (against zero-padded xq).
void qbi16_pack(const int8_t* codes, int64_t N, int64_t K, int8_t* packed) {
    const int64_t Kp = (K + 31) / 32 * 32;
    std::memset(packed, 0, (size_t)qbi16_packed_bytes(N, K));
    for (int64_t n = 0; n < N; ++n) {
        int8_t* dst = packed + (n / 16) * 16 * Kp + (n % 16) * 2;
        const int8_t* src = codes + n * K;
        for (int64_t k = 0; k < K; ++k) dst[(k / 2) * 32 + (k & 1)] = src[k];
    }
}

// qbi16_linear8 at the AVX512-VNNI width on the packed copy of the codes (qbi16_pack). Returns as
// qbi16_linear8 (-1: this CPU/shape is not covered, nothing computed).
int64_t qbi16_linear8_packed(const int8_t* packed, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                             const float* bias, float* y, int nthreads, int64_t Bq) {
    if (!qbi16_supported(ISA_AVX512_VNNI, N, K, Bq) || ((uintptr_t)packed & 63)) return -1;
    const W16 w{nullptr, scale, N, K};
    const int64_t slab = std::max<int64_t>(64, (int64_t(8) << 20) / K);
    int64_t nbad = 0;
    for (int64_t m0 = 0; m0 < M; m0 += slab) {
        const int64_t mm = std::min(slab, M - m0);
        nbad += linear_slab<ISA_AVX512_VNNI>(w, x + m0 * K, mm, bias, y + m0 * N, nthreads, Bq, packed);
    }
    return nbad;
}

// Members reading one x [M, K] (q/k/v at LLM decode), each as qbi16_linear8_packed computes it: x
// quantized once, and every member's units run in one thread-pool region. y holds member i's [M, N_i]
// output after the members before it (from M * (N_0 + ... + N_{i-1})). Returns 0 when it wrote every
// member's output and all of it is finite; -1: a CPU, shape or M (at most 48 rows) it does not cover,
// nothing computed; otherwise (rows of x with NaN/Inf, an output not finite) the caller runs each
// member's own call, which handles those.
int64_t qbi16_linear8_packed_group(const QI16Member* ms, int64_t count, int64_t K, const float* x, int64_t M,
                                   float* y, int nthreads, int64_t Bq) {
    if (count <= 0 || M <= 0 || M > PACKED_MB) return -1;
    int64_t units = 0, total = 0;
    for (int64_t i = 0; i < count; ++i) {
        if (!qbi16_supported(ISA_AVX512_VNNI, ms[i].N, K, Bq) || ((uintptr_t)ms[i].packed & 63)) return -1;
        units += packed_units(ms[i].N, M);
        total += ms[i].N;
    }
    Act16 a;
    if (quantize_act<ISA_AVX512_VNNI>(K, x, M, nthreads, Bq, a) != 0) return 1;
    g_group_regions.fetch_add(1, std::memory_order_relaxed);
    auto body = [&](int64_t c, int) {
        int64_t i = 0, off = 0;
        for (int64_t u; c >= (u = packed_units(ms[i].N, M)); ++i) {  // a few members: a short walk
            c -= u;
            off += M * ms[i].N;
        }
        packed_unit(ms[i].packed, a, ms[i].scale, ms[i].bias, ms[i].N, c, y + off);
    };
    pool_run(units, nthreads, body);
    return qb_all_finite(y, M * total) ? 0 : 2;
}

// How many group calls ran in one region since the library loaded.
int64_t qbi16_group_regions() { return g_group_regions.load(std::memory_order_relaxed); }

}  // extern "C"
