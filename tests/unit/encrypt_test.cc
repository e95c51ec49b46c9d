// The encrypt filter's pure parts: the LUKS1 header, PBKDF2 and the anti-forensic splitter
// against independent computations and published vectors, format/unlock round trips, and
// headers written by cryptsetup and by qemu-img (the independent writers) unlocked here.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <linux/falloc.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "encrypt/convert.h"
#include "encrypt/encrypt_filter.h"
#include "encrypt/luks1.h"
#include "encrypt/params.h"
#include "encrypt/xts.h"
#include "mem_layer.h"

using namespace iofilterfs::encrypt;
namespace l1 = iofilterfs::encrypt::luks1;

namespace {

std::string hex(const uint8_t* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

SecureBytes pass_of(const std::string& s) { return SecureBytes(s.data(), s.size()); }

// A scratch directory for the tools' files, removed afterwards.
struct Scratch {
  std::string path;
  Scratch() {
    std::string t = "/tmp/iofilterfs-enc-XXXXXX";
    REQUIRE(mkdtemp(t.data()));
    path = t;
  }
  ~Scratch() { std::system(("rm -rf '" + path + "'").c_str()); }
  std::string operator/(const std::string& f) const { return path + "/" + f; }
};

int run(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = popen(("bash -c '" + cmd + "' 2>&1").c_str(), "r");
  if (!p) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  int st = pclose(p);
  if (out) *out = text;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const uint8_t* bytes(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }

// Fast fixed iteration counts for round trips.
l1::FormatParams fast(uint32_t key_bytes = 64, const char* hash = "sha256") {
  l1::FormatParams p;
  p.key_bytes = key_bytes;
  p.hash = hash;
  p.slot_iterations = 1000;
  p.digest_iterations = 1000;
  return p;
}

// Parses the header of `file` and unlocks it with `pass`.
l1::Unlock open_file(const std::string& file, const std::string& pass, l1::Header* h, SecureBytes* mk, int* slot) {
  std::string data = slurp(file);
  REQUIRE(data.size() >= l1::kPhdrSize);
  std::string err = l1::parse_header(bytes(data), data.size(), h);
  INFO(err);
  REQUIRE(err == "");
  l1::Unlock u = l1::unlock(*h, data, pass_of(pass), mk, slot, &err);
  INFO(err);
  REQUIRE(u != l1::Unlock::Error);
  return u;
}

}  // namespace

TEST_CASE("PBKDF2 matches the published vectors (RFC 6070, RFC 7914)", "[encrypt][luks]") {
  uint8_t out[64];
  const uint8_t salt[] = {'s', 'a', 'l', 't'};
  REQUIRE(l1::pbkdf2(EVP_sha1(), "password", 8, salt, 4, 1, out, 20));
  CHECK(hex(out, 20) == "0c60c80f961f0e71f3a9b524af6012062fe037a6");
  REQUIRE(l1::pbkdf2(EVP_sha1(), "password", 8, salt, 4, 4096, out, 20));
  CHECK(hex(out, 20) == "4b007901b765489abead49d926f721d065a429c1");
  REQUIRE(l1::pbkdf2(EVP_sha256(), "passwd", 6, salt, 4, 1, out, 64));
  CHECK(hex(out, 64) ==
        "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783");
}

TEST_CASE("the benchmark gives at least 1000 iterations, more for a longer time", "[encrypt][luks]") {
  uint32_t tiny = l1::pbkdf2_iterations_for(EVP_sha256(), 64, 1);
  CHECK(tiny == l1::kMinIterations);
  uint32_t ten = l1::pbkdf2_iterations_for(EVP_sha256(), 64, 10000);
  uint32_t hundred = l1::pbkdf2_iterations_for(EVP_sha256(), 64, 100000);
  CHECK(ten >= l1::kMinIterations);
  CHECK(hundred > ten);
}

TEST_CASE("AF diffusion hashes each digest-sized piece after its big-endian index", "[encrypt][luks]") {
  // 40 bytes under sha256: sha256(00000000 || b[0..32]) then the first 8 bytes of
  // sha256(00000001 || b[32..40]).
  uint8_t in[40], out[40];
  for (int i = 0; i < 40; ++i) in[i] = static_cast<uint8_t>(i * 7 + 1);
  REQUIRE(l1::af_diffuse(EVP_sha256(), in, out, sizeof in));
  uint8_t a[36] = {0, 0, 0, 0}, b[12] = {0, 0, 0, 1}, da[32], db[32];
  std::memcpy(a + 4, in, 32);
  std::memcpy(b + 4, in + 32, 8);
  unsigned n = 0;
  REQUIRE(EVP_Digest(a, sizeof a, da, &n, EVP_sha256(), nullptr));
  REQUIRE(EVP_Digest(b, sizeof b, db, &n, EVP_sha256(), nullptr));
  CHECK(std::memcmp(out, da, 32) == 0);
  CHECK(std::memcmp(out + 32, db, 8) == 0);
}

TEST_CASE("AF split then merge gives the key back, any changed stripe loses it", "[encrypt][luks]") {
  for (const EVP_MD* md : {EVP_sha1(), EVP_sha256(), EVP_sha512()}) {
    for (size_t block : {size_t{16}, size_t{20}, size_t{32}, size_t{33}, size_t{64}}) {
      for (uint32_t stripes : {1u, 2u, 7u, 4000u}) {
        INFO(EVP_MD_get0_name(md) << " block " << block << " stripes " << stripes);
        std::vector<uint8_t> key(block), split(block * stripes), back(block);
        for (size_t i = 0; i < block; ++i) key[i] = static_cast<uint8_t>(i * 13 + 5);
        REQUIRE(l1::af_split(md, key.data(), block, stripes, split.data()));
        REQUIRE(l1::af_merge(md, split.data(), block, stripes, back.data()));
        CHECK(back == key);
        if (stripes > 1) {
          // The split is not the key repeated: the last stripe alone is not the key.
          CHECK(std::memcmp(split.data() + (stripes - 1) * block, key.data(), block) != 0);
          split[block / 2] ^= 1;  // one bit of the first stripe
          REQUIRE(l1::af_merge(md, split.data(), block, stripes, back.data()));
          CHECK(back != key);
        }
      }
    }
  }
}

TEST_CASE("aes-xts-plain64 matches IEEE 1619 vector 4 and the sector number is the tweak", "[encrypt][luks]") {
  // IEEE P1619 XTS-AES-128 vector 4: keys 2718281828... and 3141592653..., data unit 0,
  // plaintext 00 01 02 .. ff 00 .. ff.
  const char* k1 = "27182818284590452353602874713526";
  const char* k2 = "31415926535897932384626433832795";
  uint8_t key[32], pt[512], ct[512], back[512];
  for (int i = 0; i < 16; ++i) {
    std::sscanf(k1 + 2 * i, "%2hhx", &key[i]);
    std::sscanf(k2 + 2 * i, "%2hhx", &key[16 + i]);
  }
  for (int i = 0; i < 512; ++i) pt[i] = static_cast<uint8_t>(i);
  REQUIRE(l1::xts_crypt(true, key, 32, pt, ct, 1, 0));
  CHECK(hex(ct, 16) == "27a7479befa1d476489f308cd4cfa6e2");
  REQUIRE(l1::xts_crypt(false, key, 32, ct, back, 1, 0));
  CHECK(std::memcmp(back, pt, 512) == 0);
  // Sector 1 and sector 2^32 + 0 differ from sector 0 (a 64-bit tweak, not 32-bit).
  uint8_t c1[512], c2[512];
  REQUIRE(l1::xts_crypt(true, key, 32, pt, c1, 1, 1));
  REQUIRE(l1::xts_crypt(true, key, 32, pt, c2, 1, uint64_t{1} << 32));
  CHECK(std::memcmp(c1, ct, 512) != 0);
  CHECK(std::memcmp(c2, ct, 512) != 0);
  // Two sectors in one call equal two calls.
  uint8_t two_pt[1024], two_ct[1024];
  std::memcpy(two_pt, pt, 512);
  std::memcpy(two_pt + 512, pt, 512);
  REQUIRE(l1::xts_crypt(true, key, 32, two_pt, two_ct, 2, 0));
  CHECK(std::memcmp(two_ct, ct, 512) == 0);
  CHECK(std::memcmp(two_ct + 512, c1, 512) == 0);
}

TEST_CASE("a header survives write and parse, field by field", "[encrypt][luks]") {
  l1::Header h;
  std::vector<uint8_t> area;
  SecureBytes mk;
  REQUIRE(l1::format(fast(), pass_of("pw"), &h, &area, &mk) == "");
  CHECK(area.size() == 4096 * 512);  // payload 1 MiB aligned after 8 slots of 504 sectors
  CHECK(h.payload_offset == 4096);
  CHECK(h.slots[0].key_material_offset == 8);
  CHECK(h.slots[1].key_material_offset == 512);
  CHECK(h.slots[7].key_material_offset == 8 + 7 * 504);
  l1::Header p;
  REQUIRE(l1::parse_header(area.data(), area.size(), &p) == "");
  CHECK(p.version == 1);
  CHECK(p.cipher_name == "aes");
  CHECK(p.cipher_mode == "xts-plain64");
  CHECK(p.hash_spec == "sha256");
  CHECK(p.payload_offset == h.payload_offset);
  CHECK(p.key_bytes == 64);
  CHECK(p.mk_digest == h.mk_digest);
  CHECK(p.mk_digest_salt == h.mk_digest_salt);
  CHECK(p.mk_digest_iter == 1000);
  CHECK(p.uuid == h.uuid);
  CHECK(p.uuid.size() == 36);
  CHECK(p.uuid[14] == '4');
  for (int i = 0; i < l1::kNumKeyslots; ++i) {
    INFO("slot " << i);
    CHECK(p.slots[i].active == (i == 0 ? l1::kSlotActive : l1::kSlotDisabled));
    CHECK(p.slots[i].key_material_offset == h.slots[i].key_material_offset);
    CHECK(p.slots[i].stripes == 4000);
  }
  CHECK(p.slots[0].iterations == 1000);
  CHECK(p.slots[0].salt == h.slots[0].salt);
  // Byte positions from the spec: magic, version, payload offset and key bytes big-endian.
  CHECK(std::memcmp(area.data(), "LUKS\xba\xbe\x00\x01", 8) == 0);
  CHECK(std::memcmp(area.data() + 104, "\x00\x00\x10\x00\x00\x00\x00\x40", 8) == 0);
  CHECK(std::memcmp(area.data() + 208, "\x00\xac\x71\xf3\x00\x00\x03\xe8", 8) == 0);

  // 256-bit keys: slots of 256 sectors, payload still at 1 MiB alignment.
  REQUIRE(l1::format(fast(32, "sha512"), pass_of("pw"), &h, &area, &mk) == "");
  CHECK(h.slots[1].key_material_offset == 8 + 256);
  CHECK(h.payload_offset == 4096);
  CHECK(mk.size() == 32);
}

TEST_CASE("headers that cannot be used are refused with the reason", "[encrypt][luks]") {
  l1::Header h;
  std::vector<uint8_t> area;
  SecureBytes mk;
  REQUIRE(l1::format(fast(), pass_of("pw"), &h, &area, &mk) == "");
  struct Case {
    const char* what;
    std::function<void(l1::Header&)> edit;
    const char* message;
  };
  const Case cases[] = {
      {"version 2", [](l1::Header& x) { x.version = 2; }, "LUKS version 2 is not supported (only LUKS1)"},
      {"cbc", [](l1::Header& x) { x.cipher_mode = "cbc-essiv:sha256"; },
       "unsupported cipher 'aes-cbc-essiv:sha256' (only aes-xts-plain64)"},
      {"twofish", [](l1::Header& x) { x.cipher_name = "twofish"; },
       "unsupported cipher 'twofish-xts-plain64' (only aes-xts-plain64)"},
      {"md5", [](l1::Header& x) { x.hash_spec = "md5"; }, "unsupported hash 'md5' (sha1, sha256 or sha512)"},
      {"48 bytes", [](l1::Header& x) { x.key_bytes = 48; }, "unsupported key size of 384 bits (256 or 512 for xts)"},
      {"detached", [](l1::Header& x) { x.payload_offset = 0; }, "a detached header (payload offset 0) is not supported"},
      {"slot magic", [](l1::Header& x) { x.slots[3].active = 7; }, "keyslot 3 is corrupt"},
      {"stripes", [](l1::Header& x) { x.slots[0].stripes = 3999; }, "keyslot 0 is corrupt"},
      {"in header", [](l1::Header& x) { x.slots[0].key_material_offset = 1; }, "keyslot 0 overlaps the header"},
      {"in payload", [](l1::Header& x) { x.payload_offset = 100; }, "keyslot 0 overlaps the payload"},
      {"overlap",
       [](l1::Header& x) {
         x.slots[1] = x.slots[0];
         x.slots[1].key_material_offset = 300;
       },
       "keyslot 0 overlaps keyslot 1"},
      {"no digest iterations", [](l1::Header& x) { x.mk_digest_iter = 0; }, "the master key digest has no iterations"},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    l1::Header x = h;
    c.edit(x);
    uint8_t buf[l1::kPhdrSize];
    l1::write_header(x, buf);
    l1::Header out;
    CHECK(l1::parse_header(buf, sizeof buf, &out) == c.message);
  }
  l1::Header out;
  uint8_t zeros[l1::kPhdrSize] = {};
  CHECK(l1::parse_header(zeros, sizeof zeros, &out) == "no LUKS magic");
  CHECK(l1::parse_header(area.data(), 100, &out) == "the header is truncated (100 of 592 bytes)");
  CHECK_FALSE(l1::has_magic(zeros, sizeof zeros));
  CHECK(l1::has_magic(area.data(), area.size()));
}

TEST_CASE("format then unlock: the right passphrase gives the master key, a wrong one does not", "[encrypt][luks]") {
  for (uint32_t kb : {32u, 64u}) {
    for (const char* hash : {"sha1", "sha256", "sha512"}) {
      INFO(kb << " " << hash);
      l1::Header h;
      std::vector<uint8_t> area;
      SecureBytes mk;
      REQUIRE(l1::format(fast(kb, hash), pass_of("correct horse"), &h, &area, &mk) == "");
      REQUIRE(mk.size() == kb);
      std::string_view view(reinterpret_cast<const char*>(area.data()), area.size());
      SecureBytes got;
      int slot = -1;
      std::string err;
      CHECK(l1::unlock(h, view, pass_of("correct horse"), &got, &slot, &err) == l1::Unlock::Ok);
      CHECK(slot == 0);
      CHECK(std::memcmp(got.data(), mk.data(), kb) == 0);
      CHECK(l1::unlock(h, view, pass_of("correct horsf"), &got, &slot, &err) == l1::Unlock::WrongKey);
      CHECK(l1::unlock(h, view, pass_of(""), &got, &slot, &err) == l1::Unlock::WrongKey);
      // The key material is not the key in the clear.
      std::string all(view);
      CHECK(all.find(std::string(reinterpret_cast<const char*>(mk.data()), 16)) == std::string::npos);
    }
  }
}

TEST_CASE("a second keyslot opens too, removing one leaves the other, the last is kept", "[encrypt][luks]") {
  l1::Header h;
  std::vector<uint8_t> area;
  SecureBytes mk;
  REQUIRE(l1::format(fast(), pass_of("one"), &h, &area, &mk) == "");
  REQUIRE(l1::add_keyslot(&h, &area, mk, pass_of("two"), 3, 1000, 0) == "");
  CHECK(l1::add_keyslot(&h, &area, mk, pass_of("x"), 3, 1000, 0) == "keyslot 3 is in use");
  l1::Header p;
  REQUIRE(l1::parse_header(area.data(), area.size(), &p) == "");
  CHECK(p.active_slots() == 2);
  std::string_view view(reinterpret_cast<const char*>(area.data()), area.size());
  SecureBytes got;
  int slot = -1;
  std::string err;
  CHECK(l1::unlock(p, view, pass_of("two"), &got, &slot, &err) == l1::Unlock::Ok);
  CHECK(slot == 3);
  CHECK(l1::unlock(p, view, pass_of("one"), &got, &slot, &err) == l1::Unlock::Ok);
  CHECK(slot == 0);
  REQUIRE(l1::kill_keyslot(&p, &area, 0) == "");
  REQUIRE(l1::parse_header(area.data(), area.size(), &p) == "");
  CHECK(l1::unlock(p, view, pass_of("one"), &got, &slot, &err) == l1::Unlock::WrongKey);
  CHECK(l1::unlock(p, view, pass_of("two"), &got, &slot, &err) == l1::Unlock::Ok);
  CHECK(l1::kill_keyslot(&p, &area, 3) == "keyslot 3 is the last one; it would lock the data away");
  CHECK(l1::kill_keyslot(&p, &area, 0) == "keyslot 0 is not in use");
}

TEST_CASE("a header made by cryptsetup luksFormat --type luks1 unlocks, with cryptsetup's master key",
          "[encrypt][luks][cryptsetup]") {
  Scratch s;
  for (const char* opts : {"", "--key-size 256 --hash sha1", "--hash sha512"}) {
    INFO(opts);
    std::string out;
    REQUIRE(run("printf \"open sesame\" > " + s / "k" + " && printf wrong > " + s / "w" + " && rm -f " + s / "img" +
                    " && truncate -s 4M " + s / "img" + " && cryptsetup luksFormat --type luks1 " + opts +
                    " --pbkdf-force-iterations 1000 --batch-mode --key-file " + s / "k" + " " + s / "img",
                &out) == 0);
    l1::Header h;
    SecureBytes mk;
    int slot = -1;
    CHECK(open_file(s / "img", "open sesame", &h, &mk, &slot) == l1::Unlock::Ok);
    CHECK(slot == 0);
    CHECK(open_file(s / "img", "open sesamE", &h, &mk, &slot) == l1::Unlock::WrongKey);
    REQUIRE(open_file(s / "img", "open sesame", &h, &mk, &slot) == l1::Unlock::Ok);
    // cryptsetup prints the same master key.
    REQUIRE(run("cryptsetup luksDump --dump-volume-key --batch-mode --key-file " + s / "k" + " " + s / "img" +
                    " | sed -n \"/MK dump:/,\\$p\" | sed \"s/MK dump://\" | tr -d \" \\t\\n\"",
                &out) == 0);
    CHECK(out == hex(mk.data(), mk.size()));
    // And a second keyslot added by cryptsetup opens as well.
    REQUIRE(run("printf second > " + s / "k2" + " && cryptsetup luksAddKey --pbkdf-force-iterations 1000 --batch-mode "
                    "--key-file " + s / "k" + " " + s / "img" + " " + s / "k2",
                &out) == 0);
    CHECK(open_file(s / "img", "second", &h, &mk, &slot) == l1::Unlock::Ok);
    CHECK(slot == 1);
  }
}

TEST_CASE("a header made by qemu-img create -f luks unlocks, and its payload decrypts", "[encrypt][luks][qemu]") {
  Scratch s;
  for (const char* opts : {"", ",cipher-alg=aes-128", ",hash-alg=sha512", ",hash-alg=sha1,cipher-alg=aes-256"}) {
    INFO(opts);
    std::string out;
    // qemu-img's PBKDF2 benchmark fails now and then with "Unable to get accurate CPU usage"
    // (the CPU clock did not tick during its run): try it a few times.
    int rc = run("for i in $(seq 30); do rm -f " + s / "q.luks" + " && qemu-img create -f luks --object secret,id=s,data=qemu-pass -o key-secret=s,iter-time=10" +
                     opts + " " + s / "q.luks" + " 1M && break; done && qemu-io --object secret,id=s,data=qemu-pass --image-opts "
                     "driver=luks,key-secret=s,file.filename=" + s / "q.luks" + " -c \"write -P 0x5a 4096 8192\"",
                 &out);
    INFO(out);
    REQUIRE(rc == 0);
    l1::Header h;
    SecureBytes mk;
    int slot = -1;
    REQUIRE(open_file(s / "q.luks", "qemu-pass", &h, &mk, &slot) == l1::Unlock::Ok);
    CHECK(open_file(s / "q.luks", "qemu-pasS", &h, &mk, &slot) == l1::Unlock::WrongKey);
    REQUIRE(open_file(s / "q.luks", "qemu-pass", &h, &mk, &slot) == l1::Unlock::Ok);
    // The payload: bytes 4096..12287 (sectors 8..23, the tweak counted from the payload) hold 0x5a.
    std::string data = slurp(s / "q.luks");
    REQUIRE(data.size() >= h.payload_bytes_offset() + 12288);
    std::vector<uint8_t> plain(8192);
    REQUIRE(l1::xts_crypt(false, mk.data(), mk.size(), bytes(data) + h.payload_bytes_offset() + 4096, plain.data(),
                          16, 8));
    CHECK(plain == std::vector<uint8_t>(8192, 0x5a));
  }
}

// ---- the filter over a memory layer ----------------------------------------------------------

namespace {

using iofilterfs::DiskInfo;
using iofilterfs::EncryptFilter;
using iofilterfs::Io;
using iofilterfs::Status;
using encrypt_params = iofilterfs::encrypt::EncryptParams;

void write_key(const std::string& path, const std::string& pass) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << pass;
  REQUIRE(chmod(path.c_str(), 0600) == 0);
}

// A memory "backing file" and encrypt filters opened over it.
struct Rig {
  Scratch dir;
  testing::MemLayer mem;
  encrypt_params params;
  Rig() {
    write_key(dir / "k", "rig passphrase");
    params.key_file = dir / "k";
    params.iter_time_us = 1000;
  }
  std::unique_ptr<EncryptFilter> open(Status* st, bool read_only = false) {
    auto f = std::make_unique<EncryptFilter>(params);
    f->set_next(&mem);
    *st = f->open(DiskInfo{"t.raw", "raw", read_only});
    return f;
  }
  std::unique_ptr<EncryptFilter> open_ok() {
    Status s;
    auto f = open(&s);
    INFO((s.what ? s.what : ""));
    REQUIRE(s.ok());
    return f;
  }
};

std::vector<uint8_t> read_all(EncryptFilter& f) {
  uint64_t size = 0;
  REQUIRE(f.size(&size).ok());
  std::vector<uint8_t> out(size);
  size_t got = 0;
  if (size) REQUIRE(f.read(Io{}, out.data(), out.size(), 0, &got).ok());
  REQUIRE(got == size);
  return out;
}

uint64_t rnd(uint64_t& s) {  // xorshift64*, deterministic
  s ^= s >> 12;
  s ^= s << 25;
  s ^= s >> 27;
  return s * 0x2545F4914F6CDD1Dull;
}

}  // namespace

TEST_CASE("encrypt: a new image gets a header, random aligned and unaligned I/O reads back, reopen and wrong key",
          "[encrypt]") {
  Rig r;
  auto f = r.open_ok();
  CHECK(f->payload_offset() == 2 * 1024 * 1024);
  CHECK(r.mem.data.size() == 2 * 1024 * 1024);
  CHECK(l1::has_magic(r.mem.data.data(), r.mem.data.size()));
  uint64_t size = 1;
  REQUIRE(f->size(&size).ok());
  CHECK(size == 0);

  std::vector<uint8_t> model;
  uint64_t seed = 0x1234567;
  std::vector<uint8_t> buf(70000);
  for (int op = 0; op < 3000; ++op) {
    uint64_t off = rnd(seed) % (300 * 1024);
    size_t len = 1 + rnd(seed) % 20000;
    if (op % 3 == 0) {  // aligned
      off &= ~uint64_t{511};
      len = (len + 511) & ~size_t{511};
    }
    INFO("op " << op << " off " << off << " len " << len);
    if (rnd(seed) % 2) {
      for (size_t i = 0; i < len; ++i) buf[i] = static_cast<uint8_t>(rnd(seed));
      REQUIRE(f->write(Io{}, buf.data(), len, off).ok());
      uint64_t end = (off + len + 511) & ~uint64_t{511};
      if (model.size() < end) model.resize(end, 0);
      std::memcpy(model.data() + off, buf.data(), len);
    } else {
      size_t got = 12345;
      REQUIRE(f->read(Io{}, buf.data(), len, off, &got).ok());
      size_t expect = off >= model.size() ? 0 : std::min<size_t>(len, model.size() - off);
      REQUIRE(got == expect);
      REQUIRE(std::memcmp(buf.data(), model.data() + off, got) == 0);
    }
  }
  REQUIRE(f->size(&size).ok());
  CHECK(size == model.size());
  CHECK(read_all(*f) == model);
  f->close();

  // The same bytes through a new instance (a later open of the image).
  auto g = r.open_ok();
  CHECK(read_all(*g) == model);
  g->close();

  // Any LUKS1 reader finds the plaintext at payload + x, sector x/512 with IV x/512.
  l1::Header h;
  REQUIRE(l1::parse_header(reinterpret_cast<const uint8_t*>(r.mem.data.data()), r.mem.data.size(), &h) == "");
  SecureBytes mk;
  int slot = -1;
  std::string err;
  std::string_view all(r.mem.data.data(), r.mem.data.size());
  REQUIRE(l1::unlock(h, all, pass_of("rig passphrase"), &mk, &slot, &err) == l1::Unlock::Ok);
  std::vector<uint8_t> plain(model.size());
  REQUIRE(l1::xts_crypt(false, mk.data(), mk.size(), bytes(std::string(all.substr(h.payload_bytes_offset()))),
                        plain.data(), model.size() / 512, 0));
  CHECK(plain == model);

  // A wrong passphrase: EACCES, and not one byte of the image changes.
  write_key(r.dir / "k", "rig passphrasE");
  std::vector<char> before = r.mem.data;
  Status s;
  auto w = r.open(&s);
  CHECK(s.err == EACCES);
  CHECK(std::string(s.what) == "the policy's passphrase opens no keyslot of the LUKS header");
  CHECK(r.mem.data == before);
  uint64_t sz = 0;
  CHECK(w->size(&sz).err == EIO);  // a filter that did not open serves nothing
}

TEST_CASE("encrypt: plaintext is never read as ciphertext, an empty read-only image cannot get a header", "[encrypt]") {
  Rig r;
  std::string plain = "just some plaintext image";
  r.mem.data.assign(plain.begin(), plain.end());
  Status s;
  auto f = r.open(&s);
  CHECK(s.err == EMEDIUMTYPE);
  CHECK(std::string(s.what).find("the image has no LUKS header") == 0);
  CHECK(std::string(r.mem.data.begin(), r.mem.data.end()) == plain);

  Rig e;
  auto g = e.open(&s, true);
  CHECK(s.err == EROFS);
  CHECK(e.mem.data.empty());

  // A LUKS2 header (cryptsetup's default) is refused with the reason.
  Rig v2;
  auto h = v2.open_ok();
  h->close();
  v2.mem.data[7] = 2;
  auto k = v2.open(&s);
  CHECK(s.err == EMEDIUMTYPE);
  CHECK(std::string(s.what) == "the LUKS header cannot be used: LUKS version 2 is not supported (only LUKS1)");

  // A missing key file: EACCES, with the reason and without the file's content.
  Rig m;
  m.params.key_file = m.dir / "missing";
  auto n = m.open(&s);
  CHECK(s.err == EACCES);
  CHECK(std::string(s.what) == "key file '" + m.dir / "missing" + "' cannot be read: No such file or directory");
  CHECK(m.mem.data.empty());
}

TEST_CASE("encrypt: grown areas, zero-range and punch-hole read as zeros, sizes are whole sectors", "[encrypt]") {
  Rig r;
  auto f = r.open_ok();
  const uint64_t P = f->payload_offset();
  REQUIRE(f->resize(Io{}, 64 * 1024).ok());
  uint64_t size = 0;
  REQUIRE(f->size(&size).ok());
  CHECK(size == 64 * 1024);
  CHECK(r.mem.data.size() == P + 64 * 1024);
  CHECK(read_all(*f) == std::vector<uint8_t>(64 * 1024, 0));
  CHECK(f->resize(Io{}, 1000).err == EINVAL);

  std::vector<uint8_t> model(64 * 1024, 0xab);
  REQUIRE(f->write(Io{}, model.data(), model.size(), 0).ok());
  // zero-range, unaligned: encrypted zeros (whole sectors inside are not zero bytes below).
  REQUIRE(f->fallocate(Io{}, FALLOC_FL_ZERO_RANGE, 1000, 4000).ok());
  std::fill(model.begin() + 1000, model.begin() + 5000, 0);
  CHECK(read_all(*f) == model);
  CHECK(std::count(r.mem.data.begin() + P + 1024, r.mem.data.begin() + P + 4608, 0) < 100);
  // punch-hole: whole sectors become zero bytes below, the edges encrypted zeros.
  REQUIRE(f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10000, 20000).ok());
  std::fill(model.begin() + 10000, model.begin() + 30000, 0);
  CHECK(read_all(*f) == model);
  CHECK(std::count(r.mem.data.begin() + P + 10240, r.mem.data.begin() + P + 29696, 0) == 29696 - 10240);
  CHECK(std::count(r.mem.data.begin() + P + 9728, r.mem.data.begin() + P + 10240, 0) < 100);
  // KEEP_SIZE past the end does not grow; zero-range without it does.
  REQUIRE(f->fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 60 * 1024, 1 << 20).ok());
  REQUIRE(f->fallocate(Io{}, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 62 * 1024, 1 << 20).ok());
  REQUIRE(f->size(&size).ok());
  CHECK(size == 64 * 1024);
  std::fill(model.begin() + 60 * 1024, model.end(), 0);
  CHECK(read_all(*f) == model);
  REQUIRE(f->fallocate(Io{}, FALLOC_FL_ZERO_RANGE, 64 * 1024, 4096).ok());
  REQUIRE(f->size(&size).ok());
  CHECK(size == 68 * 1024);
  CHECK(f->fallocate(Io{}, 0x8 /* FALLOC_FL_COLLAPSE_RANGE */, 0, 4096).err == EOPNOTSUPP);
  // A torn last sector below (another tool wrote half a sector) is not part of the payload.
  r.mem.data.resize(r.mem.data.size() + 100, 'x');
  REQUIRE(f->size(&size).ok());
  CHECK(size == 68 * 1024);
  // Shrinking.
  REQUIRE(f->resize(Io{}, 4096).ok());
  REQUIRE(f->size(&size).ok());
  CHECK(size == 4096);
  CHECK(r.mem.data.size() == P + 4096);
  uint64_t where = 0;
  REQUIRE(f->seek(Io{}, 512, SEEK_DATA, &where).ok());
  CHECK(where == 512);  // the memory layer answers its offset: shifted down and back
}

