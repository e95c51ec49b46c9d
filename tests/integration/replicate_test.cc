// The replicate filter through a real mount, with real targets: a directory and nbdkit on a
// unix socket. fio verify with sync and async replication; the replica's bytes equal the
// source's afterwards (after the flush verb for async). The NBD server killed mid-run and
// restarted: async catches up from the journal, sync with degrade from the bitmap, and the
// bytes resent are the changed regions', not the disk's. The daemon SIGKILLed during async
// replication and restarted: the journal is replayed and the replica catches up.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "mount.h"

using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;

namespace {

// nbdkit serving FILE on a unix socket; stopped by its PID.
class Nbdkit {
 public:
  // filter, args: an nbdkit filter before the plugin and its parameters after it (e.g. a slow target).
  Nbdkit(const std::string& dir, const std::string& file, const std::string& filter = "", const std::string& args = "")
      : sock_(dir + "/nbd.sock"), pidf_(dir + "/nbd.pid"), file_(file), filter_(filter), args_(args) {
    start();
  }
  ~Nbdkit() { stop(); }
  void start() {
    std::string out;
    ::unlink(pidf_.c_str());
    // nbdkit forks into the background and writes the PID file once it accepts connections.
    int rc = sh("nbdkit --unix " + q(sock_) + " --pidfile " + q(pidf_) + " " + filter_ + " file file=" + q(file_) + " " + args_,
                &out);
    INFO(out);
    REQUIRE(rc == 0);
    for (int i = 0; i < 500 && pid_ <= 0; ++i) {
      std::ifstream in(pidf_);
      in >> pid_;
      if (pid_ <= 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    REQUIRE(pid_ > 0);
  }
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    for (int i = 0; i < 500 && ::kill(pid_, 0) == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    pid_ = -1;
    ::unlink(sock_.c_str());
  }
  std::string uri() const { return "nbd+unix:///?socket=" + sock_; }

 private:
  std::string sock_, pidf_, file_, filter_, args_;
  pid_t pid_ = -1;
};

// Keeps an image open (replication runs while the image is open, as for a running VM).
struct Holder {
  int fd = -1;
  explicit Holder(const std::string& path) {
    fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0644);
    REQUIRE(fd >= 0);
  }
  ~Holder() { release(); }
  void release() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

struct Datastore {
  TempDir t;
  std::unique_ptr<Mount> m;
  // encrypt: the policy also encrypts, with the passphrase in t/k.
  explicit Datastore(const std::string& params, bool mount_now = true, bool encrypt = false) {
    sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " " + q(t / "replica"));
    std::string enc;
    if (encrypt) {
      testing::write_file(t / "k", "replicated passphrase");
      REQUIRE(::chmod((t / "k").c_str(), 0600) == 0);
      enc = "    encrypt: { key-file: " + t / "k" + ", pbkdf-iter-time: 10ms }\n";
    }
    testing::write_file(t / "ds.yaml", "datastore:\n  images: [\"*.raw\"]\npolicies:\n  rep:\n    replicate: { " +
                                           params + ", journal: " + t / "state" +
                                           ", reconnect-max: 200ms }\n" + enc + "rules:\n  - { match: \"*\", policy: rep }\n");
    if (mount_now) mount();
  }
  void mount() { m = std::make_unique<Mount>(t / "b", t / "m", Mount::Options{{"--config", t / "ds.yaml"}}); }
  std::string mnt(const std::string& rel) const { return m->path(rel); }
  std::string back(const std::string& rel) const { return t / ("b/" + rel); }
  YAML::Node stats(const std::string& rel) const {
    return YAML::Load(testing::get_xattr(mnt(rel), "user.iofilter.stats"))["filters"]["replicate"];
  }
  int flush(const std::string& rel) const { return testing::set_xattr(mnt(rel), "user.iofilter.flush", "1"); }
};

std::string sum(const std::string& path, uint64_t bytes = 0) {
  std::string out;
  const std::string cmd = bytes ? "head -c " + std::to_string(bytes) + " " + q(path) + " | sha256sum" : "sha256sum < " + q(path);
  REQUIRE(sh(cmd, &out) == 0);
  return out.substr(0, 64);
}

int fio_verify(const Datastore& ds, const std::string& rel, const std::string& extra) {
  std::string out;
  int rc = sh("cd " + q(ds.t.path()) + " && fio --name=verify --filename=" + q(ds.mnt(rel)) +
                  " --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c"
                  " --verify_fatal=1 --do_verify=1 --randrepeat=0 --output-format=json --output=fio.json " + extra,
              &out);
  UNSCOPED_INFO(out << read_file(ds.t / "fio.json") << ds.m->log());
  return rc;
}

}  // namespace

TEST_CASE("replicate sync to a directory: fio verify, then the replica equals the source", "[replicate][fio]") {
  Datastore ds("target: " + std::string("REPLICA"), false);
  // The target is the datastore's replica directory (known only once the TempDir exists).
  sh("sed -i 's|REPLICA|" + ds.t / "replica" + "|' " + q(ds.t / "ds.yaml"));
  ds.mount();
  // Sized first, so fio does not lay the file out anew (it would replace the file held open).
  REQUIRE(sh("mkdir " + q(ds.mnt("vm")) + " && truncate -s 16M " + q(ds.mnt("vm/fio.raw"))) == 0);
  Holder hold(ds.mnt("vm/fio.raw"));
  REQUIRE(fio_verify(ds, "vm/fio.raw", "--size=8M --numjobs=2 --offset_increment=8M") == 0);
  CHECK(testing::get_xattr(ds.mnt("vm/fio.raw"), "user.iofilter.state") == "active");
  // Unaligned buffered writes too, then punch a hole.
  REQUIRE(sh("dd if=/dev/urandom of=" + q(ds.mnt("vm/fio.raw")) + " bs=1000 seek=7777 count=33 conv=notrunc status=none") == 0);
  REQUIRE(sh("fallocate -p -o 1000000 -l 300000 " + q(ds.mnt("vm/fio.raw"))) == 0);
  REQUIRE(ds.flush("vm/fio.raw") == 0);
  CHECK(sum(ds.t / "replica/vm/fio.raw") == sum(ds.back("vm/fio.raw")));
  YAML::Node st = ds.stats("vm/fio.raw");
  INFO(testing::get_xattr(ds.mnt("vm/fio.raw"), "user.iofilter.stats"));
  CHECK(st["mode"].as<std::string>() == "sync");
  CHECK(st["target_state"].as<std::string>() == "in-sync");
  CHECK(st["lag_bytes"].as<uint64_t>() == 0);
  CHECK(st["bytes_sent"].as<uint64_t>() >= 16u << 20);
  CHECK(testing::get_xattr(ds.mnt("vm/fio.raw"), "user.iofilter.dirty") == "{\"backing_bytes\":0,\"replica_bytes\":0}");
  // Closing the image waits for nothing more; the replica stays equal.
  hold.release();
  CHECK(sum(ds.t / "replica/vm/fio.raw") == sum(ds.back("vm/fio.raw")));
  CHECK(ds.m->stop() == 0);  // a clean exit (a sanitizer report would fail it)
}

namespace {

// Several rounds of overlapping writes in flight at once (4 jobs at QD 32 on the same 256 KiB,
// 4-64 KiB each, fresh data per write), each followed by a flush: the replica must end with
// the image's bytes every time, which it does only if overlapping writes reach the journal or
// the target in the order they reach the image. Note: with the range lock disabled this test
// still passed here (4 and 6 rounds, also 8 jobs x QD 64 on 64 KiB): the race window is narrow
// through this mount. The deterministic guard is the unit test "overlapping writes in flight
// reach the journal in the image's order", which fails without the lock.
void overlapping_rounds(const std::string& mode) {
  Datastore ds("target: REPLICA, mode: " + mode + (mode == "async" ? ", max-lag: 1GiB" : ""), false);
  sh("sed -i 's|REPLICA|" + ds.t / "replica" + "|' " + q(ds.t / "ds.yaml"));
  ds.mount();
  REQUIRE(sh("mkdir " + q(ds.mnt("vm")) + " && truncate -s 1M " + q(ds.mnt("vm/hot.raw"))) == 0);
  Holder hold(ds.mnt("vm/hot.raw"));
  for (int round = 0; round < 4; ++round) {
    std::string out;
    int rc = sh("cd " + q(ds.t.path()) + " && fio --name=hot --filename=" + q(ds.mnt("vm/hot.raw")) +
                    " --rw=randwrite --bsrange=4k-64k --size=256k --io_size=8M --numjobs=4 --iodepth=32"
                    " --ioengine=libaio --direct=1 --refill_buffers --randrepeat=0 --group_reporting"
                    " --output-format=terse",
                &out);
    INFO("round " << round << ": " << out << ds.m->log());
    REQUIRE(rc == 0);
    REQUIRE(ds.flush("vm/hot.raw") == 0);
    CHECK(sum(ds.t / "replica/vm/hot.raw") == sum(ds.back("vm/hot.raw")));
  }
  INFO(testing::get_xattr(ds.mnt("vm/hot.raw"), "user.iofilter.stats"));
  CHECK(ds.stats("vm/hot.raw")["overlap_waits"].as<uint64_t>() > 0);  // the rounds did overlap
  // Async to a directory on the same file system: records by reference go from the image file
  // to the replica file to file (copy_file_range), not through the daemon's memory.
  if (mode == "async") CHECK(ds.stats("vm/hot.raw")["bytes_copied"].as<uint64_t>() > 0);
  hold.release();
  CHECK(ds.m->stop() == 0);
}

}  // namespace

TEST_CASE("replicate async: overlapping writes at high queue depth, the replica equals the source after each round",
          "[replicate][fio]") {
  overlapping_rounds("async");
}

TEST_CASE("replicate sync: overlapping writes at high queue depth, the replica equals the source after each round",
          "[replicate][fio]") {
  overlapping_rounds("sync");
}

TEST_CASE("replicate to nbdkit, sync with degrade: the server killed and restarted and only changed regions resent",
          "[replicate][nbd]") {
  TempDir nbd;
  REQUIRE(sh("truncate -s 32M " + q(nbd / "export")) == 0);
  Nbdkit server(nbd.path(), nbd / "export");
  Datastore ds("target: \"" + server.uri() + "\"", false);
  REQUIRE(sh("mkdir -p " + q(ds.back("")) + " && head -c 16M /dev/urandom > " + q(ds.back("disk.raw"))) == 0);
  ds.mount();
  Holder hold(ds.mnt("disk.raw"));
  // The initial sync: all 16 MiB of an existing image, in the background; flush waits for it.
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(nbd / "export", 16u << 20) == sum(ds.back("disk.raw")));
  CHECK(ds.stats("disk.raw")["bytes_resent"].as<uint64_t>() == 16u << 20);
  REQUIRE(fio_verify(ds, "disk.raw", "--size=16M --numjobs=1 --io_size=4M") == 0);
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(nbd / "export", 16u << 20) == sum(ds.back("disk.raw")));

  server.stop();
  // Five 64 KiB regions change while the server is away; the writes succeed (degrade).
  for (int i = 0; i < 5; ++i)
    REQUIRE(sh("dd if=/dev/urandom of=" + q(ds.mnt("disk.raw")) + " bs=64k count=1 seek=" + std::to_string(i * 37) +
               " conv=notrunc,fsync oflag=direct status=none") == 0);
  CHECK(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.state") == "degraded: replica unreachable");
  CHECK(ds.flush("disk.raw") == EHOSTDOWN);
  YAML::Node dirty = YAML::Load(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.dirty"));
  CHECK(dirty["replica_bytes"].as<uint64_t>() == 5 * 65536);
  const uint64_t resent_before = ds.stats("disk.raw")["bytes_resent"].as<uint64_t>();

  server.start();
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.state") == "active");
  CHECK(sum(nbd / "export", 16u << 20) == sum(ds.back("disk.raw")));
  YAML::Node st = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats") << ds.m->log());
  CHECK(st["bytes_resent"].as<uint64_t>() - resent_before == 5 * 65536);  // the changed regions only
  CHECK(st["reconnects"].as<uint64_t>() >= 1);
  hold.release();
  CHECK(ds.m->stop() == 0);
}

TEST_CASE("replicate to nbdkit, async: the server killed mid-run and the journal catches up and then kill -9 the daemon",
          "[replicate][nbd]") {
  TempDir nbd;
  REQUIRE(sh("truncate -s 64M " + q(nbd / "export")) == 0);
  Nbdkit server(nbd.path(), nbd / "export");
  Datastore ds("target: \"" + server.uri() + "\", mode: async", false);
  REQUIRE(sh("mkdir -p " + q(ds.back("")) + " && head -c 32M /dev/urandom > " + q(ds.back("disk.raw"))) == 0);
  ds.mount();
  auto hold = std::make_unique<Holder>(ds.mnt("disk.raw"));
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(nbd / "export", 32u << 20) == sum(ds.back("disk.raw")));
  const uint64_t initial = ds.stats("disk.raw")["bytes_resent"].as<uint64_t>();
  CHECK(initial == 32u << 20);

  // A writer runs; the server dies in the middle of it and comes back after it.
  std::string out;
  std::thread writer([&] {
    sh("fio --name=w --filename=" + q(ds.mnt("disk.raw")) +
           " --size=32M --io_size=8M --rw=randwrite --bs=64k --ioengine=libaio --iodepth=8 --direct=1 --randrepeat=0",
       &out);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  server.stop();
  writer.join();
  INFO(out);
  server.start();
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(nbd / "export", 32u << 20) == sum(ds.back("disk.raw")));
  YAML::Node st = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats") << ds.m->log());
  CHECK(st["bytes_resent"].as<uint64_t>() == initial);  // nothing resent from the bitmap
  CHECK(st["lag_bytes"].as<uint64_t>() == 0);
  // 8 MiB written; what was shipped but not flushed when the server died went again, not the disk.
  CHECK(st["bytes_sent"].as<uint64_t>() >= 8u << 20);
  CHECK(st["bytes_sent"].as<uint64_t>() < 24u << 20);

  // kill -9 with writes journaled and the server away, so they are surely unshipped.
  server.stop();
  REQUIRE(sh("dd if=/dev/urandom of=" + q(ds.mnt("disk.raw")) + " bs=1M count=3 seek=5 conv=notrunc status=none") == 0);
  REQUIRE(::kill(ds.m->pid(), SIGKILL) == 0);
  hold->release();
  ds.m->stop();
  ds.m.reset();
  server.start();
  ds.mount();
  hold = std::make_unique<Holder>(ds.mnt("disk.raw"));
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(nbd / "export", 32u << 20) == sum(ds.back("disk.raw")));
  YAML::Node st2 = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats") << ds.m->log());
  CHECK(st2["bytes_resent"].as<uint64_t>() == 0);  // no region resent: the journal had it all
  CHECK(st2["bytes_sent"].as<uint64_t>() >= 3u << 20);
  hold->release();
  CHECK(ds.m->stop() == 0);
}

