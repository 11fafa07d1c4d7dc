// Run-time choice of the CPU kernel table, thread count, and the kernels' scratch memory.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include <unistd.h>

#include "cpu_kernels.hpp"
#include "error.hpp"
#include "pybn/pybn.h"
#include "parallel.hpp"

namespace pybn::cpu {

namespace portable { const KernelTable& table(); }
#if defined(PYBN_HAVE_AVX2)
namespace avx2 { const KernelTable& table(); }
#endif
#if defined(PYBN_HAVE_AVX512)
namespace avx512 { const KernelTable& table(); }
#endif

// (not in an anonymous namespace: the C entry points below use them)
struct Isa {
    const KernelTable& (*table)();
    bool (*supported)();
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
[[maybe_unused]] bool has_v3() { return __builtin_cpu_supports("x86-64-v3"); }
[[maybe_unused]] bool has_v4() { return __builtin_cpu_supports("x86-64-v4"); }
#endif
bool always() { return true; }

// Best first.
const Isa kIsas[] = {
#if defined(PYBN_HAVE_AVX512)
    {avx512::table, has_v4},
#endif
#if defined(PYBN_HAVE_AVX2)
    {avx2::table, has_v3},
#endif
    {portable::table, always},
};

const KernelTable* best() {
    for (const Isa& isa : kIsas)
        if (isa.supported()) return &isa.table();
    return &portable::table();
}

// PYBN_CPU_ISA=name picks a supported path (to test a lower one); otherwise the best. A name
// that is not a supported path is reported once on stderr (a misspelt variable must not go
// unnoticed) and the best path is used.
const KernelTable* initial() {
    const char* want = std::getenv("PYBN_CPU_ISA");
    if (!want || !*want) return best();
    for (const Isa& isa : kIsas)
        if (std::strcmp(isa.table().isa, want) == 0 && isa.supported()) return &isa.table();
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true))
        std::fprintf(stderr, "pybn: warning: PYBN_CPU_ISA=%s is not a CPU path this machine supports (%s); using %s\n",
                     want, pybn_cpu_isas(), best()->isa);
    return best();
}

std::atomic<const KernelTable*> g_table{nullptr};
std::atomic<int> g_threads{0};

const KernelTable& kernels() {
    const KernelTable* t = g_table.load(std::memory_order_acquire);
    if (t == nullptr) {
        const KernelTable* expected = nullptr;
        g_table.compare_exchange_strong(expected, initial(), std::memory_order_acq_rel);
        t = g_table.load(std::memory_order_acquire);
    }
    return *t;
}

namespace {
// Size of the highest data / unified cache level as Linux's sysfs describes it for CPU 0 (what
// lscpu prints), or -1; with `level` > 0, that level's size instead. "32768K" style sizes.
int64_t sysfs_cache_bytes(int want_level = 0) {
#if defined(__linux__)
    int best_level = 0;
    int64_t best = -1;
    for (int i = 0; i < 16; ++i) {
        char base[64], path[96], type[32] = {0}, size[32] = {0};
        std::snprintf(base, sizeof base, "/sys/devices/system/cpu/cpu0/cache/index%d", i);
        int level = 0;
        auto read = [&](const char* name, const char* fmt, void* out) {
            std::snprintf(path, sizeof path, "%s/%s", base, name);
            FILE* f = std::fopen(path, "r");
            if (f == nullptr) return false;
            const bool ok = std::fscanf(f, fmt, out) == 1;
            std::fclose(f);
            return ok;
        };
        if (!read("level", "%d", &level)) break;
        if (!read("type", "%31s", type) || !read("size", "%31s", size)) continue;
        if (std::strcmp(type, "Instruction") == 0 || level < best_level) continue;
        if (want_level > 0 && level != want_level) continue;
        char* unit = nullptr;
        const long long n = std::strtoll(size, &unit, 10);
        const int64_t scale = *unit == 'K' ? 1 << 10 : *unit == 'M' ? 1 << 20 : *unit == 'G' ? 1 << 30 : 1;
        if (n > 0) {
            best_level = level;
            best = int64_t(n) * scale;
        }
    }
    return best;
#else
    return -1;
#endif
}

// The last-level cache: sysfs first, then sysconf, then 8 MiB. sysfs first because under some
// hypervisors glibc's CPUID-derived sysconf(_SC_LEVEL3_CACHE_SIZE) is not the guest's cache: on
// the development VM it says 256 MiB where sysfs and lscpu say 32 MiB, which turned the channel
// groups and the non-temporal stores off for 205 MB tensors (bench/NOTES.md, step 15).
int64_t llc_bytes() {
    static const int64_t llc = [] {
        int64_t b = sysfs_cache_bytes();
#if defined(_SC_LEVEL3_CACHE_SIZE)
        if (b <= 0) b = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
        return b > 0 ? b : int64_t(8) << 20;
    }();
    return llc;
}
}  // namespace

bool stream_output(int64_t bytes) { return bytes > 2 * cache_budget(); }

// A thread's share of an eighth of the last-level cache, at least three quarters of one core's
// level-2 cache (sysfs, then sysconf, then 512 KiB), or PYBN_CORE_BUDGET bytes (a tuning and
// testing knob: 0 turns the per-core schedule off).
int64_t core_budget(int threads) {
    static const int64_t fixed = [] {
        const char* e = std::getenv("PYBN_CORE_BUDGET");
        return e && *e ? int64_t(std::atoll(e)) : int64_t(-1);
    }();
    static const int64_t l2 = [] {
        int64_t b = sysfs_cache_bytes(2);
#if defined(_SC_LEVEL2_CACHE_SIZE)
        if (b <= 0) b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        return b > 0 ? b : int64_t(512) << 10;
    }();
    if (fixed >= 0) return fixed;
    const int64_t share = llc_bytes() / (8 * int64_t(threads > 0 ? threads : 1));
    return share > l2 * 3 / 4 ? share : l2 * 3 / 4;
}

