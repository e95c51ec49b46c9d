// The qcow2 layer against QEMU's own tools: images made by qemu-img and filled by qemu-io must
// read byte for byte as `qemu-img convert -O raw` says; images written through the layer must
// pass `qemu-img check` and compare equal to the bytes we meant to write. Crafted headers test
// that bad images are refused with a message, not crashed on.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

#include "format/file.h"
#include "shell.h"
#include "format/qcow2.h"

using namespace iofilterfs;
using namespace iofilterfs::format;

namespace {

struct Tmp : unit_shell::TempDir {
  Tmp() : TempDir("qcow2-test") {}
};

// Runs a shell command; returns its exit status, output in *out.
using unit_shell::must;
using unit_shell::run;
using unit_shell::slurp;

std::unique_ptr<Qcow2> open_image(const std::string& path, bool writable, std::string* err = nullptr) {
  std::string e;
  auto f = FdFile::open(path, writable, &e);
  if (!f) {
    if (err) *err = e;
    return nullptr;
  }
  Qcow2Options o;
  o.read_only = !writable;
  o.path = path;
  std::unique_ptr<Qcow2> q;
  Status s = Qcow2::open_owned(std::move(f), o, &q, &e);
  if (!s.ok()) {
    if (err) *err = e;
    return nullptr;
  }
  return q;
}

// Everything the layer reads, in odd-sized pieces so requests straddle clusters.
std::string read_all(Qcow2& q) {
  uint64_t size = 0;
  REQUIRE(q.size(&size).ok());
  std::string out(size, '\0');
  uint64_t off = 0;
  size_t piece = 3 * 4096 + 512;
  while (off < size) {
    size_t got = 0;
    size_t n = static_cast<size_t>(std::min<uint64_t>(piece, size - off));
    Status s = q.read(Io{}, out.data() + off, n, off, &got);
    INFO("read at " << off << ": " << (s.what ? s.what : ""));
    REQUIRE(s.ok());
    REQUIRE(got == n);
    off += n;
    piece = piece == 3 * 4096 + 512 ? 1 << 20 : 3 * 4096 + 512;
  }
  return out;
}

// qemu-img's raw rendering of the image.
std::string qemu_raw(const Tmp& t, const std::string& img) {
  std::string raw = t / "expected.raw";
  must("qemu-img convert -U -O raw " + img + " " + raw);
  std::string r = slurp(raw);
  ::unlink(raw.c_str());
  return r;
}

void check_clean(const std::string& img) {
  std::string out;
  int rc = run("qemu-img check " + img, &out);
  INFO(out);
  CHECK(rc == 0);
  CHECK(out.find("No errors were found") != std::string::npos);
  CHECK(out.find("leaked") == std::string::npos);
}

// A spread of writes with qemu-io: partial clusters, whole clusters, zeroes and discards.
std::string fill_cmds(uint64_t cs) {
  std::ostringstream c;
  c << " -c 'write -P 0x11 0 " << cs << "'";
  c << " -c 'write -P 0x22 " << cs + 512 << " 1536'";
  c << " -c 'write -P 0x33 " << 3 * cs - 1024 << " " << cs + 2048 << "'";
  c << " -c 'write -P 0x44 1M 64k'";
  c << " -c 'write -z " << 1048576 + 8192 << " 4096'";
  c << " -c 'write -P 0x55 3M 1M'";
  c << " -c 'write -z 3M " << std::max<uint64_t>(cs, 65536) << "'";
  c << " -c 'discard 3584k 256k'";
  c << " -c 'write -P 0x66 " << (6ull << 20) + 4096 << " 12288'";
  return c.str();
}

}  // namespace

TEST_CASE("qcow2 reads equal qemu-img convert across versions and cluster sizes", "[qcow2]") {
  struct Case {
    const char* opts;
    uint64_t cs;
  } cases[] = {
      {"compat=1.1,cluster_size=4k", 4096},
      {"compat=0.10,cluster_size=64k", 65536},
      {"compat=1.1,cluster_size=2M", 2u << 20},
      {"compat=1.1,cluster_size=64k,extended_l2=on", 65536},
      {"compat=1.1,cluster_size=512,refcount_bits=1", 512},
  };
  for (auto& c : cases) {
    DYNAMIC_SECTION(c.opts) {
      Tmp t;
      std::string img = t / "disk.qcow2";
      must("qemu-img create -q -f qcow2 -o " + std::string(c.opts) + " " + img + " 16M");
      must("qemu-io -f qcow2" + fill_cmds(c.cs) + " " + img + " >/dev/null");
      auto q = open_image(img, false);
      REQUIRE(q);
      CHECK(q->info().virtual_size == (16u << 20));
      std::string mine = read_all(*q);
      CHECK((mine == qemu_raw(t, img)));
    }
  }
}

