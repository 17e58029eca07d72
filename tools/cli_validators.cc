#include "cli_validators.h"

#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

namespace cli {
namespace {

std::string in_quotes(const std::string& s) { return "\"" + s + "\""; }

std::string range_text(const std::string& lo, const std::string& hi) {
  return "[" + lo + ", " + hi + "]";
}

// An optional sign then decimal digits: what may be an integer, in range or not.
bool looks_integer(const std::string& s) {
  const size_t start = !s.empty() && (s[0] == '+' || s[0] == '-') ? 1 : 0;
  if (start == s.size()) return false;
  for (size_t i = start; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
  }
  return true;
}

// Reads s as a T in [lo, hi] into *out; returns the reason it is not one, or "".
template <typename T>
std::string read_integer(const std::string& s, T lo, T hi, T* out) {
  if (!looks_integer(s)) return in_quotes(s) + " is not an integer";
  const char* first = s.data() + (s[0] == '+' ? 1 : 0);
  T v{};
  const auto [end, ec] = std::from_chars(first, s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < lo || v > hi) {
    return in_quotes(s) + " is out of range " + range_text(std::to_string(lo), std::to_string(hi));
  }
  *out = v;
  return "";
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024 && u < 6) {
    bytes /= 1024;
    ++u;
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3g %s", bytes, units[u]);
  return buf;
}

}  // namespace

CLI::Validator Integer(int64_t lo, int64_t hi) {
  return CLI::Validator(
      [lo, hi](std::string& s) {
        int64_t v = 0;
        std::string err = read_integer(s, lo, hi, &v);
        if (err.empty()) s = std::to_string(v);
        return err;
      },
      "");
}

CLI::Validator Unsigned64() {
  return CLI::Validator(
      [](std::string& s) {
        uint64_t v = 0;
        std::string err = read_integer<uint64_t>(s, 0, UINT64_MAX, &v);
        if (err.empty()) s = std::to_string(v);
        return err;
      },
      "");
}

CLI::Validator Real(double lo, double hi) {
  return CLI::Validator(
      [lo, hi](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = s.empty() ? 0.0 : std::strtod(s.c_str(), &end);
        if (s.empty() || end != s.c_str() + s.size()) return in_quotes(s) + " is not a number";
        if (!std::isfinite(v) || v < lo || v > hi) {
          return in_quotes(s) + " is out of range " +
                 range_text(CLI::detail::to_string(lo), CLI::detail::to_string(hi));
        }
        return "";
      },
      "");
}

std::vector<std::string> list_items(const std::string& list) {
  std::vector<std::string> items(1);
  for (char c : list) {
    if (c == ',') {
      items.emplace_back();
    } else {
      items.back() += c;
    }
  }
  return items;
}

CLI::Validator IntegerList(int64_t lo, int64_t hi) {
  return CLI::Validator(
      [lo, hi](std::string& s) {
        if (s.empty()) return std::string("the list is empty");
        const std::vector<std::string> items = list_items(s);
        std::string canonical;
        for (size_t i = 0; i < items.size(); ++i) {
          if (items[i].empty())
            return in_quotes(s) + " has an empty item (item " + std::to_string(i + 1) + ")";
          int64_t v = 0;
          std::string err = read_integer(items[i], lo, hi, &v);
          if (!err.empty()) return err;
          canonical += (i == 0 ? "" : ",") + std::to_string(v);
        }
        s = canonical;
        return std::string();
      },
      "");
}

CLI::Validator NameList(std::vector<std::string> names) {
  return CLI::Validator(
      [names = std::move(names)](std::string& s) -> std::string {
        if (s.empty()) return "the list is empty";
        const std::vector<std::string> items = list_items(s);
        for (size_t i = 0; i < items.size(); ++i) {
          if (items[i].empty())
            return in_quotes(s) + " has an empty item (item " + std::to_string(i + 1) + ")";
          bool known = false;
          for (const std::string& n : names) known = known || items[i] == n;
          if (!known)
            return in_quotes(items[i]) + " is not one of " + CLI::detail::join(names, ", ");
        }
        return "";
      },
      "");
}

std::vector<int64_t> integer_list(const std::string& list) {
  std::vector<int64_t> out;
  for (const std::string& item : list_items(list)) {
    int64_t v = 0;
    std::from_chars(item.data(), item.data() + item.size(), v);
    out.push_back(v);
  }
  return out;
}

void require_multiple(int64_t hq, int64_t hkv) {
  if (hkv > 0 && hq % hkv != 0) {
    throw CLI::ValidationError(
        "--hq", std::to_string(hq) + " query heads is not a multiple of --hkv " +
                    std::to_string(hkv) + " (each KV head serves a group of query heads)");
  }
}

void require_memory(const std::string& what, double bytes) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  const double physical =
      pages > 0 && page > 0 ? double(pages) * double(page) : std::ldexp(1.0, 40);
  if (std::isfinite(bytes) && bytes <= 4 * physical) return;
  throw CLI::ValidationError(what, "needs about " + human_bytes(bytes) +
                                       " of buffers, more than 4x this machine's " +
                                       human_bytes(physical) + " of memory");
}

}  // namespace cli
