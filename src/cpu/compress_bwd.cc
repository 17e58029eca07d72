// The backward of the compression functions phi (SPEC.md sections 5 and 6) on the CPU, f32
// accumulation. Every output element is summed by one owner in a fixed order, so the result is
// bitwise the same for any thread count (no atomics, no per-thread partials).
// mean: work items are (sequence, KV head, chunk of tokens); each dx row gathers the compressed
//   tokens whose complete block covers it.
// mlp: per KV head and chunk of compressed tokens, the hidden layer is recomputed and the
//   gradients are five GEMMs (OpenBLAS); dx rows gather from the chunk's d(flat) rows.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "cpu/ops.h"
#include "cpu/kernels.h"
#include "cpu/simd/tile_size.h"

namespace nsa::cpu {
namespace {

constexpr int64_t kTokenChunk = 256;  // mean: tokens per work item

// The complete blocks covering token t of a window whose block k starts at k*d: those with
// k*d <= t <= k*d + l - 1 and k < count (SPEC 3: block i is raw tokens i*d .. i*d + l - 1).
// Returns [lo, hi]; empty when lo > hi (t in no complete block).
void covering_blocks(int64_t t, int64_t l, int64_t d, int64_t count, int64_t* lo, int64_t* hi) {
  *lo = t >= l ? (t - l + d) / d : 0;  // ceil((t - l + 1) / d)
  *hi = std::min(count - 1, t / d);
}

// mean: dx[t] = sum over the complete blocks i covering t of dout[i] / l, in increasing i.
Status mean_backward(const CompressBwdProblem& pr, int threads) {
  const nsa_compress_bwd_params& p = pr.p;
  const int64_t l = p.cfg.cmp_block, d = p.cfg.cmp_stride, D = pr.D;
  // first_item[s]: the first work item of sequence s; items are (KV head, chunk of tokens).
  std::vector<int64_t> first_item, chunks;
  std::vector<float> scratch;
  int64_t floats = 0;
  try {
    first_item.assign(pr.seqs.size() + 1, 0);
    chunks.assign(pr.seqs.size(), 0);
    if (!mul_size(threads, 2 * round_up(D, 16), &floats)) throw std::bad_alloc();
    scratch.resize(static_cast<size_t>(floats));
  } catch (const std::bad_alloc&) {
    return error(NSA_ERR_OUT_OF_MEMORY, "compress_bwd: cannot allocate the mean scratch");
  }
  for (size_t s = 0; s < pr.seqs.size(); ++s) {
    chunks[s] = (pr.seqs[s].len + kTokenChunk - 1) / kTokenChunk;
    first_item[s + 1] = first_item[s] + chunks[s] * pr.Hkv;
  }
  const int64_t total = first_item.back();
  const float inv_l = 1.0f / static_cast<float>(l);

#pragma omp parallel num_threads(threads)
  {
    float* buf = scratch.data() + omp_get_thread_num() * 2 * round_up(D, 16);
    float* acc = buf + round_up(D, 16);
#pragma omp for schedule(static)
    for (int64_t w = 0; w < total; ++w) {
      const int64_t si =
          std::upper_bound(first_item.begin(), first_item.end(), w) - first_item.begin() - 1;
      const Sequence& seq = pr.seqs[si];
      const int64_t rem = w - first_item[si], h = rem / chunks[si];
      const int64_t t0 = rem % chunks[si] * kTokenChunk, t1 = std::min(t0 + kTokenChunk, seq.len);
      for (int64_t t = t0; t < t1; ++t) {
        fill(0.0f, acc, D);
        int64_t lo, hi;
        covering_blocks(t, l, d, seq.cmp_len, &lo, &hi);
        for (int64_t i = lo; i <= hi; ++i) {
          const int64_t off = offset_of(p.dout, seq.batch, seq.cmp_start + i, h);
          axpy(1.0f, row_f32(p.dout, off, D, buf), acc, D);
        }
        scale_by(inv_l, acc, D);
        store_row(p.dx, offset_of(p.dx, seq.batch, seq.start + t, h), acc, D);
      }
    }
  }
  return Status::ok();
}

// mlp, for one KV head: out = W2 hid + b2, hid = relu(pre), pre = W1 flat + b1,
// flat = flatten(X + P) (SPEC 5). With R compressed tokens per chunk as rows:
//   dW2 += dOut^T Hid, db2 += colsum(dOut), dHid = dOut W2, dPre = dHid * [pre > 0]
//   (relu'(0) = 0, as the reference), db1 += colsum(dPre), dW1 += dPre^T Flat,
//   dFlat = dPre W1, dpos += colsum(dFlat), dx[token] += dFlat rows of the blocks covering it.
// Chunks run in order and OpenBLAS splits a GEMM over rows and columns, never over the
// reduction, so each parameter gradient is summed in one fixed order whatever the thread counts.
struct MlpBuffers {
  std::vector<float> w1, w2, pos, b1;             // this head's parameters, f32, contiguous
  std::vector<float> dw1, dw2, db1, db2, dpos;    // this head's gradients
  std::vector<float> flat, pre, dpre, dout, acc;  // one chunk; flat is reused for dFlat
};

Status mlp_backward(const CompressBwdProblem& pr, int threads) {
  const nsa_compress_bwd_params& p = pr.p;
  const int64_t l = p.cfg.cmp_block, d = p.cfg.cmp_stride, D = pr.D, Dh = pr.Dh, L = l * D;
  const int64_t R = mlp_chunk_rows(pr.seqs);  // as the forward
  MlpBuffers m;
  try {
    m.w1.resize(Dh * L), m.w2.resize(D * Dh), m.pos.resize(L), m.b1.resize(Dh);
    m.dw1.resize(Dh * L), m.dw2.resize(D * Dh), m.db1.resize(Dh), m.db2.resize(D);
    m.dpos.resize(L);
    m.flat.resize(R * L), m.pre.resize(R * Dh), m.dpre.resize(R * Dh), m.dout.resize(R * D);
    // The token window of a chunk: (R - 1) * d + l tokens.
    m.acc.resize(((R - 1) * d + l) * D);
  } catch (const std::bad_alloc&) {
    return error(NSA_ERR_OUT_OF_MEMORY, "compress_bwd: cannot allocate the mlp buffers");
  }
  for (int64_t h = 0; h < pr.Hkv; ++h) {
    for (int64_t u = 0; u < Dh; ++u) load_row(p.w1, offset_of(p.w1, h, u), L, &m.w1[u * L]);
    for (int64_t i = 0; i < D; ++i) load_row(p.w2, offset_of(p.w2, h, i), Dh, &m.w2[i * Dh]);
    for (int64_t r = 0; r < l; ++r) load_row(p.pos, offset_of(p.pos, h, r), D, &m.pos[r * D]);
    load_row(p.b1, offset_of(p.b1, h), Dh, m.b1.data());
    for (std::vector<float>* g : {&m.dw1, &m.dw2, &m.db1, &m.db2, &m.dpos}) {
      std::fill(g->begin(), g->end(), 0.0f);
    }
    for (const Sequence& seq : pr.seqs) {
      const int64_t b = seq.batch;
      for (int64_t first = 0; first < seq.cmp_len; first += R) {
        const int64_t rows = std::min(R, seq.cmp_len - first);
        const bool last = first + rows == seq.cmp_len;
        // Compressed token i summarises raw tokens i*d .. i*d + l - 1 of its sequence (SPEC 3).
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t k = 0; k < rows; ++k) {
          for (int64_t r = 0; r < l; ++r) {
            float* dst = &m.flat[k * L + r * D];
            load_row(p.x, offset_of(p.x, b, seq.start + (first + k) * d + r, h), D, dst);
            axpy(1.0f, &m.pos[r * D], dst, D);
          }
          load_row(p.dout, offset_of(p.dout, b, seq.cmp_start + first + k, h), D, &m.dout[k * D]);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(Dh), int(L), 1.0f,
                    m.flat.data(), int(L), m.w1.data(), int(L), 0.0f, m.pre.data(), int(Dh));
        // pre becomes hid = relu(pre) in place: hid > 0 exactly where pre > 0.
        for (int64_t k = 0; k < rows; ++k) {
          for (int64_t u = 0; u < Dh; ++u) {
            m.pre[k * Dh + u] = std::max(m.pre[k * Dh + u] + m.b1[u], 0.0f);
          }
          for (int64_t i = 0; i < D; ++i) m.db2[i] += m.dout[k * D + i];
        }
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(D), int(Dh), int(rows), 1.0f,
                    m.dout.data(), int(D), m.pre.data(), int(Dh), 1.0f, m.dw2.data(), int(Dh));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(Dh), int(D), 1.0f,
                    m.dout.data(), int(D), m.w2.data(), int(Dh), 0.0f, m.dpre.data(), int(Dh));
        for (int64_t k = 0; k < rows; ++k) {
          for (int64_t u = 0; u < Dh; ++u) {
            // hid > 0 iff pre > 0; at the kink (pre = 0) the gradient is 0, as relu'(0) = 0.
            float& g = m.dpre[k * Dh + u];  // dHid until here
            g = m.pre[k * Dh + u] > 0.0f ? g : 0.0f;
            m.db1[u] += g;
          }
        }
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(Dh), int(L), int(rows), 1.0f,
                    m.dpre.data(), int(Dh), m.flat.data(), int(L), 1.0f, m.dw1.data(), int(L));
        // flat is spent: it now receives dFlat.
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(L), int(Dh), 1.0f,
                    m.dpre.data(), int(Dh), m.w1.data(), int(L), 0.0f, m.flat.data(), int(L));
        const float* dflat = m.flat.data();
        // dpos: column sums of dFlat, each column owned by one thread, rows in order.
        constexpr int64_t kCols = 256;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c0 = 0; c0 < L; c0 += kCols) {
          const int64_t n = std::min(kCols, L - c0);
          for (int64_t k = 0; k < rows; ++k) axpy(1.0f, &dflat[k * L + c0], &m.dpos[c0], n);
        }
        // dx over the chunk's token window [first*d, first*d + span): window token j gathers
        // the chunk's blocks covering it in increasing order, after what earlier chunks left in
        // acc for its first l - d tokens (carried below).
        const int64_t span = (rows - 1) * d + l, carried = first > 0 ? l - d : 0;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t j = 0; j < span; ++j) {
          float* a = &m.acc[j * D];
          if (j >= carried) fill(0.0f, a, D);
          int64_t lo, hi;
          covering_blocks(j, l, d, rows, &lo, &hi);
          for (int64_t k = lo; k <= hi; ++k) axpy(1.0f, &dflat[k * L + (j - k * d) * D], a, D);
          // Tokens before rows*d are covered by no later block: they are complete.
          if (last || j < rows * d) {
            store_row(p.dx, offset_of(p.dx, b, seq.start + first * d + j, h), a, D);
          }
        }
        if (!last) {  // the l - d tokens shared with the next chunk's first blocks
          std::memmove(m.acc.data(), &m.acc[rows * d * D], sizeof(float) * (l - d) * D);
        }
      }
      // Tokens in no complete block get 0 (all of them when the sequence has no block).
      const int64_t covered = seq.cmp_len > 0 ? (seq.cmp_len - 1) * d + l : 0;
      std::fill(m.acc.begin(), m.acc.begin() + D, 0.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int64_t t = covered; t < seq.len; ++t) {
        store_row(p.dx, offset_of(p.dx, b, seq.start + t, h), m.acc.data(), D);
      }
    }
    for (int64_t u = 0; u < Dh; ++u) store_row(p.dw1, offset_of(p.dw1, h, u), &m.dw1[u * L], L);
    for (int64_t i = 0; i < D; ++i) store_row(p.dw2, offset_of(p.dw2, h, i), &m.dw2[i * Dh], Dh);
    for (int64_t r = 0; r < l; ++r) store_row(p.dpos, offset_of(p.dpos, h, r), &m.dpos[r * D], D);
    store_row(p.db1, offset_of(p.db1, h), m.db1.data(), Dh);
    store_row(p.db2, offset_of(p.db2, h), m.db2.data(), D);
  }
  return Status::ok();
}

}  // namespace

Status compress_backward(const CompressBwdProblem& pr) {
  const int threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  if (pr.p.kind == NSA_CMP_MLP) return mlp_backward(pr, threads);
  return mean_backward(pr, threads);
}

}  // namespace nsa::cpu
