// The CUDA KV cache and decode (nsa.h, "Decode with a KV cache"; SPEC 7). The cache lives in
// device memory in the forward's own layout, [num_seqs, capacity, Hkv, D] for the raw tokens and
// [num_seqs, Tc(capacity), Hkv, D] for the compressed ones, so a decode step is query.cuh's work
// at one position per row: the same code as the forward, the same bits. An append copies its
// rows and compresses exactly the compressed tokens they complete (mean). The lengths are the
// host's (common/kv_cache.h) and reach the kernels as launch parameters: a step never waits for
// the device.
#include <cuda_runtime.h>

#include "common/kv_cache.h"
#include "cuda/compress.h"
#include "cuda/device.h"
#include "cuda/ops.h"
#include "cuda/query.cuh"

namespace nsa::cuda {
namespace {

class CudaCache final : public CacheStorage {
 public:
  ~CudaCache() override {
    for (void* p : {k, v, kc, vc, static_cast<void*>(mlp)}) cudaFree(p);
  }
  void* k = nullptr;  // raw [num_seqs, rows, Hkv, Dk]
  void* v = nullptr;
  void* kc = nullptr;  // compressed [num_seqs, cmp_rows, Hkv, Dk]
  void* vc = nullptr;
  int64_t rows = 0, cmp_rows = 0;
  // mlp: phi's parameters for keys then values, widened to f32 at creation (compress.h), and the
  // cache's own scratch for the rows an append compresses (with its cuBLAS handle).
  float* mlp = nullptr;
  MlpShape mlp_k, mlp_v;
  DeviceWorkspace scratch;
};

CudaCache& storage(const nsa_kv_cache& c) { return static_cast<CudaCache&>(*c.storage); }

// The cache's [num_seqs, rows, Hkv, D] buffer as a T4 (query.cuh).
T4 cache_view(void* p, int64_t rows, int64_t Hkv, int64_t D, nsa_dtype dt) {
  T4 v;
  v.p = p;
  v.s0 = rows * Hkv * D;
  v.s1 = Hkv * D;
  v.s2 = D;
  v.bf16 = dt == NSA_DTYPE_BF16;
  return v;
}

// An [S, H(, D)] decode tensor as a T4 with one batch row (rows are query "tokens").
T4 rows_view(const nsa_tensor& t) {
  T4 v;
  v.p = t.data;
  v.s1 = t.stride[0];
  v.s2 = t.ndim > 1 ? t.stride[1] : 0;
  v.bf16 = t.dtype == NSA_DTYPE_BF16;
  return v;
}

// Rows [0, n) of x [n, Hkv, D] (f32 or bf16) into positions pos0 .. pos0 + n of the cache's
// sequence slice dst ([rows, Hkv, D], the cache's dtype).
__global__ void append_kernel(const void* x, bool x_bf16, int64_t xs0, int64_t xs1, void* dst,
                              bool dst_bf16, int64_t pos0, int64_t Hkv, int64_t D) {
  const int64_t r = blockIdx.x, h = blockIdx.y;
  for (int64_t i = threadIdx.x; i < D; i += kThreads) {
    st_any(dst, dst_bf16, ((pos0 + r) * Hkv + h) * D + i, ld_any(x, x_bf16, r * xs0 + h * xs1 + i));
  }
}

Status append_one(const nsa_kv_cache& c, const nsa_tensor& x, void* base, int64_t rows, int64_t D,
                  int64_t seq, int64_t pos0, cudaStream_t stream) {
  const size_t esize = nsa_dtype_size(c.dtype);
  void* slice = static_cast<char*>(base) + size_t(seq * rows * c.Hkv * D) * esize;
  const dim3 grid(static_cast<unsigned>(x.shape[0]), static_cast<unsigned>(c.Hkv));
  append_kernel<<<grid, kThreads, 0, stream>>>(x.data, x.dtype == NSA_DTYPE_BF16, x.stride[0],
                                               x.stride[1], slice, c.dtype == NSA_DTYPE_BF16, pos0,
                                               c.Hkv, D);
  return launch_status("nsa_kv_cache_append");
}

// Compressed rows [before, after) of sequence seq from its raw rows (SPEC 7: each exactly once).
Status compress_new(const nsa_kv_cache& c, int64_t seq, int64_t before, int64_t after,
                    cudaStream_t stream) {
  CudaCache& st = storage(c);
  const size_t esize = nsa_dtype_size(c.dtype);
  for (int kind = 0; kind < 2; ++kind) {
    const int64_t D = kind == 0 ? c.Dk : c.Dv;
    CmpArgs a;
    a.x = static_cast<const char*>(kind == 0 ? st.k : st.v) +
          size_t(seq * st.rows * c.Hkv * D) * esize;
    a.out = static_cast<char*>(kind == 0 ? st.kc : st.vc) +
            size_t(seq * st.cmp_rows * c.Hkv * D) * esize;
    a.x_bf16 = a.out_bf16 = c.dtype == NSA_DTYPE_BF16;
    a.xs1 = a.os1 = c.Hkv * D;
    a.xs2 = a.os2 = D;
    a.T = st.rows;
    a.D = D;
    a.l = c.cfg.cmp_block;
    a.d = c.cfg.cmp_stride;
    a.Tc = a.rows = after - before;
    a.row0 = before;
    if (c.cmp_kind == NSA_CMP_MEAN) {
      NSA_RETURN_IF_ERROR(launch_mean(a, c.Hkv, stream));
      continue;
    }
    const MlpShape& m = kind == 0 ? st.mlp_k : st.mlp_v;
    const float* weights = kind == 0 ? st.mlp : st.mlp + mlp_weight_floats(st.mlp_k);
    NSA_RETURN_IF_ERROR(st.scratch.reserve(size_t(mlp_scratch_floats(m, a.rows)) * 4));
    NSA_RETURN_IF_ERROR(
        mlp_rows(a, m, weights, static_cast<float*>(st.scratch.data()), &st.scratch, stream));
  }
  return Status::ok();
}

// mlp: phi's parameters, copied at creation (nsa.h) as f32 into st.mlp. Creation waits for the
// copy, so that an append on any stream reads finished parameters.
Status copy_mlp(const nsa_kv_cache_params& p, CudaCache& st) {
  st.mlp_k = {p.num_kv_heads, p.cfg.cmp_block, p.head_dim_k, p.k_w1.shape[1]};
  st.mlp_v = {p.num_kv_heads, p.cfg.cmp_block, p.head_dim_v, p.v_w1.shape[1]};
  const int64_t fk = mlp_weight_floats(st.mlp_k), fv = mlp_weight_floats(st.mlp_v);
  NSA_RETURN_IF_ERROR(cuda_status(cudaMalloc(&st.mlp, size_t(fk + fv) * 4), "nsa_kv_cache_create"));
  NSA_RETURN_IF_ERROR(widen_mlp(st.mlp_k, p.k_pos, p.k_w1, p.k_b1, p.k_w2, p.k_b2, st.mlp, 0));
  NSA_RETURN_IF_ERROR(widen_mlp(st.mlp_v, p.v_pos, p.v_w1, p.v_b1, p.v_w2, p.v_b2, st.mlp + fk, 0));
  return cuda_status(cudaStreamSynchronize(0), "nsa_kv_cache_create");
}

// The rows of one decode launch: kernel parameters, so a step reads nothing the host must copy.
constexpr int kRowsPerLaunch = 256;
struct StepRows {
  int64_t row0 = 0;  // the first row of q / o this launch covers
  int32_t seq[kRowsPerLaunch];
  int32_t t[kRowsPerLaunch];  // the query's position: the sequence's length - 1
};

template <typename In>
__global__ void __launch_bounds__(kThreads) decode_kernel(const FwdArgs a, const StepRows r) {
  extern __shared__ float smem[];
  const int64_t i = blockIdx.x, t = r.t[i];
  nsa_query<In>(a, {0, r.row0 + i, r.seq[i], 0, t, t + 1, 0, blockIdx.y}, smem);
}

template <typename In>
__global__ void __launch_bounds__(kThreads)
    dense_decode_kernel(const DenseArgs a, const StepRows r) {
  extern __shared__ float smem[];
  const int64_t i = blockIdx.x, t = r.t[i];
  dense_query<In>(a, {0, r.row0 + i, r.seq[i], 0, t, t + 1, 0, blockIdx.y}, smem);
}

FwdArgs nsa_step_args(const DecodeProblem& pr) {
  const nsa_kv_cache& c = *pr.cache;
  const CudaCache& st = storage(c);
  const nsa_decode_params& p = *pr.nsa;
  FwdArgs a;
  a.q = rows_view(pr.q);
  a.k_slc = a.k_win = cache_view(st.k, st.rows, c.Hkv, c.Dk, c.dtype);
  a.v_slc = a.v_win = cache_view(st.v, st.rows, c.Hkv, c.Dv, c.dtype);
  a.k_cmp = cache_view(st.kc, st.cmp_rows, c.Hkv, c.Dk, c.dtype);
  a.v_cmp = cache_view(st.vc, st.cmp_rows, c.Hkv, c.Dv, c.dtype);
  const nsa_tensor* gates[3] = {&p.g_cmp, &p.g_slc, &p.g_win};
  const nsa_tensor* lses[3] = {&p.lse_cmp, &p.lse_slc, &p.lse_win};
  for (int b = 0; b < 3; ++b) a.gate[b] = rows_view(*gates[b]), a.lse[b] = rows_view(*lses[b]);
  a.o = rows_view(pr.o);
  a.idx_out = rows_view(p.slc_indices_out);
  a.T = st.rows;
  a.Tc_rows = st.cmp_rows;
  a.G = int(pr.G), a.Dk = int(c.Dk), a.Dv = int(c.Dv);
  const nsa_config& cfg = c.cfg;
  a.l = cfg.cmp_block, a.d = cfg.cmp_stride, a.lp = cfg.slc_block, a.n = cfg.slc_count;
  a.n_init = cfg.slc_init, a.n_local = cfg.slc_local, a.w = cfg.window;
  a.scale = pr.scale;
  a.nblk = int((st.rows - 1) / cfg.slc_block + 1);
  return a;
}

DenseArgs dense_step_args(const DecodeProblem& pr) {
  const nsa_kv_cache& c = *pr.cache;
  const CudaCache& st = storage(c);
  DenseArgs a;
  a.q = rows_view(pr.q);
  a.k = cache_view(st.k, st.rows, c.Hkv, c.Dk, c.dtype);
  a.v = cache_view(st.v, st.rows, c.Hkv, c.Dv, c.dtype);
  a.o = rows_view(pr.o);
  a.lse = rows_view(pr.lse);
  a.T = st.rows;
  a.G = int(pr.G), a.Dk = int(c.Dk), a.Dv = int(c.Dv), a.w = int(pr.window);
  a.scale = pr.scale;
  return a;
}

// Launches `kernel` over the step's rows, kRowsPerLaunch at a time.
template <typename Args>
Status launch_rows(const DecodeProblem& pr, const void* fn,
                   void (*launch)(const Args&, const StepRows&, const LaunchShape&, cudaStream_t),
                   const Args& a, int64_t smem, const char* call) {
  const nsa_kv_cache& c = *pr.cache;
  for (int64_t r0 = 0; r0 < pr.S; r0 += kRowsPerLaunch) {
    StepRows rows;
    rows.row0 = r0;
    const int64_t n = pr.S - r0 < kRowsPerLaunch ? pr.S - r0 : kRowsPerLaunch;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t seq = pr.seqs[size_t(r0 + i)];
      rows.seq[i] = int32_t(seq);
      rows.t[i] = int32_t(c.len[size_t(seq)] - 1);
    }
    LaunchShape ls;
    NSA_RETURN_IF_ERROR(launch_shape(call, fn, smem, n, c.Hkv, &ls));
    launch(a, rows, ls, stream_of(pr));
    NSA_RETURN_IF_ERROR(launch_status(call));
  }
  return Status::ok();
}

template <typename In>
void launch_nsa(const FwdArgs& a, const StepRows& r, const LaunchShape& ls, cudaStream_t s) {
  decode_kernel<In><<<ls.grid, kThreads, ls.smem, s>>>(a, r);
}
template <typename In>
void launch_dense(const DenseArgs& a, const StepRows& r, const LaunchShape& ls, cudaStream_t s) {
  dense_decode_kernel<In><<<ls.grid, kThreads, ls.smem, s>>>(a, r);
}

}  // namespace

