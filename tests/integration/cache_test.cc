// The cache filter through a real mount: fio verify through each mode with the hit counters
// moving; write-around invalidating; write-back on a cache file surviving SIGKILL of the daemon
// at random points (a writer logs each write once its fdatasync returned; after every restart
// the bytes are checked, at the end the backing file alone must equal the model); flush
// leaving everything in the backing file; a cache device on a small tmpfs that fills up
// during write-back, and one that fails (EIO from the fault layer of a second mount) — degraded,
// dirty data destaged, no guest error, no loss; an encrypted image whose cache file holds no plaintext;
// a damaged cache file refusing the open until `iofilterctl cache discard --force`.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mount.h"

using testing::get_xattr;
using testing::Mount;
using testing::q;
using testing::read_file;
using testing::set_xattr;
using testing::sh;
using testing::TempDir;
using testing::write_file;

namespace {

// The write a killed daemon may have left half done.
struct InFlight {
  uint64_t off = 0;
  std::string data;
};

// Checks `now` (the image after a restart) against `model` (every acknowledged write): equal,
// except inside the write in flight at the kill, where each 4 KiB piece is the old or the new
// bytes. Returns the number of pieces that are neither.
size_t lost_pieces(const std::string& now, const std::string& model, const InFlight& f) {
  size_t bad = 0;
  for (size_t i = 0; i < model.size(); i += 4096) {
    const size_t n = std::min<size_t>(4096, model.size() - i);
    if (std::memcmp(now.data() + i, model.data() + i, n) == 0) continue;
    const uint64_t end = f.off + f.data.size();
    bool ok = i + n > f.off && i < end;
    // Inside the write in flight: the part it covers is new, the rest old.
    for (size_t j = i; ok && j < i + n; ++j) {
      const bool covered = j >= f.off && j < end;
      ok = now[j] == model[j] || (covered && now[j] == f.data[j - f.off]);
    }
    if (!ok) ++bad;
  }
  return bad;
}

// A datastore t/b mounted at t/m whose *.raw images get `policy` (a flow mapping of filters),
// each image `mib` MiB.
void datastore(const TempDir& t, const std::vector<std::string>& images, int mib, const std::string& policy,
               const std::string& extra_policies = "") {
  std::string cmd = "mkdir -p " + q(t / "b") + " " + q(t / "m") + " " + q(t / "ssd");
  for (const auto& i : images) cmd += " && truncate -s " + std::to_string(mib) + "M " + q(t / ("b/" + i));
  REQUIRE(sh(cmd) == 0);
  write_file(t / "ds.yaml", "datastore:\n  images: [\"*.raw\"]\npolicies:\n  p: " + policy + "\n" + extra_policies +
                                "rules:\n  - { match: \"*\", policy: p }\n");
}

double json_number(const std::string& json, const std::string& key) {
  size_t p = json.find("\"" + key + "\":");
  if (p == std::string::npos) return -1;
  return std::atof(json.c_str() + p + key.size() + 3);
}

// The cache filter's stats of an image.
std::string cache_stats(const Mount& m, const std::string& image) {
  std::string s = get_xattr(m.path(image), "user.iofilter.stats");
  size_t p = s.find("\"cache\":");
  return p == std::string::npos ? s : s.substr(p);
}

void fio_verify(const TempDir& t, const std::string& file, const std::string& extra) {
  std::string out;
  const int rc = sh("cd " + q(t.path()) + " && fio --name=verify --filename=" + q(file) +
                        " --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1"
                        " --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --output-format=json"
                        " --output=fio.json --size=16M " + extra,
                    &out);
  INFO(out << read_file(t / "fio.json"));
  REQUIRE(rc == 0);
  CHECK(read_file(t / "fio.json").find("\"error\" : 0") != std::string::npos);
}

// Keeps an image open (the disk, its cache and its counters live while a handle does).
// Close it before a clean unmount (an open file keeps the mount busy).
struct Holder {
  int fd;
  explicit Holder(const std::string& path) : fd(::open(path.c_str(), O_RDONLY)) { REQUIRE(fd >= 0); }
  ~Holder() { close(); }
  void close() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

std::string random_bytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    std::memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
  }
  return s;
}

}  // namespace

