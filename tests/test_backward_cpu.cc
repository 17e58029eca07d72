// The backward of every backend under test (backend_harness.h; the CPU's: f32,
// src/cpu/backward*.cc) against the float64 reference, both through nsa_bwd (SPEC.md section 6):
// awkward shapes (T off every block size, T below a block, G in {1, 3, 16}, Dk != Dv), several
// configs, branch-own K/V, varlen packing, bf16 inputs and outputs, strided views, saved state
// (LSEs; LSEs and branch outputs), heavy duplicate selections, empty compressed rows. The CPU
// backend alone: bitwise-identical results for any thread count, its profile, every Highway
// target.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <sstream>

#include "api_util.h"
#include "backend_harness.h"
#include "backward_util.h"

namespace nsa_test {
namespace {

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff
// One bf16 ulp is at most 2^-7 of the value: the two results, each rounded to bf16 on store, can
// land on the two sides of one rounding boundary (as in test_cpu_vs_ref.cc).
constexpr double kBf16Rel = 1.0 / (1 << 7);

Shape shape(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t Dk, int64_t Dv) {
  Shape s;
  s.B = B, s.T = T, s.Hq = Hq, s.Hkv = Hkv, s.Dk = Dk, s.Dv = Dv;
  return s;
}

std::vector<nsa_config> configs() {
  nsa_config def;
  nsa_config_default(&def);
  return {def, config(32, 16, 64, 5, 1, 2, 512), config(16, 8, 32, 6, 1, 2, 48),
          config(4, 2, 8, 3, 1, 1, 6)};
}

struct Options {
  nsa_dtype in_dt = NSA_DTYPE_F32, out_dt = NSA_DTYPE_F32;
  bool padded = false;
  bool own_slc = false, own_win = false;  // pass k_slc/v_slc (k_win/v_win) of their own
  // The forward's saved state, from the reference forward: 0 none, 1 lse_* only (the CPU reruns
  // its forward for the rest), 2 lse_* and o_* (the CPU starts from them).
  int saved = 0;
};

// The inputs of one case in the requested dtype and layout, and one set of outputs per run.
struct BwdCase {
  Case64 c;
  Options o;
  Tensor q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc, g_win, d_o, idx;
  Tensor lse[3], o_branch[3];

  struct Outs {
    Tensor dq, dk, dv, dk_slc, dv_slc, dk_win, dv_win, dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win;
  };

  BwdCase(Case64 cs, Options opt) : c(std::move(cs)), o(opt) {
    const nsa::ref::NsaArgs64& a = c.args;
    auto in = [&](const Tensor64& x, int nd) { return to_tensor(x, nd, o.padded, o.in_dt); };
    q = in(a.q, 4), k = in(a.k_slc, 4), v = in(a.v_slc, 4);
    k_cmp = in(a.k_cmp, 4), v_cmp = in(a.v_cmp, 4);
    g_cmp = in(a.g_cmp, 3), g_slc = in(a.g_slc, 3), g_win = in(a.g_win, 3);
    d_o = in(c.d_o, 4);
    // Branch-own K/V: values unrelated to k/v (the selection is a given set either way).
    std::mt19937_64 rng(99);
    Tensor64 ks = a.k_slc, vs = a.v_slc, kw = a.k_slc, vw = a.v_slc;
    for (Tensor64* t : {&ks, &kw}) fill_f32_exact(*t, rng, -2.0, 2.0);
    for (Tensor64* t : {&vs, &vw}) fill_f32_exact(*t, rng, -1.0, 1.0);
    k_slc = in(ks, 4), v_slc = in(vs, 4), k_win = in(kw, 4), v_win = in(vw, 4);
    const Shape& s = c.shape;
    idx = Tensor(NSA_DTYPE_I32, {s.B, s.T, s.Hkv, a.cfg.slc_count}, o.padded);
    int64_t i = 0;
    idx.for_each([&](int64_t b, int64_t t, int64_t h, int64_t kk) {
      idx.set_raw(idx.logical_offset(b, t, h, kk), a.slc_indices[i++]);
    });
    if (o.saved > 0) forward_state();
  }

