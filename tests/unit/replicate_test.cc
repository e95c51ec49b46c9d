// The replicate filter's pure parts (CRC-32C, the dirty bitmap and its file, the journal's
// record format and replay, the parameters) exactly, and the filter itself over a memory layer
// with a directory target: sync and async replication, an unreachable target (degrade and
// fail), journal overflow into the bitmap, and a restart that resends only what changed.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <csignal>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <fstream>
#include <chrono>
#include <random>
#include <thread>
#include <sstream>
#include <string>
#include <vector>

#include "mem_layer.h"
#include "replicate/bitmap.h"
#include "replicate/crc32c.h"
#include "replicate/history.h"
#include "replicate/journal.h"
#include "replicate/params.h"
#include "replicate/range_lock.h"
#include "replicate/target.h"
#include "replicate/replicate_filter.h"

using namespace iofilterfs::replicate;
using iofilterfs::Io;
using iofilterfs::ReplicateFilter;

namespace {

struct Tmp {
  std::string path;
  Tmp() {
    char t[] = "/tmp/replicate-unit-XXXXXX";
    path = mkdtemp(t);
  }
  ~Tmp() { std::system(("rm -rf '" + path + "'").c_str()); }
  std::string operator/(const std::string& r) const { return path + "/" + r; }
};

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string run_journal_checks(const std::string& bytes, uint64_t off, uint64_t seq, ScanResult* out,
                               std::vector<uint64_t>* seqs) {
  *out = scan_journal(
      [&](uint64_t o, void* buf, size_t len) -> long {
        if (o >= bytes.size()) return 0;
        size_t n = std::min<size_t>(len, bytes.size() - o);
        std::memcpy(buf, bytes.data() + o, n);
        return static_cast<long>(n);
      },
      off, seq,
      [&](const RecordHeader& h, const uint8_t*, uint64_t) {
        seqs->push_back(h.seq);
        return true;
      });
  return out->stopped;
}

std::string record(RecType t, uint64_t seq, uint64_t off, const std::string& data, uint64_t len = 0) {
  RecordHeader h;
  make_record(&h, t, seq, 1000 + seq, off, t == RecType::Write ? data.size() : len, data.data(),
              static_cast<uint32_t>(data.size()));
  return std::string(reinterpret_cast<const char*>(&h), sizeof h) + data;
}

}  // namespace

TEST_CASE("crc32c: the published check value and incremental use", "[replicate]") {
  const char* s = "123456789";
  CHECK(crc32c(0, s, 9) == 0xE3069283u);
  CHECK(crc32c(crc32c(0, s, 4), s + 4, 5) == 0xE3069283u);
  CHECK(crc32c(0, "", 0) == 0u);
  std::string big(100000, 'x');
  CHECK(crc32c(crc32c(0, big.data(), 33333), big.data() + 33333, big.size() - 33333) ==
        crc32c(0, big.data(), big.size()));
  // The interleaved path (12 KiB blocks and a tail) equals the bytewise definition.
  auto bitwise = [](uint32_t c, const std::string& d) {
    c = ~c;
    for (unsigned char ch : d) {
      c ^= ch;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    }
    return ~c;
  };
  for (size_t n : {size_t(12287), size_t(12288), size_t(12289), size_t(3 * 12288 + 77), size_t(1) << 20}) {
    std::string d(n, '\0');
    std::mt19937 rng(static_cast<unsigned>(n));
    for (auto& ch : d) ch = static_cast<char>(rng());
    INFO(n);
    CHECK(crc32c(0, d.data(), d.size()) == bitwise(0, d));
    CHECK(crc32c(0x12345678u, d.data(), d.size()) == bitwise(0x12345678u, d));
  }
}

TEST_CASE("dirty bits: set, clear, next and count, across chunks", "[replicate]") {
  AtomicBits b;
  CHECK(b.next(0) == AtomicBits::npos);
  CHECK(b.set(5));
  CHECK_FALSE(b.set(5));
  CHECK(b.set(64));
  const uint64_t far = AtomicBits::kChunkWords * 64 * 3 + 7;  // in the fourth chunk
  CHECK(b.set(far));
  CHECK(b.count() == 3);
  CHECK(b.next(0) == 5);
  CHECK(b.next(6) == 64);
  CHECK(b.next(65) == far);
  CHECK(b.next(far + 1) == AtomicBits::npos);
  CHECK(b.test(64));
  CHECK_FALSE(b.test(63));
  CHECK(b.clear(64));
  CHECK_FALSE(b.clear(64));
  CHECK_FALSE(b.clear(far + 1000000));  // a chunk that was never made
  CHECK(b.count() == 2);
  CHECK_FALSE(b.set(AtomicBits::kCapacity));  // out of reach: refused, not wrapped
  std::vector<std::pair<uint64_t, uint64_t>> w;
  b.words(&w);
  REQUIRE(w.size() == 2);
  CHECK(w[0] == std::make_pair(uint64_t(0), uint64_t(1) << 5));
  CHECK(w[1] == std::make_pair(far / 64, uint64_t(1) << 7));
  AtomicBits c;
  c.set(1000);
  c.assign(w);
  CHECK(c.count() == 2);
  CHECK_FALSE(c.test(1000));
  CHECK(c.test(5));
  CHECK(c.test(far));
  c.clear_all();
  CHECK(c.count() == 0);
  CHECK(c.next(0) == AtomicBits::npos);
}

TEST_CASE("bitmap file pages: round trip, and damage read as all ones", "[replicate]") {
  uint8_t page[kBitmapPage];
  encode_bitmap_header(BitmapHeader{16, target_id_of("nbd://h/e")}, page);
  BitmapHeader h;
  REQUIRE(decode_bitmap_header(page, &h) == "");
  CHECK(h.region_shift == 16);
  CHECK(h.target_id == target_id_of("nbd://h/e"));
  CHECK(target_id_of("nbd://h/e") != target_id_of("nbd://h/f"));
  page[17] ^= 1;
  CHECK(decode_bitmap_header(page, &h) == "header checksum mismatch");
  page[0] = 'X';
  CHECK(decode_bitmap_header(page, &h) == "not a bitmap file (bad magic)");
  encode_bitmap_header(BitmapHeader{}, page);
  page[8] = 1;
  CHECK(decode_bitmap_header(page, &h) == "unknown bitmap version 1");

  std::vector<uint64_t> w(kPageWords, 0), back(kPageWords, 7);
  w[0] = 5;
  w[510] = 0x8000000000000000ull;
  encode_bitmap_page(3, w.data(), page);
  CHECK(decode_bitmap_page(page, 3, back.data()) == PageState::Ok);
  CHECK(back == w);
  CHECK(decode_bitmap_page(page, 4, back.data()) == PageState::Bad);  // another page's content
  CHECK(back == std::vector<uint64_t>(kPageWords, ~uint64_t(0)));
  page[100] ^= 2;  // a torn write
  CHECK(decode_bitmap_page(page, 3, back.data()) == PageState::Bad);
  uint8_t zero[kBitmapPage] = {};
  CHECK(decode_bitmap_page(zero, 9, back.data()) == PageState::Empty);
  CHECK(back == std::vector<uint64_t>(kPageWords, 0));
  // A cleared page is written, not left as zeros: it reads back as a valid empty page.
  std::vector<uint64_t> none(kPageWords, 0);
  encode_bitmap_page(0, none.data(), page);
  CHECK(decode_bitmap_page(page, 0, back.data()) == PageState::Ok);
}

