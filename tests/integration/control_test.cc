// The control plane: every user.iofilter.* attribute and verb, through getfattr/setfattr and
// through iofilterctl, including the refusals.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <atomic>
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

std::string ctl() {
  std::string d = testing::daemon_binary();
  return q(d.substr(0, d.rfind('/')) + "/iofilterctl");
}

const std::string kNobody = "setpriv --reuid=65534 --regid=65534 --clear-groups -- ";

struct Fixture {
  TempDir t;
  std::unique_ptr<Mount> m;
  Fixture() {
    sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && truncate -s 8M " + q(t / "b/disk.raw") + " && chmod 0666 " + q(t / "b/disk.raw") + " && echo hi > " +
       q(t / "b/notes.txt") + " && chmod 0755 " + q(t.path()));
    write_file(t / "ds.yaml", "policies:\n  gold:\n  bronze:\nrules:\n  - { match: '*', policy: bronze }\n");
    m = std::make_unique<Mount>(t / "b", t / "m", Mount::Options{{"--config", t / "ds.yaml", "-o", "allow_other"}});
  }
};

}  // namespace

TEST_CASE("control attributes read on an image and on the mount's root", "[control]") {
  Fixture f;
  Mount& m = *f.m;
  const std::string img = m.path("disk.raw");
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "closed");
  int fd = open(img.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  REQUIRE(pwrite(fd, "abcd", 4, 0) == 4);
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "active");
  CHECK(testing::get_xattr(img, "user.iofilter.policy") == "bronze");
  CHECK(testing::get_xattr(img, "user.iofilter.chain") == "(empty)");
  CHECK(testing::get_xattr(img, "user.iofilter.dirty") == "{\"backing_bytes\":0,\"replica_bytes\":0}");
  std::string stats = testing::get_xattr(img, "user.iofilter.stats");
  CHECK(stats.find("\"writes\":1,") != std::string::npos);
  CHECK(stats.find("\"write_bytes\":4,") != std::string::npos);
  CHECK(stats.find("\"p99_us\"") != std::string::npos);
  CHECK(testing::get_xattr(m.mountpoint(), "user.iofilter.version").rfind("0.", 0) == 0);
  CHECK(testing::get_xattr(m.mountpoint(), "user.iofilter.filters").front() == '[');
  std::string status = testing::get_xattr(m.mountpoint(), "user.iofilter.status");
  CHECK(status.find("\"path\":\"disk.raw\",\"policy\":\"bronze\",\"state\":\"active\",\"format\":\"raw\","
                    "\"virtual_size\":8388608,\"dirty_bytes\":0") != std::string::npos);
  // Queries follow the file's permissions: anyone who may read the image may read them.
  std::string out;
  CHECK(sh(kNobody + "getfattr --absolute-names --only-values -n user.iofilter.state " + q(img), &out) == 0);
  CHECK(out == "active");

  // listxattr shows the control names alongside the file's own; a plain file has none.
  REQUIRE(setxattr(img.c_str(), "user.mine", "1", 1, 0) == 0);
  REQUIRE(sh("getfattr --absolute-names -d -m - " + q(img), &out) == 0);
  CHECK(out.find("user.mine=\"1\"") != std::string::npos);
  CHECK(out.find("user.iofilter.stats=") != std::string::npos);
  CHECK(out.find("user.iofilter.policy=\"bronze\"") != std::string::npos);
  REQUIRE(sh("getfattr --absolute-names -d -m - " + q(m.path("notes.txt")), &out) == 0);
  CHECK(out.find("iofilter") == std::string::npos);
  CHECK(testing::get_xattr(m.path("notes.txt"), "user.iofilter.stats") == "ERR:No data available");
  // Control names never reach the backing file.
  CHECK(getxattr((f.t / "b/disk.raw").c_str(), "user.iofilter.policy", nullptr, 0) == -1);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("refusals: unknown verb EINVAL, non-root EPERM, not an image ENOTSUP, and nothing changes", "[control]") {
  Fixture f;
  Mount& m = *f.m;
  const std::string img = m.path("disk.raw");
  int fd = open(img.c_str(), O_RDWR);
  CHECK(testing::set_xattr(img, "user.iofilter.frobnicate", "1") == EINVAL);
  CHECK(m.log().find("disk.raw: unknown control user.iofilter.frobnicate") != std::string::npos);
  CHECK(testing::set_xattr(img, "user.iofilter.quiesce", "soon") == EINVAL);
  CHECK(testing::set_xattr(img, "user.iofilter.snapshot", "") == EINVAL);
  CHECK(testing::set_xattr(img, "user.iofilter.resume", "1") == EINVAL);  // not quiesced
  CHECK(testing::set_xattr(m.mountpoint(), "user.iofilter.resume", "nosuch.raw") == EINVAL);
  CHECK(testing::set_xattr(img, "user.iofilter.policy", "platinum") == EINVAL);
  CHECK(testing::set_xattr(m.path("notes.txt"), "user.iofilter.flush", "1") == ENOTSUP);
  CHECK(testing::set_xattr(m.mountpoint(), "user.iofilter.flush", "1") == ENOTSUP);
  CHECK(testing::set_xattr(img, "user.iofilter.reload", "1") == ENOTSUP);
  CHECK(testing::set_xattr(m.mountpoint(), "user.iofilter.quiesce", "1") == ENOTSUP);
  CHECK(testing::set_xattr(img, "user.iofilter.status", "x") == EINVAL);  // a read-only name
  std::string out;
  CHECK(sh(kNobody + "setfattr -n user.iofilter.flush -v 1 " + q(img), &out) != 0);
  CHECK(out.find("Operation not permitted") != std::string::npos);
  CHECK(sh(kNobody + "setfattr -n user.iofilter.policy -v gold " + q(img), &out) != 0);
  CHECK(sh(kNobody + "setfattr -n user.iofilter.reload -v 1 " + q(m.mountpoint()), &out) != 0);
  CHECK(m.log().find("refused for uid 65534") != std::string::npos);
  CHECK(testing::get_xattr(img, "user.iofilter.policy") == "bronze");
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "active");
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("quiesce holds writes until resume, and its timeout releases them", "[control][quiesce]") {
  Fixture f;
  Mount& m = *f.m;
  const std::string img = m.path("disk.raw");
  int fd = open(img.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  REQUIRE(pwrite(fd, "before", 6, 0) == 6);
  REQUIRE(testing::set_xattr(img, "user.iofilter.quiesce", "30") == 0);
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "quiesced");
  CHECK(read_file(f.t / "b/disk.raw").substr(0, 6) == "before");  // flushed before holding

  // The held writer writes as QEMU with cache=none does (O_DIRECT). A buffered writer would
  // also be held, but it keeps its page locked in the kernel's cache meanwhile, and any read of
  // that page would wait for it.
  int wfd = open(img.c_str(), O_RDWR | O_DIRECT);
  REQUIRE(wfd >= 0);
  std::atomic<bool> done{false};
  std::jthread writer([&] {  // joins even if a REQUIRE below fails
    alignas(4096) static char w[4096];
    std::memcpy(w, "during", 6);
    CHECK(pwrite(wfd, w, 4096, 4096) == 4096);
    done = true;
  });
  // Reads go on while writes are held (direct: a buffered read-ahead would wait on the page
  // the held writer has locked in the kernel's cache).
  int rfd = open(img.c_str(), O_RDONLY | O_DIRECT);
  alignas(4096) static char buf[4096];
  CHECK(pread(rfd, buf, 4096, 0) == 4096);
  CHECK(std::string(buf, 6) == "before");
  close(rfd);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  INFO(m.log());
  CHECK_FALSE(done.load());  // the writer is held (it would have finished in microseconds)
  CHECK(read_file(f.t / "b/disk.raw").substr(4096, 6) == std::string(6, '\0'));
  // The writer holds the image's inode lock in the kernel, so resume goes to the root.
  REQUIRE(testing::set_xattr(m.mountpoint(), "user.iofilter.resume", "disk.raw") == 0);
  writer.join();
  CHECK(done.load());
  CHECK(read_file(f.t / "b/disk.raw").substr(4096, 6) == "during");
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "active");
  close(wfd);

  // A quiesce nobody resumes lets writes go by itself after its timeout.
  REQUIRE(testing::set_xattr(img, "user.iofilter.quiesce", "1") == 0);
  auto t0 = std::chrono::steady_clock::now();
  CHECK(pwrite(fd, "later", 5, 8192) == 5);
  CHECK(std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(900));
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "active");
  CHECK(m.log().find("disk.raw: quiesce timed out; writes resume") != std::string::npos);

  // snapshot = quiesce + a restore point in every filter that keeps history + resume.
  CHECK(testing::set_xattr(img, "user.iofilter.snapshot", "before-upgrade") == 0);
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "active");
  CHECK(m.log().find("disk.raw: snapshot 'before-upgrade' taken") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("flush returns once the backing file holds every acknowledged write", "[control]") {
  Fixture f;
  Mount& m = *f.m;
  const std::string img = m.path("disk.raw");
  std::string out;
  REQUIRE(sh("head -c 1M /dev/urandom > " + q(f.t / "src") + " && exec 3<>" + q(img) + " && dd if=" + q(f.t / "src") +
                 " of=" + q(img) + " bs=64k conv=notrunc status=none && setfattr -n user.iofilter.flush -v 1 " + q(img) +
                 " && cmp -n 1048576 " + q(f.t / "src") + " " + q(f.t / "b/disk.raw"),
             &out) == 0);
  CHECK(m.stop() == 0);
}

TEST_CASE("iofilterctl drives the same attributes, with tables, JSON and meaningful exit codes", "[control][ctl]") {
  Fixture f;
  Mount& m = *f.m;
  const std::string img = m.path("disk.raw");
  int fd = open(img.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  std::string out;
  REQUIRE(sh(ctl() + " status " + q(m.mountpoint()), &out) == 0);
  CHECK(out.find("DISK") != std::string::npos);
  CHECK(out.find("disk.raw  bronze  active  raw     8.0MiB  0B") != std::string::npos);
  REQUIRE(sh(ctl() + " status", &out) == 0);  // every mount
  CHECK(out.find(m.mountpoint()) != std::string::npos);
  REQUIRE(sh(ctl() + " --json status " + q(m.mountpoint()), &out) == 0);
  CHECK(out.find("\"disks\":[{\"path\":\"disk.raw\"") != std::string::npos);
  REQUIRE(sh(ctl() + " status " + q(img), &out) == 0);
  CHECK(out.find("policy  bronze") != std::string::npos);
  REQUIRE(sh(ctl() + " stats " + q(img), &out) == 0);
  CHECK(out.find("read_latency.p99_us") != std::string::npos);
  REQUIRE(sh(ctl() + " --json stats " + q(img), &out) == 0);
  CHECK(out.front() == '{');
  REQUIRE(sh(ctl() + " filters " + q(m.mountpoint()), &out) == 0);
  REQUIRE(sh(ctl() + " flush " + q(img), &out) == 0);
  CHECK(out == img + ": flushed\n");
  REQUIRE(sh(ctl() + " quiesce --timeout 20 " + q(img), &out) == 0);
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "quiesced");
  REQUIRE(sh(ctl() + " resume " + q(img), &out) == 0);
  CHECK(testing::get_xattr(img, "user.iofilter.state") == "active");
  REQUIRE(sh(ctl() + " snapshot " + q(img) + " nightly", &out) == 0);
  REQUIRE(sh(ctl() + " policy " + q(img) + " gold", &out) == 0);
  CHECK(out == "gold\n");
  REQUIRE(sh(ctl() + " policy " + q(img), &out) == 0);
  CHECK(out == "gold\n");
  REQUIRE(sh(ctl() + " policy --clear " + q(img), &out) == 0);
  CHECK(out == "bronze\n");
  REQUIRE(sh(ctl() + " reload " + q(m.mountpoint()), &out) == 0);

  // Exit codes: 1 failed, 2 usage, 3 not ours, 4 permission.
  CHECK(sh(ctl() + " policy " + q(img) + " platinum", &out) == 1);
  CHECK(out == "iofilterctl: " + img + ": Invalid argument\n");
  CHECK(sh(ctl() + " frobnicate", &out) == 2);
  CHECK(sh(ctl() + " flush", &out) == 2);
  CHECK(sh(ctl() + " flush " + q(m.path("notes.txt")), &out) == 3);
  CHECK(out == "iofilterctl: " + m.path("notes.txt") + ": not an iofilterfs image\n");
  CHECK(sh(ctl() + " status /tmp", &out) == 3);
  CHECK(sh(kNobody + ctl() + " flush " + q(img), &out) == 4);
  write_file(f.t / "ds.yaml", "policies: [\n");
  CHECK(sh(ctl() + " reload " + q(m.mountpoint()), &out) == 1);
  CHECK(out.find("reload refused: " + f.t / "ds.yaml" + ":2:1:") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("iofilterctl top shows the running disk in a terminal", "[control][ctl]") {
  Fixture f;
  Mount& m = *f.m;
  std::atomic<bool> stop{false};
  std::thread load([&] {
    int fd = open(m.path("disk.raw").c_str(), O_RDWR);
    char buf[4096] = {};
    while (!stop) pwrite(fd, buf, sizeof buf, 0);
    close(fd);
  });
  std::string out;
  int rc = sh("script -qec " + q(ctl() + " top " + q(m.mountpoint()) + " --interval 0.3 --iterations 4") + " /dev/null", &out);
  stop = true;
  load.join();
  CHECK(rc == 0);
  CHECK(out.find("iofilterctl top") != std::string::npos);
  CHECK(out.find("W/s") != std::string::npos);
  CHECK(out.find("disk.raw") != std::string::npos);
  CHECK(m.stop() == 0);
}

TEST_CASE("the versions agree, and every subcommand of iofilterctl is in iofilterctl(8)", "[control][docs]") {
  std::string a, b;
  REQUIRE(sh(ctl() + " --version", &a) == 0);
  REQUIRE(sh(q(testing::daemon_binary()) + " --version", &b) == 0);
  CHECK(a.substr(a.find(' ')) == b.substr(b.find(' ')));
  std::string page = read_file(testing::source_dir() + "/man/iofilterctl.8");
  REQUIRE_FALSE(page.empty());
  std::string help;
  REQUIRE(sh(ctl() + " --help", &help) == 0);
  size_t at = help.find("Subcommands:");
  REQUIRE(at != std::string::npos);
  std::istringstream in(help.substr(at));
  std::string line;
  std::getline(in, line);
  int n = 0;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string cmd;
    if (!(ls >> cmd)) continue;
    INFO("subcommand " << cmd);
    CHECK(page.find(".SS " + cmd) != std::string::npos);
    ++n;
  }
  CHECK(n == 15);  // ... encrypt, key, cache, restore, points
}
