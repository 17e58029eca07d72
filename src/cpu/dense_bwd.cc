// The backward of dense causal flash attention on the CPU (the baseline NSA's backward is measured
// against), FlashAttention-2's Algorithm 2 on a CPU core, with Highway SIMD and runtime dispatch.
//
// One work item is one query head h of one sequence. It packs its queries (pre-multiplied by the
// scale), dO, lse and D = rowsum(dO * O) once, then walks the key tiles (FA2's outer loop) and for
// each the query tiles that see it (inner loop), per (query tile, key tile):
//   S = (scale Q) K^T,  P = exp(S - lse),  dP = dO V^T,  dS = P * (dP - D),
//   dV_j += P^T dO,  dK_j += dS^T (scale Q),  dQ_i += dS K_j,
// five register-blocked products (4 rows x 4 vectors), so each pair costs exactly the five
// matmuls FlashAttention counts: nothing is recomputed. dK_j, dV_j stay in L1/L2 while the query
// tiles stream past; dQ of the head is an f32 accumulator owned by the item.
//
// No atomics and no thread-dependent order: FA2 adds dQ across thread blocks with atomics; here
// dQ has one owner (the item), and the G heads of a KV head write their dK, dV to separate f32
// buffers that a last pass sums in head order. Every number is computed by the same code in the
// same order whatever thread runs it, so results are bitwise identical for any thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <new>
#include <vector>

#include "cpu/ops.h"
#include "common/dtype.h"
#include "cpu/kernels.h"
#include "cpu/simd/tiles.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/dense_bwd.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;

// Internal linkage: every kernel names its own work types plainly (Packed, Dims, ...); the
// blocks the kernels share are in cpu/simd/.
namespace {

// Query and key tiles are kTileVecs vectors (64 positions with AVX-512): the S and dP blocks are
// then one 4-vector column block of the micro-kernel, and a 64 x 128 f32 tile is 32 KiB.
constexpr int64_t kTileVecs = 4;

// Writes n floats to row `pos` of head h of a [B, T, H, D] tensor (f32, or rounded to bf16).
void store_head_row(const nsa_tensor& t, int64_t b, int64_t pos, int64_t h, int64_t n,
                    const float* src) {
  cpu::store_row(t, offset_of(t, b, pos, h), src, n);
}

// C[M x N] (+)= A B with A[m][k] = a[m * am + k * ak] (so A may be a transposed tile) and
// B[k][n] = b[k * ldb + n]. M is a multiple of 4 and N of the vector length. Register block:
// 4 rows x 4 vectors = 16 accumulators (of 32 AVX-512 registers), 8 loads per 16 FMAs.
template <bool kAccumulate>
void gemm(float* HWY_RESTRICT c, int64_t ldc, const float* HWY_RESTRICT a, int64_t am, int64_t ak,
          const float* HWY_RESTRICT b, int64_t ldb, int64_t M, int64_t K, int64_t N) {
  const DF d;
  const int64_t L = hn::Lanes(d);
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* a0 = a + m0 * am;
    float* c0 = c + m0 * ldc;
    int64_t n0 = 0;
    for (; n0 + 4 * L <= N; n0 += 4 * L) {
#define NSA_INIT(r, x0, x1, x2, x3)                                             \
  auto x0 = kAccumulate ? hn::Load(d, c0 + r * ldc + n0) : hn::Zero(d);         \
  auto x1 = kAccumulate ? hn::Load(d, c0 + r * ldc + n0 + L) : hn::Zero(d);     \
  auto x2 = kAccumulate ? hn::Load(d, c0 + r * ldc + n0 + 2 * L) : hn::Zero(d); \
  auto x3 = kAccumulate ? hn::Load(d, c0 + r * ldc + n0 + 3 * L) : hn::Zero(d);
      NSA_INIT(0, x00, x01, x02, x03)
      NSA_INIT(1, x10, x11, x12, x13)
      NSA_INIT(2, x20, x21, x22, x23)
      NSA_INIT(3, x30, x31, x32, x33)
#undef NSA_INIT
          for (int64_t k = 0; k < K; ++k) {
        const float* bk = b + k * ldb + n0;
        const auto b0 = hn::Load(d, bk), b1 = hn::Load(d, bk + L);
        const auto b2 = hn::Load(d, bk + 2 * L), b3 = hn::Load(d, bk + 3 * L);
        const float* ak0 = a0 + k * ak;
#define NSA_ROW(r, x0, x1, x2, x3)          \
  {                                         \
    const auto s = hn::Set(d, ak0[r * am]); \
    x0 = hn::MulAdd(s, b0, x0);             \
    x1 = hn::MulAdd(s, b1, x1);             \
    x2 = hn::MulAdd(s, b2, x2);             \
    x3 = hn::MulAdd(s, b3, x3);             \
  }
        NSA_ROW(0, x00, x01, x02, x03)
        NSA_ROW(1, x10, x11, x12, x13) NSA_ROW(2, x20, x21, x22, x23) NSA_ROW(3, x30, x31, x32, x33)
#undef NSA_ROW
      }
#define NSA_STORE(r, x0, x1, x2, x3)           \
  hn::Store(x0, d, c0 + r * ldc + n0);         \
  hn::Store(x1, d, c0 + r * ldc + n0 + L);     \
  hn::Store(x2, d, c0 + r * ldc + n0 + 2 * L); \
  hn::Store(x3, d, c0 + r * ldc + n0 + 3 * L);
      NSA_STORE(0, x00, x01, x02, x03)
      NSA_STORE(1, x10, x11, x12, x13)
      NSA_STORE(2, x20, x21, x22, x23) NSA_STORE(3, x30, x31, x32, x33)
#undef NSA_STORE
    }
    // Columns left over (a head dim not a multiple of four vectors): one vector at a time.
    for (; n0 < N; n0 += L) {
      for (int64_t r = 0; r < 4; ++r) {
        auto x = kAccumulate ? hn::Load(d, c0 + r * ldc + n0) : hn::Zero(d);
        for (int64_t k = 0; k < K; ++k) {
          x = hn::MulAdd(hn::Set(d, a0[r * am + k * ak]), hn::Load(d, b + k * ldb + n0), x);
        }
        hn::Store(x, d, c0 + r * ldc + n0);
      }
    }
  }
}

