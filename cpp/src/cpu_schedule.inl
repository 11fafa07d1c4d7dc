// The work schedule of the CPU kernels: the row and column reduction drivers (parts that depend
// only on the shape, merged in a fixed order), the elementwise drivers, the column path's
// coefficient layout, the output writers and the channel groups of the fused kernels.
// Part of cpu_kernels.inl (included inside its namespaces, once per instruction-set unit).

// ---------------------------------------------------------------------------------------------
// Reduction drivers: the row path (inner >= kRowMin) and the column path (inner < kRowMin).

// Software prefetch ahead of the column-path reductions pays when their `streams` inputs are
// beyond the LLC (bench/NOTES.md, step 13).
template <class T> bool fetch_ahead(const pybn_view& v, int64_t streams) {
    return stream_output(streams * v.outer * v.channels * v.inner * int64_t(sizeof(T)));
}

// Whether an elementwise sweep of v streams its output: large enough (stream_output) and, on the
// row path, rows of at least kStreamRowBytes, so that the lines a row shares with its neighbours
// (written ordinarily, see write_run) are a small part of it. Measured, 102 MB tensors (old /
// new in one process): rows of 196 and 392 bytes ran 0.51-0.99x the time written through the
// cache, rows of 784 bytes and more 0.78-0.92x streamed (bench/NOTES.md, step 30).
constexpr int64_t kStreamRowBytes = 512;
template <class T> bool stream_sweep(const pybn_view& v) {
    const int64_t bytes = v.outer * v.channels * v.inner * int64_t(sizeof(T));
    return stream_output(bytes) && (v.inner < kRowMin || v.inner * int64_t(sizeof(T)) >= kStreamRowBytes);
}

// Software prefetch of `bytes` from p.
inline void prefetch_bytes(const char* p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

// Row path: channel c is cut into runs sharing one shift: segments of kSegment values of a long
// row, or groups of whole short rows (about kSegment values). The runs are cut into `split`
// parts (depending on the shape only) that merge in order, so a channel's result is the same
// whichever channels are reduced with it.
struct RowRuns {
    int64_t nseg;          // segments per row (1 for short rows)
    int64_t rows_per_run;  // whole rows per run (1 for long rows)
    int64_t runs;          // runs per channel
};

inline RowRuns row_runs(const pybn_view& v) {
    if (v.inner >= kSegment) {
        const int64_t nseg = ceil_div(v.inner, kSegment);
        return {nseg, 1, v.outer * nseg};
    }
    const int64_t rpr = max64(1, kSegment / v.inner);
    return {1, rpr, ceil_div(v.outer, rpr)};
}

inline int64_t row_split(const pybn_view& v) {
    return min64(max64(8, ceil_div(kParts, v.channels)), row_runs(v).runs);  // >= 8: balanced groups
}

// The first 64-byte aligned U at or after byte offset_bytes of s.
template <class U> U* aligned_in(const Scratch& s, size_t offset_bytes) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(s.as<char>(offset_bytes));
    return reinterpret_cast<U*>((p + 63) & ~uintptr_t(63));
}

// Channels [c0, c1) are reduced into out[0, c1 - c0); parts: (c1 - c0) * row_split(v) scratch.
// A work item is a block of channels and one of the `split` ranges of runs, read in memory order
// where that is cheap: row o of channels cb0, cb0 + 1, ..., then row o + 1 (one continuous stream
// for the prefetchers instead of a short burst per row: bench/NOTES.md, step 14). Rows grouped
// into runs keep one run state per channel in memory between their rows, from kMemoryOrderBytes
// per row (the state, a few hundred bytes, then moves to and from L1 once per row of at least
// that many bytes from memory; a judgment, not tuned); shorter rows go channel by channel with
// the state in registers.
// Either way each channel adds the same values in the same order, so the order changes no bit.
// The run kernel k: k.begin(State&, c, off) starts a run at value offset off; k.add(State&, c,
// off, len) adds values [off, off + len) of channel c; k.end(State&, count) returns its Part;
// Kernel::kRowValueBytes is the bytes it reads per value.
// Runs of whole rows are read in memory order with per-channel states (segments of long rows are
// in memory order as they come).
template <class Kernel> bool row_memory_order(const pybn_view& v) {
    return row_runs(v).nseg == 1 && v.inner * Kernel::kRowValueBytes >= kMemoryOrderBytes;
}

