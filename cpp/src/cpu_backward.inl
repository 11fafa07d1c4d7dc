// Backward: the reduction (sum dy, sum dy (x - mean), sum (x - mean)), the elementwise dx and the
// fused backward.
// Part of cpu_kernels.inl (included inside its namespaces, once per instruction-set unit).

// ---------------------------------------------------------------------------------------------
// Backward reduction: sum(dy), sum(dy * (x - mean)), sum(x - mean) in one sweep.

// The terms of the backward sums, for the row runs (run_sums) and the column tiles
// (tile_reduce): dy, dy * (x - mean), x - mean; row blocks of kDepth vectors.
struct SumTerms {
    static constexpr int kSums = 3, kInputs = 2, kUnroll = 1;
    static constexpr bool kAssignFirst = false;
    template <class V> static PYBN_INLINE void row(V (&t)[3], const V (&in)[2], V mean) {
        const V d = in[1] - mean;
        t[0] = in[0];
        t[1] = in[0] * d;
        t[2] = d;
    }
};

// The same behind a ReLU: the gradient reaching the BN is dy where the forward's output y > 0,
// else 0 (0 at the tie y == 0 and for a NaN y).
template <class V> PYBN_INLINE V relu_masked(V dy, V y) { return (y > V{}) ? dy : V{}; }
struct ReluSumTerms {
    static constexpr int kSums = 3, kInputs = 3, kUnroll = 1;
    static constexpr bool kAssignFirst = false;
    template <class V> static PYBN_INLINE void row(V (&t)[3], const V (&in)[3], V mean) {
        const V d = in[1] - mean;
        const V g = relu_masked(in[0], in[2]);
        t[0] = g;
        t[1] = g * d;
        t[2] = d;
    }
};

// Backward sums of the runs of a channel (reduce_rows); Terms: SumTerms (dy, x) or
// ReluSumTerms (dy, x, y).
template <class T, class Terms = SumTerms> struct SumsRun {
    using A = acc_t<T>;
    static constexpr int64_t kRowValueBytes = Terms::kInputs * sizeof(T);  // bytes read per value of a row
    struct State {
        WideSums<3> w;
    };
    const T *dy, *x, *y;
    const A* mean;
    PYBN_INLINE void begin(State& s, int64_t, int64_t) const { zero(s.w); }
    PYBN_INLINE void add(State& s, int64_t c, int64_t off, int64_t len) const {
        WideSums<3> w = s.w;  // in registers for the row (the state may live in memory)
        if constexpr (Terms::kInputs == 3) run_sums<Terms>({dy + off, x + off, y + off}, len, mean[c], w);
        else run_sums<Terms>({dy + off, x + off}, len, mean[c], w);
        s.w = w;
    }
    Sums end(const State& s, int64_t) const {
        Sums r;
        r.dy = s.w.total(0);
        r.dy_xmu = s.w.total(1);
        r.xmu = s.w.total(2);
        return r;
    }
};

