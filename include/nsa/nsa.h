/*
 * nsa.h: the public C API of nsa, a library of Native Sparse Attention
 * (Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable
 * Sparse Attention", arXiv 2502.11089).
 *
 * What is computed is fixed by docs/SPEC.md (the contract); this header says how to ask, and which
 * calls are valid: every rule the library checks is stated here, next to its call or in the
 * "Tensors" section, with the status a violation returns.
 *
 * Shape letters, used in every comment below:
 *   B batch, T tokens, Hq query heads, Hkv key/value heads (G = Hq / Hkv), Dk query/key head dim,
 *   Dv value head dim, Tc compressed tokens (T >= l ? (T - l) / d + 1 : 0), n = slc_count,
 *   S packed sequences (variable-length mode), or the rows of a decode step.
 *
 * Conventions:
 *   - Every call takes an nsa_context, which holds the backend choice, the thread count and the
 *     last error message. There is no global state: two contexts never interact.
 *   - Every call returns an nsa_status. On error it writes nothing to any output, leaves a cache
 *     as it was, and stores a message naming the offending argument in the context
 *     (nsa_last_error).
 *   - A NULL ctx is NSA_ERR_NULL_POINTER (no message is stored), except for nsa_config_validate
 *     and nsa_cmp_seqlens, which accept it. A NULL params pointer is NSA_ERR_NULL_POINTER.
 *   - Tensors are described, not owned: nsa_tensor is a data pointer, a dtype, a shape and element
 *     strides. Layout is [B, T, H, D] with the last dimension contiguous; the other strides are
 *     free, so views into a larger buffer (a KV cache) are legal. Rules: "Tensors" below.
 *   - A tensor whose data pointer is NULL is "absent"; optional arguments may be absent.
 *   - All sizes, strides and offsets are 64-bit.
 *   - A call with nothing to compute (B, T or S = 0) is checked like any other.
 *   - When several arguments are wrong, any of their errors may be reported: the order of the
 *     checks is not a promise, except where a call states one.
 */
#ifndef NSA_NSA_H_
#define NSA_NSA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(NSA_BUILDING_SHARED)
#define NSA_API __declspec(dllexport)
#elif defined(__GNUC__)
#define NSA_API __attribute__((visibility("default")))
#else
#define NSA_API
#endif

#define NSA_VERSION_MAJOR 0
#define NSA_VERSION_MINOR 2
#define NSA_VERSION_PATCH 0

/* ---------------------------------------------------------------------------------------------
 * Status codes and errors
 * ------------------------------------------------------------------------------------------- */

typedef enum nsa_status {
  NSA_OK = 0,
  NSA_ERR_NULL_POINTER = 1,     /* a required pointer (context, params, tensor data) is NULL */
  NSA_ERR_INVALID_CONFIG = 2,   /* an nsa_config field is out of range */
  NSA_ERR_INVALID_SHAPE = 3,    /* a rank or size does not match the others, is negative, or is
                                   too large (a view's span, a cache's size, its capacity) */
  NSA_ERR_INVALID_STRIDE = 4,   /* a negative stride, a non-unit inner stride, or an output view
                                   that overlaps itself */
  NSA_ERR_INVALID_DTYPE = 5,    /* a dtype that this argument does not accept */
  NSA_ERR_INVALID_SEQLENS = 6,  /* num_seqs < 1, or cu_seqlens does not start at 0, decreases, or
                                   does not end at T */
  NSA_ERR_INVALID_INDEX = 7,    /* a caller-supplied selection index is out of range, or a cache
                                   sequence number is out of range or repeated */
  NSA_ERR_INVALID_ARGUMENT = 8, /* any other bad argument (unknown enum value, aliasing, ...) */
  NSA_ERR_UNSUPPORTED = 9,      /* valid, but the chosen backend cannot do it (yet) */
  NSA_ERR_OUT_OF_MEMORY = 10,
  NSA_ERR_INTERNAL = 11
} nsa_status;

/* A static, human-readable name of a status code ("NSA_ERR_INVALID_SHAPE"). Never NULL. */
NSA_API const char* nsa_status_name(nsa_status status);

/* ---------------------------------------------------------------------------------------------
 * Context
 * ------------------------------------------------------------------------------------------- */

typedef enum nsa_backend {
  NSA_BACKEND_AUTO = 0, /* the fastest backend available for the call */
  NSA_BACKEND_REF = 1,  /* the float64 reference (src/ref): slow, always built, the oracle */
  NSA_BACKEND_CPU = 2,  /* the CPU kernels (src/cpu) */
  NSA_BACKEND_CUDA = 3  /* the CUDA kernels (src/cuda): device pointers, see nsa_cuda.h */
} nsa_backend;

typedef struct nsa_context nsa_context;

/* Creates a context with backend AUTO and the default thread count (OpenMP's).
 * out NULL: NSA_ERR_NULL_POINTER. */
NSA_API nsa_status nsa_context_create(nsa_context** out);
/* Destroys a context; NULL is a no-op. */
NSA_API void nsa_context_destroy(nsa_context* ctx);

/* A value outside the enum: NSA_ERR_INVALID_ARGUMENT; a backend not available here
 * (nsa_backend_available() == 0; CUDA: not built, or no device): NSA_ERR_UNSUPPORTED. Either way
 * the context keeps its backend. */
NSA_API nsa_status nsa_context_set_backend(nsa_context* ctx, nsa_backend backend);
NSA_API nsa_backend nsa_context_backend(const nsa_context* ctx);
/* n >= 1 threads; 0 restores the default; n < 0 or n > NSA_MAX_THREADS: NSA_ERR_INVALID_ARGUMENT
 * (OpenMP cannot be asked for an unbounded team without risking the process). */
#define NSA_MAX_THREADS 1024
NSA_API nsa_status nsa_context_set_num_threads(nsa_context* ctx, int32_t n);
NSA_API int32_t nsa_context_num_threads(const nsa_context* ctx);

