// Hot reload under load: fio writes with verification while the policy file is changed and
// reloaded 20 times, adding and removing a filter each time, with one broken file in between.
#include <catch2/catch.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "mount.h"

using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;
using testing::write_file;

namespace {

int reload(const std::string& mnt) { return testing::set_xattr(mnt, "user.iofilter.reload", "1"); }

const char* kWithThrottle = "policies:\n  p:\n    throttle: { iops: 200000, bps: 4GiB/s }\nrules:\n  - { match: '*', policy: p }\n";
const char* kWithout = "policies:\n  p:\nrules:\n  - { match: '*', policy: p }\n";
const char* kBroken = "policies:\n  p:\n    throttle: { iops: -1 }\nrules:\n  - { match: '*', policy: p }\n";

}  // namespace

TEST_CASE("fio verify runs clean while the policy is reloaded 20 times, adding and removing filters",
          "[reload][fio]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  write_file(t / "ds.yaml", kWithout);
  // The image exists at its full size, so fio does not lay it out first (an open, writes and a
  // close before the job's own open, which the wait below could mistake for the job).
  sh("truncate -s 48M " + q(t / "b/disk.raw"));
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});

  // fio in the background: random 4k direct writes from two jobs on their own regions, then a
  // verify pass; its JSON result is read at the end.
  const std::string cmd = "fio --name=reload --filename=" + m.path("disk.raw") +
                          " --size=24M --offset_increment=24M --numjobs=2 --rw=randwrite --bs=4k --ioengine=libaio"
                          " --iodepth=8 --direct=1 --verify=crc32c --verify_state_save=0 --verify_fatal=1 --do_verify=1 --randrepeat=0"
                          " --rate_iops=1500 --output-format=json --output=" + t / "fio.json";
  pid_t fio = fork();
  if (fio == 0) {
    execl("/bin/bash", "bash", "-c", cmd.c_str(), nullptr);
    _exit(127);
  }
  REQUIRE(fio > 0);
  // Wait until the disk is open.
  auto open_now = [&] {
    return testing::get_xattr(m.mountpoint(), "user.iofilter.status").find("disk.raw") != std::string::npos;
  };
  for (int i = 0; i < 1000 && !open_now(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  REQUIRE(open_now());  // still open: the job's own open, not a passing one

  int reloads = 0, with_filter = 0;
  for (int i = 0; i < 20; ++i) {
    const bool add = i % 2 == 0;
    write_file(t / "ds.yaml", add ? kWithThrottle : kWithout);
    REQUIRE(reload(m.mountpoint()) == 0);
    ++reloads;
    std::string chain = testing::get_xattr(m.path("disk.raw"), "user.iofilter.chain");
    if (chain.rfind("throttle(", 0) == 0) ++with_filter;
    CHECK((add ? chain.rfind("throttle(", 0) == 0 : chain == "(empty)"));
    if (i == 9) {
      // A broken file in the middle: refused, the workload goes on with the chain it had.
      write_file(t / "ds.yaml", kBroken);
      CHECK(reload(m.mountpoint()) == EINVAL);
      CHECK(testing::get_xattr(m.path("disk.raw"), "user.iofilter.chain") == "(empty)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
  }
  int st = 0;
  // Still running after the reloads, so they all happened under load.
  CHECK(waitpid(fio, &st, WNOHANG) == 0);
  REQUIRE(waitpid(fio, &st, 0) == fio);
  std::string json = read_file(t / "fio.json");
  INFO(json.substr(0, 2000) << m.log());
  CHECK(WIFEXITED(st));
  CHECK(WEXITSTATUS(st) == 0);
  CHECK(json.find("\"error\" : 0") != std::string::npos);
  CHECK(json.find("verify") != std::string::npos);
  CHECK(reloads == 20);
  CHECK(with_filter == 10);
  CHECK(m.log().find("reload refused, the old policies stay in force") != std::string::npos);
  std::string stats = testing::get_xattr(m.mountpoint(), "user.iofilter.status");
  CHECK(stats.find("\"reloads\":20") != std::string::npos);
  CHECK(m.stop() == 0);
}
