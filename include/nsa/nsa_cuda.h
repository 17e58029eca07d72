/*
 * nsa_cuda.h: the CUDA backend's part of the C API (nsa.h holds the rest).
 *
 * Where memory lives: a context whose backend is NSA_BACKEND_CUDA reads and writes device memory
 * through every tensor's data pointer and through cu_seqlens (nsa.h, "Where memory lives"); the
 * params structs, seq_ids and the config stay host memory. A descriptor does not say where its
 * memory is: the context's backend does (one rule for every call, and nsa_tensor keeps its
 * layout). Pointers must belong to the device that is current (cudaSetDevice) when the call is
 * made. AUTO never resolves to CUDA: it is chosen explicitly (nsa_context_set_backend).
 *
 * Streams: every CUDA call is enqueued on the context's stream and returns without waiting for
 * the device; its outputs are ready when the stream reaches that point (cudaStreamSynchronize,
 * an event, or later work on the same stream). A status other than NSA_OK means no output was
 * written (an nsa_decode whose k/v were appended may have written those rows into the cache's
 * storage past the restored length, where nothing reads them). A KV cache orders its own work:
 * a call on a stream other than the cache's last one first waits for that work (an event), so
 * appends and steps from several contexts or streams never overlap on the device. Inside a
 * stream capture a decode step enqueues only kernels; its positions are launch parameters, so a
 * captured step replays at the lengths it was captured at.
 *
 * Scratch: calls that need device scratch (the mlp compression's hidden layer; a decode step that
 * splits its keys across blocks, for its partial results) take it from a workspace the context
 * owns. It grows when a call needs more than it holds (one cudaMalloc on
 * the first such call, none afterwards for calls of the same size or smaller), is kept for the
 * next call, and is freed by nsa_context_destroy; nsa_context_reserve_cuda_workspace grows it
 * ahead of time, so that a timed or graph-captured call allocates nothing (a decode step captured
 * while the workspace is too small for its split runs unsplit rather than allocate). A captured
 * graph keeps the workspace's address: a later call that grows the workspace frees the old one,
 * so reserve the largest size before capturing. A split decode step's scratch depends on its
 * batch size, not on the sequences' lengths, so it is allocated by the first such step. The
 * workspace is used in the order of the context's stream: after changing the stream while such
 * work is still queued on the old one, order the two yourself (an event). The forward needs no
 * scratch: its block scores and selection live in shared memory (paper, Section 3.4). A cache
 * with mlp compression makes its own scratch, cuBLAS handle and copy of the parameters at
 * creation (which waits for the context's stream), and nothing afterwards; the whole capacity is
 * allocated at creation (cudaMalloc commits it).
 *
 * Arithmetic: attention over 16-bit keys and values (bf16 or f16 forward and dense inputs, a
 * bf16 cache) runs on the tensor cores: exact products summed in f32, queries wider than the
 * keys and the softmax weights taken as 16-bit hi + lo pairs (about 2^-16 relative). Over f32
 * keys (f32 inputs, an f32 cache whatever the queries) it runs on the CUDA cores in f32. Results
 * are within the f32 bound of the float64 reference either way, but f16 forward and dense
 * inputs do not give the bits of f32 inputs of the same values here, as they do on the CPU
 * (decode and compression still do). The forward gives a block 32 / G consecutive positions (at
 * least 1; fewer when shared memory is short); the bits are the same on every run of a shape on
 * one device.
 *
 * Limits of this version, answered NSA_ERR_UNSUPPORTED with the reason: one thread block per
 * (positions, KV head) holds the rows' queries and accumulators, two key chunks and the block
 * scores in shared memory, so roughly R (Dk + 2 Dv + 32) + 32 (Dk + Dv + 16) + P T / slc_block
 * floats (R = P G rows, P positions, G at least 16 rows for 16-bit inputs) must fit one block's
 * shared memory (about 227 KiB on an H100; a forward block takes fewer positions before this
 * fails); at most 65535 KV heads; a cache's capacity at most 2^31 - 1.
 *
 * Decode: one block per (sequence, KV head) when the step has enough of them to fill the device;
 * otherwise, from 1024 keys on, each branch's keys are split across blocks and the parts merged
 * by their log-sum-exps in a fixed order (FlashDecoding). The choice depends only on the step's
 * shape and the device, so a step gives the same bits on every run; the two ways round
 * differently (within the tolerances of the float64 reference's tests).
 */
#ifndef NSA_NSA_CUDA_H_
#define NSA_NSA_CUDA_H_

#include "nsa/nsa.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Devices the CUDA runtime reports: 0 when this build has no CUDA backend, when no driver is
 * installed, or when no device is present (nsa_backend_available(NSA_BACKEND_CUDA) is then 0). */
NSA_API int32_t nsa_cuda_device_count(void);

/* The CUDA stream (a cudaStream_t, passed as void*) the context's calls are enqueued on; NULL,
 * the default, is the legacy default stream. Accepted in every build (it is used only by the
 * CUDA backend). ctx NULL: NSA_ERR_NULL_POINTER. */
NSA_API nsa_status nsa_context_set_cuda_stream(nsa_context* ctx, void* stream);
NSA_API void* nsa_context_cuda_stream(const nsa_context* ctx);

/* Grows the context's device workspace to at least `bytes` on the current device (see "Scratch"
 * above). NSA_ERR_UNSUPPORTED when the CUDA backend is not available; NSA_ERR_OUT_OF_MEMORY when
 * cudaMalloc fails (the workspace is then as it was). */
NSA_API nsa_status nsa_context_reserve_cuda_workspace(nsa_context* ctx, size_t bytes);
/* Bytes the context's workspace holds now (0 before any use). */
NSA_API size_t nsa_context_cuda_workspace_size(const nsa_context* ctx);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* NSA_NSA_CUDA_H_ */