// The temporaries of reduce_rows for channel groups of up to G channels on nt threads, allocated
// by its caller before any output is written: the parts and the per-thread run states.
template <class Part, class Kernel> struct RowScratch {
    int nt;
    Scratch parts, states;
    RowScratch(const pybn_view& v, int64_t G, int threads)
        : nt(threads), parts(sizeof(Part) * size_t(G * row_split(v))), states(state_bytes(v, G, threads)) {}
    // per thread: the states of the largest block and one more, room for the alignment
    static size_t state_bytes(const pybn_view& v, int64_t G, int nt) {
        if (!row_memory_order<Kernel>(v)) return 0;
        const int64_t nb = min64(G, ceil_div(kParts, row_split(v)));
        return sizeof(typename Kernel::State) * size_t(ceil_div(G, nb) + 1) * size_t(nt);
    }
};

// One work item of the row reduction: channels [cb0, cb1) and the runs of part s of `split`,
// each channel's Part of that part written to parts[(c - cb0) * split + s]; st: room for the run
// states of cb1 - cb0 channels (memory order only).
template <class Part, class Kernel>
PYBN_INLINE void reduce_item(const pybn_view& v, int64_t cb0, int64_t cb1, int64_t s, int64_t split, Part* parts,
                             typename Kernel::State* st, const Kernel& k) {
    using State = typename Kernel::State;
    const int64_t C = v.channels, inner = v.inner;
    const RowRuns rr = row_runs(v);
    const bool memory_order = row_memory_order<Kernel>(v);
    const int64_t r1 = rr.runs * (s + 1) / split;
    for (int64_t c = cb0; c < cb1; ++c) parts[(c - cb0) * split + s] = Part{};
    for (int64_t r = rr.runs * s / split; r < r1;) {
        const int64_t o0 = (r / rr.nseg) * rr.rows_per_run, g0 = r % rr.nseg;
        const int64_t g1 = min64(rr.nseg, g0 + (r1 - r));  // this part's runs in row o0 (long rows)
        const int64_t rows = min64(rr.rows_per_run, v.outer - o0);
        if (memory_order) {
            for (int64_t c = cb0; c < cb1; ++c) k.begin(st[c - cb0], c, (o0 * C + c) * inner);
            for (int64_t o = o0; o < o0 + rows; ++o)
                for (int64_t c = cb0; c < cb1; ++c) k.add(st[c - cb0], c, (o * C + c) * inner, inner);
            for (int64_t c = cb0; c < cb1; ++c) parts[(c - cb0) * split + s].merge(k.end(st[c - cb0], rows * inner));
        } else {  // channel by channel: a run of `rows` short rows, or segments of row o0
            for (int64_t c = cb0; c < cb1; ++c)
                for (int64_t g = g0; g < g1; ++g) {
                    const int64_t off = (o0 * C + c) * inner + g * kSegment;
                    const int64_t len = min64(kSegment, inner - g * kSegment);
                    State one;
                    k.begin(one, c, off);
                    for (int64_t o = 0; o < rows; ++o) k.add(one, c, off + o * C * inner, len);
                    parts[(c - cb0) * split + s].merge(k.end(one, rows * len));
                }
        }
        r += g1 - g0;
    }
}

// out[c] = the parts of channel c (parts[c * split + s]) merged in part order, c < nc.
template <class Part> void merge_parts(const Part* parts, int64_t split, int64_t nc, Part* out) {
    for (int64_t c = 0; c < nc; ++c) out[c] = Part{};
    for (int64_t s = 0; s < split; ++s)  // part order per channel, channels interleaved (reduce_cols)
        for (int64_t c = 0; c < nc; ++c) out[c].merge(parts[c * split + s]);
}

template <class Part, class Kernel>
void reduce_rows(const pybn_view& v, int64_t c0, int64_t c1, const RowScratch<Part, Kernel>& scratch, Part* out,
                 const Kernel& k) {
    using State = typename Kernel::State;
    const int64_t inner = v.inner, nc = c1 - c0;
    const int64_t split = row_split(v);
    const int64_t nb = min64(nc, ceil_div(kParts, split));  // channel blocks
    const bool memory_order = row_memory_order<Kernel>(v);
    const int nt = scratch.nt;
    const int64_t per_block = ceil_div(nc, nb);
    Part* parts = scratch.parts.template as<Part>();
    const Scratch& states = scratch.states;
    parallel_for(nb * split, v.outer * nc * inner, nt, [&](int64_t p, int t) {
        // neighbouring items: neighbouring channel blocks of the same rows
        const int64_t b = p % nb, s = p / nb;
        const int64_t cb0 = c0 + nc * b / nb, cb1 = c0 + nc * (b + 1) / nb;
        State* st = memory_order ? aligned_in<State>(states, sizeof(State) * size_t(per_block + 1) * size_t(t)) : nullptr;
        reduce_item(v, cb0, cb1, s, split, parts + (cb0 - c0) * split, st, k);
    });
    merge_parts(parts, split, nc, out);
}

