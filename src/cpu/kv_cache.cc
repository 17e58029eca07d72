// The KV cache's storage and its incremental compression (SPEC.md section 7).
#include "cpu/kv_cache.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <new>

#include "cpu/kernels.h"
#include "cpu/ops.h"

namespace nsa::cpu {
namespace {

// The n elements of a parameter tensor [H, ...] row `r` of head h, appended to dst as f32.
void append_param(const nsa_tensor& t, int64_t h, int64_t r, int64_t n, std::vector<float>& dst) {
  const size_t at = dst.size();
  dst.resize(at + static_cast<size_t>(n));
  load_row(t, t.ndim == 2 ? offset_of(t, h) : offset_of(t, h, r), n, dst.data() + at);
}

void copy_mlp(const nsa_tensor& pos, const nsa_tensor& w1, const nsa_tensor& b1,
              const nsa_tensor& w2, const nsa_tensor& b2, int64_t H, int64_t l, int64_t D,
              MlpParams& m) {
  m.Dh = w1.shape[1];
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t r = 0; r < l; ++r) append_param(pos, h, r, D, m.pos);
    for (int64_t u = 0; u < m.Dh; ++u) append_param(w1, h, u, l * D, m.w1);
    append_param(b1, h, 0, m.Dh, m.b1);
    for (int64_t i = 0; i < D; ++i) append_param(w2, h, i, m.Dh, m.w2);
    append_param(b2, h, 0, D, m.b2);
  }
}

// phi = mlp of one flattened block x [l*D] of head h (SPEC 5): W2 relu(W1 (x + P) + b1) + b2.
void mlp_token(const MlpParams& m, int64_t h, int64_t L, int64_t D, float* x, float* hidden,
               float* out) {
  const float* pos = m.pos.data() + h * L;
  for (int64_t e = 0; e < L; ++e) x[e] += pos[e];
  for (int64_t u = 0; u < m.Dh; ++u) {
    const float* w = m.w1.data() + (h * m.Dh + u) * L;
    float acc = 0.0f;
    for (int64_t e = 0; e < L; ++e) acc += w[e] * x[e];
    hidden[u] = std::max(0.0f, acc + m.b1[h * m.Dh + u]);
  }
  for (int64_t i = 0; i < D; ++i) {
    const float* w = m.w2.data() + (h * D + i) * m.Dh;
    float acc = 0.0f;
    for (int64_t u = 0; u < m.Dh; ++u) acc += w[u] * hidden[u];
    out[i] = acc + m.b2[h * D + i];
  }
}

// Compressed token i of (seq, h), for keys and values: phi over raw positions i*d .. i*d + l - 1
// as the cache stores them (so it sees exactly what a forward over the cached K/V sees).
void compress_token(nsa_kv_cache& c, int64_t seq, int64_t h, int64_t i, float* buf) {
  const int64_t l = c.cfg.cmp_block, d = c.cfg.cmp_stride;
  CpuCache& st = storage(c);
  for (int kv = 0; kv < 2; ++kv) {
    const int64_t D = kv == 0 ? c.Dk : c.Dv;
    float* block = buf;                          // [l][D]
    float* out = block + l * D;                  // [D]
    float* hidden = out + std::max(c.Dk, c.Dv);  // [Dh]
    for (int64_t r = 0; r < l; ++r) {
      if (kv == 0) st.raw.read_k(seq, h, i * d + r, block + r * D);
      else st.raw.read_v(seq, h, i * d + r, block + r * D);
    }
    if (c.cmp_kind == NSA_CMP_MEAN) {
      // The order of compress.cc's mean (sum the rows, then scale), so both give the same bits.
      fill(0.0f, out, D);
      for (int64_t r = 0; r < l; ++r) axpy(1.0f, block + r * D, out, D);
      scale_by(1.0f / static_cast<float>(l), out, D);
    } else {
      mlp_token(kv == 0 ? st.k_mlp : st.v_mlp, h, l * D, D, block, hidden, out);
    }
    if (kv == 0) st.cmp.write_k(seq, h, i, out);
    else st.cmp.write_v(seq, h, i, out);
  }
}

}  // namespace

TokenStore::~TokenStore() {
  std::free(k_alloc_);
  std::free(v_alloc_);
}

