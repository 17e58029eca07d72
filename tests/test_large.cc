// Large shapes (hardening): every size, stride and offset is 64-bit (nsa.h), so a forward whose
// tensors hold more than 2^31 elements, and whose element offsets pass 2^32, must give the same
// rows as the same sequences run on their own.
//
// LargeShapes.PackedLongTBf16 is a long test (label `long`, about 9.6 GiB of RAM, 1.5 minutes
// on two cores). The default `ctest` does not run it; it is registered for the ctest
// configuration `long` only (add_test CONFIGURATIONS, tests/CMakeLists.txt):
//
//   cmake -S . -B build -G Ninja && cmake --build build
//   ctest --test-dir build -C long -L long --output-on-failure   # the long tests only
//   ctest --test-dir build -C long                               # everything, long tests too
//   build/tests/test_large --gtest_filter='LargeShapes.*'        # directly
//
// Configuring with -DNSA_LONG_TESTS=ON registers it for every configuration instead, so a plain
// `ctest -L long` runs it (and a plain `ctest` too; `ctest -LE long` leaves it out).
// LargeShapesValidation.* are cheap and run in the default suite (test large_shapes_validation).
//
// The shape. Packed variable-length sequences (B = 1, cu_seqlens) of 0 .. 48 tokens, T just over
// 2^20 + 2^15 tokens, Hq = 32 query heads over Hkv = 2 KV heads, Dk = Dv = 64, bf16 everywhere:
//   - q [1, T, 32, 64] and o [1, T, 32, 64] each hold T * 2048 > 2^31 elements (4.1 GiB each);
//   - q and o are strided views whose token stride is twice the row (4096 elements): every token
//     row is followed by an unused row of the same size, so element offsets reach 2^32 + 2^27.
//     The buffers are mapped lazily (mmap, no huge pages) and only the rows are ever written, so
//     the unused rows cost no memory, and they are checked to be still untouched afterwards;
//   - compute stays small: short sequences and a small config (l = 4, d = 2, l' = 8, n = 3,
//     w = 4) give every query some 25 keys across the three branches, all three non-trivial
//     (the top-n selection binds from position 24 on, short sequences have an empty C_t).
// The long T is what packed long-context training hands the op; many heads make each token row
// large. The reference cannot run on the whole tensor, so a sample of sequences (the first, the
// last, those straddling element offsets 2^31 and 2^32, and random ones) is copied into small
// cases and run on its own, by the CPU backend (must match bit for bit: a CPU group's arithmetic
// does not depend on where its rows lie, forward.cc) and by the float64 reference (must agree to
// the rounding bounds of test_cpu_vs_ref.cc).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "nsa/nsa.h"
#include "test_util.h"

namespace {

using nsa_test::bf16_bits_to_float;
using nsa_test::float_to_bf16_bits;

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t k2p31 = int64_t{1} << 31;
constexpr int64_t k2p32 = int64_t{1} << 32;

// ---- Memory. ----

// Anonymous memory mapped without reserving it: pages cost RAM only once touched. Huge pages are
// refused so that an untouched 4 KiB gap between two written rows stays unbacked (a read of it
// maps the shared zero page, which is not counted as resident either).
class Mapping {
 public:
  explicit Mapping(int64_t bytes) : bytes_(std::max<int64_t>(bytes, 1)) {
    void* p = mmap(nullptr, static_cast<size_t>(bytes_), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      p = nullptr;
    } else {
      madvise(p, static_cast<size_t>(bytes_), MADV_NOHUGEPAGE);
    }
    data_ = p;
  }
  ~Mapping() {
    if (data_) munmap(data_, static_cast<size_t>(bytes_));
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  void* data() const { return data_; }
  int64_t bytes() const { return bytes_; }

 private:
  int64_t bytes_;
  void* data_ = nullptr;
};

int64_t peak_rss_bytes() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  return static_cast<int64_t>(r.ru_maxrss) * 1024;  // Linux reports KiB
}

// MemAvailable from /proc/meminfo, or -1 when unknown.
int64_t mem_available_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return -1;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- Data: a hash of (tensor, logical index), so every element differs and any row can be
// regenerated or copied without storing a second copy. ----

uint64_t mix(uint64_t x) {  // splitmix64's finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint16_t hashed_bf16(uint64_t id, int64_t index, double lo, double hi) {
  const uint64_t h = mix(id * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(index));
  const double u = static_cast<double>(h >> 40) * (1.0 / (1 << 24));  // [0, 1)
  return float_to_bf16_bits(static_cast<float>(lo + (hi - lo) * u));
}

nsa_tensor make_desc(void* data, nsa_dtype dt, std::vector<int64_t> shape,
                     std::vector<int64_t> stride) {
  nsa_tensor t;
  std::memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = dt;
  t.ndim = static_cast<int32_t>(shape.size());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = shape[i];
    t.stride[i] = stride[i];
  }
  return t;
}