// Per-core channel blocks (the fused kernels' schedule when a channel's data is small enough,
// core_budget()): a work item is a block of channels that one thread reduces, hands to the
// epilogue and sweeps, with no barrier between the steps; the other threads work on other blocks
// (the epilogues run concurrently, on disjoint channels). Its data, a thread's share of an eighth
// of the LLC at most, stays in that core's L2 and the L3 between the two sweeps; channel groups
// instead sweep a quarter of the LLC with every thread, a barrier before and after each step.
// The reduction computes the same parts in the same order as reduce_rows (reduce_item,
// merge_parts), so every bit is the same as by channel groups. Measured against channel groups
// (old / new in one process, bench/NOTES.md, step 31): ResNet-50 layers at N = 32 (2 threads)
// 0.81-0.96x the time for the training forward and 0.56-0.93x for the backward, float32 and
// 16-bit alike; tensors of a few MB unchanged within the noise.
// The blocks: as few as the budget allows (per_channel bytes each), at least 2 a thread (dynamic
// scheduling then evens out a thread that runs slower) and a multiple of the thread count, the
// channels spread evenly (block b is [C b / nb, C (b + 1) / nb)). nb is 0 when the schedule does
// not apply: the row path only, one channel's data within the budget and at least 4 channels a
// thread (a block more or less is then at most a few channels).
struct CoreBlocks {
    int64_t nb = 0, B = 0;  // blocks, channels of the largest
    int nt = 1;             // threads
    int64_t begin(int64_t C, int64_t b) const { return C * b / nb; }
};
inline CoreBlocks core_blocks(const pybn_view& v, int64_t bytes_per_value) {
    const int nt = num_threads();
    const int64_t C = v.channels;
    const int64_t per_channel = max64(1, v.outer * v.inner * bytes_per_value);
    const int64_t most = core_budget(nt) / per_channel;  // channels a block may hold
    if (v.inner < kRowMin || most < 1 || C < 4 * int64_t(nt)) return {};
    int64_t nb = max64(ceil_div(C, most), 2 * int64_t(nt));
    nb = min64(C / nt, ceil_div(nb, nt)) * nt;
    if (ceil_div(C, nb) > most) return {};  // no multiple of nt within the budget
    return {nb, ceil_div(C, nb), nt};
}

// The temporaries of the per-core blocks of up to B channels on nt threads, per thread: the
// parts, the merged results, the run states (memory order only) and 3 x B doubles for the
// epilogue.
template <class Part, class Kernel> struct CoreScratch {
    using State = typename Kernel::State;
    int64_t B, split, nstates;
    size_t parts_bytes, per_thread;
    Scratch buf;
    CoreScratch(const pybn_view& v, int64_t B_, int threads)
        : B(B_), split(row_split(v)), nstates(row_memory_order<Kernel>(v) ? B_ : 0),
          parts_bytes(sizeof(Part) * size_t(B * (split + 1))),
          per_thread(64 + parts_bytes + 64 + sizeof(State) * size_t(nstates) + sizeof(double) * 3 * size_t(B)),
          buf(per_thread * size_t(threads)) {}
    Part* parts(int t) const { return aligned_in<Part>(buf, per_thread * size_t(t)); }
    Part* out(int t) const { return parts(t) + B * split; }
    State* states(int t) const { return aligned_in<State>(buf, per_thread * size_t(t) + 64 + parts_bytes); }
    double* sums(int t) const { return reinterpret_cast<double*>(states(t) + nstates); }
};

// The per-core schedule of a fused kernel: each block [c0, c1) of cb is reduced by one thread
// (as reduce_rows: the same bits) and handed on that thread to step(c0, c1, out, sums): out, the
// block's c1 - c0 merged Parts; sums, room for 3 x cb.B doubles. The scratch is allocated before
// any step runs.
template <class Part, class Kernel, class Step>
void for_core_blocks(const pybn_view& v, const CoreBlocks& cb, const Kernel& k, Step step) {
    const int64_t C = v.channels;
    const CoreScratch<Part, Kernel> s(v, cb.B, cb.nt);
    parallel_for(cb.nb, v.outer * C * v.inner, cb.nt, [&](int64_t b, int t) {
        const int64_t c0 = cb.begin(C, b), c1 = cb.begin(C, b + 1);
        Part* parts = s.parts(t);
        for (int64_t p = 0; p < s.split; ++p) reduce_item(v, c0, c1, p, s.split, parts, s.states(t), k);
        merge_parts(parts, s.split, c1 - c0, s.out(t));
        step(c0, c1, static_cast<const Part*>(s.out(t)), s.sums(t));
    });
}

