// The VMDK layer against QEMU's tools: every subformat qemu-img makes reads as `qemu-img
// convert -O raw` does; writes to the sparse and flat kinds compare equal afterwards and pass
// `qemu-img check`; streamOptimized refuses writes; crafted headers are refused.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

#include "format/file.h"
#include "shell.h"
#include "format/vmdk.h"

using namespace iofilterfs;
using namespace iofilterfs::format;

namespace {

struct Tmp : unit_shell::TempDir {
  Tmp() : TempDir("vmdk-test") {}
};

using unit_shell::must;
using unit_shell::run;
using unit_shell::slurp;

struct Opened {
  std::unique_ptr<FdFile> file;
  std::unique_ptr<Vmdk> v;
  std::string err;
};

Opened open_vmdk(const std::string& path, bool writable) {
  Opened o;
  o.file = FdFile::open(path, writable, &o.err);
  if (!o.file) return o;
  VmdkOptions vo;
  vo.read_only = !writable;
  vo.path = path;
  if (!Vmdk::open(o.file.get(), vo, &o.v, &o.err).ok()) o.v.reset();
  return o;
}

std::string read_all(Vmdk& v) {
  uint64_t size = 0;
  REQUIRE(v.size(&size).ok());
  std::string out(size, '\0');
  for (uint64_t off = 0; off < size;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(300 * 1024 + 512, size - off));
    size_t got = 0;
    Status s = v.read(Io{}, out.data() + off, n, off, &got);
    INFO(s.what);
    REQUIRE(s.ok());
    REQUIRE(got == n);
    off += n;
  }
  return out;
}

std::string qemu_raw(const Tmp& t, const std::string& img) {
  must("qemu-img convert -U -f vmdk -O raw " + img + " " + t / "expect.raw");
  std::string r = slurp(t / "expect.raw");
  ::unlink((t / "expect.raw").c_str());
  return r;
}

const char* kFill =
    " -c 'write -P 0x11 0 4k' -c 'write -P 0x22 70k 100k' -c 'write -P 0x33 3M 1M' -c 'write -z 3M 64k'"
    " -c 'write -P 0x44 12582912 8k'";

}  // namespace

TEST_CASE("vmdk subformats read like qemu-img convert", "[vmdk]") {
  for (const char* sub : {"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"}) {
    DYNAMIC_SECTION(sub) {
      Tmp t;
      std::string img = t / "d.vmdk";
      must("qemu-img create -q -f vmdk -o subformat=" + std::string(sub) + " " + img + " 16M");
      must("qemu-io -f vmdk" + std::string(kFill) + " " + img + " >/dev/null");
      Opened o = open_vmdk(img, false);
      INFO(o.err);
      REQUIRE(o.v);
      CHECK(o.v->create_type() == sub);
      CHECK((read_all(*o.v) == qemu_raw(t, img)));
    }
  }
  SECTION("streamOptimized") {
    Tmp t;
    must("head -c 5M /dev/urandom > " + t / "a.raw" + " && truncate -s 16M " + t / "a.raw");
    must("qemu-io -f raw -c 'write -P 0x55 9M 33k' " + t / "a.raw" + " >/dev/null");
    std::string img = t / "s.vmdk";
    must("qemu-img convert -f raw -O vmdk -o subformat=streamOptimized " + t / "a.raw" + " " + img);
    Opened o = open_vmdk(img, true);
    INFO(o.err);
    REQUIRE(o.v);
    CHECK(o.v->read_only());
    CHECK(o.v->read_only_reason().find("streamOptimized") != std::string::npos);
    CHECK((read_all(*o.v) == slurp(t / "a.raw")));
    char b[512] = {};
    CHECK(o.v->write(Io{}, b, sizeof b, 0).err == EROFS);
  }
}