Status kv_cache_create(const nsa_kv_cache_params& p, nsa_kv_cache* cache) {
  auto st = std::make_unique<CudaCache>();
  st->rows = p.capacity;
  st->cmp_rows = nsa_cmp_len(&p.cfg, p.capacity);
  const size_t esize = nsa_dtype_size(p.dtype), seqs_heads = size_t(p.num_seqs * p.num_kv_heads);
  const size_t sizes[4] = {seqs_heads * size_t(st->rows * p.head_dim_k) * esize,
                           seqs_heads * size_t(st->rows * p.head_dim_v) * esize,
                           seqs_heads * size_t(st->cmp_rows * p.head_dim_k) * esize,
                           seqs_heads * size_t(st->cmp_rows * p.head_dim_v) * esize};
  void** bufs[4] = {&st->k, &st->v, &st->kc, &st->vc};
  for (int i = 0; i < 4; ++i) {
    // The destructor frees what was allocated when a later buffer does not fit.
    NSA_RETURN_IF_ERROR(
        cuda_status(cudaMalloc(bufs[i], sizes[i] > 0 ? sizes[i] : 1), "nsa_kv_cache_create"));
  }
  if (p.cmp_kind == NSA_CMP_MLP) NSA_RETURN_IF_ERROR(copy_mlp(p, *st));
  cache->storage = std::move(st);
  return Status::ok();
}