TEST_CASE("qcow2 compressed clusters (deflate) read like qemu-img", "[qcow2]") {
  Tmp t;
  std::string src = t / "src.qcow2", img = t / "c.qcow2";
  must("qemu-img create -q -f qcow2 " + src + " 4M");
  must("qemu-io -f qcow2 -c 'write -P 0x5a 0 1M' -c 'write -P 0xa5 1536k 100k' -c 'write -P 0x07 3M 4k' " + src +
       " >/dev/null");
  must("qemu-img convert -c -O qcow2 " + src + " " + img);
  auto q = open_image(img, false);
  REQUIRE(q);
  CHECK((read_all(*q) == qemu_raw(t, img)));
}

TEST_CASE("qcow2 compressed clusters (zstd) read like qemu-img, and take writes", "[qcow2]") {
  Tmp t;
  std::string img = t / "z.qcow2";
  must("head -c 2M /dev/urandom > " + t / "src.raw" + " && truncate -s 6M " + t / "src.raw");
  must("qemu-io -f raw -c 'write -P 0x3c 3M 2M' " + t / "src.raw" + " >/dev/null");
  must("qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=64k " + t / "src.raw" + " " + img);
  must("qemu-img info " + img + " | grep -q 'compression type: zstd'");
  std::string expect = qemu_raw(t, img);
  {
    auto q = open_image(img, true);
    REQUIRE(q);
    CHECK((read_all(*q) == expect));
    std::string w(5000, '\x7e');
    REQUIRE(q->write(Io{}, w.data(), w.size(), (3u << 20) + 100).ok());  // COW of a zstd cluster
    std::memcpy(expect.data() + (3u << 20) + 100, w.data(), w.size());
    REQUIRE(q->sync(Io{}, false).ok());
  }
  check_clean(img);
  CHECK((qemu_raw(t, img) == expect));
}

TEST_CASE("qcow2 backing chains read through, relative names resolve against the image", "[qcow2]") {
  Tmp t;
  must("mkdir " + t / "sub");
  must("head -c 6M /dev/urandom > " + t / "base.raw");
  // raw base ← qcow2 middle (in sub/, names ../base.raw) ← qcow2 top (names sub/mid.qcow2)
  must("qemu-img create -q -f qcow2 -b ../base.raw -F raw " + t / "sub/mid.qcow2" + " 8M");
  must("qemu-io -f qcow2 -c 'write -P 0x77 1M 70k' " + t / "sub/mid.qcow2" + " >/dev/null");
  must("cd " + t.path + " && qemu-img create -q -f qcow2 -o cluster_size=16k -b sub/mid.qcow2 -F qcow2 top.qcow2 8M");
  must("qemu-io -f qcow2 -c 'write -P 0x88 1040k 4k' -c 'write -z 2M 64k' -c 'write -P 0x99 7M 8k' " +
       t / "top.qcow2" + " >/dev/null");
  auto q = open_image(t / "top.qcow2", false);
  REQUIRE(q);
  CHECK((read_all(*q) == qemu_raw(t, t / "top.qcow2")));
}

TEST_CASE("qcow2 backing chains that loop or escape the datastore are refused", "[qcow2]") {
  Tmp t;
  must("qemu-img create -q -f qcow2 " + t / "a.qcow2" + " 1M");
  must("qemu-img create -q -f qcow2 -u -b b.qcow2 -F qcow2 " + t / "x.qcow2" + " 1M");
  must("cp " + t / "x.qcow2" + " " + t / "a.qcow2");  // a → b
  must("qemu-img create -q -f qcow2 -u -b a.qcow2 -F qcow2 " + t / "b.qcow2" + " 1M");  // b → a
  std::string err;
  CHECK_FALSE(open_image(t / "a.qcow2", false, &err));
  CHECK(err.find("loops") != std::string::npos);

  must("qemu-img create -q -f qcow2 -u -b /etc/hostname -F raw " + t / "out.qcow2" + " 1M");
  auto f = FdFile::open(t / "out.qcow2", false, &err);
  REQUIRE(f);
  Qcow2Options o;
  o.read_only = true;
  o.path = t / "out.qcow2";
  o.backing_root = t.path;
  std::unique_ptr<Qcow2> q;
  CHECK_FALSE(Qcow2::open_owned(std::move(f), o, &q, &err).ok());
  CHECK(err.find("outside the datastore") != std::string::npos);
}

