// The CPU's storage types of pybn's element types and the conversions between them. Shared by
// every CPU kernel file; the facts about each dtype are in numerics.hpp.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "numerics.hpp"

#if defined(__F16C__)
#include <immintrin.h>  // hardware float16 conversion
#endif

namespace pybn {
inline namespace PYBN_ISA_TAG {

// 16-bit storage types: plain bit patterns, converted to float32 for arithmetic.
struct half_t { uint16_t bits; };
struct bfloat16_t { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

#if defined(__F16C__)
inline float to_float(half_t h) { return _cvtsh_ss(h.bits); }
inline half_t to_half(float f) { return {uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT))}; }
#else
inline float to_float(half_t h) {
    const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
    const uint32_t exp = (h.bits >> 10) & 0x1fu;
    const uint32_t man = h.bits & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // Inf / NaN
    if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
    // zero or subnormal: man * 2^-24, exact in float32
    const float mag = float(man) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
}

inline half_t to_half(float f) {
    const uint32_t u = float_to_bits(f);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return {uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu))};  // NaN
    if (abs >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: Inf
    if (abs < 0x38800000u) {
        // result is subnormal (or zero): round |f| * 2^24 to an integer, ties to even
        const int shift = 126 - int(abs >> 23);  // 14 + (113 - exp)
        if (shift > 24) return {sign};
        const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
        const uint32_t q = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1u);
        const uint32_t halfway = 1u << (shift - 1);
        const uint32_t r = q + ((rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u);
        return {uint16_t(sign | r)};
    }
    // normal: rebias exponent, round mantissa to 10 bits, ties to even (carry may bump exponent)
    const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return {uint16_t(sign | ((rounded - 0x38000000u) >> 13))};
}
#endif

inline float to_float(bfloat16_t b) { return bits_to_float(uint32_t(b.bits) << 16); }

inline bfloat16_t to_bfloat16(float f) {
    const uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // quiet NaN
    return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

template <class T> inline acc_t<T> load(const T& v) {
    if constexpr (std::is_same_v<T, half_t> || std::is_same_v<T, bfloat16_t>) return to_float(v);
    else return v;
}

template <class T> inline T store(acc_t<T> v) {
    if constexpr (std::is_same_v<T, half_t>) return to_half(v);
    else if constexpr (std::is_same_v<T, bfloat16_t>) return to_bfloat16(v);
    else return v;
}

// The CPU storage type of each dtype code (numerics.hpp's visit_dtype<HostStorage>).
template <int32_t D> struct HostStorage;
template <> struct HostStorage<PYBN_FLOAT32> { using type = float; };
template <> struct HostStorage<PYBN_FLOAT64> { using type = double; };
template <> struct HostStorage<PYBN_FLOAT16> { using type = half_t; };
template <> struct HostStorage<PYBN_BFLOAT16> { using type = bfloat16_t; };

}  // namespace PYBN_ISA_TAG
}  // namespace pybn