TEST_CASE("vmdk SEEK_DATA and SEEK_HOLE follow the grain map as qemu-img map does", "[vmdk]") {
  for (const char* sub : {"monolithicSparse", "twoGbMaxExtentSparse"}) {
    DYNAMIC_SECTION(sub) {
      Tmp t;
      std::string img = t / "m.vmdk";
      must("qemu-img create -q -f vmdk -o subformat=" + std::string(sub) + " " + img + " 16M");
      must("qemu-io -f vmdk" + std::string(kFill) + " " + img + " >/dev/null");
      std::string ours;
      {
        Opened o = open_vmdk(img, false);
        INFO(o.err);
        REQUIRE(o.v);
        uint64_t pos = 0, size = o.v->virtual_size();
        while (pos < size) {
          uint64_t d = 0, h = 0;
          Status s = o.v->seek(Io{}, pos, SEEK_DATA, &d);
          if (s.err == ENXIO) break;
          REQUIRE(s.ok());
          REQUIRE(o.v->seek(Io{}, d, SEEK_HOLE, &h).ok());
          REQUIRE(h > d);
          ours += std::to_string(d) + "-" + std::to_string(h) + "\n";
          pos = h;
        }
        uint64_t r = 0;
        CHECK(o.v->seek(Io{}, size, SEEK_DATA, &r).err == ENXIO);
      }
      must("qemu-img map -f vmdk --output=json " + img + " > " + t / "map.json");
      must("python3 -c \"import json; m=json.load(open('" + t / "map.json" + "')); out=[]\n"
           "for e in m:\n"
           "  if not e['data'] or e.get('zero'): continue\n"
           "  if out and out[-1][1]==e['start']: out[-1][1]+=e['length']\n"
           "  else: out.append([e['start'], e['start']+e['length']])\n"
           "open('" + t / "map.txt" + "','w').write(''.join('%d-%d\\n'%(a,b) for a,b in out))\"");
      CHECK(ours == slurp(t / "map.txt"));
      CHECK(!ours.empty());
    }
  }
}

TEST_CASE("vmdk writes to sparse and flat kinds compare equal and check clean", "[vmdk]") {
  for (const char* sub : {"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse"}) {
    DYNAMIC_SECTION(sub) {
      Tmp t;
      std::string img = t / "w.vmdk";
      must("qemu-img create -q -f vmdk -o subformat=" + std::string(sub) + " " + img + " 16M");
      must("qemu-io -f vmdk" + std::string(kFill) + " " + img + " >/dev/null");
      std::string expect = qemu_raw(t, img);
      {
        Opened o = open_vmdk(img, true);
        INFO(o.err);
        REQUIRE(o.v);
        std::mt19937_64 rng(7);
        std::string buf;
        for (int i = 0; i < 80; ++i) {
          uint64_t len = 1 + rng() % (150 * 1024);
          uint64_t off = rng() % (expect.size() - len);
          buf.assign(len, static_cast<char>(rng()));
          for (uint64_t k = 0; k < len; k += 97) buf[k] = static_cast<char>(k);
          REQUIRE(o.v->write(Io{}, buf.data(), len, off).ok());
          std::memcpy(expect.data() + off, buf.data(), len);
          if (i % 13 == 0) REQUIRE(o.v->sync(Io{}, false).ok());
        }
        REQUIRE(o.v->sync(Io{}, false).ok());
        CHECK((read_all(*o.v) == expect));
      }
      std::string out;
      int rc = run("qemu-img check -f vmdk " + img, &out);
      INFO(out);
      CHECK(rc == 0);
      CHECK((qemu_raw(t, img) == expect));
    }
  }
}

