// SIMD helpers of the CPU kernels: vectors of this unit's width, 16-bit conversions a vector at a
// time, widening float32 sums into float64, streaming stores.
// Part of cpu_kernels.inl (included inside its namespaces, once per instruction-set unit).

// Vector width of this unit: the flags it was compiled with decide.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// GCC / Clang vector extensions: the same source becomes SSE2, AVX2 or AVX-512 code.
template <class A> struct VecOf { typedef A type __attribute__((vector_size(kVecBytes))); };
template <class A> using vec = typename VecOf<A>::type;
template <class A> constexpr int kLanesOf = kVecBytes / int(sizeof(A));

template <class A> inline vec<A> vload(const A* p) {
    vec<A> v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
template <class A> inline void vstore(A* p, const vec<A>& v) { __builtin_memcpy(p, &v, sizeof v); }
template <class A> inline vec<A> vsplat(A a) { return vec<A>{} + a; }

// Store bypassing the caches (no read of the destination line first); p aligned to kVecBytes.
template <class A> inline void vstream(A* p, const vec<A>& v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(A) == 4) _mm512_stream_ps(reinterpret_cast<float*>(p), (__m512)v);
    else _mm512_stream_pd(reinterpret_cast<double*>(p), (__m512d)v);
#elif defined(__AVX__)
    if constexpr (sizeof(A) == 4) _mm256_stream_ps(reinterpret_cast<float*>(p), (__m256)v);
    else _mm256_stream_pd(reinterpret_cast<double*>(p), (__m256d)v);
#elif defined(__SSE2__)
    if constexpr (sizeof(A) == 4) _mm_stream_ps(reinterpret_cast<float*>(p), (__m128)v);
    else _mm_stream_pd(reinterpret_cast<double*>(p), (__m128d)v);
#else
    vstore(p, v);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

// acc += v, widening float lanes into two float64 vectors (low half, high half); for double
// vectors, a plain add into lo.
template <class A> PYBN_INLINE void widen_add(const vec<A>& v, vec<double>& lo, vec<double>& hi) {
    if constexpr (sizeof(A) == 8) {
        (void)hi;
        lo += v;
    } else {
        // GCC 12 lowers __builtin_convertvector(float x 4 -> double x 4) two lanes at a time, so
        // the widening uses the instructions directly (masked AVX-512 forms: GCC 12 warns on the
        // plain ones' undefined operands).
#if defined(__AVX512F__)
        const __m512 f = (__m512)v;
        lo += (vec<double>)_mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, f, 0));
        hi += (vec<double>)_mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, f, 1));
#elif defined(__AVX__)
        const __m256 f = (__m256)v;
        lo += (vec<double>)_mm256_cvtps_pd(_mm256_castps256_ps128(f));
        hi += (vec<double>)_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
#elif defined(__SSE2__)
        const __m128 f = (__m128)v;
        lo += (vec<double>)_mm_cvtps_pd(f);
        hi += (vec<double>)_mm_cvtps_pd(_mm_movehl_ps(f, f));
#else
        typedef float half_vec __attribute__((vector_size(kVecBytes / 2)));
        half_vec a, b;
        __builtin_memcpy(&a, &v, sizeof a);
        __builtin_memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
        lo += __builtin_convertvector(a, vec<double>);
        hi += __builtin_convertvector(b, vec<double>);
#endif
    }
}

// Lanes of float64 vectors added in a fixed order.
template <int N> inline double hsum(const vec<double> (&v)[N]) {
    double s = 0;
    for (int k = 0; k < N; ++k)
        for (int l = 0; l < kLanesOf<double>; ++l) s += v[k][l];
    return s;
}

template <class T> constexpr bool kNative = std::is_same_v<T, acc_t<T>>;

// 16-bit values to float and back, a vector at a time: bfloat16 by shifts, float16 with the
// F16C instructions where this unit has them; the rest (and the tails) one value at a time.
typedef uint16_t u16vec __attribute__((vector_size(kVecBytes / 2)));
typedef uint32_t u32vec __attribute__((vector_size(kVecBytes)));
typedef int32_t i32vec __attribute__((vector_size(kVecBytes)));
constexpr int kLanes32 = kVecBytes / 4;

