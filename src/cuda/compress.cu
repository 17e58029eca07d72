// The CUDA compression (SPEC 5): mean as one kernel, one block per (compressed row, KV head);
// mlp as gather, two cuBLAS GEMMs per KV head (batched over heads) and two bias kernels, its
// intermediates in the context's workspace (nsa_cuda.h, "Scratch"). f32 arithmetic throughout.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>

#include "cuda/compress.h"
#include "cuda/device.h"
#include "cuda/ops.h"
#include "cuda/compress.cuh"

namespace nsa::cuda {
namespace {

__global__ void mean_kernel(const CmpArgs a) { mean_block(a); }

// mlp, step 1: X[h][r] = flatten(x block + P[h]) as f32 rows of l D (P: f32 [H][l D]).
__global__ void gather_kernel(const CmpArgs a, const float* pos, float* X) {
  const int64_t r = blockIdx.x, h = blockIdx.y, L = int64_t(a.l) * a.D;
  const CmpRow c = place_row(a, r);
  float* dst = X + (h * a.rows + r) * L;
  for (int64_t e = threadIdx.x; e < L; e += kCmpThreads) {
    const int64_t u = e / a.D, x = e % a.D;
    // Rows cu_seqlens cannot place get zeros: the GEMMs stay in bounds, the row is not stored.
    dst[e] = c.ok ? ld_any(a.x, a.x_el, c.b * a.xs0 + (c.first + u) * a.xs1 + h * a.xs2 + x) +
                        pos[h * L + e]
                  : 0.0f;
  }
}

// A [H, R, C] parameter (last dim contiguous) as contiguous f32.
__global__ void widen_kernel(const void* p, Elem el, int64_t s0, int64_t s1, int64_t R, int64_t C,
                             float* dst) {
  const int64_t h = blockIdx.y;
  for (int64_t e = blockIdx.x * int64_t(kCmpThreads) + threadIdx.x; e < R * C;
       e += int64_t(gridDim.x) * kCmpThreads) {
    dst[h * R * C + e] = ld_any(p, el, h * s0 + (e / C) * s1 + e % C);
  }
}

// hidden[h][r][j] = relu(hidden + b1[h][j]), in place.
__global__ void relu_kernel(float* hidden, const float* b1, int64_t rows, int64_t Dh) {
  const int64_t h = blockIdx.y;
  for (int64_t e = blockIdx.x * int64_t(kCmpThreads) + threadIdx.x; e < rows * Dh;
       e += int64_t(gridDim.x) * kCmpThreads) {
    float* v = hidden + h * rows * Dh + e;
    *v = fmaxf(*v + b1[h * Dh + e % Dh], 0.0f);
  }
}

// out[row r, head h] = Y[h][r] + b2[h].
__global__ void scatter_kernel(const CmpArgs a, const float* Y, const float* b2) {
  const int64_t r = blockIdx.x, h = blockIdx.y;
  const CmpRow c = place_row(a, r);
  if (!c.ok) return;
  for (int64_t x = threadIdx.x; x < a.D; x += kCmpThreads) {
    st_any(a.out, a.out_el, c.b * a.os0 + c.row * a.os1 + h * a.os2 + x,
           Y[(h * a.rows + r) * a.D + x] + b2[h * a.D + x]);
  }
}

dim3 elementwise_grid(int64_t n, int64_t heads) {
  const int64_t blocks = (n + kCmpThreads - 1) / kCmpThreads;
  return dim3(static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096),
              static_cast<unsigned>(heads));
}

// Row-major C[h] = A[h] B[h]^T for every head h: A [rows, k], B [m, k], C [rows, m]; cuBLAS is
// column-major, so it computes C^T = B A^T.
Status gemm_abt(cublasHandle_t handle, const float* A, const float* B, float* C, int64_t rows,
                int64_t m, int64_t k, int64_t heads) {
  const float one = 1.0f, zero = 0.0f;
  return cublas_status(
      cublasSgemmStridedBatched(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(m), int(rows), int(k), &one,
                                B, int(k), m * k, A, int(k), rows * k, &zero, C, int(m), rows * m,
                                int(heads)),
      "compress (mlp): sgemm");
}

Status compress_mlp(const CompressProblem& pr, const CmpArgs& a) {
  const nsa_compress_params& p = pr.p;
  const MlpShape m{pr.Hkv, a.l, a.D, pr.Dh};
  // Workspace: the parameters as f32, then the rows' intermediates.
  DeviceWorkspace* ws = nullptr;
  NSA_RETURN_IF_ERROR(workspace(
      pr.workspace, size_t(mlp_weight_floats(m) + mlp_scratch_floats(m, a.rows)) * 4, &ws));
  float* weights = static_cast<float*>(ws->data());
  const cudaStream_t st = stream_of(pr);
  NSA_RETURN_IF_ERROR(widen_mlp(m, p.pos, p.w1, p.b1, p.w2, p.b2, weights, st));
  return mlp_rows(a, m, weights, weights + mlp_weight_floats(m), ws, st);
}

}  // namespace

