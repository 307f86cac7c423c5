// Declarations shared by the C++ kernel files of qbackend/kernels/cpu (all compiled into one library).
#pragma once
#include <cstdint>
#include <type_traits>

extern "C" {

// How a 4-bit code becomes a value; mirrors qbackend.kernels.cpu._build.CODEBOOK / INT4.
enum Layout : int32_t {
    LAYOUT_CODEBOOK = 0,  // nf4, fp4: table[code] * absmax[block]
    LAYOUT_INT4 = 1,      // (code - zero point) * scale[group]
};

// Mirrors qbackend.kernels.cpu._build.QW4 (ctypes.Structure); keep the two in sync.
struct QW4 {
    const uint8_t* codes;    // (N*K+1)/2 packed bytes
    const float* absmax;     // codebook, plain constants: [ceil(N*K/bs)], else null
    const uint8_t* ncodes;   // codebook, nested: 8-bit codes of the centred constants
    const float* nabsmax;    // codebook, nested: fp32 absmax per nested block
    const float* ntable;     // codebook, nested: 256-entry dynamic map
    const float* table;      // codebook: 16-entry code table; null for int4
    const float* scale;      // int4: [N, G]
    const uint8_t* zp;       // int4 affine: [N, G]; null for symmetric (zero point 8)
    const float* noffset;    // codebook, nested: offset (1 value)
    int32_t layout;          // enum Layout
    int64_t N, K, bs, nbs, G;
};

}  // extern "C"

namespace qb {

// Runs fn(ctx, n0, n1) over row blocks [n0, n1) of `grain` rows covering [0, N) on the library's
// thread pool (RowPool in qlinear.cpp), the calling thread included.
void pool_rows_fn(int64_t N, int64_t grain, int nthreads, void (*fn)(void*, int64_t, int64_t), void* ctx);

template <typename F>
void pool_rows(int64_t N, int64_t grain, int nthreads, F& body) {
    pool_rows_fn(N, grain, nthreads, [](void* c, int64_t a, int64_t b) { (*static_cast<F*>(c))(a, b); },
                 static_cast<void*>(&body));
}

// Exact dequantization of rows [n0, n1) of W into out[(n - n0) * K + k] by the AVX2 kernels
// (qlinear_avx2.cpp); false (nothing written) outside the avx2 build or for shapes they don't cover.
bool avx2_dequant4_rows(const QW4& q, int64_t n0, int64_t n1, float* out);

}  // namespace qb
