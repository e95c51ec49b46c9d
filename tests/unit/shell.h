// Unit-test helpers for tests that use real tools (qemu-img, qemu-io) as the reference: run a
// shell command and capture its output, require that it succeeds, read a file whole; a scratch
// directory removed with everything in it.
#pragma once

#include <catch2/catch.hpp>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
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

// A fresh directory under $TMPDIR (or /tmp), removed with its contents at the end of scope.
struct TempDir {
  std::string path;
  explicit TempDir(const std::string& prefix) {
    const char* base = std::getenv("TMPDIR");
    std::string t = std::string(base && *base ? base : "/tmp") + "/" + prefix + "-XXXXXX";
    if (!::mkdtemp(t.data())) throw std::runtime_error("mkdtemp");
    path = t;
  }
  ~TempDir() { (void)std::system(("rm -rf '" + path + "'").c_str()); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& n) const { return path + "/" + n; }
};

}  // namespace unit_shell