TEST_CASE("persistent bitmap: saved changes survive, other targets and sizes are not trusted", "[replicate]") {
  Tmp t;
  const std::string p = t / "img.bitmap";
  const uint64_t far = kPageBits * 5 + 17;
  {
    PersistentBitmap b(p, 16, 42);
    bool found = true;
    std::string note;
    uint64_t bad = 9;
    REQUIRE(b.load(&found, &note, &bad) == "");
    CHECK_FALSE(found);  // no file yet
    CHECK(bad == 0);
    CHECK(b.set(3));
    CHECK(b.set(far));
    CHECK(b.set(4));
    REQUIRE(b.save() == "");
    CHECK(b.saves() == 1);
    CHECK(b.pages_written() == 2);  // pages 0 and 5, once each
    REQUIRE(b.save() == "");        // nothing new: no write
    CHECK(b.saves() == 1);
    CHECK(b.clear(4));
    REQUIRE(b.save() == "");
    CHECK(b.pages_written() == 3);
  }
  CHECK(slurp(p).size() == 7 * kBitmapPage);  // the header and pages 0..5 (1..4 sparse)
  {
    PersistentBitmap b(p, 16, 42);
    bool found = false;
    std::string note;
    uint64_t bad = 0;
    REQUIRE(b.load(&found, &note, &bad) == "");
    CHECK(found);
    CHECK(note.empty());
    CHECK(b.count() == 2);
    CHECK(b.test(3));
    CHECK(b.test(far));
    CHECK_FALSE(b.test(4));
  }
  {
    // A torn page: its regions all count as changed, the others are kept.
    std::string bytes = slurp(p);
    bytes[6 * kBitmapPage + 40] ^= 0x10;
    std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
    PersistentBitmap b(p, 16, 42);
    bool found = false;
    std::string note;
    uint64_t bad = 0;
    REQUIRE(b.load(&found, &note, &bad) == "");
    CHECK(found);
    CHECK(bad == 1);
    CHECK(note == p + ": 1 torn pages; their regions are resent");
    CHECK(b.count() == 1 + kPageBits);
    CHECK(b.test(3));
    CHECK(b.test(kPageBits * 5));
  }
  {
    PersistentBitmap b(p, 17, 42);
    bool found = true;
    std::string note;
    uint64_t bad = 0;
    REQUIRE(b.load(&found, &note, &bad) == "");
    CHECK_FALSE(found);
    CHECK(note == p + ": written for 65536-byte regions, not 131072");
    CHECK(b.count() == 0);
  }
  {
    // The file was started afresh for 128 KiB regions; for target 43 it is not trusted.
    PersistentBitmap b(p, 17, 43);
    bool found = true;
    std::string note;
    uint64_t bad = 0;
    REQUIRE(b.load(&found, &note, &bad) == "");
    CHECK_FALSE(found);
    CHECK(note == p + ": written for another target");
  }
}

TEST_CASE("journal records: replay stops at the first torn or foreign record", "[replicate]") {
  std::string j = record(RecType::Write, 7, 4096, "hello") + record(RecType::Zero, 8, 0, "", 65536) +
                  record(RecType::Resize, 9, 0, "", 1 << 20) + record(RecType::Write, 10, 10, std::string(300, 'z'));
  ScanResult r;
  std::vector<uint64_t> seqs;
  CHECK(run_journal_checks(j, 0, 7, &r, &seqs) == "");
  CHECK(seqs == std::vector<uint64_t>{7, 8, 9, 10});
  CHECK(r.end == j.size());
  CHECK(r.next_seq == 11);
  CHECK(r.records == 4);

  SECTION("a tail cut inside the last record's data") {
    seqs.clear();
    CHECK(run_journal_checks(j.substr(0, j.size() - 1), 0, 7, &r, &seqs) == "torn record data");
    CHECK(seqs.size() == 3);
    CHECK(r.end == j.size() - 48 - 300);
  }
  SECTION("a tail cut inside a header") {
    seqs.clear();
    CHECK(run_journal_checks(j.substr(0, 53 + 20), 0, 7, &r, &seqs) == "torn record header");
    CHECK(seqs.size() == 1);
  }
  SECTION("a flipped data bit") {
    std::string bad = j;
    bad[48 + 2] ^= 4;
    seqs.clear();
    CHECK(run_journal_checks(bad, 0, 7, &r, &seqs) == "record checksum mismatch");
    CHECK(seqs.empty());
    CHECK(r.end == 0);
  }
  SECTION("a stale record from an older journal (sequence break)") {
    std::string bad = j.substr(0, 53) + record(RecType::Write, 3, 0, "old");
    seqs.clear();
    CHECK(run_journal_checks(bad, 0, 7, &r, &seqs) == "sequence 3 where 8 was expected");
    CHECK(seqs == std::vector<uint64_t>{7});
  }
  SECTION("garbage") {
    seqs.clear();
    CHECK(run_journal_checks(std::string(100, '\xff'), 0, 1, &r, &seqs) == "bad record magic");
  }
  SECTION("a write record whose length disagrees with its data") {
    RecordHeader h;
    make_record(&h, RecType::Write, 1, 0, 0, 10, "abc", 3);
    CHECK(check_record(h, "abc", 1) == "write record length mismatch");
  }
}

TEST_CASE("journal header: round trip, damage detected", "[replicate]") {
  uint8_t b[64];
  encode_journal_header(JournalHeader{8192, 55}, b);
  JournalHeader h;
  REQUIRE(decode_journal_header(b, &h) == "");
  CHECK(h.ship_off == 8192);
  CHECK(h.ship_seq == 55);
  b[20] ^= 1;
  CHECK(decode_journal_header(b, &h) == "journal header checksum mismatch");
  encode_journal_header(JournalHeader{100, 1}, b);
  CHECK(decode_journal_header(b, &h) == "journal header out of range");
}

TEST_CASE("journal file: append, ship point, reopen, torn tail cut, reset", "[replicate]") {
  Tmp t;
  const std::string p = t / "j";
  std::string note;
  {
    std::unique_ptr<Journal> j;
    REQUIRE(Journal::open(p, &j, &note) == "");
    CHECK(note.empty());
    CHECK(j->end() == kJournalHeader);
    for (int i = 0; i < 5; ++i) {
      std::string d(1000 + i, static_cast<char>('a' + i));
      REQUIRE(j->append(RecType::Write, 1, i * 4096, d.size(), d.data(), static_cast<uint32_t>(d.size())) == "");
    }
    REQUIRE(j->append(RecType::Zero, 2, 0, 512, nullptr, 0) == "");
    CHECK(j->next_seq() == 7);
    RecordHeader h;
    std::vector<uint8_t> data;
    REQUIRE(j->read(kJournalHeader, &h, &data) == "");
    CHECK(h.seq == 1);
    CHECK(data.size() == 1000);
    const uint64_t second = kJournalHeader + 48 + 1000;
    REQUIRE(j->set_shipped(second, 2) == "");
  }
  {
    std::unique_ptr<Journal> j;
    note.clear();
    REQUIRE(Journal::open(p, &j, &note) == "");
    CHECK(note.empty());
    CHECK(j->ship_off() == kJournalHeader + 48 + 1000);
    CHECK(j->ship_seq() == 2);
    CHECK(j->next_seq() == 7);
    uint64_t n = 0;
    REQUIRE(j->headers(j->ship_off(), [&](const RecordHeader&) { ++n; }) == "");
    CHECK(n == 5);
  }
  // A crash mid-append: half a record at the end.
  const uint64_t sound = static_cast<uint64_t>(slurp(p).size());
  {
    std::ofstream f(p, std::ios::binary | std::ios::app);
    RecordHeader h;
    make_record(&h, RecType::Write, 7, 0, 0, 4096, std::string(4096, 'q').data(), 4096);
    f.write(reinterpret_cast<const char*>(&h), sizeof h);
    f << std::string(100, 'q');
  }
  {
    std::unique_ptr<Journal> j;
    note.clear();
    REQUIRE(Journal::open(p, &j, &note) == "");
    CHECK(note == p + ": cut 148 bytes after the last sound record (torn record data; a torn append or an earlier "
                      "cycle's records) after 5 records");
    CHECK(j->end() == sound);
    CHECK(j->next_seq() == 7);
    REQUIRE(j->reset() == "");
    CHECK(j->end() == kJournalHeader);
    CHECK(j->ship_seq() == 7);
  }
  {
    std::unique_ptr<Journal> j;
    note.clear();
    REQUIRE(Journal::open(p, &j, &note) == "");
    CHECK(note.empty());  // the stale records of the first cycle are no torn tail
    CHECK(j->end() == kJournalHeader);
    CHECK(j->next_seq() == 7);  // sequence numbers continue after a reset
    // A reset keeps the file's pages: the next cycle overwrites the old records in place, and
    // a replay stops at the first record of the old cycle.
    REQUIRE(j->append(RecType::Write, 3, 0, 10, "0123456789", 10) == "");
    REQUIRE(j->reset() == "");
    CHECK(slurp(p).size() == kJournalHeader + 48 + 10);
    REQUIRE(j->append(RecType::Write, 4, 0, 3, "xyz", 3) == "");
    CHECK(slurp(p).size() == kJournalHeader + 48 + 10);
  }
  {
    std::unique_ptr<Journal> j;
    note.clear();
    REQUIRE(Journal::open(p, &j, &note) == "");
    INFO(note);
    CHECK(note.find("a torn append or an earlier cycle") != std::string::npos);  // inside the old record's data
    CHECK(j->end() == kJournalHeader + 48 + 3);
    CHECK(j->next_seq() == 9);
    RecordHeader h;
    std::vector<uint8_t> data;
    REQUIRE(j->read(kJournalHeader, &h, &data) == "");
    CHECK(std::string(data.begin(), data.end()) == "xyz");
  }
}