TEST_CASE("encrypt: neighbouring unaligned writes from many threads lose no byte", "[encrypt]") {
  Rig r;
  auto f = r.open_ok();
  constexpr size_t kBytes = 16 * 1024;
  constexpr int kThreads = 8;
  REQUIRE(f->resize(Io{}, kBytes).ok());
  std::vector<std::thread> ts;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      for (size_t i = t; i < kBytes; i += kThreads) {
        uint8_t v = static_cast<uint8_t>(i * 31 + 7);
        if (!f->write(Io{}, &v, 1, i).ok()) ++failures;
      }
    });
  for (auto& t : ts) t.join();
  CHECK(failures == 0);
  std::vector<uint8_t> want(kBytes);
  for (size_t i = 0; i < kBytes; ++i) want[i] = static_cast<uint8_t>(i * 31 + 7);
  CHECK(read_all(*f) == want);
  CHECK(f->stats_json().find("\"rmw\":16384") != std::string::npos);
}

TEST_CASE("encrypt: the ciphertext holds no plaintext, stats and describe hold no key", "[encrypt]") {
  Rig r;
  auto f = r.open_ok();
  std::string marker;
  for (int i = 0; i < 64; ++i) marker += "IOFILTERFS-PLAINTEXT-MARKER-";
  for (uint64_t off : {0ull, 777ull, 4096ull, 100000ull})
    REQUIRE(f->write(Io{}, marker.data(), marker.size(), off).ok());
  std::string below(r.mem.data.begin(), r.mem.data.end());
  CHECK(below.find("IOFILTERFS-PLAINTEXT") == std::string::npos);
  CHECK(below.find("rig passphrase") == std::string::npos);
  std::string stats = f->stats_json(), desc = f->describe();
  CHECK(stats.find("\"cipher\":\"aes-xts-plain64\",\"key_bits\":512,\"hash\":\"sha256\"") == 1);
  CHECK(stats.find("\"created\":true") != std::string::npos);
  CHECK(stats.find("passphrase") == std::string::npos);
  CHECK(desc == "key-file=" + r.dir / "k" + " pbkdf-iter-time=1ms key-size=512 hash=sha256");
}