Status kv_cache_append(nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                       int32_t, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  CudaCache& st = storage(c);
  const int64_t len = c.len[size_t(seq)], n = k.shape[0];
  NSA_RETURN_IF_ERROR(append_one(c, k, st.k, st.rows, c.Dk, seq, len, stream));
  NSA_RETURN_IF_ERROR(append_one(c, v, st.v, st.rows, c.Dv, seq, len, stream));
  return compress_new(c, seq, nsa_cmp_len(&c.cfg, len), nsa_cmp_len(&c.cfg, len + n), stream);
}

Status kv_cache_prefill(nsa_kv_cache& c, int64_t seq, FwdProblem& fwd) {
  NSA_RETURN_IF_ERROR(
      kv_cache_append(c, seq, drop_batch(fwd.p.in.k), drop_batch(fwd.p.in.v), 0, fwd.stream));
  // The forward reads the compressed tokens as the cache holds them (SPEC 7).
  const CudaCache& st = storage(c);
  const size_t esize = nsa_dtype_size(c.dtype);
  nsa_tensor* cmp[2] = {&fwd.p.in.k_cmp, &fwd.p.in.v_cmp};
  void* base[2] = {st.kc, st.vc};
  const int64_t dims[2] = {c.Dk, c.Dv};
  for (int i = 0; i < 2; ++i) {
    const int64_t shape[4] = {1, fwd.Tc, c.Hkv, dims[i]};
    *cmp[i] = nsa_tensor_contiguous(
        static_cast<char*>(base[i]) + size_t(seq * st.cmp_rows * c.Hkv * dims[i]) * esize, c.dtype,
        4, shape);
  }
  return forward(fwd);
}