template <class T, class Terms = SumTerms>
void backward_reduce_t(const pybn_view& v, const void* dyv, const void* xv, const void* meanv,
                       double* sum_dy, double* sum_dy_xmu, double* sum_xmu, const void* yv = nullptr) {
    using A = acc_t<T>;
    const T* dy = static_cast<const T*>(dyv);
    const T* x = static_cast<const T*>(xv);
    const T* y = static_cast<const T*>(yv);
    const A* mean = static_cast<const A*>(meanv);
    const int64_t C = v.channels, inner = v.inner, W = C * inner;
    Scratch result(sizeof(Sums) * size_t(C));
    Sums* sums = result.as<Sums>();
    if (inner >= kRowMin) {
        const RowScratch<Sums, SumsRun<T, Terms>> scratch(v, C, num_threads());
        reduce_rows(v, 0, C, scratch, sums, SumsRun<T, Terms>{dy, x, y, mean});
    } else {
        const int nt = num_threads();
        const int64_t R = kTileRows;
        Scratch mcol(sizeof(A) * size_t(W));
        const int64_t wa = spaced<A>(W), wd = spaced<double>(W);
        const bool ahead = fetch_ahead<T>(v, Terms::kInputs);
        Scratch dsum(sizeof(double) * 3 * size_t(wd) * size_t(nt)), asum(sizeof(A) * 3 * size_t(wa) * size_t(nt));
        A* m = mcol.as<A>();
        for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < inner; ++i) m[c * inner + i] = mean[c];
        reduce_cols<Sums>(v, nt, sums, [&](int64_t o0, int64_t o1, Sums* cols, int t) {
            double* D = dsum.as<double>(size_t(3 * wd * t));
            for (int64_t j = 0; j < 3 * wd; ++j) D[j] = 0;
            for (int64_t r0 = o0; r0 < o1; r0 += R) {
                const int64_t rows = min64(R, o1 - r0);
                A* acc = asum.as<A>(size_t(3 * wa * t));
                if constexpr (Terms::kInputs == 3)
                    tile_reduce<Terms>({dy + r0 * W, x + r0 * W, y + r0 * W}, W, rows, m, acc, wa, D, wd, ahead);
                else
                    tile_reduce<Terms>({dy + r0 * W, x + r0 * W}, W, rows, m, acc, wa, D, wd, ahead);
            }
            for (int64_t j = 0; j < W; ++j) {
                cols[j].dy = D[j];
                cols[j].dy_xmu = D[wd + j];
                cols[j].xmu = D[2 * wd + j];
            }
        });
    }
    for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] = sums[c].dy;
        sum_dy_xmu[c] = sums[c].dy_xmu;
        if (sum_xmu) sum_xmu[c] = sums[c].xmu;
    }
}

// Without an activation or a residual gradient: dx = a dy + b (x - m) + c, or a dy when x is
// null (frozen statistics), over one channel's run. Kept as written before the fused epilogues
// (below): expressed through Grad, GCC contracts it into FMAs differently for float16 data and
// changes last bits (bench/NOTES.md, step 24).
template <class T>
PYBN_INLINE void backward_values(const T* dy, const T* x, T* dx, int64_t n, bool stream, const acc_t<T>* m,
                                 const acc_t<T>* a, const acc_t<T>* b, const acc_t<T>* c) {
    using A = acc_t<T>;
    const vec<A> Av = vsplat(a[0]), Bv = vsplat(b[0]), Mv = vsplat(m[0]), Cv = vsplat(c[0]);
    if (x == nullptr)
        write_run_uniform<T>(dx, n, stream, [&](int64_t i, auto ld) { return Av * ld(dy + i); },
                             [&](int64_t i) { return a[0] * load(dy[i]); });
    else
        write_run_uniform<T>(dx, n, stream,
                             [&](int64_t i, auto ld) { return Av * ld(dy + i) + Bv * (ld(x + i) - Mv) + Cv; },
                             [&](int64_t i) { return a[0] * load(dy[i]) + b[0] * (load(x[i]) - m[0]) + c[0]; });
}

// dx = a dy + b (x - m) + c, or a dy when x is null (inference).
template <class T>
void backward_cols(const T* dy, const T* x, T* dx, int64_t n, const ColumnCoefs<acc_t<T>>& e, bool stream) {
    const acc_t<T> *m = e[0], *a = e[1], *b = e[2], *c = e[3];
    if (x == nullptr) {
        write_cols<T>(dx, n, e.P, stream, [&](int64_t i, int64_t k) { return vload(a + k) * vload_as(dy + i); },
                      [&](int64_t i, int64_t k) { return a[k] * load(dy[i]); });
        return;
    }
    write_cols<T>(dx, n, e.P, stream,
        [&](int64_t i, int64_t k) {
            return vload(a + k) * vload_as(dy + i) + vload(b + k) * (vload_as(x + i) - vload(m + k)) + vload(c + k);
        },
        [&](int64_t i, int64_t k) { return a[k] * load(dy[i]) + b[k] * (load(x[i]) - m[k]) + c[k]; });
}