TEST_CASE("encrypt: each worker thread keeps one cipher context pair per disk", "[encrypt]") {
  SecureBytes key(64);
  for (size_t i = 0; i < 64; ++i) key.data()[i] = static_cast<uint8_t>(i);
  auto k = XtsKey::create(key, XtsKey::Engine::kPortable);
  REQUIRE(k);
  CHECK(k->contexts() == 1);
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&] {
      uint8_t buf[4096] = {};
      for (int i = 0; i < 1000; ++i) REQUIRE(k->encrypt(buf, buf, 8, i));
    });
  for (auto& t : ts) t.join();
  CHECK(k->contexts() <= 4);  // one per thread at most; a finished thread's pair is reused
  std::thread([&] {
    uint8_t buf[512] = {};
    REQUIRE(k->decrypt(buf, buf, 1, 0, false));
  }).join();
  CHECK(k->contexts() <= 4);
  k->revoke();
  uint8_t buf[512] = {};
  CHECK_FALSE(k->encrypt(buf, buf, 1, 0));
  CHECK(k->contexts() == 0);
}

// ---- parameters ------------------------------------------------------------------------------

TEST_CASE("encrypt parameters: the validation table, with the node blamed", "[encrypt][params]") {
  using iofilterfs::encrypt::KeyFileFacts;
  auto probe = [](const std::string& path) {
    if (path == "/k/good") return KeyFileFacts{0, 0, S_IFREG | 0600};
    if (path == "/k/readonly") return KeyFileFacts{0, 0, S_IFREG | 0400};
    if (path == "/k/loose") return KeyFileFacts{0, 0, S_IFREG | 0644};
    if (path == "/k/groupw") return KeyFileFacts{0, 0, S_IFREG | 0620};
    if (path == "/k/user") return KeyFileFacts{0, 4242, S_IFREG | 0600};
    if (path == "/k/dir") return KeyFileFacts{0, 0, S_IFDIR | 0700};
    return KeyFileFacts{ENOENT, 0, 0};
  };
  const std::string need =
      "no key given; set key-file: PATH (a passphrase file) or credential: NAME (systemd LoadCredential=)";
  const std::string perms = " must be owned by root and neither readable nor writable by group or others";
  struct Case {
    const char* yaml;
    std::string message;
    int line, column;  // of the node blamed (0-based, yaml-cpp's marks); -1: the whole map
  };
  const Case cases[] = {
      {"{ key-file: /k/good }", "", -1, -1},
      {"{ key-file: /k/readonly }", "", -1, -1},
      {"{ credential: vm-key }", "", -1, -1},
      {"{ key-file: /k/good, pbkdf-iter-time: 10ms, key-size: 256, hash: sha512 }", "", -1, -1},
      {"{ credential: c, hash: sha1, key-size: 512, pbkdf-iter-time: 2s }", "", -1, -1},
      {"", need, -1, -1},
      {"{ pbkdf-iter-time: 10ms }", need, -1, -1},
      {"[ a ]", "parameters must be a mapping, not a list", 0, 0},
      {"x", "parameters must be a mapping, not 'x'", 0, 0},
      {"{ keyfile: /k/good }", "unknown key 'keyfile' (did you mean 'key-file'?)", 0, 2},
      {"{ key-file: /k/good,\n  iter-time: 1s }", "unknown key 'iter-time' (known keys: key-file, credential, pbkdf-iter-time, key-size, hash)", 1, 2},
      {"{ key-file: /k/good, cipher: aes }",
       "unknown key 'cipher' (known keys: key-file, credential, pbkdf-iter-time, key-size, hash)", 0, 21},
      {"{ key-file: k }", "key-file must be an absolute path, not 'k'", 0, 12},
      {"{ key-file: }", "'key-file' has no value", 0, 2},
      {"{ key-file: [ /a ] }", "'key-file' must be a single value, not a list", 0, 12},
      {"{ key-file: /k/good, credential: c }", "key-file and credential exclude each other; give one of them", 0, 33},
      {"{ credential: a/b }", "credential must be a credential's name (as in LoadCredential=NAME:...), without '/', not 'a/b'", 0, 14},
      {"{ credential: .. }", "credential must be a credential's name (as in LoadCredential=NAME:...), without '/', not '..'", 0, 14},
      {"{ key-file: /k/loose }",
       "key file '/k/loose'" + perms + " (it is owned by uid 0 with mode 0644; chown root and chmod 600 it)", 0, 12},
      {"{ key-file: /k/groupw }",
       "key file '/k/groupw'" + perms + " (it is owned by uid 0 with mode 0620; chown root and chmod 600 it)", 0, 12},
      {"{ key-file: /k/user }",
       "key file '/k/user'" + perms + " (it is owned by uid 4242 with mode 0600; chown root and chmod 600 it)", 0, 12},
      {"{ key-file: /k/dir }", "key file '/k/dir' is not a regular file", 0, 12},
      {"{ key-file: /k/missing }", "key file '/k/missing' cannot be read: No such file or directory", 0, 12},
      {"{ key-file: /k/good, pbkdf-iter-time: fast }",
       "pbkdf-iter-time: 'fast' is not a duration (e.g. 250ms, 5s, 24h)", 0, 38},
      {"{ key-file: /k/good, pbkdf-iter-time: 0 }", "pbkdf-iter-time must be from 1ms to 10m, not '0'", 0, 38},
      {"{ key-file: /k/good, pbkdf-iter-time: 11m }", "pbkdf-iter-time must be from 1ms to 10m, not '11m'", 0, 38},
      {"{ key-file: /k/good, key-size: 128 }", "key-size must be 256 or 512 (bits of the aes-xts key), not '128'", 0, 31},
      {"{ key-file: /k/good, hash: md5 }", "hash must be sha1, sha256 or sha512, not 'md5'", 0, 27},
      {"key-file: /k/good\nhash: sha1\nhash: sha256\n", "duplicate key 'hash' (first on line 2)", 2, 0},
  };
  for (const Case& c : cases) {
    INFO(c.yaml);
    YAML::Node params = YAML::Load(c.yaml), where = params;
    std::string msg = iofilterfs::encrypt::validate_encrypt(params, &where, probe);
    CHECK(msg == c.message);
    if (c.line >= 0) {
      CHECK(where.Mark().line == c.line);
      CHECK(where.Mark().column == c.column);
    } else if (!msg.empty()) {
      CHECK(where.Mark().line == params.Mark().line);
      CHECK(where.Mark().column == params.Mark().column);
    }
  }
  encrypt_params p;
  REQUIRE(iofilterfs::encrypt::parse_encrypt(YAML::Load("{ credential: c, pbkdf-iter-time: 250ms, key-size: 256, hash: sha1 }"),
                                              &p, nullptr, probe) == "");
  CHECK(p.credential == "c");
  CHECK(p.key_file.empty());
  CHECK(p.iter_time_us == 250000);
  CHECK(p.key_bits == 256);
  CHECK(p.hash == "sha1");
  CHECK(iofilterfs::encrypt::describe_encrypt(p) == "credential=c pbkdf-iter-time=250ms key-size=256 hash=sha1");
  REQUIRE(iofilterfs::encrypt::parse_encrypt(YAML::Load("{ key-file: /k/good }"), &p, nullptr, probe) == "");
  CHECK(iofilterfs::encrypt::describe_encrypt(p) == "key-file=/k/good pbkdf-iter-time=2s key-size=512 hash=sha256");
}