// kLanes32 values of T at p as a vector of acc_t<T>, and back (bfloat16 rounded to nearest even,
// a NaN kept as a quiet NaN; float16 through F16C where this unit has it, else one lane at a
// time): bitwise the scalar load / store of dtype.hpp.
template <class T> PYBN_INLINE vec<acc_t<T>> vload_as(const T* p) {
    if constexpr (kNative<T>) {
        return vload(p);
    } else if constexpr (std::is_same_v<T, bfloat16_t>) {
        // one zero-extending load and a shift (GCC lowers the vector-extension form below to five
        // instructions with a cross-lane insert on AVX2); the lanes keep their order
#if defined(__AVX512F__)
        // (masked forms: GCC 12 warns on the plain ones' undefined operands)
        return (vec<float>)_mm512_castsi512_ps(_mm512_maskz_slli_epi32(
            0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#elif defined(__AVX2__)
        return (vec<float>)_mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
        u16vec h;
        __builtin_memcpy(&h, p, sizeof h);
        const u32vec w = __builtin_convertvector(h, u32vec) << 16;
        vec<float> f;
        __builtin_memcpy(&f, &w, sizeof f);
        return f;
#endif
    } else {
#if defined(__AVX512F__)
        // masked forms: GCC 12 warns on the plain ones' undefined operands
        return (vec<float>)_mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX__)
        return (vec<float>)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
        vec<float> f;
        for (int l = 0; l < kLanes32; ++l) f[l] = load(p[l]);
        return f;
#endif
    }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// bfloat16 rounding of 8 floats to nearest even, each result in the low 16 bits of its 32-bit
// lane, ready for packus. Without NaNs: (u + 0x7fff + lsb) >> 16, 5 instructions.
PYBN_INLINE __m256i bf16_round_finite_avx2(__m256i u) {
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
}
// Any floats, a NaN kept as a quiet NaN (found by an unordered compare): 8 instructions (GCC
// makes ~20 of the vector-extension form).
PYBN_INLINE __m256i bf16_round_avx2(__m256 f) {
    const __m256i u = _mm256_castps_si256(f), hi = _mm256_srli_epi32(u, 16);
    const __m256i r = bf16_round_finite_avx2(u);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}
#endif

template <class T> PYBN_INLINE void vstore_as(T* p, const vec<acc_t<T>>& v) {
    if constexpr (kNative<T>) {
        vstore(p, v);
    } else if constexpr (std::is_same_v<T, bfloat16_t>) {
#if defined(__AVX2__) && !defined(__AVX512F__)
        const __m256i b = bf16_round_avx2((__m256)v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                         _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
#else
        u32vec u;
        __builtin_memcpy(&u, &v, sizeof u);
        const i32vec nan = (u & 0x7fffffffu) > 0x7f800000u;
        const u32vec r = nan ? ((u >> 16) | 0x40u) : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        const u16vec h = __builtin_convertvector(r, u16vec);
        __builtin_memcpy(p, &h, sizeof h);
#endif
    } else {
#if defined(__AVX512F__)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                            _mm512_maskz_cvtps_ph(0xFFFF, (__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__) && defined(__AVX__)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
        for (int l = 0; l < kLanes32; ++l) p[l] = store<T>(v[l]);
#endif
    }
}

// Two vectors of T values (2 x kLanes32, in order) from two acc_t<T> vectors: bitwise two
// vstore_as calls; bfloat16 on AVX2 packs both roundings with one packus and one lane permute
// into one 256-bit store (instead of an extract, a pack and a 128-bit store per vector).
#if defined(__AVX2__) && !defined(__AVX512F__)
// 16 bfloat16 values (a's 8, then b's) rounded from two float32 vectors, in one 256-bit register.
// Each 128-bit half packs its own lanes: a's 4 + b's 4, so the halves' middle quarters swap.
PYBN_INLINE __m256i bf16_packed_avx2(__m256 fa, __m256 fb) {
    __m256i ra, rb;
    if (__builtin_expect(_mm256_testz_ps(_mm256_cmp_ps(fa, fb, _CMP_UNORD_Q), _mm256_set1_ps(-0.0f)), 1)) {
        // no NaN in either (one compare for both): the rounding alone, 5 instructions each
        ra = bf16_round_finite_avx2(_mm256_castps_si256(fa));
        rb = bf16_round_finite_avx2(_mm256_castps_si256(fb));
    } else {
        ra = bf16_round_avx2(fa);
        rb = bf16_round_avx2(fb);
    }
    return _mm256_packus_epi32(ra, rb);
}
PYBN_INLINE __m256i bf16_round2_avx2(__m256 fa, __m256 fb) {
    return _mm256_permute4x64_epi64(bf16_packed_avx2(fa, fb), 0xD8);
}
#endif

template <class T> PYBN_INLINE void vstore2_as(T* p, const vec<acc_t<T>>& a, const vec<acc_t<T>>& b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (std::is_same_v<T, bfloat16_t>) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_round2_avx2((__m256)a, (__m256)b));
        return;
    }
#endif
    vstore_as(p, a);
    vstore_as(p + kLanesOf<acc_t<T>>, b);
}

template <class T> inline void to_acc(const T* p, int64_t n, acc_t<T>* out) {
    constexpr int L = kLanesOf<acc_t<T>>;
    int64_t i = 0;
    for (; i + L <= n; i += L) vstore(out + i, vload_as(p + i));
    for (; i < n; ++i) out[i] = load(p[i]);
}

// Elements between per-column accumulator arrays of W columns: W rounded up to a cache line,
// moved off multiples of 4 KiB (arrays exactly 4 KiB apart make a store to one and a load from
// the next look dependent to the CPU: "4K aliasing").
template <class E> inline int64_t spaced(int64_t W) {
    int64_t bytes = (W * int64_t(sizeof(E)) + 63) / 64 * 64;
    if (bytes % 4096 < 256 || bytes % 4096 > 4096 - 256) bytes += 512;
    return bytes / int64_t(sizeof(E));
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }


// A vector of T values from an acc_t<T> vector, stored bypassing the caches (no read of the
// destination line first; p aligned to the stored bytes). 16-bit values go through vstore_as'
// conversion, then a 128- / 256-bit streaming store (SSE2-only units store normally).
template <class T> PYBN_INLINE void vstream_as(T* p, const vec<acc_t<T>>& v) {
    if constexpr (kNative<T>) {
        vstream(p, v);
    } else {
#if defined(__AVX512F__)
        alignas(32) T h[kLanes32];
        vstore_as(h, v);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
#elif defined(__AVX__)
        alignas(16) T h[kLanes32];
        vstore_as(h, v);
        _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm_load_si128(reinterpret_cast<const __m128i*>(h)));
#else
        vstore_as(p, v);
#endif
    }
}