TEST_CASE("crafted vmdk headers are refused with a reason", "[vmdk]") {
  Tmp t;
  std::string img = t / "c.vmdk";
  must("qemu-img create -q -f vmdk " + img + " 4M");
  const std::string good = slurp(img);
  struct Bad {
    const char* name;
    size_t off;
    uint64_t value;
    int bytes;
    const char* msg;
  } bad[] = {
      {"version 9", 4, 9, 4, "version"},
      {"capacity absurd", 12, ~0ull, 8, "capacity"},
      {"grain size 3", 20, 3, 8, "grain size"},
      {"grain table size 0", 44, 0, 4, "grain table size"},
      {"GD past EOF", 56, 1ull << 40, 8, "grain directory"},
  };
  for (auto& b : bad) {
    DYNAMIC_SECTION(b.name) {
      std::string s = good;
      for (int i = 0; i < b.bytes; ++i) s[b.off + i] = static_cast<char>(b.value >> (8 * i));
      for (const char* f : {"rgd", "plain"}) {
        if (std::string(f) == "plain") s[8] &= ~2;  // without the redundant directory too
        std::ofstream(img, std::ios::binary | std::ios::trunc).write(s.data(), static_cast<std::streamsize>(s.size()));
        Opened o = open_vmdk(img, false);
        INFO(f << ": " << o.err);
        CHECK(!o.v);
        CHECK(o.err.find(b.msg) != std::string::npos);
      }
    }
  }
  SECTION("a descriptor naming an extent outside the datastore") {
    std::string d = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n"
                    "RW 8 FLAT \"/etc/hostname\" 0\n";
    std::ofstream(t / "x.vmdk", std::ios::binary).write(d.data(), static_cast<std::streamsize>(d.size()));
    std::string err;
    auto f = FdFile::open(t / "x.vmdk", false, &err);
    REQUIRE(f);
    VmdkOptions vo;
    vo.read_only = true;
    vo.path = t / "x.vmdk";
    vo.backing_root = t.path;
    std::unique_ptr<Vmdk> v;
    CHECK_FALSE(Vmdk::open(f.get(), vo, &v, &err).ok());
    CHECK(err.find("outside the datastore") != std::string::npos);
  }
}

namespace {

// The file under a Vmdk that stops taking changes after `budget` of them (writes, resizes,
// syncs), as if the machine died there: what is on disk is what a crash at that point leaves.
class DyingFile final : public Layer {
 public:
  DyingFile(Layer* below, int budget) : below_(below), budget_(budget) {}
  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override {
    return below_->read(io, buf, len, off, got);
  }
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    return spend() ? below_->write(io, buf, len, off) : Status::Error(EIO, "died");
  }
  Status sync(const Io& io, bool d) override { return spend() ? below_->sync(io, d) : Status::Error(EIO, "died"); }
  Status resize(const Io& io, uint64_t s) override {
    return spend() ? below_->resize(io, s) : Status::Error(EIO, "died");
  }
  Status fallocate(const Io& io, int m, uint64_t o, uint64_t l) override {
    return spend() ? below_->fallocate(io, m, o, l) : Status::Error(EIO, "died");
  }
  Status seek(const Io& io, uint64_t off, int w, uint64_t* r) override { return below_->seek(io, off, w, r); }
  Status size(uint64_t* out) override { return below_->size(out); }
  bool died() const { return budget_ < 0; }

 private:
  bool spend() { return --budget_ >= 0; }
  Layer* below_;
  int budget_;
};

// Compares the Vmdk with `qemu-img convert -O raw` of its image, 8 MiB at a time (the grown
// disks are gigabytes, mostly holes).
// Byte ranges [start, end) holding data in [0, size): from a file's SEEK_DATA/SEEK_HOLE (fd >= 0) or
// from our image's seek (fd < 0).
std::vector<std::pair<uint64_t, uint64_t>> data_ranges(int fd, Vmdk* v, uint64_t size) {
  std::vector<std::pair<uint64_t, uint64_t>> r;
  uint64_t pos = 0;
  while (pos < size) {
    uint64_t d = 0, h = 0;
    if (fd >= 0) {
      off_t x = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
      if (x < 0) break;  // ENXIO: no data after pos
      d = static_cast<uint64_t>(x);
      h = static_cast<uint64_t>(::lseek(fd, x, SEEK_HOLE));
    } else {
      Status s = v->seek(Io{}, pos, SEEK_DATA, &d);
      if (s.err == ENXIO) break;
      REQUIRE(s.ok());
      REQUIRE(v->seek(Io{}, d, SEEK_HOLE, &h).ok());
    }
    if (d >= size) break;
    r.emplace_back(d, std::min(h, size));
    pos = h;
  }
  return r;
}