TEST_CASE("replicate parameters: good and bad, with the exact message and the node blamed", "[replicate][config]") {
  struct Row {
    const char* yaml;
    const char* message;
    int line, column;  // of the blamed node; -1: not checked
  };
  static const Row rows[] = {
      {"target: /srv/replica\njournal: /var/lib/r", "", -1, -1},
      {"target: nbd://backup.example:10809/vm1\nmode: async\njournal: /j\nmax-lag: 256MiB\non-overflow: backpressure", "", -1, -1},
      {"target: nbd+unix:///vm1?socket=/run/nbd.sock\njournal: /j\non-target-error: fail\nregion-size: 1MiB", "", -1, -1},
      {"target: nbds://h/e?tls-certificates=/etc/pki/nbd\njournal: /j\nreconnect-max: 30s", "", -1, -1},
      {"journal: /j", "'target' is required (a directory or an NBD URI)", -1, -1},
      {"target: /t", "'journal' is required (a directory for the image's journal and dirty bitmap)", -1, -1},
      {"", "'target' and 'journal' are required", -1, -1},
      {"fast", "parameters must be a mapping, not 'fast'", -1, -1},
      {"target: /t\njournal: /j\ntraget: /x", "unknown key 'traget' (did you mean 'target'?)", 2, 0},
      {"target: /t\njournal: /j\nmode: semi", "'mode' must be sync or async, not 'semi'", 2, 6},
      {"target: relative/dir\njournal: /j", "'target' must be an absolute directory or an NBD URI, not 'relative/dir'", 0, 8},
      {"target: http://x/y\njournal: /j",
       "'target' 'http://x/y': unknown scheme (use a directory, nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, "
       "or nbds:// for TLS)",
       0, 8},
      {"target: nbd:///export\njournal: /j", "'target' 'nbd:///export': the NBD URI has no host (nbd://HOST[:PORT]/EXPORT)", 0, 8},
      {"target: nbd+unix:///e\njournal: /j", "'target' 'nbd+unix:///e': a unix-socket NBD URI needs ?socket=PATH", 0, 8},
      {"target: /t\njournal: j", "'journal' must be an absolute directory, not 'j'", 1, 9},
      {"target: /t\njournal: /j\nmode: async\nmax-lag: lots", "'max-lag' must be a size (e.g. 1GiB), not 'lots'", 3, 9},
      {"target: /t\njournal: /j\nmode: async\nmax-lag: 512KiB", "'max-lag' must be at least 1MiB, not '512KiB'", 3, 9},
      {"target: /t\njournal: /j\nmax-lag: 1GiB", "'max-lag' applies to mode: async only", 2, 9},
      {"target: /t\njournal: /j\non-overflow: bitmap", "'on-overflow' applies to mode: async only", 2, 13},
      {"target: /t\njournal: /j\nmode: async\non-target-error: fail",
       "'on-target-error' applies to mode: sync only (async always keeps writing and catches up)", 3, 17},
      {"target: /t\njournal: /j\nmode: async\non-overflow: drop", "'on-overflow' must be bitmap or backpressure, not 'drop'", 3, 13},
      {"target: /t\njournal: /j\non-target-error: ignore", "'on-target-error' must be degrade or fail, not 'ignore'", 2, 17},
      {"target: /t\njournal: /j\nregion-size: 3KiB", "'region-size' must be a power of two from 4KiB to 64MiB, not '3KiB'", 2, 13},
      {"target: /t\njournal: /j\nregion-size: 128MiB", "'region-size' must be a power of two from 4KiB to 64MiB, not '128MiB'", 2, 13},
      {"target: /t\njournal: /j\nreconnect-max: 1ms", "'reconnect-max' must be from 100ms to 10m, not '1ms'", 2, 15},
      {"target: /t\njournal: /t/j", "'journal' must not be inside the target directory", 1, 9},
      {"target: /t\njournal: /j\ntarget: /u", "duplicate key 'target' (first on line 1)", 2, 0},
      {"target: /t\njournal: /j\nmode:", "'mode' has no value", 2, 0},
      {"target: [a, b]\njournal: /j", "'target' must be a single value, not a list", 0, 8},
      {"target: /t\njournal: /j\nmode: async\nretention: 1h", "", -1, -1},
      {"target: /t\njournal: /j\nretention: 1h", "", -1, -1},
      {"target: /t\njournal: /j\nmode: sync\nretention: 30s", "", -1, -1},
      {"target: /t\njournal: /j\nmode: async\nretention: 500ms", "'retention' must be from 1s to 365d, not '500ms'", 3, 11},
  };
  for (const Row& row : rows) {
    INFO(row.yaml);
    YAML::Node n = YAML::Load(row.yaml);
    YAML::Node where = n;
    CHECK(validate_replicate(n, &where) == row.message);
    if (row.line >= 0) {
      CHECK(where.Mark().line == row.line);
      CHECK(where.Mark().column == row.column);
    }
  }
  ReplicateParams p;
  REQUIRE(parse_replicate(YAML::Load("target: nbd+unix:///e?socket=/s\nmode: async\njournal: /j\nmax-lag: 2MiB"), &p) ==
          "");
  CHECK(p.target_is_nbd);
  CHECK(p.mode == Mode::Async);
  CHECK(p.max_lag == 2u << 20);
  CHECK(describe_replicate(p) ==
        "target=nbd+unix:///e?socket=/s mode=async journal=/j max-lag=2.0MiB on-overflow=bitmap region-size=64.0KiB");
}

// ---- The filter over memory, with a directory target -------------------------------------

namespace {

template <class Below = testing::MemLayer>
struct RigOver {
  Tmp tmp;
  Below mem;
  std::unique_ptr<ReplicateFilter> f;
  std::string target() const { return tmp / "target"; }
  std::string replica() const { return tmp / "target/vm/disk.img"; }

  void open(const std::string& extra, bool make_target = true) {
    if (make_target) ::mkdir(target().c_str(), 0755);
    YAML::Node n = YAML::Load("target: " + target() + "\njournal: " + (tmp / "state") + "\nreconnect-max: 100ms\n" + extra);
    ReplicateParams p;
    REQUIRE(parse_replicate(n, &p) == "");
    f = std::make_unique<ReplicateFilter>(p);
    f->set_next(&mem);
    REQUIRE(f->open(iofilterfs::DiskInfo{"vm/disk.img", "raw", false}).ok());
  }
  void close() {
    (void)f->drain();
    f->shutdown();
    f->close();
    f.reset();
  }
  void write(uint64_t off, const std::string& d) { REQUIRE(f->write(Io{}, d.data(), d.size(), off).ok()); }
  std::string local() {
    std::lock_guard<std::mutex> g(mem.mu);
    return std::string(mem.data.begin(), mem.data.end());
  }
  uint64_t stat(const std::string& key) {
    YAML::Node s = YAML::Load(f->stats_json());
    return s[key].as<uint64_t>();
  }
};

using Rig = RigOver<>;

std::string pattern(size_t n, int seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

}  // namespace

TEST_CASE("replicate sync: every write is on the replica when it completes", "[replicate][filter]") {
  Rig rig;
  rig.mem.data.assign(1 << 20, 0);
  std::memcpy(rig.mem.data.data() + 300000, "existing", 8);
  rig.open("");
  CHECK(rig.f->degraded_reason().empty());
  REQUIRE(rig.f->drain().ok());  // the initial sync
  CHECK(slurp(rig.replica()) == rig.local());
  CHECK(rig.stat("bytes_resent") == 65536);  // the one region with data; the rest went as zeros
  rig.write(4096, pattern(10000, 1));
  rig.write((1 << 20) - 100, pattern(300, 2));  // grows the image
  CHECK(slurp(rig.replica()) == rig.local());    // no drain needed in sync mode
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 5000).ok());
  CHECK(slurp(rig.replica()) == rig.local());
  REQUIRE(rig.f->sync(Io{}, false).ok());
  CHECK(rig.stat("bytes_sent") == 10300);
  rig.close();
}

