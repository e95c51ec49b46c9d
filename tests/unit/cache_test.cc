// The cache filter's pure parts, exactly: the block table and S3-FIFO map (scan resistance,
// dirty and pinned slots never evicted), the sequential cutoff, the watermarks and the destage
// rate with the time passed in, the cache file's header and records, the parameters
// (table-driven); then the filter itself over a memory layer: hits, write-around
// invalidation, and a write-back cache file that survives the filter's sudden end.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cache/block_map.h"
#include "cache/cache_filter.h"
#include "cache/format.h"
#include "cache/params.h"
#include "cache/policy.h"
#include "mem_layer.h"

using namespace iofilterfs::cache;
using iofilterfs::CacheFilter;
using iofilterfs::DiskInfo;
using iofilterfs::Io;

TEST_CASE("block table: puts, finds and erases like a map, through collisions", "[cache][map]") {
  BlockTable t(1000);
  std::map<uint64_t, uint32_t> ref;
  std::mt19937_64 rng(7);
  for (int i = 0; i < 20000; ++i) {
    const uint64_t k = rng() % 1500;
    if (rng() % 3 == 0) {
      CHECK(t.erase(k) == (ref.erase(k) == 1));
    } else if (ref.size() < 1000 || ref.count(k)) {
      const uint32_t v = static_cast<uint32_t>(rng() % 100000);
      t.put(k, v);
      ref[k] = v;
    }
    if (i % 1000 == 0) {
      for (uint64_t q = 0; q < 1500; ++q) {
        auto it = ref.find(q);
        REQUIRE(t.find(q) == (it == ref.end() ? kNoSlot : it->second));
      }
    }
  }
  CHECK(t.size() == ref.size());
}

TEST_CASE("block map: free slots first, then the small queue's unreused blocks are evicted", "[cache][map]") {
  BlockMap m(10);  // small queue target: 1 slot
  uint64_t ev = 0;
  for (uint64_t b = 0; b < 10; ++b) {
    REQUIRE(m.insert(b, &ev) != kNoSlot);
    CHECK(ev == kNoBlock);
  }
  CHECK(m.used() == 10);
  // Every block is in the small queue; the oldest unreused one goes first, into the ghost.
  REQUIRE(m.insert(100, &ev) != kNoSlot);
  CHECK(ev == 0);
  CHECK(m.find(0) == kNoSlot);
  CHECK(m.in_ghost(0));
  // A block that comes back from the ghost goes to the main queue.
  const uint32_t s = m.insert(0, &ev);
  REQUIRE(s != kNoSlot);
  CHECK(m.queue_of(s) == BlockMap::Queue::Main);
  CHECK_FALSE(m.in_ghost(0));
}

TEST_CASE("block map: a working set survives a scan ten times the cache's size (LRU would lose it)",
          "[cache][map]") {
  BlockMap m(100);
  uint64_t ev = 0;
  // A working set of 50 blocks, each used twice.
  for (int round = 0; round < 2; ++round)
    for (uint64_t b = 0; b < 50; ++b)
      if (m.hit(b) == kNoSlot) REQUIRE(m.insert(b, &ev) != kNoSlot);
  // A scan of 1000 blocks seen once, with the working set used now and then.
  for (uint64_t i = 0; i < 1000; ++i) {
    if (m.hit(1000 + i) == kNoSlot) REQUIRE(m.insert(1000 + i, &ev) != kNoSlot);
    if (i % 20 == 0)
      for (uint64_t b = 0; b < 50; ++b) (void)m.hit(b);
  }
  int kept = 0;
  for (uint64_t b = 0; b < 50; ++b) kept += m.find(b) != kNoSlot;
  CHECK(kept == 50);
}

TEST_CASE("block map: dirty and pinned slots are never evicted and full of them, insert fails", "[cache][map]") {
  BlockMap m(16);
  uint64_t ev = 0;
  std::vector<uint32_t> slots;
  for (uint64_t b = 0; b < 16; ++b) slots.push_back(m.insert(b, &ev));
  for (int i = 0; i < 15; ++i) m.set_dirty(slots[i], true);
  m.pin(slots[15]);
  CHECK(m.dirty_count() == 15);
  CHECK(m.insert(99, &ev) == kNoSlot);
  m.unpin(slots[15]);
  const uint32_t s = m.insert(99, &ev);
  CHECK(s == slots[15]);
  CHECK(ev == 15);
  for (uint64_t b = 0; b < 15; ++b) CHECK(m.find(b) == slots[b]);
  // Cleaned, a slot is evictable again.
  m.set_dirty(slots[3], false);
  CHECK(m.insert(100, &ev) != kNoSlot);
  CHECK(m.dirty_count() == 14);
}

TEST_CASE("block map: place() rebuilds a replayed map, erase() frees the slot", "[cache][map]") {
  BlockMap m(16);
  CHECK(m.place(42, 7));
  CHECK_FALSE(m.place(43, 7));  // taken
  CHECK_FALSE(m.place(42, 8));  // mapped already
  CHECK(m.find(42) == 7);
  m.set_dirty(7, true);
  m.erase(42);
  CHECK(m.find(42) == kNoSlot);
  CHECK(m.dirty_count() == 0);
  CHECK(m.used() == 0);
  CHECK(m.place(43, 7));
}

TEST_CASE("sequential cutoff: a stream bypasses once it has moved the cutoff, others do not", "[cache][policy]") {
  SequentialCutoff c(1 << 20);
  uint64_t t = 1000;
  // 256 KiB requests: the 4th makes 1 MiB.
  CHECK_FALSE(c.observe(0, 256 << 10, t));
  CHECK_FALSE(c.observe(256 << 10, 256 << 10, t));
  CHECK_FALSE(c.observe(512 << 10, 256 << 10, t));
  CHECK(c.observe(768 << 10, 256 << 10, t));
  CHECK(c.observe(1 << 20, 4096, t));
  // A random request elsewhere, and a second stream interleaved with the first, do not.
  CHECK_FALSE(c.observe(100ull << 20, 4096, t));
  CHECK_FALSE(c.observe(200ull << 20, 256 << 10, t));
  CHECK(c.observe((1 << 20) + 4096, 4096, t));
  // After five idle seconds the stream is forgotten.
  CHECK_FALSE(c.observe((1 << 20) + 8192, 4096, t + SequentialCutoff::kIdleNs + 1));
  // One request as big as the cutoff bypasses on its own; cutoff 0 never bypasses.
  CHECK(c.observe(500ull << 20, 1 << 20, t));
  SequentialCutoff off(0);
  CHECK_FALSE(off.observe(0, 1ull << 30, t));
}

TEST_CASE("watermarks: start at the high mark, run down to the low mark", "[cache][policy]") {
  Watermarks w(50, 25);
  CHECK_FALSE(w.update(49, 100));
  CHECK(w.update(50, 100));
  CHECK(w.update(30, 100));
  CHECK(w.update(26, 100));
  CHECK_FALSE(w.update(25, 100));
  CHECK_FALSE(w.update(49, 100));
  CHECK(w.above_high(50, 100));
  CHECK_FALSE(w.above_high(49, 100));
}

TEST_CASE("rate meter: bytes in the last whole second", "[cache][policy]") {
  RateMeter r;
  const uint64_t s = 1'000'000'000ull;
  r.add(100, 10 * s);
  r.add(50, 10 * s + s / 2);
  CHECK(r.per_second(10 * s + s / 2) == 0);  // second 10 is not over
  CHECK(r.per_second(11 * s) == 150);
  r.add(7, 11 * s + 1);
  CHECK(r.per_second(11 * s + 2) == 150);
  CHECK(r.per_second(12 * s) == 7);
  CHECK(r.per_second(13 * s) == 0);
}

TEST_CASE("cache file header and records: round trip, checksums, empty records", "[cache][format]") {
  Header h;
  h.block_size = 65536;
  h.slots = 1000;
  h.data_offset = Header::data_offset_for(1000);
  h.encrypted = true;
  h.key_check[0] = 9;
  h.image = "vm1/disk.raw";
  h.boot_id = "1234-abcd";
  std::vector<uint8_t> buf(kHeaderSize);
  encode_header(h, buf.data());
  Header g;
  REQUIRE(decode_header(buf.data(), &g) == "");
  CHECK(g.block_size == 65536);
  CHECK(g.slots == 1000);
  CHECK(g.data_offset == 4096 + 128000 + 3072);  // rounded up to 4 KiB
  CHECK(g.encrypted);
  CHECK(g.key_check == h.key_check);
  CHECK(g.image == "vm1/disk.raw");
  CHECK(g.boot_id == "1234-abcd");
  buf[100] ^= 1;
  CHECK(decode_header(buf.data(), &g) == "the cache file's header checksum is wrong");
  buf[0] = 'X';
  CHECK(decode_header(buf.data(), &g).find("no IOFCACH1 magic") != std::string::npos);

  Record r;
  r.seq = 77;
  r.block = 123456789;
  r.size = 1 << 30;
  r.slot = 999;
  r.flags = 1;
  r.valid.set_range(0, 256);
  r.dirty.set(3);
  r.dirty.set(255);
  uint8_t rec[kRecordSize];
  encode_record(r, rec);
  Record q;
  REQUIRE(decode_record(rec, &q) == RecordState::Ok);
  CHECK(q.seq == 77);
  CHECK(q.block == 123456789);
  CHECK(q.size == (1u << 30));
  CHECK(q.slot == 999);
  CHECK(q.valid.count() == 256);
  CHECK(q.dirty.count() == 2);
  CHECK(q.dirty.test(255));
  rec[40] ^= 0x10;
  CHECK(decode_record(rec, &q) == RecordState::Corrupt);
  std::memset(rec, 0, sizeof rec);
  CHECK(decode_record(rec, &q) == RecordState::Empty);
  CHECK(crc32c("123456789", 9) == 0xE3069283u);  // the CRC-32C check value
  CHECK(cache_file_name("vm1/a%b.raw") == "vm1%2Fa%25b.raw.iofcache");
}