namespace {

// A large calloc is fresh zero pages (committed when first written) but starts 16 bytes into a
// page; the kernels' vector loads want whole cache lines, so the base is rounded up to 64 bytes.
void* zeroed_aligned(size_t bytes, void** alloc) {
  *alloc = std::calloc(bytes + 64, 1);
  if (*alloc == nullptr) return nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(*alloc);
  return reinterpret_cast<void*>((p + 63) / 64 * 64);
}

}  // namespace

bool TokenStore::allocate(int64_t seqs, int64_t heads, int64_t rows_, int64_t Dk_, int64_t Dv_,
                          bool bf16_) {
  rows = round_up(std::max<int64_t>(rows_, 1), kTileKeys);
  Dk = Dk_;
  Dv = Dv_;
  Dv_pad = round_up(Dv_, kTileKeys);
  bf16 = bf16_;
  Dk_rows = bf16 ? round_up(Dk_, 2) : Dk_;
  heads_ = heads;
  const size_t elem = bf16 ? 2 : 4;
  const size_t blocks = static_cast<size_t>(seqs * heads * rows);
  k_ = zeroed_aligned(blocks * static_cast<size_t>(Dk_rows) * elem, &k_alloc_);
  v_ = zeroed_aligned(blocks * static_cast<size_t>(Dv_pad) * elem, &v_alloc_);
  return k_ != nullptr && v_ != nullptr;
}

void TokenStore::write_k(int64_t seq, int64_t h, int64_t pos, const float* row) {
  void* base = const_cast<void*>(k_base(seq, h));
  for (int64_t i = 0; i < Dk; ++i) {
    const int64_t off = k_offset(pos, i);
    if (bf16) static_cast<uint16_t*>(base)[off] = f32_to_bf16(row[i]);
    else static_cast<float*>(base)[off] = row[i];
  }
}

void TokenStore::write_v(int64_t seq, int64_t h, int64_t pos, const float* row) {
  void* base = const_cast<void*>(v_base(seq, h));
  for (int64_t i = 0; i < Dv; ++i) {
    const int64_t off = v_offset(pos, i);
    if (bf16) static_cast<uint16_t*>(base)[off] = f32_to_bf16(row[i]);
    else static_cast<float*>(base)[off] = row[i];
  }
}

void TokenStore::read_k(int64_t seq, int64_t h, int64_t pos, float* row) const {
  const void* base = k_base(seq, h);
  for (int64_t i = 0; i < Dk; ++i) {
    const int64_t off = k_offset(pos, i);
    row[i] = bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[off])
                  : static_cast<const float*>(base)[off];
  }
}

void TokenStore::read_v(int64_t seq, int64_t h, int64_t pos, float* row) const {
  const void* base = v_base(seq, h);
  for (int64_t i = 0; i < Dv; ++i) {
    const int64_t off = v_offset(pos, i);
    row[i] = bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[off])
                  : static_cast<const float*>(base)[off];
  }
}

Status kv_cache_create(const nsa_kv_cache_params& p, nsa_kv_cache* c, void* /*stream*/) {
  auto st = std::make_unique<CpuCache>();
  const bool bf16 = p.dtype == NSA_DTYPE_BF16;
  const int64_t cmp_rows = nsa_cmp_len(&p.cfg, p.capacity);
  if (!st->raw.allocate(p.num_seqs, c->Hkv, p.capacity, c->Dk, c->Dv, bf16) ||
      !st->cmp.allocate(p.num_seqs, c->Hkv, cmp_rows, c->Dk, c->Dv, bf16)) {
    return error(NSA_ERR_OUT_OF_MEMORY, "kv cache: cannot allocate the K/V storage");
  }
  if (p.cmp_kind == NSA_CMP_MLP) {
    const int64_t l = p.cfg.cmp_block;
    copy_mlp(p.k_pos, p.k_w1, p.k_b1, p.k_w2, p.k_b2, c->Hkv, l, c->Dk, st->k_mlp);
    copy_mlp(p.v_pos, p.v_w1, p.v_b1, p.v_w2, p.v_b2, c->Hkv, l, c->Dv, st->v_mlp);
  }
  c->storage = std::move(st);
  return Status::ok();
}

