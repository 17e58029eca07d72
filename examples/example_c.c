/* example_c.c: Native Sparse Attention from C. A small random case: compress keys and values
 * with the mean compressor, run the forward pass, print a few outputs. Exits nonzero on failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "nsa/nsa.h"

/* Batch, tokens, query heads, KV heads (one GQA group of 4), key and value head dims. */
enum { B = 1, T = 256, HQ = 4, HKV = 1, DK = 64, DV = 32 };

/* Fills x[0..n) with uniform values in [lo, hi) from a fixed-seed generator, so runs repeat. */
static void fill(float* x, size_t n, float lo, float hi) {
  static uint32_t state = 42u;
  for (size_t i = 0; i < n; ++i) {
    state = state * 1664525u + 1013904223u;
    x[i] = lo + (hi - lo) * (float)(state >> 8) / 16777216.0f;
  }
}

/* A contiguous f32 descriptor of shape [d0, d1, d2, d3], or [d0, d1, d2] when d3 is 0. */
static nsa_tensor f32(float* data, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
  const int64_t shape[4] = {d0, d1, d2, d3};
  return nsa_tensor_contiguous(data, NSA_DTYPE_F32, d3 ? 4 : 3, shape);
}

int main(void) {
  nsa_config cfg;
  nsa_config_default(&cfg);                /* the paper's l=32, d=16, l'=64, n=16, w=512 */
  const int64_t tc = nsa_cmp_len(&cfg, T); /* compressed tokens: (256 - 32) / 16 + 1 = 15 */

  const size_t nq = B * T * HQ * DK, nk = B * T * HKV * DK, nv = B * T * HKV * DV, ng = B * T * HQ;
  const size_t nkc = B * tc * HKV * DK, nvc = B * tc * HKV * DV, no = B * T * HQ * DV;
  float* mem = malloc((nq + nk + nv + nkc + nvc + 3 * ng + no) * sizeof(float));
  nsa_context* ctx = NULL;
  if (mem == NULL || nsa_context_create(&ctx) != NSA_OK) {
    fprintf(stderr, "out of memory\n");
    free(mem);
    return 1;
  }
  float *q = mem, *k = q + nq, *v = k + nk, *gates = v + nv, *k_cmp = gates + 3 * ng;
  float *v_cmp = k_cmp + nkc, *o = v_cmp + nvc;
  fill(q, nq + nk + nv, -1.0f, 1.0f); /* q, k and v, which lie back to back */
  fill(gates, 3 * ng, 0.0f, 1.0f);    /* gate values, as a sigmoid would give */

  /* Compressed keys, then values: the mean of each block of l tokens, one block every d. */
  nsa_compress_params cp;
  nsa_compress_params_init(&cp);
  cp.cfg = cfg;
  cp.kind = NSA_CMP_MEAN;
  cp.x = f32(k, B, T, HKV, DK);
  cp.out = f32(k_cmp, B, tc, HKV, DK);
  nsa_status s = nsa_compress(ctx, &cp);
  if (s == NSA_OK) {
    cp.x = f32(v, B, T, HKV, DV);
    cp.out = f32(v_cmp, B, tc, HKV, DV);
    s = nsa_compress(ctx, &cp);
  }
  if (s == NSA_OK) {
    nsa_fwd_params p;
    nsa_fwd_params_init(&p); /* default config, every optional tensor absent */
    p.in.q = f32(q, B, T, HQ, DK);
    p.in.k = f32(k, B, T, HKV, DK);
    p.in.v = f32(v, B, T, HKV, DV);
    p.in.k_cmp = f32(k_cmp, B, tc, HKV, DK);
    p.in.v_cmp = f32(v_cmp, B, tc, HKV, DV);
    p.in.g_cmp = f32(gates, B, T, HQ, 0);
    p.in.g_slc = f32(gates + ng, B, T, HQ, 0);
    p.in.g_win = f32(gates + 2 * ng, B, T, HQ, 0);
    p.o = f32(o, B, T, HQ, DV);
    s = nsa_fwd(ctx, &p);
  }
  int rc = s != NSA_OK;
  if (rc) {
    fprintf(stderr, "nsa failed: %s: %s\n", nsa_status_name(s), nsa_last_error(ctx));
  } else {
    for (size_t i = 0; i < no; ++i) rc |= !isfinite(o[i]);
    const float* last = o + (size_t)(T - 1) * HQ * DV; /* o[0, T-1, 0, :] */
    printf("nsa %s (C): o[0, %d, 0, 0:4] = %.5f %.5f %.5f %.5f%s\n", nsa_version(), T - 1, last[0],
           last[1], last[2], last[3], rc ? " (non-finite values!)" : "");
  }
  nsa_context_destroy(ctx);
  free(mem);
  return rc;
}