namespace {

struct Case {
  const char* yaml;
  const char* error;  // "" when valid; else a piece of the message
};

}  // namespace

TEST_CASE("cache parameters: good and bad, with precise messages", "[cache][params]") {
  const Case cases[] = {
      {"{memory: 64MiB}", ""},
      {"{mode: write-around, memory: 1GiB, block: 4KiB}", ""},
      {"{mode: write-back, device: /ssd, size: 8GiB, high-watermark: 80, low-watermark: 40%}", ""},
      {"{mode: write-back, memory: 64MiB, unsafe: true}", ""},
      {"{memory: 64MiB, sequential-cutoff: 0}", ""},
      {"", "no cache storage given"},
      {"{mode: write-through}", "no cache storage given"},
      {"[1, 2]", "parameters must be a mapping, not a list"},
      {"{memory: 64MiB, mode: writeback}", "mode must be write-through, write-back or write-around, not 'writeback'"},
      {"{memroy: 64MiB}", "unknown key 'memroy'"},
      {"{memory: 64MiB, device: /ssd}", "memory and device exclude each other"},
      {"{device: /ssd}", "device needs size: SIZE"},
      {"{device: ssd, size: 1GiB}", "device must be the absolute path of a directory"},
      {"{size: 1GiB}", "size goes with device"},
      {"{memory: 64MiB, size: 1GiB}", "size goes with device"},
      {"{memory: 64MiB, block: 3KiB}", "block must be a power of two from 4KiB to 1MiB, not '3KiB'"},
      {"{memory: 64MiB, block: 2MiB}", "block must be a power of two from 4KiB to 1MiB"},
      {"{memory: 64MiB, block: 96KiB}", "block must be a power of two"},
      {"{memory: 512KiB}", "memory must hold at least 16 blocks of 64KiB (1MiB), not 512KiB"},
      {"{memory: 0}", "memory must be more than 0"},
      {"{memory: lots}", "memory: "},
      {"{mode: write-back, memory: 64MiB}", "write-back on memory loses every write"},
      {"{memory: 64MiB, unsafe: true}", "unsafe applies only to write-back on memory"},
      {"{mode: write-back, device: /ssd, size: 1GiB, unsafe: true}", "unsafe applies only"},
      {"{mode: write-back, memory: 64MiB, unsafe: maybe}", "unsafe must be true or false, not 'maybe'"},
      {"{memory: 64MiB, high-watermark: 120}", "high-watermark must be a percentage from 0 to 100, not '120'"},
      {"{memory: 64MiB, high-watermark: 30, low-watermark: 30}", "low-watermark (30%) must be below high-watermark (30%)"},
      {"{memory: 64MiB, memory: 32MiB}", "duplicate key 'memory'"},
      {"{memory: [1]}", "'memory' must be a single value, not a list"},
      {"{memory: }", "'memory' has no value"},
  };
  for (const Case& c : cases) {
    INFO(c.yaml);
    YAML::Node n = YAML::Load(c.yaml);
    YAML::Node where = n;
    const std::string err = validate_cache(n, &where);
    if (*c.error == 0) {
      CHECK(err == "");
    } else {
      CHECK(err.find(c.error) != std::string::npos);
      CHECK_FALSE(err.empty());
    }
  }
  CacheParams p;
  REQUIRE(parse_cache(YAML::Load("{mode: write-back, device: /ssd, size: 1GiB, block: 16KiB}"), &p) == "");
  CHECK(p.mode == Mode::WriteBack);
  CHECK(p.slots() == 65536);
  CHECK(describe_cache(p) == "mode=write-back device=/ssd size=1GiB block=16KiB sequential-cutoff=4MiB watermarks=50/25");
}

// ---- the filter over a memory layer ----