namespace {

std::string ctl_bin() {
  std::string b = std::string(IOFILTERFS_BIN);
  return b.substr(0, b.rfind('/')) + "/iofilterctl";
}

// @EPOCH.NANOSECONDS now, for restore --at.
std::string now_at() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  char b[64];
  std::snprintf(b, sizeof b, "@%lld.%09ld", static_cast<long long>(ts.tv_sec), ts.tv_nsec);
  return std::string(b);
}

// The CDP scenario of the issue, with `mode` (async or sync): checksums recorded at several
// moments of a running workload and at named snapshots; each moment restores byte-identical.
void cdp_scenario(const std::string& mode) {
  Datastore ds("target: REPLICA, mode: " + mode + ", retention: 1h", false);
  sh("sed -i 's|REPLICA|" + ds.t / "replica" + "|' " + q(ds.t / "ds.yaml"));
  REQUIRE(sh("mkdir -p " + q(ds.back("")) + " && head -c 8M /dev/urandom > " + q(ds.back("disk.raw"))) == 0);
  ds.mount();
  Holder hold(ds.mnt("disk.raw"));
  std::string ctlbin = std::string(IOFILTERFS_BIN);
  ctlbin = ctlbin.substr(0, ctlbin.rfind('/')) + "/iofilterctl";
  struct Moment {
    std::string at, sum;
  };
  std::vector<Moment> moments;
  std::vector<std::pair<std::string, std::string>> points;
  auto now = [] {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char b[64];
    std::snprintf(b, sizeof b, "@%lld.%09ld", static_cast<long long>(ts.tv_sec), ts.tv_nsec);
    return std::string(b);
  };
  moments.push_back({now(), sum(ds.back("disk.raw"))});
  for (int round = 0; round < 3; ++round) {
    std::string out;
    REQUIRE(sh("fio --name=w --filename=" + q(ds.mnt("disk.raw")) +
                   " --size=8M --io_size=2M --rw=randwrite --bs=4k --ioengine=libaio --iodepth=8 --direct=1"
                   " --randrepeat=0",
               &out) == 0);
    moments.push_back({now(), sum(ds.back("disk.raw"))});
    REQUIRE(sh("dd if=/dev/urandom of=" + q(ds.mnt("disk.raw")) + " bs=64k count=3 seek=" + std::to_string(round * 11) +
               " conv=notrunc oflag=direct status=none") == 0);
    const std::string name = "point-" + std::to_string(round);
    REQUIRE(sh(q(ctlbin) + " snapshot " + q(ds.mnt("disk.raw")) + " " + name, &out) == 0);
    points.push_back({name, sum(ds.back("disk.raw"))});
  }
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(ds.t / "replica/disk.raw") == sum(ds.back("disk.raw")));
  // The history's size is reported in either mode: at least the 3 x 2 MiB + 3 x 192 KiB written.
  CHECK(ds.stats("disk.raw")["history"]["bytes"].as<uint64_t>() >= 3 * ((2u << 20) + (192u << 10)));
  std::string out;
  REQUIRE(sh(q(ctlbin) + " points " + q(ds.mnt("disk.raw")), &out) == 0);
  INFO(out << ds.m->log());
  CHECK(out.find("point-0") != std::string::npos);
  CHECK(out.find("point-2") != std::string::npos);
  for (size_t i = 0; i < moments.size(); ++i) {
    const std::string o = ds.t / ("at-" + std::to_string(i));
    REQUIRE(sh(q(ctlbin) + " restore " + q(ds.mnt("disk.raw")) + " --at=" + moments[i].at + " -o " + q(o), &out) == 0);
    CHECK(sum(o) == moments[i].sum);
  }
  for (const auto& [name, s] : points) {
    const std::string o = ds.t / ("pt-" + name);
    REQUIRE(sh(q(ctlbin) + " restore " + q(ds.mnt("disk.raw")) + " --point " + name + " -o " + q(o), &out) == 0);
    CHECK(sum(o) == s);
  }
  // The image closed: restore from the files, named with --journal.
  hold.release();
  const std::string o = ds.t / "closed";
  REQUIRE(sh(q(ctlbin) + " restore " + q(ds.mnt("disk.raw")) + " --journal " + q(ds.t / "state") + " --point point-1 -o " +
                 q(o),
             &out) == 0);
  CHECK(sum(o) == points[1].second);
  CHECK(sh(q(ctlbin) + " restore " + q(ds.mnt("disk.raw")) + " --journal " + q(ds.t / "state") + " --point nope -o " + q(o),
           &out) == 1);
  CHECK(out.find("no restore point named 'nope'") != std::string::npos);
  CHECK(ds.m->stop() == 0);
}

}  // namespace