Status kv_cache_append(nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                       int threads, void* /*stream*/) {
  const int64_t n = k.shape[0], first = c.len[static_cast<size_t>(seq)];
  const int64_t cmp_before = c.cmp_len(seq);
  const int64_t cmp_after = nsa_cmp_len(&c.cfg, first + n);
  CpuCache& st = storage(c);
  const int64_t Dh = std::max(st.k_mlp.Dh, st.v_mlp.Dh), D = std::max(c.Dk, c.Dv);
  // Scratch per thread: one row, and when a compressed token completes, its block of l rows, its
  // output and the mlp's hidden layer. A token completes only once l <= capacity positions
  // exist, so the block is bounded by the cache's own (validated) size; no scratch is sized by
  // cmp_block alone, which may be INT32_MAX. Allocated here, before the parallel region: an
  // exception cannot leave an OpenMP region (it would terminate the process), and a failure
  // must leave the cache as it was.
  const int64_t block = cmp_after > cmp_before ? (int64_t{c.cfg.cmp_block} + 1) * D + Dh : 0;
  const int64_t per_thread = D + block;
  // One thread while the cache's steps run solo (StepThreading): a decode step appends first.
  const int64_t want = st.threading.solo_steps > 0 ? 1
                       : threads > 0               ? threads
                                                   : omp_get_max_threads();
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, c.Hkv)));
  std::vector<float> scratch;
  try {
    scratch.resize(static_cast<size_t>(per_thread) * static_cast<size_t>(nt));
  } catch (const std::bad_alloc&) {
    return error(NSA_ERR_OUT_OF_MEMORY, "kv cache append: cannot allocate the compression scratch");
  }
  // Heads are independent: one thread per head writes its rows, then its compressed tokens
  // (each computed once, from rows already stored).
#pragma omp parallel num_threads(nt)
  {
    float* row = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * per_thread;
    float* buf = row + D;
#pragma omp for schedule(static)
    for (int64_t h = 0; h < c.Hkv; ++h) {
      for (int64_t r = 0; r < n; ++r) {
        load_row(k, offset_of(k, r, h), c.Dk, row);
        st.raw.write_k(seq, h, first + r, row);
        load_row(v, offset_of(v, r, h), c.Dv, row);
        st.raw.write_v(seq, h, first + r, row);
      }
      for (int64_t i = cmp_before; i < cmp_after; ++i) compress_token(c, seq, h, i, buf);
    }
  }
  return Status::ok();
}

Status kv_cache_prefill(nsa_kv_cache& c, int64_t seq, FwdProblem& fwd) {
  const nsa_fwd_inputs& in = fwd.p.in;
  const int64_t Tc = fwd.Tc;
  // The compressed tokens as the forward reads them, contiguous [1, Tc, Hkv, D] in the cache's
  // dtype; allocated before the append so that running out of memory leaves the cache as it was.
  const size_t esize = nsa_dtype_size(c.dtype);
  std::vector<char> kc(static_cast<size_t>(Tc * c.Hkv * c.Dk) * esize);
  std::vector<char> vc(static_cast<size_t>(Tc * c.Hkv * c.Dv) * esize);
  std::vector<float> row(static_cast<size_t>(std::max(c.Dk, c.Dv)));
  NSA_RETURN_IF_ERROR(
      kv_cache_append(c, seq, drop_batch(in.k), drop_batch(in.v), fwd.num_threads, nullptr));
  // The forward reads the compressed tokens exactly as the cache holds them (SPEC 7): the ones
  // decode steps will read, computed once by the append.
  const int64_t kshape[4] = {1, Tc, c.Hkv, c.Dk}, vshape[4] = {1, Tc, c.Hkv, c.Dv};
  fwd.p.in.k_cmp = nsa_tensor_contiguous(kc.data(), c.dtype, 4, kshape);
  fwd.p.in.v_cmp = nsa_tensor_contiguous(vc.data(), c.dtype, 4, vshape);
  const CpuCache& st = storage(c);
  for (int64_t i = 0; i < Tc; ++i) {
    for (int64_t h = 0; h < c.Hkv; ++h) {
      st.cmp.read_k(seq, h, i, row.data());
      store_row(fwd.p.in.k_cmp, offset_of(fwd.p.in.k_cmp, 0, i, h), row.data(), c.Dk);
      st.cmp.read_v(seq, h, i, row.data());
      store_row(fwd.p.in.v_cmp, offset_of(fwd.p.in.v_cmp, 0, i, h), row.data(), c.Dv);
    }
  }
  return forward(fwd);
}

}  // namespace nsa::cpu