TEST_CASE("replicate sync, degrade: an unreachable target is caught up from the bitmap", "[replicate][filter]") {
  Rig rig;
  rig.mem.data.assign(4 << 20, 0);
  rig.open("", /*make_target=*/false);
  CHECK(rig.f->degraded_reason() == "replica unreachable");
  rig.write(0, pattern(4096, 3));
  rig.write(2 << 20, pattern(70000, 4));  // two regions
  CHECK(rig.f->replica_lag_bytes() > 0);
  CHECK(rig.f->drain().err == EHOSTDOWN);
  REQUIRE(::mkdir(rig.target().c_str(), 0755) == 0);
  REQUIRE(rig.f->drain().ok());
  CHECK(rig.f->degraded_reason().empty());
  CHECK(slurp(rig.replica()) == rig.local());
  CHECK(rig.f->replica_lag_bytes() == 0);
  rig.close();
}

TEST_CASE("replicate sync, fail: writes fail while the target is unreachable", "[replicate][filter]") {
  Rig rig;
  rig.mem.data.assign(1 << 20, 0);
  rig.open("on-target-error: fail", false);
  const std::string d = pattern(4096, 5);
  iofilterfs::Status s = rig.f->write(Io{}, d.data(), d.size(), 0);
  CHECK(s.err == EIO);
  CHECK(rig.local().substr(0, 4096) != d);  // refused before the local write
  REQUIRE(::mkdir(rig.target().c_str(), 0755) == 0);
  REQUIRE(rig.f->drain().ok());
  rig.write(0, d);
  CHECK(slurp(rig.replica()) == rig.local());
  rig.close();
}

TEST_CASE("replicate async: the journal is shipped in order and drain waits for it", "[replicate][filter]") {
  Rig rig;
  rig.open("mode: async");
  REQUIRE(rig.f->drain().ok());
  for (int i = 0; i < 200; ++i) rig.write((i * 7919) % (1 << 20), pattern(3000, i));
  REQUIRE(rig.f->resize(Io{}, 1 << 20).ok());
  rig.write(5, "overwritten last");
  REQUIRE(rig.f->drain().ok());
  CHECK(slurp(rig.replica()) == rig.local());
  CHECK(rig.stat("records_shipped") == 202);
  CHECK(rig.stat("bytes_resent") == 0);
  CHECK(rig.f->replica_lag_bytes() == 0);
  rig.close();
}

TEST_CASE("replicate async: past max-lag the journal collapses into the bitmap, then resyncs", "[replicate][filter]") {
  Rig rig;
  rig.mem.data.assign(8 << 20, 0);
  rig.open("mode: async\nmax-lag: 1MiB", false);
  for (int i = 0; i < 48; ++i) rig.write(uint64_t(i) * 65536, pattern(65536, 100 + i));  // 3 MiB
  CHECK(rig.stat("collapses") == 1);
  // Never connected: the initial sync's 128 regions are pending, the 48 written among them.
  CHECK(rig.stat("pending_regions") == 128);
  CHECK(rig.stat("journal_bytes") == 0);
  REQUIRE(::mkdir(rig.target().c_str(), 0755) == 0);
  REQUIRE(rig.f->drain().ok());
  CHECK(slurp(rig.replica()) == rig.local());
  // Regions without data go as zeros (bytes_zeroed); only the 3 MiB written go as data.
  CHECK(rig.stat("bytes_resent") == 48 * 65536);
  CHECK(rig.stat("bytes_zeroed") == 80 * 65536);
  YAML::Node st = YAML::Load(rig.f->stats_json());
  CHECK(st["journal_mode"].as<std::string>() == "journal");
  rig.close();
}

TEST_CASE("replicate restart: only the regions changed while the target was away are resent", "[replicate][filter]") {
  Rig rig;
  rig.mem.data.assign(16 << 20, 0);
  for (int i = 0; i < 16; ++i) std::memcpy(rig.mem.data.data() + (i << 20), "data", 4);
  rig.open("mode: async");
  REQUIRE(rig.f->drain().ok());
  CHECK(slurp(rig.replica()) == rig.local());
  CHECK(rig.stat("bytes_resent") == 16 * 65536);
  rig.close();
  // The target goes away; the disk is reopened (a daemon restart) and written.
  REQUIRE(std::system(("mv '" + rig.target() + "' '" + rig.target() + ".away'").c_str()) == 0);
  rig.open("mode: async", false);
  for (int i = 0; i < 5; ++i) rig.write(uint64_t(i) * (3 << 20) + 100, pattern(5000, 200 + i));
  rig.f->shutdown();
  rig.f->close();  // not drained: the journal keeps it
  rig.f.reset();
  REQUIRE(std::system(("mv '" + rig.target() + ".away' '" + rig.target() + "'").c_str()) == 0);
  rig.open("mode: async");
  REQUIRE(rig.f->drain().ok());
  CHECK(slurp(rig.replica()) == rig.local());
  CHECK(rig.stat("bytes_resent") == 0);            // nothing was resent from the bitmap
  CHECK(rig.stat("records_shipped") == 5);         // just the journal's five records
  CHECK(rig.stat("bytes_sent") == 5 * 5000);
  rig.close();
}

TEST_CASE("replicate retention: restore at a moment and at a named point rebuilds those bytes", "[replicate][filter][cdp]") {
  const std::string mode = GENERATE(as<std::string>{}, "mode: async", "mode: sync");
  INFO(mode);
  Rig rig;
  rig.mem.data.assign(2 << 20, 0);
  std::memcpy(rig.mem.data.data() + 70000, "before the history", 18);
  rig.open(mode + "\nretention: 1h");
  const std::string at_open = rig.local();
  for (int i = 0; i < 20; ++i) rig.write(uint64_t(i) * 50000, pattern(3000, i));
  const std::string phase_a = rig.local();
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  const uint64_t t_a = uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
  REQUIRE(rig.f->snapshot("after-a").ok());
  rig.write(100, pattern(200000, 77));
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1 << 20, 300000).ok());
  const std::string phase_b = rig.local();
  REQUIRE(rig.f->snapshot("after-b").ok());
  REQUIRE(rig.f->resize(Io{}, 3 << 20).ok());
  rig.write((3 << 20) - 10, "tail");  // grows past the resize
  const std::string phase_c = rig.local();
  REQUIRE(rig.f->drain().ok());
  YAML::Node h = YAML::Load(rig.f->stats_json())["history"];
  REQUIRE(h.IsMap());
  HistoryFiles files{h["journal"].as<std::string>(), h["base"].as<std::string>(), h["meta"].as<std::string>()};

  HistoryInfo info;
  REQUIRE(list_history(files, &info) == "");
  REQUIRE(info.points.size() == 2);
  CHECK(info.points[0].name == "after-a");
  CHECK(info.points[1].name == "after-b");
  CHECK(info.records == 26);  // 20 + 1 + 1 + 2 points + the resize + the tail
  uint64_t applied = 0;
  const std::string out = rig.tmp / "restored";
  REQUIRE(restore_history(files, info.window_start_ns, "", out, &applied) == "");
  CHECK(applied == 0);
  CHECK(slurp(out) == at_open);
  REQUIRE(restore_history(files, t_a, "", out, &applied) == "");
  CHECK(applied == 20);
  CHECK(slurp(out) == phase_a);
  REQUIRE(restore_history(files, 0, "after-a", out, &applied) == "");
  CHECK(slurp(out) == phase_a);
  REQUIRE(restore_history(files, 0, "after-b", out, &applied) == "");
  CHECK(slurp(out) == phase_b);
  REQUIRE(restore_history(files, ~uint64_t(0), "", out, &applied) == "");
  CHECK(slurp(out) == phase_c);
  CHECK(restore_history(files, 0, "nope", out, &applied) == "no restore point named 'nope' in the retention window");
  CHECK(restore_history(files, info.window_start_ns - 1, "", out, &applied).rfind("the moment asked for is before", 0) == 0);
  rig.close();
}

