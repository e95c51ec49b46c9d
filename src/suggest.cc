#include "suggest.h"

#include <algorithm>

namespace iofilterfs {

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t subst = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, subst});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
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