// A quarter of the last-level cache (measured best: bench/NOTES.md), or PYBN_CACHE_BUDGET bytes (a tuning and testing knob: a small value
// forces channel groups and non-temporal stores on small tensors).
int64_t cache_budget() {
    static const int64_t b = [] {
        const char* e = std::getenv("PYBN_CACHE_BUDGET");
        return e && *e ? int64_t(std::atoll(e)) : llc_bytes() / 4;
    }();
    return b;
}

namespace {
// Recently freed scratch blocks of one thread, handed to its next Scratch. Without them a call
// with a few hundred KB of scratch gives the memory back to the OS at every free (glibc trims
// the top of the heap above 128 KiB) and faults it in again on the next call, and with several
// threads each trim interrupts the other CPUs for a TLB shootdown (bench/NOTES.md, step 21).
// Blocks up to kMaxBlock, at most kKeptBytes per thread, freed when the thread exits.
class ScratchCache {
  public:
    static constexpr size_t kMaxBlock = size_t(2) << 20, kKeptBytes = size_t(4) << 20;
    ScratchCache() = default;
    ScratchCache(const ScratchCache&) = delete;
    ScratchCache& operator=(const ScratchCache&) = delete;
    ~ScratchCache() {
        for (const Block& b : slot_) std::free(b.ptr);
    }
    // The smallest kept block of at least `bytes` (its size in `got`), or null.
    void* take(size_t bytes, size_t& got) {
        Block* best = nullptr;
        for (Block& b : slot_)
            if (b.ptr && b.bytes >= bytes && (!best || b.bytes < best->bytes)) best = &b;
        if (!best) return nullptr;
        void* p = best->ptr;
        got = best->bytes;
        kept_ -= got;
        *best = Block{};
        return p;
    }
    // Keeps the block if it is small and there is room; false: the caller frees it.
    bool keep(void* p, size_t bytes) {
        if (bytes > kMaxBlock || kept_ + bytes > kKeptBytes) return false;
        for (Block& b : slot_)
            if (!b.ptr) {
                b = Block{p, bytes};
                kept_ += bytes;
                return true;
            }
        return false;
    }

  private:
    struct Block {
        void* ptr = nullptr;
        size_t bytes = 0;
    };
    Block slot_[8];
    size_t kept_ = 0;
};
thread_local ScratchCache t_scratch;
}  // namespace

namespace {
// PYBN_FAIL_SCRATCH=k: the k-th non-empty Scratch of the process fails (tests only; 0: never).
bool injected_failure() {
    static const long long fail_at = [] {
        const char* e = std::getenv("PYBN_FAIL_SCRATCH");
        return e && *e ? std::atoll(e) : 0LL;
    }();
    static std::atomic<long long> count{0};
    return fail_at > 0 && count.fetch_add(1, std::memory_order_relaxed) + 1 == fail_at;
}
}  // namespace

Scratch::Scratch(size_t bytes) : ptr_(nullptr), bytes_(bytes) {
    if (bytes == 0) return;
    if (injected_failure()) throw std::bad_alloc();
    ptr_ = t_scratch.take(bytes, bytes_);
    if (ptr_ == nullptr) ptr_ = std::malloc(bytes);
    if (ptr_ == nullptr) throw std::bad_alloc();
}
Scratch::~Scratch() {
    if (ptr_ && !t_scratch.keep(ptr_, bytes_)) std::free(ptr_);
}

}  // namespace pybn::cpu

namespace pybn {

int num_threads() {
    const int n = cpu::g_threads.load(std::memory_order_relaxed);
    if (n > 0) return n;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void set_num_threads(int n) { cpu::g_threads.store(n, std::memory_order_relaxed); }

}  // namespace pybn

using namespace pybn;

extern "C" {

pybn_status pybn_set_num_threads(int n) {
    if (n < 0)
        return fail(PYBN_ERROR_INVALID_VALUE, "pybn_set_num_threads: n must be >= 0 (0: default), got %d", n);
    set_num_threads(n);
    return PYBN_SUCCESS;
}

int pybn_get_num_threads(void) { return num_threads(); }

const char* pybn_cpu_isa(void) { return cpu::kernels().isa; }

const char* pybn_cpu_isas(void) {
    static const char* const names = [] {
        static char buf[128] = "";
        for (const cpu::Isa& isa : cpu::kIsas) {
            if (!isa.supported()) continue;
            if (buf[0]) std::strcat(buf, ",");
            std::strcat(buf, isa.table().isa);
        }
        return buf;
    }();
    return names;
}

pybn_status pybn_set_cpu_isa(const char* name) {
    if (name == nullptr || *name == 0) {
        cpu::g_table.store(cpu::best(), std::memory_order_release);
        return PYBN_SUCCESS;
    }
    for (const cpu::Isa& isa : cpu::kIsas) {
        if (std::strcmp(isa.table().isa, name) != 0) continue;
        if (!isa.supported())
            return fail(PYBN_ERROR_INVALID_VALUE,
                        "pybn_set_cpu_isa: this CPU does not support '%s' (supported: %s)", name,
                        pybn_cpu_isas());
        cpu::g_table.store(&isa.table(), std::memory_order_release);
        return PYBN_SUCCESS;
    }
    return fail(PYBN_ERROR_INVALID_ARGUMENT,
                "pybn_set_cpu_isa: name must be one of the compiled paths (%s) or empty, got '%s'",
                pybn_cpu_isas(), name);
}

}  // extern "C"
