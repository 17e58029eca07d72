// Out of memory, one allocation at a time (test_alloc_failure.cc says how): the calls of the
// compression and its backward, the forward, the backward, dense attention and
// nsa_cmp_seqlens, as test_alloc_failure.cc's driver runs them.
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "alloc_failure_util.h"

namespace alloc_failure {
namespace {

// Packed sequences of lengths 50, 1 and 77 (T = 128).
const std::vector<int32_t> kSeqlens = {0, 50, 51, 128};

// Packs the call's sequences as kSeqlens says.
template <typename Params>
void pack(Params& p) {
  p.cu_seqlens = kSeqlens.data();
  p.num_seqs = static_cast<int64_t>(kSeqlens.size()) - 1;
}

// reset and snapshot for a call that writes the tensors outs(*d) names.
template <typename D, typename Outs>
void writes(Call& c, const std::shared_ptr<D>& d, Outs outs) {
  c.reset = [d, outs] {
    for (const auto& o : outs(*d)) poison(*o.second);
  };
  c.snapshot = [d, outs] {
    Snapshot s;
    for (const auto& [name, t] : outs(*d)) s.emplace_back(name, t->storage());
    return s;
  };
}

Tensor shaped_as(const Tensor& t) {
  const nsa_tensor& d = t.desc();
  return Tensor(d.dtype, std::vector<int64_t>(d.shape, d.shape + d.ndim));
}

}  // namespace

// ---- Compression and its backward (packed sequences). ----

namespace {

struct CompressData {
  Tensor x, dout, out, dx, dparam[5];
  std::unique_ptr<Mlp> mlp;
};

}  // namespace

Call compress_call(nsa_cmp_kind kind, bool backward) {
  const Shape s = small_shape();
  const nsa_config cfg = small_cfg();
  const int64_t Tc = nsa_test::cmp_rows(cfg, s.T, kSeqlens);
  std::mt19937_64 rng(11);
  auto d = std::make_shared<CompressData>();
  d->x = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hkv, s.Dk}, rng);
  d->dout = random_tensor(NSA_DTYPE_F32, {1, Tc, s.Hkv, s.Dk}, rng);
  d->out = Tensor(NSA_DTYPE_F32, {1, Tc, s.Hkv, s.Dk});
  d->dx = shaped_as(d->x);
  const bool mlp = kind == NSA_CMP_MLP;
  if (mlp) {
    d->mlp = std::make_unique<Mlp>(s.Hkv, cfg.cmp_block, s.Dk, NSA_DTYPE_F32, rng);
    for (int i = 0; i < 5; ++i) d->dparam[i] = shaped_as(d->mlp->t[i]);
  }
  // The inputs, named alike in both calls' params.
  auto inputs = [d, kind, cfg](auto& p) {
    p.cfg = cfg, p.kind = kind, p.x = d->x.desc();
    pack(p);
    if (d->mlp) d->mlp->set({&p.pos, &p.w1, &p.b1, &p.w2, &p.b2});
  };
  Call c;
  if (!backward) {
    writes(c, d, [](CompressData& d) { return Named{{"out", &d.out}}; });
    c.run = [d, inputs](nsa_context* ctx) {
      nsa_compress_params p;
      nsa_compress_params_init(&p);
      inputs(p);
      p.out = d->out.desc();
      return nsa_compress(ctx, &p);
    };
    return c;
  }
  writes(c, d, [mlp](CompressData& d) {
    Named n = {{"dx", &d.dx}};
    if (mlp) {
      for (int i = 0; i < 5; ++i) n.emplace_back("dparam" + std::to_string(i), &d.dparam[i]);
    }
    return n;
  });
  c.run = [d, inputs](nsa_context* ctx) {
    nsa_compress_bwd_params p;
    nsa_compress_bwd_params_init(&p);
    inputs(p);
    if (d->mlp) {
      p.dpos = d->dparam[0].desc(), p.dw1 = d->dparam[1].desc(), p.db1 = d->dparam[2].desc();
      p.dw2 = d->dparam[3].desc(), p.db2 = d->dparam[4].desc();
    }
    p.dout = d->dout.desc();
    p.dx = d->dx.desc();
    return nsa_compress_bwd(ctx, &p);
  };
  return c;
}

// ---- The forward and the backward. ----

