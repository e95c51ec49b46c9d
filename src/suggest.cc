#include "suggest.h"

#include <algorithm>

namespace iofilterfs {

size_t edit_distance(std::string_view a, std::string_view b) {
  // Optimal string alignment: insertions, deletions, substitutions and transpositions of
  // neighbours each cost one ("iosp" is one step from "iops").
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<size_t>> d(n + 1, std::vector<size_t>(m + 1));
  for (size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (size_t i = 1; i <= n; ++i) {
    for (size_t j = 1; j <= m; ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[n][m];
}

std::string closest_name(std::string_view unknown, const std::vector<std::string>& known) {
  std::string best;
  size_t best_d = ~size_t{0};
  for (const std::string& k : known) {
    size_t d = edit_distance(unknown, k);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  // A typo: at most a third of the longer name wrong, and at least one character right.
  size_t longest = std::max(unknown.size(), best.size());
  if (best.empty() || best_d == 0 || best_d * 3 > longest || best_d >= longest) return {};
  return best;
}

std::string did_you_mean(std::string_view unknown, const std::vector<std::string>& known) {
  std::string c = closest_name(unknown, known);
  return c.empty() ? std::string() : " (did you mean '" + c + "'?)";
}

}  // namespace iofilterfs
