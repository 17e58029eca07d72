// The validators and limits shared by the options of the `nsa` subcommands. A bad value fails the
// parse with a CLI::ValidationError naming the option, so that nsa_main.cc prints one line and
// exits 2 before anything is allocated or run.
//
// Integers are read here rather than by CLI11's own conversion, which reads base 0 (a leading 0
// is octal) and wraps out-of-range values silently (99999999999999999999 became a huge length
// and a std::length_error). The validators are transforms: they rewrite the value in plain
// decimal, so that what CLI11 then stores is the value that was checked.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "nsa/nsa.h"

namespace cli {

// Upper bounds of the options. They keep every size the tool computes (B * T * H * D elements,
// cache capacities, step counts) far from int64 / size_t overflow; the memory a combination
// needs is checked separately (require_memory).
inline constexpr int64_t kMaxTokens = int64_t(1) << 24;  // a length, a sequence, a packed total
inline constexpr int64_t kMaxBatch = 65536;
inline constexpr int64_t kMaxHeads = 4096;               // Hq, Hkv
inline constexpr int64_t kMaxHeadDim = 4096;             // Dk, Dv, the mlp hidden width
inline constexpr int64_t kMaxThreads = NSA_MAX_THREADS;  // the library's bound
inline constexpr int64_t kMaxRepeats = 10000;            // --repeats, --steps

// One integer in [lo, hi], rewritten in plain decimal.
CLI::Validator Integer(int64_t lo, int64_t hi);
// Any uint64 (a seed), rewritten in plain decimal: CLI11 would take -1 as 2^64 - 1.
CLI::Validator Unsigned64();
// A finite real number in [lo, hi].
CLI::Validator Real(double lo, double hi);
// A comma-separated list of integers, each in [lo, hi]; no empty item.
CLI::Validator IntegerList(int64_t lo, int64_t hi);
// A comma-separated list of names, each one of `names`; no empty item.
CLI::Validator NameList(std::vector<std::string> names);

// The items of a comma-separated list, empty ones included ("1,,2," has four).
std::vector<std::string> list_items(const std::string& list);
// The values of a list IntegerList accepted.
std::vector<int64_t> integer_list(const std::string& list);

// Adds an integer option checked against [lo, hi], the bounds stated in its help.
template <typename T>
CLI::Option* add_integer(CLI::App* cmd, const std::string& names, T& value, const std::string& help,
                         int64_t lo, int64_t hi) {
  return cmd
      ->add_option(names, value, help + ", " + std::to_string(lo) + " to " + std::to_string(hi))
      ->transform(Integer(lo, hi))
      ->capture_default_str();
}

// Throws a CLI::ValidationError naming --hq when hq is not a multiple of hkv: every op rejects it
// (a query head group shares one KV head), so the run would only fail later with exit 1.
void require_multiple(int64_t hq, int64_t hkv);

// Throws a CLI::ValidationError (`what` names the options) when `bytes`, the tool's estimate of
// its buffers, exceeds 4x the machine's physical memory: a slip such as an extra digit would
// otherwise end in an out-of-memory kill rather than a message.
void require_memory(const std::string& what, double bytes);

}  // namespace cli