TEST_CASE("replicate retention: checksums at several moments and at named points restore byte-identical",
          "[replicate][cdp]") {
  cdp_scenario("async");
}

TEST_CASE("replicate retention with mode: sync: checksums at several moments and at named points restore byte-identical",
          "[replicate][cdp]") {
  cdp_scenario("sync");
}

namespace {

const char* kMarker = "REPLICATED-PLAINTEXT-MARKER";

// An 8 MiB image with the marker every 4 KiB, written whole through the mount (O_DIRECT), then
// unaligned writes of the marker and a zero-range over it; the same changes go to t/model.
void write_marked_image(const Datastore& ds, const std::string& rel) {
  const std::string model = ds.t / "model";
  std::string out;
  REQUIRE(sh("python3 -c \"import os,sys; m=b'" + std::string(kMarker) +
                 "'; d=bytearray(os.urandom(8<<20))\n"
                 "for i in range(0, len(d), 4096): d[i+100:i+100+len(m)] = m\n"
                 "open(sys.argv[1], 'wb').write(d)\" " + q(model),
             &out) == 0);
  REQUIRE(sh("dd if=" + q(model) + " of=" + q(ds.mnt(rel)) + " bs=1M oflag=direct conv=notrunc status=none", &out) == 0);
  for (const char* seek : {"7777", "3000001"})
    for (const std::string& f : {model, ds.mnt(rel)})
      REQUIRE(sh("printf '%s' " + std::string(kMarker) + " | dd of=" + q(f) + " bs=1 seek=" + seek +
                     " conv=notrunc status=none",
                 &out) == 0);
  REQUIRE(sh("fallocate -z -o 5000003 -l 70001 " + q(ds.mnt(rel)) + " && dd if=/dev/zero of=" + q(model) +
                 " bs=1 seek=5000003 count=70001 conv=notrunc status=none",
             &out) == 0);
  INFO(out);
  REQUIRE(sh("cmp " + q(model) + " " + q(ds.mnt(rel)), &out) == 0);
}

// The replica CONTAINER is a LUKS container that the image's passphrase opens in cryptsetup, and
// that QEMU's luks driver reads as the image's plaintext (t/model).
void check_container(const Datastore& ds, const std::string& container) {
  std::string out;
  CHECK(sh("grep -c " + std::string(kMarker) + " " + q(container), &out) == 1);  // no plaintext in it
  CHECK(sh("grep -c " + std::string(kMarker) + " " + q(ds.t / "model"), &out) == 0);
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k") + " " + q(container), &out) == 0);
  INFO(out);
  REQUIRE(sh("qemu-img convert --object secret,id=s,file=" + q(ds.t / "k") +
                 " --image-opts driver=luks,key-secret=s,file.filename=" + q(container) + " -O raw " +
                 q(ds.t / "replica.plain"),
             &out) == 0);
  CHECK(sh("cmp " + q(ds.t / "replica.plain") + " " + q(ds.t / "model"), &out) == 0);
}

}  // namespace