  nsa_bwd_params params(Outs& r) {
    const Shape& s = c.shape;
    const int64_t Tc = c.args.k_cmp.shape[1];
    auto out = [&](std::vector<int64_t> sh) { return Tensor(o.out_dt, std::move(sh), o.padded); };
    r.dq = out({s.B, s.T, s.Hq, s.Dk});
    r.dk = out({s.B, s.T, s.Hkv, s.Dk}), r.dv = out({s.B, s.T, s.Hkv, s.Dv});
    r.dk_cmp = out({s.B, Tc, s.Hkv, s.Dk}), r.dv_cmp = out({s.B, Tc, s.Hkv, s.Dv});
    r.dg_cmp = out({s.B, s.T, s.Hq}), r.dg_slc = out({s.B, s.T, s.Hq}),
    r.dg_win = out({s.B, s.T, s.Hq});
    nsa_bwd_params p;
    nsa_bwd_params_init(&p);
    common(&p);
    p.slc_indices = idx.desc();
    p.d_o = d_o.desc();
    if (o.saved > 0)
      p.lse_cmp = lse[0].desc(), p.lse_slc = lse[1].desc(), p.lse_win = lse[2].desc();
    if (o.saved > 1) {
      p.o_cmp = o_branch[0].desc(), p.o_slc = o_branch[1].desc(), p.o_win = o_branch[2].desc();
    }
    p.dq = r.dq.desc(), p.dk = r.dk.desc(), p.dv = r.dv.desc();
    if (o.own_slc) {
      r.dk_slc = out({s.B, s.T, s.Hkv, s.Dk}), r.dv_slc = out({s.B, s.T, s.Hkv, s.Dv});
      p.dk_slc = r.dk_slc.desc(), p.dv_slc = r.dv_slc.desc();
    }
    if (o.own_win) {
      r.dk_win = out({s.B, s.T, s.Hkv, s.Dk}), r.dv_win = out({s.B, s.T, s.Hkv, s.Dv});
      p.dk_win = r.dk_win.desc(), p.dv_win = r.dv_win.desc();
    }
    p.dk_cmp = r.dk_cmp.desc(), p.dv_cmp = r.dv_cmp.desc();
    p.dg_cmp = r.dg_cmp.desc(), p.dg_slc = r.dg_slc.desc(), p.dg_win = r.dg_win.desc();
    return p;
  }

  // The forward's inputs, shared by nsa_fwd_params and nsa_bwd_params (same field names).
  template <typename Params>
  void common(Params* p) {
    p->in.cfg = c.args.cfg;
    p->in.q = q.desc(), p->in.k = k.desc(), p->in.v = v.desc();
    if (o.own_slc) p->in.k_slc = k_slc.desc(), p->in.v_slc = v_slc.desc();
    if (o.own_win) p->in.k_win = k_win.desc(), p->in.v_win = v_win.desc();
    p->in.k_cmp = k_cmp.desc(), p->in.v_cmp = v_cmp.desc();
    p->in.g_cmp = g_cmp.desc(), p->in.g_slc = g_slc.desc(), p->in.g_win = g_win.desc();
    if (!c.cu.empty()) {
      p->in.cu_seqlens = c.cu.data();
      p->in.num_seqs = static_cast<int64_t>(c.cu.size()) - 1;
    }
  }

