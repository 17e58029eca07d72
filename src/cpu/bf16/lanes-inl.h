// bf16 products with f32 accumulation for the NSA forward's heads-in-lanes kernels (the layouts
// of cpu/lanes-inl.h, with pairs of bf16 where those have f32), compiled twice by bf16/dot.cc
// after dot-inl.h (whose dot, round16 and NSA_BF16_ATTR it uses).
//
// Layouts (a pair is two bf16 in one 32-bit word, the lower element first; 16 heads per vector,
// GP a multiple of 16):
//   queries    qp [Dk2][GP]          word (i, h): dims 2i, 2i + 1 of head h, unscaled
//   K tiles    kp [Dk2][16] per tile  word (i, j): dims 2i, 2i + 1 of key j of the tile
//   V pairs    vp [keys / 2][ldv]    word (j, c): column c of keys 2j, 2j + 1 (ldv >= Dv,
//                                    a multiple of 16, zero past Dv)
//   P          s  [key][GP] f32; a pair of rows (2j, 2j + 1) becomes one row of words, written
//              over row 2j, just before P V uses it.
// A key whose pair partner lies outside the range [j0, j1) (an odd j0, an odd j1) is added in
// f32 from its row, so a key a position must not see never meets its weight (0 * NaN would).
//
// No include guard: included once per variant, inside the variant's namespace.

#if NSA_BF16_NATIVE
#define NSA_BF16_ATTR __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#else
#define NSA_BF16_ATTR __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#endif