// Our reads equal `qemu-img convert -O raw` wherever either side has data. Outside both, both read
// as zeros by their own maps (ours is held to qemu-img map's by the SEEK_DATA test above): the disks
// grown here are gigabytes of holes, and reading those through the page cache took most of a minute.
void same_as_qemu(const Tmp& t, const std::string& img, Vmdk& v) {
  must("qemu-img convert -U -f vmdk -O raw " + img + " " + t / "expect.raw");
  int fd = ::open((t / "expect.raw").c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  uint64_t size = 0;
  REQUIRE(v.size(&size).ok());
  auto ranges = data_ranges(fd, nullptr, size);
  for (auto& x : data_ranges(-1, &v, size)) ranges.push_back(x);
  std::sort(ranges.begin(), ranges.end());
  std::string a(8 << 20, '\0'), b(8 << 20, '\0');
  int bad = 0;
  uint64_t done = 0;  // everything below is compared
  for (auto [start, end] : ranges) {
    for (uint64_t off = std::max(start, done); off < end; off += a.size()) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(a.size(), end - off));
      size_t got = 0;
      REQUIRE(v.read(Io{}, a.data(), n, off, &got).ok());
      REQUIRE(got == n);
      REQUIRE(::pread(fd, b.data(), n, static_cast<off_t>(off)) == static_cast<ssize_t>(n));
      if (a.compare(0, n, b, 0, n) != 0 && ++bad < 4) FAIL_CHECK("differs in the 8 MiB at " << off);
    }
    done = std::max(done, end);
  }
  CHECK(bad == 0);
  ::close(fd);
  ::unlink((t / "expect.raw").c_str());
}

uint64_t qemu_virtual_size(const std::string& img) {
  std::string out;
  REQUIRE(run("qemu-img info -U -f vmdk --output=json " + img + " | python3 -c \"import json,sys; "
              "print(json.load(sys.stdin)['virtual-size'])\"",
              &out) == 0);
  return std::stoull(out);
}

void make_vmdk(const Tmp& t, const std::string& sub, const std::string& img) {
  if (sub == "vmfs") {  // qemu-img does not make these; qemu reads them: a flat file, a VMFS line
    must("qemu-img create -q -f vmdk -o subformat=monolithicFlat " + img + " 16M");
    must("sed -i -e 's/createType=\"monolithicFlat\"/createType=\"vmfs\"/' -e 's/ FLAT \\(\"[^\"]*\"\\) 0$/ VMFS \\1/' " +
         img);
    must("grep -q '^RW 32768 VMFS \"' " + img);
  } else {
    must("qemu-img create -q -f vmdk -o subformat=" + sub + " " + img + " 16M");
  }
  (void)t;
}

}  // namespace

