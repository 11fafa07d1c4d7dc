// Normalisation and the fused training forward.
// Part of cpu_kernels.inl (included inside its namespaces, once per instruction-set unit).

// The normalisation y = ((x - hi) - lo) * scale + shift, written once for vectors and scalars,
// row and column paths. (The backward's dx = a dy + b (x - m) + c stays written out in its two
// loops: as a function GCC contracts it into FMAs differently for 16-bit data, which changed
// the last bit of some float16 dx values; bench/NOTES.md, step 23.)
template <class V> PYBN_INLINE V normalized(V x, V hi, V lo, V scale, V shift) { return ((x - hi) - lo) * scale + shift; }

// Row path: one channel's run of n values with scalar coefficients (h[0] ... b[0]).
template <class T>
PYBN_INLINE void normalize_values(const T* x, T* y, int64_t n, bool stream, const acc_t<T>* h, const acc_t<T>* l,
                                  const acc_t<T>* a, const acc_t<T>* b) {
    using A = acc_t<T>;
    const vec<A> H = vsplat(h[0]), Lo = vsplat(l[0]), S = vsplat(a[0]), B = vsplat(b[0]);
    write_run<T>(y, n, stream, [&](int64_t i) { return normalized(vload_as(x + i), H, Lo, S, B); },
                 [&](int64_t i) { return normalized(load(x[i]), h[0], l[0], a[0], b[0]); });
}

// Column path: n values (whole rows) with per-column coefficients from ColumnCoefs.
template <class T>
void normalize_cols(const T* x, T* y, int64_t n, const ColumnCoefs<acc_t<T>>& e, bool stream) {
    const acc_t<T> *h = e[0], *l = e[1], *a = e[2], *b = e[3];
    write_cols<T>(y, n, e.P, stream,
        [&](int64_t i, int64_t k) {
            return normalized(vload_as(x + i), vload(h + k), vload(l + k), vload(a + k), vload(b + k));
        },
        [&](int64_t i, int64_t k) { return normalized(load(x[i]), h[k], l[k], a[k], b[k]); });
}

template <class T>
void normalize_t(const pybn_view& v, const void* xv, const void* coefv, void* yv) {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(xv);
    T* y = static_cast<T*>(yv);
    const A* k = static_cast<const A*>(coefv);
    const int64_t C = v.channels, W = C * v.inner;
    const bool stream = stream_output(v.outer * W * int64_t(sizeof(T)));
    const ColumnCoefs<A> e(k, C, v.inner, v.inner < kRowMin);
    elementwise(
        v,
        [&](int64_t off, int64_t len, int64_t c) {
            normalize_values(x + off, y + off, len, stream, k + c, k + C + c, k + 2 * C + c, k + 3 * C + c);
        },
        [&](int64_t off, int64_t rows) { normalize_cols<T>(x + off, y + off, rows * W, e, stream); });
}

template <class T>
void forward_train_t(const pybn_view& v, const void* xv, void* yv, const ForwardEpilogue& epilogue) {
    using A = acc_t<T>;
    const int64_t C = v.channels;
    Scratch coef(sizeof(A) * 4 * size_t(C)), mean(sizeof(double) * size_t(C)), m2(sizeof(double) * size_t(C));
    if (v.inner < kRowMin) {
        batch_stats_t<T>(v, xv, mean.as<double>(), m2.as<double>());
        epilogue(0, C, mean.as<double>(), m2.as<double>(), coef.as<A>());
        normalize_t<T>(v, xv, coef.as<A>(), yv);
        return;
    }
    const T* x = static_cast<const T*>(xv);
    T* y = static_cast<T*>(yv);
    const int64_t G = channel_group(v, sizeof(T));
    const bool stream = stream_output(v.outer * C * v.inner * int64_t(sizeof(T)));
    const RowScratch<Moments, MomentsRun<T>> scratch(v, G, num_threads());
    Scratch mom(sizeof(Moments) * size_t(G));
    const A* k = coef.as<A>();
    for (int64_t c0 = 0; c0 < C; c0 += G) {
        const int64_t c1 = min64(C, c0 + G);
        reduce_rows(v, c0, c1, scratch, mom.as<Moments>(), MomentsRun<T>{x});
        for (int64_t c = 0; c < c1 - c0; ++c) {
            mean.as<double>()[c] = mom.as<Moments>()[c].mean();
            m2.as<double>()[c] = mom.as<Moments>()[c].m2;
        }
        epilogue(c0, c1, mean.as<double>(), m2.as<double>(), coef.as<A>());
        elementwise_rows(v, c0, c1, [&](int64_t off, int64_t len, int64_t c) {
            normalize_values(x + off, y + off, len, stream, k + c, k + C + c, k + 2 * C + c, k + 3 * C + c);
        });
    }
}