/* Arithmetic for bf16 inputs on the CPU backend: nsa_dense_fwd, nsa_fwd and nsa_prefill when q
 * and every K/V tensor are bf16, decode with a bf16 cache and bf16 q; nsa_bwd is f32 whatever
 * the setting. The NSA selection comes from f32 softmax weights (it changes only at near-ties).
 *   AUTO      NATIVE where the CPU has AVX512_BF16, F32 elsewhere (the default);
 *   F32       inputs widened to f32 (exact), f32 products and sums;
 *   NATIVE    bf16 products with f32 accumulation (vdpbf16ps): twice the f32 rate. QK^T is as
 *             exact as F32 (bf16 products are exact in f32); the softmax weights are rounded to
 *             bf16 for P V, which moves an output by at most 2^-8 max|v| (README "bf16
 *             arithmetic");
 *   EMULATED  NATIVE's arithmetic with AVX-512F instructions, for testing that path on CPUs
 *             without AVX512_BF16 (the same bits except where a subnormal number meets the
 *             instruction's flush to zero); slower than F32.
 * A value outside the enum: NSA_ERR_INVALID_ARGUMENT; NATIVE or EMULATED on a CPU that cannot run
 * it (nsa_bf16_math_available() == 0): NSA_ERR_UNSUPPORTED. Either way the context keeps its
 * setting. The REF backend computes in float64 whatever the setting. */
typedef enum nsa_bf16_math {
  NSA_BF16_MATH_AUTO = 0,
  NSA_BF16_MATH_F32 = 1,
  NSA_BF16_MATH_NATIVE = 2,
  NSA_BF16_MATH_EMULATED = 3
} nsa_bf16_math;
NSA_API nsa_status nsa_context_set_bf16_math(nsa_context* ctx, nsa_bf16_math math);
NSA_API nsa_bf16_math nsa_context_bf16_math(const nsa_context* ctx);
/* 1 when this CPU runs `math` (AUTO and F32 always), else 0. */
NSA_API int32_t nsa_bf16_math_available(nsa_bf16_math math);
/* What AUTO resolves to on this CPU: NSA_BF16_MATH_NATIVE or NSA_BF16_MATH_F32. */
NSA_API nsa_bf16_math nsa_bf16_math_auto(void);

/* Per-stage timing of the forward and the backward, for benchmarks. Off by default: when on,
 * each nsa_fwd / nsa_bwd on the context records where its time went (a few clock reads per query
 * position and KV head). */
typedef struct nsa_fwd_profile {
  /* Thread-seconds, summed over the threads that ran each stage (SPEC 4 steps). */
  double pack_s;    /* converting K/V to the kernels' f32 tiles (once per call) */
  double cmp_s;     /* step 1: compressed attention */
  double scores_s;  /* step 2: group-summed block scores (the overhead over plain cmp attention) */
  double topn_s;    /* step 3: top-n selection */
  double slc_s;     /* step 4: selected attention */
  double win_s;     /* step 5: window attention */
  double combine_s; /* step 6: gates and stores */
  double wall_s;    /* wall-clock seconds of the call */
} nsa_fwd_profile;
/* Any nonzero `on` turns profiling on. */
NSA_API nsa_status nsa_context_set_profiling(nsa_context* ctx, int32_t on);
/* The profile of the last successful nsa_fwd on ctx with profiling on (zeros before one).
 * ctx or out NULL: NSA_ERR_NULL_POINTER (likewise nsa_context_bwd_profile). */
NSA_API nsa_status nsa_context_fwd_profile(const nsa_context* ctx, nsa_fwd_profile* out);

/* Where the time of the CPU backward (nsa_bwd) went, in wall-clock seconds: the parallel pass's
 * wall time is split over its stages in proportion to the thread-seconds each took, so the
 * fields add up to about wall_s. The reference backend records only wall_s. */
typedef struct nsa_bwd_profile {
  double forward_s; /* rerunning the forward for saved state that was not passed (else 0) */
  double pack_s;    /* packing K/V into the kernels' tiles, zeroing the dk/dv accumulators */
  double rows_s;    /* per query position: transposed q/do, D = g do . o, dg, the selection; dq */
  double cmp_s;     /* the compressed branch's gradients (SPEC 4 step 1) */
  double slc_s;     /* the selected branch's (step 4) */
  double win_s;     /* the window branch's (step 5) */
  double reduce_s;  /* summing the dk/dv accumulators and writing dk, dv, dk_cmp, ... */
  double wall_s;    /* wall-clock seconds of the call */
} nsa_bwd_profile;
/* The profile of the last successful nsa_bwd on ctx with profiling on (zeros before one). */
NSA_API nsa_status nsa_context_bwd_profile(const nsa_context* ctx, nsa_bwd_profile* out);

/* The message of the last failed call on this context, or "" if the last call succeeded.
 * The pointer stays valid until the next call on the context. NULL ctx gives "". */
NSA_API const char* nsa_last_error(const nsa_context* ctx);

/* Whether this build has a backend (CUDA: compiled in and a device present). AUTO is always 1. */
NSA_API int32_t nsa_backend_available(nsa_backend backend);
NSA_API const char* nsa_backend_name(nsa_backend backend);

/* ---------------------------------------------------------------------------------------------
 * Configuration (SPEC.md section 2)
 * ------------------------------------------------------------------------------------------- */

typedef struct nsa_config {
  int32_t cmp_block;  /* l >= 1: tokens per compression block (default 32) */
  int32_t cmp_stride; /* d, 1 <= d <= l: stride between compression blocks (default 16) */
  int32_t slc_block;  /* l' >= 1: tokens per selection block (default 64) */
  int32_t slc_count;  /* n >= 1, n >= n_init + n_local: selected blocks per query, forced
                         blocks included (default 16) */
  int32_t slc_init;   /* n_init >= 0: leading blocks always selected (default 1) */
  int32_t slc_local;  /* n_local >= 0: most recent blocks always selected (default 2) */
  int32_t window;     /* w >= 1: sliding-window size, own token included (default 512) */
  float scale;        /* finite, >= 0: softmax scale; 0 means 1/sqrt(Dk) (default 0) */
} nsa_config;
/* A config outside these ranges is NSA_ERR_INVALID_CONFIG in every call that takes one
 * (nsa_fwd, nsa_bwd, nsa_compress, nsa_compress_bwd, nsa_cmp_seqlens, nsa_kv_cache_create).
 * There are no upper bounds: l or l' may exceed every T. */