namespace {

std::string pattern(size_t n, int seed) {
  std::string s(n, '\0');
  std::mt19937 rng(seed);
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

struct TmpDir {
  std::string path;
  TmpDir() {
    char t[] = "/tmp/cache-unit-XXXXXX";
    path = mkdtemp(t);
  }
  ~TmpDir() { (void)system(("rm -rf '" + path + "'").c_str()); }
};

std::unique_ptr<CacheFilter> make(const std::string& yaml, testing::MemLayer* below, const std::string& image,
                                  iofilterfs::Status* st) {
  CacheParams p;
  REQUIRE(parse_cache(YAML::Load(yaml), &p) == "");
  auto f = std::make_unique<CacheFilter>(p);
  f->set_next(below);
  *st = f->open(DiskInfo{image, "raw", false});
  return f;
}

// A write-back cache of 64 blocks of 16 KiB on a cache file in dir, without its destager
// thread: what reaches below is the test's doing (destage_once, drain).
std::unique_ptr<CacheFilter> write_back_by_hand(const TmpDir& dir, testing::MemLayer* below) {
  iofilterfs::Status st;
  auto f = make("{mode: write-back, device: " + dir.path + ", size: 1MiB, block: 16KiB}", below, "d.raw", &st);
  REQUIRE(st.ok());
  f->shutdown();
  return f;
}

std::string read_all(iofilterfs::Layer& l, uint64_t off, size_t len) {
  std::string s(len, '\0');
  size_t got = 0;
  REQUIRE(l.read(Io{}, s.data(), len, off, &got).ok());
  s.resize(got);
  return s;
}

double counter(const std::string& json, const std::string& key) {
  const size_t p = json.find("\"" + key + "\":");
  REQUIRE(p != std::string::npos);
  return std::atof(json.c_str() + p + key.size() + 3);
}

}  // namespace

TEST_CASE("write-through on memory: reads after writes hit and are correct and unaligned requests", "[cache][filter]") {
  testing::MemLayer below;
  below.data.assign(4 << 20, 0);
  iofilterfs::Status st;
  auto f = make("{memory: 1MiB, block: 4KiB}", &below, "d.raw", &st);
  REQUIRE(st.ok());
  const std::string a = pattern(64 << 10, 1);
  REQUIRE(f->write(Io{}, a.data(), a.size(), 8192).ok());
  CHECK(std::string(below.data.data() + 8192, a.size()) == a);  // written through
  CHECK(read_all(*f, 8192, a.size()) == a);
  CHECK(counter(f->stats_json(), "read_hits") == 16);
  CHECK(counter(f->stats_json(), "read_misses") == 0);
  // An unaligned write drops the edge pages; the read comes back right (a partial miss).
  REQUIRE(f->write(Io{}, "hello", 5, 8192 + 4090).ok());
  std::string expect = a;
  std::memcpy(expect.data() + 4090, "hello", 5);
  CHECK(read_all(*f, 8192, a.size()) == expect);
  CHECK(read_all(*f, 8192 + 4000, 200) == expect.substr(4000, 200));
  CHECK(f->dirty_bytes() == 0);
}

TEST_CASE("write-around: writes go below and drop what the cache held", "[cache][filter]") {
  testing::MemLayer below;
  below.data.assign(1 << 20, 'x');
  iofilterfs::Status st;
  auto f = make("{mode: write-around, memory: 1MiB}", &below, "d.raw", &st);
  REQUIRE(st.ok());
  CHECK(read_all(*f, 0, 65536) == std::string(65536, 'x'));  // a miss that fills
  CHECK(read_all(*f, 0, 65536) == std::string(65536, 'x'));  // a hit
  CHECK(counter(f->stats_json(), "read_hits") == 1);
  REQUIRE(f->write(Io{}, std::string(4096, 'y').data(), 4096, 4096).ok());
  CHECK(counter(f->stats_json(), "invalidations") == 1);
  std::string expect(65536, 'x');
  std::memset(expect.data() + 4096, 'y', 4096);
  CHECK(read_all(*f, 0, 65536) == expect);
  CHECK(counter(f->stats_json(), "read_misses") == 2);
}

TEST_CASE("write-back on a cache file: the data survives the filter's sudden end, then destages",
          "[cache][filter][crash]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(1 << 20, 0);
  const std::string yaml = "{mode: write-back, device: " + dir.path + ", size: 2MiB, block: 16KiB}";
  const std::string a = pattern(100000, 2), b = pattern(3000, 3);
  {
    iofilterfs::Status st;
    auto f = make(yaml, &below, "vm/d.raw", &st);
    REQUIRE(st.ok());
    REQUIRE(f->write(Io{}, a.data(), a.size(), 5000).ok());
    REQUIRE(f->write(Io{}, b.data(), b.size(), (1 << 20) + 100).ok());  // past the end below
    REQUIRE(f->sync(Io{}, true).ok());
    CHECK(f->dirty_bytes() > 0);
    uint64_t size = 0;
    REQUIRE(f->size(&size).ok());
    CHECK(size == (1 << 20) + 3100);
    // No drain: the filter ends as a killed daemon would (no destaging at close).
  }
  CHECK(std::string(below.data.data() + 5000, 16) == std::string(16, '\0'));
  iofilterfs::Status st;
  auto f = make(yaml, &below, "vm/d.raw", &st);
  REQUIRE(st.ok());
  CHECK(counter(f->stats_json(), "replayed_dirty_blocks") >= 7);
  CHECK(read_all(*f, 5000, a.size()) == a);  // served from the cache before destaging
  CHECK(read_all(*f, (1 << 20) + 100, b.size()) == b);
  REQUIRE(f->drain().ok());
  CHECK(f->dirty_bytes() == 0);
  CHECK(std::string(below.data.data() + 5000, a.size()) == a);
  REQUIRE(below.data.size() >= (1 << 20) + 3100);
  CHECK(std::string(below.data.data() + (1 << 20) + 100, b.size()) == b);
}

TEST_CASE("write-back: a damaged record refuses the open and another image's file is refused", "[cache][filter][crash]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(1 << 20, 0);
  const std::string yaml = "{mode: write-back, device: " + dir.path + ", size: 2MiB, block: 16KiB}";
  {
    iofilterfs::Status st;
    auto f = make(yaml, &below, "d.raw", &st);
    REQUIRE(st.ok());
    REQUIRE(f->write(Io{}, pattern(4096, 4).data(), 4096, 0).ok());
  }
  const std::string file = dir.path + "/d.raw.iofcache";
  int fd = ::open(file.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  // Find the non-empty record and flip a byte of it.
  std::vector<uint8_t> table(128 * 128);
  REQUIRE(pread(fd, table.data(), table.size(), 4096) == ssize_t(table.size()));
  size_t at = 0;
  while (at < table.size() && table[at] == 0) ++at;
  REQUIRE(at < table.size());
  uint8_t x = table[at] ^ 0xff;
  REQUIRE(pwrite(fd, &x, 1, 4096 + at) == 1);
  ::close(fd);
  iofilterfs::Status st;
  auto f = make(yaml, &below, "d.raw", &st);
  CHECK(st.err == EIO);
  REQUIRE(st.what);
  CHECK(std::string(st.what).find("is damaged and may describe dirty data") != std::string::npos);
  REQUIRE(rename(file.c_str(), (dir.path + "/other.raw.iofcache").c_str()) == 0);
  auto g = make(yaml, &below, "other.raw", &st);
  CHECK(st.err == EEXIST);
  // discard: the next open starts empty.
  CHECK(discard_cache_file(dir.path, "other.raw") == "");
  auto h = make(yaml, &below, "other.raw", &st);
  CHECK(st.ok());
  CHECK(h->dirty_bytes() == 0);
}

TEST_CASE("write-back: destaging between the watermarks, evictions, and a full cache bypassing", "[cache][filter]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(4 << 20, 0);
  iofilterfs::Status st;
  auto f = make("{mode: write-back, device: " + dir.path + ", size: 256KiB, block: 16KiB, sequential-cutoff: 0}",
                &below, "d.raw", &st);
  REQUIRE(st.ok());
  f->shutdown();  // no background thread: passes are run by hand
  // 16 slots: fill them all dirty, then one more block has no slot and goes below.
  std::string model(4 << 20, '\0');
  for (int i = 0; i < 17; ++i) {
    const std::string d = pattern(16384, 10 + i);
    REQUIRE(f->write(Io{}, d.data(), d.size(), uint64_t(i) * 16384).ok());
    model.replace(size_t(i) * 16384, d.size(), d);
  }
  CHECK(f->dirty_bytes() == 16 * 16384);
  CHECK(counter(f->stats_json(), "bypasses") == 1);
  CHECK(std::string(below.data.data() + 16 * 16384, 16384) == model.substr(16 * 16384, 16384));
  CHECK(f->destage_once() == 16);
  CHECK(f->dirty_bytes() == 0);
  CHECK(std::string(below.data.data(), 17 * 16384) == model.substr(0, 17 * 16384));
  // Clean now: new blocks evict old ones.
  for (int i = 20; i < 30; ++i) REQUIRE(f->write(Io{}, model.data(), 16384, uint64_t(i) * 16384).ok());
  CHECK(counter(f->stats_json(), "evictions") == 10);
  CHECK(read_all(*f, 0, 17 * 16384) == model.substr(0, 17 * 16384));
}

namespace {

// Random writes, reads, discards and zero-ranges in one mode agree with a model, before and after a drain. Every
// request goes with io (which may offer a Deferrer); with `aligned`, every other one is
// page-aligned (what the cache hands below with a Deferrer), the rest anywhere.
void agree_with_model(const char* mode, const Io& io, bool aligned) {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(2 << 20, 0);
  iofilterfs::Status st;
  auto f = make(std::string("{mode: ") + mode + ", device: " + dir.path +
                    ", size: 256KiB, block: 16KiB, sequential-cutoff: 0}",
                &below, "d.raw", &st);
  REQUIRE(st.ok());
  std::string model(2 << 20, '\0');
  std::mt19937_64 rng(11);
  for (int i = 0; i < 3000; ++i) {
    INFO(mode << " op " << i);
    size_t len = 1 + rng() % 40000;
    uint64_t off = rng() % (model.size() - len);
    if (aligned && i % 2) {
      len = (len + 4095) & ~size_t(4095);
      off = std::min<uint64_t>(off & ~uint64_t(4095), model.size() - len);
    }
    const int op = static_cast<int>(rng() % 7);
    if (op < 3) {
      const std::string d = pattern(len, i);
      REQUIRE(f->write(io, d.data(), len, off).ok());
      model.replace(off, len, d);
    } else if (op == 3) {  // a discard or a zero-range, anywhere: nothing dirty goes below first
      const int how = i % 2 ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
      REQUIRE(f->fallocate(Io{}, how, off, len).ok());
      std::memset(model.data() + off, 0, len);
    } else {
      std::string r(len, '\0');
      size_t got = 0;
      REQUIRE(f->read(io, r.data(), len, off, &got).ok());
      REQUIRE(got == len);
      REQUIRE(r == model.substr(off, len));
    }
  }
  REQUIRE(f->drain().ok());
  CHECK(std::string(below.data.data(), model.size()) == model);
  CHECK(read_all(*f, 0, model.size()) == model);
}

}  // namespace

TEST_CASE("every mode: random unaligned writes, reads and discards agree with a model, before and after a drain",
          "[cache][filter]") {
  for (const char* mode : {"write-through", "write-around", "write-back"}) agree_with_model(mode, Io{}, false);
}

TEST_CASE("every mode, a Deferrer offered (nothing below defers): random writes and reads, half page-aligned, agree "
          "with a model",
          "[cache][filter][defer]") {
  testing::NoDeferrer d;
  Io io;
  io.defer = &d;
  for (const char* mode : {"write-through", "write-around", "write-back"}) agree_with_model(mode, io, true);
}

TEST_CASE("punch-hole, truncate and grow send nothing dirty below: the cache follows, and a reopen agrees",
          "[cache][filter][crash]") {
  for (const char* mode : {"write-through", "write-back"}) {
    INFO(mode);
    const bool wb = std::string(mode) == "write-back";
    TmpDir dir;
    testing::MemLayer below;
    below.data.assign(1 << 20, 0);
    std::vector<std::string> log;
    const std::string yaml = std::string("{mode: ") + mode + ", device: " + dir.path + ", size: 1MiB, block: 16KiB}";
    const std::string a = pattern(200000, 5);
    std::string expect = a;
    std::memset(expect.data() + 49000, 0, 30000);
    {
      iofilterfs::Status st;
      auto f = make(yaml, &below, "d.raw", &st);
      REQUIRE(st.ok());
      f->shutdown();  // no destager: whatever reaches below is the request's doing
      REQUIRE(f->write(Io{}, a.data(), a.size(), 1000).ok());
      CHECK(read_all(*f, 1000, a.size()) == a);  // cached
      const uint64_t dirty = f->dirty_bytes();
      CHECK(dirty == (wb ? 50u * 4096 : 0u));
      below.log = &log;
      // Unaligned at both ends: pages 12 and 19 are covered in part.
      REQUIRE(f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 50000, 30000).ok());
      CHECK(f->dirty_bytes() == dirty - (wb ? 6u * 4096 : 0u));  // pages 13..18 dropped, 12 and 19 keep zeros
      CHECK(std::count(log.begin(), log.end(), "bottom:write") == 0);
      CHECK(read_all(*f, 1000, a.size()) == expect);
      // Truncate into the data, unaligned: what lay past the end is dropped, dirty or not.
      REQUIRE(f->resize(Io{}, 100000).ok());
      CHECK(std::count(log.begin(), log.end(), "bottom:write") == 0);
      uint64_t size = 0;
      REQUIRE(f->size(&size).ok());
      CHECK(size == 100000);
      CHECK(read_all(*f, 1000, 200000) == expect.substr(0, 99000));
      below.log = nullptr;
    }  // ends without destaging
    iofilterfs::Status st;
    auto f = make(yaml, &below, "d.raw", &st);
    REQUIRE(st.ok());
    uint64_t size = 0;
    REQUIRE(f->size(&size).ok());
    CHECK(size == 100000);  // no record grows the disk back
    CHECK(read_all(*f, 1000, 200000) == expect.substr(0, 99000));
    REQUIRE(f->resize(Io{}, 300000).ok());
    const std::string grown = expect.substr(0, 99000) + std::string(300000 - 100000, '\0');
    CHECK(read_all(*f, 1000, 299000) == grown);
    REQUIRE(f->drain().ok());
    CHECK(f->dirty_bytes() == 0);
    CHECK(std::string(below.data.data() + 1000, 299000) == grown);
  }
}

TEST_CASE("SEEK_DATA and SEEK_HOLE count dirty pages as data without destaging them", "[cache][filter]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(1 << 20, 0);
  below.holes = true;
  auto f = write_back_by_hand(dir, &below);
  const std::string a = pattern(10000, 7), c = pattern(9000, 8);
  REQUIRE(f->write(Io{}, a.data(), a.size(), 100000).ok());  // dirty pages 24..26: [98304, 110592)
  std::memcpy(below.data.data() + 500000, c.data(), c.size());  // data below only: pages 122..124
  REQUIRE(f->write(Io{}, a.data(), a.size(), 507000).ok());     // dirty pages 123..126, over it and past it
  std::vector<std::string> log;
  below.log = &log;
  struct Ask {
    uint64_t off;
    int whence;
    uint64_t want;  // UINT64_MAX: ENXIO
  };
  const std::vector<Ask> asks = {
      {0, SEEK_DATA, 98304},           {0, SEEK_HOLE, 0},
      {98304, SEEK_HOLE, 110592},      {100000, SEEK_DATA, 100000},
      {110592, SEEK_DATA, 499712},     {499712, SEEK_HOLE, 520192},  // below's pages, then the cache's
      {520192, SEEK_DATA, UINT64_MAX}, {(1 << 20) - 1, SEEK_HOLE, (1 << 20) - 1},
      {1 << 20, SEEK_HOLE, UINT64_MAX},
  };
  auto check = [&](const char* when) {
    for (const Ask& q : asks) {
      INFO(when << ": " << (q.whence == SEEK_DATA ? "SEEK_DATA " : "SEEK_HOLE ") << q.off);
      uint64_t r = 0;
      iofilterfs::Status s = f->seek(Io{}, q.off, q.whence, &r);
      if (q.want == UINT64_MAX) {
        CHECK(s.err == ENXIO);
      } else {
        REQUIRE(s.ok());
        CHECK(r == q.want);
      }
    }
  };
  const uint64_t dirty = f->dirty_bytes();
  check("dirty");
  CHECK(f->dirty_bytes() == dirty);
  CHECK(std::count(log.begin(), log.end(), "bottom:write") == 0);
  below.log = nullptr;
  REQUIRE(f->drain().ok());
  check("destaged");  // below now answers alone, the same
}


TEST_CASE("a destage write held below holds no block lock: the stripe's reads and writes go on, a discard of the "
          "block waits for it",
          "[cache][filter][threads]") {
  TmpDir dir;
  testing::GateLayer below;
  below.data.assign(1 << 20, 0);
  auto f = write_back_by_hand(dir, &below);
  // Another block in block 0's stripe, with bytes only below.
  uint64_t k = 1;
  while (stripe_of(k) != stripe_of(0)) ++k;
  const std::string other = pattern(16384, 3);
  std::memcpy(below.data.data() + k * 16384, other.data(), other.size());
  const std::string b(16384, 'B'), a(4096, 'A');
  REQUIRE(f->write(Io{}, b.data(), b.size(), 0).ok());
  std::thread destage([&] { f->destage_once(); });  // its write of block 0 stops at the gate
  below.wait_at_gate();
  // The stripe is free: a read miss of block k and a write of block 0 complete meanwhile.
  auto read = std::async(std::launch::async, [&] { return read_all(*f, k * 16384, 16384); });
  auto write = std::async(std::launch::async, [&] { return f->write(Io{}, a.data(), a.size(), 4096).ok(); });
  const bool read_done = read.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  const bool write_done = write.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  CHECK(read_done);
  CHECK(write_done);
  // A discard of block 0 must land after the older bytes the destage is sending.
  auto punch = std::async(std::launch::async, [&] {
    return f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8192, 4096).ok();
  });
  CHECK(punch.wait_for(std::chrono::milliseconds(300)) == std::future_status::timeout);
  below.open();
  destage.join();
  if (read_done) CHECK(read.get() == other);
  if (write_done) CHECK(write.get());
  CHECK(punch.get());
  CHECK(f->dirty_bytes() > 0);  // written meanwhile: not marked clean
  REQUIRE(f->drain().ok());
  std::string expect = b;
  expect.replace(4096, 4096, a);
  std::memset(expect.data() + 8192, 0, 4096);
  CHECK(std::string(below.data.data(), 16384) == expect);
  CHECK(read_all(*f, 0, 16384) == expect);
}