// A [1, T, H, D] tensor in a lazily mapped buffer, with token stride `row_stride` >= H * D.
struct Big {
  Mapping map;
  nsa_tensor t;
  Big(nsa_dtype dt, int64_t T, int64_t H, int64_t D, int64_t row_stride)
      : map(T * row_stride * static_cast<int64_t>(nsa_dtype_size(dt))) {
    t = make_desc(map.data(), dt, {1, T, H, D}, {T * row_stride, row_stride, D, 1});
  }
  Big(nsa_dtype dt, int64_t T, int64_t H)  // [1, T, H], dense
      : map(T * H * static_cast<int64_t>(nsa_dtype_size(dt))) {
    t = make_desc(map.data(), dt, {1, T, H}, {T * H, H, 1});
  }
  template <typename E>
  E* at(int64_t off) const {
    return static_cast<E*>(t.data) + off;
  }
  int64_t off(int64_t tok, int64_t h = 0, int64_t i = 0) const {
    return tok * t.stride[1] + h * t.stride[2] + (t.ndim == 4 ? i : 0);
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
    return n;
  }
  int64_t max_offset() const {  // offset of the last logical element
    int64_t o = 0;
    for (int i = 0; i < t.ndim; ++i) o += (t.shape[i] - 1) * t.stride[i];
    return o;
  }
};

// Fills every logical element of a [1, T, H, D] (or [1, T, H]) bf16 tensor with hashed values of
// its logical (dense, row-major) index.
void fill_hashed(Big& b, uint64_t id, double lo, double hi) {
  const int64_t T = b.t.shape[1], H = b.t.shape[2], D = b.t.ndim == 4 ? b.t.shape[3] : 1;
  uint16_t* base = static_cast<uint16_t*>(b.t.data);
#pragma omp parallel for schedule(static)
  for (int64_t tok = 0; tok < T; ++tok) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < D; ++i) {
        base[b.off(tok, h, i)] = hashed_bf16(id, (tok * H + h) * D + i, lo, hi);
      }
    }
  }
}

// ---- A small case: one sequence copied out of the big tensors. ----

struct Small {
  int64_t L = 0, Tc = 0;
  std::vector<uint16_t> q, k, v, kc, vc, gc, gs, gw;
  std::vector<uint16_t> o16;  // CPU output (bf16, like the big run)
  std::vector<float> o32;     // reference output (f32)
  std::vector<float> lse[3];  // cmp, slc, win
  std::vector<int32_t> idx;
};

struct Problem {
  int64_t T = 0, Hq = 32, Hkv = 2, Dk = 64, Dv = 64;
  nsa_config cfg{};
  std::vector<int32_t> cu, cu_cmp;
};

