// Out of memory, one allocation at a time (test_alloc_failure.cc says how): the KV cache's calls,
// create, append, prefill, decode and dense decode, as test_alloc_failure.cc's driver runs them.
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "alloc_failure_util.h"

namespace alloc_failure {

// ---- The KV cache: create, append, prefill, decode. ----

namespace {

// nsa_kv_cache_create's output before a call: a failed call must leave it as it was.
nsa_kv_cache* unset() { return reinterpret_cast<nsa_kv_cache*>(uintptr_t{0x5a5a5a5a}); }

struct CacheData {
  nsa_cmp_kind kind = NSA_CMP_MEAN;
  FwdCase src, out;  // the tokens (q, k, v, gates); the outputs, written row by row
  std::unique_ptr<Mlp> mk, mv;
  nsa_kv_cache* cache = nullptr;
  nsa_kv_cache* created = unset();

  ~CacheData() {
    nsa_kv_cache_destroy(cache);
    if (created != unset()) nsa_kv_cache_destroy(created);
  }
  nsa_kv_cache_params params() const {
    nsa_kv_cache_params p;
    nsa_kv_cache_params_init(&p);
    const Shape s = small_shape();
    p.cfg = small_cfg();
    p.num_seqs = 2;
    p.capacity = 256;
    p.num_kv_heads = s.Hkv, p.head_dim_k = s.Dk, p.head_dim_v = s.Dv;
    p.dtype = src.dtype;
    p.cmp_kind = kind;
    if (mk) mk->set({&p.k_pos, &p.k_w1, &p.k_b1, &p.k_w2, &p.k_b2});
    if (mv) mv->set({&p.v_pos, &p.v_w1, &p.v_b1, &p.v_w2, &p.v_b2});
    return p;
  }
  // A fresh cache whose sequence s holds the first lens[s] tokens of src (no failing hook).
  void rebuild(const std::vector<int64_t>& lens) {
    auto ctx = context(NSA_BACKEND_CPU, 0);
    nsa_kv_cache_destroy(cache);
    cache = nullptr;
    const nsa_kv_cache_params p = params();
    ASSERT_EQ(nsa_kv_cache_create(ctx.get(), &p, &cache), NSA_OK) << nsa_last_error(ctx.get());
    for (size_t s = 0; s < lens.size(); ++s) {
      const nsa_tensor k = nsa_test::rows(src.k, 0, lens[s]), v = nsa_test::rows(src.v, 0, lens[s]);
      ASSERT_EQ(nsa_kv_cache_append(ctx.get(), cache, int64_t(s), &k, &v), NSA_OK)
          << nsa_last_error(ctx.get());
    }
  }
  Named outputs() const {
    return {{"o", &out.o},
            {"lse_cmp", &out.lse_cmp},
            {"lse_slc", &out.lse_slc},
            {"lse_win", &out.lse_win},
            {"slc_indices_out", &out.idx_out}};
  }
  Snapshot snapshot() const {
    Snapshot s;
    for (const auto& [name, t] : outputs()) s.emplace_back(name, t->storage());
    auto bytes = [](const void* p, size_t n) {
      const auto* b = static_cast<const unsigned char*>(p);
      return std::vector<unsigned char>(b, b + n);
    };
    for (int64_t q = 0; q < 2 && cache; ++q) {
      const int64_t len = nsa_kv_cache_len(cache, q);
      s.emplace_back("nsa_kv_cache_len(" + std::to_string(q) + ")", bytes(&len, sizeof len));
    }
    // Whether nsa_kv_cache_create wrote its output (each cache is at a new address).
    const bool wrote = created != unset();
    s.emplace_back("nsa_kv_cache_create's out", bytes(&wrote, sizeof wrote));
    return s;
  }
};

nsa_status run_cache_op(CacheOp op, CacheData& d, nsa_context* ctx) {
  const FwdCase& x = d.src;
  auto rows = [](const Tensor& t, int64_t t0, int64_t n) { return nsa_test::rows(t, t0, n); };
  // Queries and gates of src rows [t0, t0 + n); every output into rows [0, n) of out.
  auto set_rows = [&](auto& p, int64_t t0, int64_t n) {
    p.q = rows(x.q, t0, n);
    p.g_cmp = rows(x.g_cmp, t0, n), p.g_slc = rows(x.g_slc, t0, n), p.g_win = rows(x.g_win, t0, n);
    p.o = rows(d.out.o, 0, n);
    p.lse_cmp = rows(d.out.lse_cmp, 0, n), p.lse_slc = rows(d.out.lse_slc, 0, n);
    p.lse_win = rows(d.out.lse_win, 0, n);
    p.slc_indices_out = rows(d.out.idx_out, 0, n);
  };
  switch (op) {
    case CacheOp::kCreate: {
      const nsa_kv_cache_params p = d.params();
      return nsa_kv_cache_create(ctx, &p, &d.created);
    }
    case CacheOp::kAppend: {  // 30 tokens to a sequence of 40: two compressed tokens complete
      const nsa_tensor k = rows(x.k, 40, 30), v = rows(x.v, 40, 30);
      return nsa_kv_cache_append(ctx, d.cache, 0, &k, &v);
    }
    case CacheOp::kPrefill: {
      nsa_prefill_params p;
      nsa_prefill_params_init(&p);
      p.seq = 0;
      set_rows(p, 0, 100);
      p.k = rows(x.k, 0, 100), p.v = rows(x.v, 0, 100);
      return nsa_prefill(ctx, d.cache, &p);
    }
    case CacheOp::kDecode:
    case CacheOp::kDecodeNoAppend: {  // both sequences, each at its own length
      nsa_decode_params p;
      nsa_decode_params_init(&p);
      set_rows(p, 60, 2);
      if (op == CacheOp::kDecode) p.k = rows(x.k, 60, 2), p.v = rows(x.v, 60, 2);
      return nsa_decode(ctx, d.cache, &p);
    }
    case CacheOp::kDenseDecode: {
      nsa_dense_decode_params p;
      nsa_dense_decode_params_init(&p);
      p.q = rows(x.q, 60, 2), p.k = rows(x.k, 60, 2), p.v = rows(x.v, 60, 2);
      p.o = rows(d.out.o, 0, 2);
      p.lse = rows(d.out.lse_cmp, 0, 2);
      return nsa_dense_decode(ctx, d.cache, &p);
    }
  }
  return NSA_ERR_INTERNAL;
}

}  // namespace

Call cache_call(CacheOp op, nsa_cmp_kind kind, nsa_dtype dt) {
  const Shape s = small_shape();
  const nsa_config cfg = small_cfg();
  auto d = std::make_shared<CacheData>();
  d->kind = kind;
  d->src = nsa_test::make_case(s, cfg, dt, 31);
  d->out = nsa_test::make_case(s, cfg, NSA_DTYPE_F32, 37);
  if (kind == NSA_CMP_MLP) {
    std::mt19937_64 rng(41);
    d->mk = std::make_unique<Mlp>(s.Hkv, cfg.cmp_block, s.Dk, dt, rng);
    d->mv = std::make_unique<Mlp>(s.Hkv, cfg.cmp_block, s.Dv, dt, rng);
  }
  const std::vector<int64_t> lens = op == CacheOp::kAppend    ? std::vector<int64_t>{40, 7}
                                    : op == CacheOp::kPrefill ? std::vector<int64_t>{0, 7}
                                                              : std::vector<int64_t>{60, 97};
  Call c;
  // Appending is the cache's own work, on any backend; the rest runs the CPU kernels.
  c.ref_unsupported = op != CacheOp::kAppend;
  c.keeps_scratch =
      op == CacheOp::kDecode || op == CacheOp::kDecodeNoAppend || op == CacheOp::kDenseDecode;
  c.reset = [d, op, lens] {
    if (d->created != unset()) nsa_kv_cache_destroy(d->created);
    d->created = unset();
    if (op != CacheOp::kCreate) d->rebuild(lens);
    for (const auto& o : d->outputs()) poison(*o.second);
  };
  c.run = [d, op](nsa_context* ctx) { return run_cache_op(op, *d, ctx); };
  c.snapshot = [d] { return d->snapshot(); };
  c.must_fail = {alloc_hook::kNew};
  if (op == CacheOp::kCreate) c.must_fail.insert(alloc_hook::kCalloc);
  return c;
}

}  // namespace alloc_failure