TEST_CASE("replicate under encrypt, async to a directory: the journal and the replica hold no plaintext, and the replica is the LUKS container",
          "[replicate][encrypt]") {
  Datastore ds("target: REPLICA, mode: async", false, /*encrypt=*/true);
  sh("sed -i 's|REPLICA|" + ds.t / "replica" + "|' " + q(ds.t / "ds.yaml"));
  ds.mount();
  REQUIRE(sh("truncate -s 8M " + q(ds.mnt("disk.raw"))) == 0);
  Holder hold(ds.mnt("disk.raw"));
  write_marked_image(ds, "disk.raw");
  // Before the flush: the journal holds every record (it is cut back only by a flush).
  YAML::Node st = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats"));
  CHECK(st["sealed"].as<bool>());
  CHECK(st["journal_bytes"].as<uint64_t>() >= 8u << 20);
  std::string out;
  CHECK(sh("cat " + q(ds.t / "state") + "/* | grep -c " + kMarker, &out) == 1);
  REQUIRE(ds.flush("disk.raw") == 0);
  // The replica is the backing file byte for byte: the header, then the same ciphertext.
  CHECK(sh("cmp " + q(ds.t / "replica/disk.raw") + " " + q(ds.back("disk.raw")), &out) == 0);
  check_container(ds, ds.t / "replica/disk.raw");
  hold.release();
  CHECK(ds.m->stop() == 0);
}