namespace {

struct FwdData {
  FwdCase c;
  Tensor k_win, v_win, idx_in;  // the win branch's own K/V (kFull); a selection (kGivenSelection)
  Tensor d_o, dq, dk, dv, dk_win, dv_win, dk_cmp, dv_cmp, dg[3];  // the backward's
};

bool has(const Tensor& t) { return t.desc().data != nullptr; }

Named fwd_outputs(FwdData& d) {
  FwdCase& c = d.c;
  return {{"o", &c.o},
          {"o_cmp", &c.o_cmp},
          {"o_slc", &c.o_slc},
          {"o_win", &c.o_win},
          {"lse_cmp", &c.lse_cmp},
          {"lse_slc", &c.lse_slc},
          {"lse_win", &c.lse_win},
          {"slc_indices_out", &c.idx_out}};
}

std::shared_ptr<FwdData> fwd_data(Fwd kind) {
  const Shape s = small_shape();
  const nsa_config cfg = small_cfg();
  const bool varlen = kind == Fwd::kVarlenBf16;
  auto d = std::make_shared<FwdData>();
  d->c = nsa_test::make_case(s, cfg, varlen ? NSA_DTYPE_BF16 : NSA_DTYPE_F32, 5, false,
                             varlen ? kSeqlens : std::vector<int32_t>{});
  std::mt19937_64 rng(17);
  if (kind == Fwd::kFull) {
    d->k_win = random_tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dk}, rng);
    d->v_win = random_tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dv}, rng);
  }
  if (kind == Fwd::kGivenSelection) {
    // Blocks in [0, t / l'] with repeats and -1 entries, as a caller may give them.
    d->idx_in = Tensor(NSA_DTYPE_I32, {s.B, s.T, s.Hkv, cfg.slc_count});
    d->idx_in.for_each([&](int64_t b, int64_t t, int64_t h, int64_t k) {
      const int64_t j = k == 3 ? -1 : (3 * t + h + 5 * k) % (t / cfg.slc_block + 1);
      d->idx_in.set_raw(d->idx_in.logical_offset(b, t, h, k), static_cast<double>(j));
    });
  }
  return d;
}

nsa_fwd_params fwd_params(FwdData& d) {
  nsa_fwd_params p = d.c.params();
  if (has(d.k_win)) p.in.k_win = d.k_win.desc(), p.in.v_win = d.v_win.desc();
  if (has(d.idx_in)) p.slc_indices_in = d.idx_in.desc();
  return p;
}

}  // namespace

Call fwd_call(Fwd kind) {
  auto d = fwd_data(kind);
  Call c;
  writes(c, d, fwd_outputs);
  c.run = [d](nsa_context* ctx) {
    const nsa_fwd_params p = fwd_params(*d);
    return nsa_fwd(ctx, &p);
  };
  c.must_fail = {alloc_hook::kHwy, alloc_hook::kNew};
  return c;
}

Call bwd_call(Fwd kind, bool saved) {
  auto d = fwd_data(kind);
  {  // The forward's selection and saved state, once, with no allocation failing.
    auto ctx = context(NSA_BACKEND_CPU, 0);
    const nsa_fwd_params p = fwd_params(*d);
    EXPECT_EQ(nsa_fwd(ctx.get(), &p), NSA_OK) << nsa_last_error(ctx.get());
  }
  const Shape s = small_shape();
  const int64_t Tc = d->c.k_cmp.desc().shape[1];
  std::mt19937_64 rng(23);
  d->d_o = random_tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dv}, rng);
  d->dq = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dk});
  d->dk = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dk});
  d->dv = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dv});
  if (has(d->k_win)) d->dk_win = shaped_as(d->dk), d->dv_win = shaped_as(d->dv);
  d->dk_cmp = Tensor(NSA_DTYPE_F32, {s.B, Tc, s.Hkv, s.Dk});
  d->dv_cmp = Tensor(NSA_DTYPE_F32, {s.B, Tc, s.Hkv, s.Dv});
  for (Tensor& g : d->dg) g = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq});
  Call c;
  writes(c, d, [](FwdData& d) {
    Named n = {{"dq", &d.dq},         {"dk", &d.dk},         {"dv", &d.dv},
               {"dk_cmp", &d.dk_cmp}, {"dv_cmp", &d.dv_cmp}, {"dg_cmp", &d.dg[0]},
               {"dg_slc", &d.dg[1]},  {"dg_win", &d.dg[2]}};
    if (has(d.dk_win)) n.insert(n.end(), {{"dk_win", &d.dk_win}, {"dv_win", &d.dv_win}});
    return n;
  });
  c.run = [d, saved](nsa_context* ctx) {
    const FwdCase& f = d->c;
    const nsa_fwd_params fp = fwd_params(*d);
    nsa_bwd_params p;
    nsa_bwd_params_init(&p);
    p.in.cfg = fp.in.cfg;
    p.in.q = fp.in.q, p.in.k = fp.in.k, p.in.v = fp.in.v, p.in.k_win = fp.in.k_win,
    p.in.v_win = fp.in.v_win;
    p.in.k_cmp = fp.in.k_cmp, p.in.v_cmp = fp.in.v_cmp;
    p.in.g_cmp = fp.in.g_cmp, p.in.g_slc = fp.in.g_slc, p.in.g_win = fp.in.g_win;
    p.in.cu_seqlens = fp.in.cu_seqlens, p.in.num_seqs = fp.in.num_seqs;
    p.slc_indices = f.idx_out.desc();
    if (saved) {
      p.lse_cmp = fp.lse_cmp, p.lse_slc = fp.lse_slc, p.lse_win = fp.lse_win;
      p.o_cmp = fp.o_cmp, p.o_slc = fp.o_slc, p.o_win = fp.o_win;
    }
    p.d_o = d->d_o.desc();
    p.dq = d->dq.desc(), p.dk = d->dk.desc(), p.dv = d->dv.desc();
    if (has(d->dk_win)) p.dk_win = d->dk_win.desc(), p.dv_win = d->dv_win.desc();
    p.dk_cmp = d->dk_cmp.desc(), p.dv_cmp = d->dv_cmp.desc();
    p.dg_cmp = d->dg[0].desc(), p.dg_slc = d->dg[1].desc(), p.dg_win = d->dg[2].desc();
    return nsa_bwd(ctx, &p);
  };
  c.must_fail = {alloc_hook::kHwy, alloc_hook::kNew};
  return c;
}

