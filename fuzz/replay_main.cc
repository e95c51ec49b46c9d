// Without libFuzzer (GCC builds): runs the harness over each file named on the command line,
// so crashes found elsewhere replay as regressions.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream f(argv[i], std::ios::binary);
    std::vector<uint8_t> d((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    LLVMFuzzerTestOneInput(d.data(), d.size());
    std::printf("%s: ok\n", argv[i]);
  }
  return 0;
}