TEST_CASE("vmdk growth: every writable kind grows as QEMU then reads it", "[vmdk][resize]") {
  struct Case {
    const char* sub;
    uint64_t to;
    const char* why;
  } cases[] = {
      {"monolithicSparse", 1ull << 30, "directory grows in place"},
      {"monolithicSparse", 4608ull << 20, "directory moves to the end"},
      {"monolithicFlat", 40ull << 20, "flat file extended"},
      {"vmfs", 40ull << 20, "flat file extended"},
      {"twoGbMaxExtentSparse", (2ull << 30) + (40ull << 20), "last extent to 2 GiB, one extent added"},
      {"twoGbMaxExtentFlat", (2ull << 30) + (40ull << 20), "last extent to 2 GiB, one extent added"},
  };
  for (auto& c : cases) {
    DYNAMIC_SECTION(c.sub << " to " << c.to << ": " << c.why) {
      Tmp t;
      std::string img = t / "g.vmdk";
      make_vmdk(t, c.sub, img);
      must("qemu-io -f vmdk" + std::string(kFill) + " " + img + " >/dev/null");
      // (offset, byte) of the writes after growth: across the old end, and near the new end.
      const std::vector<std::pair<uint64_t, char>> writes{
          {(16u << 20) - 4096, 'a'}, {(16u << 20) + (1u << 20), 'b'}, {c.to - 200 * 1024, 'c'}};
      {
        Opened o = open_vmdk(img, true);
        INFO(o.err);
        REQUIRE(o.v);
        CHECK(o.v->resize(Io{}, 8u << 20).err == EOPNOTSUPP);  // shrinking
        CHECK(o.v->resize(Io{}, c.to + 100).err == EINVAL);    // not whole sectors
        REQUIRE(o.v->resize(Io{}, c.to).ok());
        uint64_t size = 0;
        REQUIRE(o.v->size(&size).ok());
        CHECK(size == c.to);
        std::string buf(100 * 1024, '\0');
        for (auto& [off, b] : writes) {
          buf.assign(buf.size(), b);
          REQUIRE(o.v->write(Io{}, buf.data(), buf.size(), off).ok());
        }
        REQUIRE(o.v->sync(Io{}, false).ok());
        CHECK(o.v->write(Io{}, buf.data(), 512, c.to).err == ENOSPC);
      }
      CHECK(qemu_virtual_size(img) == c.to);
      std::string out;
      int rc = run("qemu-img check -f vmdk " + img, &out);
      INFO(out);
      CHECK(rc == 0);
      for (auto& [off, b] : writes) {
        char pat[8];
        std::snprintf(pat, sizeof pat, "0x%02x", static_cast<unsigned char>(b));
        must("qemu-io -f vmdk -c 'read -P " + std::string(pat) + " " + std::to_string(off) + " 100k' " + img +
             " | grep -q 'read 102400/102400'");
      }
      // The reopened image (our parser on the new metadata) and QEMU agree on every byte.
      Opened o = open_vmdk(img, true);
      INFO(o.err);
      REQUIRE(o.v);
      CHECK(o.v->virtual_size() == c.to);
      same_as_qemu(t, img, *o.v);
      // And it grows again from there.
      REQUIRE(o.v->resize(Io{}, c.to + (8u << 20)).ok());
      o.v.reset();
      CHECK(qemu_virtual_size(img) == c.to + (8u << 20));
      CHECK(run("qemu-img check -f vmdk " + img) == 0);
    }
  }
}

TEST_CASE("vmdk growth: a crash at any step leaves the old or the new disk, never a broken one", "[vmdk][resize]") {
  for (uint64_t to : {1ull << 30, 4608ull << 20}) {
    DYNAMIC_SECTION("monolithicSparse to " << to) {
      Tmp t;
      std::string img = t / "c.vmdk";
      must("qemu-img create -q -f vmdk " + img + " 16M");
      must("qemu-io -f vmdk" + std::string(kFill) + " " + img + " >/dev/null");
      const std::string pristine = slurp(img), before = qemu_raw(t, img);
      int completed_at = -1;
      for (int budget = 0; budget < 40 && completed_at < 0; ++budget) {
        std::ofstream(img, std::ios::binary | std::ios::trunc).write(pristine.data(), static_cast<std::streamsize>(pristine.size()));
        {
          std::string err;
          auto file = FdFile::open(img, true, &err);
          REQUIRE(file);
          DyingFile dying(file.get(), budget);
          VmdkOptions vo;
          vo.path = img;
          std::unique_ptr<Vmdk> v;
          REQUIRE(Vmdk::open(&dying, vo, &v, &err).ok());
          if (v->resize(Io{}, to).ok()) completed_at = budget;
        }
        INFO("crash after " << budget << " changes");
        std::string out;
        int rc = run("qemu-img check -f vmdk " + img, &out);
        INFO(out);
        CHECK(rc == 0);
        const uint64_t size = qemu_virtual_size(img);
        CHECK((size == 16u << 20 || size == to));
        Opened o = open_vmdk(img, false);
        INFO(o.err);
        REQUIRE(o.v);
        CHECK(o.v->virtual_size() == size);
        std::string head(16u << 20, '\0');
        size_t got = 0;
        REQUIRE(o.v->read(Io{}, head.data(), head.size(), 0, &got).ok());
        CHECK((head == before));
      }
      CHECK(completed_at > 3);  // the steps were each cut short before the one that succeeded
    }
  }
}
