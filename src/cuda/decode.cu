// The CUDA KV cache and decode (nsa.h, "Decode with a KV cache"; SPEC 7). The cache lives in
// device memory in the forward's own layout (decode.cuh), so a decode step is query.cuh's work at
// one position per row: the same code as the forward, the same bits; or, when its (row, KV head)
// blocks are too few to fill the device, that work with each branch's keys split across blocks
// (split.cuh; bits of its own, as fixed). An append copies its rows and compresses exactly the
// compressed tokens they complete (mean, or mlp through cuBLAS). The lengths are the host's
// (common/kv_cache.h) and reach the kernels as launch parameters: a step never waits for the
// device.
//
// Streams: each call runs on its context's stream. A cache remembers the stream of its last call
// and an event recorded after it; a call on another stream first waits for that event, so work
// on one cache is ordered whatever streams the calls come from (its scratch and cuBLAS handle
// are shared by all of them). Inside a stream capture, nothing is recorded or waited for.
#include <cuda_runtime.h>

#include <climits>

#include "cuda/compress.cuh"
#include "cuda/decode.cuh"
#include "cuda/device.h"
#include "cuda/ops.h"
#include "cuda/split.cuh"

namespace nsa::cuda {
namespace {

// mlp: compressed rows are computed in chunks of this many, so the cache's scratch, reserved at
// creation, never grows (a prefill's thousands of rows go through it in turn).
constexpr int64_t kMlpRows = 256;
constexpr size_t kCublasWorkspace = size_t(4) << 20;

class CudaCache final : public CacheStorage {
 public:
  ~CudaCache() override {
    if (done != nullptr) cudaEventDestroy(done);
    for (void* p : {bufs.k, bufs.v, bufs.kc, bufs.vc, static_cast<void*>(mlp)}) {
      cudaFree(p);
    }
  }
  CacheBufs bufs;
  // mlp: phi's parameters for keys then values, widened to f32 at creation (compress.h), the
  // scratch for kMlpRows rows and the cuBLAS handle (with its own workspace, so that cuBLAS
  // allocates nothing during a step).
  float* mlp = nullptr;
  MlpShape mlp_k, mlp_v;
  DeviceWorkspace scratch;
  // The last call's stream and an event after its work.
  cudaEvent_t done = nullptr;
  cudaStream_t last = nullptr;
};

CudaCache& storage(const nsa_kv_cache& c) { return static_cast<CudaCache&>(*c.storage); }

bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(s, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone;
}

// Before a call's work on stream s: wait for the cache's last work when it was on another stream.
Status order_after_last(CudaCache& st, cudaStream_t s, const char* call) {
  if (st.last == s || capturing(s)) return Status::ok();
  return cuda_status(cudaStreamWaitEvent(s, st.done, 0), call);
}
// After it: s is now the cache's last stream.
Status mark_last(CudaCache& st, cudaStream_t s, const char* call) {
  if (capturing(s)) return Status::ok();
  st.last = s;
  return cuda_status(cudaEventRecord(st.done, s), call);
}
// The end of a call whose work() enqueues on s: marked whether or not all of it was enqueued, so
// that a later call on another stream still waits for what was; work's failure comes first.
template <typename Work>
Status on_stream(CudaCache& st, cudaStream_t s, const char* call, Work work) {
  NSA_RETURN_IF_ERROR(order_after_last(st, s, call));
  const Status w = work();
  const Status m = mark_last(st, s, call);
  return w.is_ok() ? m : w;
}

__global__ void append_kernel(const void* x, Elem x_el, int64_t xs0, int64_t xs1, void* dst,
                              Elem dst_el, int64_t pos0, int64_t Hkv, int64_t D) {
  append_block(x, x_el, xs0, xs1, dst, dst_el, pos0, Hkv, D);
}

Status append_one(const nsa_kv_cache& c, const nsa_tensor& x, void* base, int64_t rows, int64_t D,
                  int64_t seq, int64_t pos0, cudaStream_t stream) {
  const size_t esize = nsa_dtype_size(c.dtype);
  void* slice = static_cast<char*>(base) + size_t(seq * rows * c.Hkv * D) * esize;
  const dim3 grid(static_cast<unsigned>(x.shape[0]), static_cast<unsigned>(c.Hkv));
  append_kernel<<<grid, kThreads, 0, stream>>>(x.data, elem_of(x.dtype), x.stride[0], x.stride[1],
                                               slice, elem_of(c.dtype), pos0, c.Hkv, D);
  return launch_status("nsa_kv_cache_append");
}

__global__ void append_step_kernel(const void* x, Elem x_el, int64_t xs0, int64_t xs1, void* dst,
                                   Elem dst_el, int64_t rows, int64_t Hkv, int64_t D,
                                   const StepRows r) {
  append_step_block(x, x_el, xs0, xs1, dst, dst_el, rows, Hkv, D, r);
}

__global__ void mean_step_kernel(const CmpArgs a, const StepRows r) { mean_step_block(a, r); }

// Compressed rows [before, after) of sequence seq from its raw rows (SPEC 7: each exactly once).
Status compress_new(const nsa_kv_cache& c, int64_t seq, int64_t before, int64_t after,
                    cudaStream_t stream) {
  CudaCache& st = storage(c);
  for (int kind = 0; kind < 2; ++kind) {
    if (c.cmp_kind == NSA_CMP_MEAN) {
      NSA_RETURN_IF_ERROR(
          launch_mean(cache_cmp_args(c, st.bufs, seq, kind, before, after), c.Hkv, stream));
      continue;
    }
    const MlpShape& m = kind == 0 ? st.mlp_k : st.mlp_v;
    const float* weights = kind == 0 ? st.mlp : st.mlp + mlp_weight_floats(st.mlp_k);
    for (int64_t r0 = before; r0 < after; r0 += kMlpRows) {
      const CmpArgs a = cache_cmp_args(c, st.bufs, seq, kind, r0, std::min(after, r0 + kMlpRows));
      NSA_RETURN_IF_ERROR(
          mlp_rows(a, m, weights, static_cast<float*>(st.scratch.data()), &st.scratch, stream));
    }
  }
  return Status::ok();
}

// mlp: phi's parameters, copied at creation (nsa.h) as f32, on the creating context's stream,
// which creation then waits for (so that later calls on any stream read finished parameters);
// the cuBLAS handle and the scratch, made now so that no step allocates.
Status prepare_mlp(const nsa_kv_cache_params& p, CudaCache& st, cudaStream_t stream) {
  st.mlp_k = {p.num_kv_heads, p.cfg.cmp_block, p.head_dim_k, p.k_w1.shape[1]};
  st.mlp_v = {p.num_kv_heads, p.cfg.cmp_block, p.head_dim_v, p.v_w1.shape[1]};
  for (const MlpShape* m : {&st.mlp_k, &st.mlp_v}) {
    if (int64_t(m->l) * m->D > INT32_MAX || m->Dh > INT32_MAX) {
      return error(NSA_ERR_UNSUPPORTED,
                   "nsa_kv_cache_create: cuBLAS takes int sizes: l * D and "
                   "Dh must be at most 2^31 - 1 on the cuda backend");
    }
  }
  const int64_t fk = mlp_weight_floats(st.mlp_k), fv = mlp_weight_floats(st.mlp_v);
  const char* call = "nsa_kv_cache_create";
  NSA_RETURN_IF_ERROR(cuda_status(cudaMalloc(&st.mlp, size_t(fk + fv) * 4), call));
  NSA_RETURN_IF_ERROR(widen_mlp(st.mlp_k, p.k_pos, p.k_w1, p.k_b1, p.k_w2, p.k_b2, st.mlp, stream));
  NSA_RETURN_IF_ERROR(
      widen_mlp(st.mlp_v, p.v_pos, p.v_w1, p.v_b1, p.v_w2, p.v_b2, st.mlp + fk, stream));
  NSA_RETURN_IF_ERROR(cuda_status(cudaStreamSynchronize(stream), call));
  const int64_t rows = std::min(kMlpRows, std::max<int64_t>(1, nsa_cmp_len(&p.cfg, p.capacity)));
  NSA_RETURN_IF_ERROR(st.scratch.reserve(
      size_t(std::max(mlp_scratch_floats(st.mlp_k, rows), mlp_scratch_floats(st.mlp_v, rows))) *
      4));
  NSA_RETURN_IF_ERROR(st.scratch.reserve_cublas_scratch(kCublasWorkspace));
  cublasHandle_t handle = nullptr;
  return st.scratch.cublas(stream, &handle);  // created now: no step creates it
}

// The launches of one step: every shape checked before anything is enqueued, so a refused step
// writes nothing; then kRowsPerLaunch rows per launch.
template <typename Args>
Status launch_step(const DecodeProblem& pr, const Args& a, const std::vector<int32_t>& t,
                   const void* fn, int64_t smem, const char* call,
                   void (*launch)(const Args&, const StepRows&, const LaunchShape&, cudaStream_t)) {
  LaunchShape ls;
  const int64_t first = std::min<int64_t>(pr.S, kRowsPerLaunch);
  NSA_RETURN_IF_ERROR(launch_shape(call, fn, smem, first, pr.cache->Hkv, &ls));
  for (int64_t r0 = 0; r0 < pr.S; r0 += kRowsPerLaunch) {
    ls.grid.x = static_cast<unsigned>(std::min<int64_t>(pr.S - r0, kRowsPerLaunch));
    launch(a, step_rows(pr, t, r0), ls, stream_of(pr));
    NSA_RETURN_IF_ERROR(launch_status(call));
  }
  return Status::ok();
}

template <typename In>
__global__ void __launch_bounds__(kThreads) decode_kernel(const FwdArgs a, const StepRows r) {
  extern __shared__ __align__(16) float smem[];  // 16: cp.async's chunk tiles (attend.cuh)
  decode_block<In>(a, r, smem);
}

template <typename In>
__global__ void __launch_bounds__(kThreads)
    dense_decode_kernel(const DenseArgs a, const StepRows r) {
  extern __shared__ __align__(16) float smem[];  // 16: cp.async's chunk tiles (attend.cuh)
  dense_decode_block<In>(a, r, smem);
}

template <typename In>
void launch_nsa(const FwdArgs& a, const StepRows& r, const LaunchShape& ls, cudaStream_t s) {
  decode_kernel<In><<<ls.grid, kThreads, ls.smem, s>>>(a, r);
}
template <typename In>
void launch_dense(const DenseArgs& a, const StepRows& r, const LaunchShape& ls, cudaStream_t s) {
  dense_decode_kernel<In><<<ls.grid, kThreads, ls.smem, s>>>(a, r);
}

// Split-key steps (split.cuh): one kernel per block function, over (row, KV head, part).
template <typename Args, void (*Block)(const Args&, const StepRows&, const SplitScratch&, float*)>
__global__ void __launch_bounds__(kThreads)
    split_kernel(const Args a, const StepRows r, const SplitScratch w) {
  extern __shared__ __align__(16) float smem[];  // 16: cp.async's chunk tiles (attend.cuh)
  Block(a, r, w, smem);
}

// A split step's kernels, in order, each with its parts (grid.z). Every shape is checked before
// anything is enqueued.
template <typename Args, int N>
Status launch_split(const DecodeProblem& pr, const Args& a, const std::vector<int32_t>& t,
                    const SplitScratch& w,
                    void (*const (&kernels)[N])(const Args, const StepRows, const SplitScratch),
                    const int (&parts)[N], int64_t smem, const char* call) {
  LaunchShape ls[N];
  const int64_t first = std::min<int64_t>(pr.S, kRowsPerLaunch);
  for (int k = 0; k < N; ++k) {
    NSA_RETURN_IF_ERROR(launch_shape(call, reinterpret_cast<const void*>(kernels[k]), smem, first,
                                     pr.cache->Hkv, &ls[k]));
    ls[k].grid.z = static_cast<unsigned>(parts[k]);
  }
  for (int64_t r0 = 0; r0 < pr.S; r0 += kRowsPerLaunch) {
    const StepRows rows = step_rows(pr, t, r0);
    for (int k = 0; k < N; ++k) {
      ls[k].grid.x = static_cast<unsigned>(std::min<int64_t>(pr.S - r0, kRowsPerLaunch));
      kernels[k]<<<ls[k].grid, kThreads, ls[k].smem, stream_of(pr)>>>(a, rows, w);
      NSA_RETURN_IF_ERROR(launch_status(call));
    }
  }
  return Status::ok();
}

// The step's split plan and its scratch in the context's workspace, or no split (plan all zero)
// when the step fills the device as it is, or when a stream capture would have to grow the
// workspace (cudaMalloc is not allowed there; nsa_context_reserve_cuda_workspace avoids it).
Status plan_split(const DecodeProblem& pr, int64_t t_max, int64_t cmp_rows, SplitScratch* w) {
  int dev = 0, sms = 0;
  const char* call = pr.dense ? "nsa_dense_decode" : "nsa_decode";
  NSA_RETURN_IF_ERROR(cuda_status(cudaGetDevice(&dev), call));
  NSA_RETURN_IF_ERROR(
      cuda_status(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), call));
  const int64_t rows = std::min<int64_t>(pr.S, kRowsPerLaunch), blocks = rows * pr.cache->Hkv;
  const nsa_kv_cache& c = *pr.cache;
  w->plan = pr.dense ? dense_split_plan(blocks, sms, t_max, pr.window)
                     : nsa_split_plan(blocks, sms, t_max, c.cfg);
  if (w->plan.parts() == 0 || pr.workspace == nullptr) return w->plan = {}, Status::ok();
  w->P = max_split_parts(blocks, sms, pr.dense ? nullptr : &c.cfg);
  w->Hkv = c.Hkv, w->G = int(pr.G), w->Dv = int(c.Dv);
  if (!pr.dense) w->ncmax = cmp_rows, w->n = c.cfg.slc_count;
  const size_t bytes = size_t(split_scratch_bytes(*w, rows));
  const size_t held = *pr.workspace ? (*pr.workspace)->size() : 0;
  if (bytes > held && capturing(stream_of(pr))) {
    w->plan = {};
    return Status::ok();
  }
  DeviceWorkspace* ws = nullptr;
  NSA_RETURN_IF_ERROR(workspace(pr.workspace, bytes, &ws));
  w->base = static_cast<float*>(ws->data());
  return Status::ok();
}

template <typename In>
Status run_step(const DecodeProblem& pr, const CacheBufs& cb) {
  std::vector<int32_t> t;
  const int64_t t_max = step_positions(pr, &t);
  SplitScratch w;
  NSA_RETURN_IF_ERROR(plan_split(pr, t_max, cb.cmp_rows, &w));
  if (pr.dense) {
    const DenseArgs a = dense_step_args(pr, cb);
    const int64_t smem = 4 * smem_floats(a.G, a.Dk, a.Dv);
    if (w.plan.parts() > 0) {
      void (*const kernels[2])(const DenseArgs, const StepRows, const SplitScratch) = {
          split_kernel<DenseArgs, dense_part_block<In>>,
          split_kernel<DenseArgs, dense_combine_block>};
      const int parts[2] = {w.plan.win, 1};
      return launch_split<DenseArgs, 2>(pr, a, t, w, kernels, parts, smem, "nsa_dense_decode");
    }
    return launch_step<DenseArgs>(pr, a, t, reinterpret_cast<const void*>(&dense_decode_kernel<In>),
                                  smem, "nsa_dense_decode", launch_dense<In>);
  }
  const FwdArgs a = nsa_step_args(pr, cb, t_max);
  const int64_t smem = nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n);
  if (w.plan.parts() > 0) {
    // split.cuh's five launches: cmp parts, probabilities, selection, slc/win parts, combine.
    void (*const kernels[5])(const FwdArgs, const StepRows, const SplitScratch) = {
        split_kernel<FwdArgs, cmp_part_block<In>>, split_kernel<FwdArgs, probs_block<In>>,
        split_kernel<FwdArgs, select_block>, split_kernel<FwdArgs, sw_part_block<In>>,
        split_kernel<FwdArgs, combine_block>};
    const int parts[5] = {w.plan.cmp, w.plan.cmp, 1, w.plan.slc + w.plan.win, 1};
    return launch_split<FwdArgs, 5>(pr, a, t, w, kernels, parts, smem, "nsa_decode");
  }
  return launch_step<FwdArgs>(pr, a, t, reinterpret_cast<const void*>(&decode_kernel<In>), smem,
                              "nsa_decode", launch_nsa<In>);
}

}  // namespace