TEST_CASE("encrypt parameters: a real key file's owner and mode are checked at load and again at open", "[encrypt][params]") {
  Scratch s;
  write_key(s / "k", "pw\n");
  YAML::Node params = YAML::Load("{ key-file: " + s / "k" + " }");
  CHECK(iofilterfs::encrypt::validate_encrypt(params, nullptr) == "");
  encrypt_params p;
  REQUIRE(iofilterfs::encrypt::parse_encrypt(params, &p) == "");
  SecureBytes pass;
  REQUIRE(iofilterfs::encrypt::read_passphrase(p, &pass) == "");
  CHECK(std::string(reinterpret_cast<const char*>(pass.data()), pass.size()) == "pw\n");  // byte for byte
  REQUIRE(chmod((s / "k").c_str(), 0640) == 0);
  const std::string loose = "key file '" + s / "k" +
                            "' must be owned by root and neither readable nor writable by group or others (it is owned "
                            "by uid " + std::to_string(geteuid()) + " with mode 0640; chown root and chmod 600 it)";
  CHECK(iofilterfs::encrypt::validate_encrypt(params, nullptr) == loose);
  CHECK(iofilterfs::encrypt::read_passphrase(p, &pass) == loose);
  REQUIRE(chmod((s / "k").c_str(), 0600) == 0);
  write_key(s / "empty", "");
  p.key_file = s / "empty";
  CHECK(iofilterfs::encrypt::read_passphrase(p, &pass) == "key file '" + s / "empty" + "' is empty");
}