// The params of a small contiguous case [1, L, ...]; o is `o_data` with dtype `o_dt`.
nsa_fwd_params small_params(const Problem& P, Small& s, void* o_data, nsa_dtype o_dt,
                            std::vector<float>* lse, std::vector<int32_t>* idx) {
  const nsa_dtype bf = NSA_DTYPE_BF16;
  const int64_t L = s.L, Tc = s.Tc, Hq = P.Hq, Hkv = P.Hkv, Dk = P.Dk, Dv = P.Dv;
  // A zero-row compressed tensor still needs a non-NULL pointer (NULL means absent).
  static uint16_t dummy[1];
  auto ptr = [](std::vector<uint16_t>& v) -> void* { return v.empty() ? dummy : v.data(); };
  nsa_fwd_params p;
  nsa_fwd_params_init(&p);
  p.in.cfg = P.cfg;
  p.in.q = make_desc(s.q.data(), bf, {1, L, Hq, Dk}, {L * Hq * Dk, Hq * Dk, Dk, 1});
  p.in.k = make_desc(s.k.data(), bf, {1, L, Hkv, Dk}, {L * Hkv * Dk, Hkv * Dk, Dk, 1});
  p.in.v = make_desc(s.v.data(), bf, {1, L, Hkv, Dv}, {L * Hkv * Dv, Hkv * Dv, Dv, 1});
  p.in.k_cmp = make_desc(ptr(s.kc), bf, {1, Tc, Hkv, Dk}, {Tc * Hkv * Dk, Hkv * Dk, Dk, 1});
  p.in.v_cmp = make_desc(ptr(s.vc), bf, {1, Tc, Hkv, Dv}, {Tc * Hkv * Dv, Hkv * Dv, Dv, 1});
  p.in.g_cmp = make_desc(s.gc.data(), bf, {1, L, Hq}, {L * Hq, Hq, 1});
  p.in.g_slc = make_desc(s.gs.data(), bf, {1, L, Hq}, {L * Hq, Hq, 1});
  p.in.g_win = make_desc(s.gw.data(), bf, {1, L, Hq}, {L * Hq, Hq, 1});
  p.o = make_desc(o_data, o_dt, {1, L, Hq, Dv}, {L * Hq * Dv, Hq * Dv, Dv, 1});
  nsa_tensor* lses[3] = {&p.lse_cmp, &p.lse_slc, &p.lse_win};
  for (int c = 0; c < 3; ++c) {
    lse[c].assign(static_cast<size_t>(L * Hq), std::numeric_limits<float>::quiet_NaN());
    *lses[c] = make_desc(lse[c].data(), NSA_DTYPE_F32, {1, L, Hq}, {L * Hq, Hq, 1});
  }
  const int64_t n = P.cfg.slc_count;
  idx->assign(static_cast<size_t>(L * Hkv * n), std::numeric_limits<int32_t>::min());
  p.slc_indices_out =
      make_desc(idx->data(), NSA_DTYPE_I32, {1, L, Hkv, n}, {L * Hkv * n, Hkv * n, n, 1});
  return p;
}

nsa_status run(nsa_backend backend, const nsa_fwd_params& p, std::string* msg) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_backend(ctx, backend);
  const nsa_status st = nsa_fwd(ctx, &p);
  *msg = nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  return st;
}