TEST_CASE("cache write-through: fio verify, and reads after writes are hits", "[cache][fio]") {
  TempDir t;
  datastore(t, {"disk.raw"}, 32, "{ cache: { memory: 64MiB, block: 4KiB } }");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  Holder open(m.path("disk.raw"));
  fio_verify(t, m.path("disk.raw"), "--size=4M");
  const std::string st = cache_stats(m, "disk.raw");
  INFO(st);
  // The verify pass read back every block just written: served from the cache.
  CHECK(json_number(st, "read_hits") >= 1024);
  CHECK(json_number(st, "hit_ratio") > 0.9);
  CHECK(json_number(st, "bytes_cached") >= 4 << 20);
  CHECK(get_xattr(m.path("disk.raw"), "user.iofilter.state") == "active");
  // Written through: the backing file already equals what the mount shows.
  CHECK(sh("cmp " + q(t / "b/disk.raw") + " " + q(m.path("disk.raw"))) == 0);
  open.close();
  CHECK(m.stop() == 0);
}

TEST_CASE("cache write-around: fio verify and a write drops the cached block, the next read misses", "[cache][fio]") {
  TempDir t;
  datastore(t, {"disk.raw"}, 32, "{ cache: { mode: write-around, memory: 64MiB } }");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  Holder open(m.path("disk.raw"));
  fio_verify(t, m.path("disk.raw"), "--size=4M");
  std::string out;
  // Read 1 MiB twice: misses then hits.
  REQUIRE(sh("dd if=" + q(m.path("disk.raw")) + " of=/dev/null bs=64k count=16 skip=300 iflag=direct status=none") == 0);
  const double hits0 = json_number(cache_stats(m, "disk.raw"), "read_hits");
  REQUIRE(sh("dd if=" + q(m.path("disk.raw")) + " of=/dev/null bs=64k count=16 skip=300 iflag=direct status=none") == 0);
  const double hits1 = json_number(cache_stats(m, "disk.raw"), "read_hits");
  CHECK(hits1 - hits0 == 16);
  // Overwrite one block: invalidated, and the new bytes come back.
  const double inv0 = json_number(cache_stats(m, "disk.raw"), "invalidations");
  REQUIRE(sh("head -c 65536 /dev/urandom > " + q(t / "blk") + " && dd if=" + q(t / "blk") + " of=" +
             q(m.path("disk.raw")) + " bs=64k seek=305 count=1 oflag=direct conv=notrunc status=none") == 0);
  CHECK(json_number(cache_stats(m, "disk.raw"), "invalidations") == inv0 + 1);
  const double miss0 = json_number(cache_stats(m, "disk.raw"), "read_misses");
  REQUIRE(sh("dd if=" + q(m.path("disk.raw")) + " of=" + q(t / "back") +
             " bs=64k count=1 skip=305 iflag=direct status=none") == 0);
  CHECK(json_number(cache_stats(m, "disk.raw"), "read_misses") == miss0 + 1);
  CHECK(sh("cmp " + q(t / "blk") + " " + q(t / "back")) == 0);
  open.close();
  CHECK(m.stop() == 0);
}

TEST_CASE("cache write-back on a device: fio verify, dirty bytes, flush leaves the backing file complete",
          "[cache][fio][flush]") {
  TempDir t;
  datastore(t, {"disk.raw"}, 32,
            "{ cache: { mode: write-back, device: " + t / "ssd" + ", size: 64MiB, sequential-cutoff: 0 } }");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  Holder open(m.path("disk.raw"));
  fio_verify(t, m.path("disk.raw"), "--verify_state_save=0");
  std::string st = cache_stats(m, "disk.raw");
  INFO(st);
  CHECK(json_number(st, "read_hits") >= 4096);
  CHECK(json_number(st, "dirty_bytes") > 0);
  const std::string dirty = get_xattr(m.path("disk.raw"), "user.iofilter.dirty");
  CHECK(json_number(dirty, "backing_bytes") == json_number(st, "dirty_bytes"));
  // Flush, then kill the daemon (no destaging at unmount) and take the cache file away: the
  // backing file alone must hold every byte.
  REQUIRE(sh("cat " + q(m.path("disk.raw")) + " > " + q(t / "expected")) == 0);
  REQUIRE(set_xattr(m.path("disk.raw"), "user.iofilter.flush", "1") == 0);
  CHECK(json_number(get_xattr(m.path("disk.raw"), "user.iofilter.dirty"), "backing_bytes") == 0);
  ::kill(m.pid(), SIGKILL);
  m.stop();
  REQUIRE(sh("rm -rf " + q(t / "ssd")) == 0);
  CHECK(sh("cmp " + q(t / "expected") + " " + q(t / "b/disk.raw")) == 0);
}

