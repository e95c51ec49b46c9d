#include "units.h"

#include <cctype>
#include <cstdio>
#include <limits>

namespace iofilterfs {
namespace {

// Splits "  12.5 KiB " into 12.5 and "KiB".
bool split_number(std::string_view s, double* value, std::string_view* unit) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  size_t i = 0;
  bool digits = false, dot = false;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (std::isdigit(static_cast<unsigned char>(c))) digits = true;
    else if (c == '.' && !dot) dot = true;
    else break;
  }
  if (!digits) return false;
  *value = std::stod(std::string(s.substr(0, i)));
  std::string_view u = s.substr(i);
  while (!u.empty() && std::isspace(static_cast<unsigned char>(u.front()))) u.remove_prefix(1);
  *unit = u;
  return true;
}

}  // namespace

std::string parse_size(std::string_view s, uint64_t* bytes) {
  double v;
  std::string_view u;
  if (!split_number(s, &v, &u)) return "'" + std::string(s) + "' is not a size (e.g. 4096, 64KiB, 20GiB)";
  struct Unit { const char* name; double mult; };
  static const Unit units[] = {
      {"", 1}, {"B", 1},
      {"K", 1024.0}, {"KiB", 1024.0}, {"KB", 1e3}, {"k", 1024.0},
      {"M", 1048576.0}, {"MiB", 1048576.0}, {"MB", 1e6},
      {"G", 1073741824.0}, {"GiB", 1073741824.0}, {"GB", 1e9},
      {"T", 1099511627776.0}, {"TiB", 1099511627776.0}, {"TB", 1e12},
  };
  for (const Unit& unit : units) {
    if (u == unit.name) {
      double b = v * unit.mult;
      if (b > static_cast<double>(std::numeric_limits<uint64_t>::max() / 2))
        return "'" + std::string(s) + "' is too large";
      if (b != static_cast<double>(static_cast<uint64_t>(b)))
        return "'" + std::string(s) + "' is not a whole number of bytes";
      *bytes = static_cast<uint64_t>(b);
      return {};
    }
  }
  return "'" + std::string(s) + "': unknown size unit '" + std::string(u) + "' (use B, KiB, MiB, GiB, TiB)";
}

std::string parse_duration(std::string_view s, uint64_t* usec) {
  double v;
  std::string_view u;
  if (!split_number(s, &v, &u)) return "'" + std::string(s) + "' is not a duration (e.g. 250ms, 5s, 24h)";
  struct Unit { const char* name; double mult; };
  static const Unit units[] = {
      {"", 1e6}, {"us", 1}, {"ms", 1e3}, {"s", 1e6}, {"m", 60e6}, {"min", 60e6}, {"h", 3600e6}, {"d", 86400e6},
  };
  for (const Unit& unit : units) {
    if (u == unit.name) {
      *usec = static_cast<uint64_t>(v * unit.mult + 0.5);
      return {};
    }
  }
  return "'" + std::string(s) + "': unknown duration unit '" + std::string(u) + "' (use us, ms, s, m, h, d)";
}

std::string format_size(uint64_t bytes) {
  static const char* names[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int i = 0;
  while (v >= 1024 && i < 5) {
    v /= 1024;
    ++i;
  }
  char buf[32];
  if (i == 0) std::snprintf(buf, sizeof buf, "%lluB", static_cast<unsigned long long>(bytes));
  else std::snprintf(buf, sizeof buf, "%.1f%s", v, names[i]);
  return buf;
}

}  // namespace iofilterfs