// K and V of every (sequence, KV head) in f32 key tiles of BN positions aligned to the sequence
// start, in the layouts the products read as B (vector rows): K^T [Dk, BN] for S, K [BN, DkP]
// for dQ, V^T [Dv, BN] for dP. Tile `ti` of sequence `seq`, head hk is (first_tile[seq] + ti) *
// Hkv + hk. Positions past the sequence end are zero.
struct Packed {
  std::vector<int64_t> first_tile;  // per sequence, cumulative; also the dK/dV row base / BN
  float* kt = nullptr;
  float* kr = nullptr;
  float* vt = nullptr;
  int64_t BN = 0, Hkv = 0, Dk = 0, DkP = 0, Dv = 0;
  int64_t index(int64_t seq, int64_t ti, int64_t hk) const {
    return (first_tile[seq] + ti) * Hkv + hk;
  }
};

// Packs K and V of every sequence and KV head (see Packed), in parallel over tiles. Thread i
// transposes value rows in rows + i * stride (Dv floats, allocated by the caller: an exception
// must not leave the parallel region, it would terminate the process).
void pack(const DenseBwdProblem& pr, Packed& pk, int threads, float* rows, int64_t stride) {
  const nsa_dense_bwd_params& p = pr.p;
  const TileSource src =
      tile_source(p.k, p.v, pr, pr.seqs, pk.first_tile, /*cmp=*/false, /*head_major=*/false);
  auto dest = [&](int64_t i) {
    KVTile<float> dst;
    dst.keys = pk.BN;
    dst.kt = pk.kt + i * pr.Dk * pk.BN;
    dst.kr = pk.kr + i * pk.BN * pk.DkP;
    dst.ldk = pk.DkP;
    dst.vt = pk.vt + i * pr.Dv * pk.BN;
    return dst;
  };
  pack_kv_tiles(src, dest, rows, stride, threads);
}

// One thread's buffers, carved from one allocation made before the parallel region. Every
// buffer starts on a 64-byte boundary (aligned vector loads).
struct Work {
  float* q;    // [Lp, DkP] the head's queries times the scale; rows past the sequence zero
  float* d_o;  // [Lp, DvP] dO of the head; rows past the sequence zero
  float* dq;   // [Lp, DkP] dQ / scale, accumulated over key tiles
  float* lse;  // [Lp] the forward's lse; +inf past the sequence, so P = 0 there
  float* dd;   // [Lp] D = rowsum(dO * O)
  float* s;    // [BM, BN] P
  float* dp;   // [BM, BN] dP, then dS
  float* dk;   // [BN, DkP] dK_j of the current key tile
  float* dv;   // [BN, DvP] dV_j of the current key tile
  float* o;    // [DvP] one row of O
};

