// Normalisation and the fused training forward.
// Part of cpu_kernels.inl (included inside its namespaces, once per instruction-set unit).

// The normalisation y = ((x - hi) - lo) * scale + shift, written once for vectors and scalars,
// row and column paths. (The backward's dx = a dy + b (x - m) + c stays written out in its two
// loops: as a function GCC contracts it into FMAs differently for 16-bit data, which changed
// the last bit of some float16 dx values; bench/NOTES.md, step 23.)
template <class V> PYBN_INLINE V normalized(V x, V hi, V lo, V scale, V shift) { return ((x - hi) - lo) * scale + shift; }

// The fused epilogue, per value: + residual (kRes), then ReLU (kRelu: max(0, v) with NaN kept).
template <bool kRelu, bool kRes, class V> PYBN_INLINE V epilogue_of(V v, V z) {
    if constexpr (kRes) v = v + z;
    if constexpr (kRelu) v = (v < V{}) ? V{} : v;
    return v;
}

// Row path: one channel's run of n values with scalar coefficients (h[0] ... b[0]); z: the
// residual's run (kRes).
template <class T, bool kRelu, bool kRes>
PYBN_INLINE void normalize_values(const T* x, const T* z, T* y, int64_t n, bool stream, const acc_t<T>* h,
                                  const acc_t<T>* l, const acc_t<T>* a, const acc_t<T>* b) {
    using A = acc_t<T>;
    const vec<A> H = vsplat(h[0]), Lo = vsplat(l[0]), S = vsplat(a[0]), B = vsplat(b[0]);
    write_run_uniform<T>(
        y, n, stream,
        [&](int64_t i, auto ld) {
            return epilogue_of<kRelu, kRes>(normalized(ld(x + i), H, Lo, S, B), kRes ? ld(z + i) : vec<A>{});
        },
        [&](int64_t i) {
            return epilogue_of<kRelu, kRes>(normalized(load(x[i]), h[0], l[0], a[0], b[0]), kRes ? load(z[i]) : A(0));
        });
}

// Column path: n values (whole rows) with per-column coefficients from ColumnCoefs.
template <class T, bool kRelu, bool kRes>
void normalize_cols(const T* x, const T* z, T* y, int64_t n, const ColumnCoefs<acc_t<T>>& e, bool stream) {
    using A = acc_t<T>;
    const A *h = e[0], *l = e[1], *a = e[2], *b = e[3];
    const auto scalar = [&](int64_t i, int64_t k) {
        return epilogue_of<kRelu, kRes>(normalized(load(x[i]), h[k], l[k], a[k], b[k]), kRes ? load(z[i]) : A(0));
    };
    if (e.zero_lo) {
        // inference: lo == +0 everywhere, and (v - hi) - 0 is (v - hi) for every v (its NaNs
        // already quiet): one coefficient load and one subtraction fewer a vector, bitwise the same
        write_cols<T>(y, n, e.P, stream,
            [&](int64_t i, int64_t k) {
                return epilogue_of<kRelu, kRes>((vload_as(x + i) - vload(h + k)) * vload(a + k) + vload(b + k),
                                                kRes ? vload_as(z + i) : vec<A>{});
            },
            scalar);
        return;
    }
    write_cols<T>(y, n, e.P, stream,
        [&](int64_t i, int64_t k) {
            return epilogue_of<kRelu, kRes>(
                normalized(vload_as(x + i), vload(h + k), vload(l + k), vload(a + k), vload(b + k)),
                kRes ? vload_as(z + i) : vec<A>{});
        },
        scalar);
}