TEST_CASE("qcow2 with an internal snapshot reads the active layer", "[qcow2]") {
  Tmp t;
  std::string img = t / "s.qcow2";
  must("qemu-img create -q -f qcow2 -o cluster_size=4k " + img + " 4M");
  must("qemu-io -f qcow2 -c 'write -P 0x01 0 2M' " + img + " >/dev/null");
  must("qemu-img snapshot -c snap1 " + img);
  must("qemu-io -f qcow2 -c 'write -P 0x02 4k 8k' -c 'write -P 0x03 3M 4k' " + img + " >/dev/null");
  auto q = open_image(img, false);
  REQUIRE(q);
  CHECK(q->info().snapshots == 1);
  CHECK((read_all(*q) == qemu_raw(t, img)));
}

namespace {

// Random writes, zeroes and discards through the layer, mirrored in `expect`.
void random_workload(Qcow2& q, std::string& expect, uint32_t seed, int ops, bool discards) {
  std::mt19937_64 rng(seed);
  const uint64_t size = expect.size();
  std::string buf;
  for (int i = 0; i < ops; ++i) {
    uint64_t len = 1 + rng() % (200 * 1024);
    if (rng() % 3 == 0) len = (rng() % 16 + 1) * 4096;
    uint64_t off = rng() % (size - len);
    if (rng() % 2) off &= ~4095ull;
    int kind = discards ? static_cast<int>(rng() % 8) : 0;
    if (kind == 7) {
      REQUIRE(q.fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len).ok());
      std::memset(expect.data() + off, 0, len);
    } else if (kind == 6) {
      REQUIRE(q.fallocate(Io{}, FALLOC_FL_ZERO_RANGE, off, len).ok());
      std::memset(expect.data() + off, 0, len);
    } else {
      buf.resize(len);
      char c = static_cast<char>(rng());
      for (uint64_t k = 0; k < len; ++k) buf[k] = static_cast<char>(c + k / 512);
      Status s = q.write(Io{}, buf.data(), len, off);
      INFO(s.what);
      REQUIRE(s.ok());
      std::memcpy(expect.data() + off, buf.data(), len);
    }
    if (i % 17 == 0) REQUIRE(q.sync(Io{}, false).ok());
  }
  REQUIRE(q.sync(Io{}, false).ok());
}

}  // namespace

TEST_CASE("qcow2 writes pass qemu-img check and compare equal", "[qcow2]") {
  struct Case {
    const char* name;
    const char* opts;
    bool backing;
    bool snapshot;
    bool compressed;
  } cases[] = {
      {"v3 4k", "compat=1.1,cluster_size=4k", false, false, false},
      {"v2 64k", "compat=0.10,cluster_size=64k", false, false, false},
      {"v3 512-byte clusters grow the refcount table", "compat=1.1,cluster_size=512", false, false, false},
      {"extended L2 over a backing file", "compat=1.1,cluster_size=64k,extended_l2=on", true, false, false},
      {"v2 over a backing file", "compat=0.10,cluster_size=4k", true, false, false},
      {"v3 with an internal snapshot", "compat=1.1,cluster_size=4k", false, true, false},
      {"compressed image", "compat=1.1,cluster_size=64k", false, false, true},
      {"refcount_bits=2 with a snapshot", "compat=1.1,cluster_size=4k,refcount_bits=2", false, true, false},
  };
  for (auto& c : cases) {
    DYNAMIC_SECTION(c.name) {
      Tmp t;
      std::string img = t / "w.qcow2";
      const uint64_t size = 12u << 20;
      std::string backing_opt;
      if (c.backing) {
        must("head -c 12M /dev/urandom > " + t / "base.raw");
        backing_opt = " -b base.raw -F raw";
      }
      if (c.compressed) {
        must("head -c 12M /dev/urandom > " + t / "src.raw");
        must("qemu-img convert -c -O qcow2 -o " + std::string(c.opts) + " " + t / "src.raw" + " " + img);
      } else {
        must("cd " + t.path + " && qemu-img create -q -f qcow2 -o " + c.opts + backing_opt + " w.qcow2 12M");
        must("qemu-io -f qcow2 -c 'write -P 0x42 0 3M' -c 'write -P 0x43 5M 64k' " + img + " >/dev/null");
      }
      if (c.snapshot) must("qemu-img snapshot -c before " + img);
      std::string expect = qemu_raw(t, img);
      REQUIRE(expect.size() == size);
      {
        auto q = open_image(img, true);
        REQUIRE(q);
        random_workload(*q, expect, 42, 120, true);
        CHECK((read_all(*q) == expect));
      }
      check_clean(img);
      CHECK((qemu_raw(t, img) == expect));
      if (c.snapshot) {  // the snapshot still holds the old bytes
        must("qemu-img snapshot -a before " + img);
        auto q = open_image(img, false);
        REQUIRE(q);
        size_t got = 0;
        std::string b(4096, '\0');
        REQUIRE(q->read(Io{}, b.data(), b.size(), 0, &got).ok());
        CHECK(b == std::string(4096, '\x42'));
      }
    }
  }
}

