// bf16 products with f32 accumulation for the dense forward's tiles, written once and compiled
// twice by bf16/dot.cc: with the AVX512_BF16 instructions (NSA_BF16_NATIVE 1: vdpbf16ps,
// vcvtne2ps2bf16) and emulated with AVX-512F integer ops and FMAs (NSA_BF16_NATIVE 0), which run
// on AVX-512 CPUs that lack the extension, so the path is tested there too.
//
// A pair is two bf16 in one 32-bit word, the lower element first. vdpbf16ps adds to each f32
// lane the products of its two pairs: the odd elements' first, then the even ones', each a fused
// step rounded to nearest even (Intel SDM, VDPBF16PS). The product of two bf16 is exact in f32,
// so two FMAs in that order give the same bits; the instruction also treats subnormal inputs as
// zero and flushes subnormal results, which the emulation does not (it differs only there).
//
// No include guard: included once per variant, inside the variant's namespace. Only intrinsics
// and plain loops here: no inline function of a library, so nothing compiled for AVX-512 can be
// picked by the linker for another translation unit.

#if NSA_BF16_NATIVE
#define NSA_BF16_ATTR __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#else
#define NSA_BF16_ATTR __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#endif

// acc + (a.odd b.odd) then + (a.even b.even), per lane.
NSA_BF16_ATTR static inline __m512 dot(__m512 acc, __m512i a, __m512i b) {
#if NSA_BF16_NATIVE
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)),
                        _mm512_castsi512_ps(_mm512_and_si512(b, high)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
#endif
}

#if !NSA_BF16_NATIVE
// 16 f32 to bf16 as vcvtne2ps2bf16 rounds: nearest even, NaN to a quiet NaN, subnormals to zero.
NSA_BF16_ATTR static inline __m256i round_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i exp = _mm512_and_si512(bits, _mm512_set1_epi32(0x7F800000));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __mmask16 sub = _mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512());
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000)));
  r = _mm512_mask_mov_epi32(r, sub, _mm512_and_si512(bits, _mm512_set1_epi32(INT32_MIN)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
#endif

// 16 f32 to 16 bf16, rounded as vcvtneps2bf16 does.
NSA_BF16_ATTR static inline __m256i round16(__m512 x) {
#if NSA_BF16_NATIVE
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  return round_bf16(x);
#endif
}

// 32 f32 (lo, then hi) to 16 pairs: element order kept, x[2k] the lower half of word k.
NSA_BF16_ATTR static inline __m512i to_pairs16(__m512 lo, __m512 hi) {
#if NSA_BF16_NATIVE
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
#else
  return _mm512_inserti64x4(_mm512_castsi256_si512(round_bf16(lo)), round_bf16(hi), 1);
#endif
}

// out[k] = the pair (x[2k], x[2k + 1]) rounded to bf16, k < n / 2 (n a multiple of 32).
NSA_BF16_ATTR static void to_pairs(const float* x, int64_t n, uint32_t* out) {
  for (int64_t i = 0; i < n; i += 32) {
    _mm512_storeu_si512(out + i / 2,
                        to_pairs16(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i + 16)));
  }
}

// S[r][0, 64) = scale sum_i q[r][i] k[i][j] for r < rows (a multiple of 4): qp [rows][Dk2] pairs
// of dims, kt [Dk2][64] pairs (key j's dims 2i, 2i + 1 in word i 64 + j), s rows of 64.
NSA_BF16_ATTR static void scores(const uint32_t* qp, int64_t rows, int64_t Dk2, const uint32_t* kt,
                                 float scale, float* s) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    __m512 a[4][4];
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < 4; ++v) a[r][v] = _mm512_setzero_ps();
    const uint32_t* q = qp + r0 * Dk2;
    for (int64_t i = 0; i < Dk2; ++i) {
      __m512i k[4];
      for (int v = 0; v < 4; ++v) k[v] = _mm512_load_si512(kt + i * 64 + v * 16);
      for (int r = 0; r < 4; ++r) {
        const __m512i qb = _mm512_set1_epi32(static_cast<int>(q[r * Dk2 + i]));
        for (int v = 0; v < 4; ++v) a[r][v] = dot(a[r][v], qb, k[v]);
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < 4; ++v)
        _mm512_store_ps(s + (r0 + r) * 64 + v * 16, _mm512_mul_ps(a[r][v], sc));
  }
}

// O[r][c] += sum_j p[r][j] v[j][c] over key pairs j2 < nk2 for r < rows (a multiple of 4): pp
// [rows][32] pairs of probabilities, vt [32][DvP] pairs (keys 2 j2, 2 j2 + 1 of column c in word
// j2 DvP + c), o rows of DvP (a multiple of 16) floats.
NSA_BF16_ATTR static void accumulate(const uint32_t* pp, int64_t rows, int64_t nk2,
                                     const uint32_t* vt, int64_t DvP, float* o) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    int64_t c0 = 0;
    for (; c0 + 64 <= DvP; c0 += 64) {
      __m512 a[4][4];
      for (int r = 0; r < 4; ++r)
        for (int v = 0; v < 4; ++v) a[r][v] = _mm512_load_ps(o + (r0 + r) * DvP + c0 + v * 16);
      for (int64_t j = 0; j < nk2; ++j) {
        __m512i vv[4];
        for (int v = 0; v < 4; ++v) vv[v] = _mm512_loadu_si512(vt + j * DvP + c0 + v * 16);
        for (int r = 0; r < 4; ++r) {
          const __m512i pb = _mm512_set1_epi32(static_cast<int>(pp[(r0 + r) * 32 + j]));
          for (int v = 0; v < 4; ++v) a[r][v] = dot(a[r][v], pb, vv[v]);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int v = 0; v < 4; ++v) _mm512_store_ps(o + (r0 + r) * DvP + c0 + v * 16, a[r][v]);
    }
    for (; c0 < DvP; c0 += 16) {
      for (int r = 0; r < 4; ++r) {
        __m512 acc = _mm512_load_ps(o + (r0 + r) * DvP + c0);
        for (int64_t j = 0; j < nk2; ++j) {
          const __m512i pb = _mm512_set1_epi32(static_cast<int>(pp[(r0 + r) * 32 + j]));
          acc = dot(acc, pb, _mm512_loadu_si512(vt + j * DvP + c0));
        }
        _mm512_store_ps(o + (r0 + r) * DvP + c0, acc);
      }
    }
  }
}

// O[0][c] += sum_{j in [j0, j1)} p[j] v[j][c], p in f32, for one row: the keys a row sees on a
// tile's causal diagonal or window edge (its pair partner may be a key it must not read).
// o need not be aligned (decode.cc's partial outputs).
NSA_BF16_ATTR static void accumulate_row(const float* p, int64_t j0, int64_t j1, const uint32_t* vt,
                                         int64_t DvP, float* o) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t j = j0; j < j1; ++j) {
    const __m512 pb = _mm512_set1_ps(p[j]);
    const uint32_t* v = vt + (j / 2) * DvP;
    for (int64_t c = 0; c < DvP; c += 16) {
      const __m512i w = _mm512_loadu_si512(v + c);
      const __m512i e = (j & 1) ? _mm512_and_si512(w, high) : _mm512_slli_epi32(w, 16);
      _mm512_storeu_ps(o + c, _mm512_fmadd_ps(pb, _mm512_castsi512_ps(e), _mm512_loadu_ps(o + c)));
    }
  }
}

#undef NSA_BF16_ATTR