// The elementwise sweep of a forward over the row path's rows [c0, c1) (row_only, on nt
// threads) or the whole view (by ghost batches when ops.groups > 1), with the epilogue of `ops`.
template <class T>
void normalize_sweep(const pybn_view& v, const T* x, T* y, const acc_t<T>* k, const OutputOps& ops, bool row_only,
                     int64_t c0, int64_t c1, int nt = 0) {
    using A = acc_t<T>;
    const int64_t C = v.channels, W = C * v.inner;
    const bool stream = stream_sweep<T>(v);
    const T* z = static_cast<const T*>(ops.residual);
    with_flags(ops.activation == PYBN_ACTIVATION_RELU, z != nullptr, [&](auto relu, auto res) {
        constexpr bool kRelu = decltype(relu)::value, kRes = decltype(res)::value;
        // the row path's step for values from `base` with the coefficients kk
        auto row_of = [&](int64_t base, const A* kk) {
            return [=](int64_t off, int64_t len, int64_t c) {
                off += base;
                normalize_values<T, kRelu, kRes>(x + off, kRes ? z + off : nullptr, y + off, len, stream, kk + c,
                                                 kk + C + c, kk + 2 * C + c, kk + 3 * C + c);
            };
        };
        if (row_only) {
            elementwise_rows(v, c0, c1, row_of(0, k), nt > 0 ? nt : num_threads());
            return;
        }
        for_groups(v, ops.groups, k, [&](const pybn_view& g, int64_t base, const A* kg, const ColumnCoefs<A>& e) {
            elementwise(g, row_of(base, kg), [&](int64_t off, int64_t rows) {
                off += base;
                normalize_cols<T, kRelu, kRes>(x + off, kRes ? z + off : nullptr, y + off, rows * W, e, stream);
            });
        });
    });
}

template <class T>
void normalize_t(const pybn_view& v, const void* xv, const void* coefv, void* yv, const OutputOps& ops) {
    normalize_sweep<T>(v, static_cast<const T*>(xv), static_cast<T*>(yv), static_cast<const acc_t<T>*>(coefv), ops,
                       false, 0, v.channels);
}

template <class T>
void forward_train_t(const pybn_view& v, const void* xv, void* yv, const ForwardEpilogue& epilogue,
                     const OutputOps& ops) {
    using A = acc_t<T>;
    const int64_t C = v.channels;
    Scratch coef(sizeof(A) * 4 * size_t(C)), mean(sizeof(double) * size_t(C)), m2(sizeof(double) * size_t(C));
    if (v.inner < kRowMin) {
        batch_stats_t<T>(v, xv, mean.as<double>(), m2.as<double>());
        epilogue(0, C, mean.as<double>(), m2.as<double>(), coef.as<A>());
        normalize_t<T>(v, xv, coef.as<A>(), yv, ops);
        return;
    }
    const T* x = static_cast<const T*>(xv);
    T* y = static_cast<T*>(yv);
    const A* k = coef.as<A>();
    if (const CoreBlocks cb = core_blocks(v, sizeof(T)); cb.nb > 0) {  // per-core channel blocks
        for_core_blocks<Moments>(v, cb, MomentsRun<T>{x}, [&](int64_t c0, int64_t c1, const Moments* out, double* s) {
            const int64_t B = cb.B;
            for (int64_t c = 0; c < c1 - c0; ++c) {
                s[c] = out[c].mean();
                s[B + c] = out[c].m2;
            }
            epilogue(c0, c1, s, s + B, coef.as<A>());
            normalize_sweep<T>(v, x, y, k, ops, true, c0, c1, 1);
        });
        return;
    }
    const int64_t G = channel_group(v, sizeof(T));
    const RowScratch<Moments, MomentsRun<T>> scratch(v, G, num_threads());
    Scratch mom(sizeof(Moments) * size_t(G));
    for (int64_t c0 = 0; c0 < C; c0 += G) {
        const int64_t c1 = min64(C, c0 + G);
        reduce_rows(v, c0, c1, scratch, mom.as<Moments>(), MomentsRun<T>{x});
        for (int64_t c = 0; c < c1 - c0; ++c) {
            mean.as<double>()[c] = mom.as<Moments>()[c].mean();
            m2.as<double>()[c] = mom.as<Moments>()[c].m2;
        }
        epilogue(c0, c1, mean.as<double>(), m2.as<double>(), coef.as<A>());
        normalize_sweep<T>(v, x, y, k, ops, true, c0, c1);
    }
}