Status kv_cache_create(const nsa_kv_cache_params& p, nsa_kv_cache* cache, void* stream_ptr) {
  // Positions are int32 launch parameters and each KV head is a grid row (nsa_cuda.h, limits).
  if (p.capacity > INT32_MAX || p.num_kv_heads > 65535) {
    return error(NSA_ERR_UNSUPPORTED, cat("nsa_kv_cache_create: the cuda backend's cache takes "
                                          "capacity <= 2^31 - 1 and num_kv_heads <= 65535 (got ",
                                          p.capacity, ", ", p.num_kv_heads, ")"));
  }
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  auto st = std::make_unique<CudaCache>();
  CacheBufs& b = st->bufs;
  b.rows = p.capacity;
  b.cmp_rows = nsa_cmp_len(&p.cfg, p.capacity);
  const size_t esize = nsa_dtype_size(p.dtype), seqs_heads = size_t(p.num_seqs * p.num_kv_heads);
  const size_t sizes[4] = {seqs_heads * size_t(b.rows * p.head_dim_k) * esize,
                           seqs_heads * size_t(b.rows * p.head_dim_v) * esize,
                           seqs_heads * size_t(b.cmp_rows * p.head_dim_k) * esize,
                           seqs_heads * size_t(b.cmp_rows * p.head_dim_v) * esize};
  void** bufs[4] = {&b.k, &b.v, &b.kc, &b.vc};
  const char* call = "nsa_kv_cache_create";
  for (int i = 0; i < 4; ++i) {
    // The destructor frees what was allocated when a later buffer does not fit.
    NSA_RETURN_IF_ERROR(cuda_status(cudaMalloc(bufs[i], sizes[i] > 0 ? sizes[i] : 1), call));
  }
  NSA_RETURN_IF_ERROR(
      cuda_status(cudaEventCreateWithFlags(&st->done, cudaEventDisableTiming), call));
  if (p.cmp_kind == NSA_CMP_MLP) NSA_RETURN_IF_ERROR(prepare_mlp(p, *st, stream));
  st->last = stream;
  cache->storage = std::move(st);
  return Status::ok();
}