TEST_CASE("encrypt parameters: a credential is read from $CREDENTIALS_DIRECTORY", "[encrypt][params]") {
  Scratch s;
  write_key(s / "vm-key", "from systemd");
  encrypt_params p;
  p.credential = "vm-key";
  SecureBytes pass;
  unsetenv("CREDENTIALS_DIRECTORY");
  CHECK(iofilterfs::encrypt::read_passphrase(p, &pass) ==
        "credential 'vm-key': $CREDENTIALS_DIRECTORY is not set (give the service LoadCredential=vm-key:PATH)");
  setenv("CREDENTIALS_DIRECTORY", s.path.c_str(), 1);
  CHECK(iofilterfs::encrypt::read_passphrase(p, &pass) == "");
  CHECK(std::string(reinterpret_cast<const char*>(pass.data()), pass.size()) == "from systemd");
  p.credential = "other";
  CHECK(iofilterfs::encrypt::read_passphrase(p, &pass) == "credential 'other' cannot be read: No such file or directory");
  unsetenv("CREDENTIALS_DIRECTORY");
}

TEST_CASE("encrypt is registered in class encrypt with its keys", "[encrypt][params]") {
  const iofilterfs::FilterInfo* f = iofilterfs::Registry::instance().find("encrypt");
  REQUIRE(f);
  CHECK(f->cls == iofilterfs::FilterClass::Encrypt);
  CHECK(f->params == std::vector<std::string>{"key-file", "credential", "pbkdf-iter-time", "key-size", "hash"});
  YAML::Node bad = YAML::Load("{ key-size: 384, credential: c }"), where = bad;
  CHECK(f->validate(bad, &where) == "key-size must be 256 or 512 (bits of the aes-xts key), not '384'");
  CHECK_FALSE(f->create(bad));
  CHECK(f->create(YAML::Load("{ credential: c }")));
}