TEST_CASE("qcow2 growth moves the L1 table and qemu-io reads the patterns back", "[qcow2]") {
  Tmp t;
  std::string img = t / "g.qcow2";
  must("qemu-img create -q -f qcow2 -o cluster_size=4k " + img + " 4M");
  {
    auto q = open_image(img, true);
    REQUIRE(q);
    std::string a(8192, '\xab');
    REQUIRE(q->write(Io{}, a.data(), a.size(), 4096).ok());
    CHECK(q->write(Io{}, a.data(), a.size(), 4u << 20).err == ENOSPC);  // past the end
    REQUIRE(q->resize(Io{}, 3ull << 30).ok());  // 1536 L1 entries: three clusters, a new table
    std::string b(4096, '\xcd');
    REQUIRE(q->write(Io{}, b.data(), b.size(), (3ull << 30) - 4096).ok());
    REQUIRE(q->sync(Io{}, false).ok());
    CHECK(q->resize(Io{}, 1u << 20).err == EOPNOTSUPP);
    uint64_t r = 0;
    REQUIRE(q->seek(Io{}, 0, SEEK_DATA, &r).ok());
    CHECK(r == 4096);
    REQUIRE(q->seek(Io{}, 4096, SEEK_HOLE, &r).ok());
    CHECK(r == 12288);
    REQUIRE(q->seek(Io{}, 12288, SEEK_DATA, &r).ok());
    CHECK(r == (3ull << 30) - 4096);
  }
  check_clean(img);
  std::string out;
  must("qemu-img info " + img + " | grep -q 'virtual size: 3 GiB'");
  must("qemu-io -f qcow2 -c 'read -P 0xab 4k 8k' -c 'read -P 0xcd 3145724k 4k' -c 'read -P 0 0 4k' " + img +
       " | grep -vq 'Pattern verification failed'");
  CHECK(run("qemu-io -f qcow2 -c 'read -P 0xab 4k 8k' -c 'read -P 0xcd 3145724k 4k' " + img + " | grep -q failed") != 0);
}

// ---- dirty images and cluster reuse -----------------------------------------------------------