CacheCmpView cache_cmp_view(const nsa_kv_cache& c) {
  const CudaCache& st = storage(c);
  return {st.kc, st.vc, st.cmp_rows};
}

Status decode(const DecodeProblem& pr) {
  const bool bf16 = pr.cache->dtype == NSA_DTYPE_BF16;
  if (pr.dense) {
    const DenseArgs a = dense_step_args(pr);
    const int64_t smem = 4 * smem_floats(a.G, a.Dk, a.Dv);
    return bf16 ? launch_rows<DenseArgs>(
                      pr, reinterpret_cast<const void*>(&dense_decode_kernel<__nv_bfloat16>),
                      launch_dense<__nv_bfloat16>, a, smem, "nsa_dense_decode")
                : launch_rows<DenseArgs>(pr,
                                         reinterpret_cast<const void*>(&dense_decode_kernel<float>),
                                         launch_dense<float>, a, smem, "nsa_dense_decode");
  }
  const FwdArgs a = nsa_step_args(pr);
  const int64_t smem = nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n);
  return bf16 ? launch_rows<FwdArgs>(pr,
                                     reinterpret_cast<const void*>(&decode_kernel<__nv_bfloat16>),
                                     launch_nsa<__nv_bfloat16>, a, smem, "nsa_decode")
              : launch_rows<FwdArgs>(pr, reinterpret_cast<const void*>(&decode_kernel<float>),
                                     launch_nsa<float>, a, smem, "nsa_decode");
}

}  // namespace nsa::cuda