TEST_CASE("cache write-back survives SIGKILL at random points: no acknowledged write is lost", "[cache][crash]") {
  TempDir t;
  const uint64_t kImage = 16 << 20;
  // A small cache (64 blocks of 16 KiB) so destaging between the watermarks and evictions
  // happen while the daemon is killed.
  datastore(t, {"disk.raw"}, 16,
            "{ cache: { mode: write-back, device: " + t / "ssd" +
                ", size: 1MiB, block: 16KiB, sequential-cutoff: 0, high-watermark: 40, low-watermark: 20 } }");
  std::string model(kImage, '\0');
  std::mt19937_64 rng(Catch::rngSeed() + 12345);
  uint64_t acked = 0;
  double replayed = 0;  // dirty blocks found at the restarts
  InFlight inflight;
  const int kRounds = 10;
  for (int round = 0; round < kRounds; ++round) {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    const std::string img = m.path("disk.raw");
    Holder open(img);
    // What the last round's in-flight write left: old or new bytes, nothing else.
    {
      std::string now = read_file(img);
      REQUIRE(now.size() == kImage);
      INFO("round " << round << "\n" << m.log());
      CHECK(lost_pieces(now, model, inflight) == 0);
      model = now;  // the write in flight, as it landed
      replayed += json_number(cache_stats(m, "disk.raw"), "replayed_dirty_blocks");
    }
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> done{0};
    std::thread writer([&] {
      int fd = ::open(img.c_str(), O_RDWR);
      if (fd < 0) return;
      std::mt19937_64 wr(rng());
      while (!stop) {
        const size_t len = 4096 * (1 + wr() % 16) - (wr() % 2 ? 0 : 1000);
        const uint64_t off = (wr() % (kImage - len));
        const std::string data = random_bytes(wr, len);
        inflight = InFlight{off, data};
        if (::pwrite(fd, data.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len)) break;
        if (::fdatasync(fd) != 0) break;
        model.replace(off, len, data);  // acknowledged
        inflight = InFlight{};
        done.fetch_add(1);
      }
      ::close(fd);
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(150 + rng() % 600));
    ::kill(m.pid(), SIGKILL);
    stop = true;
    writer.join();
    acked += done.load();
    m.stop();
  }
  // The last start: replay, then flush; then the backing file alone must equal the model.
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  Holder open(m.path("disk.raw"));
  const std::string now = read_file(m.path("disk.raw"));
  REQUIRE(now.size() == kImage);
  CHECK(lost_pieces(now, model, inflight) == 0);
  model = now;
  REQUIRE(set_xattr(m.path("disk.raw"), "user.iofilter.flush", "1") == 0);
  const std::string st = cache_stats(m, "disk.raw");
  replayed += json_number(st, "replayed_dirty_blocks");
  std::printf("cache crash test: %d SIGKILLs, %llu acknowledged writes, %.0f dirty blocks replayed at restarts\n",
              kRounds, static_cast<unsigned long long>(acked), replayed);
  CHECK(acked > 100);
  CHECK(replayed > 0);  // the restarts did find dirty data to serve
  ::kill(m.pid(), SIGKILL);
  m.stop();
  REQUIRE(sh("rm -rf " + q(t / "ssd")) == 0);
  const std::string backing = read_file(t / "b/disk.raw");
  REQUIRE(backing.size() == kImage);
  size_t lost = 0;
  for (size_t i = 0; i < kImage; i += 4096)
    if (std::memcmp(backing.data() + i, model.data() + i, 4096) != 0) ++lost;
  CHECK(lost == 0);
}


namespace {

std::string ctl() {
  std::string d = testing::daemon_binary();
  return q(d.substr(0, d.rfind('/')) + "/iofilterctl");
}

// A tmpfs of `size` at `path`, unmounted (lazily: the daemon may still hold a file) at the end.
struct Tmpfs {
  std::string path;
  Tmpfs(const std::string& p, const std::string& size) : path(p) {
    REQUIRE(sh("mkdir -p " + q(p) + " && mount -t tmpfs -o size=" + size + " tmpfs " + q(p)) == 0);
  }
  ~Tmpfs() { sh("umount -l " + q(path)); }
};

}  // namespace

namespace {

uint64_t dirty_now(const Mount& m, const std::string& image) {
  return static_cast<uint64_t>(json_number(cache_stats(m, image), "dirty_bytes"));
}

// Waits up to `seconds` for the destager to leave nothing dirty.
bool wait_clean(const Mount& m, const std::string& image, int seconds) {
  for (int i = 0; i < seconds * 10; ++i) {
    if (dirty_now(m, image) == 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

}  // namespace

TEST_CASE("cache device fills up during write-back: degraded to pass-through, dirty data destaged, no guest error, "
          "no loss",
          "[cache][fio][errors]") {
  TempDir t;
  datastore(t, {"disk.raw"}, 32,
            "{ cache: { mode: write-back, device: " + t / "ssd" + ", size: 16MiB, sequential-cutoff: 0 } }");
  // Room for the header, the record table and about 2.9 MiB of blocks.
  Tmpfs ssd(t / "ssd", "3M");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const std::string img = m.path("disk.raw");
  Holder open(img);
  // 2 MiB acknowledged into the cache: dirty there, not yet below.
  REQUIRE(sh("head -c 2M /dev/urandom > " + q(t / "first") + " && dd if=" + q(t / "first") + " of=" + q(img) +
             " bs=64k conv=notrunc,fsync status=none") == 0);
  CHECK(dirty_now(m, "disk.raw") == 2u << 20);
  CHECK(get_xattr(img, "user.iofilter.state") == "active");
  // 8 MiB more, verified: the file system fills up partway.
  fio_verify(t, img, "--offset=8M --size=8M");
  // An unaligned write into the dirty blocks, after the device is full.
  REQUIRE(sh("head -c 100000 /dev/urandom > " + q(t / "patch") + " && dd if=" + q(t / "patch") + " of=" + q(img) +
             " bs=100000 seek=1000001 oflag=seek_bytes conv=notrunc,fsync status=none") == 0);
  const std::string state = get_xattr(img, "user.iofilter.state");
  INFO(state << "\n" << cache_stats(m, "disk.raw") << "\n" << m.log());
  CHECK(state.rfind("degraded: cache device write failed: No space left on device", 0) == 0);
  CHECK(cache_stats(m, "disk.raw").find("\"state\":\"degraded: cache device") != std::string::npos);
  // The dirty data that was in the cache goes below in the background, no flush asked.
  CHECK(wait_clean(m, "disk.raw", 30));
  CHECK(json_number(cache_stats(m, "disk.raw"), "destaged_bytes") >= 1 << 20);
  // Clean data passes through: a region never read before is read from below, not cached.
  const double cached0 = json_number(cache_stats(m, "disk.raw"), "bytes_cached");
  REQUIRE(sh("dd if=" + q(img) + " of=/dev/null bs=64k skip=400 count=32 iflag=direct status=none") == 0);
  CHECK(json_number(cache_stats(m, "disk.raw"), "bytes_cached") == cached0);
  // Every acknowledged write is in the backing file alone, with the cache device gone.
  REQUIRE(sh("cat " + q(img) + " > " + q(t / "expected")) == 0);
  REQUIRE(sh("cmp -n 1000001 " + q(t / "first") + " " + q(t / "expected")) == 0);
  REQUIRE(sh("cmp -i 0:1000001 -n 100000 " + q(t / "patch") + " " + q(t / "expected")) == 0);
  ::kill(m.pid(), SIGKILL);
  m.stop();
  sh("umount -l " + q(t / "ssd"));
  CHECK(sh("cmp " + q(t / "expected") + " " + q(t / "b/disk.raw")) == 0);
}

TEST_CASE("cache device failing (EIO from the fault layer of a second mount): dirty data destaged, the cache file "
          "set aside, no guest error, no loss",
          "[cache][fio][errors]") {
  TempDir t;
  datastore(t, {"disk.raw"}, 32,
            "{ cache: { mode: write-back, device: " + t / "ssd" + ", size: 16MiB, sequential-cutoff: 0 } }");
  // The cache device is a second iofilterfs whose images are cache files: its fault layer
  // makes the cache file fail on command. Declared first, so it is unmounted last.
  REQUIRE(sh("mkdir -p " + q(t / "ssdb")) == 0);
  write_file(t / "dev.yaml", "datastore:\n  images: [\"*.iofcache\"]\n");
  Mount dev(t / "ssdb", t / "ssd", {{"--config", t / "dev.yaml", "--fault-injection"}});
  const std::string cache_file = dev.path("disk.raw.iofcache");
  {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    const std::string img = m.path("disk.raw");
    Holder open(img);
    REQUIRE(sh("head -c 4M /dev/urandom > " + q(t / "first") + " && dd if=" + q(t / "first") + " of=" + q(img) +
               " bs=64k conv=notrunc,fsync status=none") == 0);
    CHECK(dirty_now(m, "disk.raw") == 4u << 20);
    CHECK(sh("cmp -n 4194304 " + q(t / "first") + " " + q(t / "b/disk.raw")) != 0);  // not below yet
    // From now on the cache file fails every write and sync.
    REQUIRE(set_xattr(cache_file, "user.iofilter.fault", "fail=write+sync:EIO") == 0);
    // An unaligned write into the dirty blocks, then fio with verify elsewhere.
    REQUIRE(sh("head -c 100000 /dev/urandom > " + q(t / "patch") + " && dd if=" + q(t / "patch") + " of=" + q(img) +
               " bs=100000 seek=1000001 oflag=seek_bytes conv=notrunc,fsync status=none") == 0);
    fio_verify(t, img, "--offset=8M --size=8M");
    const std::string state = get_xattr(img, "user.iofilter.state");
    INFO(state << "\n" << cache_stats(m, "disk.raw") << "\n" << m.log());
    CHECK(state.rfind("degraded: cache device write failed: Input/output error", 0) == 0);
    CHECK(dirty_now(m, "disk.raw") == 0);
    // The file that no longer says what it holds is set aside.
    CHECK(sh("test -f " + q(t / "ssdb/disk.raw.iofcache.failed") + " && ! test -e " + q(cache_file)) == 0);
    CHECK(m.log().find("set aside as") != std::string::npos);
    REQUIRE(sh("cat " + q(img) + " > " + q(t / "expected")) == 0);
    REQUIRE(sh("cmp -n 1000001 " + q(t / "first") + " " + q(t / "expected")) == 0);
    REQUIRE(sh("cmp -i 0:1000001 -n 100000 " + q(t / "patch") + " " + q(t / "expected")) == 0);
    // Killed without a flush: everything acknowledged is below already.
    ::kill(m.pid(), SIGKILL);
    m.stop();
  }
  CHECK(sh("cmp " + q(t / "expected") + " " + q(t / "b/disk.raw")) == 0);
  // The next start makes a new cache file and serves the same bytes (nothing stale replayed).
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  Holder open(m.path("disk.raw"));
  CHECK(json_number(cache_stats(m, "disk.raw"), "replayed_dirty_blocks") == 0);
  CHECK(sh("cmp " + q(t / "expected") + " " + q(m.path("disk.raw"))) == 0);
  CHECK(get_xattr(m.path("disk.raw"), "user.iofilter.state") == "active");
  REQUIRE(set_xattr(m.path("disk.raw"), "user.iofilter.flush", "1") == 0);
  open.close();
  CHECK(m.stop() == 0);
  CHECK(sh("cmp " + q(t / "expected") + " " + q(t / "b/disk.raw")) == 0);
}

TEST_CASE("cache over encryption: the cache file holds no plaintext, and its dirty data survives SIGKILL",
          "[cache][encrypt][crash]") {
  TempDir t;
  write_file(t / "k", "cache test passphrase");
  REQUIRE(chmod((t / "k").c_str(), 0600) == 0);
  REQUIRE(sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " " + q(t / "ssd")) == 0);
  write_file(t / "ds.yaml", "datastore:\n  images: [\"*.raw\"]\npolicies:\n  p:\n    cache: { mode: write-back, device: " +
                                t / "ssd" + ", size: 16MiB, sequential-cutoff: 0 }\n    encrypt: { key-file: " +
                                t / "k" + ", pbkdf-iter-time: 10ms }\nrules:\n  - { match: \"*\", policy: p }\n");
  // 4 MiB of a recognisable text, written through the mount and synced (in the cache, dirty).
  std::string text;
  while (text.size() < (4 << 20)) text += "PLAINTEXT-MARKER-0123456789abcdef-";
  text.resize(4 << 20);
  write_file(t / "plain", text);
  {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    REQUIRE(sh("truncate -s 8M " + q(m.path("disk.raw"))) == 0);
    Holder open(m.path("disk.raw"));
    REQUIRE(sh("dd if=" + q(t / "plain") + " of=" + q(m.path("disk.raw")) +
               " bs=64k conv=notrunc,fsync status=none") == 0);
    CHECK(json_number(cache_stats(m, "disk.raw"), "dirty_bytes") >= 2 << 20);
    ::kill(m.pid(), SIGKILL);
    m.stop();
  }
  std::string out;
  CHECK(sh("grep -c PLAINTEXT-MARKER " + q(t / "ssd/disk.raw.iofcache"), &out) == 1);  // no match
  CHECK(sh("grep -c PLAINTEXT-MARKER " + q(t / "b/disk.raw"), &out) == 1);
  // Restarted: the dirty blocks are decrypted with the image's key and served.
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  Holder open(m.path("disk.raw"));
  CHECK(json_number(cache_stats(m, "disk.raw"), "replayed_dirty_blocks") > 0);
  REQUIRE(sh("head -c 4194304 " + q(m.path("disk.raw")) + " > " + q(t / "back")) == 0);
  CHECK(sh("cmp " + q(t / "plain") + " " + q(t / "back")) == 0);
  REQUIRE(set_xattr(m.path("disk.raw"), "user.iofilter.flush", "1") == 0);
  open.close();
  CHECK(m.stop() == 0);
  // Only ciphertext below: cryptsetup-compatible container, data intact through a fresh mount.
  CHECK(sh("grep -c PLAINTEXT-MARKER " + q(t / "b/disk.raw"), &out) == 1);
}

TEST_CASE("a cache file with a damaged record refuses the open until iofilterctl cache discard --force",
          "[cache][crash][ctl]") {
  TempDir t;
  datastore(t, {"disk.raw"}, 8, "{ cache: { mode: write-back, device: " + t / "ssd" + ", size: 4MiB } }");
  {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    Holder open(m.path("disk.raw"));
    REQUIRE(sh("head -c 1M /dev/urandom | dd of=" + q(m.path("disk.raw")) +
               " bs=64k conv=notrunc,fsync iflag=fullblock status=none") == 0);
    ::kill(m.pid(), SIGKILL);
    m.stop();
  }
  // Flip one byte of the first record in use.
  const std::string file = t / "ssd/disk.raw.iofcache";
  std::string c = read_file(file);
  size_t at = 4096;
  const size_t table_end = 4096 + 64 * 128;  // 64 slots of 64 KiB
  while (at < table_end && c[at] == 0) ++at;
  REQUIRE(at < table_end);
  c[at] ^= 0x5a;
  write_file(file, c);
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const std::string img = m.path("disk.raw");
  errno = 0;
  int fd = ::open(img.c_str(), O_RDONLY);
  CHECK(fd < 0);
  CHECK(errno == EIO);
  CHECK(m.log().find("is damaged and may describe dirty data: refusing to open") != std::string::npos);
  std::string out;
  CHECK(sh(ctl() + " cache discard " + q(img), &out) == 2);
  CHECK(out.find("add --force") != std::string::npos);
  CHECK(sh(ctl() + " cache discard --force " + q(img), &out) == 0);
  CHECK(out == img + ": cache discarded (its dirty data is lost)\n");
  fd = ::open(img.c_str(), O_RDONLY);
  CHECK(fd >= 0);
  if (fd >= 0) ::close(fd);
  CHECK(sh("test -f " + q(file + ".discarded")) == 0);
  CHECK(m.stop() == 0);
}

TEST_CASE("removing a write-back cache from an open disk destages it first", "[cache][reload]") {
  TempDir t;
  datastore(t, {"disk.raw"}, 8,
            "{ cache: { mode: write-back, device: " + t / "ssd" + ", size: 8MiB, sequential-cutoff: 0 } }",
            "  plain:\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const std::string img = m.path("disk.raw");
  Holder open(img);
  REQUIRE(sh("head -c 2M /dev/urandom > " + q(t / "data") + " && dd if=" + q(t / "data") + " of=" + q(img) +
             " bs=64k conv=notrunc,fsync status=none") == 0);
  CHECK(json_number(cache_stats(m, "disk.raw"), "dirty_bytes") == 2 << 20);
  REQUIRE(set_xattr(img, "user.iofilter.policy", "plain") == 0);
  CHECK(get_xattr(img, "user.iofilter.chain") == "(empty)");
  // The backing file has every byte, with the cache gone from the chain.
  CHECK(sh("cmp -n 2097152 " + q(t / "data") + " " + q(t / "b/disk.raw")) == 0);
  CHECK(sh("cmp -n 2097152 " + q(t / "data") + " " + q(img)) == 0);
  open.close();
  CHECK(m.stop() == 0);
}

TEST_CASE("reload: write-back to write-through and back in place, destaging first and keeping the cache",
          "[cache][reload]") {
  TempDir t;
  const std::string dev = "device: " + t / "ssd" + ", size: 8MiB, sequential-cutoff: 0";
  datastore(t, {"disk.raw"}, 8, "{ cache: { mode: write-back, " + dev + " } }");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const std::string img = m.path("disk.raw");
  Holder open(img);
  REQUIRE(sh("head -c 1M /dev/urandom > " + q(t / "data") + " && dd if=" + q(t / "data") + " of=" + q(img) +
             " bs=64k conv=notrunc,fsync status=none && cat " + q(img) + " > /dev/null") == 0);
  CHECK(json_number(cache_stats(m, "disk.raw"), "dirty_bytes") == 1 << 20);
  const double hits = json_number(cache_stats(m, "disk.raw"), "read_hits");
  CHECK(hits >= 16);
  auto reload_with = [&](const std::string& policy) {
    write_file(t / "ds.yaml", "datastore:\n  images: [\"*.raw\"]\npolicies:\n  p: " + policy +
                                  "\nrules:\n  - { match: \"*\", policy: p }\n");
    return set_xattr(m.mountpoint(), "user.iofilter.reload", "1");
  };
  REQUIRE(reload_with("{ cache: { mode: write-through, " + dev + " } }") == 0);
  std::string st = cache_stats(m, "disk.raw");
  INFO(st << "\n" << m.log());
  CHECK(st.find("\"mode\":\"write-through\"") != std::string::npos);
  CHECK(json_number(st, "dirty_bytes") == 0);
  CHECK(json_number(st, "read_hits") == hits);  // the same filter: in place
  CHECK(m.log().find("reconfigured in place") != std::string::npos);
  CHECK(sh("cmp -n 1048576 " + q(t / "data") + " " + q(t / "b/disk.raw")) == 0);
  CHECK(sh("cmp -n 1048576 " + q(t / "data") + " " + q(img)) == 0);
  // Back to write-back, in place too: writes stay in the cache again.
  REQUIRE(reload_with("{ cache: { mode: write-back, " + dev + " } }") == 0);
  REQUIRE(sh("dd if=" + q(t / "data") + " of=" + q(img) + " bs=64k seek=32 conv=notrunc,fsync status=none") == 0);
  CHECK(json_number(cache_stats(m, "disk.raw"), "dirty_bytes") == 1 << 20);
  CHECK(json_number(cache_stats(m, "disk.raw"), "read_hits") >= hits);
  REQUIRE(set_xattr(img, "user.iofilter.flush", "1") == 0);
  CHECK(sh("cmp -i 0:2097152 -n 1048576 " + q(t / "data") + " " + q(t / "b/disk.raw")) == 0);
  open.close();
  CHECK(m.stop() == 0);
}
