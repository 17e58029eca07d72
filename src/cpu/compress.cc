// The compression functions phi (SPEC.md section 5, paper Eq. 7) on the CPU, f32 accumulation.
// Work items are (sequence, KV head, chunk of kChunkBlocks compressed tokens): for mlp, one chunk
// shares every W1/W2 row that it reads, so the weights stream from memory once per chunk rather
// than once per compressed token.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common/backends.h"
#include "cpu/kernels.h"

namespace nsa::cpu {
namespace {

constexpr int64_t kChunkBlocks = 16;

int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

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
// per KV head.
void mlp_chunk(const CompressProblem& pr, const Chunk& c, float* f) {
  const nsa_compress_params& p = pr.p;
  const int64_t l = p.cfg.cmp_block, d = p.cfg.cmp_stride, D = pr.D, Dh = pr.Dh;
  const int64_t L = l * D, b = c.seq->batch, h = c.h, nb = c.count;
  float* flat = f;                             // [nb, L]
  float* hidden = flat + padded(kChunkBlocks * L);  // [nb, Dh]
  float* out = hidden + padded(kChunkBlocks * Dh);  // [nb, D]
  float* wbuf = out + padded(kChunkBlocks * D);     // one weight row: max(L, Dh)
  float* pbuf = wbuf + padded(std::max(L, Dh));     // [D] one row of P
  for (int64_t r = 0; r < l; ++r) {
    const float* pos = row_f32(p.pos, offset_of(p.pos, h, r), D, pbuf);
    for (int64_t k = 0; k < nb; ++k) {
      float* dst = flat + k * L + r * D;
      const int64_t tok = c.seq->start + (c.first + k) * d + r;
      load_row(p.x, offset_of(p.x, b, tok, h), D, dst);
      axpy(1.0f, pos, dst, D);
    }
  }
  for (int64_t u = 0; u < Dh; ++u) {
    const float* w1 = row_f32(p.w1, offset_of(p.w1, h, u), L, wbuf);
    const float b1 = load_f32(p.b1, offset_of(p.b1, h, u));
    for (int64_t k = 0; k < nb; ++k) {
      hidden[k * Dh + u] = std::max(b1 + dot(w1, flat + k * L, L), 0.0f);
    }
  }
  for (int64_t i = 0; i < D; ++i) {
    const float* w2 = row_f32(p.w2, offset_of(p.w2, h, i), Dh, wbuf);
    const float b2 = load_f32(p.b2, offset_of(p.b2, h, i));
    for (int64_t k = 0; k < nb; ++k) out[k * D + i] = b2 + dot(w2, hidden + k * Dh, Dh);
  }
  for (int64_t k = 0; k < nb; ++k) {
    store_row(p.out, offset_of(p.out, b, c.seq->cmp_start + c.first + k, h), out + k * D, D);
  }
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

  const int64_t D = pr.D, L = pr.p.cfg.cmp_block * D, Dh = pr.Dh;
  const bool mlp = pr.p.kind == NSA_CMP_MLP;
  // Allocated before the parallel region, which must not throw.
  const int64_t per_thread =
      mlp ? padded(kChunkBlocks * L) + padded(kChunkBlocks * Dh) + padded(kChunkBlocks * D) +
                padded(std::max(L, Dh)) + padded(D)
          : 2 * padded(D);
  std::vector<float> fbuf(static_cast<size_t>(threads * per_thread));

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
      if (mlp) {
        mlp_chunk(pr, c, f);
      } else {
        mean_chunk(pr, c, f, f + padded(D));
      }
    }
  }
  return Status::ok();
}

}  // namespace nsa::cpu