// Column path: the view is `outer` rows of W = C * inner columns; rows are cut into `nparts`
// ranges; part(o0, o1, cols, thread) writes the W column Parts of rows [o0, o1), thread < nt.
template <class Part, class PartFn>
void reduce_cols(const pybn_view& v, int nt, Part* out, PartFn part) {
    const int64_t C = v.channels, inner = v.inner, W = C * inner;
    // parts: at most kParts, at least kPartMinRows rows and kPartMinValues values each (the
    // per-column merges of a part cost about as much as reducing a few rows), at most ~1M
    // partials in all
    const int64_t nparts = max64(1, min64(min64(kParts, v.outer * W / kPartMinValues),
                                          min64(v.outer / kPartMinRows, (int64_t(1) << 20) / W)));
    Scratch scratch(sizeof(Part) * size_t(nparts * W));
    Part* parts = scratch.as<Part>();
    parallel_for(nparts, v.outer * W, nt, [&](int64_t p, int t) {
        part(v.outer * p / nparts, v.outer * (p + 1) / nparts, parts + p * W, t);
    });
    // each channel merges its parts in part order; channels interleaved, so that consecutive
    // merges are independent (one channel's chain of dependent divisions was latency-bound:
    // a third of a 6272 x 256 statistics call)
    for (int64_t c = 0; c < C; ++c) out[c] = Part{};
    for (int64_t p = 0; p < nparts; ++p)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < inner; ++i) out[c].merge(parts[p * W + c * inner + i]);
}

// Float64 accumulators of one run: `K` sums, each as a low and a high float64 vector per unrolled
// lane block (kU of them) and a scalar for the tails; added up in a fixed order by `total`.
template <int K> struct WideSums {
    vec<double> v[K][2 * kU];
    double tail[K];
    double total(int k) const { return hsum(v[k]) + tail[k]; }
};
template <int K> PYBN_INLINE void zero(WideSums<K>& w) {
    for (int k = 0; k < K; ++k) {
        for (int u = 0; u < 2 * kU; ++u) w.v[k][u] = vec<double>{};
        w.tail[k] = 0;
    }
}

// One run of a row (reduce_rows' kernels), added into w (kept across the rows of a run):
// Terms::row turns one value of each of the Terms::kInputs inputs at in[] and the run's
// reference value (a shift, or the mean) into kSums terms. Blocks of kDepth x Terms::kUnroll
// vectors accumulate in A, then widen into float64 vectors; whole vectors left are flushed every
// kDepth; the tail goes straight to float64. 16-bit values are converted a vector at a time.
// Terms::kAssignFirst: the first step assigns instead of adding to zero (no zero register: the
// statistics' float64 accumulators stay in registers on AVX2). The backward sums start from zero
// as they always have: assigning changes last bits there through a different FMA contraction.
template <class Terms, class T>
PYBN_INLINE void run_sums(const T* const (&in)[Terms::kInputs], int64_t len, acc_t<T> ref,
                          WideSums<Terms::kSums>& w) {
    using A = acc_t<T>;
    constexpr int L = kLanesOf<A>, U = Terms::kUnroll, K = Terms::kSums, N = Terms::kInputs, B = kDepth * U * L;
    static_assert(U <= kU, "WideSums holds kU unrolled accumulators");
    const vec<A> rv = vsplat(ref);
    auto terms_at = [&](int64_t i, vec<A>(&t)[K]) {
        vec<A> v[N];
        for (int n = 0; n < N; ++n) v[n] = vload_as(in[n] + i);
        Terms::row(t, v, rv);
    };
    int64_t i = 0;
    for (; i + B <= len; i += B) {
        vec<A> a[U][K];
        int d = 0;
        if constexpr (Terms::kAssignFirst) {
            for (int u = 0; u < U; ++u) terms_at(i + u * L, a[u]);
            d = 1;
        } else {
            for (int u = 0; u < U; ++u)
                for (int k = 0; k < K; ++k) a[u][k] = vec<A>{};
        }
        for (; d < kDepth; ++d)
            for (int u = 0; u < U; ++u) {
                vec<A> t[K];
                terms_at(i + (d * U + u) * L, t);
                for (int k = 0; k < K; ++k) a[u][k] += t[k];
            }
        for (int u = 0; u < U; ++u)
            for (int k = 0; k < K; ++k) widen_add<A>(a[u][k], w.v[k][2 * u], w.v[k][2 * u + 1]);
    }
    {  // whole vectors left: flushed every kDepth
        vec<A> a[K] = {};
        for (int d = 0; i + L <= len; i += L) {
            vec<A> t[K];
            terms_at(i, t);
            for (int k = 0; k < K; ++k) a[k] += t[k];
            if (++d == kDepth || i + 2 * L > len) {
                for (int k = 0; k < K; ++k) {
                    widen_add<A>(a[k], w.v[k][0], w.v[k][1]);
                    a[k] = vec<A>{};
                }
                d = 0;
            }
        }
    }
    for (; i < len; ++i) {
        A t[K], v[N];
        for (int n = 0; n < N; ++n) v[n] = load(in[n][i]);
        Terms::row(t, v, ref);
        for (int k = 0; k < K; ++k) w.tail[k] += double(t[k]);
    }
}

