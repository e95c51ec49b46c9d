// Disk images through the mount, driven by the clients a hypervisor host uses: fio with
// verify, qemu-img, qemu-io with O_DIRECT; the bytes are checked in the backing files.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "mount.h"

using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;

namespace {

void* aligned_alloc_or_die(size_t align, size_t size) {
  void* p = nullptr;
  REQUIRE(posix_memalign(&p, align, size) == 0);
  return p;
}

}  // namespace

TEST_CASE("fio random writes from several jobs verify, and the backing file holds exactly what was written",
          "[image][fio]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  Mount m(t / "b", t / "m");
  std::string out;
  // Four jobs, each on its own 16 MiB region, random 4k direct writes at depth 16, then a
  // verify pass reading everything back through the mount.
  int rc = sh("cd " + q(t.path()) + " && fio --name=verify --filename=" + q(m.path("disk.raw")) +
                  " --size=16M --offset_increment=16M --numjobs=4 --rw=randwrite --bs=4k --ioengine=libaio"
                  " --iodepth=16 --direct=1 --verify=crc32c --verify_state_save=0 --verify_fatal=1 --do_verify=1 --randrepeat=0"
                  " --output-format=json --output=fio.json",
              &out);
  INFO(out << read_file(t / "fio.json") << m.log());
  REQUIRE(rc == 0);
  std::string json = read_file(t / "fio.json");
  CHECK(json.find("\"error\" : 0") != std::string::npos);
  CHECK(json.find("\"error\" : 5") == std::string::npos);
  // fio's own verify found nothing; now compare the mount's view with the backing file.
  REQUIRE(sh("cmp " + q(m.path("disk.raw")) + " " + q(t / "b/disk.raw"), &out) == 0);

  // Known bytes: 32 MiB of random data written through the mount with O_DIRECT in 1 MiB
  // requests land byte for byte in the backing file.
  REQUIRE(sh("head -c 32M /dev/urandom > " + q(t / "src") + " && dd if=" + q(t / "src") + " of=" +
                 q(m.path("known.img")) + " bs=1M oflag=direct conv=fsync status=none",
             &out) == 0);
  CHECK(sh("cmp " + q(t / "src") + " " + q(t / "b/known.img"), &out) == 0);
  CHECK(sh("cmp " + q(t / "src") + " " + q(m.path("known.img")), &out) == 0);
  // The disk counted the writes (stats are per open disk: hold it open while reading them).
  int fd = open(m.path("known.img").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  std::string stats = testing::get_xattr(m.path("known.img"), "user.iofilter.stats");
  CHECK(stats.find("\"path\":\"known.img\"") != std::string::npos);
  CHECK(stats.find("\"read_latency\"") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("qemu-img creates, inspects and checks images in the mount", "[image][qemu]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b/vm1") + " " + q(t / "m"));
  Mount m(t / "b", t / "m");
  std::string out;
  REQUIRE(sh("qemu-img create -f qcow2 " + q(m.path("vm1/disk.qcow2")) + " 2G", &out) == 0);
  REQUIRE(sh("qemu-img info " + q(m.path("vm1/disk.qcow2")), &out) == 0);
  CHECK(out.find("file format: qcow2") != std::string::npos);
  CHECK(out.find("virtual size: 2 GiB") != std::string::npos);
  REQUIRE(sh("qemu-io -t none -f qcow2 -c 'write -P 0x5c 0 3M' -c 'write -P 0x11 1G 64k' " +
                 q(m.path("vm1/disk.qcow2")),
             &out) == 0);
  REQUIRE(sh("qemu-img check " + q(m.path("vm1/disk.qcow2")), &out) == 0);
  CHECK(out.find("No errors were found on the image") != std::string::npos);
  // The backing file is a valid image with the same data.
  REQUIRE(sh("qemu-img check -U " + q(t / "b/vm1/disk.qcow2"), &out) == 0);
  REQUIRE(sh("qemu-io -r -U -f qcow2 -c 'read -P 0x5c 0 3M' -c 'read -P 0x11 1G 64k' " + q(t / "b/vm1/disk.qcow2"),
             &out) == 0);
  // Convert out of the mount and back into it.
  int convert_rc = sh("qemu-img convert -O raw " + q(m.path("vm1/disk.qcow2")) + " " + q(m.path("vm1/flat.raw")), &out);
  INFO(out << m.log());
  REQUIRE(convert_rc == 0);
  REQUIRE(sh("qemu-img compare " + q(m.path("vm1/disk.qcow2")) + " " + q(t / "b/vm1/flat.raw"), &out) == 0);

  // While the image is open, the mount's status reports it, by content, with its virtual size.
  int fd = open(m.path("vm1/disk.qcow2").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  std::string status = testing::get_xattr(m.mountpoint(), "user.iofilter.status");
  CHECK(status.find("\"path\":\"vm1/disk.qcow2\"") != std::string::npos);
  CHECK(status.find("\"format\":\"qcow2\"") != std::string::npos);
  CHECK(status.find("\"virtual_size\":2147483648") != std::string::npos);
  CHECK(testing::get_xattr(m.path("vm1/disk.qcow2"), "user.iofilter.state") == "active");
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("qemu-io with O_DIRECT writes and reads patterns, aligned or not", "[image][qemu][direct]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && truncate -s 64M " + q(t / "b/disk.raw"));
  Mount m(t / "b", t / "m");
  std::string out;
  REQUIRE(sh("qemu-io -t none -f raw -c 'write -P 0xa1 0 1M' -c 'write -P 0xb2 4096 512' -c 'read -P 0xa1 0 4096'"
             " -c 'read -P 0xb2 4096 512' -c 'read -P 0xa1 4608 1043968' -c 'aio_write -P 0xc3 8M 1M'"
             " -c 'aio_write -P 0xd4 16M 1M' -c aio_flush -c 'read -P 0xc3 8M 1M' -c 'read -P 0xd4 16M 1M' " +
                 q(m.path("disk.raw")),
             &out) == 0);
  INFO(out);
  CHECK(out.find("Pattern verification failed") == std::string::npos);
  REQUIRE(sh("qemu-io -r -U -f raw -c 'read -P 0xc3 8M 1M' -c 'read -P 0xb2 4096 512' " + q(t / "b/disk.raw"), &out) == 0);
  CHECK(out.find("Pattern verification failed") == std::string::npos);

  // Requests the kernel accepts with O_DIRECT but that are not block aligned, from buffers
  // that are not aligned either: the daemon must never pass those to an O_DIRECT descriptor.
  int fd = open(m.path("disk.raw").c_str(), O_RDWR | O_DIRECT);
  REQUIRE(fd >= 0);
  char* mem = static_cast<char*>(aligned_alloc_or_die(4096, 3 * 4096));
  std::memset(mem, 0x7e, 3 * 4096);
  CHECK(pwrite(fd, mem + 1, 1000, 100) == 1000);      // odd offset, odd length, odd buffer
  CHECK(pwrite(fd, mem + 1, 8192, 1 << 20) == 8192);  // aligned offset and length, odd buffer
  std::memset(mem, 0, 3 * 4096);
  CHECK(pread(fd, mem + 3, 1000, 100) == 1000);
  CHECK(mem[3] == 0x7e);
  CHECK(mem[1002] == 0x7e);
  CHECK(pread(fd, mem + 5, 8192, 1 << 20) == 8192);
  CHECK(mem[5] == 0x7e);
  CHECK(mem[5 + 8191] == 0x7e);
  free(mem);
  close(fd);
  std::string backing = read_file(t / "b/disk.raw");
  CHECK(backing[99] == static_cast<char>(0xa1));
  CHECK(backing[100] == 0x7e);
  CHECK(backing[1099] == 0x7e);
  CHECK(backing[1100] == static_cast<char>(0xa1));
  CHECK(m.stop() == 0);
}

TEST_CASE("punch-hole, SEEK_HOLE/SEEK_DATA, truncate and grow run through the image's chain", "[image]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  Mount m(t / "b", t / "m");
  std::string out;
  REQUIRE(sh("dd if=/dev/urandom of=" + q(m.path("disk.img")) + " bs=1M count=4 status=none", &out) == 0);
  REQUIRE(sh("fallocate --punch-hole --offset 1M --length 1M " + q(m.path("disk.img")), &out) == 0);
  int fd = open(m.path("disk.img").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  CHECK(lseek(fd, 0, SEEK_HOLE) == 1 << 20);
  CHECK(lseek(fd, 1 << 20, SEEK_DATA) == 2 << 20);
  CHECK(lseek(fd, 4 << 20, SEEK_DATA) == -1);
  CHECK(errno == ENXIO);
  char buf[4096];
  CHECK(pread(fd, buf, sizeof buf, (1 << 20) + 4096) == 4096);
  CHECK(std::count(buf, buf + sizeof buf, 0) == 4096);
  close(fd);
  struct stat st;
  REQUIRE(stat((t / "b/disk.img").c_str(), &st) == 0);
  CHECK(st.st_blocks * 512 <= 3 * (1 << 20) + 65536);  // the hole is a hole in the backing file

  // Zero-range and keep-size allocation pass down too.
  REQUIRE(sh("fallocate --zero-range --offset 3M --length 4096 " + q(m.path("disk.img")), &out) == 0);
  REQUIRE(sh("fallocate --keep-size --offset 4M --length 1M " + q(m.path("disk.img")), &out) == 0);
  REQUIRE(stat(m.path("disk.img").c_str(), &st) == 0);
  CHECK(st.st_size == 4 << 20);

  // truncate(2) on a closed image, and ftruncate on an open one.
  REQUIRE(truncate(m.path("disk.img").c_str(), 10 << 20) == 0);
  REQUIRE(stat((t / "b/disk.img").c_str(), &st) == 0);
  CHECK(st.st_size == 10 << 20);
  fd = open(m.path("disk.img").c_str(), O_RDWR);
  REQUIRE(ftruncate(fd, 2 << 20) == 0);
  REQUIRE(fstat(fd, &st) == 0);
  CHECK(st.st_size == 2 << 20);
  close(fd);
  REQUIRE(stat((t / "b/disk.img").c_str(), &st) == 0);
  CHECK(st.st_size == 2 << 20);
  // O_TRUNC through the mount.
  fd = open(m.path("disk.img").c_str(), O_RDWR | O_TRUNC);
  REQUIRE(fd >= 0);
  close(fd);
  REQUIRE(stat((t / "b/disk.img").c_str(), &st) == 0);
  CHECK(st.st_size == 0);
  CHECK(m.stop() == 0);
}

TEST_CASE("two handles on one image share one disk and see each other's writes", "[image]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && truncate -s 8M " + q(t / "b/disk.raw"));
  Mount m(t / "b", t / "m");
  int a = open(m.path("disk.raw").c_str(), O_RDWR | O_DIRECT);
  int b = open(m.path("disk.raw").c_str(), O_RDWR);
  REQUIRE(a >= 0);
  REQUIRE(b >= 0);
  char* buf = static_cast<char*>(aligned_alloc_or_die(4096, 8192));
  std::memset(buf, 'A', 4096);
  REQUIRE(pwrite(a, buf, 4096, 0) == 4096);
  REQUIRE(pread(b, buf + 4096, 4096, 0) == 4096);
  CHECK(std::memcmp(buf, buf + 4096, 4096) == 0);
  std::memset(buf, 'B', 4096);
  REQUIRE(pwrite(b, buf, 4096, 65536) == 4096);
  REQUIRE(fsync(b) == 0);
  REQUIRE(pread(a, buf + 4096, 4096, 65536) == 4096);
  CHECK(std::memcmp(buf, buf + 4096, 4096) == 0);
  // One disk, counting both handles' writes.
  std::string stats = testing::get_xattr(m.path("disk.raw"), "user.iofilter.stats");
  CHECK(stats.find("\"writes\":2") != std::string::npos);
  free(buf);
  close(a);
  close(b);
  CHECK(testing::get_xattr(m.path("disk.raw"), "user.iofilter.state") == "closed");
  CHECK(m.stop() == 0);
}

TEST_CASE("copy_file_range between images copies through the chains", "[image]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && head -c 3M /dev/urandom > " + q(t / "b/src.raw") + " && echo hi > " +
     q(t / "b/notes.txt"));
  Mount m(t / "b", t / "m");
  int in = open(m.path("src.raw").c_str(), O_RDONLY);
  int out = open(m.path("dst.raw").c_str(), O_WRONLY | O_CREAT, 0644);
  REQUIRE(in >= 0);
  REQUIRE(out >= 0);
  size_t total = 0;
  while (total < (3u << 20)) {
    ssize_t n = copy_file_range(in, nullptr, out, nullptr, (3u << 20) - total, 0);
    REQUIRE(n > 0);
    total += static_cast<size_t>(n);
  }
  close(in);
  close(out);
  std::string o;
  CHECK(sh("cmp " + q(t / "b/src.raw") + " " + q(t / "b/dst.raw"), &o) == 0);
  // Plain files use the backing filesystem's own copy.
  CHECK(sh("cp --reflink=never " + q(m.path("notes.txt")) + " " + q(m.path("notes2.txt")), &o) == 0);
  CHECK(read_file(t / "b/notes2.txt") == "hi\n");
  CHECK(m.stop() == 0);
}
