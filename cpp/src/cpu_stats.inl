// Batch statistics: shifted float32 runs merged as Moments in float64 (row path: MomentsRun;
// column path: tile_reduce with MomentTerms).
// Part of cpu_kernels.inl (included inside its namespaces, once per instruction-set unit).

// ---------------------------------------------------------------------------------------------
// Batch statistics.

// The terms of the statistics, for the row runs (run_sums) and the column tiles (tile_reduce):
// x - shift and its square, the shift a value inside the data (a run's first value, or the
// part's first row); row blocks of kDepth x kUnroll vectors (two unrolled accumulators each).
struct MomentTerms {
    static constexpr int kSums = 2, kInputs = 1, kUnroll = kU;
    static constexpr bool kAssignFirst = true;
    template <class V> static PYBN_INLINE void row(V (&t)[2], const V (&in)[1], V shift) {
        const V d = in[0] - shift;
        t[0] = d;
        t[1] = d * d;
    }
};

// Moments of the runs of a channel (reduce_rows): sums relative to the run's first value.
template <class T> struct MomentsRun {
    using A = acc_t<T>;
    static constexpr int64_t kRowValueBytes = sizeof(T);  // bytes read per value of a row
    struct State {
        WideSums<2> w;
        A shift;
    };
    const T* x;
    PYBN_INLINE void begin(State& s, int64_t, int64_t off) const {
        s.shift = load(x[off]);
        zero(s.w);
    }
    PYBN_INLINE void add(State& s, int64_t, int64_t off, int64_t len) const {
        WideSums<2> w = s.w;  // in registers for the row (the state may live in memory)
        run_sums<MomentTerms>({x + off}, len, s.shift, w);
        s.w = w;
    }
    Moments end(const State& s, int64_t count) const {
        Moments m;
        m.merge_shifted(double(count), double(s.shift), s.w.total(0), s.w.total(1));
        return m;
    }
};

template <class T>
void batch_stats_t(const pybn_view& v, const void* xv, double* mean, double* m2) {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(xv);
    const int64_t C = v.channels, W = C * v.inner;
    Scratch result(sizeof(Moments) * size_t(C));
    Moments* mom = result.as<Moments>();
    if (v.inner >= kRowMin) {
        const RowScratch<Moments, MomentsRun<T>> scratch(v, C, num_threads());
        reduce_rows(v, 0, C, scratch, mom, MomentsRun<T>{x});
    } else {
        const int nt = num_threads();
        const int64_t R = kTileRows;
        const int64_t wa = spaced<A>(W), wd = spaced<double>(W);
        const bool ahead = fetch_ahead<T>(v, 1);
        Scratch abuf(sizeof(A) * 3 * size_t(wa) * size_t(nt)), dbuf(sizeof(double) * 2 * size_t(wd) * size_t(nt));
        reduce_cols<Moments>(v, nt, mom, [&](int64_t o0, int64_t o1, Moments* cols, int t) {
            A* sh = abuf.as<A>(size_t(3 * wa * t));  // the part's first row, then s2, q2
            double* S = dbuf.as<double>(size_t(2 * wd * t));
            to_acc(x + o0 * W, W, sh);
            for (int64_t j = 0; j < 2 * wd; ++j) S[j] = 0;
            for (int64_t r0 = o0; r0 < o1; r0 += R) {
                const int64_t rows = min64(R, o1 - r0);
                tile_reduce<MomentTerms>({x + r0 * W}, W, rows, sh, sh + wa, wa, S, wd, ahead);
            }
            for (int64_t j = 0; j < W; ++j) {
                cols[j] = Moments{};
                cols[j].merge_shifted(double(o1 - o0), double(sh[j]), S[j], S[wd + j]);
            }
        });
    }
    for (int64_t c = 0; c < C; ++c) {
        mean[c] = mom[c].mean();
        m2[c] = mom[c].m2;
    }
}