Status kv_cache_append(nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                       int32_t, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  CudaCache& st = storage(c);
  return on_stream(st, stream, "nsa_kv_cache_append", [&]() -> Status {
    const int64_t len = c.len[size_t(seq)], n = k.shape[0];
    NSA_RETURN_IF_ERROR(append_one(c, k, st.bufs.k, st.bufs.rows, c.Dk, seq, len, stream));
    NSA_RETURN_IF_ERROR(append_one(c, v, st.bufs.v, st.bufs.rows, c.Dv, seq, len, stream));
    return compress_new(c, seq, nsa_cmp_len(&c.cfg, len), nsa_cmp_len(&c.cfg, len + n), stream);
  });
}

// Rows [r0, r0 + n) of a step's appends: k and v in one launch each, then the compressed
// tokens they complete (mean: one launch each for keys and values; mlp: per sequence, through
// cuBLAS, once every d steps of it).
Status append_step_rows(const nsa_kv_cache& c, const int64_t* seqs, int64_t r0, int64_t n,
                        const nsa_tensor& k, const nsa_tensor& v, cudaStream_t stream) {
  CudaCache& st = storage(c);
  StepRows rows, done;
  rows.row0 = r0;
  int nc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t seq = seqs[r0 + i], len = c.len[size_t(seq)];
    rows.seq[i] = int32_t(seq);
    rows.t[i] = int32_t(len);
    const int64_t before = nsa_cmp_len(&c.cfg, len);
    if (nsa_cmp_len(&c.cfg, len + 1) > before) {  // at most one a row (stride d >= 1)
      done.seq[nc] = int32_t(seq);
      done.t[nc++] = int32_t(before);
    }
  }
  const char* call = "nsa_decode (appending k and v)";
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(c.Hkv));
  void* dst[2] = {st.bufs.k, st.bufs.v};
  const nsa_tensor* x[2] = {&k, &v};
  const int64_t D[2] = {c.Dk, c.Dv};
  for (int i = 0; i < 2; ++i) {
    append_step_kernel<<<grid, kThreads, 0, stream>>>(
        x[i]->data, elem_of(x[i]->dtype), x[i]->stride[0], x[i]->stride[1], dst[i],
        elem_of(c.dtype), st.bufs.rows, c.Hkv, D[i], rows);
    NSA_RETURN_IF_ERROR(launch_status(call));
  }
  if (nc == 0) return Status::ok();
  if (c.cmp_kind == NSA_CMP_MEAN) {
    const dim3 cgrid(static_cast<unsigned>(nc), static_cast<unsigned>(c.Hkv));
    for (int kind = 0; kind < 2; ++kind) {
      mean_step_kernel<<<cgrid, kCmpThreads, 0, stream>>>(cache_cmp_all(c, st.bufs, kind), done);
      NSA_RETURN_IF_ERROR(launch_status(call));
    }
    return Status::ok();
  }
  for (int i = 0; i < nc; ++i) {
    NSA_RETURN_IF_ERROR(compress_new(c, done.seq[i], done.t[i], done.t[i] + 1, stream));
  }
  return Status::ok();
}