Status compress(const CompressProblem& pr) {
  const nsa_compress_params& p = pr.p;
  CmpArgs a = cmp_args(p.cfg, p.x, p.out, p.cu_seqlens, p.num_seqs, pr.B, pr.T);
  if (a.rows == 0 || pr.Hkv == 0 || a.D == 0) return Status::ok();
  if (a.rows > INT32_MAX || pr.Hkv > 65535) {
    return error(NSA_ERR_UNSUPPORTED,
                 "nsa_compress: the CUDA backend launches one block per "
                 "compressed row (at most 2^31 - 1) and KV head (65535)");
  }
  if (p.kind == NSA_CMP_MLP) {
    if (int64_t(a.l) * a.D > INT32_MAX || pr.Dh > INT32_MAX) {
      return error(NSA_ERR_UNSUPPORTED,
                   "nsa_compress (mlp): cuBLAS takes int sizes: l * D and "
                   "Dh must be at most 2^31 - 1 on the cuda backend");
    }
    return compress_mlp(pr, a);
  }
  return launch_mean(a, pr.Hkv, stream_of(pr));
}

int64_t mlp_weight_floats(const MlpShape& m) {
  const int64_t L = int64_t(m.l) * m.D;
  return m.H * (L + m.Dh * L + m.Dh + m.D * m.Dh + m.D);
}

int64_t mlp_scratch_floats(const MlpShape& m, int64_t rows) {
  return m.H * rows * (int64_t(m.l) * m.D + m.Dh + m.D);
}

Status widen_mlp(const MlpShape& m, const nsa_tensor& pos, const nsa_tensor& w1,
                 const nsa_tensor& b1, const nsa_tensor& w2, const nsa_tensor& b2, float* dst,
                 cudaStream_t stream) {
  const int64_t L = int64_t(m.l) * m.D;
  // Each an [H, R, C] view (the 2-D biases: R = 1), widened to contiguous f32.
  struct Part {
    const nsa_tensor* t;
    int64_t rows, cols;
  } parts[5] = {{&pos, m.l, m.D}, {&w1, m.Dh, L}, {&b1, 1, m.Dh}, {&w2, m.D, m.Dh}, {&b2, 1, m.D}};
  for (const Part& part : parts) {
    const nsa_tensor& t = *part.t;
    const int64_t s1 = t.ndim == 3 ? t.stride[1] : 0;
    widen_kernel<<<elementwise_grid(part.rows * part.cols, m.H), kCmpThreads, 0, stream>>>(
        t.data, elem_of(t.dtype), t.stride[0], s1, part.rows, part.cols, dst);
    dst += m.H * part.rows * part.cols;
  }
  return launch_status("mlp parameters");
}

Status mlp_rows(const CmpArgs& a, const MlpShape& m, const float* weights, float* scratch,
                DeviceWorkspace* ws, cudaStream_t stream) {
  if (a.rows == 0) return Status::ok();
  const int64_t H = m.H, R = a.rows, L = int64_t(m.l) * m.D, Dh = m.Dh, D = m.D;
  cublasHandle_t handle = nullptr;
  NSA_RETURN_IF_ERROR(ws->cublas(stream, &handle));
  const float* pos = weights;
  const float* w1 = pos + H * L;
  const float* b1 = w1 + H * Dh * L;
  const float* w2 = b1 + H * Dh;
  const float* b2 = w2 + H * D * Dh;
  float* X = scratch;
  float* hidden = X + H * R * L;
  float* Y = hidden + H * R * Dh;
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>(H));
  gather_kernel<<<grid, kCmpThreads, 0, stream>>>(a, pos, X);
  NSA_RETURN_IF_ERROR(launch_status("compress (mlp)"));
  NSA_RETURN_IF_ERROR(gemm_abt(handle, X, w1, hidden, R, Dh, L, H));
  relu_kernel<<<elementwise_grid(R * Dh, H), kCmpThreads, 0, stream>>>(hidden, b1, R, Dh);
  NSA_RETURN_IF_ERROR(gemm_abt(handle, hidden, w2, Y, R, D, Dh, H));
  scatter_kernel<<<grid, kCmpThreads, 0, stream>>>(a, Y, b2);
  return launch_status("compress (mlp)");
}

Status launch_mean(const CmpArgs& a, int64_t heads, cudaStream_t stream) {
  if (a.rows == 0) return Status::ok();
  const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(heads));
  mean_kernel<<<grid, kCmpThreads, 0, stream>>>(a);
  return launch_status("compress (mean)");
}

}  // namespace nsa::cuda