// Sizes shared by the items.
struct Dims {
  int64_t BM, BN, Dk, DkP, Dv, DvP;
};

// P = exp(S - lse) and dS = P * (dP - D) for one (query tile, key tile); on tiles that cross
// the causal diagonal, the window's edge or the sequence end, the keys a row must not see get
// P = dS = 0 (set, not multiplied, so a masked key's values never reach the row).
void softmax_grad(const Work& w, const Dims& dm, int64_t q0, int64_t k0, int64_t len,
                  int32_t window) {
  const DF d;
  const int64_t L = hn::Lanes(d), BN = dm.BN;
  const bool edge = k0 + BN - 1 > q0 || k0 + BN > len || (window > 0 && q0 + dm.BM - window > k0);
  for (int64_t r = 0; r < dm.BM; ++r) {
    float* s = w.s + r * BN;
    float* dp = w.dp + r * BN;
    const auto vl = hn::Set(d, w.lse[q0 + r]), vd = hn::Set(d, w.dd[q0 + r]);
    for (int64_t c = 0; c < BN; c += L) {
      const auto pc = hn::Exp(d, hn::Sub(hn::Load(d, s + c), vl));
      hn::Store(pc, d, s + c);
      hn::Store(hn::Mul(pc, hn::Sub(hn::Load(d, dp + c), vd)), d, dp + c);
    }
    if (!edge) continue;
    const int64_t qpos = q0 + r;
    for (int64_t j = 0; j < BN; ++j) {
      const int64_t pos = k0 + j;
      if (pos >= len || pos > qpos || (window > 0 && pos <= qpos - window)) s[j] = dp[j] = 0.0f;
    }
  }
}

// Work item: query head h of sequence seq_index. Writes dq of its rows and this head's share of
// dK, dV to pdk/pdv (rows base .. base + len of the head's slice).
void head_item(const DenseBwdProblem& pr, const Packed& pk, const Dims& dm, int64_t seq_index,
               int64_t h, float* pdk, float* pdv, const Work& w) {
  const nsa_dense_bwd_params& p = pr.p;
  const Sequence& seq = pr.seqs[seq_index];
  const int64_t len = seq.len, b = seq.batch, hk = h / pr.G;
  const int64_t BM = dm.BM, BN = dm.BN, Dk = dm.Dk, DkP = dm.DkP, Dv = dm.Dv, DvP = dm.DvP;
  const int64_t Lp = round_up(len, BM);
  std::fill(w.q, w.q + Lp * DkP, 0.0f);
  std::fill(w.d_o, w.d_o + Lp * DvP, 0.0f);
  std::fill(w.dq, w.dq + Lp * DkP, 0.0f);
  std::fill(w.lse, w.lse + Lp, HUGE_VALF);
  std::fill(w.dd, w.dd + Lp, 0.0f);
  const float* lse = static_cast<const float*>(p.lse.data);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t tok = seq.start + t;
    float* qr = w.q + t * DkP;
    copy_row(p.q, b, tok, h, Dk, qr);
    for (int64_t c = 0; c < Dk; ++c) qr[c] *= p.scale;
    float* dor = w.d_o + t * DvP;
    copy_row(p.d_o, b, tok, h, Dv, dor);
    copy_row(p.o, b, tok, h, Dv, w.o);
    float D = 0.0f;  // FA2's D_i = rowsum(dO_i * O_i), from the forward's O as stored
    for (int64_t c = 0; c < Dv; ++c) D += dor[c] * w.o[c];
    w.dd[t] = D;
    w.lse[t] = lse[offset_of(p.lse, b, tok, h)];
  }

  const int64_t base = pk.first_tile[seq_index] * BN;
  for (int64_t k0 = 0; k0 < len; k0 += BN) {
    const int64_t ti = k0 / BN, nk = std::min(BN, len - k0);
    const int64_t tile = pk.index(seq_index, ti, hk);
    const float* kt = pk.kt + tile * Dk * BN;
    const float* kr = pk.kr + tile * BN * DkP;
    const float* vt = pk.vt + tile * Dv * BN;
    std::fill(w.dk, w.dk + BN * DkP, 0.0f);
    std::fill(w.dv, w.dv + BN * DvP, 0.0f);
    // Query rows that see some key of the tile: k0 .. (window ? last key + window - 1 : len - 1).
    const int64_t q_end = p.window > 0 ? std::min<int64_t>(len, k0 + nk - 1 + p.window) : len;
    for (int64_t q0 = k0 / BM * BM; q0 < q_end; q0 += BM) {
      const float* qi = w.q + q0 * DkP;
      const float* doi = w.d_o + q0 * DvP;
      gemm<false>(w.s, BN, qi, DkP, 1, kt, BN, BM, Dk, BN);    // S = (scale Q) K^T
      gemm<false>(w.dp, BN, doi, DvP, 1, vt, BN, BM, Dv, BN);  // dP = dO V^T
      softmax_grad(w, dm, q0, k0, len, p.window);
      gemm<true>(w.dv, DvP, w.s, 1, BN, doi, DvP, BN, BM, DvP);  // dV_j += P^T dO
      gemm<true>(w.dk, DkP, w.dp, 1, BN, qi, DkP, BN, BM, DkP);  // dK_j += dS^T (scale Q)
      gemm<true>(w.dq + q0 * DkP, DkP, w.dp, BN, 1, kr, DkP, BM, BN, DkP);  // dQ_i += dS K_j
    }
    float* dk_out = pdk + ((h * pk.first_tile.back()) * BN + base + k0) * DkP;
    float* dv_out = pdv + ((h * pk.first_tile.back()) * BN + base + k0) * DvP;
    std::copy(w.dk, w.dk + nk * DkP, dk_out);
    std::copy(w.dv, w.dv + nk * DvP, dv_out);
  }
  for (int64_t t = 0; t < len; ++t) {
    float* dq = w.dq + t * DkP;
    for (int64_t c = 0; c < Dk; ++c) dq[c] *= p.scale;  // dQ = scale dS K
    store_head_row(p.dq, b, seq.start + t, h, Dk, dq);
  }
}