/* Fills the paper's defaults (Section 4.1). */
NSA_API void nsa_config_default(nsa_config* cfg);
/* NSA_OK, or NSA_ERR_INVALID_CONFIG with a message naming the field (stored in ctx if ctx is not
 * NULL). cfg NULL: NSA_ERR_NULL_POINTER. */
NSA_API nsa_status nsa_config_validate(nsa_context* ctx, const nsa_config* cfg);
/* Tc for a sequence of t tokens: t >= l ? (t - l) / d + 1 : 0. Only l >= 1 and d >= 1 are
 * checked: 0 when cfg is NULL or either is < 1. */
NSA_API int64_t nsa_cmp_len(const nsa_config* cfg, int64_t t);

/* ---------------------------------------------------------------------------------------------
 * Tensors
 *
 * Each tensor argument has a fixed rank, shape and set of accepted dtypes, stated next to it.
 * Every tensor a call reads is checked thus:
 *   - data NULL: absent. A required tensor absent is NSA_ERR_NULL_POINTER; an optional one is
 *     then skipped (its other fields are not read).
 *   - ndim other than the rank, a negative size, or a size other than the one stated:
 *     NSA_ERR_INVALID_SHAPE. Sizes may be 0, except Hq, Hkv, Dk, Dv, D and Dh, which must be
 *     >= 1 (NSA_ERR_INVALID_SHAPE) where an argument sets them.
 *   - a negative stride in any dimension (even one of size 0 or 1): NSA_ERR_INVALID_STRIDE.
 *   - unless a size is 0, the end of the view in bytes, (1 + sum_i (shape[i] - 1) * stride[i])
 *     * element size (2 for bf16 and f16, else 4), must fit int64: else NSA_ERR_INVALID_SHAPE.
 *   - the last dimension must have stride 1 when its size is > 1 (size 0 or 1: any stride
 *     >= 0): else NSA_ERR_INVALID_STRIDE. The other strides are free.
 *   - outputs only: no two elements may share memory. Checked conservatively: unless a size is
 *     0, the dimensions of size > 1, sorted by stride, must each have a stride >= the previous
 *     one's stride * size (the first: >= 1); else NSA_ERR_INVALID_STRIDE. Inputs may overlap
 *     themselves (stride 0 broadcasts).
 *   - a dtype the argument does not accept: NSA_ERR_INVALID_DTYPE. "float" is f32, bf16 or f16,
 *     each tensor choosing on its own (16-bit values widen exactly to f32; 16-bit outputs are the
 *     f32 result rounded to nearest even); "q's dtype" means equal to q's.
 * Between tensors: the backward calls (nsa_bwd, nsa_compress_bwd, nsa_dense_bwd) reject an
 * output whose bytes [data, data + end) meet those of another output or of an input
 * (NSA_ERR_INVALID_ARGUMENT; absent and empty tensors meet nothing). The other calls do not
 * check this: an output that overlaps an input or another output is accepted, with an
 * unspecified result.
 * ------------------------------------------------------------------------------------------- */

/* Where memory lives, and which checks read it.
 * Every call checks descriptors (pointers, ranks, shapes, strides, dtypes, aliasing, configs) on
 * the host without reading any tensor's contents; then, where a call's rules are about contents
 * (cu_seqlens: start, order, total and the compressed rows it implies; caller-supplied selection
 * indices: their range), the backend checks them where the data lives:
 *   - REF and CPU: every data pointer, cu_seqlens and seq_ids are host memory. Contents are
 *     checked before anything is written, with the statuses stated at each argument.
 *   - a device backend (CUDA, nsa_cuda.h): tensor data and cu_seqlens are device memory on the
 *     context's device; seq_ids and every params struct stay host memory. Content checks run on
 *     the device, so a call never waits for the device to report them: an out-of-range caller
 *     index is ignored like -1; invalid cu_seqlens (not starting at 0, decreasing, or not ending
 *     at T, or implying more compressed rows than k_cmp has) leave the outputs of the rows it
 *     covers unspecified. Neither is reported as a status, and neither makes the call read or
 *     write outside the tensors it was given.
 * On valid input every backend computes the same function (docs/SPEC.md). */

typedef enum nsa_dtype {
  NSA_DTYPE_F32 = 0,
  NSA_DTYPE_BF16 = 1,
  NSA_DTYPE_F16 = 2, /* IEEE binary16; a "float" everywhere but a KV cache's storage */
  NSA_DTYPE_I32 = 3  /* indices only */
} nsa_dtype;

NSA_API const char* nsa_dtype_name(nsa_dtype dtype);
NSA_API size_t nsa_dtype_size(nsa_dtype dtype);

#define NSA_MAX_DIMS 4

typedef struct nsa_tensor {
  void* data; /* NULL: absent */
  nsa_dtype dtype;
  int32_t ndim; /* 1 .. NSA_MAX_DIMS: the argument's rank */
  int64_t shape[NSA_MAX_DIMS];
  int64_t stride[NSA_MAX_DIMS]; /* in elements, >= 0; stride[ndim-1] is 1 unless its size <= 1 */
} nsa_tensor;

/* A contiguous row-major descriptor of rank ndim (shape[0..ndim-1]); data, dtype and sizes are
 * copied as given. ndim outside 1 .. NSA_MAX_DIMS or shape NULL gives ndim 0, which every call
 * rejects (NSA_ERR_INVALID_SHAPE unless data is NULL). A stride past INT64_MAX saturates to it,
 * so that the view's end does not fit int64 (NSA_ERR_INVALID_SHAPE) unless a size is 0. */