TEST_CASE("replicate retention: history older than the retention is folded into the base", "[replicate][filter][cdp]") {
  const std::string mode = GENERATE(as<std::string>{}, "mode: async", "mode: sync");
  INFO(mode);
  Rig rig;
  rig.mem.data.assign(1 << 20, 0);
  rig.open(mode + "\nretention: 1s");
  for (int i = 0; i < 10; ++i) rig.write(uint64_t(i) * 65536, pattern(5000, 300 + i));
  const std::string phase_a = rig.local();
  REQUIRE(rig.f->drain().ok());
  // Wait (without asserting on time) until the background compaction folded phase A.
  for (int i = 0; i < 200; ++i) {
    YAML::Node h = YAML::Load(rig.f->stats_json())["history"];
    if (h["compacted_records"].as<uint64_t>() >= 10) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  YAML::Node h = YAML::Load(rig.f->stats_json())["history"];
  REQUIRE(h["compacted_records"].as<uint64_t>() == 10);
  rig.write(7, pattern(100, 1));
  const std::string phase_b = rig.local();
  REQUIRE(rig.f->drain().ok());
  HistoryFiles files{h["journal"].as<std::string>(), h["base"].as<std::string>(), h["meta"].as<std::string>()};
  HistoryInfo info;
  REQUIRE(list_history(files, &info) == "");
  CHECK(info.records == 1);
  uint64_t applied = 0;
  const std::string out = rig.tmp / "restored";
  REQUIRE(restore_history(files, info.window_start_ns, "", out, &applied) == "");
  CHECK(applied == 0);
  CHECK(slurp(out) == phase_a);  // the base now holds phase A
  REQUIRE(restore_history(files, ~uint64_t(0), "", out, &applied) == "");
  CHECK(applied == 1);
  CHECK(slurp(out) == phase_b);
  rig.close();
}

TEST_CASE("replicate retention, mode: sync: the history goes on across a reopen, and goes when retention is turned off",
          "[replicate][filter][cdp]") {
  Rig rig;
  rig.mem.data.assign(1 << 20, 0);
  rig.open("mode: sync\nretention: 1h");
  const std::string at_open = rig.local();
  rig.write(1000, pattern(5000, 1));
  const std::string phase_a = rig.local();
  REQUIRE(rig.f->snapshot("a").ok());
  rig.close();
  rig.open("mode: sync\nretention: 1h");  // a daemon restart
  rig.write(2000, pattern(7000, 2));
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192).ok());
  REQUIRE(rig.f->resize(Io{}, (1 << 20) + 4096).ok());
  const std::string phase_b = rig.local();
  REQUIRE(rig.f->snapshot("b").ok());
  REQUIRE(rig.f->drain().ok());
  {
    const std::string r = slurp(rig.replica()), l = rig.local();
    size_t i = 0;
    while (i < r.size() && i < l.size() && r[i] == l[i]) ++i;
    INFO("replica " << r.size() << " local " << l.size() << " first difference at " << i);
    CHECK(r == l);
  }
  YAML::Node h = YAML::Load(rig.f->stats_json())["history"];
  REQUIRE(h.IsMap());
  HistoryFiles files{h["journal"].as<std::string>(), h["base"].as<std::string>(), h["meta"].as<std::string>()};
  HistoryInfo info;
  REQUIRE(list_history(files, &info) == "");
  CHECK(info.records == 6);  // write, point a, write, zero, resize, point b
  REQUIRE(info.points.size() == 2);
  const std::string out = rig.tmp / "restored";
  uint64_t applied = 0;
  REQUIRE(restore_history(files, info.window_start_ns, "", out, &applied) == "");
  CHECK(slurp(out) == at_open);
  REQUIRE(restore_history(files, 0, "a", out, &applied) == "");
  CHECK(slurp(out) == phase_a);
  REQUIRE(restore_history(files, 0, "b", out, &applied) == "");
  CHECK(slurp(out) == phase_b);
  rig.close();
  // Without retention the changes are no longer kept: the history files go.
  rig.open("mode: sync");
  CHECK(::access(files.meta.c_str(), F_OK) != 0);
  CHECK(::access(files.base.c_str(), F_OK) != 0);
  CHECK(::access(files.journal.c_str(), F_OK) != 0);
  rig.close();
}

TEST_CASE("replicate retention: a history append that fails fails the write with EIO and changes nothing, "
          "and the history goes on after it",
          "[replicate][filter][cdp]") {
  const std::string mode = GENERATE(std::string("sync"), std::string("async"));
  INFO("mode: " << mode);
  Rig rig;
  rig.mem.data.assign(256 << 10, 0);
  rig.open("mode: " + mode + "\nretention: 1h");
  REQUIRE(rig.f->drain().ok());
  // 320 KiB of history first, so every other file this process writes (the 256 KiB replica,
  // the bitmap) stays below the file size limit set next.
  for (int i = 0; i < 80; ++i) rig.write(static_cast<uint64_t>(i % 64) * 4096, pattern(4096, 100 + i));
  const std::string before = rig.local();
  YAML::Node h = YAML::Load(rig.f->stats_json())["history"];
  REQUIRE(h.IsMap());
  HistoryFiles files{h["journal"].as<std::string>(), h["base"].as<std::string>(), h["meta"].as<std::string>()};
  struct stat st;
  REQUIRE(::stat(files.journal.c_str(), &st) == 0);
  REQUIRE(static_cast<uint64_t>(st.st_size) > (256u << 10));
  // The history journal cannot grow: its next append fails (EFBIG, as a full disk would ENOSPC).
  struct rlimit old;
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto* old_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = static_cast<rlim_t>(st.st_size) + 16;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
  const std::string data = pattern(4096, 7);
  const iofilterfs::Status s = rig.f->write(Io{}, data.data(), data.size(), 8192);
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &old) == 0);
  ::signal(SIGXFSZ, old_handler);
  CHECK(s.err == EIO);
  CHECK(rig.local() == before);  // not made locally
  REQUIRE(rig.f->drain().ok());
  CHECK(slurp(rig.replica()) == before);  // nor on the replica
  CHECK(rig.f->stats_json().find("cannot append") != std::string::npos);  // last_error says why
  // The history goes on from its last sound record: the next write is kept, and a restore of
  // now gives the disk.
  rig.write(8192, pattern(4096, 8));
  REQUIRE(rig.f->drain().ok());
  CHECK(slurp(rig.replica()) == rig.local());
  REQUIRE(rig.f->sync(Io{}, false).ok());  // the history durable, as a restore from its files reads it
  uint64_t applied = 0;
  const std::string out = rig.tmp / "restored";
  struct timespec ts;
  ::clock_gettime(CLOCK_REALTIME, &ts);
  REQUIRE(restore_history(files, static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec), "",
                          out, &applied) == "");
  {
    const std::string r = slurp(out), l = rig.local();
    size_t i = 0;
    while (i < r.size() && i < l.size() && r[i] == l[i]) ++i;
    INFO("restored " << r.size() << " local " << l.size() << " first difference at " << i << ", " << applied
                     << " records applied");
    CHECK(r == l);
  }
  rig.close();
}

TEST_CASE("replicate reconfigure: tunables in place, a new target or mode means a new instance", "[replicate][filter]") {
  Rig rig;
  rig.open("mode: async\nmax-lag: 1GiB");
  auto params = [&](const std::string& extra) {
    return YAML::Load("target: " + rig.target() + "\njournal: " + (rig.tmp / "state") + "\nreconnect-max: 100ms\n" + extra);
  };
  CHECK(rig.f->reconfigure(params("mode: async\nmax-lag: 2MiB\non-overflow: backpressure")));
  CHECK(rig.f->describe().find("max-lag=2.0MiB on-overflow=backpressure") != std::string::npos);
  CHECK_FALSE(rig.f->reconfigure(params("mode: sync")));
  CHECK_FALSE(rig.f->reconfigure(params("mode: async\nregion-size: 1MiB")));
  CHECK_FALSE(rig.f->reconfigure(params("mode: async\nretention: 1h")));
  CHECK_FALSE(rig.f->reconfigure(YAML::Load("target: /elsewhere\njournal: /j\nmode: async")));
  CHECK_FALSE(rig.f->reconfigure(YAML::Load("mode: bogus")));
  rig.close();
}