// Rows [key * GP] of s scores: sa[key] = scale q_a . k_key for the keys of one block of KB
// keys of a tile; two positions (qb, sb not null) share each broadcast of a key pair.
template <int KB, bool kTwo>
NSA_BF16_ATTR static inline void lane_score_block(const uint32_t* qa, const uint32_t* qb,
                                                  int64_t GP, int64_t Dk2, const uint32_t* kt,
                                                  float scale, float* sa, float* sb) {
  __m512 a[KB], b[KB];
  for (int j = 0; j < KB; ++j) a[j] = b[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < Dk2; ++i) {
    const __m512i q0 = _mm512_load_si512(qa + i * GP);
    const __m512i q1 = kTwo ? _mm512_load_si512(qb + i * GP) : q0;
    const uint32_t* k = kt + i * 16;
    for (int j = 0; j < KB; ++j) {
      const __m512i kj = _mm512_set1_epi32(static_cast<int>(k[j]));
      a[j] = dot(a[j], q0, kj);
      if (kTwo) b[j] = dot(b[j], q1, kj);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int j = 0; j < KB; ++j) {
    _mm512_store_ps(sa + j * GP, _mm512_mul_ps(a[j], sc));
    if (kTwo) _mm512_store_ps(sb + j * GP, _mm512_mul_ps(b[j], sc));
  }
}

// Scores of one head vector for `tiles` tiles at kp: sa (and sb when qb is not null) get rows
// [0, 16 tiles), scaled by `scale` (the queries are exact bf16, so the scale comes after).
NSA_BF16_ATTR static void lane_scores(const uint32_t* qa, const uint32_t* qb, int64_t GP,
                                      int64_t Dk2, const uint32_t* kp, int64_t tiles, float scale,
                                      float* sa, float* sb) {
  for (int64_t t = 0; t < tiles; ++t) {
    const uint32_t* k = kp + t * 16 * Dk2;
    const int64_t r = t * 16;
    if (qb) {
      for (int j = 0; j < 16; j += 8) {
        lane_score_block<8, true>(qa, qb, GP, Dk2, k + j, scale, sa + (r + j) * GP,
                                  sb + (r + j) * GP);
      }
    } else {
      lane_score_block<16, false>(qa, nullptr, GP, Dk2, k, scale, sa + r * GP, nullptr);
    }
  }
}

// bf16 element e (0 or 1) of a pair word, as f32.
static inline float pair_elem(uint32_t w, int e) {
  const uint32_t bits = e ? (w & 0xFFFF0000u) : (w << 16);
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// o[c] += p[key] v[key][c] in f32 for one key of one position (a range's unpaired edge).
NSA_BF16_ATTR static void lane_edge(const float* p, int64_t GP, const uint32_t* vp, int64_t ldv,
                                    int64_t Dv, int64_t key, float* o) {
  const __m512 pk = _mm512_load_ps(p + key * GP);
  const uint32_t* v = vp + (key / 2) * ldv;
  for (int64_t c = 0; c < Dv; ++c) {
    const __m512 vc = _mm512_set1_ps(pair_elem(v[c], static_cast<int>(key & 1)));
    _mm512_store_ps(o + c * GP, _mm512_fmadd_ps(pk, vc, _mm512_load_ps(o + c * GP)));
  }
}

// Rows 2j and 2j + 1 of p, rounded to bf16, as one row of pairs written over row 2j.
NSA_BF16_ATTR static inline void pair_rows(float* p, int64_t GP, int64_t j) {
  float* lo = p + 2 * j * GP;
  const __m512i a = _mm512_cvtepu16_epi32(round16(_mm512_load_ps(lo)));
  const __m512i b = _mm512_cvtepu16_epi32(round16(_mm512_load_ps(lo + GP)));
  _mm512_store_si512(lo, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
}

// o[c] += sum over key pairs [j0, j1) of the pairs of p and of V, for CB columns from vp.
template <int CB, bool kTwo>
NSA_BF16_ATTR static inline void lane_out_block(const float* pa, const float* pb, int64_t GP,
                                                const uint32_t* vp, int64_t ldv, int64_t j0,
                                                int64_t j1, float* oa, float* ob) {
  __m512 a[CB], b[CB];
  for (int c = 0; c < CB; ++c) {
    a[c] = _mm512_load_ps(oa + c * GP);
    if (kTwo) b[c] = _mm512_load_ps(ob + c * GP);
  }
  for (int64_t j = j0; j < j1; ++j) {
    const __m512i p0 = _mm512_load_si512(pa + 2 * j * GP);
    const __m512i p1 = kTwo ? _mm512_load_si512(pb + 2 * j * GP) : p0;
    const uint32_t* v = vp + j * ldv;
    for (int c = 0; c < CB; ++c) {
      const __m512i vc = _mm512_set1_epi32(static_cast<int>(v[c]));
      a[c] = dot(a[c], p0, vc);
      if (kTwo) b[c] = dot(b[c], p1, vc);
    }
  }
  for (int c = 0; c < CB; ++c) {
    _mm512_store_ps(oa + c * GP, a[c]);
    if (kTwo) _mm512_store_ps(ob + c * GP, b[c]);
  }
}

// oa += pa V (and ob += pb V when pb is not null) over keys [j0, j1) of one head vector: p rows
// [key][GP] (probabilities in f32; the paired rows are overwritten), vp from key 0, o [Dv][GP].
NSA_BF16_ATTR static void lane_accumulate(float* pa, float* pb, int64_t GP, const uint32_t* vp,
                                          int64_t ldv, int64_t Dv, int64_t j0, int64_t j1,
                                          float* oa, float* ob) {
  if (j0 >= j1) return;
  if (j0 & 1) {  // the second key of a pair whose first is not in the range
    lane_edge(pa, GP, vp, ldv, Dv, j0, oa);
    if (pb) lane_edge(pb, GP, vp, ldv, Dv, j0, ob);
    ++j0;
  }
  if ((j1 & 1) && j0 < j1) {  // the first key of a pair whose second is not in the range
    lane_edge(pa, GP, vp, ldv, Dv, j1 - 1, oa);
    if (pb) lane_edge(pb, GP, vp, ldv, Dv, j1 - 1, ob);
    --j1;
  }
  const int64_t h0 = j0 / 2, h1 = j1 / 2;
  if (h0 >= h1) return;
  for (int64_t j = h0; j < h1; ++j) {
    pair_rows(pa, GP, j);
    if (pb) pair_rows(pb, GP, j);
  }
  int64_t c = 0;
  if (pb) {
    for (; c + 8 <= Dv; c += 8) {
      lane_out_block<8, true>(pa, pb, GP, vp + c, ldv, h0, h1, oa + c * GP, ob + c * GP);
    }
    for (; c < Dv; ++c) {
      lane_out_block<1, true>(pa, pb, GP, vp + c, ldv, h0, h1, oa + c * GP, ob + c * GP);
    }
  } else {
    for (; c + 16 <= Dv; c += 16) {
      lane_out_block<16, false>(pa, nullptr, GP, vp + c, ldv, h0, h1, oa + c * GP, nullptr);
    }
    for (; c < Dv; ++c) {
      lane_out_block<1, false>(pa, nullptr, GP, vp + c, ldv, h0, h1, oa + c * GP, nullptr);
    }
  }
}

// ---- Keys in lanes (forward_keys-inl.h's layouts, groups of up to 8 heads): the rows are
// stacked (position, head) queries read through row offsets, as the f32 kernels read them. ----

// out[h][16 v + k] = scale q_h . key 16 v + k, for HB rows from h0 and V tiles of kp: row h's
// query pair i is xT[i ld + roff[h]].
template <int HB, int V>
NSA_BF16_ATTR static inline void row_score_block(const uint32_t* xT, int64_t ld,
                                                 const int32_t* roff, int64_t h0,
                                                 const uint32_t* kp, int64_t Dk2, float scale,
                                                 float* out, int64_t ldo) {
  __m512 acc[HB][V];
  int64_t off[HB];
  for (int h = 0; h < HB; ++h) {
    off[h] = roff[h0 + h];
    for (int v = 0; v < V; ++v) acc[h][v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < Dk2; ++i) {
    __m512i kv[V];
    for (int v = 0; v < V; ++v) kv[v] = _mm512_load_si512(kp + v * 16 * Dk2 + i * 16);
    const uint32_t* x = xT + i * ld;
    for (int h = 0; h < HB; ++h) {
      const __m512i b = _mm512_set1_epi32(static_cast<int>(x[off[h]]));
      for (int v = 0; v < V; ++v) acc[h][v] = dot(acc[h][v], b, kv[v]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int h = 0; h < HB; ++h)
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(out + (h0 + h) * ldo + v * 16, _mm512_mul_ps(acc[h][v], sc));
}

// Register blocks as the f32 kernels take them: more rows for fewer tiles (16 accumulators where
// the rows allow), then smaller blocks for the rows left (decode's heads: a multiple of 4).
template <int V, int kMaxHB>
NSA_BF16_ATTR static void row_scores_v(const uint32_t* xT, int64_t ld, int64_t rows,
                                       const int32_t* roff, const uint32_t* kp, int64_t Dk2,
                                       float scale, float* out, int64_t ldo) {
  int64_t h0 = 0;
  for (; h0 + kMaxHB <= rows; h0 += kMaxHB)
    row_score_block<kMaxHB, V>(xT, ld, roff, h0, kp, Dk2, scale, out, ldo);
  if constexpr (kMaxHB > 8) {
    for (; h0 + 8 <= rows; h0 += 8)
      row_score_block<8, V>(xT, ld, roff, h0, kp, Dk2, scale, out, ldo);
  }
  if constexpr (kMaxHB > 4) {
    for (; h0 + 4 <= rows; h0 += 4)
      row_score_block<4, V>(xT, ld, roff, h0, kp, Dk2, scale, out, ldo);
  }
  for (; h0 + 2 <= rows; h0 += 2) row_score_block<2, V>(xT, ld, roff, h0, kp, Dk2, scale, out, ldo);
  for (; h0 < rows; ++h0) row_score_block<1, V>(xT, ld, roff, h0, kp, Dk2, scale, out, ldo);
}

// S [rows][ldo] = scale Q K^T over nt (1 to 4) tiles of kp ([Dk2][16] pairs each).
NSA_BF16_ATTR static void row_scores(const uint32_t* xT, int64_t ld, int64_t rows,
                                     const int32_t* roff, const uint32_t* kp, int64_t Dk2, int nt,
                                     float scale, float* out, int64_t ldo) {
  switch (nt) {
    case 1: return row_scores_v<1, 16>(xT, ld, rows, roff, kp, Dk2, scale, out, ldo);
    case 2: return row_scores_v<2, 8>(xT, ld, rows, roff, kp, Dk2, scale, out, ldo);
    case 3: return row_scores_v<3, 4>(xT, ld, rows, roff, kp, Dk2, scale, out, ldo);
    default: return row_scores_v<4, 4>(xT, ld, rows, roff, kp, Dk2, scale, out, ldo);
  }
}

// out[k] = the pair (x[2k], x[2k + 1]) rounded to bf16 for 2k < n (n even), whole vectors of 16
// words written (pp rows are 32 words): masked loads never read past x[n).
NSA_BF16_ATTR static inline void pairs_of(const float* x, int64_t n, uint32_t* out) {
  for (int64_t i = 0; i < n; i += 32) {
    const int64_t left = n - i;
    const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left >= 32   ? 0xFFFF
                         : left <= 16 ? 0
                                      : static_cast<__mmask16>((1u << (left - 16)) - 1);
    _mm512_storeu_si512(out + i / 2, to_pairs16(_mm512_maskz_loadu_ps(m0, x + i),
                                                _mm512_maskz_loadu_ps(m1, x + i + 16)));
  }
}

// o[h][c0 ..] += sum over pairs j < n2 of pp[h][j] . vp[j][c0 ..], HB rows from h0, CB column
// vectors.
template <int HB, int CB>
NSA_BF16_ATTR static inline void row_out_block(const uint32_t* pp, int64_t h0, int64_t n2,
                                               const uint32_t* vp, int64_t ldv, int64_t c0,
                                               float* o, int64_t ldo) {
  __m512 acc[HB][CB];
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < CB; ++c) acc[h][c] = _mm512_loadu_ps(o + (h0 + h) * ldo + c0 + c * 16);
  for (int64_t j = 0; j < n2; ++j) {
    __m512i vv[CB];
    for (int c = 0; c < CB; ++c) vv[c] = _mm512_loadu_si512(vp + j * ldv + c0 + c * 16);
    for (int h = 0; h < HB; ++h) {
      const __m512i b = _mm512_set1_epi32(static_cast<int>(pp[(h0 + h) * 32 + j]));
      for (int c = 0; c < CB; ++c) acc[h][c] = dot(acc[h][c], b, vv[c]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < CB; ++c) _mm512_storeu_ps(o + (h0 + h) * ldo + c0 + c * 16, acc[h][c]);
}

template <int HB>
NSA_BF16_ATTR static void row_out_rows(const uint32_t* pp, int64_t h0, int64_t n2,
                                       const uint32_t* vp, int64_t ldv, float* o, int64_t ldo) {
  int64_t c0 = 0;
  for (; c0 + 64 <= ldv; c0 += 64) row_out_block<HB, 4>(pp, h0, n2, vp, ldv, c0, o, ldo);
  for (; c0 < ldv; c0 += 16) row_out_block<HB, 1>(pp, h0, n2, vp, ldv, c0, o, ldo);
}

// Rows in blocks of 4, then 2 and 1 for the rest.
NSA_BF16_ATTR static void row_out(const uint32_t* pp, int64_t rows, int64_t n2, const uint32_t* vp,
                                  int64_t ldv, float* o, int64_t ldo) {
  int64_t h0 = 0;
  for (; h0 + 4 <= rows; h0 += 4) row_out_rows<4>(pp, h0, n2, vp, ldv, o, ldo);
  for (; h0 + 2 <= rows; h0 += 2) row_out_rows<2>(pp, h0, n2, vp, ldv, o, ldo);
  for (; h0 < rows; ++h0) row_out_rows<1>(pp, h0, n2, vp, ldv, o, ldo);
}

// o[h][c] += sum_{j in [j0, j1)} p[h][j] v[j][c] for h < rows: p rows [rows][ldp] of f32 weights
// (left as they are), vp pairs [keys / 2][ldv] from key 0, o rows [rows][ldo] (ldo >= ldv). An
// unpaired edge key is added in f32 (accumulate_row); the rest in groups of 64 keys, each row's
// weights paired into pp
// ([rows][32] words of scratch).
NSA_BF16_ATTR static void row_accumulate(const float* p, int64_t ldp, int64_t rows,
                                         const uint32_t* vp, int64_t ldv, int64_t j0, int64_t j1,
                                         float* o, int64_t ldo, uint32_t* pp) {
  if (j0 >= j1) return;
  if (j0 & 1) {
    for (int64_t h = 0; h < rows; ++h)
      accumulate_row(p + h * ldp, j0, j0 + 1, vp, ldv, o + h * ldo);
    ++j0;
  }
  if ((j1 & 1) && j0 < j1) {
    for (int64_t h = 0; h < rows; ++h)
      accumulate_row(p + h * ldp, j1 - 1, j1, vp, ldv, o + h * ldo);
    --j1;
  }
  for (int64_t k0 = j0; k0 < j1; k0 += 64) {
    const int64_t n = std::min<int64_t>(64, j1 - k0);
    for (int64_t h = 0; h < rows; ++h) pairs_of(p + h * ldp + k0, n, pp + h * 32);
    row_out(pp, rows, n / 2, vp + k0 / 2 * ldv, ldv, o, ldo);
  }
}

#undef NSA_BF16_ATTR