// Column path, one tile of the column driver: rows [0, rows) (rows <= kTileRows) of the
// Terms::kInputs inputs at in[] (row stride W), in memory order. Terms::row turns one value of
// each input and the column's reference value ref[j] (a shift, or the mean) into kSums terms.
// Each group of kDepth rows is added pairwise in A; the groups' sums accumulate in A per column
// (acc: kSums arrays of W, wa apart: at most kTileRows / kDepth = 16 group sums, as accurate as
// the row path: bench/NOTES.md) and are widened into the float64 column sums D (kSums arrays,
// wd apart) once per tile. Used by the statistics (MomentTerms) and the backward sums (SumTerms).
template <class Terms, class T>
void tile_reduce(const T* const (&in)[Terms::kInputs], int64_t W, int64_t rows, const acc_t<T>* ref, acc_t<T>* acc,
                 int64_t wa, double* D, int64_t wd, bool ahead) {
    using A = acc_t<T>;
    constexpr int L = kLanesOf<A>, K = Terms::kSums, N = Terms::kInputs;
    static_assert(kDepth == 4, "groups of kDepth rows are added pairwise, written out for 4");
    for (int k = 0; k < K; ++k)
        for (int64_t j = 0; j < W; ++j) acc[k * wa + j] = 0;
    int64_t r = 0;
    for (; r + kDepth <= rows; r += kDepth) {
        if (ahead)
            for (int i = 0; i < N; ++i)
                prefetch_bytes(reinterpret_cast<const char*>(in[i] + r * W) + kTilePrefetch,
                               kDepth * W * int64_t(sizeof(T)));
        int64_t j = 0;
        for (; j + L <= W; j += L) {
            const vec<A> rv = vload(ref + j);
            vec<A> t[kDepth][K];
            for (int q = 0; q < kDepth; ++q) {
                vec<A> v[N];
                for (int i = 0; i < N; ++i) v[i] = vload_as(in[i] + (r + q) * W + j);
                Terms::row(t[q], v, rv);
            }
            for (int k = 0; k < K; ++k)
                vstore(acc + k * wa + j, vload(acc + k * wa + j) + ((t[0][k] + t[1][k]) + (t[2][k] + t[3][k])));
        }
        for (; j < W; ++j) {  // the same arithmetic, one column at a time
            A t[kDepth][K];
            for (int q = 0; q < kDepth; ++q) {
                A v[N];
                for (int i = 0; i < N; ++i) v[i] = load(in[i][(r + q) * W + j]);
                Terms::row(t[q], v, ref[j]);
            }
            for (int k = 0; k < K; ++k) acc[k * wa + j] += (t[0][k] + t[1][k]) + (t[2][k] + t[3][k]);
        }
    }
    for (; r < rows; ++r)  // a last, partial group
        for (int64_t j = 0; j < W; ++j) {
            A t[K], v[N];
            for (int i = 0; i < N; ++i) v[i] = load(in[i][r * W + j]);
            Terms::row(t, v, ref[j]);
            for (int k = 0; k < K; ++k) acc[k * wa + j] += t[k];
        }
    for (int k = 0; k < K; ++k)
        for (int64_t j = 0; j < W; ++j) D[k * wd + j] += double(acc[k * wa + j]);
}