namespace {

// Stands for the encrypt filter's at-rest cipher below replicate: a keystream that depends on the
// sector number and the byte's place in it (so a sector sealed at the wrong offset shows), and a
// 4 KiB "header" that read_header() serves.
struct FakeSeal : iofilterfs::AtRest {
  static uint8_t key(uint64_t sector, size_t i) { return static_cast<uint8_t>(sector * 131 + i * 7 + 0x5a) | 1; }
  iofilterfs::Status xor_(uint64_t off, const void* in, void* out, size_t len) const {
    if (off % kSector || len % kSector) return iofilterfs::Status::Error(EINVAL, "not whole sectors");
    const auto* a = static_cast<const uint8_t*>(in);
    auto* b = static_cast<uint8_t*>(out);
    for (size_t i = 0; i < len; ++i) b[i] = a[i] ^ key((off + i) / kSector, i % kSector);
    return iofilterfs::Status::Ok();
  }
  iofilterfs::Status seal(uint64_t off, const void* in, void* out, size_t len) const override {
    ++seals;
    return xor_(off, in, out, len);
  }
  iofilterfs::Status unseal(uint64_t off, const void* in, void* out, size_t len) const override {
    return xor_(off, in, out, len);
  }
  uint64_t header_bytes() const override { return 4096; }
  iofilterfs::Status read_header(void* buf, size_t len, uint64_t off) const override {
    for (size_t i = 0; i < len; ++i) static_cast<char*>(buf)[i] = header()[off + i];
    return iofilterfs::Status::Ok();
  }
  static std::string header() {
    std::string h(4096, 'H');
    std::memcpy(h.data(), "LUKS\xba\xbe", 6);
    return h;
  }
  mutable std::atomic<uint64_t> seals{0};
};

// The plaintext a LUKS reader (iofilterfs's encrypt filter) gets from a sealed replica: the
// header must be the container's, and an all-zero ciphertext sector (a hole) reads as zeros.
std::string unseal_replica(const std::string& replica, std::string* header) {
  *header = replica.substr(0, 4096);
  std::string p = replica.substr(4096);
  FakeSeal f;
  for (size_t s = 0; s + 512 <= p.size(); s += 512) {
    if (all_of(p.begin() + s, p.begin() + s + 512, [](char c) { return c == 0; })) continue;
    REQUIRE(f.unseal(s, p.data() + s, p.data() + s, 512).ok());
  }
  return p;
}

bool contains(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

struct SealedRig : Rig {
  std::shared_ptr<FakeSeal> seal = std::make_shared<FakeSeal>();
  void open_sealed(const std::string& extra, bool make_target = true) {
    if (make_target) ::mkdir(target().c_str(), 0755);
    YAML::Node n = YAML::Load("target: " + target() + "\njournal: " + (tmp / "state") + "\nreconnect-max: 100ms\n" + extra);
    ReplicateParams p;
    REQUIRE(parse_replicate(n, &p) == "");
    f = std::make_unique<ReplicateFilter>(p);
    f->set_next(&mem);
    iofilterfs::DiskInfo info{"vm/disk.img", "raw", false};
    info.at_rest = seal;
    REQUIRE(f->open(info).ok());
  }
  // The replica is the container: the header, then a payload that unseals to the local image.
  void check_replica() {
    std::string header;
    const std::string plain = unseal_replica(slurp(replica()), &header);
    CHECK(header == FakeSeal::header());
    CHECK(plain == local());
  }
};

const std::string kMarker = "PLAINTEXT-MARKER-0123456789";

std::string marked(size_t n, int seed) {
  std::string s = pattern(n, seed);
  for (size_t i = 0; i + kMarker.size() <= n; i += 1000) s.replace(i, kMarker.size(), kMarker);
  return s;
}

}  // namespace

TEST_CASE("crc32c_combine equals the CRC of the concatenation", "[replicate]") {
  const std::string a = pattern(1000, 1), b = pattern(70001, 2);
  CHECK(crc32c_combine(crc32c(0, a.data(), a.size()), crc32c(0, b.data(), b.size()), b.size()) ==
        crc32c(0, (a + b).data(), a.size() + b.size()));
  CHECK(crc32c_combine(crc32c(0, a.data(), a.size()), crc32c(0, "", 0), 0) == crc32c(0, a.data(), a.size()));
  CHECK(crc32c_combine(0, crc32c(0, b.data(), b.size()), b.size()) == crc32c(0, b.data(), b.size()));
}

TEST_CASE("journal group commit: concurrent writers, records in reservation order, end only over whole runs",
          "[replicate]") {
  Tmp tmp;
  std::unique_ptr<Journal> j;
  std::string note;
  REQUIRE(Journal::open(tmp / "j", &j, &note) == "");
  std::mutex mu;  // the caller's journal lock
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        const std::string d = pattern(1000 + 4096 * (i % 3), t * 100 + i);
        const uint32_t c = crc32c(0, d.data(), d.size());
        Reservation r;
        {
          std::lock_guard<std::mutex> g(mu);
          r = j->reserve(RecType::Write, 1, uint64_t(t) << 20 | uint64_t(i), d.size(), static_cast<uint32_t>(d.size()), c);
        }
        if (!j->commit(r, d.data()).empty()) ++failures;
        // Published: this record and all before it are below end().
        if (j->end() < r.at + sizeof(RecordHeader) + d.size()) ++failures;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(failures == 0);
  REQUIRE(j->sync() == "");
  const uint64_t end = j->end();
  j.reset();
  REQUIRE(Journal::open(tmp / "j", &j, &note) == "");
  CHECK(note == "");
  CHECK(j->end() == end);
  CHECK(j->next_seq() == 201);
  uint64_t n = 0;
  REQUIRE(j->headers(kJournalHeader, [&](const RecordHeader& h) {
    ++n;
    CHECK(h.seq == n);
  }) == "");
  CHECK(n == 200);
}

TEST_CASE("replicate async: concurrent writers while drains cut the journal lose no record", "[replicate][filter]") {
  Rig rig;
  rig.mem.data.assign(8 << 20, 0);
  rig.open("mode: async");
  REQUIRE(rig.f->drain().ok());
  std::atomic<bool> done{false};
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t)
    writers.emplace_back([&, t] {
      for (int i = 0; i < 150; ++i) {
        const std::string d = pattern(65536, t * 1000 + i);
        // Each thread its own quarter (concurrent writes to one place have no order to keep).
        CHECK(rig.f->write(Io{}, d.data(), d.size(), uint64_t(t * 32 + (i * 7) % 32) << 16).ok());
      }
    });
  std::thread drainer([&] {
    while (!done.load()) CHECK(rig.f->drain().ok());  // each drain cuts a fully shipped journal
  });
  for (auto& w : writers) w.join();
  done.store(true);
  drainer.join();
  REQUIRE(rig.f->drain().ok());
  CHECK(slurp(rig.replica()) == rig.local());
  CHECK(rig.f->replica_lag_bytes() == 0);
  CHECK(rig.stat("bytes_resent") == 0);  // all of it through the journal
  rig.close();
}

TEST_CASE("replicate sync, sealed: the replica is the container, header first, no plaintext, unaligned edges",
          "[replicate][filter][seal]") {
  SealedRig rig;
  rig.mem.data.assign(1 << 20, 0);
  const std::string existing = marked(100000, 9);
  std::memcpy(rig.mem.data.data() + 300000, existing.data(), existing.size());
  rig.open_sealed("");
  YAML::Node st = YAML::Load(rig.f->stats_json());
  CHECK(st["sealed"].as<bool>());
  REQUIRE(rig.f->drain().ok());  // the initial sync: sealed again from the plaintext
  CHECK(slurp(rig.replica()).size() == 4096 + (1 << 20));
  rig.check_replica();
  rig.write(4096, marked(10000, 1));           // aligned start, unaligned end
  rig.write(20000 + 3, marked(5000, 2));       // unaligned both ends
  rig.write(40000 + 7, "tiny");                // inside one sector
  rig.write((1 << 20) - 100, marked(612, 3));  // grows the image (to a whole sector, as encrypt does)
  rig.check_replica();                         // no drain needed in sync mode
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096 + 100, 5000).ok());
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 300000 + 10, 20000).ok());
  rig.check_replica();
  // The zero-range holds sealed zeros (as the encrypt filter writes them), not a hole.
  const std::string rep = slurp(rig.replica());
  const size_t zs = 4096 + 300544;
  CHECK(rep.substr(zs, 512) != std::string(512, '\0'));
  REQUIRE(rig.f->drain().ok());
  CHECK_FALSE(contains(slurp(rig.replica()), kMarker));
  CHECK(contains(rig.local(), kMarker));
  rig.close();
}

