// The content checks of the host-memory backends (REF and CPU): they read cu_seqlens and the
// caller's selection indices, which for these backends live in host memory (nsa.h, "Where memory
// lives"). A device backend registers its own (common/backend.h).
#include "common/backend.h"

namespace nsa {

// cu_seqlens starts at 0 and never decreases; the sequences it packs, with their compressed
// lengths and offsets (SPEC 3, packed).
Status host_sequences(const nsa_config& cfg, const int32_t* cu, int64_t num_seqs,
                      std::vector<Sequence>* seqs) {
  seqs->clear();
  if (cu[0] != 0) {
    return error(NSA_ERR_INVALID_SEQLENS, cat("cu_seqlens[0]: must be 0, got ", cu[0]));
  }
  int64_t cmp_start = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t begin = cu[s], end = cu[s + 1];
    if (end < begin) {
      return error(NSA_ERR_INVALID_SEQLENS,
                   cat("cu_seqlens: decreases at index ", s + 1, " (", begin, " then ", end, ")"));
    }
    const int64_t tc = nsa_cmp_len(&cfg, end - begin);
    seqs->push_back({0, begin, end - begin, cmp_start, tc});
    cmp_start += tc;
  }
  return Status::ok();
}

// host_sequences, then: cu_seqlens ends at T (nsa.h, nsa_fwd_inputs), and the compressed tensor
// has the rows its sequences imply, sum_s nsa_cmp_len(len_s).
Status host_packed(const PackedArgs& a, std::vector<Sequence>* seqs) {
  NSA_RETURN_IF_ERROR(host_sequences(*a.cfg, a.cu_seqlens, a.num_seqs, seqs));
  const int32_t last = a.cu_seqlens[a.num_seqs];
  if (last != a.T) {
    return error(NSA_ERR_INVALID_SEQLENS,
                 cat("cu_seqlens[", a.num_seqs, "]: must equal T = ", a.T, ", got ", last));
  }
  const int64_t tc = seqs->empty() ? 0 : seqs->back().cmp_start + seqs->back().cmp_len;
  for (const PackedArgs::Rows& r : a.cmp) {
    if (r.name == nullptr || r.rows == tc) continue;
    // Tc is derived (SPEC 3) rather than visible in any other argument, so it is explained.
    return error(NSA_ERR_INVALID_SHAPE,
                 cat(r.name, ": ", r.rows, " compressed rows given, but Tc = ", tc,
                     " compressed tokens, summed over the ", a.num_seqs,
                     " packed sequences (see nsa_cmp_seqlens)"));
  }
  return Status::ok();
}

// Every caller-supplied index is -1 or a visible block of its query: [0, t / l'] (SPEC 4.3).
Status host_indices(const IndexArgs& a) {
  const nsa_tensor& ix = *a.indices;
  const int64_t n = a.cfg->slc_count, lp = a.cfg->slc_block;
  const int32_t* base = static_cast<const int32_t*>(ix.data);
  for (const Sequence& s : *a.seqs) {
    for (int64_t t = 0; t < s.len; ++t) {
      for (int64_t h = 0; h < a.Hkv; ++h) {
        for (int64_t k = 0; k < n; ++k) {
          const int32_t j = base[offset_of(ix, s.batch, s.start + t, h, k)];
          if (j == -1) continue;
          if (j < 0 || j > t / lp) {
            return error(NSA_ERR_INVALID_INDEX,
                         cat(a.name, "[", s.batch, ", ", s.start + t, ", ", h, ", ", k, "] = ", j,
                             ": out of range for a query at position ", t,
                             " of its sequence (valid: -1, or 0 .. ", t / lp, ")"));
          }
        }
      }
    }
  }
  return Status::ok();
}

}  // namespace nsa