NSA_API nsa_tensor nsa_tensor_contiguous(void* data, nsa_dtype dtype, int32_t ndim,
                                         const int64_t* shape);

/* ---------------------------------------------------------------------------------------------
 * Forward (SPEC.md sections 3 and 4)
 * ------------------------------------------------------------------------------------------- */

/* The forward's inputs: embedded in nsa_fwd_params and, unchanged, in nsa_bwd_params (the backward
 * takes the forward's inputs again, as FlashAttention's backward params extend its forward's). */
typedef struct nsa_fwd_inputs {
  nsa_config cfg; /* must be valid (nsa_config_validate) */

  /* Required except the per-branch K/V. */
  nsa_tensor q;     /* [B, T, Hq, Dk] float */
  nsa_tensor k;     /* [B, T, Hkv, Dk] q's dtype, Hq % Hkv == 0 (else NSA_ERR_INVALID_SHAPE):
                       raw keys, shared by the slc and win branches */
  nsa_tensor v;     /* [B, T, Hkv, Dv] q's dtype: raw values, likewise */
  nsa_tensor k_slc; /* optional [B, T, Hkv, Dk] q's dtype: the slc branch's own keys (SPEC 3);
                       absent: k */
  nsa_tensor v_slc; /* optional [B, T, Hkv, Dv] q's dtype; absent: v */
  nsa_tensor k_win; /* optional [B, T, Hkv, Dk] q's dtype: the win branch's own keys; absent: k */
  nsa_tensor v_win; /* optional [B, T, Hkv, Dv] q's dtype; absent: v. Give both of a pair or
                       neither (one alone: NSA_ERR_NULL_POINTER). */
  nsa_tensor k_cmp; /* [B, Tc, Hkv, Dk] q's dtype: compressed keys (nsa_compress, or the
                       caller's) */
  nsa_tensor v_cmp; /* [B, Tc, Hkv, Dv] q's dtype: compressed values */
  nsa_tensor g_cmp; /* [B, T, Hq] f32 or q's dtype: gate values (the op applies no sigmoid) */
  nsa_tensor g_slc; /* [B, T, Hq] f32 or q's dtype */
  nsa_tensor g_win; /* [B, T, Hq] f32 or q's dtype */

  /* Optional variable-length packing: S sequences packed along T. The rules of every call that
   * takes cu_seqlens (an array of S + 1 entries):
   *   - NULL: B independent sequences of length T; num_seqs must be 0 (else NSA_ERR_NULL_POINTER).
   *   - given: B must be 1 (else NSA_ERR_INVALID_SHAPE); num_seqs >= 1, cu_seqlens[0] == 0,
   *     never decreasing, cu_seqlens[S] == T (else NSA_ERR_INVALID_SEQLENS).
   * k_cmp / v_cmp are then packed the same way: sequence s owns nsa_cmp_len(len_s) rows, in order
   * (see nsa_cmp_seqlens), and Tc is their sum. */
  const int32_t* cu_seqlens; /* the backend's memory (see "Where memory lives"); NULL: B
                                independent sequences of length T */
  int64_t num_seqs;          /* S */
} nsa_fwd_inputs;

typedef struct nsa_fwd_params {
  nsa_fwd_inputs in; /* q, k, v, ..., cfg, cu_seqlens: checked as stated in nsa_fwd_inputs */

  /* Optional caller-supplied selection [B, T, Hkv, n] int32, replacing the computed top-n.
   * Each entry is -1 (unused) or a block index in [0, t / l'], t the query's position in its
   * sequence; any other value is NSA_ERR_INVALID_INDEX, reported only when every other rule
   * holds. Duplicates count once. The forced blocks are not added: the set is used as given. */
  nsa_tensor slc_indices_in;

  /* Outputs: o required, the others optional. */
  nsa_tensor o;               /* [B, T, Hq, Dv] float */
  nsa_tensor lse_cmp;         /* [B, T, Hq] f32 only: per-branch log-sum-exp (natural log, scaled
                                 scores); -inf where the branch is empty */
  nsa_tensor lse_slc;         /* [B, T, Hq] f32 only */
  nsa_tensor lse_win;         /* [B, T, Hq] f32 only */
  nsa_tensor o_cmp;           /* [B, T, Hq, Dv] float: the ungated branch outputs */
  nsa_tensor o_slc;           /* [B, T, Hq, Dv] float */
  nsa_tensor o_win;           /* [B, T, Hq, Dv] float */
  nsa_tensor slc_indices_out; /* [B, T, Hkv, n] int32: sorted ascending, -1 padded */
} nsa_fwd_params;

/* Zeroes every field (all tensors absent) and fills cfg with the defaults. */
NSA_API void nsa_fwd_params_init(nsa_fwd_params* p);
/* Also checked: selection block indices are int32, so the last block of each sequence,
 * (len - 1) / l', must be <= INT32_MAX (only a fixed-length T past 2^31 l' can break it):
 * else NSA_ERR_INVALID_SHAPE. */
NSA_API nsa_status nsa_fwd(nsa_context* ctx, const nsa_fwd_params* p);

/* Writes the cumulative compressed lengths cu_cmp[0..S] for cu_seqlens[0..S], S = num_seqs (both
 * host arrays, whatever the backend).
 * ctx may be NULL. cfg, cu_seqlens or cu_cmp NULL: NSA_ERR_NULL_POINTER; cfg invalid:
 * NSA_ERR_INVALID_CONFIG; num_seqs < 1, cu_seqlens[0] != 0 or a decrease:
 * NSA_ERR_INVALID_SEQLENS (there is no T to end at). */
NSA_API nsa_status nsa_cmp_seqlens(nsa_context* ctx, const nsa_config* cfg,
                                   const int32_t* cu_seqlens, int64_t num_seqs, int32_t* cu_cmp);