TEST_CASE("replicate async, sealed: journal records hold ciphertext of whole sectors, the replica unseals to the source",
          "[replicate][filter][seal]") {
  SealedRig rig;
  rig.mem.data.assign(2 << 20, 0);
  rig.open_sealed("mode: async", /*make_target=*/false);  // the target is away: everything stays journaled
  for (int i = 0; i < 40; ++i) rig.write(uint64_t(i) * 40000 + (i % 5) * 3, marked(3000 + 100 * i, i));
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 70000 + 1, 9000).ok());
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 500224, 4096).ok());
  REQUIRE(rig.f->sync(Io{}, false).ok());
  const std::string journal = slurp(rig.tmp / "state/vm%2Fdisk.img.journal");
  CHECK(journal.size() > 40 * 3000);
  CHECK_FALSE(contains(journal, kMarker));
  CHECK(contains(rig.local(), kMarker));
  // Every record covers whole sectors.
  std::unique_ptr<Journal> j;
  std::string note;
  REQUIRE(Journal::open(rig.tmp / "state/vm%2Fdisk.img.journal", &j, &note) == "");
  uint64_t writes = 0, zeros = 0, sealed_zeros = 0;
  REQUIRE(j->headers(j->ship_off(), [&](const RecordHeader& h) {
    CHECK(h.off % 512 == 0);
    CHECK(h.len % 512 == 0);
    if (h.type == static_cast<uint16_t>(RecType::Write)) ++writes;
    if (h.type == static_cast<uint16_t>(RecType::Zero)) ++zeros;
    if (h.type == static_cast<uint16_t>(RecType::Zero) && (h.flags & kZeroSealed)) ++sealed_zeros;
  }) == "");
  j.reset();
  CHECK(writes == 40 + 2);  // the punch's two edge sectors went as sealed writes
  CHECK(zeros == 2);
  CHECK(sealed_zeros == 1);
  REQUIRE(::mkdir(rig.target().c_str(), 0755) == 0);
  REQUIRE(rig.f->drain().ok());
  rig.check_replica();
  CHECK_FALSE(contains(slurp(rig.replica()), kMarker));
  rig.close();
  // Reopened: the same kind of replica, nothing resent.
  rig.open_sealed("mode: async");
  rig.write(123, marked(2000, 77));
  REQUIRE(rig.f->drain().ok());
  CHECK(rig.stat("bytes_resent") == 0);
  rig.check_replica();
  rig.close();
}

TEST_CASE("replicate: a replica made without sealing is not trusted once the policy encrypts (full resync)",
          "[replicate][filter][seal]") {
  SealedRig rig;
  rig.mem.data.assign(1 << 20, 1);
  rig.open("mode: async");
  REQUIRE(rig.f->drain().ok());
  rig.close();
  rig.open_sealed("mode: async");
  REQUIRE(rig.f->drain().ok());
  CHECK(rig.stat("bytes_resent") == 1 << 20);
  rig.check_replica();
  rig.close();
}

TEST_CASE("replicate retention under a policy that also encrypts: the history is the container's ciphertext and restores it",
          "[replicate][seal][cdp]") {
  const std::string mode = GENERATE(as<std::string>{}, "mode: async", "mode: sync");
  INFO(mode);
  SealedRig rig;
  rig.mem.data.assign(1 << 20, 0);
  const std::string first = marked(300000, 5);
  std::memcpy(rig.mem.data.data() + 1000, first.data(), first.size());
  rig.open_sealed(mode + "\nretention: 1h");
  std::vector<std::pair<std::string, std::string>> phases;  // restore point, plaintext then
  phases.push_back({"open", rig.local()});
  REQUIRE(rig.f->snapshot("open").ok());
  rig.write(4096, marked(8192, 1));   // whole sectors
  rig.write(70001, marked(3001, 2));  // edges inside sectors
  phases.push_back({"writes", rig.local()});
  REQUIRE(rig.f->snapshot("writes").ok());
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_ZERO_RANGE, 100003, 200000).ok());  // sealed zeros, unaligned
  REQUIRE(rig.f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 512 * 1000, 512 * 20).ok());  // a hole
  phases.push_back({"zeroed", rig.local()});
  REQUIRE(rig.f->snapshot("zeroed").ok());
  REQUIRE(rig.f->resize(Io{}, (1 << 20) + 65536).ok());
  rig.write((1 << 20) + 1000, marked(5000, 3));
  phases.push_back({"grown", rig.local()});
  REQUIRE(rig.f->snapshot("grown").ok());
  REQUIRE(rig.f->drain().ok());
  YAML::Node h = YAML::Load(rig.f->stats_json())["history"];
  REQUIRE(h.IsMap());
  HistoryFiles files{h["journal"].as<std::string>(), h["base"].as<std::string>(), h["meta"].as<std::string>()};
  // No plaintext in any file the filter keeps.
  CHECK_FALSE(contains(slurp(files.journal), kMarker));
  CHECK_FALSE(contains(slurp(files.base), kMarker));
  CHECK(slurp(files.base).substr(0, 4096) == FakeSeal::header());
  const std::string out = rig.tmp / "restored";
  uint64_t applied = 0;
  for (const auto& [point, plain] : phases) {
    INFO(point);
    REQUIRE(restore_history(files, 0, point, out, &applied) == "");
    const std::string restored = slurp(out);
    CHECK_FALSE(contains(restored, kMarker));
    CHECK(restored.size() == 4096 + plain.size());
    std::string header;
    CHECK(unseal_replica(restored, &header) == plain);
    CHECK(header == FakeSeal::header());
  }
  REQUIRE(restore_history(files, ~uint64_t(0), "", out, &applied) == "");
  std::string header;
  CHECK(unseal_replica(slurp(out), &header) == rig.local());
  rig.close();
}