  // The reference forward's LSEs and branch outputs on these inputs with this selection (f32:
  // saved in bf16, the outputs would carry bf16 rounding into dg and D).
  void forward_state() {
    const Shape& s = c.shape;
    Tensor o_out(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dv});
    for (Tensor& l : lse) l = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq}, o.padded);
    for (Tensor& x : o_branch) x = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dv}, o.padded);
    nsa_fwd_params p;
    nsa_fwd_params_init(&p);
    common(&p);
    p.slc_indices_in = idx.desc();
    p.o = o_out.desc();
    p.lse_cmp = lse[0].desc(), p.lse_slc = lse[1].desc(), p.lse_win = lse[2].desc();
    p.o_cmp = o_branch[0].desc(), p.o_slc = o_branch[1].desc(), p.o_win = o_branch[2].desc();
    std::string msg;
    ASSERT_EQ(run_on(oracle(), p, 0, &msg), NSA_OK) << msg;
  }

  nsa_status run(const BackendUnderTest& b, int threads, Outs* r, std::string* msg) {
    return run_on(b, params(*r), threads, msg);
  }
};

// Every element within tol * max(max|ref|, 1) (+ the bf16 store's rounding); never NaN where ref
// is not. The floor 1: a gradient can cancel to exactly 0 (T = 1: one key, P = 1, dS = 0) while
// its terms are O(1) on these O(1) inputs, and the rounding error scales with the terms.
void expect_close(const char* name, const Tensor& got, const Tensor& want, double tol, double rel) {
  double scale = 1.0;
  want.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    scale = std::max(scale, std::fabs(want.get_raw(want.logical_offset(a, b, c, d))));
  });
  int64_t bad = 0;
  std::string first;
  got.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    const double x = got.get_raw(got.logical_offset(a, b, c, d));
    const double y = want.get_raw(want.logical_offset(a, b, c, d));
    if (!(std::fabs(x - y) <= tol * scale + rel * std::fabs(y)) && bad++ == 0) {
      std::ostringstream os;
      os << "[" << a << "," << b << "," << c << "," << d << "] got " << x << " ref " << y;
      first = os.str();
    }
  });
  EXPECT_EQ(bad, 0) << name << ": " << bad << " elements off (tol " << tol << " * max|ref| "
                    << scale << "), first " << first;
}

// Runs the oracle and backend `be` on one case and compares every output.
void compare(const BackendUnderTest& be, const Case64& c64, const Options& o, int threads = 0) {
  const Shape& s = c64.shape;
  const nsa_config& cfg = c64.args.cfg;
  std::ostringstream os;
  os << "T=" << s.T << " B=" << s.B << " Hq=" << s.Hq << " Hkv=" << s.Hkv << " Dk=" << s.Dk
     << " Dv=" << s.Dv << " l=" << cfg.cmp_block << " l'=" << cfg.slc_block
     << " n=" << cfg.slc_count << " w=" << cfg.window << " in=" << nsa_dtype_name(o.in_dt)
     << " out=" << nsa_dtype_name(o.out_dt) << (o.padded ? " padded" : "")
     << (o.own_slc ? " own_slc" : "") << (o.own_win ? " own_win" : "")
     << (o.saved == 1   ? " saved lse"
         : o.saved == 2 ? " saved lse+o"
                        : "");
  SCOPED_TRACE(os.str());
  BwdCase bc(c64, o);
  BwdCase::Outs cpu, ref;
  std::string msg;
  ASSERT_EQ(bc.run(oracle(), 0, &ref, &msg), NSA_OK) << msg;
  ASSERT_EQ(bc.run(be, threads, &cpu, &msg), NSA_OK) << msg;
  // K: the longest f32 chain behind one gradient element. A probability needs a Dk-term score
  // and (recomputed) an up-to-T-term LSE sum; dP a Dv-term dot; dq then sums over a row's keys
  // (<= 3T), and dk/dv over the G heads of the queries reading a key (<= G T per branch). Each
  // rounding is <= 2^-24 relative to the terms, which are bounded by max|ref| up to the O(1)
  // cancellation of sum_j dS_j = 0; x16 for exp's amplification of score errors (|s| < ~16).
  const double K = static_cast<double>(s.Dk + s.Dv + 3 * s.T + s.Hq / s.Hkv * s.T);
  const double tol = 16.0 * K * kEps;
  const double rel = o.out_dt == NSA_DTYPE_BF16 ? kBf16Rel : 0.0;
  expect_close("dq", cpu.dq, ref.dq, tol, rel);
  if (!(o.own_slc && o.own_win)) {
    expect_close("dk", cpu.dk, ref.dk, tol, rel);
    expect_close("dv", cpu.dv, ref.dv, tol, rel);
  }
  if (o.own_slc) {
    expect_close("dk_slc", cpu.dk_slc, ref.dk_slc, tol, rel);
    expect_close("dv_slc", cpu.dv_slc, ref.dv_slc, tol, rel);
  }
  if (o.own_win) {
    expect_close("dk_win", cpu.dk_win, ref.dk_win, tol, rel);
    expect_close("dv_win", cpu.dv_win, ref.dv_win, tol, rel);
  }
  expect_close("dk_cmp", cpu.dk_cmp, ref.dk_cmp, tol, rel);
  expect_close("dv_cmp", cpu.dv_cmp, ref.dv_cmp, tol, rel);
  expect_close("dg_cmp", cpu.dg_cmp, ref.dg_cmp, tol, rel);
  expect_close("dg_slc", cpu.dg_slc, ref.dg_slc, tol, rel);
  expect_close("dg_win", cpu.dg_win, ref.dg_win, tol, rel);
}

