// `nsa info`: the build, the CPU features this machine has, and the backends and kernels built.
#include <omp.h>

#include <cstdio>
#include <string>

#include "commands.h"
#include "nsa/nsa.h"
#include "nsa/nsa_cuda.h"

namespace {

void print_cpu_features() {
  std::string features;
  auto add = [&](const char* name, bool has) {
    if (has) features += std::string(features.empty() ? "" : " ") + name;
  };
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  add("sse4.2", __builtin_cpu_supports("sse4.2"));
  add("avx", __builtin_cpu_supports("avx"));
  add("avx2", __builtin_cpu_supports("avx2"));
  add("fma", __builtin_cpu_supports("fma"));
  add("avx512f", __builtin_cpu_supports("avx512f"));
  add("avx512bw", __builtin_cpu_supports("avx512bw"));
  add("avx512vl", __builtin_cpu_supports("avx512vl"));
  add("avx512bf16", __builtin_cpu_supports("avx512bf16"));
  add("avx512vnni", __builtin_cpu_supports("avx512vnni"));
#elif defined(__aarch64__)
  add("aarch64", true);
#endif
  std::printf("cpu features: %s\n", features.empty() ? "(none detected)" : features.c_str());
  std::printf("openmp threads: %d available, %d processors\n", omp_get_max_threads(),
              omp_get_num_procs());
}

}  // namespace

Command add_info_command(CLI::App& app) {
  app.add_subcommand("info", "Print the build, the CPU features and the available backends");
  return [] {
    std::printf("nsa %s\n%s\n", nsa_version(), nsa_build_info());
    print_cpu_features();
    const nsa_backend backends[] = {NSA_BACKEND_REF, NSA_BACKEND_CPU, NSA_BACKEND_CUDA};
    std::printf("backends:\n");
    const bool cuda_built = std::string(nsa_build_info()).find("cuda: ON") != std::string::npos;
    for (nsa_backend b : backends) {
      if (b == NSA_BACKEND_CUDA) {
        // Built without a device is the usual CI case: say which of the two is missing.
        if (!cuda_built) {
          std::printf("  cuda  not available in this build (CMake NSA_CUDA, needs nvcc)\n");
        } else if (!nsa_backend_available(b)) {
          std::printf("  cuda  built, but no device found (no GPU, or no driver)\n");
        } else {
          std::printf("  cuda  available on %d device(s): forward (cmp, slc, win, gates), compress "
                      "(mean, mlp), dense baseline\n",
                      nsa_cuda_device_count());
        }
        continue;
      }
      if (!nsa_backend_available(b)) {
        std::printf("  %-5s not available in this build\n", nsa_backend_name(b));
        continue;
      }
      std::printf(
          "  %-5s available: forward and backward (cmp, slc, win, gates), compress and its "
          "backward (mean, mlp), dense baseline%s\n",
          nsa_backend_name(b), b == NSA_BACKEND_CPU ? ", KV-cache decode" : "");
    }
    std::printf("auto backend resolves to: %s\n",
                nsa_backend_available(NSA_BACKEND_CPU) ? "cpu" : "ref");
    // nsa_bf16_math: what AUTO runs here, and which variants this CPU can run at all.
    const bool native = nsa_bf16_math_available(NSA_BF16_MATH_NATIVE) != 0;
    std::printf("bf16 arithmetic (cpu dense forward, bf16 inputs): %s\n",
                nsa_bf16_math_auto() == NSA_BF16_MATH_NATIVE
                    ? "native AVX512_BF16 (vdpbf16ps: bf16 products, f32 sums)"
                    : "f32 (inputs widened; this CPU lacks AVX512_BF16)");
    std::printf("  variants this CPU runs: f32%s%s\n", native ? ", native" : "",
                nsa_bf16_math_available(NSA_BF16_MATH_EMULATED) ? ", emulated (tests)" : "");
    return 0;
  };
}
