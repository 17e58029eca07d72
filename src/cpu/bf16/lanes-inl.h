// bf16 products with f32 accumulation for the NSA forward's heads-in-lanes kernels (the layouts
// of cpu/lanes-inl.h, with pairs of bf16 where those have f32), compiled twice by bf16/dot.cc
// after dot-inl.h (whose dot, round16 and NSA_BF16_ATTR it uses).
//
// Layouts (a pair is two bf16 in one 32-bit word, the lower element first; 16 heads per vector,
// GP a multiple of 16):
//   queries    qp [Dk2][GP]          word (i, h): dims 2i, 2i + 1 of head h, unscaled
//   K tiles    kp [Dk2][16] per tile  word (i, j): dims 2i, 2i + 1 of key j of the tile
//   V pairs    vp [keys / 2][Dv]     word (j, c): column c of keys 2j, 2j + 1
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
NSA_BF16_ATTR static void lane_edge(const float* p, int64_t GP, const uint32_t* vp, int64_t Dv,
                                    int64_t key, float* o) {
  const __m512 pk = _mm512_load_ps(p + key * GP);
  const uint32_t* v = vp + (key / 2) * Dv;
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
                                                const uint32_t* vp, int64_t Dv, int64_t j0,
                                                int64_t j1, float* oa, float* ob) {
  __m512 a[CB], b[CB];
  for (int c = 0; c < CB; ++c) {
    a[c] = _mm512_load_ps(oa + c * GP);
    if (kTwo) b[c] = _mm512_load_ps(ob + c * GP);
  }
  for (int64_t j = j0; j < j1; ++j) {
    const __m512i p0 = _mm512_load_si512(pa + 2 * j * GP);
    const __m512i p1 = kTwo ? _mm512_load_si512(pb + 2 * j * GP) : p0;
    const uint32_t* v = vp + j * Dv;
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
                                          int64_t Dv, int64_t j0, int64_t j1, float* oa,
                                          float* ob) {
  if (j0 >= j1) return;
  if (j0 & 1) {  // the second key of a pair whose first is not in the range
    lane_edge(pa, GP, vp, Dv, j0, oa);
    if (pb) lane_edge(pb, GP, vp, Dv, j0, ob);
    ++j0;
  }
  if ((j1 & 1) && j0 < j1) {  // the first key of a pair whose second is not in the range
    lane_edge(pa, GP, vp, Dv, j1 - 1, oa);
    if (pb) lane_edge(pb, GP, vp, Dv, j1 - 1, ob);
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
      lane_out_block<8, true>(pa, pb, GP, vp + c, Dv, h0, h1, oa + c * GP, ob + c * GP);
    }
    for (; c < Dv; ++c) {
      lane_out_block<1, true>(pa, pb, GP, vp + c, Dv, h0, h1, oa + c * GP, ob + c * GP);
    }
  } else {
    for (; c + 16 <= Dv; c += 16) {
      lane_out_block<16, false>(pa, nullptr, GP, vp + c, Dv, h0, h1, oa + c * GP, nullptr);
    }
    for (; c < Dv; ++c) {
      lane_out_block<1, false>(pa, nullptr, GP, vp + c, Dv, h0, h1, oa + c * GP, nullptr);
    }
  }
}

#undef NSA_BF16_ATTR