constexpr uint64_t kSeed = 20260211;

class BwdVsRef : public ::testing::TestWithParam<BackendUnderTest> {};
INSTANTIATE_TEST_SUITE_P(Backends, BwdVsRef, ::testing::ValuesIn(backends_under_test(kOpBwd)),
                         backend_test_name);

TEST_P(BwdVsRef, ShortShapes) {
  int i = 0;
  for (int64_t T : {1, 15, 33, 70}) {
    for (int64_t G : {1, 3, 16}) {
      const nsa_config cfg = configs()[i % 4];
      const int64_t Hkv = G == 16 ? 1 : 2;
      const Case64 c = make_case64(shape(T == 15 ? 2 : 1, T, G * Hkv, Hkv, 24, 16), cfg, kSeed + i);
      Options o;
      o.in_dt = i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
      o.padded = i % 3 == 0;
      o.saved = i % 3;
      compare(GetParam(), c, o);
      ++i;
    }
  }
}

TEST_P(BwdVsRef, ConfigsAndHeadDims) {
  int i = 0;
  for (const nsa_config& cfg : configs()) {
    for (auto [dk, dv] : {std::pair{17, 33}, std::pair{40, 8}}) {
      const Case64 c = make_case64(shape(1, 230, 6, 2, dk, dv), cfg, kSeed + 100 + i);
      Options o;
      o.padded = i % 2 == 1;
      o.out_dt = i % 3 == 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
      o.saved = 2 * (i % 2);
      compare(GetParam(), c, o);
      ++i;
    }
  }
}

TEST_P(BwdVsRef, OwnBranchKvAndSavedLse) {
  int i = 0;
  for (auto [own_slc, own_win] :
       {std::pair{true, false}, std::pair{false, true}, std::pair{true, true}}) {
    const Case64 c = make_case64(shape(2, 150, 3, 1, 24, 16), configs()[2], kSeed + 200 + i);
    Options o;
    o.own_slc = own_slc, o.own_win = own_win, o.padded = true;
    compare(GetParam(), c, o);
    for (int saved : {1, 2}) {
      o.saved = saved;
      compare(GetParam(), c, o);
    }
    ++i;
  }
}

