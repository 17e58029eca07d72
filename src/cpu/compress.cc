// The compression functions phi (SPEC.md section 5, paper Eq. 7) on the CPU, f32 accumulation.
// mean: work items are (sequence, KV head, chunk of kChunkBlocks compressed tokens). mlp: two
// GEMMs per chunk of compressed tokens (compress_mlp).
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <new>
#include <vector>

#include "cpu/ops.h"
#include "cpu/kernels.h"
#include "cpu/simd/tile_size.h"

namespace nsa::cpu {
namespace {

constexpr int64_t kChunkBlocks = 16;

struct Chunk {
  const Sequence* seq;
  int64_t h;      // KV head
  int64_t first;  // first compressed token of the chunk, inside the sequence
  int64_t count;  // compressed tokens in the chunk
};

// mean: the average of the block's l tokens.
void mean_chunk(const CompressProblem& pr, const Chunk& c, float* buf, float* acc) {
  const nsa_compress_params& p = pr.p;
  const int64_t l = p.cfg.cmp_block, d = p.cfg.cmp_stride, D = pr.D, b = c.seq->batch;
  for (int64_t i = c.first; i < c.first + c.count; ++i) {
    fill(0.0f, acc, D);
    // Compressed token i summarises raw tokens i*d .. i*d + l - 1 of its sequence (SPEC 3).
    for (int64_t r = 0; r < l; ++r) {
      axpy(1.0f, row_f32(p.x, offset_of(p.x, b, c.seq->start + i * d + r, c.h), D, buf), acc, D);
    }
    const float inv_l = 1.0f / static_cast<float>(l);
    scale_by(inv_l, acc, D);
    store_row(p.out, offset_of(p.out, b, c.seq->cmp_start + i, c.h), acc, D);
  }
}

// mlp: W2 relu(W1 flatten(X + P) + b1) + b2, flatten row-major over [l, D], one parameter set
// per KV head. Per (sequence, head) and chunk of R compressed tokens (mlp_chunk_rows): the
// chunk's flattened blocks [rows, l D] are gathered (in parallel), then hidden = flat W1^T and
// out = hidden W2^T are two sgemm calls (OpenBLAS, threaded on its own). OpenBLAS splits a GEMM
// over rows and columns, never over the reduction, so each element is summed in one fixed
// order whatever the thread counts.
Status compress_mlp(const CompressProblem& pr, int threads) {
  const nsa_compress_params& p = pr.p;
  const int64_t l = p.cfg.cmp_block, d = p.cfg.cmp_stride, D = pr.D, Dh = pr.Dh, L = l * D;
  const int64_t R = mlp_chunk_rows(pr.seqs);
  std::vector<float> w1, w2, flat, hidden, out, pos, b1, b2;
  try {
    w1.resize(static_cast<size_t>(Dh * L));
    w2.resize(static_cast<size_t>(D * Dh));
    flat.resize(static_cast<size_t>(R * L));
    hidden.resize(static_cast<size_t>(R * Dh));
    out.resize(static_cast<size_t>(R * D));
    pos.resize(static_cast<size_t>(L));
    b1.resize(static_cast<size_t>(Dh));
    b2.resize(static_cast<size_t>(D));
  } catch (const std::bad_alloc&) {
    return error(NSA_ERR_OUT_OF_MEMORY, "compress: cannot allocate the mlp buffers");
  }
  for (int64_t h = 0; h < pr.Hkv; ++h) {
    // This head's parameters as contiguous f32 (they may be bf16 or strided views).
    for (int64_t u = 0; u < Dh; ++u) load_row(p.w1, offset_of(p.w1, h, u), L, &w1[u * L]);
    for (int64_t i = 0; i < D; ++i) load_row(p.w2, offset_of(p.w2, h, i), Dh, &w2[i * Dh]);
    for (int64_t r = 0; r < l; ++r) load_row(p.pos, offset_of(p.pos, h, r), D, &pos[r * D]);
    for (int64_t u = 0; u < Dh; ++u) b1[u] = load_f32(p.b1, offset_of(p.b1, h, u));
    for (int64_t i = 0; i < D; ++i) b2[i] = load_f32(p.b2, offset_of(p.b2, h, i));
    for (const Sequence& seq : pr.seqs) {
      for (int64_t first = 0; first < seq.cmp_len; first += R) {
        const int64_t rows = std::min(R, seq.cmp_len - first);
        // Compressed token i summarises raw tokens i*d .. i*d + l - 1 of its sequence (SPEC 3).
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t k = 0; k < rows; ++k) {
          for (int64_t r = 0; r < l; ++r) {
            float* dst = &flat[k * L + r * D];
            load_row(p.x, offset_of(p.x, seq.batch, seq.start + (first + k) * d + r, h), D, dst);
            axpy(1.0f, &pos[r * D], dst, D);
          }
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(Dh), int(L), 1.0f,
                    flat.data(), int(L), w1.data(), int(L), 0.0f, hidden.data(), int(Dh));
        for (int64_t k = 0; k < rows; ++k) {
          for (int64_t u = 0; u < Dh; ++u) {
            hidden[k * Dh + u] = std::max(hidden[k * Dh + u] + b1[u], 0.0f);
          }
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(D), int(Dh), 1.0f,
                    hidden.data(), int(Dh), w2.data(), int(Dh), 0.0f, out.data(), int(D));
        for (int64_t k = 0; k < rows; ++k) {
          for (int64_t i = 0; i < D; ++i) out[k * D + i] += b2[i];
          store_row(p.out, offset_of(p.out, seq.batch, seq.cmp_start + first + k, h), &out[k * D],
                    D);
        }
      }
    }
  }
  return Status::ok();
}

}  // namespace

Status compress(const CompressProblem& pr) {
  const int threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  // first_item[s]: the first work item of sequence s; items are (KV head, chunk).
  std::vector<int64_t> first_item(pr.seqs.size() + 1, 0);
  std::vector<int64_t> chunks(pr.seqs.size());
  for (size_t i = 0; i < pr.seqs.size(); ++i) {
    chunks[i] = (pr.seqs[i].cmp_len + kChunkBlocks - 1) / kChunkBlocks;
    first_item[i + 1] = first_item[i] + chunks[i] * pr.Hkv;
  }
  const int64_t total = first_item.back();
  if (total == 0) return Status::ok();

  if (pr.p.kind == NSA_CMP_MLP) return compress_mlp(pr, threads);
  const int64_t D = pr.D;
  // Allocated before the parallel region, which must not throw.
  const int64_t per_thread = 2 * round_up(D, 16);
  int64_t floats = 0;
  std::vector<float> fbuf;
  try {
    if (!mul_size(threads, per_thread, &floats)) throw std::bad_alloc();
    fbuf.resize(static_cast<size_t>(floats));
  } catch (const std::bad_alloc&) {
    return error(NSA_ERR_OUT_OF_MEMORY, "compress: cannot allocate the mean scratch");
  }

#pragma omp parallel num_threads(threads)
  {
    float* f = fbuf.data() + omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
    for (int64_t w = 0; w < total; ++w) {
      const int64_t si =
          std::upper_bound(first_item.begin(), first_item.end(), w) - first_item.begin() - 1;
      const Sequence& seq = pr.seqs[si];
      const int64_t rem = w - first_item[si];
      Chunk c;
      c.seq = &seq;
      c.h = rem / chunks[si];
      c.first = rem % chunks[si] * kChunkBlocks;
      c.count = std::min(kChunkBlocks, seq.cmp_len - c.first);
      mean_chunk(pr, c, f, f + round_up(D, 16));
    }
  }
  return Status::ok();
}

}  // namespace nsa::cpu