// Two vectors as vstore2_as, stored bypassing the caches (p aligned to the bytes of both). On
// AVX2 16-bit values leave in one 256-bit streaming store: bfloat16 through vstore2_as' paired
// rounding, float16 through two conversions joined in one register.
template <class T> PYBN_INLINE void vstream2_as(T* p, const vec<acc_t<T>>& a, const vec<acc_t<T>>& b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (std::is_same_v<T, bfloat16_t>) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_round2_avx2((__m256)a, (__m256)b));
        return;
    }
#if defined(__F16C__)
    if constexpr (std::is_same_v<T, half_t>) {
        const __m128i ha = _mm256_cvtps_ph((__m256)a, _MM_FROUND_TO_NEAREST_INT);
        const __m128i hb = _mm256_cvtps_ph((__m256)b, _MM_FROUND_TO_NEAREST_INT);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_inserti128_si256(_mm256_castsi128_si256(ha), hb, 1));
        return;
    }
#endif
#endif
    vstream_as(p, a);
    vstream_as(p + kLanesOf<acc_t<T>>, b);
}

// Pairs of vectors in a lane order of their own, for work that treats every lane alike (the row
// path: one channel's coefficients in every lane). A pair covers 2 x kLanes32 values from p;
// vload_pair<T, 0> and <T, 1> give its two vectors and vstore_pair / vstream_pair write them
// back in place, so the values stored are those vstore2_as would store, bitwise, whatever the
// order. bfloat16 on AVX2 is the case that gains: one 256-bit load widened by two unpacks with
// zero (values 0-3 and 8-11, then 4-7 and 12-15), and a packus that restores the order with no
// lane permute. 10 instructions a pair fewer on the shift and shuffle ports than vload_as'
// zero-extend and shift and vstore2_as' permute. Everything else: the ordered vectors.
template <class T> constexpr bool kPermutedPairs =
#if defined(__AVX2__) && !defined(__AVX512F__)
    std::is_same_v<T, bfloat16_t>;
#else
    false;
#endif

template <class T, int kHalf> PYBN_INLINE vec<acc_t<T>> vload_pair(const T* p) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (std::is_same_v<T, bfloat16_t>) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), z = _mm256_setzero_si256();
        return (vec<float>)_mm256_castsi256_ps(kHalf == 0 ? _mm256_unpacklo_epi16(z, v) : _mm256_unpackhi_epi16(z, v));
    }
#endif
    return vload_as(p + kHalf * kLanesOf<acc_t<T>>);
}

template <class T> PYBN_INLINE void vstore_pair(T* p, const vec<acc_t<T>>& a, const vec<acc_t<T>>& b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (std::is_same_v<T, bfloat16_t>) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_packed_avx2((__m256)a, (__m256)b));
        return;
    }
#endif
    vstore2_as(p, a, b);
}

template <class T> PYBN_INLINE void vstream_pair(T* p, const vec<acc_t<T>>& a, const vec<acc_t<T>>& b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (std::is_same_v<T, bfloat16_t>) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_packed_avx2((__m256)a, (__m256)b));
        return;
    }
#endif
    vstream2_as(p, a, b);
}