TEST_P(BwdVsRef, Varlen) {
  // Lengths 1, 0 (empty), 32, 64, 63, 90: positions restart in every sequence.
  const std::vector<int32_t> cu = {0, 1, 1, 33, 97, 160, 250};
  int i = 0;
  for (const nsa_config& cfg : {configs()[2], configs()[3]}) {
    for (int64_t G : {1, 3}) {
      const Case64 c = make_case64(shape(1, 250, 2 * G, 2, 24, 16), cfg, kSeed + 300 + i, cu);
      Options o;
      o.padded = true;
      o.in_dt = i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
      o.saved = i % 3;
      compare(GetParam(), c, o);
      ++i;
    }
  }
}

// Every query selects the same few blocks, each listed several times (a set: once each), so
// block 0's inverse list holds every query; a few rows select nothing (all -1: an empty branch).
TEST_P(BwdVsRef, HeavyDuplicates) {
  const nsa_config cfg = configs()[2];  // l' = 32, n = 6
  Case64 c = make_case64(shape(1, 300, 16, 1, 24, 16), cfg, kSeed + 400);
  const int64_t n = cfg.slc_count;
  for (int64_t t = 0; t < c.shape.T; ++t) {
    const int32_t J = static_cast<int32_t>(t / cfg.slc_block);
    const int32_t row[6] = {0, 0, J, J, -1, 0};
    const bool empty = t % 97 == 5;
    for (int64_t k = 0; k < n; ++k) c.args.slc_indices[t * n + k] = empty ? -1 : row[k];
  }
  compare(GetParam(), c, Options{});
  Options saved;
  saved.saved = 2;
  compare(GetParam(), c, saved);
}

// With both branches on their own K/V nothing reads k/v: dk and dv are each optional, and the
// one given is zero-filled (nsa.h), the other never touched (a null write would crash).
TEST_P(BwdVsRef, BothOwnKvWithOnlyOneOfDkDv) {
  const Case64 c = make_case64(shape(1, 100, 3, 1, 8, 8), configs()[2], kSeed + 420);
  Options o;
  o.own_slc = o.own_win = true;
  BwdCase bc(c, o);
  for (int given : {0, 1}) {  // 0: dk only, 1: dv only
    BwdCase::Outs r;
    nsa_bwd_params p = bc.params(r);
    Tensor& out = given == 0 ? r.dk : r.dv;
    out.for_each([&](int64_t a, int64_t b, int64_t cc, int64_t d) {
      out.set_raw(out.logical_offset(a, b, cc, d), 7.0);
    });
    (given == 0 ? p.dv : p.dk) = nsa_tensor{};
    std::string msg;
    ASSERT_EQ(run_on(GetParam(), p, 0, &msg), NSA_OK) << msg;
    out.for_each([&](int64_t a, int64_t b, int64_t cc, int64_t d) {
      EXPECT_EQ(out.get_raw(out.logical_offset(a, b, cc, d)), 0.0) << given;
    });
  }
}

// A selection block far longer than the sequence (l' = 2^30) costs what its keys cost, not what
// its length would.
TEST_P(BwdVsRef, SelectionBlockLongerThanSequence) {
  const Case64 c =
      make_case64(shape(1, 90, 3, 1, 8, 8), config(16, 8, 1 << 30, 2, 1, 0, 20), kSeed + 430);
  compare(GetParam(), c, Options{});
}

// n far above the number of blocks (20000 entries per row for 3 blocks, most -1, the rest
// repeating): the CPU's per-row scratch is sized by the blocks, not by n, and the set is the same.
TEST_P(BwdVsRef, HugeSlcCount) {
  const nsa_config cfg = config(16, 8, 32, 20000, 1, 2, 48);
  Case64 c = make_case64(shape(1, 70, 3, 1, 8, 8), cfg, kSeed + 450);
  const int64_t n = cfg.slc_count;
  for (int64_t t = 0; t < c.shape.T; ++t) {
    for (int64_t k = 0; k < n; ++k) {
      c.args.slc_indices[t * n + k] =
          k % 7 == 3 ? static_cast<int32_t>((k / 7) % (t / 32 + 1)) : -1;
    }
  }
  compare(GetParam(), c, Options{});
}