Status kv_cache_append_rows(nsa_kv_cache& c, const int64_t* seqs, int64_t S, const nsa_tensor& k,
                            const nsa_tensor& v, int32_t, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  CudaCache& st = storage(c);
  return on_stream(st, stream, "nsa_decode (appending k and v)", [&]() -> Status {
    for (int64_t r0 = 0; r0 < S; r0 += kRowsPerLaunch) {
      NSA_RETURN_IF_ERROR(
          append_step_rows(c, seqs, r0, std::min<int64_t>(S - r0, kRowsPerLaunch), k, v, stream));
    }
    return Status::ok();
  });
}

Status kv_cache_prefill(nsa_kv_cache& c, int64_t seq, FwdProblem& fwd) {
  NSA_RETURN_IF_ERROR(
      kv_cache_append(c, seq, drop_batch(fwd.p.in.k), drop_batch(fwd.p.in.v), 0, fwd.stream));
  // The forward reads the compressed tokens as the cache holds them (SPEC 7).
  CudaCache& st = storage(c);
  const size_t esize = nsa_dtype_size(c.dtype);
  nsa_tensor* cmp[2] = {&fwd.p.in.k_cmp, &fwd.p.in.v_cmp};
  void* base[2] = {st.bufs.kc, st.bufs.vc};
  const int64_t dims[2] = {c.Dk, c.Dv};
  for (int i = 0; i < 2; ++i) {
    const int64_t shape[4] = {1, fwd.Tc, c.Hkv, dims[i]};
    *cmp[i] = nsa_tensor_contiguous(
        static_cast<char*>(base[i]) + size_t(seq * st.bufs.cmp_rows * c.Hkv * dims[i]) * esize,
        c.dtype, 4, shape);
  }
  const Status w = forward(fwd);  // on the stream the append just marked: nothing to wait for
  const Status m = mark_last(st, static_cast<cudaStream_t>(fwd.stream), "nsa_prefill");
  return w.is_ok() ? m : w;
}

CacheCmpView cache_cmp_view(const nsa_kv_cache& c) {
  const CudaCache& st = storage(c);
  return {st.bufs.kc, st.bufs.vc, st.bufs.cmp_rows};
}

Status decode(const DecodeProblem& pr) {
  CudaCache& st = storage(*pr.cache);
  const cudaStream_t stream = stream_of(pr);
  return on_stream(st, stream, pr.dense ? "nsa_dense_decode" : "nsa_decode", [&] {
    return pr.cache->dtype == NSA_DTYPE_BF16 ? run_step<__nv_bfloat16>(pr, st.bufs)
                                             : run_step<float>(pr, st.bufs);
  });
}

}  // namespace nsa::cuda