// The gradient reaching the BN, g = dy (masked by y > 0 behind a ReLU: kRelu), and the
// residual's gradient dres = g (kRes), for a vector at i / a value at i.
template <class T, bool kRelu, bool kRes> struct Grad {
    using A = acc_t<T>;
    const T *dy, *y;
    T* dres;
    PYBN_INLINE vec<A> at(int64_t i) const {
        return at(i, [](const T* p) { return vload_as(p); });
    }
    // with the inputs loaded through ld (write_run_uniform's loaders; not with kRes, whose store
    // of dres is in memory order)
    template <class Ld> PYBN_INLINE vec<A> at(int64_t i, Ld ld) const {
        vec<A> g = ld(dy + i);
        if constexpr (kRelu) g = relu_masked(g, ld(y + i));
        if constexpr (kRes) vstore_as(dres + i, g);
        return g;
    }
    PYBN_INLINE A one(int64_t i) const {
        A g = load(dy[i]);
        if constexpr (kRelu) g = relu_masked(g, load(y[i]));
        if constexpr (kRes) dres[i] = store<T>(g);
        return g;
    }
};

// With the fused epilogues (kRelu / kRes): dx = a g + b (x - m) + c, or a g when x is null
// (frozen statistics), over one channel's run; with dx null only dres = g is written.
template <class T, bool kRelu, bool kRes>
PYBN_INLINE void backward_values_fused(const Grad<T, kRelu, kRes>& g, const T* x, T* dx, int64_t n, bool stream,
                                 const acc_t<T>* m, const acc_t<T>* a, const acc_t<T>* b, const acc_t<T>* c) {
    using A = acc_t<T>;
    const vec<A> Av = vsplat(a[0]), Bv = vsplat(b[0]), Mv = vsplat(m[0]), Cv = vsplat(c[0]);
    if (dx == nullptr) {  // the residual's gradient alone
        const Grad<T, kRelu, false> only{g.dy, g.y, nullptr};
        write_run<T>(g.dres, n, false, [&](int64_t i) { return only.at(i); }, [&](int64_t i) { return only.one(i); });
    } else if (x == nullptr) {
        write_run_uniform<T, !kRes>(dx, n, stream, [&](int64_t i, auto ld) { return Av * g.at(i, ld); },
                                    [&](int64_t i) { return a[0] * g.one(i); });
    } else {
        write_run_uniform<T, !kRes>(dx, n, stream,
                                    [&](int64_t i, auto ld) { return Av * g.at(i, ld) + Bv * (ld(x + i) - Mv) + Cv; },
                                    [&](int64_t i) { return a[0] * g.one(i) + b[0] * (load(x[i]) - m[0]) + c[0]; });
    }
}

// The same with per-column coefficients (column path), n values of whole rows.
template <class T, bool kRelu, bool kRes>
void backward_cols_fused(const Grad<T, kRelu, kRes>& g, const T* x, T* dx, int64_t n, const ColumnCoefs<acc_t<T>>& e,
                   bool stream) {
    const acc_t<T> *m = e[0], *a = e[1], *b = e[2], *c = e[3];
    if (dx == nullptr) {
        const Grad<T, kRelu, false> only{g.dy, g.y, nullptr};
        write_cols<T>(g.dres, n, e.P, false, [&](int64_t i, int64_t) { return only.at(i); },
                      [&](int64_t i, int64_t) { return only.one(i); });
    } else if (x == nullptr) {
        write_cols<T>(dx, n, e.P, stream, [&](int64_t i, int64_t k) { return vload(a + k) * g.at(i); },
                      [&](int64_t i, int64_t k) { return a[k] * g.one(i); });
    } else {
        write_cols<T>(dx, n, e.P, stream,
            [&](int64_t i, int64_t k) {
                return vload(a + k) * g.at(i) + vload(b + k) * (vload_as(x + i) - vload(m + k)) + vload(c + k);
            },
            [&](int64_t i, int64_t k) { return a[k] * g.one(i) + b[k] * (load(x[i]) - m[k]) + c[k]; });
    }
}