// Calls f(Flag<first>{}, Flag<second>{}): two run-time options as compile-time flags (the fused
// epilogues: activation, residual / residual gradient), four instantiations.
template <bool B> struct Flag {
    static constexpr bool value = B;
};
template <class F> PYBN_INLINE void with_flags(bool first, bool second, F&& f) {
    if (first) {
        if (second) f(Flag<true>{}, Flag<true>{});
        else f(Flag<true>{}, Flag<false>{});
    } else {
        if (second) f(Flag<false>{}, Flag<true>{});
        else f(Flag<false>{}, Flag<false>{});
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise: rows of one channel (row path) or rows of W columns with per-column coefficients
// (column path), in chunks of about kChunkValues values.

// Row path over the rows (o, c) of channels [c0, c1), on nt threads (1: the calling thread).
template <class RowOp>
void elementwise_rows(const pybn_view& v, int64_t c0, int64_t c1, RowOp row_op, int nt) {
    const int64_t C = v.channels, inner = v.inner, nc = c1 - c0;
    const int64_t rows = v.outer * nc, per = max64(1, kChunkValues / inner);
    parallel_for(ceil_div(rows, per), rows * inner, nt, [&](int64_t b, int) {
        // row r is (o, c) = (r / nc, c0 + r % nc): one division a chunk, then counted (a 64-bit
        // division a row cost about as much as the rest of a 49-value row; bench/NOTES.md, step 32)
        const int64_t r0 = b * per, r1 = min64(rows, (b + 1) * per);
        int64_t o = r0 / nc, c = c0 + r0 % nc;
        for (int64_t r = r0; r < r1; ++r) {
            row_op((o * C + c) * inner, inner, c);
            if (++c == c1) {
                c = c0;
                ++o;
            }
        }
        stream_fence();
    });
}

template <class RowOp, class ColsOp>
void elementwise(const pybn_view& v, RowOp row_op, ColsOp cols_op) {
    const int64_t C = v.channels, inner = v.inner, total = v.outer * C * inner;
    if (inner >= kRowMin) {
        elementwise_rows(v, 0, C, row_op, num_threads());
    } else {
        const int64_t W = C * inner, per = max64(1, kChunkValues / W);
        parallel_for(ceil_div(v.outer, per), total, num_threads(), [&](int64_t b, int) {
            const int64_t o0 = b * per, o1 = min64(v.outer, (b + 1) * per);
            cols_op(o0 * W, o1 - o0);
            stream_fence();
        });
    }
}

// Column path coefficients: coef (4 x C) expanded to 4 arrays of E values, the value at
// position k being coef[(k mod W) / inner]. A run of rows walks them with a column position j in
// [0, P), P the smallest multiple of W that holds a vector, so that the vector at j never passes
// the end (E = P + L) and one subtraction wraps j: rows of any width stay vectorised, and a run
// may start anywhere in a row (aligned streaming stores).
template <class A>
struct ColumnCoefs {
    int64_t C, inner, W, P, E;
    Scratch buf;
    bool zero_lo = false;  // every lo coefficient is +0 (inference): sweeps may skip it
    // Allocated only (fill() sets the values): one buffer for every ghost batch of a call.
    ColumnCoefs(int64_t C_, int64_t inner_, bool column_path)
        : C(C_), inner(inner_), W(C_ * inner_), P(W * ceil_div(kLanesOf<A>, W)), E(P + kLanesOf<A>),
          buf(column_path ? sizeof(A) * 4 * size_t(E) : 0) {}
    ColumnCoefs(const A* coef, int64_t C_, int64_t inner_, bool column_path) : ColumnCoefs(C_, inner_, column_path) {
        fill(coef);
    }
    void fill(const A* coef) {
        if (buf.as<A>() == nullptr) return;  // row path: not used
        zero_lo = true;
        for (int64_t c = 0; c < C && zero_lo; ++c) {
            const A zero = 0;
            zero_lo = __builtin_memcmp(&coef[C + c], &zero, sizeof zero) == 0;
        }
        A* out = buf.as<A>();
        for (int64_t k = 0; k < 4; ++k) {
            if (inner == 1)  // channels-last: a plain copy (the loop below ran at ~3 ns a value)
                __builtin_memcpy(out + k * E, coef + k * C, sizeof(A) * size_t(C));
            else
                for (int64_t c = 0; c < C; ++c)
                    for (int64_t i = 0; i < inner; ++i) out[k * E + c * inner + i] = coef[k * C + c];
            for (int64_t i = W; i < E; ++i) out[k * E + i] = out[k * E + i - W];
        }
    }
    const A* operator[](int k) const { return buf.as<A>() + k * E; }
};

// Ghost batches: the elementwise sweep of a view whose outer rows form `groups` equal,
// contiguous groups (1: the whole view), group g with its own coefficients k + g * 4 * C.
// sweep(group view, offset of its first value, its coefficients, its column coefficients) runs
// once per group; the column coefficients are allocated once, before the first group writes.
template <class A, class Sweep>
void for_groups(const pybn_view& v, int64_t groups, const A* k, Sweep sweep) {
    const int64_t n = groups > 1 ? groups : 1, C = v.channels;
    const pybn_view g{v.outer / n, C, v.inner, v.dtype};
    ColumnCoefs<A> e(C, v.inner, v.inner < kRowMin);
    for (int64_t i = 0; i < n; ++i) {
        const A* ki = k + i * 4 * C;
        e.fill(ki);
        sweep(g, i * g.outer * C * v.inner, ki, static_cast<const ColumnCoefs<A>&>(e));
    }
}

// Non-temporal stores pay only for whole cache lines: a line written partly by them and partly
// by ordinary stores (a row's head or tail, the next row's head) is flushed from the
// write-combining buffer half full and read back, and short rows then ran 3-8x slower streamed
// than cached (256 x 2048 x 7 x 7 float32 inference 94 vs 12 ms; bench/NOTES.md, step 30). So
// the streaming writers below store the vectors before the first line boundary and after the
// last one ordinarily, and stream only the lines in between; the vectors are the same (same
// positions, same values), only the store instruction differs.
constexpr uintptr_t kLineBytes = 64;

// The index of the last cache-line boundary of out at or before out + n (values), at least i.
template <class T> PYBN_INLINE int64_t line_end(const T* out, int64_t i, int64_t n) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(out);
    const uintptr_t end = (base + uintptr_t(n) * sizeof(T)) & ~(kLineBytes - 1);
    const int64_t e = end > base ? int64_t((end - base) / sizeof(T)) : 0;
    return e > i ? e : i;
}
template <class T> PYBN_INLINE bool at_line(const T* p) { return reinterpret_cast<uintptr_t>(p) % kLineBytes == 0; }

// out[i] = f(i) for i in [0, n), f returning acc_t<T> vectors (vector index) and scalars (tail),
// converted to T: vector stores, or non-temporal stores when `stream` (outputs larger than the
// caches).
template <class T, class VecF, class ScalarF>
PYBN_INLINE void write_run(T* out, int64_t n, bool stream, VecF vf, ScalarF sf) {
    constexpr int L = kLanesOf<acc_t<T>>;
    constexpr uintptr_t kOutBytes = uintptr_t(L) * sizeof(T);
    // vstream2_as stores 16-bit pairs in one 256-bit store; native types store vector by vector
    // (their alignment, and so which values the scalar head computes, as before)
    constexpr uintptr_t kStreamAlign = kNative<T> ? kOutBytes : 2 * kOutBytes;
    int64_t i = 0;
    if (stream) {
        for (; i < n && (reinterpret_cast<uintptr_t>(out + i) % kStreamAlign) != 0; ++i) out[i] = store<T>(sf(i));
        for (; i + L <= n && !at_line(out + i); i += L) vstore_as(out + i, vf(i));
        const int64_t e = line_end(out, i, n);
        for (; i + 2 * L <= e; i += 2 * L) vstream2_as(out + i, vf(i), vf(i + L));
        for (; i + L <= e; i += L) vstream_as(out + i, vf(i));
    }
    for (; i + 2 * L <= n; i += 2 * L) vstore2_as(out + i, vf(i), vf(i + L));
    for (; i + L <= n; i += L) vstore_as(out + i, vf(i));
    for (; i < n; ++i) out[i] = store<T>(sf(i));
}

// write_run for lane-uniform work (the row path): vf(i, ld) computes the vector at i with every
// input loaded through ld(pointer at i). Where kPermutedPairs<T> (and kAllow: vf stores nothing
// itself), pairs of vectors are loaded, computed and stored in vload_pair's lane order (the same
// values, bitwise); else write_run.
template <class T, bool kAllow = true, class VecF, class ScalarF>
PYBN_INLINE void write_run_uniform(T* out, int64_t n, bool stream, VecF vf, ScalarF sf) {
    const auto ordered = [](const auto* p) { return vload_as(p); };
    if constexpr (!kPermutedPairs<T> || !kAllow) {
        write_run<T>(out, n, stream, [&](int64_t i) { return vf(i, ordered); }, sf);
    } else {
        constexpr int L = kLanesOf<acc_t<T>>;
        constexpr uintptr_t kPairBytes = uintptr_t(2 * L) * sizeof(T);
        const auto lo = [](const auto* p) { return vload_pair<std::remove_cv_t<std::remove_pointer_t<decltype(p)>>, 0>(p); };
        const auto hi = [](const auto* p) { return vload_pair<std::remove_cv_t<std::remove_pointer_t<decltype(p)>>, 1>(p); };
        int64_t i = 0;
        if (stream) {  // as write_run: only whole lines streamed
            for (; i < n && (reinterpret_cast<uintptr_t>(out + i) % kPairBytes) != 0; ++i) out[i] = store<T>(sf(i));
            for (; i + 2 * L <= n && !at_line(out + i); i += 2 * L) vstore_pair(out + i, vf(i, lo), vf(i, hi));
            for (const int64_t e = line_end(out, i, n); i + 2 * L <= e; i += 2 * L)
                vstream_pair(out + i, vf(i, lo), vf(i, hi));
        }
        for (; i + 2 * L <= n; i += 2 * L) vstore_pair(out + i, vf(i, lo), vf(i, hi));
        for (; i + L <= n; i += L) vstore_as(out + i, vf(i, ordered));
        for (; i < n; ++i) out[i] = store<T>(sf(i));
    }
}

// Column path: out[i] = f(i, j) for i in [0, n) of whole rows, j the column position of value i
// (from 0, wrapping at P: ColumnCoefs).
template <class T, class VecF, class ScalarF>
PYBN_INLINE void write_cols(T* out, int64_t n, int64_t P, bool stream, VecF vf, ScalarF sf) {
    constexpr int L = kLanesOf<acc_t<T>>;
    constexpr uintptr_t kOutBytes = uintptr_t(L) * sizeof(T);
    constexpr uintptr_t kStreamAlign = kNative<T> ? kOutBytes : 2 * kOutBytes;  // as write_run
    int64_t i = 0, j = 0;
    auto step = [&](int64_t by) {
        j += by;
        if (j >= P) j -= P;
    };
    auto pairs = [&](int64_t n, auto put2) {  // values up to n
        // Two blocks of P values at a time when P is a multiple of 2 L (channels-last with C a
        // multiple of 2 L, e.g. C = 64): value i and value i + P have the same column coefficients, so each
        // coefficient vector loaded serves both (all four vectors are computed before any store,
        // so the second use needs no reload). The same values go through vf as below.
        // Not streamed (the two interleaved lines ran 2.5x slower) and only for rows of up to
        // 4 cache lines: the two blocks are then neighbours; 1-2 KB apart (C = 256, 512 float16)
        // the back-and-forth walk ran 1.3-1.7x slower than one row at a time.
        if (!stream && P % (2 * L) == 0 && P * int64_t(sizeof(T)) <= 4 * int64_t(kLineBytes)) {
            for (; i + 2 * P <= n; i += P) {
                for (const int64_t e = i + P; i < e; i += 2 * L) {
                    const int64_t j0 = j;
                    step(L);
                    const int64_t j1 = j;
                    step(L);
                    const vec<acc_t<T>> a0 = vf(i, j0), b0 = vf(i + L, j1);
                    const vec<acc_t<T>> a1 = vf(i + P, j0), b1 = vf(i + P + L, j1);
                    put2(out + i, a0, b0);
                    put2(out + i + P, a1, b1);
                }
            }
        }
        for (; i + 2 * L <= n; i += 2 * L) {
            const vec<acc_t<T>> a = vf(i, j);
            step(L);
            const vec<acc_t<T>> b = vf(i + L, j);
            step(L);
            put2(out + i, a, b);
        }
    };
    const auto store2 = [](T* p, const vec<acc_t<T>>& a, const vec<acc_t<T>>& b) { vstore2_as(p, a, b); };
    if (stream) {  // as write_run: only whole lines streamed
        for (; i < n && (reinterpret_cast<uintptr_t>(out + i) % kStreamAlign) != 0; ++i, step(1))
            out[i] = store<T>(sf(i, j));
        for (; i + L <= n && !at_line(out + i); i += L, step(L)) vstore_as(out + i, vf(i, j));
        const int64_t e = line_end(out, i, n);
        pairs(e, [](T* p, const vec<acc_t<T>>& a, const vec<acc_t<T>>& b) { vstream2_as(p, a, b); });
        for (; i + L <= e; i += L, step(L)) vstream_as(out + i, vf(i, j));
    }
    pairs(n, store2);
    for (; i + L <= n; i += L, step(L)) vstore_as(out + i, vf(i, j));
    for (; i < n; ++i, step(1)) out[i] = store<T>(sf(i, j));
}

// ---------------------------------------------------------------------------------------------
// Fused kernels. Row path: channel groups whose data fits in half the last-level cache are
// reduced, handed to the epilogue and swept again while still cached (2 passes over memory for
// the forward instead of 3, 3 for the backward instead of 5). Column path: one group (all
// channels share every row). Every temporary is allocated before the first group writes.

inline int64_t channel_group(const pybn_view& v, int64_t bytes_per_value) {
    if (v.inner < kRowMin) return v.channels;
    const int64_t per_channel = max64(1, v.outer * v.inner * bytes_per_value);
    return max64(1, min64(v.channels, cache_budget() / per_channel));
}