// T < l - 1: no compressed token at all (Tc = 0); and with l = 16 the rows t < 15 of a longer
// sequence: their cmp branch is empty, their gradient 0, never NaN.
TEST_P(BwdVsRef, EmptyCompressedRows) {
  const nsa_config cfg = configs()[2];
  for (int64_t T : {10, 40}) {
    const Case64 c = make_case64(shape(1, T, 3, 1, 8, 8), cfg, kSeed + 500 + T);
    compare(GetParam(), c, Options{});
    BwdCase bc(c, Options{});
    BwdCase::Outs cpu;
    std::string msg;
    ASSERT_EQ(bc.run(GetParam(), 0, &cpu, &msg), NSA_OK) << msg;
    for (int64_t t = 0; t < std::min<int64_t>(T, cfg.cmp_block - 1); ++t) {
      for (int64_t h = 0; h < 3; ++h) EXPECT_EQ(cpu.dg_cmp.at({0, t, h}), 0.0) << t;
    }
    cpu.dq.for_each([&](int64_t a, int64_t b, int64_t cc, int64_t d) {
      EXPECT_FALSE(std::isnan(cpu.dq.at({a, b, cc, d})));
    });
  }
}

// Every output element is summed in an order fixed by the problem (dk/dv per chunk, then the
// chunks in order): 1, 2 and 3 threads give the same bytes, with and without the saved state.
// CPU only: the thread count and its bitwise promise are the CPU backend's (nsa.h).
TEST(CpuBwd, ThreadCountsBitwiseIdentical) {
  const Case64 c = make_case64(shape(1, 333, 12, 2, 24, 16), configs()[2], kSeed + 600);
  for (int saved : {0, 2}) {
    Options o;
    o.own_win = true;
    o.saved = saved;
    BwdCase bc(c, o);
    BwdCase::Outs r[3];
    std::string msg;
    for (int i = 0; i < 3; ++i) {
      ASSERT_EQ(bc.run(backend(NSA_BACKEND_CPU), i + 1, &r[i], &msg), NSA_OK) << msg;
    }
    for (int i = 1; i < 3; ++i) {
      for (auto m :
           {&BwdCase::Outs::dq, &BwdCase::Outs::dk, &BwdCase::Outs::dv, &BwdCase::Outs::dk_win,
            &BwdCase::Outs::dv_win, &BwdCase::Outs::dk_cmp, &BwdCase::Outs::dv_cmp,
            &BwdCase::Outs::dg_cmp, &BwdCase::Outs::dg_slc, &BwdCase::Outs::dg_win}) {
        EXPECT_EQ((r[i].*m).storage(), (r[0].*m).storage())
            << (i + 1) << " threads, saved " << saved;
      }
    }
  }
}

// Seeded random configurations beyond the fixed matrix: any l >= d, l' unrelated to both, n from
// init + local up, w = 1 and small, odd G and head dims, batches, dtypes, views, branch-own K/V,
// saved state and thread counts.
TEST_P(BwdVsRef, RandomConfigs) {
  std::mt19937_64 rng(kSeed + 900);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int i = 0; i < 20; ++i) {
    const int32_t l = int32_t(pick(1, 40)), d = int32_t(pick(1, l)), lp = int32_t(pick(1, 80));
    const int32_t init = int32_t(pick(0, 1)), local = int32_t(pick(0, 2));
    const int32_t n = std::max<int32_t>(1, init + local + int32_t(pick(0, 5)));
    const nsa_config cfg = config(l, d, lp, n, init, local, int32_t(pick(1, 100)));
    const int64_t G = std::vector<int64_t>{1, 2, 3, 5, 16}[pick(0, 4)], Hkv = pick(1, 2);
    const Case64 c =
        make_case64(shape(pick(1, 2), pick(1, 200), G * Hkv, Hkv, pick(1, 40), pick(1, 40)), cfg,
                    kSeed + 1000 + i);
    Options o;
    o.in_dt = pick(0, 1) ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
    o.out_dt = pick(0, 1) ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
    o.padded = pick(0, 1) == 1;
    o.own_slc = pick(0, 3) == 0, o.own_win = pick(0, 3) == 0;
    o.saved = int(pick(0, 2));
    SCOPED_TRACE(i);
    compare(GetParam(), c, o, int(pick(1, 3)));
  }
}