TEST_CASE("directory target: copy_from copies file to file, and a source that ends early is left to the caller",
          "[replicate]") {
  Tmp t;
  REQUIRE(::mkdir((t / "replica").c_str(), 0755) == 0);
  const std::string src(3 << 20, 'x');
  {
    std::ofstream f(t / "src", std::ios::binary);
    f << src.substr(0, 1 << 20) << std::string(1 << 20, 'y') << src.substr(0, 1 << 20);
  }
  const int fd = ::open((t / "src").c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  std::unique_ptr<Target> tg = make_target(t / "replica", false);
  REQUIRE(tg->connect("vm/disk.raw", 4 << 20) == "");
  bool copied = false;
  CHECK(tg->copy_from(fd, 1 << 20, 1 << 20, 2 << 20, &copied) == "");  // the y's, to 2 MiB
  CHECK(copied);
  std::string got(1 << 20, '\0');
  REQUIRE(tg->pread(got.data(), got.size(), 2 << 20) == "");
  CHECK(got == std::string(1 << 20, 'y'));
  // 1 MiB asked from 2.5 MiB of a 3 MiB file: not copied, no error (the caller reads, pads
  // and writes the whole range itself).
  copied = true;
  CHECK(tg->copy_from(fd, (5 << 20) / 2, 1 << 20, 0, &copied) == "");
  CHECK_FALSE(copied);
  ::close(fd);
  tg->close();
}

TEST_CASE("range lock: overlapping ranges exclude each other, disjoint ones do not, across buckets", "[replicate]") {
  RangeLock rl(16);  // 64 KiB granules
  RangeLock::Guard a, b, c, d, e;
  REQUIRE(rl.try_lock(0, 4096, &a));
  CHECK_FALSE(rl.try_lock(4095, 2, &b));    // one byte in common
  CHECK_FALSE(b.held());
  CHECK(rl.try_lock(4096, 4096, &b));       // adjacent, same granule: no conflict
  CHECK(rl.try_lock(1 << 20, 1 << 20, &c)); // 16 granules further on
  // Spans every bucket (more granules than buckets): conflicts with c only at its bytes.
  CHECK_FALSE(rl.try_lock(8192, uint64_t(64) << 20, &d));
  CHECK_FALSE(d.held());
  c.release();
  CHECK(rl.try_lock(8192, uint64_t(64) << 20, &d));
  // Wrapping bucket order: granule 63 and granule 64 (bucket 0).
  CHECK_FALSE(rl.try_lock((uint64_t(63) << 16), uint64_t(2) << 16, &e));  // d holds these bytes
  d.release();
  CHECK(rl.try_lock((uint64_t(63) << 16), uint64_t(2) << 16, &e));
  CHECK_FALSE(rl.try_lock(0, 1, &c));  // a still there
  a.release();
  CHECK(rl.try_lock(0, 1, &c));
  // A range to the end of the address space (a truncate) conflicts with everything after it.
  RangeLock::Guard t;
  CHECK_FALSE(rl.try_lock(4096, UINT64_MAX - 4096, &t));
  b.release();
  e.release();
  CHECK(rl.try_lock(4096, UINT64_MAX - 4096, &t));
}

TEST_CASE("range lock: a waiter gets the range when the holder leaves, many threads stay consistent", "[replicate]") {
  RangeLock rl(12);
  // Each thread adds to counters under the ranges it holds; overlapping holders would race.
  std::vector<uint64_t> cells(64, 0);
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 5000; ++i) {
        const uint64_t a = rng() % 64, n = 1 + rng() % 8;
        const uint64_t b = std::min<uint64_t>(64, a + n);
        RangeLock::Guard g;
        rl.lock(a << 11, (b - a) << 11, &g);  // half-granules: neighbours share buckets
        for (uint64_t k = a; k < b; ++k) {
          const uint64_t v = cells[k];
          std::this_thread::yield();
          cells[k] = v + 1;
        }
      }
    });
  for (auto& th : ts) th.join();
  uint64_t sum = 0;
  for (uint64_t v : cells) sum += v;
  // Every increment survived: no two holders of a cell ever overlapped.
  std::mt19937 r0(0), r1(1), r2(2), r3(3);
  uint64_t want = 0;
  for (std::mt19937* r : {&r0, &r1, &r2, &r3})
    for (int i = 0; i < 5000; ++i) {
      const uint64_t a = (*r)() % 64, n = 1 + (*r)() % 8;
      want += std::min<uint64_t>(64, a + n) - a;
    }
  CHECK(sum == want);
}

using testing::GateLayer;

TEST_CASE("replicate async: overlapping writes in flight reach the journal in the image's order", "[replicate][filter]") {
  // B is journaled and then held before its local write; A, to the same bytes, comes next.
  // Without ordering A would be journaled after B but written locally before it: the image
  // would end with B and the replica with A. With it, A waits for B's range.
  Tmp tmp;
  GateLayer mem;
  mem.data.assign(1 << 20, 0);
  ::mkdir((tmp / "target").c_str(), 0755);
  ReplicateParams p;
  REQUIRE(parse_replicate(YAML::Load("target: " + (tmp / "target") + "\njournal: " + (tmp / "state") +
                                     "\nmode: async\nreconnect-max: 100ms\n"),
                          &p) == "");
  auto f = std::make_unique<ReplicateFilter>(p);
  f->set_next(&mem);
  REQUIRE(f->open(iofilterfs::DiskInfo{"vm/disk.img", "raw", false}).ok());
  REQUIRE(f->drain().ok());
  const std::string b(8192, 'B'), a(4096, 'A');
  std::thread tb([&] { CHECK(f->write(Io{}, b.data(), b.size(), 4096).ok()); });
  mem.wait_at_gate();
  std::atomic<bool> a_done{false};
  std::thread ta([&] {
    CHECK(f->write(Io{}, a.data(), a.size(), 8192).ok());
    a_done = true;
  });
  // Until A has either overtaken B (what happens without ordering) or waits for B's range.
  auto waits = [&] { return YAML::Load(f->stats_json())["overlap_waits"].as<uint64_t>(); };
  while (!a_done && waits() == 0) std::this_thread::yield();
  mem.open();
  tb.join();
  ta.join();
  REQUIRE(f->drain().ok());
  std::string local;
  {
    std::lock_guard<std::mutex> g(mem.mu);
    local.assign(mem.data.begin(), mem.data.end());
  }
  CHECK(local.substr(8192, 4096) == a);  // A came second, so it is what the image holds
  CHECK(slurp(tmp / "target/vm/disk.img") == local);
  f->shutdown();
  f->close();
}

namespace {

// Notes whether each guest read and write reached it with the caller's Deferrer.
struct DeferSeen : testing::MemLayer {
  std::vector<std::string> seen;  // under mu
  iofilterfs::Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override {
    if (io.defer) {
      std::lock_guard<std::mutex> g(mu);
      seen.push_back("read+defer");
    }
    return MemLayer::read(io, buf, len, off, got);
  }
  iofilterfs::Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    {
      std::lock_guard<std::mutex> g(mu);
      seen.push_back(io.defer ? "write+defer" : "write");
    }
    return MemLayer::write(io, buf, len, off);
  }
};

}  // namespace

TEST_CASE("replicate hands the Deferrer down with reads, and carries writes offered one on its own threads",
          "[replicate][filter][defer]") {
  for (const char* mode : {"mode: sync", "mode: async"}) {
    INFO(mode);
    RigOver<DeferSeen> rig;
    rig.mem.data.assign(1 << 20, 0);
    rig.open(mode);
    REQUIRE(rig.f->drain().ok());  // the initial sync
    rig.f->set_may_defer(true);    // the top of its chain
    auto seen = [&] {
      std::lock_guard<std::mutex> g(rig.mem.mu);
      std::vector<std::string> v = rig.mem.seen;
      rig.mem.seen.clear();
      return v;
    };
    using V = std::vector<std::string>;
    (void)seen();
    // A read passes through with it; a write whose Deferrer takes nothing runs here.
    testing::NoDeferrer none;
    Io io;
    io.defer = &none;
    char buf[8192];
    size_t got = 0;
    REQUIRE(rig.f->read(io, buf, sizeof buf, 4096, &got).ok());
    const std::string data = pattern(8192, 3);
    REQUIRE(rig.f->write(io, data.data(), data.size(), 4096).ok());
    CHECK(seen() == V{"read+defer", "write"});
    // A write offered a Deferrer that takes it: answered Deferred at once, then carried on
    // the filter's own thread, where it goes below with a Deferrer of that thread's (a
    // Waiter: a throttle there may park it, and the thread waits); the answer comes from there.
    const std::string two = pattern(8192, 4);
    testing::Carried c(two.size(), two.data());
    io.defer = &c;
    REQUIRE(rig.f->write(io, two.data(), two.size(), 65536).deferred());
    REQUIRE(c.wait());
    CHECK(c.answer.ok());
    CHECK(c.thread != std::this_thread::get_id());
    CHECK(seen() == V{"write+defer"});
    INFO(rig.f->stats_json());
    CHECK(rig.f->stats_json().find("\"requests_offloaded\":1,") != std::string::npos);
    // Released (a re-plumb or a close is under way): nothing is taken until defer_again().
    rig.f->release_deferred();
    testing::Carried c2(two.size(), two.data());
    io.defer = &c2;
    REQUIRE(rig.f->write(io, two.data(), two.size(), 131072).ok());
    CHECK_FALSE(c2.taken);
    rig.f->defer_again();
    testing::Carried c3(data.size(), data.data());
    io.defer = &c3;
    REQUIRE(rig.f->write(io, data.data(), data.size(), 196608).deferred());
    REQUIRE(c3.wait());
    CHECK(c3.answer.ok());
    REQUIRE(rig.f->drain().ok());
    CHECK(slurp(rig.replica()) == rig.local());
    CHECK(rig.local().substr(65536, 8192) == two);
    CHECK(rig.local().substr(196608, 8192) == data);
    rig.close();
  }
  CHECK(iofilterfs::Registry::instance().find("replicate")->passes_deferral);
}