TEST_CASE("encrypt: new parameters in place, a new key file only when it opens the image", "[encrypt]") {
  Rig r;
  auto f = r.open_ok();
  const std::string data(4096, 'd');
  REQUIRE(f->write(Io{}, data.data(), data.size(), 0).ok());
  // Header-shaping keys: taken in place.
  CHECK(f->reconfigure(YAML::Load("{ key-file: " + r.dir / "k" + ", pbkdf-iter-time: 5ms, key-size: 256 }")));
  CHECK(f->describe() == "key-file=" + r.dir / "k" + " pbkdf-iter-time=5ms key-size=256 hash=sha256");
  // A key file with another passphrase: refused (a fresh instance would fail to open).
  write_key(r.dir / "k2", "another passphrase");
  CHECK_FALSE(f->reconfigure(YAML::Load("{ key-file: " + r.dir / "k2" + " }")));
  // A key file with the same passphrase: taken.
  write_key(r.dir / "k3", "rig passphrase");
  CHECK(f->reconfigure(YAML::Load("{ key-file: " + r.dir / "k3" + " }")));
  CHECK(f->describe() == "key-file=" + r.dir / "k3" + " pbkdf-iter-time=2s key-size=512 hash=sha256");
  std::string back(4096, '\0');
  size_t got = 0;
  REQUIRE(f->read(Io{}, back.data(), back.size(), 0, &got).ok());
  CHECK(back == data);
}