TEST(LargeShapes, PackedLongTBf16) {
  const auto t_start = std::chrono::steady_clock::now();
  Problem P;
  P.cfg = nsa_test::config(/*l=*/4, /*d=*/2, /*l'=*/8, /*n=*/3, /*n_init=*/1, /*n_local=*/1,
                           /*w=*/4);
  const int64_t Hq = P.Hq, Hkv = P.Hkv, Dk = P.Dk, Dv = P.Dv, n = P.cfg.slc_count;

  // Sequence lengths 0 .. 48 in a fixed scrambled order until T passes 2^20 + 2^15, then one
  // full-length sequence, so that the last rows belong to a long sequence. Zero-length
  // sequences (own no row) and sequences shorter than l (empty compressed branch) are among them.
  const int64_t target = (int64_t{1} << 20) + (int64_t{1} << 15);
  P.cu.push_back(0);
  for (int64_t s = 0; P.cu.back() < target; ++s) {
    P.cu.push_back(P.cu.back() + static_cast<int32_t>((s * 37 + 11) % 49));
  }
  P.cu.push_back(P.cu.back() + 48);
  const int64_t S = static_cast<int64_t>(P.cu.size()) - 1;
  P.T = P.cu.back();
  const int64_t T = P.T;
  P.cu_cmp.resize(P.cu.size());
  {
    nsa_context* ctx = nullptr;
    nsa_context_create(&ctx);
    ASSERT_EQ(nsa_cmp_seqlens(ctx, &P.cfg, P.cu.data(), S, P.cu_cmp.data()), NSA_OK)
        << nsa_last_error(ctx);
    nsa_context_destroy(ctx);
  }
  const int64_t Tc = P.cu_cmp.back();

  // q and o: token rows of Hq * D elements, each followed by an unused row of the same size.
  const int64_t q_row = 2 * Hq * Dk, o_row = 2 * Hq * Dv;
  const int64_t q_elems = T * Hq * Dk, o_elems = T * Hq * Dv;
  // The point of the test: tensors past 2^31 elements, offsets past 2^32.
  ASSERT_GT(q_elems, k2p31);
  ASSERT_GT(o_elems, k2p31);
  ASSERT_GT((T - 1) * q_row, k2p32);
  ASSERT_GT((T - 1) * o_row, k2p32);

  // Resident memory: the rows of q and o, k, v, k_cmp, v_cmp, gates (bf16), lse (f32), indices.
  const int64_t need = 2 * (q_elems + o_elems) + 2 * T * Hkv * (Dk + Dv) +
                       2 * Tc * Hkv * (Dk + Dv) + 3 * 2 * T * Hq + 3 * 4 * T * Hq + 4 * T * Hkv * n;
  const int64_t avail = mem_available_bytes();
  std::printf(
      "[ large    ] T = %lld tokens in %lld packed sequences, Tc = %lld, Hq = %lld, "
      "Hkv = %lld, Dk = Dv = %lld, bf16\n",
      (long long)T, (long long)S, (long long)Tc, (long long)Hq, (long long)Hkv, (long long)Dk);
  std::printf(
      "[ large    ] elements: q %lld (2^%.3f), o %lld (2^%.3f); largest element offset "
      "in q and o %lld (2^%.3f)\n",
      (long long)q_elems, std::log2(double(q_elems)), (long long)o_elems,
      std::log2(double(o_elems)), (long long)((T - 1) * q_row + q_row / 2 - 1),
      std::log2(double((T - 1) * q_row + q_row / 2 - 1)));
  std::printf("[ large    ] expected resident memory %.2f GiB, available %.2f GiB\n",
              double(need) / kGiB, double(avail) / kGiB);
  if (sysconf(_SC_PAGESIZE) != 4096) {
    std::printf(
        "[ large    ] page size %ld: the unused rows of q and o share pages with used "
        "ones and become resident (about 8 GiB more)\n",
        sysconf(_SC_PAGESIZE));
  }
  // Not enough RAM is an environment limit, not a library failure: skip (ctest reports it).
  if (avail >= 0 && avail < need + kGiB) {
    GTEST_SKIP() << "needs about " << double(need + kGiB) / kGiB << " GiB available, have "
                 << double(avail) / kGiB;
  }

  // ---- Inputs. ----
  auto t0 = std::chrono::steady_clock::now();
  Big q(NSA_DTYPE_BF16, T, Hq, Dk, q_row);
  Big k(NSA_DTYPE_BF16, T, Hkv, Dk, Hkv * Dk), v(NSA_DTYPE_BF16, T, Hkv, Dv, Hkv * Dv);
  Big kc(NSA_DTYPE_BF16, Tc, Hkv, Dk, Hkv * Dk), vc(NSA_DTYPE_BF16, Tc, Hkv, Dv, Hkv * Dv);
  Big gc(NSA_DTYPE_BF16, T, Hq), gs(NSA_DTYPE_BF16, T, Hq), gw(NSA_DTYPE_BF16, T, Hq);
  Big o(NSA_DTYPE_BF16, T, Hq, Dv, o_row);
  Big lse_c(NSA_DTYPE_F32, T, Hq), lse_s(NSA_DTYPE_F32, T, Hq), lse_w(NSA_DTYPE_F32, T, Hq);
  Big idx(NSA_DTYPE_I32, T, Hkv, n, Hkv * n);
  for (Big* b : {&q, &k, &v, &kc, &vc, &gc, &gs, &gw, &o, &lse_c, &lse_s, &lse_w, &idx}) {
    ASSERT_NE(b->t.data, nullptr) << "mmap failed";
  }
  // As make_case: scores O(1), values and gates of unit size.
  fill_hashed(q, 1, -2.0, 2.0);
  fill_hashed(k, 2, -2.0, 2.0);
  fill_hashed(v, 3, -1.0, 1.0);
  fill_hashed(kc, 4, -2.0, 2.0);
  fill_hashed(vc, 5, -1.0, 1.0);
  fill_hashed(gc, 6, 0.0, 1.0);
  fill_hashed(gs, 7, 0.0, 1.0);
  fill_hashed(gw, 8, 0.0, 1.0);
  // Outputs pre-filled with values no result has (NaN, INT32_MIN) in their rows only: every
  // logical element must be overwritten, and the unused rows of o must stay unmapped zeros.
  {
    const uint16_t nan16 = 0x7fc0;
    uint16_t* ob = o.at<uint16_t>(0);
#pragma omp parallel for schedule(static)
    for (int64_t tok = 0; tok < T; ++tok) std::fill_n(ob + o.off(tok), Hq * Dv, nan16);
    for (Big* l : {&lse_c, &lse_s, &lse_w}) {
      std::fill_n(l->at<float>(0), T * Hq, std::numeric_limits<float>::quiet_NaN());
    }
    std::fill_n(idx.at<int32_t>(0), T * Hkv * n, std::numeric_limits<int32_t>::min());
  }
  std::printf("[ large    ] inputs filled in %.1f s\n", seconds_since(t0));

  nsa_fwd_params p;
  nsa_fwd_params_init(&p);
  p.in.cfg = P.cfg;
  p.in.q = q.t, p.in.k = k.t, p.in.v = v.t, p.in.k_cmp = kc.t, p.in.v_cmp = vc.t;
  p.in.g_cmp = gc.t, p.in.g_slc = gs.t, p.in.g_win = gw.t;
  p.in.cu_seqlens = P.cu.data();
  p.in.num_seqs = S;
  p.o = o.t, p.lse_cmp = lse_c.t, p.lse_slc = lse_s.t, p.lse_win = lse_w.t;
  p.slc_indices_out = idx.t;

  // ---- The big forward, CPU backend, the context's default thread count. ----
  t0 = std::chrono::steady_clock::now();
  std::string msg;
  ASSERT_EQ(run(NSA_BACKEND_CPU, p, &msg), NSA_OK) << msg;
  std::printf("[ large    ] CPU forward in %.1f s\n", seconds_since(t0));

  // ---- Whole-tensor checks, cheap (one pass each). ----
  t0 = std::chrono::steady_clock::now();
  {
    // Every o element written, and finite (inputs are bounded, so the output is).
    int64_t bad = 0;
    const uint16_t* ob = o.at<uint16_t>(0);
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t tok = 0; tok < T; ++tok) {
      for (int64_t i = 0; i < Hq * Dv; ++i)
        bad += std::isfinite(bf16_bits_to_float(ob[o.off(tok) + i])) ? 0 : 1;
    }
    EXPECT_EQ(bad, 0) << "o: elements left unwritten (NaN) or not finite";
  }
  // The unused rows of q (an input) and o (an output) are still the zeros of a fresh mapping:
  // nothing was written outside the views. They are read as 64-bit words.
  for (const Big* b : {&q, &o}) {
    const int64_t row = b->t.stride[1];
    const int64_t used = b->t.shape[2] * b->t.shape[3];
    int64_t dirty = 0;
    const uint16_t* base = b->at<uint16_t>(0);
#pragma omp parallel for schedule(static) reduction(+ : dirty)
    for (int64_t tok = 0; tok < T; ++tok) {
      const uint64_t* gap = reinterpret_cast<const uint64_t*>(base + tok * row + used);
      uint64_t any = 0;
      for (int64_t w = 0; w < (row - used) / 4; ++w) any |= gap[w];
      dirty += any != 0;
    }
    EXPECT_EQ(dirty, 0) << (b == &q ? "q" : "o") << ": unused rows between token rows written";
  }
  // lse: written everywhere; -inf exactly where the branch is empty. C_t is empty while
  // t < l - 1; the selected branch always holds the query's own block and the window the
  // query's own token, so those are finite.
  {
    int64_t bad = 0;
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t tok = P.cu[s]; tok < P.cu[s + 1]; ++tok) {
        const int64_t t = tok - P.cu[s];
        for (int64_t h = 0; h < Hq; ++h) {
          const float c = *lse_c.at<float>(lse_c.off(tok, h));
          const bool cmp_empty = t < P.cfg.cmp_block - 1;
          bad += cmp_empty ? !(std::isinf(c) && c < 0) : !std::isfinite(c);
          bad += !std::isfinite(*lse_s.at<float>(lse_s.off(tok, h)));
          bad += !std::isfinite(*lse_w.at<float>(lse_w.off(tok, h)));
        }
      }
    }
    EXPECT_EQ(bad, 0) << "lse: unwritten, or -inf where it must not be (or not where it must)";
  }
  // Selected indices: written, sorted ascending, -1 padded, min(n, J + 1) entries including the
  // forced blocks 0 and J (n_init = n_local = 1), all within [0, J] (SPEC 4.3).
  {
    int64_t bad = 0;
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t tok = P.cu[s]; tok < P.cu[s + 1]; ++tok) {
        const int64_t J = (tok - P.cu[s]) / P.cfg.slc_block;
        for (int64_t h = 0; h < Hkv; ++h) {
          const int32_t* row = idx.at<int32_t>(idx.off(tok, h));
          const int64_t want = std::min<int64_t>(n, J + 1);
          bool ok = row[0] == 0;
          for (int64_t c = 0; c < n; ++c) {
            if (c < want) {
              ok = ok && row[c] >= 0 && row[c] <= J && (c == 0 || row[c] > row[c - 1]);
            } else {
              ok = ok && row[c] == -1;
            }
          }
          ok = ok && row[want - 1] == J;
          bad += !ok;
        }
      }
    }
    EXPECT_EQ(bad, 0) << "slc_indices_out: rows unwritten or not a valid selection";
  }
  std::printf("[ large    ] whole-tensor checks in %.1f s\n", seconds_since(t0));

  // ---- The sample of sequences. ----
  auto seq_of = [&](int64_t tok) {  // the (non-empty) sequence holding token tok
    return static_cast<int64_t>(std::upper_bound(P.cu.begin(), P.cu.end(), tok) - P.cu.begin()) - 1;
  };
  std::set<int64_t> sample;
  for (int64_t s = 0; s < S && sample.size() < 2; ++s) {
    if (P.cu[s + 1] > P.cu[s]) sample.insert(s);  // the first two non-empty ones
  }
  for (int64_t tok : {T - 1, T - 49, T - 97}) sample.insert(seq_of(tok));  // the last ones
  // The tokens around element offset 2^31 and 2^32 of q and o (physical, in the strided
  // buffers) and logical 2^31 (in the dense numbering): the rows just before and after.
  for (int64_t X : {k2p31, k2p32}) {
    for (int64_t row : {q_row, o_row, Hq * Dk, Hq * Dv}) {
      const int64_t tok = X / row;
      for (int64_t t2 : {tok - 1, tok, tok + 1}) {
        if (t2 >= 0 && t2 < T) sample.insert(seq_of(t2));
      }
    }
  }
  {
    std::mt19937_64 rng(20250211);
    std::uniform_int_distribution<int64_t> pick(0, S - 1);
    int added = 0;
    while (added < 24) {
      const int64_t s = pick(rng);
      if (P.cu[s + 1] > P.cu[s] && sample.insert(s).second) ++added;
    }
  }
  // The sample reaches past 2^32 in q and o, and holds the last token.
  int64_t max_q_off = 0;
  for (int64_t s : sample) max_q_off = std::max(max_q_off, q.off(P.cu[s + 1] - 1, Hq - 1, Dk - 1));
  ASSERT_GT(max_q_off, k2p32);
  ASSERT_TRUE(sample.count(S - 1));

  // Bounds as test_cpu_vs_ref.cc: K = Dk + the most keys one softmax sums, 2^-24 per rounding,
  // x16 for the exp. o: the CPU rounds its f32 result to bf16 (<= 2^-8 relative, on a value
  // within tol of the reference's), the reference writes f32.
  const int64_t keys = std::max<int64_t>(int64_t{P.cfg.slc_count} * P.cfg.slc_block, P.cfg.window);
  const double tol = 16.0 * static_cast<double>(Dk + keys) / (1 << 24);
  // bf16 arithmetic, where AUTO picks it (bf16 inputs here): each softmax weight rounded to bf16
  // moves a branch's output by at most 2^-8 max|v| (|v| <= 1 here), o by three times that
  // (test_cpu_vs_ref.cc, CpuFwdBf16Math).
  const double pv = nsa_bf16_math_auto() != NSA_BF16_MATH_F32 ? 3.0 / (1 << 8) : 0.0;
  const double o_abs = 2.0 * tol + pv, o_rel = 1.0 / (1 << 8);

  t0 = std::chrono::steady_clock::now();
  int64_t rows_checked = 0;
  for (int64_t s : sample) {
    const int64_t a = P.cu[s], L = P.cu[s + 1] - a, ca = P.cu_cmp[s];
    SCOPED_TRACE("sequence " + std::to_string(s) + " tokens [" + std::to_string(a) + ", " +
                 std::to_string(a + L) + ")");
    Small sm;
    sm.L = L;
    sm.Tc = P.cu_cmp[s + 1] - ca;
    // Copy the sequence's rows out of the big tensors (bits, not values).
    auto copy4 = [](const Big& b, int64_t first, int64_t rows, std::vector<uint16_t>& dst) {
      const int64_t H = b.t.shape[2], D = b.t.shape[3];
      dst.resize(static_cast<size_t>(rows * H * D));
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t h = 0; h < H; ++h) {
          std::memcpy(&dst[(r * H + h) * D], b.at<uint16_t>(b.off(first + r, h)), D * 2);
        }
      }
    };
    auto copy3 = [](const Big& b, int64_t first, int64_t rows, std::vector<uint16_t>& dst) {
      dst.assign(b.at<uint16_t>(b.off(first)), b.at<uint16_t>(b.off(first + rows)));  // dense
    };
    copy4(q, a, L, sm.q);
    copy4(k, a, L, sm.k);
    copy4(v, a, L, sm.v);
    copy4(kc, ca, sm.Tc, sm.kc);
    copy4(vc, ca, sm.Tc, sm.vc);
    copy3(gc, a, L, sm.gc);
    copy3(gs, a, L, sm.gs);
    copy3(gw, a, L, sm.gw);

    // The same sequence alone on the CPU backend: identical bits expected.
    sm.o16.assign(static_cast<size_t>(L * Hq * Dv), 0);
    std::vector<float> cpu_lse[3];
    std::vector<int32_t> cpu_idx;
    nsa_fwd_params pc = small_params(P, sm, sm.o16.data(), NSA_DTYPE_BF16, cpu_lse, &cpu_idx);
    ASSERT_EQ(run(NSA_BACKEND_CPU, pc, &msg), NSA_OK) << msg;
    // And on the float64 reference, o in f32.
    sm.o32.assign(static_cast<size_t>(L * Hq * Dv), 0.0f);
    std::vector<int32_t> ref_idx;
    nsa_fwd_params pr = small_params(P, sm, sm.o32.data(), NSA_DTYPE_F32, sm.lse, &ref_idx);
    ASSERT_EQ(run(NSA_BACKEND_REF, pr, &msg), NSA_OK) << msg;

    int64_t o_bits = 0, o_far = 0, lse_bits = 0, lse_far = 0, idx_cpu = 0, idx_ref = 0;
    double worst = 0.0;
    const Big* big_lse[3] = {&lse_c, &lse_s, &lse_w};
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t h = 0; h < Hq; ++h) {
        for (int64_t i = 0; i < Dv; ++i) {
          const uint16_t got = *o.at<uint16_t>(o.off(a + t, h, i));
          const size_t j = static_cast<size_t>((t * Hq + h) * Dv + i);
          o_bits += got != sm.o16[j];
          const double x = bf16_bits_to_float(got), y = sm.o32[j];
          worst = std::max(worst, std::fabs(x - y));
          o_far += !(std::fabs(x - y) <= o_abs + o_rel * std::fabs(y));
        }
        for (int c = 0; c < 3; ++c) {
          const float got = *big_lse[c]->at<float>(big_lse[c]->off(a + t, h));
          const size_t j = static_cast<size_t>(t * Hq + h);
          lse_bits += std::memcmp(&got, &cpu_lse[c][j], sizeof got) != 0;
          const double y = sm.lse[c][j];
          lse_far += std::isinf(y) ? got != y : !(std::fabs(got - y) <= tol + tol * std::fabs(y));
        }
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        for (int64_t c = 0; c < n; ++c) {
          const int32_t got = idx.at<int32_t>(idx.off(a + t, h))[c];
          const size_t j = static_cast<size_t>((t * Hkv + h) * n + c);
          idx_cpu += got != cpu_idx[j];
          idx_ref += got != ref_idx[j];
        }
      }
    }
    EXPECT_EQ(o_bits, 0) << "o differs from the same sequence run alone on the CPU backend";
    EXPECT_EQ(lse_bits, 0) << "lse differs from the same sequence run alone on the CPU backend";
    EXPECT_EQ(idx_cpu, 0) << "indices differ from the same sequence run alone on the CPU backend";
    EXPECT_EQ(o_far, 0) << "o off the reference (tol " << o_abs << " + " << o_rel
                        << " |ref|), worst abs error " << worst;
    EXPECT_EQ(lse_far, 0) << "lse off the reference";
    // Integers: equal, unless a genuine near-tie at the top-n boundary (fixed data: none here).
    EXPECT_EQ(idx_ref, 0) << "indices differ from the reference";
    rows_checked += L;
  }
  std::printf(
      "[ large    ] %zu sampled sequences, %lld token rows (x %lld heads) checked "
      "against the CPU on the sequence alone and the float64 reference in %.1f s; "
      "largest q offset checked %lld (2^%.3f)\n",
      sample.size(), (long long)rows_checked, (long long)Hq, seconds_since(t0),
      (long long)max_q_off, std::log2(double(max_q_off)));
  std::printf("[ large    ] peak RSS %.2f GiB, total %.1f s\n", double(peak_rss_bytes()) / kGiB,
              seconds_since(t_start));
}

