// Whether every element of an fp32 buffer is finite: the output check of each CPU kernel call
// (see finite.py). One pass, no allocation; a torch reduction plus float() costs ~2 us per call.
#include <cstdint>
#include <cstring>

extern "C" int qb_all_finite(const float* p, int64_t n) {
    // An fp32 is NaN or Inf exactly when all its exponent bits are set.
    const uint32_t exp = 0x7f800000u;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint32_t w[64];
        std::memcpy(w, p + i, sizeof(w));
        uint32_t bad = 0;
        for (int j = 0; j < 64; ++j) bad |= static_cast<uint32_t>((w[j] & exp) == exp);
        if (bad) return 0;
    }
    for (; i < n; ++i) {
        uint32_t w;
        std::memcpy(&w, p + i, sizeof(w));
        if ((w & exp) == exp) return 0;
    }
    return 1;
}
