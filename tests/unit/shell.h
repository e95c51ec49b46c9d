// Unit-test helpers for tests that use real tools (qemu-img, qemu-io) as the reference: run a
// shell command and capture its output, require that it succeeds, read a file whole.
#pragma once

#include <catch2/catch.hpp>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

namespace unit_shell {

// Runs `cmd` with sh, stdout and stderr together into *out; the exit status (128: a signal).
inline int run(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = ::popen(("(" + cmd + ") 2>&1").c_str(), "r");
  if (!p) return -1;
  std::string o;
  char b[4096];
  size_t n;
  while ((n = fread(b, 1, sizeof b, p)) > 0) o.append(b, n);
  int st = ::pclose(p);
  if (out) *out = o;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

// Runs `cmd` and fails the test, with the command and its output, unless it exits 0.
inline void must(const std::string& cmd) {
  std::string out;
  int rc = run(cmd, &out);
  INFO(cmd << "\n" << out);
  REQUIRE(rc == 0);
}

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace unit_shell