// ---- Cheap guards of the 64-bit paths; these run in the default suite. ----

// A fixed-length sequence with more selection blocks than an int32 block index can number is
// rejected before any kernel runs (the kernels and slc_indices are int32). The tensors are
// 1-element buffers described with T = 2^31 + 2 tokens: validation reads none of them, and a
// kernel reaching them would read far out of bounds.
TEST(LargeShapesValidation, BlockIndexPastInt32Rejected) {
  const int64_t T = k2p31 + 2;
  nsa_config cfg = nsa_test::config(1, 1, 1, 3, 1, 1, 1);  // l' = 1: one block per token
  static uint16_t cell[1];
  static float out[1];
  static int32_t ix[1];
  nsa_fwd_params p;
  nsa_fwd_params_init(&p);
  p.in.cfg = cfg;
  auto d4 = [&](void* data, nsa_dtype dt, int64_t rows, int64_t last) {
    return make_desc(data, dt, {1, rows, 1, last}, {rows * last, last, last, 1});
  };
  p.in.q = p.in.k = p.in.v = p.in.k_cmp = p.in.v_cmp =
      d4(cell, NSA_DTYPE_BF16, T, 1);  // Tc = T for l = d = 1
  p.in.g_cmp = p.in.g_slc = p.in.g_win = make_desc(cell, NSA_DTYPE_BF16, {1, T, 1}, {T, 1, 1});
  p.o = d4(out, NSA_DTYPE_F32, T, 1);
  p.slc_indices_out = d4(ix, NSA_DTYPE_I32, T, 3);
  out[0] = 7.0f;
  ix[0] = 7;
  std::string msg;
  for (nsa_backend b : {NSA_BACKEND_CPU, NSA_BACKEND_REF}) {
    EXPECT_EQ(run(b, p, &msg), NSA_ERR_INVALID_SHAPE) << msg;
    EXPECT_NE(msg.find("int32"), std::string::npos) << msg;
  }
  // Outputs untouched on error (SPEC 8).
  EXPECT_EQ(out[0], 7.0f);
  EXPECT_EQ(ix[0], 7);
}

// nsa_tensor_contiguous on a shape whose element count passes INT64_MAX saturates the stride
// instead of wrapping it (signed overflow), and nsa_fwd rejects the descriptor naming q.
TEST(LargeShapesValidation, ContiguousStrideSaturates) {
  static uint16_t cell[1];
  const int64_t shape[4] = {2, int64_t{1} << 62, 2, 2};
  const nsa_tensor t = nsa_tensor_contiguous(cell, NSA_DTYPE_BF16, 4, shape);
  EXPECT_EQ(t.stride[3], 1);
  EXPECT_EQ(t.stride[2], 2);
  EXPECT_EQ(t.stride[1], 4);
  EXPECT_EQ(t.stride[0], INT64_MAX);  // 2^64 does not fit: saturated, not wrapped to 0
  nsa_fwd_params p;
  nsa_fwd_params_init(&p);
  p.in.q = t;
  std::string msg;
  EXPECT_EQ(run(NSA_BACKEND_CPU, p, &msg), NSA_ERR_INVALID_SHAPE) << msg;
  EXPECT_EQ(msg.rfind("q:", 0), 0u) << msg;
}

}  // namespace
