// "Did you mean" suggestions for unknown names in configuration files.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace iofilterfs {

// Edit distance between a and b (optimal string alignment: a swap of neighbours costs one).
size_t edit_distance(std::string_view a, std::string_view b);

// The known name closest to `unknown`, if it is close enough to be a likely typo; else "".
std::string closest_name(std::string_view unknown, const std::vector<std::string>& known);

// " (did you mean 'x'?)" or "".
std::string did_you_mean(std::string_view unknown, const std::vector<std::string>& known);

}  // namespace iofilterfs