// The elementwise sweep of a backward over the row path's rows [c0, c1) (row_only, on nt
// threads) or the whole view (by ghost batches when ops.groups > 1), with the activation and
// residual gradient of `ops`.
template <class T>
void backward_sweep(const pybn_view& v, const T* dy, const T* x, T* dx, const acc_t<T>* k, const GradOps& ops,
                    bool row_only, int64_t c0, int64_t c1, int nt = 0) {
    using A = acc_t<T>;
    const int64_t C = v.channels, W = C * v.inner;
    const bool stream = stream_sweep<T>(v);
    const T* y = static_cast<const T*>(ops.y);
    T* dres = static_cast<T*>(ops.dresidual);
    with_flags(ops.activation == PYBN_ACTIVATION_RELU, dres != nullptr, [&](auto relu, auto res) {
        constexpr bool kRelu = decltype(relu)::value, kRes = decltype(res)::value;
        auto at = [=](int64_t off) {
            return Grad<T, kRelu, kRes>{dy + off, kRelu ? y + off : nullptr, kRes ? dres + off : nullptr};
        };
        // the row path's step for values from `base` with the coefficients kk
        auto row_of = [=](int64_t base, const A* kk) {
            return [=](int64_t off, int64_t len, int64_t c) {
                off += base;
                if constexpr (!kRelu && !kRes)
                    backward_values(dy + off, x ? x + off : nullptr, dx + off, len, stream, kk + c, kk + C + c,
                                    kk + 2 * C + c, kk + 3 * C + c);
                else
                    backward_values_fused<T, kRelu, kRes>(at(off), x ? x + off : nullptr, dx ? dx + off : nullptr,
                                                          len, stream, kk + c, kk + C + c, kk + 2 * C + c,
                                                          kk + 3 * C + c);
            };
        };
        if (row_only) {
            elementwise_rows(v, c0, c1, row_of(0, k), nt > 0 ? nt : num_threads());
            return;
        }
        for_groups(v, ops.groups, k, [&](const pybn_view& g, int64_t base, const A* kg, const ColumnCoefs<A>& e) {
            elementwise(g, row_of(base, kg), [&](int64_t off, int64_t rows) {
                off += base;
                if constexpr (!kRelu && !kRes)
                    backward_cols<T>(dy + off, x ? x + off : nullptr, dx + off, rows * W, e, stream);
                else
                    backward_cols_fused<T, kRelu, kRes>(at(off), x ? x + off : nullptr, dx ? dx + off : nullptr,
                                                        rows * W, e, stream);
            });
        });
    });
}

template <class T>
void backward_elementwise_t(const pybn_view& v, const void* dyv, const void* xv, const void* coefv,
                            void* dxv, int64_t groups) {
    using A = acc_t<T>;
    const T* dy = static_cast<const T*>(dyv);
    const T* x = static_cast<const T*>(xv);
    T* dx = static_cast<T*>(dxv);
    const int64_t C = v.channels, W = C * v.inner;
    const bool stream = stream_sweep<T>(v);
    for_groups(v, groups, static_cast<const A*>(coefv),
               [&](const pybn_view& g, int64_t base, const A* k, const ColumnCoefs<A>& e) {
        elementwise(
            g,
            [&](int64_t off, int64_t len, int64_t c) {
                off += base;
                backward_values(dy + off, x ? x + off : nullptr, dx + off, len, stream, k + c, k + C + c,
                                k + 2 * C + c, k + 3 * C + c);
            },
            [&](int64_t off, int64_t rows) {
                off += base;
                backward_cols<T>(dy + off, x ? x + off : nullptr, dx + off, rows * W, e, stream);
            });
    });
}

// With the fused epilogues (activation mask, residual gradient): a function of its own, so that
// the plain one above keeps its code.
template <class T>
void backward_elementwise_fused_t(const pybn_view& v, const void* dyv, const void* xv, const void* coefv,
                                  void* dxv, const GradOps& ops) {
    backward_sweep<T>(v, static_cast<const T*>(dyv), static_cast<const T*>(xv), static_cast<T*>(dxv),
                      static_cast<const acc_t<T>*>(coefv), ops, false, 0, v.channels);
}