// dk, dv = the heads' shares summed in head order g = 0 .. G-1 (fixed: thread-count independent),
// in place in head 0's share (scratch; 0 + x is x, so this is the sum from zero).
void reduce_heads(const DenseBwdProblem& pr, const Packed& pk, const Dims& dm, float* pdk,
                  float* pdv, int threads) {
  const nsa_dense_bwd_params& p = pr.p;
  const int64_t rows = pk.first_tile.back() * dm.BN;  // rows of one head's slice
  const int64_t n = rows * pr.Hkv;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = i / pr.Hkv, hk = i % pr.Hkv;
    const int64_t seq_index = sequence_of_tile(pk.first_tile, row / dm.BN);
    const Sequence& seq = pr.seqs[seq_index];
    const int64_t t = row - pk.first_tile[seq_index] * dm.BN;
    if (t >= seq.len) continue;  // the padding of the sequence's last tile
    for (int pass = 0; pass < 2; ++pass) {
      const int64_t D = pass == 0 ? dm.Dk : dm.Dv, DP = pass == 0 ? dm.DkP : dm.DvP;
      float* part = pass == 0 ? pdk : pdv;
      float* acc = part + (hk * pr.G * rows + row) * DP;
      for (int64_t g = 1; g < pr.G; ++g) {
        const float* src = part + ((hk * pr.G + g) * rows + row) * DP;
        for (int64_t c = 0; c < D; ++c) acc[c] += src[c];
      }
      store_head_row(pass == 0 ? p.dk : p.dv, seq.batch, seq.start + t, hk, D, acc);
    }
  }
}

}  // namespace