TEST_CASE("replicate under encrypt, sync to nbdkit: the export is the LUKS container, without plaintext",
          "[replicate][encrypt][nbd]") {
  TempDir nbd;
  // Exactly the container: the 2 MiB LUKS header area and the 8 MiB payload.
  REQUIRE(sh("truncate -s 10M " + q(nbd / "export")) == 0);
  Nbdkit server(nbd.path(), nbd / "export");
  Datastore ds("target: \"" + server.uri() + "\"", false, /*encrypt=*/true);
  ds.mount();
  REQUIRE(sh("truncate -s 8M " + q(ds.mnt("disk.raw"))) == 0);
  Holder hold(ds.mnt("disk.raw"));
  write_marked_image(ds, "disk.raw");
  REQUIRE(ds.flush("disk.raw") == 0);
  YAML::Node st = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats") << ds.m->log());
  CHECK(st["sealed"].as<bool>());
  CHECK(st["target_state"].as<std::string>() == "in-sync");
  std::string out;
  CHECK(sh("cmp " + q(nbd / "export") + " " + q(ds.back("disk.raw")), &out) == 0);
  check_container(ds, nbd / "export");
  // The server away and back: the regions changed meanwhile are resent sealed.
  server.stop();
  REQUIRE(sh("dd if=/dev/urandom of=" + q(ds.mnt("disk.raw")) + " bs=64k count=2 seek=9 conv=notrunc oflag=direct status=none") == 0);
  CHECK(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.state") == "degraded: replica unreachable");
  server.start();
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sh("cmp " + q(nbd / "export") + " " + q(ds.back("disk.raw")), &out) == 0);
  hold.release();
  CHECK(ds.m->stop() == 0);
}