/* ---------------------------------------------------------------------------------------------
 * Backward (SPEC.md section 6)
 * ------------------------------------------------------------------------------------------- */

/* The gradients of nsa_fwd's o with respect to its inputs, given d_o = dL/do. The selected blocks
 * are a constant of the backward (no gradient through top-n), so the forward's selection comes
 * back in as slc_indices; the gradients are those of SPEC section 4 with that selection fixed.
 *
 * Outputs are overwritten, never accumulated into: every element of every output given is
 * written. dk/dv hold only the slc and win branches' shares; the cmp branch reaches k/v through
 * dk_cmp/dv_cmp and nsa_compress_bwd (below nsa_compress; dout = dk_cmp), whose dx the caller
 * adds to dk (likewise for v). A query whose cmp branch is empty (t < l - 1) gets no cmp
 * gradient, never NaN.
 *
 * Where the raw K/V gradients go (SPEC 3: each branch may have its own K/V):
 *   - dk/dv receive the sum over the branches that read k/v: slc when k_slc/v_slc are absent, win
 *     when k_win/v_win are absent. They are required then (absent: NSA_ERR_NULL_POINTER). When
 *     both branches have their own K/V no branch reads k/v; dk/dv may then be absent, and are
 *     zero-filled when given.
 *   - dk_slc/dv_slc are required exactly when k_slc/v_slc were given (absent:
 *     NSA_ERR_NULL_POINTER), and must be absent otherwise (NSA_ERR_INVALID_ARGUMENT); likewise
 *     dk_win/dv_win for k_win/v_win.
 *
 * No output may share memory with an input or with another output (NSA_ERR_INVALID_ARGUMENT, by
 * the byte-range rule of "Tensors"). The check is conservative: outputs interleaved in one
 * buffer are rejected even when their elements do not collide.
 *
 * Backends: NSA_BACKEND_AUTO and NSA_BACKEND_CPU run the CPU backward: f32 accumulation (16-bit
 * inputs widened exactly), one FlashAttention-2 pass over the (query, key) pairs from the saved
 * LSEs and branch outputs (about T * Hq * (n l' + w + Tc) * (3 Dk + 2 Dv) multiply-adds), dk/dv
 * summed in a fixed order (4 fixed chunks of queries, so its main pass uses up to 4 threads), so
 * results are bitwise identical for any thread count. Its scratch, all linear in T: 4 copies of
 * the K/V gradients, packed copies of K/V, f32 copies of q, d_o and o_* when they are 16-bit, and,
 * when saved state is missing, the rerun forward's f32 outputs (4 T Hq Dv floats).
 * NSA_BACKEND_REF runs the float64 reference: exact but slow, single-threaded per KV head. */
typedef struct nsa_bwd_params {
  /* The forward's inputs, as given to nsa_fwd (params.in), checked exactly as nsa_fwd checks them
   * (shapes, dtypes, the K/V pairs, cu_seqlens, the int32 block limit, and their statuses). */
  nsa_fwd_inputs in;

  /* Saved by the forward. */
  nsa_tensor slc_indices; /* [B, T, Hkv, n] int32, required: the forward's slc_indices_out, or
                             the set it was given in slc_indices_in (the rule and status of
                             slc_indices_in: -1 ignored, duplicates count once, entries in
                             [0, t / l']; checked after every other rule, aliasing included) */
  /* Optional: the forward's per-branch LSEs and ungated outputs (nsa_fwd's lse_* and o_*), the
   * state FlashAttention's backward saves. With all six given the CPU backward starts from them;
   * with any missing it first reruns the CPU forward (with slc_indices) to recompute them, about
   * one forward's time. They must be the forward's own values for these inputs (not checked).
   * The reference checks their shapes but recomputes everything in float64. */
  nsa_tensor lse_cmp; /* [B, T, Hq] f32 only */
  nsa_tensor lse_slc;
  nsa_tensor lse_win;
  nsa_tensor o_cmp; /* [B, T, Hq, Dv] float */
  nsa_tensor o_slc;
  nsa_tensor o_win;

  nsa_tensor d_o; /* [B, T, Hq, Dv] float (whatever q's dtype), required: dL/do */

  /* Outputs, each float (whatever the inputs' dtypes), each shaped as its input. */
  nsa_tensor dq;                     /* [B, T, Hq, Dk], required */
  nsa_tensor dk, dv;                 /* [B, T, Hkv, Dk|Dv]: the branches that read k/v */
  nsa_tensor dk_slc, dv_slc;         /* exactly when k_slc/v_slc were given */
  nsa_tensor dk_win, dv_win;         /* exactly when k_win/v_win were given */
  nsa_tensor dk_cmp, dv_cmp;         /* [B, Tc, Hkv, Dk|Dv], required */
  nsa_tensor dg_cmp, dg_slc, dg_win; /* [B, T, Hq], required: dg_c = sum(d_o * o_c) */
} nsa_bwd_params;

/* Zeroes every field (all tensors absent) and fills cfg with the defaults. */
NSA_API void nsa_bwd_params_init(nsa_bwd_params* p);
NSA_API nsa_status nsa_bwd(nsa_context* ctx, const nsa_bwd_params* p);

/* ---------------------------------------------------------------------------------------------
 * Compression (SPEC.md section 5)
 * ------------------------------------------------------------------------------------------- */

typedef enum nsa_cmp_kind {
  NSA_CMP_MEAN = 0, /* the mean of the block's l tokens */
  NSA_CMP_MLP = 1   /* W2 relu(W1 flatten(X + P) + b1) + b2, one parameter set per KV head */
} nsa_cmp_kind;