TEST_CASE("write-back: destaging or replaying a disk that ends inside a page does not grow it",
          "[cache][filter][crash]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(100000, 0);
  const std::string yaml = "{mode: write-back, device: " + dir.path + ", size: 1MiB, block: 16KiB}";
  const std::string a = pattern(2500, 4);
  {
    iofilterfs::Status st;
    auto f = make(yaml, &below, "d.raw", &st);
    REQUIRE(st.ok());
    f->shutdown();
    REQUIRE(f->write(Io{}, a.data(), a.size(), 98000).ok());  // the disk now ends at 100500, in page 24
    uint64_t size = 0;
    REQUIRE(f->size(&size).ok());
    CHECK(size == 100500);
    CHECK(f->destage_once() == 2);  // blocks 5 and 6
    CHECK(below.data.size() == 100500);
    REQUIRE(f->write(Io{}, a.data(), a.size(), 98500).ok());  // the disk now ends at 101000
  }  // ends without destaging: the reopen destages it
  iofilterfs::Status st;
  auto f = make(yaml, &below, "d.raw", &st);
  REQUIRE(st.ok());
  REQUIRE(f->drain().ok());
  CHECK(below.data.size() == 101000);
  uint64_t size = 0;
  REQUIRE(f->size(&size).ok());
  CHECK(size == 101000);
  CHECK(std::string(below.data.data() + 98500, a.size()) == a);
}

TEST_CASE("a discard or truncate that fails below leaves the cache's dirty data as it was", "[cache][filter]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(1 << 20, 0);
  auto f = write_back_by_hand(dir, &below);
  const std::string a = pattern(100000, 6);
  REQUIRE(f->write(Io{}, a.data(), a.size(), 0).ok());
  const uint64_t dirty = f->dirty_bytes();
  below.fallocate_err = EOPNOTSUPP;
  iofilterfs::Status s = f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10000, 50000);
  CHECK(s.err == EOPNOTSUPP);
  CHECK(f->dirty_bytes() == dirty);
  CHECK(read_all(*f, 0, a.size()) == a);
  REQUIRE(f->drain().ok());
  CHECK(std::string(below.data.data(), a.size()) == a);
}

TEST_CASE("discards racing destage passes on other threads: no punched byte comes back, no written one is lost",
          "[cache][filter][threads]") {
  TmpDir dir;
  testing::MemLayer below;
  constexpr size_t kRegion = 256 << 10;
  constexpr int kThreads = 4;
  below.data.assign(kRegion * kThreads, 0);
  iofilterfs::Status st;
  auto f = make("{mode: write-back, device: " + dir.path + ", size: 256KiB, block: 16KiB, sequential-cutoff: 0}",
                &below, "d.raw", &st);
  REQUIRE(st.ok());
  std::atomic<bool> done{false};
  std::thread destager([&] {
    while (!done.load()) f->destage_once();
  });
  std::vector<std::string> models(kThreads, std::string(kRegion, '\0'));
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::string& model = models[t];
      const uint64_t base = uint64_t(t) * kRegion;
      for (int i = 0; i < 1500; ++i) {
        const size_t len = 1 + rng() % 40000;
        const uint64_t off = rng() % (kRegion - len);
        const int op = static_cast<int>(rng() % 3);
        if (op == 0) {
          const std::string d = pattern(len, t * 10000 + i);
          if (!f->write(Io{}, d.data(), len, base + off).ok()) ++bad;
          model.replace(off, len, d);
        } else if (op == 1) {
          if (!f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, base + off, len).ok()) ++bad;
          std::memset(model.data() + off, 0, len);
        } else {
          std::string r(len, '\0');
          size_t got = 0;
          if (!f->read(Io{}, r.data(), len, base + off, &got).ok() || r != model.substr(off, len)) ++bad;
        }
      }
    });
  for (auto& t : ts) t.join();
  done = true;
  destager.join();
  CHECK(bad.load() == 0);
  REQUIRE(f->drain().ok());
  for (int t = 0; t < kThreads; ++t) {
    INFO("region " << t);
    CHECK(std::string(below.data.data() + t * kRegion, kRegion) == models[t]);
    CHECK(read_all(*f, t * kRegion, kRegion) == models[t]);
  }
}