// Returns false when the scratch cannot be allocated.
bool DenseBackward(const DenseBwdProblem& pr) {
  const DF d;
  const int64_t L = hn::Lanes(d), BN = kTileVecs * L;
  const Dims dm{BN, BN, pr.Dk, round_up(pr.Dk, L), pr.Dv, round_up(pr.Dv, L)};
  const int threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  Packed pk;
  pk.BN = BN;
  pk.Hkv = pr.Hkv;
  pk.Dk = pr.Dk;
  pk.DkP = dm.DkP;
  pk.Dv = pr.Dv;
  pk.first_tile.push_back(0);
  int64_t max_len = 0;
  for (const Sequence& seq : pr.seqs) {
    pk.first_tile.push_back(pk.first_tile.back() + (seq.len + BN - 1) / BN);
    max_len = std::max(max_len, seq.len);
  }
  const int64_t tiles = pk.first_tile.back() * pr.Hkv, rows = pk.first_tile.back() * BN;
  const int64_t Lp = round_up(max_len, BN);
  const int64_t sizes[] = {Lp * dm.DkP, Lp * dm.DvP, Lp * dm.DkP, Lp,          Lp,
                           BN * BN,     BN * BN,     BN * dm.DkP, BN * dm.DvP, dm.DvP};
  int64_t per_thread = 0;
  for (int64_t size : sizes) per_thread += round_up(size, 16);
  // Every buffer is allocated before the first parallel region and the first output write.
  int64_t kv_floats = 0, part_floats = 0, buf_floats = 0;
  if (!mul_size(tiles * BN, pr.Dk + dm.DkP + pr.Dv, &kv_floats) ||
      !mul_size(pr.Hq * rows, dm.DkP + dm.DvP, &part_floats) ||
      !mul_size(threads, per_thread, &buf_floats)) {
    return false;
  }
  const auto kv = hwy::AllocateAligned<float>(static_cast<size_t>(kv_floats));
  // Each query head's share of dK and dV (summed by reduce_heads).
  const auto parts = hwy::AllocateAligned<float>(static_cast<size_t>(part_floats));
  const auto buf = hwy::AllocateAligned<float>(static_cast<size_t>(buf_floats));
  if (!kv || !parts || !buf) return false;
  pk.kt = kv.get();
  pk.kr = pk.kt + tiles * pr.Dk * BN;
  pk.vt = pk.kr + tiles * BN * dm.DkP;
  float* pdk = parts.get();
  float* pdv = pdk + pr.Hq * rows * dm.DkP;
  struct Item {
    int64_t seq, h;
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < static_cast<int64_t>(pr.seqs.size()); ++s) {
    for (int64_t h = 0; h < pr.Hq; ++h) items.push_back({s, h});
  }
  // Longest sequences first: the items' costs grow as len^2, and dynamic scheduling then ends
  // with the cheap ones. Ties keep the items' order; a strict total order makes std::sort give
  // std::stable_sort's result without its temporary buffer (whose allocation may fail).
  std::sort(items.begin(), items.end(), [&](const Item& x, const Item& y) {
    const int64_t lx = pr.seqs[x.seq].len, ly = pr.seqs[y.seq].len;
    return lx != ly ? lx > ly : (x.seq != y.seq ? x.seq < y.seq : x.h < y.h);
  });
  // The packing's value row: the thread's last buffer (w.o, DvP >= Dv floats), not yet in use.
  pack(pr, pk, threads, buf.get() + per_thread - round_up(dm.DvP, 16), per_thread);
  const int64_t n = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(threads)
  {
    float* f = buf.get() + omp_get_thread_num() * per_thread;
    auto take = [&f](int64_t count) {
      float* at = f;
      f += round_up(count, 16);
      return at;
    };
    Work w;
    w.q = take(sizes[0]);
    w.d_o = take(sizes[1]);
    w.dq = take(sizes[2]);
    w.lse = take(sizes[3]);
    w.dd = take(sizes[4]);
    w.s = take(sizes[5]);
    w.dp = take(sizes[6]);
    w.dk = take(sizes[7]);
    w.dv = take(sizes[8]);
    w.o = take(sizes[9]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) head_item(pr, pk, dm, items[i].seq, items[i].h, pdk, pdv, w);
  }
  reduce_heads(pr, pk, dm, pdk, pdv, threads);
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace nsa::cpu {

HWY_EXPORT(DenseBackward);

Status dense_backward(const DenseBwdProblem& problem) {
  // Allocation happens before the parallel regions and the first output write: a failure
  // (false, or a vector's bad_alloc) leaves the outputs untouched.
  bool ok = false;
  try {
    ok = HWY_DYNAMIC_DISPATCH(DenseBackward)(problem);
  } catch (const std::bad_alloc&) {
    ok = false;
  }
  if (!ok) {
    return error(NSA_ERR_OUT_OF_MEMORY, "dense backward: cannot allocate the scratch buffers");
  }
  return Status::ok();
}

}  // namespace nsa::cpu
#endif