typedef struct nsa_compress_params {
  nsa_config cfg;    /* uses cmp_block (l) and cmp_stride (d); all of it must be valid */
  nsa_cmp_kind kind; /* another value: NSA_ERR_INVALID_ARGUMENT */

  nsa_tensor x;              /* [B, T, Hkv, D] raw keys or values; float */
  const int32_t* cu_seqlens; /* optional, as in nsa_fwd_params */
  int64_t num_seqs;

  /* kind == NSA_CMP_MLP: required, x's dtype. Dh >= 1 is the hidden width; l * D past INT64_MAX
   * is NSA_ERR_INVALID_SHAPE. kind == NSA_CMP_MEAN: ignored (not checked). */
  nsa_tensor pos; /* [Hkv, l, D] intra-block position encoding P */
  nsa_tensor w1;  /* [Hkv, Dh, l * D] */
  nsa_tensor b1;  /* [Hkv, Dh] */
  nsa_tensor w2;  /* [Hkv, D, Dh] */
  nsa_tensor b2;  /* [Hkv, D] */

  nsa_tensor out; /* [B, Tc, Hkv, D] (packed per sequence with cu_seqlens), float */
} nsa_compress_params;

NSA_API void nsa_compress_params_init(nsa_compress_params* p);
NSA_API nsa_status nsa_compress(nsa_context* ctx, const nsa_compress_params* p);

/* The backward of nsa_compress (SPEC 5): dout = dL/d(compressed tokens) to dx = dL/dx and, for
 * kind NSA_CMP_MLP, the gradients of the parameters. Overlapping blocks (d < l) add up in dx;
 * tokens in no complete block get 0. Outputs are overwritten, never accumulated into. The same
 * aliasing rule as nsa_bwd (inputs: x, dout and, for mlp, pos .. b2). CPU (and AUTO) run the CPU
 * kernels: f32 accumulation, deterministic (the result does not depend on the thread count); REF
 * runs the float64 reference. */
typedef struct nsa_compress_bwd_params {
  nsa_config cfg; /* uses cmp_block (l) and cmp_stride (d); all of it must be valid */
  nsa_cmp_kind kind;

  /* The forward's inputs, as given to nsa_compress and checked as it checks them (x is required
   * for both kinds). */
  nsa_tensor x; /* [B, T, Hkv, D] */
  const int32_t* cu_seqlens;
  int64_t num_seqs;
  nsa_tensor pos, w1, b1, w2, b2; /* kind == NSA_CMP_MLP only */

  nsa_tensor dout; /* [B, Tc, Hkv, D] float (whatever x's dtype), required:
                      dL/d(nsa_compress's out) */

  /* Outputs, each float (whatever the inputs' dtypes). */
  nsa_tensor dx; /* [B, T, Hkv, D], required */
  /* kind == NSA_CMP_MLP: required (absent: NSA_ERR_NULL_POINTER), shaped as pos, w1, b1, w2, b2;
   * kind == NSA_CMP_MEAN: ignored (not checked) */
  nsa_tensor dpos, dw1, db1, dw2, db2;
} nsa_compress_bwd_params;

NSA_API void nsa_compress_bwd_params_init(nsa_compress_bwd_params* p);
NSA_API nsa_status nsa_compress_bwd(nsa_context* ctx, const nsa_compress_bwd_params* p);

/* ---------------------------------------------------------------------------------------------
 * Dense causal attention: the baseline NSA is measured against
 * ------------------------------------------------------------------------------------------- */

/* Causal (optionally sliding-window) softmax attention over all keys, computed with the same
 * care as the NSA kernels (tiles, online softmax, SIMD). It is the baseline of every speedup that
 * nsa reports, and FlashAttention's op with window_size = (window - 1, 0). */
typedef struct nsa_dense_fwd_params {
  nsa_tensor q; /* [B, T, Hq, Dk], float */
  nsa_tensor k; /* [B, T, Hkv, Dk], q's dtype; Hq % Hkv == 0 (else NSA_ERR_INVALID_SHAPE) */
  nsa_tensor v; /* [B, T, Hkv, Dv], q's dtype */
  const int32_t* cu_seqlens; /* optional, as in nsa_fwd_params */
  int64_t num_seqs;
  float scale;    /* finite, >= 0 (else NSA_ERR_INVALID_ARGUMENT); 0: 1/sqrt(Dk) */
  int32_t window; /* >= 0 (else NSA_ERR_INVALID_ARGUMENT); 0: every earlier key; w >= 1: keys
                     t - w + 1 .. t */
  nsa_tensor o;   /* [B, T, Hq, Dv], float, required */
  nsa_tensor lse; /* optional [B, T, Hq] f32 only */
} nsa_dense_fwd_params;

NSA_API void nsa_dense_fwd_params_init(nsa_dense_fwd_params* p);
NSA_API nsa_status nsa_dense_fwd(nsa_context* ctx, const nsa_dense_fwd_params* p);

/* The gradients of nsa_dense_fwd (FlashAttention-2's backward): with L = sum(d_o * o),
 *   P = softmax(scale q k^T) over the visible keys, D = rowsum(d_o * o), dS = P * (d_o v^T - D),
 *   dq = scale dS k,  dk = scale dS^T q,  dv = P^T d_o,
 * dk and dv summed over the G query heads of each KV head. P is recomputed from q, k and the
 * saved lse; o enters only through D. Deterministic: the result does not depend on the thread
 * count. The CPU backend needs about 4 * B * T * Hq * (Dk + Dv) bytes of scratch (each query
 * head's share of dk and dv, summed over the group in a fixed order at the end, as
 * FlashAttention-2 does for MQA/GQA). The aliasing rule of nsa_bwd applies (inputs: q, k, v, o,
 * lse, d_o). */