namespace {

// An async datastore whose replica is an 8 MiB nbdkit export behind a delay filter (every write
// 2 ms), so the journal runs ahead of the replica; disk.raw holds 4 MiB of random bytes, mounted
// and not yet flushed.
struct SlowTarget {
  TempDir nbd;
  Nbdkit server;
  Datastore ds;
  static std::string sized_export(const TempDir& d) {
    REQUIRE(sh("truncate -s 8M " + q(d / "export")) == 0);
    return d / "export";
  }
  explicit SlowTarget(const std::string& params)
      : server(nbd.path(), sized_export(nbd), "--filter=delay", "wdelay=2ms"),
        ds("target: \"" + server.uri() + "\", mode: async" + params, false) {
    REQUIRE(sh("mkdir -p " + q(ds.back("")) + " && head -c 4M /dev/urandom > " + q(ds.back("disk.raw"))) == 0);
    ds.mount();
  }
};

}  // namespace

TEST_CASE("replicate async with backpressure: punches while writes are held at max-lag still reach the replica",
          "[replicate][nbd][journal]") {
  // A slow target and a small max-lag: the guest's writes are held most of the time, and the
  // punches made meanwhile must still be journaled (not left out).
  SlowTarget slow(", max-lag: 1MiB, on-overflow: backpressure");
  TempDir& nbd = slow.nbd;
  Datastore& ds = slow.ds;
  Holder hold(ds.mnt("disk.raw"));
  REQUIRE(ds.flush("disk.raw") == 0);
  const uint64_t initial = ds.stats("disk.raw")["bytes_resent"].as<uint64_t>();
  std::string out;
  std::thread writer([&] {
    sh("fio --name=held --filename=" + q(ds.mnt("disk.raw")) +
           " --rw=randwrite --bsrange=4k-64k --size=2M --time_based --runtime=3 --iodepth=16 --ioengine=libaio"
           " --direct=1 --refill_buffers --randrepeat=0 --output-format=terse",
       &out);
  });
  // The second half of the image: 32 punches of 64 KiB, one every 50 ms, while the writes above
  // keep the journal at max-lag.
  int punched = 0;
  for (int i = 0; i < 32; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    punched += sh("fallocate --punch-hole --offset " + std::to_string((2u << 20) + i * 65536) + " --length 65536 " +
                  q(ds.mnt("disk.raw"))) == 0;
  }
  writer.join();
  CHECK(punched == 32);
  REQUIRE(ds.flush("disk.raw") == 0);
  YAML::Node st = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats") << out << ds.m->log());
  CHECK(sum(nbd / "export", 4u << 20) == sum(ds.back("disk.raw")));
  CHECK(st["backpressure_waits"].as<uint64_t>() > 0);  // the writes were held
  CHECK(st["bytes_resent"].as<uint64_t>() == initial);  // no collapse: everything went by the journal
  CHECK(st["collapses"].as<uint64_t>() == 0);
  hold.release();
  CHECK(ds.m->stop() == 0);
}