// The elementwise step with or without the fused epilogues of `ops`.
template <class T>
void backward_elementwise_ops_t(const pybn_view& v, const void* dy, const void* x, const void* coef, void* dx,
                                const GradOps& ops) {
    if (ops.activation == PYBN_ACTIVATION_NONE && ops.dresidual == nullptr)
        backward_elementwise_t<T>(v, dy, x, coef, dx, ops.groups);
    else
        backward_elementwise_fused_t<T>(v, dy, x, coef, dx, ops);
}

template <class T, class Terms>
void backward_t(const pybn_view& v, const void* dyv, const void* xv, const void* meanv, bool dx_reads_x,
                void* dxv, const BackwardEpilogue& epilogue, const GradOps& ops) {
    using A = acc_t<T>;
    const int64_t C = v.channels;
    const bool sweep = dxv != nullptr || ops.dresidual != nullptr;
    Scratch coef(sizeof(A) * 4 * size_t(C)), sums(sizeof(double) * 3 * size_t(C));
    double *sum_dy = sums.as<double>(), *sum_dy_xmu = sum_dy + C, *sum_xmu = sum_dy + 2 * C;
    if (v.inner < kRowMin) {
        backward_reduce_t<T, Terms>(v, dyv, xv, meanv, sum_dy, sum_dy_xmu, sum_xmu, ops.y);
        epilogue(0, C, sum_dy, sum_dy_xmu, sum_xmu, coef.as<A>());
        if (sweep) backward_elementwise_ops_t<T>(v, dyv, dx_reads_x ? xv : nullptr, coef.as<A>(), dxv, ops);
        return;
    }
    const T* dy = static_cast<const T*>(dyv);
    const T* x = static_cast<const T*>(xv);
    const A* mean = static_cast<const A*>(meanv);
    T* dx = static_cast<T*>(dxv);
    const SumsRun<T, Terms> kernel{dy, x, static_cast<const T*>(ops.y), mean};
    const A* k = coef.as<A>();
    if (const CoreBlocks cb = core_blocks(v, Terms::kInputs * sizeof(T)); cb.nb > 0) {  // per-core channel blocks
        for_core_blocks<Sums>(v, cb, kernel, [&](int64_t c0, int64_t c1, const Sums* out, double* s) {
            const int64_t B = cb.B;
            for (int64_t c = 0; c < c1 - c0; ++c) {
                s[c] = out[c].dy;
                s[B + c] = out[c].dy_xmu;
                s[2 * B + c] = out[c].xmu;
            }
            epilogue(c0, c1, s, s + B, s + 2 * B, coef.as<A>());
            if (sweep) backward_sweep<T>(v, dy, dx_reads_x ? x : nullptr, dx, k, ops, true, c0, c1, 1);
        });
        return;
    }
    const int64_t G = channel_group(v, Terms::kInputs * sizeof(T));
    const RowScratch<Sums, SumsRun<T, Terms>> scratch(v, G, num_threads());
    Scratch red(sizeof(Sums) * size_t(G));
    for (int64_t c0 = 0; c0 < C; c0 += G) {
        const int64_t c1 = min64(C, c0 + G);
        reduce_rows(v, c0, c1, scratch, red.as<Sums>(), kernel);
        for (int64_t c = 0; c < c1 - c0; ++c) {
            sum_dy[c] = red.as<Sums>()[c].dy;
            sum_dy_xmu[c] = red.as<Sums>()[c].dy_xmu;
            sum_xmu[c] = red.as<Sums>()[c].xmu;
        }
        epilogue(c0, c1, sum_dy, sum_dy_xmu, sum_xmu, coef.as<A>());
        if (sweep) backward_sweep<T>(v, dy, dx_reads_x ? x : nullptr, dx, k, ops, true, c0, c1);
    }
}
