// The image lock: while the daemon has an image open for writing, neither a second daemon over
// the same backing directory nor QEMU opening the backing file directly can write it.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <unistd.h>

#include "mount.h"

using testing::Mount;
using testing::q;
using testing::sh;
using testing::TempDir;

TEST_CASE("a second daemon and QEMU cannot open an image the first daemon has open", "[lock]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m1") + " " + q(t / "m2") + " && truncate -s 16M " + q(t / "b/disk.raw"));
  Mount first(t / "b", t / "m1");
  Mount second(t / "b", t / "m2");

  int fd = open(first.path("disk.raw").c_str(), O_RDWR);
  REQUIRE(fd >= 0);

  int fd2 = open(second.path("disk.raw").c_str(), O_RDWR);
  CHECK(fd2 == -1);
  CHECK(errno == EBUSY);
  CHECK(second.log().find("disk.raw: open refused: image is locked by another process") != std::string::npos);
  // Not even for reading: the first holds it exclusively while it may write.
  CHECK(open(second.path("disk.raw").c_str(), O_RDONLY) == -1);

  // QEMU checks OFD byte-range locks on the file; it reports its own lock error.
  std::string out;
  CHECK(sh("qemu-io -f raw -c 'write 0 4k' " + q(t / "b/disk.raw"), &out) != 0);
  CHECK(out.find("lock") != std::string::npos);

  close(fd);
  // Released with the last handle: now the second daemon may open it, and the first may not.
  // The kernel sends the release after close(2) returns, so the first daemon may still be
  // closing the disk for a moment.
  for (int i = 0; i < 100 && (fd2 = open(second.path("disk.raw").c_str(), O_RDWR)) < 0 && errno == EBUSY; ++i)
    usleep(50'000);
  CHECK(fd2 >= 0);
  CHECK(open(first.path("disk.raw").c_str(), O_RDWR) == -1);
  close(fd2);
  CHECK(sh("qemu-io -f raw -c 'write 0 4k' " + q(t / "b/disk.raw"), &out) == 0);
  CHECK(first.stop() == 0);
  CHECK(second.stop() == 0);
}

TEST_CASE("readers share an image, a writer needs it alone", "[lock]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m1") + " " + q(t / "m2") + " && truncate -s 1M " + q(t / "b/disk.raw"));
  Mount first(t / "b", t / "m1");
  Mount second(t / "b", t / "m2");
  int r1 = open(first.path("disk.raw").c_str(), O_RDONLY);
  int r2 = open(second.path("disk.raw").c_str(), O_RDONLY);
  CHECK(r1 >= 0);
  CHECK(r2 >= 0);
  // A writer on the first daemon cannot take the image while the second reads it.
  CHECK(open(first.path("disk.raw").c_str(), O_RDWR) == -1);
  CHECK(errno == EBUSY);
  close(r1);
  close(r2);
  CHECK(first.stop() == 0);
  CHECK(second.stop() == 0);
}