TEST_CASE("replicate async by reference: overwrites of unshipped ranges to a slow target, then kill -9 mid-run, the replica equals the source",
          "[replicate][nbd][journal]") {
  // A slow target: the journal runs ahead of the replica, so the writes below land on bytes
  // that records not shipped yet still read from the image (copy-before-write).
  SlowTarget slow("");
  TempDir& nbd = slow.nbd;
  Datastore& ds = slow.ds;
  auto hold = std::make_unique<Holder>(ds.mnt("disk.raw"));
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(nbd / "export", 4u << 20) == sum(ds.back("disk.raw")));
  const uint64_t initial = ds.stats("disk.raw")["bytes_resent"].as<uint64_t>();

  // fio verify over 256 KiB at QD 32: every block is written many times while older records
  // for it are still unshipped.
  REQUIRE(fio_verify(ds, "disk.raw", "--size=256k --io_size=4M --iodepth=32") == 0);
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(nbd / "export", 4u << 20) == sum(ds.back("disk.raw")));
  YAML::Node st = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats") << ds.m->log());
  CHECK(st["journal_by_reference"].as<bool>());
  CHECK(st["preserves"].as<uint64_t>() > 0);                // overwrites of unshipped ranges happened
  CHECK(st["bytes_resent"].as<uint64_t>() == initial);      // no collapse: all of it went by the journal
  CHECK(st["journaled_bytes"].as<uint64_t>() == 0);         // records carry no data, only preserved bytes

  // kill -9 in the middle of overlapping writes (4-64 KiB over 256 KiB, QD 32) with shipping
  // under way: the restart finds the unshipped records and their preserved bytes again.
  std::string out;
  std::thread writer([&] {
    sh("fio --name=hot --filename=" + q(ds.mnt("disk.raw")) +
           " --rw=randwrite --bsrange=4k-64k --size=256k --io_size=64M --iodepth=32 --ioengine=libaio --direct=1"
           " --refill_buffers --randrepeat=0 --output-format=terse",
       &out);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  REQUIRE(::kill(ds.m->pid(), SIGKILL) == 0);
  writer.join();
  hold->release();
  ds.m->stop();
  ds.m.reset();
  ds.mount();
  hold = std::make_unique<Holder>(ds.mnt("disk.raw"));
  REQUIRE(ds.flush("disk.raw") == 0);
  CHECK(sum(nbd / "export", 4u << 20) == sum(ds.back("disk.raw")));
  YAML::Node st2 = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats") << ds.m->log());
  CHECK(st2["bytes_resent"].as<uint64_t>() == 0);  // replayed from the journal, not resynced
  hold->release();
  CHECK(ds.m->stop() == 0);
}

TEST_CASE("replicate retention under encrypt: the history holds no plaintext, and each restored moment is the LUKS "
          "container that cryptsetup and QEMU open to the plaintext of that moment",
          "[replicate][encrypt][cdp]") {
  const std::string mode = GENERATE(as<std::string>{}, "sync", "async");
  INFO(mode);
  Datastore ds("target: REPLICA, mode: " + mode + ", retention: 1h", false, /*encrypt=*/true);
  sh("sed -i 's|REPLICA|" + ds.t / "replica" + "|' " + q(ds.t / "ds.yaml"));
  ds.mount();
  REQUIRE(sh("truncate -s 8M " + q(ds.mnt("disk.raw"))) == 0);
  Holder hold(ds.mnt("disk.raw"));
  const std::string ctl = ctl_bin();
  std::string out;
  struct Moment {
    std::string how, sum;  // "--point NAME" or "--at=@TIME"; the plaintext's checksum then
  };
  // Only moments without holes in the payload: a LUKS reader decrypts a hole (which the encrypt
  // filter reads as zeros) into noise, in the backing file as in its restored copy.
  std::vector<Moment> moments;
  write_marked_image(ds, "disk.raw");  // the marker everywhere, unaligned writes, a zero-range
  moments.push_back({"--at=" + now_at(), sum(ds.t / "model")});
  REQUIRE(sh(q(ctl) + " snapshot " + q(ds.mnt("disk.raw")) + " marked", &out) == 0);
  moments.push_back({"--point marked", sum(ds.t / "model")});
  REQUIRE(sh("dd if=/dev/urandom of=" + q(ds.mnt("disk.raw")) + " bs=64k count=3 seek=7 conv=notrunc oflag=direct status=none",
             &out) == 0);
  REQUIRE(sh("fallocate -z -o 1000001 -l 300000 " + q(ds.mnt("disk.raw")), &out) == 0);  // sealed zeros
  moments.push_back({"--at=" + now_at(), sum(ds.mnt("disk.raw"))});
  REQUIRE(ds.flush("disk.raw") == 0);
  // The files the filter keeps hold no plaintext (the marker is in every 4 KiB of the model).
  CHECK(sh("cat " + q(ds.t / "state") + "/* | grep -c " + kMarker, &out) == 1);
  INFO(out);
  CHECK(sh("ls " + q(ds.t / "state") + " | grep -c cdp-base", &out) == 0);
  for (size_t i = 0; i < moments.size(); ++i) {
    INFO(moments[i].how << ds.m->log());
    const std::string o = ds.t / ("restored-" + std::to_string(i));
    REQUIRE(sh(q(ctl) + " restore " + q(ds.mnt("disk.raw")) + " " + moments[i].how + " -o " + q(o), &out) == 0);
    CHECK(sh("grep -c " + std::string(kMarker) + " " + q(o), &out) == 1);
    // Independent readers: cryptsetup takes the passphrase, QEMU's luks driver decrypts.
    CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k") + " " + q(o), &out) == 0);
    const std::string plain = o + ".plain";
    REQUIRE(sh("qemu-img convert --object secret,id=s,file=" + q(ds.t / "k") +
                   " --image-opts driver=luks,key-secret=s,file.filename=" + q(o) + " -O raw " + q(plain),
               &out) == 0);
    CHECK(sum(plain) == moments[i].sum);
  }
  hold.release();
  CHECK(ds.m->stop() == 0);
}

TEST_CASE("replicate under encrypt: the initial sync of an image with holes inside its data leaves a byte-exact replica",
          "[replicate][encrypt]") {
  Datastore ds("target: REPLICA", false, /*encrypt=*/true);
  sh("sed -i 's|REPLICA|" + ds.t / "replica" + "|' " + q(ds.t / "ds.yaml"));
  // First encrypted only: the image is written and holes are punched inside its data.
  REQUIRE(sh("cp " + q(ds.t / "ds.yaml") + " " + q(ds.t / "ds.full") + " && sed -i '/replicate:/d' " + q(ds.t / "ds.yaml")) == 0);
  ds.mount();
  std::string out;
  REQUIRE(sh("truncate -s 8M " + q(ds.mnt("disk.raw")) + " && dd if=/dev/urandom of=" + q(ds.mnt("disk.raw")) +
                 " bs=1M count=8 oflag=direct conv=notrunc status=none",
             &out) == 0);
  // Whole 4 KiB blocks (the payload starts at 2 MiB): real holes below. (The remainder of a
  // punch inside a block is zero bytes the file system writes as data; a resync cannot tell
  // those from sealed zeros: see iofilterfs.yaml(5).)
  REQUIRE(sh("fallocate -p -o 1052672 -l 65536 " + q(ds.mnt("disk.raw")) + " && fallocate -p -o 3002368 -l 196608 " +
                 q(ds.mnt("disk.raw")) + " && fallocate -p -o 6000640 -l 8192 " + q(ds.mnt("disk.raw")),
             &out) == 0);
  INFO(out);
  CHECK(ds.m->stop() == 0);
  // Then replicated: the initial sync resends every region, holes as they are in the backing file.
  REQUIRE(sh("cp " + q(ds.t / "ds.full") + " " + q(ds.t / "ds.yaml")) == 0);
  ds.mount();
  Holder hold(ds.mnt("disk.raw"));
  REQUIRE(ds.flush("disk.raw") == 0);
  YAML::Node st = ds.stats("disk.raw");
  INFO(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats") << ds.m->log());
  CHECK(st["sealed"].as<bool>());
  CHECK(st["bytes_resent"].as<uint64_t>() + st["bytes_zeroed"].as<uint64_t>() >= 8u << 20);
  CHECK(sh("cmp " + q(ds.t / "replica/disk.raw") + " " + q(ds.back("disk.raw")) + " 2>&1; cmp -l " +
               q(ds.t / "replica/disk.raw") + " " + q(ds.back("disk.raw")) + " | awk 'NR==1{print} END{print NR, $1}'",
           &out) == 0);
  INFO(out);
  CHECK(out.find("differ") == std::string::npos);
  hold.release();
  CHECK(ds.m->stop() == 0);
}