TEST_CASE("encrypt: the size of an image that is not open comes from its header", "[encrypt]") {
  Rig r;
  auto f = r.open_ok();
  REQUIRE(f->resize(Io{}, 3 * 512).ok());
  std::string head(r.mem.data.begin(), r.mem.data.begin() + 4096);
  const uint64_t backing = r.mem.data.size();
  CHECK(iofilterfs::encrypt_visible_size(head, backing) == 3 * 512);
  CHECK(iofilterfs::encrypt_visible_size(head, backing + 100) == 3 * 512);  // whole sectors
  CHECK(iofilterfs::encrypt_visible_size(head, 1000) == 0);                 // inside the header
  CHECK(iofilterfs::encrypt_visible_size("", 0) == 0);                      // a new image
  CHECK(iofilterfs::encrypt_visible_size("plaintext", 12345) == 12345);     // refused at open: as it is
  const iofilterfs::FilterInfo* info = iofilterfs::Registry::instance().find("encrypt");
  REQUIRE(info);
  REQUIRE(info->visible_size);
  CHECK(info->visible_size(head, backing) == 3 * 512);
}

// ---- offline conversion (iofilterctl encrypt) ------------------------------------------------

TEST_CASE("a plaintext image converted offline opens with cryptsetup, QEMU and the filter", "[encrypt][convert]") {
  Scratch s;
  write_key(s / "k", "convert pass");
  std::string out;
  // 3 MiB + 1000 bytes: random, one all-zero MiB, random, an odd tail.
  REQUIRE(run("head -c 1M /dev/urandom > " + s / "src" + " && head -c 1M /dev/zero >> " + s / "src" +
                  " && head -c 1049576 /dev/urandom >> " + s / "src",
              &out) == 0);
  const std::string src = slurp(s / "src");
  REQUIRE(src.size() == 3 * 1048576 + 1000);
  encrypt_params p;
  p.key_file = s / "k";
  p.iter_time_us = 1000;
  SecureBytes pass;
  REQUIRE(iofilterfs::encrypt::read_passphrase(p, &pass) == "");
  for (bool sparse : {false, true}) {
    INFO("sparse " << sparse);
    const std::string dst = s / (sparse ? "dst-sparse" : "dst");
    int in = ::open((s / "src").c_str(), O_RDONLY);
    int outfd = ::open(dst.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    REQUIRE(in >= 0);
    REQUIRE(outfd >= 0);
    iofilterfs::encrypt::ConvertStats st;
    uint64_t last = 0;
    CHECK(iofilterfs::encrypt::encrypt_image(in, outfd, p, pass, sparse, &st, [&](uint64_t d, uint64_t) { last = d; }) ==
          "");
    CHECK(last == src.size());
    CHECK(st.payload_bytes == 3 * 1048576 + 1024);
    CHECK(st.payload_offset == 2 * 1048576);
    CHECK(st.skipped_bytes == (sparse ? 1048576u : 0u));
    CHECK(st.encrypted_bytes + st.skipped_bytes == st.payload_bytes);
    // Not over a file that is not empty, nor from a container.
    CHECK(iofilterfs::encrypt::encrypt_image(in, outfd, p, pass, sparse, &st) == "the destination is not empty");
    ::close(in);
    ::close(outfd);
    const std::string enc = slurp(dst);
    CHECK(enc.size() == 2 * 1048576 + 3 * 1048576 + 1024);
    CHECK(enc.find(src.substr(100, 64)) == std::string::npos);
    CHECK(run("cryptsetup open --test-passphrase --key-file " + s / "k" + " " + dst, &out) == 0);
    if (!sparse) {
      REQUIRE(run("qemu-img convert --object secret,id=s,file=" + s / "k" +
                      " --image-opts driver=luks,key-secret=s,file.filename=" + dst + " -O raw " + s / "plain",
                  &out) == 0);
      CHECK(slurp(s / "plain") == src + std::string(24, '\0'));
    }
    // Through the filter (holes read as zeros).
    Rig r;
    r.mem.data.assign(enc.begin(), enc.end());
    r.params = p;
    auto f = r.open_ok();
    std::vector<uint8_t> all = read_all(*f);
    CHECK(std::string(all.begin(), all.end()) == src + std::string(24, '\0'));
  }
  int in = ::open((s / "dst").c_str(), O_RDONLY);
  int outfd = ::open((s / "again").c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  iofilterfs::encrypt::ConvertStats st;
  CHECK(iofilterfs::encrypt::encrypt_image(in, outfd, p, pass, false, &st) == "the source is already a LUKS container");
  ::close(in);
  ::close(outfd);
}

TEST_CASE("encrypt: the at-rest sealer gives exactly the backing file's bytes and outlives the filter",
          "[encrypt][at-rest]") {
  Rig r;
  auto f = r.open_ok();
  std::shared_ptr<const iofilterfs::AtRest> seal = f->at_rest();
  REQUIRE(seal);
  const uint64_t payload = f->payload_offset();
  CHECK(seal->header_bytes() == payload);
  std::vector<uint8_t> plain(64 * 1024);
  uint64_t s = 42;
  for (auto& b : plain) b = static_cast<uint8_t>(rnd(s));
  const uint64_t off = 3 * 512 * 1024 + 4096;
  REQUIRE(f->write(Io{}, plain.data(), plain.size(), off).ok());

  // Sealed == what the filter stored below, byte for byte (same key, same plain64 IVs).
  std::vector<uint8_t> sealed(plain.size()), back(plain.size());
  REQUIRE(seal->seal(off, plain.data(), sealed.data(), plain.size()).ok());
  CHECK(std::memcmp(sealed.data(), r.mem.data.data() + payload + off, sealed.size()) == 0);
  CHECK(std::memcmp(sealed.data(), plain.data(), 512) != 0);
  REQUIRE(seal->unseal(off, sealed.data(), back.data(), back.size()).ok());
  CHECK(back == plain);
  // In place, and only whole sectors.
  std::vector<uint8_t> inplace = plain;
  REQUIRE(seal->seal(off, inplace.data(), inplace.data(), inplace.size()).ok());
  CHECK(inplace == sealed);
  CHECK(seal->seal(off + 1, plain.data(), sealed.data(), 512).err == EINVAL);
  CHECK(seal->unseal(off, plain.data(), sealed.data(), 100).err == EINVAL);

  // The header as the backing file holds it.
  std::vector<uint8_t> head(4096);
  REQUIRE(seal->read_header(head.data(), head.size(), 0).ok());
  CHECK(std::memcmp(head.data(), r.mem.data.data(), head.size()) == 0);
  CHECK(seal->read_header(head.data(), 2, payload - 1).err == EINVAL);

  // The filter closes (a re-plumb replaced it): a filter above that kept the sealer keeps sealing.
  f->close();
  f.reset();
  std::vector<uint8_t> again(plain.size());
  REQUIRE(seal->seal(off, plain.data(), again.data(), plain.size()).ok());
  CHECK(again == sealed);
}

TEST_CASE("encrypt: refuses to leave an open disk", "[encrypt][at-rest]") {
  Rig r;
  auto f = r.open_ok();
  CHECK(f->removal_refused().find("encrypt cannot leave an open disk") == 0);
}

TEST_CASE("the data path's XTS (every engine) equals OpenSSL's XTS byte for byte", "[encrypt][luks]") {
  using Engine = iofilterfs::encrypt::XtsKey::Engine;
  const bool aesni = iofilterfs::encrypt::aesni::available();
  const bool wide = iofilterfs::encrypt::aesni::wide_available();
  if (!aesni) WARN("this CPU has no AES-NI: only the portable engine is tested");
  else if (!wide) WARN("this CPU has no 512-bit VAES: the wide form is not tested");
  const Engine engine = GENERATE(Engine::kPortable, Engine::kAesni, Engine::kBest);
  for (size_t key_bytes : {size_t{32}, size_t{64}}) {
    iofilterfs::encrypt::SecureBytes key(key_bytes);
    REQUIRE(RAND_bytes(key.data(), static_cast<int>(key_bytes)) == 1);
    auto x = iofilterfs::encrypt::XtsKey::create(key, engine);
    REQUIRE(x);
    CHECK(x->accelerated() == (engine != Engine::kPortable && aesni));
    CHECK(x->wide() == (engine == Engine::kBest && wide));
    for (size_t n : {size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{63}, size_t{64}, size_t{65}, size_t{200}}) {
      for (uint64_t first : {uint64_t{0}, uint64_t{12345}, (uint64_t{1} << 32) - 3, ~uint64_t{0} - 300}) {
        INFO("key " << key_bytes << " sectors " << n << " first " << first);
        std::vector<uint8_t> pt(n * 512), want(n * 512), got(n * 512), back(n * 512);
        REQUIRE(RAND_bytes(pt.data(), static_cast<int>(pt.size())) == 1);
        REQUIRE(l1::xts_crypt(true, key.data(), key_bytes, pt.data(), want.data(), n, first));
        REQUIRE(x->encrypt(pt.data(), got.data(), n, first));
        CHECK(got == want);
        REQUIRE(x->decrypt(got.data(), back.data(), n, first, false));
        CHECK(back == pt);
        // In place, both ways.
        std::vector<uint8_t> inplace = pt;
        REQUIRE(x->encrypt(inplace.data(), inplace.data(), n, first));
        CHECK(inplace == want);
        REQUIRE(x->decrypt(inplace.data(), inplace.data(), n, first, true));
        CHECK(inplace == pt);
      }
    }
    // A hole (an all-zero ciphertext sector) reads as zeros among real sectors.
    std::vector<uint8_t> pt(70 * 512, 0xab), ct(70 * 512), out(70 * 512);
    REQUIRE(x->encrypt(pt.data(), ct.data(), 70, 7));
    std::memset(ct.data() + 66 * 512, 0, 512);
    REQUIRE(x->decrypt(ct.data(), out.data(), 70, 7, true));
    CHECK(std::all_of(out.begin() + 66 * 512, out.begin() + 67 * 512, [](uint8_t b) { return b == 0; }));
    CHECK(std::equal(out.begin(), out.begin() + 66 * 512, pt.begin()));
    CHECK(std::equal(out.begin() + 67 * 512, out.end(), pt.begin() + 67 * 512));
  }
  // As OpenSSL's XTS: equal key halves are refused.
  iofilterfs::encrypt::SecureBytes same(64);
  std::memset(same.data(), 7, 64);
  CHECK_FALSE(iofilterfs::encrypt::XtsKey::create(same));
}
