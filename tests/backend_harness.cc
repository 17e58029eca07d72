// The backend list and the host buffer helper (backend_harness.h).
#include "backend_harness.h"

#include <cstring>
#include <ostream>

#include "cpu/kv_cache.h"

namespace nsa_test {
namespace {

// Host memory: the backend reads and writes the test's own buffers, so upload hands back the
// view itself and download has nothing to copy.
class HostBuffers final : public BufferHelper {
 public:
  BackendTensor upload(const nsa_tensor& host_view) const override {
    BackendTensor t;
    t.desc = host_view;
    return t;
  }
  void download(const BackendTensor& t, const nsa_tensor& host_view) const override {
    EXPECT_EQ(t.desc.data, host_view.data) << "a host tensor is its own backend copy";
  }
  BackendInts upload_ints(const int32_t* host, int64_t) const override {
    BackendInts b;
    b.data = host;
    return b;
  }
};

// The CPU cache's compressed tokens (cpu/kv_cache.h), read back as f32.
void cpu_cache_cmp(const nsa_kv_cache& c, int64_t seq, int64_t b, int64_t row0, Tensor& k_cmp,
                   Tensor& v_cmp) {
  const int64_t Tc = c.cmp_len(seq);
  std::vector<float> row(static_cast<size_t>(std::max(c.Dk, c.Dv)));
  const nsa::cpu::TokenStore& cmp = nsa::cpu::storage(c).cmp;
  for (int64_t i = 0; i < Tc; ++i) {
    for (int64_t h = 0; h < c.Hkv; ++h) {
      cmp.read_k(seq, h, i, row.data());
      for (int64_t x = 0; x < c.Dk; ++x) k_cmp.set({b, row0 + i, h, x}, row[x]);
      cmp.read_v(seq, h, i, row.data());
      for (int64_t x = 0; x < c.Dv; ++x) v_cmp.set({b, row0 + i, h, x}, row[x]);
    }
  }
}

// Every backend the harness knows, with its buffer helper and, where it has a KV cache, its cache
// reader. A backend runs every parameterised case of its ops as soon as nsa_backend_available
// says it is there (CUDA: built, and a device present).
std::vector<BackendUnderTest> all_backends() {
  std::vector<BackendUnderTest> v = {{NSA_BACKEND_REF, "ref", &host_buffers(), nullptr},
                                     {NSA_BACKEND_CPU, "cpu", &host_buffers(), &cpu_cache_cmp}};
#ifdef NSA_HAVE_CUDA
  v.push_back({NSA_BACKEND_CUDA, "cuda", &cuda_buffers(), &cuda_cache_cmp,
               kOpFwd | kOpCompress | kOpDense | kOpDecode});
#endif
  return v;
}

}  // namespace

int64_t view_bytes(const nsa_tensor& t) {
  int64_t end = 1;
  for (int32_t i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) return 0;
    end += (t.shape[i] - 1) * t.stride[i];
  }
  return end * static_cast<int64_t>(nsa_dtype_size(t.dtype));
}

void copy_rows_into(const void* bytes, nsa_dtype dt, int64_t n, int64_t H, int64_t D, int64_t b,
                    int64_t row0, Tensor& t) {
  const auto* base = static_cast<const unsigned char*>(bytes);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t x = 0; x < D; ++x) {
        const int64_t e = (i * H + h) * D + x;
        float f;
        if (dt == NSA_DTYPE_BF16) {
          uint16_t u;
          std::memcpy(&u, base + e * 2, 2);
          f = bf16_bits_to_float(u);
        } else {
          std::memcpy(&f, base + e * 4, 4);
        }
        t.set({b, row0 + i, h, x}, f);
      }
    }
  }
}

const BufferHelper& host_buffers() {
  static const HostBuffers h;
  return h;
}

const BackendUnderTest& oracle() {
  static const BackendUnderTest o = all_backends()[0];
  return o;
}

std::vector<BackendUnderTest> backends_under_test(uint32_t ops) {
  std::vector<BackendUnderTest> v;
  for (const BackendUnderTest& b : all_backends()) {
    if (b.id != oracle().id && nsa_backend_available(b.id) && (b.ops & ops) == ops) v.push_back(b);
  }
  return v;
}

BackendUnderTest backend(nsa_backend id) {
  for (const BackendUnderTest& b : all_backends()) {
    if (b.id == id && nsa_backend_available(id)) return b;
  }
  ADD_FAILURE() << "backend " << nsa_backend_name(id) << " is not in this build";
  return oracle();
}

void PrintTo(const BackendUnderTest& b, std::ostream* os) { *os << b.name; }

std::string backend_test_name(const ::testing::TestParamInfo<BackendUnderTest>& info) {
  return info.param.name;
}

nsa_tensor Staging::in(const nsa_tensor& host) {
  if (host.data == nullptr) return host;
  ins_.push_back(std::make_unique<BackendTensor>(b_.upload(host)));
  return ins_.back()->desc;
}

nsa_tensor Staging::out(const nsa_tensor& host) {
  if (host.data == nullptr) return host;
  outs_.emplace_back(std::make_unique<BackendTensor>(b_.upload(host)), host);
  return outs_.back().first->desc;
}

const int32_t* Staging::ints(const int32_t* host, int64_t n) {
  if (host == nullptr) return nullptr;
  ints_.push_back(b_.upload_ints(host, n));
  return ints_.back().data;
}