typedef struct nsa_dense_bwd_params {
  /* q, k, v, cu_seqlens, scale and window: checked exactly as nsa_dense_fwd checks them. */
  nsa_tensor q;              /* [B, T, Hq, Dk], float */
  nsa_tensor k;              /* [B, T, Hkv, Dk], q's dtype */
  nsa_tensor v;              /* [B, T, Hkv, Dv], q's dtype */
  nsa_tensor o;              /* [B, T, Hq, Dv], float, required: nsa_dense_fwd's output */
  nsa_tensor lse;            /* [B, T, Hq] f32 only, required: nsa_dense_fwd's lse */
  nsa_tensor d_o;            /* [B, T, Hq, Dv], f32 or q's dtype, required: dL/do */
  const int32_t* cu_seqlens; /* optional, as in nsa_dense_fwd_params */
  int64_t num_seqs;
  float scale;    /* as in nsa_dense_fwd_params; must be the forward's */
  int32_t window; /* as in nsa_dense_fwd_params; must be the forward's */
  /* Outputs, each float, required, overwritten. */
  nsa_tensor dq; /* [B, T, Hq, Dk] */
  nsa_tensor dk; /* [B, T, Hkv, Dk] */
  nsa_tensor dv; /* [B, T, Hkv, Dv] */
} nsa_dense_bwd_params;

NSA_API void nsa_dense_bwd_params_init(nsa_dense_bwd_params* p);
NSA_API nsa_status nsa_dense_bwd(nsa_context* ctx, const nsa_dense_bwd_params* p);

/* ---------------------------------------------------------------------------------------------
 * Decode with a KV cache (SPEC.md section 7)
 *
 * The cache is owned by the library. It holds, for each of num_seqs sequences, the raw keys and
 * values of up to `capacity` tokens and their compressed tokens, in f32 or bf16. Compressed token
 * i is computed exactly once, when position i*d + l - 1 is appended (with the cache's own mean or
 * mlp compressor), so a decode step never recompresses the past. The memory for the whole
 * capacity is reserved at creation (pages are committed by the OS as they are first written) and
 * never moves: appending a token copies that token only.
 *
 * Decode reads the cache with the same K/V for the three branches (the default of nsa_fwd).
 * A cache is not thread-safe: calls on one cache must not overlap. A cache belongs to the backend
 * of the context that created it (AUTO resolved), which keeps its storage; the CPU backend has
 * one, the reference backend does not (NSA_ERR_UNSUPPORTED: use nsa_fwd on the prefix as the
 * oracle).
 *
 * Rules shared by the calls below: ctx, cache or params NULL is NSA_ERR_NULL_POINTER.
 * nsa_kv_cache_create, nsa_prefill, nsa_decode and nsa_dense_decode answer NSA_ERR_UNSUPPORTED
 * (naming the backend and the call) on a context whose backend has no such call, before checking
 * anything but those pointers; prefill and the decode calls on a context whose backend is not the
 * cache's are NSA_ERR_INVALID_ARGUMENT. nsa_kv_cache_append and nsa_kv_cache_reset take any
 * context (its thread count; the cache's backend does the work).
 * A sequence number outside [0, num_seqs) is NSA_ERR_INVALID_INDEX. In the shapes below, Hkv,
 * Dk, Dv, l and n are the cache's.
 * ------------------------------------------------------------------------------------------- */

typedef struct nsa_kv_cache nsa_kv_cache;

typedef struct nsa_kv_cache_params {
  nsa_config cfg;        /* the NSA configuration every call on the cache uses; must be valid */
  int64_t num_seqs;      /* sequences (batch slots), in [1, INT32_MAX] */
  int64_t capacity;      /* tokens per sequence, >= 1, with capacity / slc_block < INT32_MAX */
  int64_t num_kv_heads;  /* Hkv, in [1, 2^20] */
  int64_t head_dim_k;    /* Dk, in [1, 2^20] */
  int64_t head_dim_v;    /* Dv, in [1, 2^20] */
  nsa_dtype dtype;       /* storage of raw and compressed K/V: f32 or bf16 (else
                            NSA_ERR_INVALID_DTYPE) */
  nsa_cmp_kind cmp_kind; /* another value: NSA_ERR_INVALID_ARGUMENT */
  /* cmp_kind == NSA_CMP_MLP: required, phi's parameters for keys (k_*) and values (v_*), shaped
   * as in nsa_compress_params with D = Dk resp. Dv (each set its own Dh >= 1; l * D past
   * INT64_MAX is NSA_ERR_INVALID_SHAPE); each float, whatever dtype. Copied at creation.
   * cmp_kind == NSA_CMP_MEAN: ignored (not checked). */
  nsa_tensor k_pos, k_w1, k_b1, k_w2, k_b2;
  nsa_tensor v_pos, v_w1, v_b1, v_w2, v_b2;
} nsa_kv_cache_params;
/* Sizes outside these bounds, or a cache whose size bound
 * num_seqs * num_kv_heads * (capacity + 64) * (head_dim_k + head_dim_v + 32) * 8 exceeds
 * INT64_MAX: NSA_ERR_INVALID_SHAPE. */

/* Zeroes every field, fills cfg with the defaults, dtype f32, cmp_kind mean. */
NSA_API void nsa_kv_cache_params_init(nsa_kv_cache_params* p);
/* out NULL: NSA_ERR_NULL_POINTER; *out is written on success only. The storage is reserved here
 * (NSA_ERR_OUT_OF_MEMORY when it cannot be). */
NSA_API nsa_status nsa_kv_cache_create(nsa_context* ctx, const nsa_kv_cache_params* p,
                                       nsa_kv_cache** out);
/* NULL is a no-op. */
NSA_API void nsa_kv_cache_destroy(nsa_kv_cache* cache);
/* Tokens held by sequence seq, or -1 when cache is NULL or seq is out of range. */
NSA_API int64_t nsa_kv_cache_len(const nsa_kv_cache* cache, int64_t seq);
/* Empties sequence seq (its memory is kept for reuse). */
NSA_API nsa_status nsa_kv_cache_reset(nsa_context* ctx, nsa_kv_cache* cache, int64_t seq);

/* Appends n tokens to sequence seq: k [n, Hkv, Dk], v [n, Hkv, Dv] (n is k's shape[0]), each
 * float whatever the cache's dtype (rounded to it). The pointers k and v are required
 * (NULL: NSA_ERR_NULL_POINTER), and so are their data. The compressed tokens these complete are
 * computed. Going past the capacity is NSA_ERR_INVALID_SHAPE and appends nothing; n = 0 appends
 * nothing. */