// ---- Dense attention, forward and backward (packed sequences). ----

namespace {

struct DenseData {
  Tensor q, k, v, o, lse, d_o, dq, dk, dv;
};

nsa_dense_fwd_params dense_params(DenseData& d, int32_t window) {
  nsa_dense_fwd_params p;
  nsa_dense_fwd_params_init(&p);
  p.q = d.q.desc(), p.k = d.k.desc(), p.v = d.v.desc();
  pack(p);
  p.window = window;
  p.o = d.o.desc(), p.lse = d.lse.desc();
  return p;
}

}  // namespace

Call dense_call(bool backward) {
  const Shape s = small_shape();
  std::mt19937_64 rng(29);
  auto d = std::make_shared<DenseData>();
  d->q = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dk}, rng);
  d->k = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hkv, s.Dk}, rng);
  d->v = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hkv, s.Dv}, rng);
  d->o = Tensor(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv});
  d->lse = Tensor(NSA_DTYPE_F32, {1, s.T, s.Hq});
  const int32_t window = backward ? 40 : 0;
  Call c;
  if (!backward) {
    writes(c, d, [](DenseData& d) { return Named{{"o", &d.o}, {"lse", &d.lse}}; });
    c.run = [d, window](nsa_context* ctx) {
      const nsa_dense_fwd_params p = dense_params(*d, window);
      return nsa_dense_fwd(ctx, &p);
    };
    c.must_fail = {alloc_hook::kHwy, alloc_hook::kNew};
    return c;
  }
  {  // The forward's o and lse, once, with no allocation failing.
    auto ctx = context(NSA_BACKEND_CPU, 0);
    const nsa_dense_fwd_params p = dense_params(*d, window);
    EXPECT_EQ(nsa_dense_fwd(ctx.get(), &p), NSA_OK) << nsa_last_error(ctx.get());
  }
  d->d_o = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv}, rng);
  d->dq = shaped_as(d->q), d->dk = shaped_as(d->k), d->dv = shaped_as(d->v);
  writes(c, d, [](DenseData& d) { return Named{{"dq", &d.dq}, {"dk", &d.dk}, {"dv", &d.dv}}; });
  c.run = [d, window](nsa_context* ctx) {
    nsa_dense_bwd_params p;
    nsa_dense_bwd_params_init(&p);
    p.q = d->q.desc(), p.k = d->k.desc(), p.v = d->v.desc();
    p.o = d->o.desc(), p.lse = d->lse.desc(), p.d_o = d->d_o.desc();
    pack(p);
    p.window = window;
    p.dq = d->dq.desc(), p.dk = d->dk.desc(), p.dv = d->dv.desc();
    return nsa_dense_bwd(ctx, &p);
  };
  c.must_fail = {alloc_hook::kHwy};
  return c;
}

Call cmp_seqlens_call() {
  auto d = std::make_shared<Tensor>(NSA_DTYPE_I32, std::vector<int64_t>{4});
  Call c;
  writes(c, d, [](Tensor& t) { return Named{{"cu_cmp", &t}}; });
  c.run = [d](nsa_context* ctx) {
    const nsa_config cfg = small_cfg();
    int32_t* out = static_cast<int32_t*>(d->desc().data);
    return nsa_cmp_seqlens(ctx, &cfg, kSeqlens.data(), 3, out);
  };
  return c;
}

}  // namespace alloc_failure