namespace {

bool dirty_bit(const std::string& img) {
  std::string h = slurp(img).substr(0, 80);
  return h.size() == 80 && (h[79] & 1);
}

uint64_t file_size(const std::string& p) {
  struct stat st {};
  REQUIRE(::stat(p.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace

TEST_CASE("qcow2 left dirty by a killed qemu-io (lazy refcounts) is repaired at the first write", "[qcow2]") {
  Tmp t;
  for (const char* opts : {"cluster_size=64k", "cluster_size=4k,refcount_bits=4", "cluster_size=64k,extended_l2=on"}) {
    DYNAMIC_SECTION(opts) {
      std::string img = t / "d.qcow2";
      must("rm -f " + img + " && qemu-img create -q -f qcow2 -o lazy_refcounts=on," + opts + " " + img + " 32M");
      must("qemu-io -f qcow2 -c 'write -P 0x11 0 1M' " + img + " >/dev/null");
      must("qemu-img snapshot -c s1 " + img);  // shared clusters: counts of 2 to rebuild
      // The process dies with its refcount updates unwritten: the image stays dirty.
      run("qemu-io -f qcow2 -c 'write -P 0x22 512k 1M' -c 'write -P 0x33 9M 300k' -c 'sigraise 9' " + img);
      REQUIRE(dirty_bit(img));
      const std::string before = qemu_raw(t, img);
      {
        auto q = open_image(img, true);
        REQUIRE(q);
        CHECK_FALSE(q->read_only());
        CHECK(read_all(*q) == before);  // reads need no repair
        std::string w(8192, '\x44');
        Status s = q->write(Io{}, w.data(), w.size(), 20u << 20);
        INFO((s.what ? s.what : "") << " " << q->info().read_only_reason);
        REQUIRE(s.ok());
        REQUIRE(q->sync(Io{}, false).ok());
      }
      CHECK_FALSE(dirty_bit(img));
      check_clean(img);
      must("qemu-io -f qcow2 -c 'read -P 0x11 0 512k' -c 'read -P 0x22 512k 1M' -c 'read -P 0x33 9M 300k' "
           "-c 'read -P 0x44 20M 8k' " + img + " | grep -vq failed");
      CHECK(run("qemu-io -f qcow2 -c 'read -P 0x11 0 512k' -c 'read -P 0x22 512k 1M' -c 'read -P 0x33 9M 300k' "
                "-c 'read -P 0x44 20M 8k' " + img + " | grep -q failed") != 0);
      // The snapshot still reads as it was taken.
      must("qemu-img convert -l snapshot.name=s1 -O raw " + img + " " + t / "s1.raw");
      must("qemu-io -f raw -c 'read -P 0x11 0 1M' -c 'read -P 0 1M 31M' " + t / "s1.raw" + " | grep -vq failed");
    }
  }
}

TEST_CASE("qcow2 dirty image with its refcounts wiped is recounted from its tables", "[qcow2]") {
  Tmp t;
  std::string img = t / "w.qcow2";
  must("qemu-img create -q -f qcow2 -o cluster_size=64k " + img + " 16M");
  must("qemu-io -f qcow2 -c 'write -P 0x51 0 3M' " + img + " >/dev/null");
  must("qemu-img snapshot -c s1 " + img);
  must("qemu-io -f qcow2 -c 'write -P 0x52 1M 64k' " + img + " >/dev/null");
  // Zero the first refcount block (the table's first entry says where) and set the dirty bit.
  {
    std::string b = slurp(img);
    auto be64 = [&](size_t o) {
      uint64_t v = 0;
      for (int i = 0; i < 8; ++i) v = v << 8 | static_cast<uint8_t>(b[o + i]);
      return v;
    };
    uint64_t rt = be64(48), rb = be64(rt);
    REQUIRE(rb);
    std::fill(b.begin() + static_cast<long>(rb), b.begin() + static_cast<long>(rb + 65536), '\0');
    b[79] |= 1;
    std::ofstream f(img, std::ios::binary | std::ios::trunc);
    f.write(b.data(), static_cast<std::streamsize>(b.size()));
  }
  const std::string before = qemu_raw(t, img);
  {
    auto q = open_image(img, true);
    REQUIRE(q);
    std::string w(4096, '\x53');
    REQUIRE(q->write(Io{}, w.data(), w.size(), 0).ok());  // COW of a cluster the snapshot shares
    std::memcpy(const_cast<char*>(before.data()), w.data(), w.size());
  }
  check_clean(img);
  CHECK(qemu_raw(t, img) == before);
}

TEST_CASE("qcow2 freed clusters are reused: write, discard, write again does not grow the file", "[qcow2]") {
  Tmp t;
  for (const char* opts : {"compat=1.1", "compat=0.10", "extended_l2=on,cluster_size=128k"}) {
    DYNAMIC_SECTION(opts) {
      std::string img = t / "r.qcow2";
      must("rm -f " + img + " && qemu-img create -q -f qcow2 -o " + std::string(opts) + " " + img + " 64M");
      std::string expect(64u << 20, '\0');
      {
        auto q = open_image(img, true);
        REQUIRE(q);
        std::string w(4u << 20, '\x61');
        REQUIRE(q->write(Io{}, w.data(), w.size(), 0).ok());
        REQUIRE(q->sync(Io{}, false).ok());
        const uint64_t grown = file_size(img);
        for (int round = 0; round < 4; ++round) {
          const uint64_t from = (round % 2 ? 0 : 8ull << 20), to = (round % 2 ? 8ull << 20 : 0);
          REQUIRE(q->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, from, 4u << 20).ok());
          REQUIRE(q->sync(Io{}, false).ok());
          std::string v(4u << 20, static_cast<char>(0x62 + round));
          REQUIRE(q->write(Io{}, v.data(), v.size() - 1000, to + 1000).ok());  // partial clusters too
          REQUIRE(q->sync(Io{}, false).ok());
          std::memset(expect.data() + from, 0, 4u << 20);
          std::memcpy(expect.data() + to + 1000, v.data(), v.size() - 1000);
          CHECK(file_size(img) == grown);
        }
      }
      check_clean(img);
      CHECK(qemu_raw(t, img) == expect);
    }
  }
}

namespace {

// Where each guest offset lives in the image file, per one qemu-img map (-1: nowhere).
std::vector<int64_t> host_offsets(const std::string& img, const std::vector<uint64_t>& guests) {
  std::string list;
  for (uint64_t g : guests) list += std::to_string(g) + ",";
  std::string out;
  REQUIRE(run("qemu-img map -U --output=json " + img + " | python3 -c \"import json,sys\n"
              "m=json.load(sys.stdin)\n"
              "for g in [" + list + "]:\n"
              "  print(next((e['offset']+g-e['start'] for e in m if e['start']<=g<e['start']+e['length'] and 'offset' in e), -1))\"",
              &out) == 0);
  std::vector<int64_t> r;
  std::istringstream in(out);
  for (int64_t v; in >> v;) r.push_back(v);
  REQUIRE(r.size() == guests.size());
  return r;
}

int64_t host_offset(const std::string& img, uint64_t guest) { return host_offsets(img, {guest})[0]; }

}  // namespace

TEST_CASE("qcow2 allocation after an open starts at the end of the file, old free clusters are found a block at a time", "[qcow2]") {
  // 4 KiB clusters, 16-bit counts: one refcount block covers 2048 clusters (8 MiB of file).
  Tmp t;
  std::string img = t / "h.qcow2";
  must("qemu-img create -q -f qcow2 -o cluster_size=4k " + img + " 128M");
  must("qemu-io -f qcow2 -c 'write -P 0x11 0 64M' " + img + " >/dev/null");
  const int64_t hole = host_offset(img, 40u << 20);
  REQUIRE(hole > (32 << 20));  // five refcount blocks' ranges in: a scan from cluster 1 would find it first
  must("qemu-io -f qcow2 -c 'discard 40M 64k' " + img + " >/dev/null");
  check_clean(img);  // the 16 clusters are free (count 0), not leaked
  const uint64_t end_at_open = file_size(img);
  {
    auto q = open_image(img, true);
    REQUIRE(q);
    std::string w(4096, '\x77');
    // The first allocations (an L2 table, a data cluster) go past the end as opened: no walk
    // of the counts from cluster 1.
    REQUIRE(q->write(Io{}, w.data(), w.size(), 100u << 20).ok());
    REQUIRE(q->sync(Io{}, false).ok());
    CHECK(static_cast<uint64_t>(host_offset(img, 100u << 20)) >= end_at_open);
    // Each allocation looks at one more block of the old file: the hole is reached and reused.
    for (int k = 1; k <= 40; ++k) REQUIRE(q->write(Io{}, w.data(), w.size(), (100u << 20) + k * 4096ull).ok());
    REQUIRE(q->sync(Io{}, false).ok());
  }
  std::vector<uint64_t> guests;
  for (int k = 1; k <= 40; ++k) guests.push_back((100u << 20) + k * 4096ull);
  int in_hole = 0;
  for (int64_t h : host_offsets(img, guests)) in_hole += h >= hole && h < hole + 65536;
  CHECK(in_hole == 16);
  check_clean(img);
  must("qemu-io -f qcow2 -c 'read -P 0x77 100M 164k' -c 'read -P 0x11 0 40M' -c 'read -P 0 40M 64k' " + img +
       " | grep -vq failed");
  CHECK(run("qemu-io -f qcow2 -c 'read -P 0x77 100M 164k' -c 'read -P 0x11 0 40M' " + img + " | grep -q failed") != 0);
}

// ---- crafted images ----------------------------------------------------------------------------

namespace {

void put_be32(std::string& s, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) s[off + i] = static_cast<char>(v >> (24 - 8 * i));
}
void put_be64(std::string& s, size_t off, uint64_t v) {
  put_be32(s, off, static_cast<uint32_t>(v >> 32));
  put_be32(s, off + 4, static_cast<uint32_t>(v));
}

// A valid v3 image of 64 KiB clusters, 1 MiB virtual: header, refcount table @64K,
// refcount block @128K, L1 @192K, L2 @256K mapping guest cluster 0 to host @320K.
std::string good_image() {
  std::string s(384 * 1024, '\0');
  s.replace(0, 4, "QFI\xfb");
  put_be32(s, 4, 3);
  put_be32(s, 20, 16);
  put_be64(s, 24, 1 << 20);
  put_be32(s, 36, 1);
  put_be64(s, 40, 192 * 1024);
  put_be64(s, 48, 64 * 1024);
  put_be32(s, 56, 1);
  put_be32(s, 96, 4);
  put_be32(s, 100, 104);
  put_be64(s, 64 * 1024, 128 * 1024);
  for (int c = 0; c < 6; ++c) put_be32(s, 128 * 1024 + 2 * c, 0), s[128 * 1024 + 2 * c + 1] = 1;
  put_be64(s, 192 * 1024, (256 * 1024) | (1ull << 63));
  put_be64(s, 256 * 1024, (320 * 1024) | (1ull << 63));
  std::fill(s.begin() + 320 * 1024, s.end(), 'D');
  return s;
}

std::string open_err(const Tmp& t, const std::string& bytes, std::unique_ptr<Qcow2>* keep = nullptr) {
  std::string p = t / "crafted.qcow2";
  {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  std::string err;
  auto q = open_image(p, false, &err);
  if (keep) *keep = std::move(q);
  return q || (keep && *keep) ? "" : err;
}

}  // namespace

TEST_CASE("crafted qcow2 images: the valid one opens and reads", "[qcow2]") {
  Tmp t;
  std::unique_ptr<Qcow2> q;
  REQUIRE(open_err(t, good_image(), &q).empty());
  REQUIRE(q);
  std::string b(65536 + 10, '\0');
  size_t got = 0;
  REQUIRE(q->read(Io{}, b.data(), b.size(), 0, &got).ok());
  CHECK(b.substr(0, 65536) == std::string(65536, 'D'));
  CHECK(b.substr(65536) == std::string(10, '\0'));
}

TEST_CASE("crafted qcow2 images with bad headers are refused with a reason", "[qcow2]") {
  Tmp t;
  struct Bad {
    const char* name;
    std::function<void(std::string&)> edit;
    const char* msg;
  } bad[] = {
      {"bad magic", [](std::string& s) { s[0] = 'X'; }, "bad magic"},
      {"version 4", [](std::string& s) { put_be32(s, 4, 4); }, "version"},
      {"cluster_bits 30", [](std::string& s) { put_be32(s, 20, 30); }, "cluster_bits"},
      {"absurd size", [](std::string& s) { put_be64(s, 24, ~0ull); }, "absurd"},
      {"L1 too small", [](std::string& s) { put_be64(s, 24, 1ull << 40); }, "L1 table too small"},
      {"absurd L1", [](std::string& s) { put_be32(s, 36, 0x7fffffff); }, "absurd"},
      {"L1 past EOF", [](std::string& s) { put_be64(s, 40, 1ull << 40); }, "past the end"},
      {"L1 in header", [](std::string& s) { put_be64(s, 40, 0); }, "overlaps the header"},
      {"refcount table overlaps L1", [](std::string& s) { put_be64(s, 48, 192 * 1024); }, "overlap"},
      {"refcount table absurd", [](std::string& s) { put_be32(s, 56, 0xffffffff); }, "refcount table"},
      {"unknown incompatible feature", [](std::string& s) { s[79] = static_cast<char>(0x80); }, "incompatible"},
      {"external data file", [](std::string& s) { s[79] = 4; }, "external data"},
      {"encrypted", [](std::string& s) { put_be32(s, 32, 1); }, "encrypted"},
      {"header_length odd", [](std::string& s) { put_be32(s, 100, 105); }, "header_length"},
      {"refcount_order 7", [](std::string& s) { put_be32(s, 96, 7); }, "refcount_order"},
      {"backing name outside cluster", [](std::string& s) { put_be64(s, 8, 65530); put_be32(s, 16, 100); },
       "backing file name"},
      {"absurd snapshot count", [](std::string& s) { put_be32(s, 60, 0x10000000); }, "snapshots"},
      {"truncated", [](std::string& s) { s.resize(40); }, "too short"},
  };
  for (auto& b : bad) {
    DYNAMIC_SECTION(b.name) {
      std::string img = good_image();
      b.edit(img);
      std::string err = open_err(t, img);
      INFO(err);
      CHECK(!err.empty());
      CHECK(err.find(b.msg) != std::string::npos);
    }
  }
}

TEST_CASE("crafted qcow2 images with bad tables fail their reads, not the process", "[qcow2]") {
  Tmp t;
  SECTION("an L2 table on the refcount table") {
    std::string img = good_image();
    put_be64(img, 192 * 1024, (64 * 1024) | (1ull << 63));
    std::unique_ptr<Qcow2> q;
    REQUIRE(open_err(t, img, &q).empty());
    char b[512];
    size_t got = 0;
    CHECK(q->read(Io{}, b, sizeof b, 0, &got).err == EIO);
    CHECK(q->corrupt());
  }
  SECTION("a data cluster in the header") {
    std::string img = good_image();
    put_be64(img, 256 * 1024, 0x200 | (1ull << 63));
    std::unique_ptr<Qcow2> q;
    REQUIRE(open_err(t, img, &q).empty());
    char b[512];
    size_t got = 0;
    CHECK(q->read(Io{}, b, sizeof b, 0, &got).err == EIO);
  }
  SECTION("an L2 table past the end of the file") {
    std::string img = good_image();
    put_be64(img, 192 * 1024, (1ull << 40) | (1ull << 63));
    std::unique_ptr<Qcow2> q;
    REQUIRE(open_err(t, img, &q).empty());
    char b[512];
    size_t got = 0;
    CHECK(q->read(Io{}, b, sizeof b, 0, &got).err == EIO);
  }
  SECTION("a data cluster on top of the L1 table is not written") {
    std::string img = good_image();
    put_be64(img, 256 * 1024, (192 * 1024) | (1ull << 63));
    std::string p = t / "meta.qcow2";
    {
      std::ofstream f(p, std::ios::binary);
      f.write(img.data(), static_cast<std::streamsize>(img.size()));
    }
    {
      auto q = open_image(p, true);
      REQUIRE(q);
      std::string w(512, 'W');
      CHECK(q->write(Io{}, w.data(), w.size(), 0).err == EIO);
    }
    CHECK(slurp(p) == img);  // not one byte changed
  }
  SECTION("a garbage compressed cluster") {
    std::string img = good_image();
    put_be64(img, 256 * 1024, (1ull << 62) | (320 * 1024));
    std::unique_ptr<Qcow2> q;
    REQUIRE(open_err(t, img, &q).empty());
    char b[512];
    size_t got = 0;
    CHECK(q->read(Io{}, b, sizeof b, 0, &got).err == EIO);
  }
  SECTION("a dirty image opens writable and is repaired at its first write") {
    std::string img = good_image();
    img[79] = 1;
    std::string p = t / "dirty.qcow2";
    {
      std::ofstream f(p, std::ios::binary);
      f.write(img.data(), static_cast<std::streamsize>(img.size()));
    }
    {
      auto q = open_image(p, true);
      REQUIRE(q);
      CHECK_FALSE(q->read_only());
      char b[512] = {};
      REQUIRE(q->write(Io{}, b, sizeof b, 0).ok());
    }
    CHECK((slurp(p)[79] & 1) == 0);
    check_clean(p);
  }
  SECTION("a dirty image whose tables point past the end stays read-only, unchanged") {
    std::string img = good_image();
    img[79] = 1;
    put_be64(img, 256 * 1024 + 8, (1ull << 40) | (1ull << 63));
    std::string p = t / "dirtybad.qcow2";
    {
      std::ofstream f(p, std::ios::binary);
      f.write(img.data(), static_cast<std::streamsize>(img.size()));
    }
    {
      auto q = open_image(p, true);
      REQUIRE(q);
      char b[512] = {};
      CHECK_FALSE(q->write(Io{}, b, sizeof b, 0).ok());
      CHECK(q->read_only());
      CHECK(q->info().read_only_reason.find("past the end") != std::string::npos);
    }
    CHECK(slurp(p) == img);
  }

}
