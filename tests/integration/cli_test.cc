// The daemon's command line: bad input gets one clear line and exit status 2 and changes
// nothing; signals unmount cleanly; every option in --help is in the man page.
#include <catch2/catch.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sstream>

#include "mount.h"

using testing::daemon_binary;
using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;

namespace {

// Runs the daemon with `args` (never -f: a refusal must come before any detaching).
int run_daemon(const std::string& args, std::string* out) {
  return sh("timeout 20 " + q(daemon_binary()) + " " + args, out);
}

// The page names the option as a whole word: "\\-c" but not as the start of "\\-\\-config".
bool mentions_option(const std::string& page, const std::string& escaped) {
  for (size_t p = page.find(escaped); p != std::string::npos; p = page.find(escaped, p + 1)) {
    char next = p + escaped.size() < page.size() ? page[p + escaped.size()] : ' ';
    if (!std::isalnum(static_cast<unsigned char>(next)) && next != '\\') return true;
  }
  return false;
}

int lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

}  // namespace

TEST_CASE("bad input is refused with one line, exit status 2, and nothing mounted or created", "[cli]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " " + q(t / "full") + " && touch " + q(t / "full/x") + " " +
     q(t / "afile"));
  std::string out;

  CHECK(run_daemon(q(t / "missing") + " " + q(t / "m"), &out) == 2);
  CHECK(out == "iofilterfs: backing directory " + t / "missing" + ": No such file or directory\n");

  CHECK(run_daemon(q(t / "afile") + " " + q(t / "m"), &out) == 2);
  CHECK(out == "iofilterfs: backing directory " + t / "afile" + ": not a directory\n");

  CHECK(run_daemon(q(t / "b") + " " + q(t / "nomount"), &out) == 2);
  CHECK(out == "iofilterfs: mountpoint " + t / "nomount" + ": No such file or directory\n");
  CHECK(access((t / "nomount").c_str(), F_OK) != 0);

  CHECK(run_daemon(q(t / "b") + " " + q(t / "full"), &out) == 2);
  CHECK(out == "iofilterfs: mountpoint " + t / "full" + ": not empty\n");

  CHECK(run_daemon(q(t / "b") + " " + q(t / "b/sub"), &out) == 2);
  sh("mkdir " + q(t / "b/sub"));
  CHECK(run_daemon(q(t / "b") + " " + q(t / "b/sub"), &out) == 2);
  CHECK(out.find("must not contain each other") != std::string::npos);
  CHECK(lines(out) == 1);

  CHECK(run_daemon("--bogus " + q(t / "b") + " " + q(t / "m"), &out) == 2);
  CHECK(out.find("--bogus") != std::string::npos);
  CHECK(run_daemon("-o frobnicate " + q(t / "b") + " " + q(t / "m"), &out) == 2);
  CHECK(out == "iofilterfs: unknown mount option 'frobnicate'\n");
  CHECK(run_daemon(q(t / "b"), &out) == 2);
  CHECK(run_daemon("--log-level chatty " + q(t / "b") + " " + q(t / "m"), &out) == 2);

  CHECK_FALSE(testing::is_mounted(t / "m"));
  CHECK(sh("ls -A " + q(t / "b") + " " + q(t / "m"), &out) == 0);
  CHECK(out.find("sub") != std::string::npos);
}

TEST_CASE("an already mounted mountpoint is refused", "[cli]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  Mount m(t / "b", t / "m");
  std::string out;
  CHECK(run_daemon(q(t / "b") + " " + q(t / "m"), &out) == 2);
  CHECK(out == "iofilterfs: mountpoint " + t / "m" + ": already mounted\n");
  CHECK(m.mounted());
  CHECK(m.stop() == 0);
}

TEST_CASE("a backing directory on a read-only filesystem needs -o ro", "[cli]") {
  TempDir t;
  sh("mkdir -p " + q(t / "ro") + " " + q(t / "m"));
  REQUIRE(sh("mount -t tmpfs -o size=8m tmpfs " + q(t / "ro") + " && truncate -s 1M " + q(t / "ro/disk.raw") +
             " && mount -o remount,ro " + q(t / "ro")) == 0);
  std::string out;
  CHECK(run_daemon(q(t / "ro") + " " + q(t / "m"), &out) == 2);
  CHECK(out == "iofilterfs: backing directory " + t / "ro" +
                   " is on a read-only filesystem; mount with -o ro\n");
  {
    Mount m(t / "ro", t / "m", {{"-o", "ro"}});
    CHECK(read_file(m.path("disk.raw")).size() == 1u << 20);
    CHECK(m.stop() == 0);
  }
  sh("umount " + q(t / "ro"));
}

TEST_CASE("SIGTERM and SIGINT unmount cleanly with exit status 0", "[cli]") {
  for (int sig : {SIGTERM, SIGINT}) {
    TempDir t;
    sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
    Mount m(t / "b", t / "m");
    testing::write_file(m.path("f"), "x");
    REQUIRE(kill(m.pid(), sig) == 0);
    for (int i = 0; i < 500 && m.mounted(); ++i) usleep(20000);
    CHECK_FALSE(m.mounted());
    CHECK(m.stop() == 0);
    CHECK(m.log().find("unmounted " + t / "m") != std::string::npos);
  }
}

TEST_CASE("without -f the daemon detaches once mounted, and logs to syslog", "[cli]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  std::string out;
  REQUIRE(run_daemon(q(t / "b") + " " + q(t / "m"), &out) == 0);
  CHECK(testing::is_mounted(t / "m"));
  testing::write_file(t / "m/x", "y");
  CHECK(read_file(t / "b/x") == "y");
  CHECK(sh("fusermount3 -u " + q(t / "m")) == 0);
  CHECK_FALSE(testing::is_mounted(t / "m"));
}

TEST_CASE("the version, and every option in --help, are in iofilterfs(8)", "[cli][docs]") {
  std::string out;
  REQUIRE(run_daemon("--version", &out) == 0);
  CHECK(out.rfind("iofilterfs ", 0) == 0);
  REQUIRE(run_daemon("--help", &out) == 0);
  std::string page = read_file(testing::source_dir() + "/man/iofilterfs.8");
  REQUIRE_FALSE(page.empty());
  std::istringstream in(out);
  std::string word;
  int options = 0;
  while (in >> word) {
    if (word.rfind("-", 0) != 0 || word == "-") continue;
    word = word.substr(0, word.find_first_of(":=["));
    std::istringstream names(word);
    std::string name;
    while (std::getline(names, name, ',')) {  // "-c,--config"
      // groff escapes the hyphens of options: \-f, \-\-config
      std::string escaped;
      for (char c : name) escaped += c == '-' ? std::string("\\-") : std::string(1, c);
      INFO("option " << name);
      CHECK(mentions_option(page, escaped));
      ++options;
    }
  }
  CHECK(options >= 14);
}
