// The CUDA forward (SPEC 4) and the dense baseline over [B, T] batches, fixed-length or packed
// (cu_seqlens, read on the device): one block per (token, KV head) running query.cuh.
#include <cuda_runtime.h>

#include "cuda/device.h"
#include "cuda/ops.h"
#include "cuda/query.cuh"

namespace nsa::cuda {
namespace {

template <typename In>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdArgs a) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x / a.T, tok = blockIdx.x % a.T;
  const Place pl = place_token(a.cu, a.S, b, tok, a.T, a.l, a.d);
  if (!pl.ok) return;  // invalid cu_seqlens: this row is left as it was
  nsa_query<In>(a, {b, tok, b, pl.start, pl.t, pl.len, pl.cmp_start, blockIdx.y}, smem);
}

template <typename In>
__global__ void __launch_bounds__(kThreads) dense_kernel(const DenseArgs a) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x / a.T, tok = blockIdx.x % a.T;
  const Place pl = place_token(a.cu, a.S, b, tok, a.T, 1, 1);
  if (!pl.ok) return;
  dense_query<In>(a, {b, tok, b, pl.start, pl.t, pl.len, 0, blockIdx.y}, smem);
}

}  // namespace

Status forward(const FwdProblem& pr) {
  const nsa_fwd_params& p = pr.p;
  const nsa_config& cfg = p.in.cfg;
  if (pr.B * pr.T == 0) return Status::ok();
  FwdArgs a;
  a.q = t4(p.in.q);
  a.k_slc = t4(p.in.k_slc), a.v_slc = t4(p.in.v_slc);
  a.k_win = t4(p.in.k_win), a.v_win = t4(p.in.v_win);
  a.k_cmp = t4(p.in.k_cmp), a.v_cmp = t4(p.in.v_cmp);
  const nsa_tensor* gates[3] = {&p.in.g_cmp, &p.in.g_slc, &p.in.g_win};
  const nsa_tensor* obr[3] = {&p.o_cmp, &p.o_slc, &p.o_win};
  const nsa_tensor* lses[3] = {&p.lse_cmp, &p.lse_slc, &p.lse_win};
  for (int c = 0; c < 3; ++c)
    a.gate[c] = t4(*gates[c]), a.o_br[c] = t4(*obr[c]), a.lse[c] = t4(*lses[c]);
  a.o = t4(p.o), a.idx_in = t4(p.slc_indices_in), a.idx_out = t4(p.slc_indices_out);
  a.cu = p.in.cu_seqlens;
  a.S = p.in.num_seqs;
  a.T = pr.T;
  a.Tc_rows = p.in.k_cmp.shape[1];
  a.G = int(pr.G), a.Dk = int(pr.Dk), a.Dv = int(pr.Dv);
  a.l = cfg.cmp_block, a.d = cfg.cmp_stride, a.lp = cfg.slc_block, a.n = cfg.slc_count;
  a.n_init = cfg.slc_init, a.n_local = cfg.slc_local, a.w = cfg.window;
  a.scale = cfg.scale;
  a.nblk = int((pr.T - 1) / cfg.slc_block + 1);
  const bool bf16 = p.in.q.dtype == NSA_DTYPE_BF16;
  const void* fn = bf16 ? reinterpret_cast<const void*>(&fwd_kernel<__nv_bfloat16>)
                        : reinterpret_cast<const void*>(&fwd_kernel<float>);
  LaunchShape ls;
  NSA_RETURN_IF_ERROR(launch_shape("nsa_fwd", fn, nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n),
                                   pr.B * pr.T, pr.Hkv, &ls));
  if (bf16) {
    fwd_kernel<__nv_bfloat16><<<ls.grid, kThreads, ls.smem, stream_of(pr)>>>(a);
  } else {
    fwd_kernel<float><<<ls.grid, kThreads, ls.smem, stream_of(pr)>>>(a);
  }
  return launch_status("nsa_fwd");
}

Status dense_forward(const DenseProblem& pr) {
  const nsa_dense_fwd_params& p = pr.p;
  if (pr.B * pr.T == 0) return Status::ok();
  DenseArgs a;
  a.q = t4(p.q), a.k = t4(p.k), a.v = t4(p.v), a.o = t4(p.o), a.lse = t4(p.lse);
  a.cu = p.cu_seqlens;
  a.S = p.num_seqs;
  a.T = pr.T;
  a.G = int(pr.G), a.Dk = int(pr.Dk), a.Dv = int(pr.Dv), a.w = p.window;
  a.scale = p.scale;
  const bool bf16 = p.q.dtype == NSA_DTYPE_BF16;
  const void* fn = bf16 ? reinterpret_cast<const void*>(&dense_kernel<__nv_bfloat16>)
                        : reinterpret_cast<const void*>(&dense_kernel<float>);
  LaunchShape ls;
  NSA_RETURN_IF_ERROR(launch_shape("nsa_dense_fwd", fn, smem_floats(a.G, a.Dk, a.Dv) * 4,
                                   pr.B * pr.T, pr.Hkv, &ls));
  if (bf16) {
    dense_kernel<__nv_bfloat16><<<ls.grid, kThreads, ls.smem, stream_of(pr)>>>(a);
  } else {
    dense_kernel<float><<<ls.grid, kThreads, ls.smem, stream_of(pr)>>>(a);
  }
  return launch_status("nsa_dense_fwd");
}

}  // namespace nsa::cuda