NSA_API nsa_status nsa_kv_cache_append(nsa_context* ctx, nsa_kv_cache* cache, int64_t seq,
                                       const nsa_tensor* k, const nsa_tensor* v);

/* Prefill: appends a prompt of T tokens to an empty sequence and runs the forward pass (nsa_fwd)
 * for its queries, over the K/V as the cache stores them and the cache's compressed tokens.
 * q, k, v must have the cache's dtype (so that the forward sees the very values later decode
 * steps read). All tensors are required except the optional outputs; the other rules, and their
 * statuses, are nsa_fwd's (Hq >= 1 a multiple of Hkv, ...). T = 0 is valid and appends nothing. */
typedef struct nsa_prefill_params {
  int64_t seq;      /* the cache sequence; it must be empty (else NSA_ERR_INVALID_ARGUMENT) */
  nsa_tensor q;     /* [T, Hq, Dk], the cache's dtype */
  nsa_tensor k;     /* [T, Hkv, Dk], the cache's dtype; T <= capacity (else
                       NSA_ERR_INVALID_SHAPE) */
  nsa_tensor v;     /* [T, Hkv, Dv], the cache's dtype */
  nsa_tensor g_cmp; /* [T, Hq], f32 or the cache's dtype */
  nsa_tensor g_slc;
  nsa_tensor g_win;
  nsa_tensor o;       /* [T, Hq, Dv], float */
  nsa_tensor lse_cmp; /* optional [T, Hq] f32 only, as in nsa_fwd_params */
  nsa_tensor lse_slc;
  nsa_tensor lse_win;
  nsa_tensor slc_indices_out; /* optional [T, Hkv, n] int32 */
} nsa_prefill_params;

NSA_API void nsa_prefill_params_init(nsa_prefill_params* p);
NSA_API nsa_status nsa_prefill(nsa_context* ctx, nsa_kv_cache* cache, const nsa_prefill_params* p);

/* One decode step for S sequences at once (each at its own length): for sequence s, the query
 * q[s] sits at position t = len - 1 of its cache sequence, after k[s], v[s] (when given) were
 * appended, and o[s] is SPEC section 4's output at t, as nsa_fwd over the whole prefix gives it.
 * Keys are split across threads and the partial results merged with their log-sum-exps
 * (FlashDecoding), in a fixed order: results do not depend on the thread count.
 * The sequences' state: with k/v, none may be full (len == capacity: NSA_ERR_INVALID_SHAPE);
 * without, none may be empty (NSA_ERR_INVALID_ARGUMENT). S = 0 is valid and does nothing. A
 * failure after the checks (NSA_ERR_OUT_OF_MEMORY) leaves every sequence's length as it was. */
typedef struct nsa_decode_params {
  nsa_tensor q; /* [S, Hq, Dk], float (whatever the cache's dtype); Hq >= 1, a
                   multiple of the cache's Hkv (else NSA_ERR_INVALID_SHAPE) */
  nsa_tensor k; /* optional [S, Hkv, Dk]: the new tokens' keys, appended first; float
                   whatever q's dtype, rounded to the cache's (as nsa_kv_cache_append) */
  nsa_tensor v; /* optional [S, Hkv, Dv], likewise; give both k and v or neither (one
                   alone: NSA_ERR_NULL_POINTER) */
  const int32_t* seq_ids; /* optional host array [S]: cache sequences, in [0, num_seqs) and
                             distinct (else NSA_ERR_INVALID_INDEX); NULL: 0..S-1, which needs
                             S <= num_seqs (else NSA_ERR_INVALID_SHAPE) */
  nsa_tensor g_cmp;       /* [S, Hq], f32 or q's dtype */
  nsa_tensor g_slc;
  nsa_tensor g_win;
  nsa_tensor o;       /* [S, Hq, Dv], float, required */
  nsa_tensor lse_cmp; /* optional [S, Hq] f32 only */
  nsa_tensor lse_slc;
  nsa_tensor lse_win;
  nsa_tensor slc_indices_out; /* optional [S, Hkv, n] int32: sorted ascending, -1 padded */
} nsa_decode_params;

NSA_API void nsa_decode_params_init(nsa_decode_params* p);
NSA_API nsa_status nsa_decode(nsa_context* ctx, nsa_kv_cache* cache, const nsa_decode_params* p);

/* The dense baseline over the same cache: causal attention of q[s] over every cached token of
 * its sequence (or the last `window` ones), with the same split-key kernels. q, k, v and seq_ids
 * and the sequences' state obey nsa_decode's rules. */
typedef struct nsa_dense_decode_params {
  nsa_tensor q; /* [S, Hq, Dk], float */
  nsa_tensor k; /* optional [S, Hkv, Dk]: appended first, as in nsa_decode_params */
  nsa_tensor v; /* optional [S, Hkv, Dv] */
  const int32_t* seq_ids;
  float scale;    /* finite, >= 0 (else NSA_ERR_INVALID_ARGUMENT); 0: 1/sqrt(Dk) */
  int32_t window; /* >= 0 (else NSA_ERR_INVALID_ARGUMENT); 0: every cached token; w >= 1: the
                     last w */
  nsa_tensor o;   /* [S, Hq, Dv], float, required */
  nsa_tensor lse; /* optional [S, Hq] f32 only */
} nsa_dense_decode_params;

NSA_API void nsa_dense_decode_params_init(nsa_dense_decode_params* p);
NSA_API nsa_status nsa_dense_decode(nsa_context* ctx, nsa_kv_cache* cache,
                                    const nsa_dense_decode_params* p);

/* ---------------------------------------------------------------------------------------------
 * Build information
 * ------------------------------------------------------------------------------------------- */

/* "0.2.0". */
NSA_API const char* nsa_version(void);
/* One line each: compiler, build type, options. Static storage. */
NSA_API const char* nsa_build_info(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* NSA_NSA_H_ */
