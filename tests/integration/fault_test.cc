// The fault-injection layer through a real mount: switched on per image by a test, never
// present unless the daemon was started with --fault-injection.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "mount.h"

using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;

TEST_CASE("injected errors reach the caller with the chosen errno, then stop", "[fault]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && truncate -s 1M " + q(t / "b/disk.raw"));
  Mount m(t / "b", t / "m", {{"--fault-injection"}});
  int fd = open(m.path("disk.raw").c_str(), O_RDWR | O_DIRECT);
  REQUIRE(fd >= 0);
  REQUIRE(testing::set_xattr(m.path("disk.raw"), "user.iofilter.fault", "fail=write:ENOSPC:1") == 0);
  alignas(4096) static char buf[4096];
  std::memset(buf, 'z', sizeof buf);
  CHECK(pwrite(fd, buf, 4096, 0) == -1);
  CHECK(errno == ENOSPC);
  CHECK(pwrite(fd, buf, 4096, 0) == 4096);
  REQUIRE(testing::set_xattr(m.path("disk.raw"), "user.iofilter.fault", "fail=read:EIO") == 0);
  CHECK(pread(fd, buf, 4096, 0) == -1);
  CHECK(errno == EIO);
  REQUIRE(testing::set_xattr(m.path("disk.raw"), "user.iofilter.fault", "clear; delay=read:30ms") == 0);
  auto t0 = std::chrono::steady_clock::now();
  CHECK(pread(fd, buf, 4096, 0) == 4096);
  CHECK(std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(30));  // a lower bound only
  CHECK(testing::set_xattr(m.path("disk.raw"), "user.iofilter.fault", "fail=write:EWHAT") == EINVAL);
  CHECK(m.log().find("bad fault plan: unknown errno 'EWHAT'") != std::string::npos);
  std::string stats(4096, '\0');
  ssize_t n = getxattr(m.path("disk.raw").c_str(), "user.iofilter.stats", stats.data(), stats.size());
  REQUIRE(n > 0);
  CHECK(stats.find("\"errors\":2") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("a power cut drops exactly the writes not yet flushed", "[fault]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && truncate -s 1M " + q(t / "b/disk.raw"));
  Mount m(t / "b", t / "m", {{"--fault-injection"}});
  int fd = open(m.path("disk.raw").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  REQUIRE(testing::set_xattr(m.path("disk.raw"), "user.iofilter.fault", "track") == 0);
  REQUIRE(pwrite(fd, "durable", 7, 0) == 7);
  REQUIRE(fsync(fd) == 0);
  REQUIRE(pwrite(fd, "LOST", 4, 0) == 4);
  REQUIRE(pwrite(fd, "lost-too", 8, 4096) == 8);
  REQUIRE(ftruncate(fd, 2 << 20) == 0);
  REQUIRE(testing::set_xattr(m.path("disk.raw"), "user.iofilter.fault", "powercut") == 0);
  std::string backing = read_file(t / "b/disk.raw");
  CHECK(backing.size() == 1u << 20);
  CHECK(backing.substr(0, 7) == "durable");
  CHECK(backing.substr(4096, 8) == std::string(8, '\0'));
  char buf[8];
  CHECK(pread(fd, buf, 7, 0) == -1);  // the disk is "off" until cleared
  CHECK(errno == EIO);
  REQUIRE(testing::set_xattr(m.path("disk.raw"), "user.iofilter.fault", "clear") == 0);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("without --fault-injection there is no fault layer to switch on", "[fault]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && truncate -s 1M " + q(t / "b/disk.raw"));
  Mount m(t / "b", t / "m");
  int fd = open(m.path("disk.raw").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  CHECK(testing::set_xattr(m.path("disk.raw"), "user.iofilter.fault", "fail=write:EIO") == ENOTSUP);
  CHECK(pwrite(fd, "fine", 4, 0) == 4);
  close(fd);
  // Control names are answered by the daemon, never stored on the backing file.
  CHECK(getxattr((t / "b/disk.raw").c_str(), "user.iofilter.fault", nullptr, 0) == -1);
  CHECK(m.stop() == 0);
}