void Staging::download_outputs() {
  for (const auto& o : outs_) b_.download(*o.first, o.second);
}

namespace {
// cu_seqlens has num_seqs + 1 entries (nsa.h); an invalid num_seqs is the call's to reject, so
// nothing is staged for it.
const int32_t* stage_seqlens(Staging& s, const int32_t* cu, int64_t num_seqs) {
  return num_seqs >= 1 && num_seqs < (int64_t{1} << 31) ? s.ints(cu, num_seqs + 1) : cu;
}

nsa_fwd_inputs stage_inputs(Staging& s, nsa_fwd_inputs in) {
  for (nsa_tensor* t : {&in.q, &in.k, &in.v, &in.k_slc, &in.v_slc, &in.k_win, &in.v_win, &in.k_cmp,
                        &in.v_cmp, &in.g_cmp, &in.g_slc, &in.g_win}) {
    *t = s.in(*t);
  }
  in.cu_seqlens = stage_seqlens(s, in.cu_seqlens, in.num_seqs);
  return in;
}
}  // namespace

nsa_fwd_params stage(Staging& s, const nsa_fwd_params& host) {
  nsa_fwd_params p = host;
  p.in = stage_inputs(s, host.in);
  p.slc_indices_in = s.in(p.slc_indices_in);
  for (nsa_tensor* t : {&p.o, &p.lse_cmp, &p.lse_slc, &p.lse_win, &p.o_cmp, &p.o_slc, &p.o_win,
                        &p.slc_indices_out}) {
    *t = s.out(*t);
  }
  return p;
}

nsa_bwd_params stage(Staging& s, const nsa_bwd_params& host) {
  nsa_bwd_params p = host;
  p.in = stage_inputs(s, host.in);
  for (nsa_tensor* t :
       {&p.slc_indices, &p.lse_cmp, &p.lse_slc, &p.lse_win, &p.o_cmp, &p.o_slc, &p.o_win, &p.d_o}) {
    *t = s.in(*t);
  }
  for (nsa_tensor* t : {&p.dq, &p.dk, &p.dv, &p.dk_slc, &p.dv_slc, &p.dk_win, &p.dv_win, &p.dk_cmp,
                        &p.dv_cmp, &p.dg_cmp, &p.dg_slc, &p.dg_win}) {
    *t = s.out(*t);
  }
  return p;
}

nsa_compress_params stage(Staging& s, const nsa_compress_params& host) {
  nsa_compress_params p = host;
  for (nsa_tensor* t : {&p.x, &p.pos, &p.w1, &p.b1, &p.w2, &p.b2}) *t = s.in(*t);
  p.cu_seqlens = stage_seqlens(s, p.cu_seqlens, p.num_seqs);
  p.out = s.out(p.out);
  return p;
}

nsa_compress_bwd_params stage(Staging& s, const nsa_compress_bwd_params& host) {
  nsa_compress_bwd_params p = host;
  for (nsa_tensor* t : {&p.x, &p.pos, &p.w1, &p.b1, &p.w2, &p.b2, &p.dout}) *t = s.in(*t);
  p.cu_seqlens = stage_seqlens(s, p.cu_seqlens, p.num_seqs);
  for (nsa_tensor* t : {&p.dx, &p.dpos, &p.dw1, &p.db1, &p.dw2, &p.db2}) *t = s.out(*t);
  return p;
}

nsa_dense_fwd_params stage(Staging& s, const nsa_dense_fwd_params& host) {
  nsa_dense_fwd_params p = host;
  for (nsa_tensor* t : {&p.q, &p.k, &p.v}) *t = s.in(*t);
  p.cu_seqlens = stage_seqlens(s, p.cu_seqlens, p.num_seqs);
  p.o = s.out(p.o);
  p.lse = s.out(p.lse);
  return p;
}

nsa_dense_bwd_params stage(Staging& s, const nsa_dense_bwd_params& host) {
  nsa_dense_bwd_params p = host;
  for (nsa_tensor* t : {&p.q, &p.k, &p.v, &p.o, &p.lse, &p.d_o}) *t = s.in(*t);
  p.cu_seqlens = stage_seqlens(s, p.cu_seqlens, p.num_seqs);
  for (nsa_tensor* t : {&p.dq, &p.dk, &p.dv}) *t = s.out(*t);
  return p;
}

nsa_kv_cache_params stage(Staging& s, const nsa_kv_cache_params& host) {
  nsa_kv_cache_params p = host;
  for (nsa_tensor* t : {&p.k_pos, &p.k_w1, &p.k_b1, &p.k_w2, &p.k_b2, &p.v_pos, &p.v_w1, &p.v_b1,
                        &p.v_w2, &p.v_b2}) {
    *t = s.in(*t);
  }
  return p;
}

nsa_prefill_params stage(Staging& s, const nsa_prefill_params& host) {
  nsa_prefill_params p = host;
  for (nsa_tensor* t : {&p.q, &p.k, &p.v, &p.g_cmp, &p.g_slc, &p.g_win}) *t = s.in(*t);
  for (nsa_tensor* t : {&p.o, &p.lse_cmp, &p.lse_slc, &p.lse_win, &p.slc_indices_out}) {
    *t = s.out(*t);
  }
  return p;
}

}  // namespace nsa_test