// Profiling (off by default) splits a CPU backward's time into its stages; the forward rerun is
// timed only when saved state is missing. CPU only: the stages are the CPU kernels'.
TEST(CpuBwd, Profile) {
  const Case64 c =
      make_case64(shape(1, 300, 16, 1, 16, 8), config(32, 16, 64, 4, 1, 2, 64), kSeed + 800);
  for (int saved : {0, 2}) {
    Options o;
    o.saved = saved;
    BwdCase bc(c, o);
    BwdCase::Outs r;
    nsa_bwd_params p = bc.params(r);
    Ctx ctx(NSA_BACKEND_CPU);
    nsa_bwd_profile prof{};
    ASSERT_EQ(nsa_bwd(ctx.get(), &p), NSA_OK);
    ASSERT_EQ(nsa_context_bwd_profile(ctx.get(), &prof), NSA_OK);
    EXPECT_EQ(prof.wall_s, 0.0);  // off: nothing recorded
    ASSERT_EQ(nsa_context_set_profiling(ctx.get(), 1), NSA_OK);
    ASSERT_EQ(nsa_bwd(ctx.get(), &p), NSA_OK) << ctx.error();
    ASSERT_EQ(nsa_context_bwd_profile(ctx.get(), &prof), NSA_OK);
    EXPECT_GT(prof.wall_s, 0.0);
    // Every branch does work here (T = 300: 15 of 18 cmp tokens visible at the end, n = 4 of 5
    // blocks, w = 64).
    for (double stage :
         {prof.pack_s, prof.rows_s, prof.cmp_s, prof.slc_s, prof.win_s, prof.reduce_s}) {
      EXPECT_GT(stage, 0.0);
    }
    EXPECT_EQ(prof.forward_s > 0.0, saved == 0);
    const double parts = prof.forward_s + prof.pack_s + prof.rows_s + prof.cmp_s + prof.slc_s +
                         prof.win_s + prof.reduce_s;
    EXPECT_LE(parts, prof.wall_s);  // each part is a wall-clock share of the call
  }
  EXPECT_EQ(nsa_context_bwd_profile(nullptr, nullptr), NSA_ERR_NULL_POINTER);
}

// The kernels are generic in the vector length (register blocks over up to four 16-key tiles
// with AVX-512, one tile elsewhere) and in the head rows (GP = 1, 2, 4, 8, then multiples of
// 16): every target this machine runs matches the reference, for groups that fill their rows
// (1, 8, 16), pad them (3 -> 4, 24 -> 32), and key ranges of 1 to 4 tiles. CPU only: targets
// are a CPU notion.
TEST(CpuBwd, EveryTargetMatchesReference) {
  nsa_config def;
  nsa_config_default(&def);
  const Case64 cases[] = {make_case64(shape(1, 150, 6, 2, 20, 12), configs()[2], kSeed + 700),
                          make_case64(shape(1, 300, 16, 1, 24, 16), def, kSeed + 701),
                          make_case64(shape(1, 130, 2, 2, 20, 12), configs()[2], kSeed + 702),
                          make_case64(shape(1, 140, 16, 2, 12, 20), configs()[2], kSeed + 703),
                          make_case64(shape(1, 90, 24, 1, 8, 8), configs()[2], kSeed + 704)};
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  for_each_hwy_target([&] {
    for (const Case64& c : cases) {
      Options o;
      o.saved = 2;
      compare(cpu, c, o);
    }
  });
}

}  // namespace
}  // namespace nsa_test