TEST_CASE("a cache file of another geometry is destaged at open, then re-made", "[cache][filter][crash]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(1 << 20, 0);
  const std::string a = pattern(50000, 9);
  {
    iofilterfs::Status st;
    auto f = make("{mode: write-back, device: " + dir.path + ", size: 1MiB, block: 16KiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    REQUIRE(f->write(Io{}, a.data(), a.size(), 7000).ok());
  }  // ends without destaging
  CHECK(std::string(below.data.data() + 7000, a.size()) != a);
  iofilterfs::Status st;
  auto f = make("{mode: write-back, device: " + dir.path + ", size: 2MiB, block: 64KiB}", &below, "d.raw", &st);
  REQUIRE(st.ok());
  CHECK(std::string(below.data.data() + 7000, a.size()) == a);  // destaged at open
  CHECK(f->dirty_bytes() == 0);
  CHECK(read_all(*f, 7000, a.size()) == a);
}

TEST_CASE("hits under the shared lock: threads reading and writing while slots are evicted and reused read only their "
          "own bytes",
          "[cache][filter][threads]") {
  // Each thread owns a region; together they are many times the cache, so slots are evicted
  // and reused for other blocks while hits copy out of them. A hit that read a slot after it
  // was given to another block would show another region's bytes.
  for (const char* policy : {"{memory: 64KiB, block: 4KiB, sequential-cutoff: 0}",
                             "{mode: write-back, device: DIR, size: 64KiB, block: 4KiB, sequential-cutoff: 0, "
                             "high-watermark: 30, low-watermark: 10}"}) {
    INFO(policy);
    TmpDir dir;
    std::string yaml = policy;
    if (size_t at = yaml.find("DIR"); at != std::string::npos) yaml.replace(at, 3, dir.path);
    testing::MemLayer below;
    const size_t kRegion = 64 << 10;
    const int kThreads = 4;
    below.data.assign(kRegion * kThreads, 0);
    iofilterfs::Status st;
    auto f = make(yaml, &below, "d.raw", &st);
    REQUIRE(st.ok());
    std::vector<std::thread> threads;
    std::vector<int> bad(kThreads, 0);
    std::vector<std::string> models(kThreads);
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {  // no Catch assertions off the main thread
        std::string& model = models[t];
        model.assign(kRegion, char('a' + t));
        const uint64_t base = uint64_t(t) * kRegion;
        if (!f->write(Io{}, model.data(), model.size(), base).ok()) ++bad[t];
        std::mt19937_64 rng(t);
        std::string buf(3 * 4096, '\0');
        for (int i = 0; i < 4000; ++i) {
          const size_t len = 1 + rng() % (3 * 4096);
          const uint64_t off = rng() % (kRegion - len);
          if (rng() % 4 == 0) {
            for (size_t j = 0; j < len; ++j) buf[j] = char('a' + t + 4 * (1 + (i + j) % 5));
            if (!f->write(Io{}, buf.data(), len, base + off).ok()) ++bad[t];
            model.replace(off, len, buf.data(), len);
          } else {
            size_t got = 0;
            if (!f->read(Io{}, buf.data(), len, base + off, &got).ok() || got != len ||
                std::memcmp(buf.data(), model.data() + off, len) != 0)
              ++bad[t];
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    for (int t = 0; t < kThreads; ++t) CHECK(bad[t] == 0);
    CHECK(counter(f->stats_json(), "read_hits") > 0);
    // Slots were reused under the hits (write-back reuses them as fast as the destager cleans
    // them, which this short run may not reach).
    if (yaml.find("memory") != std::string::npos) CHECK(counter(f->stats_json(), "evictions") > 0);
    REQUIRE(f->drain().ok());
    for (int t = 0; t < kThreads; ++t)
      CHECK(std::string(below.data.data() + size_t(t) * kRegion, kRegion) == models[t]);
  }
}

TEST_CASE("reconfigure in place: mode after a destage, watermarks, sequential cutoff, and a new geometry needs a "
          "replace",
          "[cache][filter][reload]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(4 << 20, 0);
  iofilterfs::Status st;
  const std::string dev = "device: " + dir.path + ", size: 1MiB, block: 16KiB";
  auto f = make("{mode: write-back, " + dev + ", sequential-cutoff: 0}", &below, "d.raw", &st);
  REQUIRE(st.ok());
  const std::string a = pattern(256 << 10, 3);
  REQUIRE(f->write(Io{}, a.data(), a.size(), 0).ok());
  CHECK(f->dirty_bytes() == a.size());
  CHECK(read_all(*f, 0, a.size()) == a);
  const double hits = counter(f->stats_json(), "read_hits");
  // write-back -> write-through: destaged first, then writes go below at once.
  REQUIRE(f->reconfigure(YAML::Load("{mode: write-through, " + dev + ", sequential-cutoff: 0}")));
  CHECK(f->dirty_bytes() == 0);
  CHECK(std::string(below.data.data(), a.size()) == a);
  CHECK(f->params().mode == Mode::WriteThrough);
  CHECK(f->stats_json().find("\"mode\":\"write-through\"") != std::string::npos);
  CHECK(counter(f->stats_json(), "read_hits") == hits);  // the same filter, its counters kept
  const std::string b = pattern(64 << 10, 4);
  REQUIRE(f->write(Io{}, b.data(), b.size(), 1 << 20).ok());
  CHECK(std::string(below.data.data() + (1 << 20), b.size()) == b);
  CHECK(f->dirty_bytes() == 0);
  // write-through -> write-back: writes stay in the cache until destaged.
  REQUIRE(f->reconfigure(YAML::Load("{mode: write-back, " + dev + ", sequential-cutoff: 0}")));
  const std::string c = pattern(64 << 10, 5);
  REQUIRE(f->write(Io{}, c.data(), c.size(), 2 << 20).ok());
  CHECK(f->dirty_bytes() == c.size());
  CHECK(std::string(below.data.data() + (2 << 20), c.size()) != c);
  CHECK(read_all(*f, 2 << 20, c.size()) == c);
  // Watermarks and the cutoff, in place.
  REQUIRE(f->reconfigure(YAML::Load("{mode: write-back, " + dev +
                                    ", sequential-cutoff: 64KiB, high-watermark: 80, low-watermark: 10}")));
  CHECK(f->describe().find("watermarks=80/10") != std::string::npos);
  CHECK(f->params().sequential_cutoff == 64u << 10);
  const double bypasses = counter(f->stats_json(), "bypasses");
  std::string buf(32 << 10, '\0');
  size_t got = 0;
  for (int i = 0; i < 8; ++i) REQUIRE(f->read(Io{}, buf.data(), buf.size(), (3 << 20) + i * buf.size(), &got).ok());
  CHECK(counter(f->stats_json(), "bypasses") > bypasses);  // the stream passed the new cutoff
  // A new geometry or another device is a new store: refused, the framework replaces.
  CHECK_FALSE(f->reconfigure(YAML::Load("{mode: write-back, device: " + dir.path + ", size: 1MiB, block: 64KiB}")));
  CHECK_FALSE(f->reconfigure(YAML::Load("{mode: write-back, device: " + dir.path + ", size: 2MiB, block: 16KiB}")));
  CHECK_FALSE(f->reconfigure(YAML::Load("{mode: write-back, memory: 1MiB, unsafe: true}")));
  CHECK(f->params().mode == Mode::WriteBack);
  REQUIRE(f->drain().ok());
  CHECK(std::string(below.data.data() + (2 << 20), c.size()) == c);
}

namespace {

// A memory layer that notes whether each read and write below the cache came with the
// caller's Deferrer (filter.h, "Deferring").
struct DeferProbe : testing::MemLayer {
  std::vector<std::string> seen;  // "read+defer", "read", "write+defer", "write"
  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override {
    seen.push_back(io.defer ? "read+defer" : "read");
    return MemLayer::read(io, buf, len, off, got);
  }
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    seen.push_back(io.defer ? "write+defer" : "write");
    return MemLayer::write(io, buf, len, off);
  }
};

// One write as the framework holds it (disk.cc's Pending): the layer below takes it, the test
// resumes it, and the cache's completion hook runs then, before the answer.
struct HeldWrite final : iofilterfs::Deferred, iofilterfs::Deferrer {
  std::vector<char> buf;
  uint64_t off = 0;
  bool read = false;  // a read: buf (its length) holds what was below when it was taken
  size_t came_up = 0;  // a read's bytes below then (its answer waits for the test)
  iofilterfs::Then* hooks = nullptr;
  iofilterfs::Status answer = iofilterfs::Status::Deferred();
  size_t got = 0;  // a read's, as answered
  iofilterfs::Deferred* take() override { return this; }
  void then(iofilterfs::Then* t) override {
    t->next_then = hooks;
    hooks = t;
  }
  void* data() override { return buf.data(); }
  void resume(iofilterfs::Continuation& k) override {
    size_t g = 0;
    iofilterfs::Status s = k.run(buf.data(), &g);
    finish(s, g);
  }
  void finish(iofilterfs::Status s, size_t g) override {
    for (iofilterfs::Then* t = hooks; t;) {
      iofilterfs::Then* n = t->next_then;
      s = t->then(s, buf.data(), &g);
      t = n;
    }
    answer = s;
    got = g;
  }
};

// A memory layer that defers every write offered with a Deferrer until the test resumes it,
// and with defer_reads every such read: it reads at once and answers when the test resumes it
// (so what it answers may be older than a write made meanwhile, as a read racing a write may).
struct DeferringMem : testing::MemLayer {
  HeldWrite* held = nullptr;  // the last one taken
  bool defer_reads = false;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    if (!io.defer) return MemLayer::write(io, buf, len, off);
    held = static_cast<HeldWrite*>(io.defer->take());
    held->buf.assign(static_cast<const char*>(buf), static_cast<const char*>(buf) + len);
    held->off = off;
    return Status::Deferred();
  }
  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override {
    if (!io.defer || !defer_reads) return MemLayer::read(io, buf, len, off, got);
    held = static_cast<HeldWrite*>(io.defer->take());
    held->buf.assign(len, '\0');
    size_t g = 0;
    REQUIRE(MemLayer::read(Io{}, held->buf.data(), len, off, &g).ok());
    held->came_up = g;
    held->off = off;
    held->read = true;
    return Status::Deferred();
  }
  void land(HeldWrite* w = nullptr) {
    struct Down final : iofilterfs::Continuation {
      DeferringMem* m;
      HeldWrite* w;
      Status run(void* data, size_t* got) override {
        if (w->read) {
          *got = w->came_up;
          return Status::Ok();
        }
        return m->MemLayer::write(Io{}, data, w->buf.size(), w->off);
      }
    } k;
    k.m = this;
    k.w = w ? w : held;
    k.w->resume(k);
  }
};

}  // namespace

TEST_CASE("the cache hands deferral below with every read it can finish in a hook and every write it sends whole",
          "[cache][filter][defer]") {
  DeferProbe below;
  below.data.assign(1 << 20, 'x');
  testing::NoDeferrer d;
  Io io;
  io.defer = &d;
  char buf[65536 * 2];
  size_t got = 0;
  auto seen_after = [&](auto&& op) {
    below.seen.clear();
    op();
    return below.seen;
  };
  using V = std::vector<std::string>;
  SECTION("write-around with a 4 KiB sequential cutoff: every read of 4 KiB and more bypasses") {
    iofilterfs::Status st;
    auto f = make("{mode: write-around, memory: 1MiB, sequential-cutoff: 4KiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 4096, 8192, &got).ok()); }) == V{"read+defer"});
    CHECK(got == 4096);
    // Across two blocks: one request below.
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 8192, 65536 - 4096, &got).ok()); }) == V{"read+defer"});
    // A small read is not bypassed and fills; not page-aligned, it is read here (a fill keeps
    // whole pages only); then a hit.
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 512, 1 << 19, &got).ok()); }) == V{"read"});
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 512, 1 << 19, &got).ok()); }) == V{});
    // Writes: a one-block write goes below with it (the cache finishes it in a completion
    // hook), and so does a longer one, whole (one request, every block in flight).
    CHECK(seen_after([&] { REQUIRE(f->write(io, buf, 4096, 0).ok()); }) == V{"write+defer"});
    CHECK(seen_after([&] { REQUIRE(f->write(io, buf, 8192, 65536 - 4096).ok()); }) == V{"write+defer"});
    // Without a Deferrer, block by block as before.
    CHECK(seen_after([&] { REQUIRE(f->write(Io{}, buf, 8192, 65536 - 4096).ok()); }) == V{"write", "write"});
    CHECK(seen_after([&] { REQUIRE(f->read(Io{}, buf, 8192, 65536 - 4096, &got).ok()); }) == V{"read", "read"});
  }
  SECTION("write-through: a miss that fills goes below with it, of one block or two, and then hits") {
    iofilterfs::Status st;
    auto f = make("{mode: write-through, memory: 1MiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 4096, 0, &got).ok()); }) == V{"read+defer"});
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 4096, 0, &got).ok()); }) == V{});
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 16384, 65536 * 3 - 8192, &got).ok()); }) == V{"read+defer"});
    CHECK(got == 16384);
    CHECK(std::string(buf, 16384) == std::string(16384, 'x'));
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 16384, 65536 * 3 - 8192, &got).ok()); }) == V{});
    // Partly cached: the whole read below, once.
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 8192, 0, &got).ok()); }) == V{"read+defer"});
    CHECK(seen_after([&] { REQUIRE(f->write(io, buf, 4096, 4096 * 5).ok()); }) == V{"write+defer"});
  }
  SECTION("write-back: a read that misses goes below with it") {
    iofilterfs::Status st;
    auto f = make("{mode: write-back, memory: 1MiB, unsafe: true, sequential-cutoff: 4KiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 4096, 8192, &got).ok()); }) == V{"read+defer"});
    CHECK(seen_after([&] { REQUIRE(f->write(io, buf, 4096, 1 << 19).ok()); }) == V{"write+defer"});
    // Two blocks, neither cached: below whole.
    CHECK(seen_after([&] { REQUIRE(f->write(io, buf, 8192, (1 << 19) + 65536 - 4096).ok()); }) == V{"write+defer"});
  }
  SECTION("write-back: a longer write with a cached block goes block by block, the cached one into the cache") {
    iofilterfs::Status st;
    auto f = make("{mode: write-back, memory: 1MiB, unsafe: true, sequential-cutoff: 0}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    // Not a stream and slots free: cached, nothing below (edge pages whole: no read below).
    const std::string dirty(8192, 'D');
    CHECK(seen_after([&] { REQUIRE(f->write(io, dirty.data(), 8192, 65536 - 4096).ok()); }) == V{});
    CHECK(f->dirty_bytes() == 8192);
    // A read over a dirty page and a page not cached: below with it, the dirty page laid over.
    CHECK(seen_after([&] { REQUIRE(f->read(io, buf, 8192, 65536 - 8192, &got).ok()); }) == V{"read+defer"});
    CHECK(std::string(buf, 4096) == std::string(4096, 'x'));
    CHECK(std::string(buf + 4096, 4096) == std::string(4096, 'D'));
  }
  CHECK(iofilterfs::Registry::instance().find("cache")->passes_deferral);
}

TEST_CASE("the cache carries on its own threads what would wait below on the thread it came on",
          "[cache][filter][defer][offload]") {
  DeferProbe below;
  below.data.assign(1 << 20, 'x');
  using V = std::vector<std::string>;
  auto seen = [&] {
    V v = below.seen;
    below.seen.clear();
    return v;
  };
  iofilterfs::Status st;
  char buf[65536 * 2];
  size_t got = 0;
  SECTION("an unaligned read of a cached block: carried, the fill and the hit as on the worker") {
    auto f = make("{mode: write-through, memory: 1MiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    f->set_may_defer(true);
    testing::NoDeferrer none;
    Io io;
    io.defer = &none;
    REQUIRE(f->read(io, buf, 4096, 0, &got).ok());  // fills the first page
    (void)seen();
    std::memset(below.data.data() + 4096, 'y', 4096);  // (changed below the cache: shows the read went there)
    testing::Carried c(1000);
    io.defer = &c;
    REQUIRE(f->read(io, buf, 1000, 3596, &got).deferred());
    REQUIRE(c.wait());
    CHECK(c.answer.ok());
    CHECK(c.got == 1000);
    CHECK(c.thread != std::this_thread::get_id());
    CHECK(std::string(c.buf.data(), 500) == std::string(500, 'x'));
    CHECK(std::string(c.buf.data() + 500, 500) == std::string(500, 'y'));
    CHECK(seen() == V{"read"});  // below without the Deferrer, on the filter's thread
    // Aligned reads are not carried: a hit is served, a miss goes below with the Deferrer.
    testing::Carried c2(4096);
    io.defer = &c2;
    REQUIRE(f->read(io, buf, 4096, 0, &got).ok());
    REQUIRE(f->read(io, buf, 4096, 65536 * 4, &got).ok());  // c2.take() is not called: taken = false
    CHECK_FALSE(c2.taken);
    CHECK(seen() == V{"read+defer"});
    CHECK(f->stats_json().find("\"requests_offloaded\":1,") != std::string::npos);
  }
  SECTION("write-back: a sub-page write that reads the rest of its page from below is carried; others are not") {
    auto f = make("{mode: write-back, memory: 1MiB, unsafe: true, sequential-cutoff: 0}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    f->set_may_defer(true);
    Io io;
    // Whole pages into a free slot: cached here, nothing below, nothing taken.
    const std::string pages(8192, 'P');
    testing::Carried c0(pages.size(), pages.data());
    io.defer = &c0;
    REQUIRE(f->write(io, pages.data(), pages.size(), 0).ok());
    CHECK_FALSE(c0.taken);
    CHECK(seen().empty());
    // Part of a page of a fresh block: the rest of the page from below, on the filter's thread.
    const std::string part(100, 'S');
    testing::Carried c1(part.size(), part.data());
    io.defer = &c1;
    REQUIRE(f->write(io, part.data(), part.size(), 65536 + 10).deferred());
    REQUIRE(c1.wait());
    CHECK(c1.answer.ok());
    CHECK(c1.thread != std::this_thread::get_id());
    CHECK(seen() == V{"read"});
    // Part of a page that is valid in the cache: nothing below, not carried.
    testing::Carried c2(part.size(), part.data());
    io.defer = &c2;
    REQUIRE(f->write(io, part.data(), part.size(), 100).ok());
    CHECK_FALSE(c2.taken);
    CHECK(seen().empty());
    REQUIRE(f->read(Io{}, buf, 4096, 65536, &got).ok());
    CHECK(std::string(buf, 10) == std::string(10, 'x'));
    CHECK(std::string(buf + 10, 100) == part);
    CHECK(std::string(buf + 110, 4096 - 110) == std::string(4096 - 110, 'x'));
    REQUIRE(f->drain().ok());
    CHECK(std::string(below.data.data() + 65536 + 10, 100) == part);
    CHECK(std::string(below.data.data() + 100, 100) == part);
  }
  SECTION("write-back: a write of several blocks, one cached and one that goes below, is carried") {
    auto f = make("{mode: write-back, memory: 1MiB, unsafe: true, sequential-cutoff: 64KiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    f->set_may_defer(true);
    Io io;
    const std::string one(4096, 'A');
    REQUIRE(f->write(Io{}, one.data(), one.size(), 65536 - 4096).ok());  // cached (dirty)
    (void)seen();
    // A sequential run from 0 reaches the cutoff: the next write bypasses, but its first
    // block is cached, so it cannot go below whole: its second block goes below on a thread.
    for (uint64_t at = 0; at < 65536 - 4096; at += 4096) REQUIRE(f->read(Io{}, buf, 4096, at, &got).ok());
    (void)seen();
    const std::string two(8192, 'B');
    testing::Carried c(two.size(), two.data());
    io.defer = &c;
    const iofilterfs::Status ws = f->write(io, two.data(), two.size(), 65536 - 4096);
    if (ws.deferred()) {
      REQUIRE(c.wait());
      CHECK(c.answer.ok());
      CHECK(c.thread != std::this_thread::get_id());
    } else {
      REQUIRE(ws.ok());
    }
    CHECK(c.taken);
    // On the filter's thread the block that goes below goes with a Deferrer of that thread's
    // (a throttle there would park it); the cached one stays in the cache.
    CHECK(seen() == V{"write+defer"});
    REQUIRE(f->read(Io{}, buf, 8192, 65536 - 4096, &got).ok());
    CHECK(std::string(buf, 8192) == two);
    REQUIRE(f->drain().ok());
    CHECK(std::string(below.data.data() + 65536 - 4096, 8192) == two);
  }
}

TEST_CASE("stripe masks: each stripe of a run of blocks once, every stripe for a long run", "[cache][map]") {
  CHECK(stripe_mask(5, 5) == uint64_t(1) << stripe_of(5));
  uint64_t want = 0;
  for (uint64_t b = 100; b < 104; ++b) want |= uint64_t(1) << stripe_of(b);
  CHECK(stripe_mask(100, 103) == want);
  // Neighbouring blocks fall in different stripes (the hash spreads them).
  CHECK(__builtin_popcountll(stripe_mask(0, 15)) >= 12);
  // Two blocks of one run in one stripe: the stripe once.
  uint64_t b2 = 1;
  while (stripe_of(b2) != stripe_of(0)) ++b2;
  CHECK(stripe_mask(0, b2) == stripe_mask(1, b2));
  // A run of thousands of blocks takes every stripe (and the walk stops once it has them all).
  CHECK(stripe_mask(0, 1u << 20) == ~uint64_t(0));
  for (uint64_t b = 0; b < 1000; ++b) CHECK(stripe_of(b) < size_t(kStripes));
}

TEST_CASE("a deferred write of several blocks goes below whole: every block in flight until it lands, each filled "
          "then, and a failure leaves none of them cached",
          "[cache][filter][defer]") {
  DeferringMem below;
  below.data.assign(1 << 20, 'o');  // the old bytes
  iofilterfs::Status st;
  // 64 KiB blocks; the write covers the last 8 KiB of block 1, blocks 2 and 3 whole, and the
  // first 4 KiB of block 4.
  const uint64_t off = 2 * 65536 - 8192;
  const std::string fresh = std::string(8192, 'A') + std::string(65536, 'B') + std::string(65536, 'C') +
                            std::string(4096, 'D');
  auto reads_meanwhile = [&](CacheFilter& f) {
    // Every block of the write, read (and filled if it could be) while it is below.
    char buf[65536];
    size_t got = 0;
    for (uint64_t b = 1; b <= 4; ++b) REQUIRE(f.read(Io{}, buf, sizeof buf, b * 65536, &got).ok());
    for (uint64_t b = 1; b <= 4; ++b) REQUIRE(f.read(Io{}, buf, 2048, b * 65536 + 61440, &got).ok());
  };
  SECTION("write-through: filled when it lands") {
    auto f = make("{mode: write-through, memory: 1MiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    char buf[65536];
    size_t got = 0;
    for (uint64_t b = 1; b <= 4; ++b) REQUIRE(f->read(Io{}, buf, sizeof buf, b * 65536, &got).ok());  // cached old
    HeldWrite w;
    Io io;
    io.defer = &w;
    REQUIRE(f->write(io, fresh.data(), fresh.size(), off).deferred());
    REQUIRE(below.held == &w);
    CHECK(w.buf.size() == fresh.size());  // one request below
    CHECK(w.answer.deferred());
    const double misses = counter(f->stats_json(), "misses");
    reads_meanwhile(*f);
    // The written pages were dropped, and nothing read meanwhile was kept: every read misses
    // again (blocks 2 and 3 whole, the written pages of 1 and 4).
    reads_meanwhile(*f);
    CHECK(counter(f->stats_json(), "misses") >= misses + 8);
    below.land();
    CHECK(w.answer.ok());
    CHECK(std::string(below.data.data() + off, fresh.size()) == fresh);
    const double hits = counter(f->stats_json(), "hits");
    CHECK(read_all(*f, off, fresh.size()) == fresh);
    CHECK(counter(f->stats_json(), "hits") >= hits + 4);  // each block's part filled by the hook
    CHECK(read_all(*f, 65536, 4 * 65536) == std::string(65536 - 8192, 'o') + fresh + std::string(61440, 'o'));
  }
  SECTION("write-through: a failure below leaves no block with the old bytes in the cache") {
    auto f = make("{mode: write-through, memory: 1MiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    CHECK(read_all(*f, 65536, 4 * 65536) == std::string(4 * 65536, 'o'));  // cached
    HeldWrite w;
    Io io;
    io.defer = &w;
    REQUIRE(f->write(io, fresh.data(), fresh.size(), off).deferred());
    // Part of it reached the file before the error: what the disk reads must come from below.
    std::memcpy(below.data.data() + off, fresh.data(), 65536);
    w.finish(iofilterfs::Status::Error(EIO, "test: the write below failed"), 0);
    CHECK(w.answer.err == EIO);
    CHECK(read_all(*f, off, fresh.size()) == std::string(below.data.data() + off, fresh.size()));
    // Pages the write did not touch stay cached (the head of block 1).
    const double hits = counter(f->stats_json(), "hits");
    CHECK(read_all(*f, 65536, 4096) == std::string(4096, 'o'));
    CHECK(counter(f->stats_json(), "hits") == hits + 1);
  }
  SECTION("write-back: a write that bypasses the cache goes below whole, its blocks out of the cache until it lands") {
    auto f = make("{mode: write-back, memory: 1MiB, unsafe: true, sequential-cutoff: 4KiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    HeldWrite w;
    Io io;
    io.defer = &w;
    REQUIRE(f->write(io, fresh.data(), fresh.size(), off).deferred());
    REQUIRE(below.held == &w);
    CHECK(w.buf.size() == fresh.size());
    reads_meanwhile(*f);
    // A small write-back write to a block in flight goes below, not into the cache.
    const std::string other(2048, 'W');
    REQUIRE(f->write(Io{}, other.data(), other.size(), 3 * 65536 + 61440 + 2048).ok());
    CHECK(f->dirty_bytes() == 0);
    below.land();
    CHECK(w.answer.ok());
    // The small write landed first and the big one over it: below is the truth.
    CHECK(read_all(*f, off, fresh.size()) == std::string(below.data.data() + off, fresh.size()));
    CHECK(std::string(below.data.data() + off, fresh.size()) == fresh);
  }
}

TEST_CASE("a deferred write keeps its block in flight: no read fills it from the old bytes, the cache fills it when "
          "it lands, before the answer",
          "[cache][filter][defer]") {
  DeferringMem below;
  below.data.assign(1 << 20, 'o');  // the old bytes
  iofilterfs::Status st;
  SECTION("write-through") {
    auto f = make("{mode: write-through, memory: 1MiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    HeldWrite w;
    Io io;
    io.defer = &w;
    const std::string fresh(4096, 'N');
    REQUIRE(f->write(io, fresh.data(), fresh.size(), 8192).deferred());
    REQUIRE(below.held == &w);
    CHECK(w.answer.deferred());  // not answered
    // Meanwhile a read of the block (another page and the written one) misses and must not
    // keep what it finds below.
    char buf[4096];
    size_t got = 0;
    REQUIRE(f->read(Io{}, buf, 4096, 0, &got).ok());
    REQUIRE(f->read(Io{}, buf, 4096, 8192, &got).ok());
    CHECK(std::string(buf, 4096) == std::string(4096, 'o'));  // not landed yet: either answer is right
    const double misses = counter(f->stats_json(), "misses");
    REQUIRE(f->read(Io{}, buf, 4096, 8192, &got).ok());
    CHECK(counter(f->stats_json(), "misses") == misses + 1);  // still a miss: nothing was filled
    // It lands: the hook caches it, then it is answered.
    below.land();
    CHECK(w.answer.ok());
    CHECK(std::string(below.data.data() + 8192, 4096) == fresh);
    const double hits = counter(f->stats_json(), "hits");
    REQUIRE(f->read(Io{}, buf, 4096, 8192, &got).ok());
    CHECK(std::string(buf, 4096) == fresh);
    CHECK(counter(f->stats_json(), "hits") == hits + 1);  // filled by the hook
  }
  SECTION("write-back: a write that bypasses the cache keeps the block out of it until it lands") {
    auto f = make("{mode: write-back, memory: 1MiB, unsafe: true, sequential-cutoff: 4KiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    HeldWrite w;
    Io io;
    io.defer = &w;
    const std::string fresh(4096, 'N');
    REQUIRE(f->write(io, fresh.data(), fresh.size(), 8192).deferred());  // 4 KiB: past the cutoff
    char buf[4096];
    size_t got = 0;
    REQUIRE(f->read(Io{}, buf, 2048, 8192, &got).ok());  // small: would fill the page
    // A write-back write to the block meanwhile goes below too, not into the cache.
    const std::string other(2048, 'W');
    REQUIRE(f->write(Io{}, other.data(), other.size(), 0).ok());
    CHECK(f->dirty_bytes() == 0);
    CHECK(std::string(below.data.data(), 2048) == other);
    below.land();
    CHECK(w.answer.ok());
    REQUIRE(f->read(Io{}, buf, 2048, 8192, &got).ok());
    CHECK(std::string(buf, 2048) == std::string(2048, 'N'));
    REQUIRE(f->read(Io{}, buf, 2048, 8192 + 2048, &got).ok());
    CHECK(std::string(buf, 2048) == std::string(2048, 'N'));
  }
}

TEST_CASE("a deferred read fills the cache when it comes up, unless a write of its block began or was in flight "
          "meanwhile",
          "[cache][filter][defer]") {
  DeferringMem below;
  below.defer_reads = true;
  below.data.assign(1 << 20, 'o');  // the old bytes
  iofilterfs::Status st;
  char buf[8192];
  size_t got = 0;
  auto held_read = [&](CacheFilter& f, HeldWrite& r, size_t len, uint64_t off) {
    Io io;
    io.defer = &r;
    REQUIRE(f.read(io, buf, len, off, &got).deferred());
    REQUIRE(below.held == &r);
    CHECK(r.answer.deferred());
  };
  SECTION("write-through: it lands, the hook keeps its pages (one block and two), then they hit") {
    auto f = make("{mode: write-through, memory: 1MiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    std::memset(below.data.data() + 65536 - 4096, 'a', 8192);
    HeldWrite r;
    held_read(*f, r, 8192, 65536 - 4096);
    below.land();
    REQUIRE(r.answer.ok());
    CHECK(r.got == 8192);
    CHECK(std::string(r.buf.data(), 8192) == std::string(8192, 'a'));
    const double hits = counter(f->stats_json(), "hits");
    REQUIRE(f->read(Io{}, buf, 8192, 65536 - 4096, &got).ok());
    CHECK(counter(f->stats_json(), "hits") == hits + 2);  // one per block
    CHECK(std::string(buf, 8192) == std::string(8192, 'a'));
    // At the end of the disk: a short answer, and only what came up is kept.
    HeldWrite e;
    held_read(*f, e, 8192, (1 << 20) - 4096);
    below.land();
    REQUIRE(e.answer.ok());
    CHECK(e.got == 4096);
  }
  SECTION("write-around: a write that lands while the read is below keeps the read's old bytes out of the cache") {
    auto f = make("{mode: write-around, memory: 1MiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    HeldWrite r;
    held_read(*f, r, 8192, 0);  // took the old bytes
    const std::string fresh(4096, 'N');
    REQUIRE(f->write(Io{}, fresh.data(), fresh.size(), 0).ok());
    below.land(&r);
    REQUIRE(r.answer.ok());
    CHECK(std::string(r.buf.data(), 8192) == std::string(8192, 'o'));  // raced the write: either is right
    REQUIRE(f->read(Io{}, buf, 4096, 0, &got).ok());
    CHECK(std::string(buf, 4096) == fresh);  // not the read's old bytes
  }
  SECTION("write-around: a write in flight when the read went below, landing first, is not undone by the fill") {
    auto f = make("{mode: write-around, memory: 1MiB}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    HeldWrite w;
    Io wio;
    wio.defer = &w;
    const std::string fresh(4096, 'N');
    REQUIRE(f->write(wio, fresh.data(), fresh.size(), 0).deferred());
    HeldWrite r;
    held_read(*f, r, 8192, 0);  // the old bytes: the write has not landed
    below.land(&w);
    REQUIRE(w.answer.ok());
    below.land(&r);
    REQUIRE(r.answer.ok());
    REQUIRE(f->read(Io{}, buf, 4096, 0, &got).ok());
    CHECK(std::string(buf, 4096) == fresh);
  }
  SECTION("write-back: the dirty pages it reads are laid over what came up, even if destaged meanwhile") {
    auto f = make("{mode: write-back, memory: 1MiB, unsafe: true}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    const std::string d(4096, 'D');
    REQUIRE(f->write(Io{}, d.data(), d.size(), 4096).ok());  // page 1 dirty, page 0 not cached
    HeldWrite r;
    held_read(*f, r, 8192, 0);  // took what was below: 'o' 'o'
    CHECK(f->destage_once() == 1);  // page 1 below and clean now
    CHECK(std::string(below.data.data() + 4096, 4096) == d);
    below.land(&r);
    REQUIRE(r.answer.ok());
    CHECK(std::string(r.buf.data(), 4096) == std::string(4096, 'o'));
    CHECK(std::string(r.buf.data() + 4096, 4096) == d);  // acknowledged before the read: never the old bytes
    const double hits = counter(f->stats_json(), "hits");
    REQUIRE(f->read(Io{}, buf, 8192, 0, &got).ok());
    CHECK(counter(f->stats_json(), "hits") == hits + 1);  // page 0 was kept
    CHECK(std::string(buf + 4096, 4096) == d);
  }
  SECTION("write-back: zeros past below's end up to the disk's size, which dirty data set") {
    auto f = make("{mode: write-back, memory: 1MiB, unsafe: true}", &below, "d.raw", &st);
    REQUIRE(st.ok());
    const std::string d(4096, 'D');
    REQUIRE(f->write(Io{}, d.data(), d.size(), (1 << 20) + 65536).ok());  // past below's end
    HeldWrite r;
    held_read(*f, r, 8192, (1 << 20) - 4096);
    below.land();
    REQUIRE(r.answer.ok());
    CHECK(r.got == 8192);
    CHECK(std::string(r.buf.data(), 4096) == std::string(4096, 'o'));
    CHECK(std::string(r.buf.data() + 4096, 4096) == std::string(4096, '\0'));
    REQUIRE(f->read(Io{}, buf, 4096, (1 << 20) + 65536, &got).ok());
    CHECK(std::string(buf, 4096) == d);
  }
}

TEST_CASE("an unaligned read offered deferral gives no slot without recording it: after a reopen no evicted block's "
          "old record is served",
          "[cache][filter][defer][crash]") {
  TmpDir dir;
  testing::MemLayer below;
  below.data.assign(4 << 20, 'o');
  const std::string yaml = "{mode: write-around, device: " + dir.path + ", size: 1MiB, block: 64KiB, "
                           "sequential-cutoff: 0}";
  const std::string fresh(65536, 'N');
  {
    iofilterfs::Status st;
    auto f = make(yaml, &below, "d.raw", &st);
    REQUIRE(st.ok());
    for (int b = 0; b < 16; ++b) CHECK(read_all(*f, uint64_t(b) * 65536, 65536) == std::string(65536, 'o'));
    // Every slot holds a clean block: a read of another block that fills evicts one of them.
    // Unaligned, it is read on this thread (read_block), which records the slot it takes.
    testing::NoDeferrer d;
    Io io;
    io.defer = &d;
    char buf[512];
    size_t got = 0;
    REQUIRE(f->read(io, buf, sizeof buf, 20 * 65536 + 100, &got).ok());
    // Every block written again: a cached one drops its pages (recorded), the evicted one has
    // no slot and goes below only.
    for (int b = 0; b < 16; ++b) REQUIRE(f->write(Io{}, fresh.data(), fresh.size(), uint64_t(b) * 65536).ok());
    f->close();
  }
  iofilterfs::Status st;
  auto f = make(yaml, &below, "d.raw", &st);
  REQUIRE(st.ok());
  for (int b = 0; b < 16; ++b) {
    INFO("block " << b);
    CHECK(read_all(*f, uint64_t(b) * 65536, 65536) == fresh);
  }
}
