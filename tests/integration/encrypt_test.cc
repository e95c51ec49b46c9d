// The encrypt filter through a real mount, with cryptsetup and QEMU as the independent readers
// and writers of the LUKS1 containers it leaves in the backing directory: bytes written through
// the mount come back equal there and through qemu-img; images formatted by cryptsetup and
// qemu-img open through the mount; plaintext and wrong keys are refused at open; the backing
// file never holds the plaintext; truncate/grow/punch/zero; fio verify.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

#include "mount.h"

using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;
using testing::write_file;

namespace {

const char* kPass = "integration passphrase";

// A datastore whose *.raw and *.qcow2 images are encrypted with the key file t/k.
struct EncryptedDatastore {
  TempDir t;
  std::unique_ptr<Mount> m;
  explicit EncryptedDatastore(const std::string& extra = "") {
    sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
    write_file(t / "k", kPass);
    REQUIRE(chmod((t / "k").c_str(), 0600) == 0);
    write_file(t / "ds.yaml", "datastore:\n  images: [\"*.raw\", \"*.qcow2\"]\npolicies:\n  secret:\n"
                              "    encrypt: { key-file: " + t / "k" + ", pbkdf-iter-time: 10ms" + extra +
                                  " }\n  clear:\nrules:\n  - { match: \"clear/*\", policy: clear }\n"
                                  "  - { match: \"*\", policy: secret }\n");
    m = std::make_unique<Mount>(t / "b", t / "m", Mount::Options{{"--config", t / "ds.yaml"}});
  }
  std::string mnt(const std::string& rel) const { return m->path(rel); }
  std::string back(const std::string& rel) const { return t / ("b/" + rel); }
  // qemu-img's view of the backing file, decrypted by QEMU's luks driver with the key file.
  std::string qemu_luks(const std::string& rel) const {
    return "--object secret,id=s,file=" + q(t / "k") + " --image-opts driver=luks,key-secret=s,file.filename=" +
           q(back(rel));
  }
};

uint64_t file_size(const std::string& path) {
  struct stat st {};
  REQUIRE(stat(path.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_size);
}

// pwrite of a whole buffer to both the image through the mount and a local model file.
void pwrite_both(int fd, int model, const std::string& data, off_t off) {
  REQUIRE(pwrite(fd, data.data(), data.size(), off) == static_cast<ssize_t>(data.size()));
  REQUIRE(pwrite(model, data.data(), data.size(), off) == static_cast<ssize_t>(data.size()));
}

int count_lines_with(const std::string& text, const std::string& needle) {
  std::istringstream in(text);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) n += line.find(needle) != std::string::npos;
  return n;
}

}  // namespace

TEST_CASE("written through the mount, read by cryptsetup and qemu-img: a LUKS1 container with the same bytes",
          "[encrypt][cryptsetup][qemu]") {
  EncryptedDatastore ds;
  std::string out;
  // 8 MiB of random data with O_DIRECT, then unaligned writes (one with a marker string) over it.
  REQUIRE(sh("head -c 8M /dev/urandom > " + q(ds.t / "model") + " && dd if=" + q(ds.t / "model") + " of=" +
                 q(ds.mnt("disk.raw")) + " bs=1M oflag=direct conv=fsync status=none",
             &out) == 0);
  {
    int fd = open(ds.mnt("disk.raw").c_str(), O_RDWR);
    int model = open((ds.t / "model").c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    REQUIRE(model >= 0);
    std::string marker;
    for (int i = 0; i < 100; ++i) marker += "IOFILTERFS-SECRET-MARKER ";
    pwrite_both(fd, model, marker, 12345);
    pwrite_both(fd, model, std::string(7777, 'x'), 1 << 20 | 3);
    pwrite_both(fd, model, std::string(1, 'y'), 4095);
    pwrite_both(fd, model, marker, 8 * 1024 * 1024 - 3000);  // up to the end
    CHECK(file_size(ds.mnt("disk.raw")) == 8u << 20);  // open: the chain's size
    std::string stats = testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.stats");
    INFO(stats);
    CHECK(stats.find("\"encrypt\":{\"cipher\":\"aes-xts-plain64\",\"key_bits\":512,\"hash\":\"sha256\"") !=
          std::string::npos);
    CHECK(stats.find(kPass) == std::string::npos);
    CHECK(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.chain").find("encrypt") != std::string::npos);
    close(model);
    close(fd);
  }
  CHECK(sh("cmp " + q(ds.t / "model") + " " + q(ds.mnt("disk.raw")), &out) == 0);
  // Closed: the size is still the payload's; the backing file has the 2 MiB header more.
  CHECK(file_size(ds.mnt("disk.raw")) == 8u << 20);
  CHECK(file_size(ds.back("disk.raw")) == 10u << 20);
  // No plaintext in the backing file.
  CHECK(sh("grep -c IOFILTERFS-SECRET " + q(ds.back("disk.raw")), &out) == 1);
  CHECK(sh("grep -c IOFILTERFS-SECRET " + q(ds.t / "model"), &out) == 0);

  // cryptsetup: a valid LUKS1 header, and the key opens it; another does not.
  REQUIRE(sh("cryptsetup luksDump " + q(ds.back("disk.raw")), &out) == 0);
  INFO(out);
  CHECK(out.find("Version:       \t1") != std::string::npos);
  CHECK(out.find("Cipher name:   \taes") != std::string::npos);
  CHECK(out.find("Cipher mode:   \txts-plain64") != std::string::npos);
  CHECK(out.find("Hash spec:     \tsha256") != std::string::npos);
  CHECK(out.find("Payload offset:\t4096") != std::string::npos);
  CHECK(out.find("MK bits:       \t512") != std::string::npos);
  CHECK(out.find("Key Slot 0: ENABLED") != std::string::npos);
  CHECK(out.find("Key Slot 1: DISABLED") != std::string::npos);
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k") + " " + q(ds.back("disk.raw")), &out) == 0);
  write_file(ds.t / "wrong", "not the passphrase");
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "wrong") + " " + q(ds.back("disk.raw")), &out) ==
        2);

  // QEMU's luks driver decrypts exactly what was written.
  REQUIRE(sh("qemu-img convert " + ds.qemu_luks("disk.raw") + " -O raw " + q(ds.t / "out"), &out) == 0);
  CHECK(sh("cmp " + q(ds.t / "model") + " " + q(ds.t / "out"), &out) == 0);
  REQUIRE(sh("qemu-img info " + ds.qemu_luks("disk.raw"), &out) == 0);
  CHECK(out.find("virtual size: 8 MiB (8388608 bytes)") != std::string::npos);
}

TEST_CASE("images formatted by cryptsetup luksFormat and by qemu-img create -f luks open through the mount",
          "[encrypt][cryptsetup][qemu]") {
  EncryptedDatastore ds;
  std::string out;
  // cryptsetup, LUKS1, a 256-bit key and sha1: whatever the header says is used.
  REQUIRE(sh("truncate -s 6M " + q(ds.back("cs.raw")) + " && cryptsetup luksFormat --type luks1 --key-size 256 "
             "--hash sha1 --pbkdf-force-iterations 1000 --batch-mode --key-file " + q(ds.t / "k") + " " +
                 q(ds.back("cs.raw")),
             &out) == 0);
  CHECK(file_size(ds.mnt("cs.raw")) == 4u << 20);  // 6 MiB less cryptsetup's 2 MiB header
  CHECK(sh("cmp -n 4194304 " + q(ds.mnt("cs.raw")) + " /dev/zero", &out) == 0);  // unwritten: zeros
  REQUIRE(sh("head -c 3M /dev/urandom > " + q(ds.t / "src") + " && dd if=" + q(ds.t / "src") + " of=" +
                 q(ds.mnt("cs.raw")) + " bs=64k conv=notrunc,fsync status=none",
             &out) == 0);
  CHECK(sh("cmp -n 3145728 " + q(ds.t / "src") + " " + q(ds.mnt("cs.raw")), &out) == 0);
  REQUIRE(sh("qemu-img convert " + ds.qemu_luks("cs.raw") + " -O raw " + q(ds.t / "cs.out"), &out) == 0);
  CHECK(sh("cmp -n 3145728 " + q(ds.t / "src") + " " + q(ds.t / "cs.out"), &out) == 0);

  // qemu-img (its payload offset is not 1 MiB aligned), and data qemu-io wrote read through the mount.
  REQUIRE(sh("for i in $(seq 30); do qemu-img create -f luks --object secret,id=s,file=" + q(ds.t / "k") +
                 " -o key-secret=s,iter-time=10 " + q(ds.back("q.raw")) + " 4M && break; done && qemu-io " +
                 ds.qemu_luks("q.raw") + " -c 'write -P 0x5a 65536 131072'",
             &out) == 0);
  CHECK(file_size(ds.mnt("q.raw")) == 4u << 20);
  REQUIRE(sh("head -c 131072 /dev/zero | tr '\\0' '\\132' > " + q(ds.t / "pattern"), &out) == 0);
  CHECK(sh("cmp -i 65536:0 -n 131072 " + q(ds.mnt("q.raw")) + " " + q(ds.t / "pattern"), &out) == 0);
  // Written through the mount, read by qemu-io.
  REQUIRE(sh("dd if=" + q(ds.t / "pattern") + " of=" + q(ds.mnt("q.raw")) +
                 " bs=4096 seek=256 conv=notrunc,fsync status=none",
             &out) == 0);
  CHECK(sh("qemu-io " + ds.qemu_luks("q.raw") + " -c 'read -P 0x5a 1048576 131072'", &out) == 0);
  INFO(out);
  CHECK(out.find("Pattern verification failed") == std::string::npos);
  CHECK(out.find("read 131072/131072 bytes at offset 1048576") != std::string::npos);
}

TEST_CASE("a plaintext image and a wrong key are refused at open, with one log line and nothing written",
          "[encrypt]") {
  EncryptedDatastore ds;
  std::string out;
  REQUIRE(sh("head -c 1M /dev/urandom > " + q(ds.back("plain.raw")) + " && cp " + q(ds.back("plain.raw")) + " " +
                 q(ds.t / "plain.copy"),
             &out) == 0);
  int fd = open(ds.mnt("plain.raw").c_str(), O_RDONLY);
  int err = errno;
  CHECK(fd < 0);
  CHECK(err == EMEDIUMTYPE);
  if (fd >= 0) close(fd);
  CHECK(sh("cmp " + q(ds.back("plain.raw")) + " " + q(ds.t / "plain.copy"), &out) == 0);
  CHECK(ds.m->log().find("plain.raw: open refused: encrypt: the image has no LUKS header") != std::string::npos);

  // A container whose only keyslot takes another passphrase.
  write_file(ds.t / "other", "some other passphrase");
  REQUIRE(sh("truncate -s 4M " + q(ds.back("wrong.raw")) + " && cryptsetup luksFormat --type luks1 "
             "--pbkdf-force-iterations 1000 --batch-mode --key-file " + q(ds.t / "other") + " " +
                 q(ds.back("wrong.raw")) + " && md5sum < " + q(ds.back("wrong.raw")) + " > " + q(ds.t / "wrong.md5"),
             &out) == 0);
  fd = open(ds.mnt("wrong.raw").c_str(), O_RDWR);
  err = errno;
  CHECK(fd < 0);
  CHECK(err == EACCES);
  if (fd >= 0) close(fd);
  CHECK(sh("md5sum < " + q(ds.back("wrong.raw")) + " | cmp - " + q(ds.t / "wrong.md5"), &out) == 0);
  const std::string log = ds.m->log();
  INFO(log);
  CHECK(count_lines_with(log, "wrong.raw") == 1);
  CHECK(log.find("wrong.raw: open refused: encrypt: the policy's passphrase opens no keyslot of the LUKS header") !=
        std::string::npos);
  CHECK(log.find(kPass) == std::string::npos);
  CHECK(log.find("some other passphrase") == std::string::npos);
  // Unencrypted neighbours are untouched by the policy.
  REQUIRE(sh("mkdir -p " + q(ds.mnt("clear")) + " && echo hello > " + q(ds.mnt("clear/c.raw")), &out) == 0);
  CHECK(read_file(ds.back("clear/c.raw")) == "hello\n");
}

TEST_CASE("a key file others may read is refused when the policy is loaded, naming the file", "[encrypt]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  write_file(t / "k", kPass);
  REQUIRE(chmod((t / "k").c_str(), 0644) == 0);
  write_file(t / "ds.yaml", "policies:\n  secret:\n    encrypt: { key-file: " + t / "k" + " }\n");
  std::string out;
  CHECK(sh(q(testing::daemon_binary()) + " check-config " + q(t / "ds.yaml"), &out) == 2);
  CHECK(out == t / "ds.yaml" + ":3:26: encrypt: key file '" + t / "k" +
                   "' must be owned by root and neither readable nor writable by group or others (it is owned by uid 0 "
                   "with mode 0644; chown root and chmod 600 it)\n");
  CHECK(out.find(kPass) == std::string::npos);
}

TEST_CASE("truncate, grow, punch-hole and zero-range through the mount act on the payload", "[encrypt]") {
  EncryptedDatastore ds;
  std::string out;
  REQUIRE(sh("truncate -s 10M " + q(ds.mnt("g.raw")), &out) == 0);
  CHECK(file_size(ds.mnt("g.raw")) == 10u << 20);
  CHECK(file_size(ds.back("g.raw")) == 12u << 20);
  CHECK(sh("cmp -n 10485760 " + q(ds.mnt("g.raw")) + " /dev/zero", &out) == 0);
  REQUIRE(sh("head -c 4M /dev/urandom > " + q(ds.t / "src") + " && dd if=" + q(ds.t / "src") + " of=" +
                 q(ds.mnt("g.raw")) + " bs=1M seek=1 conv=notrunc,fsync status=none && cp " + q(ds.t / "src") + " " +
                 q(ds.t / "keep"),
             &out) == 0);
  // Shrink to 3 MiB (keeps 2 MiB of the data), grow to 8 MiB: the new part reads as zeros.
  REQUIRE(sh("truncate -s 3M " + q(ds.mnt("g.raw")), &out) == 0);
  CHECK(file_size(ds.mnt("g.raw")) == 3u << 20);
  CHECK(file_size(ds.back("g.raw")) == 5u << 20);
  REQUIRE(sh("truncate -s 8M " + q(ds.mnt("g.raw")), &out) == 0);
  CHECK(file_size(ds.mnt("g.raw")) == 8u << 20);
  CHECK(sh("cmp -n 2097152 -i 0:1048576 " + q(ds.t / "keep") + " " + q(ds.mnt("g.raw")), &out) == 0);
  CHECK(sh("cmp -n 5242880 -i 3145728:0 " + q(ds.mnt("g.raw")) + " /dev/zero", &out) == 0);
  // Sizes are whole sectors.
  CHECK(sh("truncate -s 1000 " + q(ds.mnt("g.raw")), &out) != 0);
  CHECK(file_size(ds.mnt("g.raw")) == 8u << 20);
  // Punch a hole (unaligned ends) and zero a range: zeros through the mount, the rest intact.
  REQUIRE(sh("fallocate -p -o 1049000 -l 300000 " + q(ds.mnt("g.raw")) + " && fallocate -z -o 2000000 -l 70000 " +
                 q(ds.mnt("g.raw")),
             &out) == 0);
  CHECK(sh("cmp -n 300000 -i 1049000:0 " + q(ds.mnt("g.raw")) + " /dev/zero", &out) == 0);
  CHECK(sh("cmp -n 70000 -i 2000000:0 " + q(ds.mnt("g.raw")) + " /dev/zero", &out) == 0);
  // g.raw[1 MiB + x] is keep[x]: before the hole, between hole and zeros, after the zeros.
  CHECK(sh("cmp -n 424 -i 0:1048576 " + q(ds.t / "keep") + " " + q(ds.mnt("g.raw")), &out) == 0);
  CHECK(sh("cmp -n 651000 -i 300424:1349000 " + q(ds.t / "keep") + " " + q(ds.mnt("g.raw")), &out) == 0);
  CHECK(sh("cmp -n 1075728 -i 1021424:2070000 " + q(ds.t / "keep") + " " + q(ds.mnt("g.raw")), &out) == 0);
  CHECK(file_size(ds.mnt("g.raw")) == 8u << 20);
  // The zeroed range is encrypted zeros: QEMU reads zeros there too.
  REQUIRE(sh("qemu-img convert " + ds.qemu_luks("g.raw") + " -O raw " + q(ds.t / "g.out"), &out) == 0);
  CHECK(sh("cmp -n 70000 -i 2000000:0 " + q(ds.t / "g.out") + " /dev/zero", &out) == 0);
  // O_TRUNC through the mount empties the payload and keeps the header.
  REQUIRE(sh(": > " + q(ds.mnt("g.raw")), &out) == 0);
  CHECK(file_size(ds.mnt("g.raw")) == 0);
  CHECK(file_size(ds.back("g.raw")) == 2u << 20);
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k") + " " + q(ds.back("g.raw")), &out) == 0);
}

TEST_CASE("the plain64 tweak is the full 64-bit sector number (data past 2 TiB)", "[encrypt][qemu]") {
  EncryptedDatastore ds;
  std::string out;
  const uint64_t off = (uint64_t{5} << 39) + 4096;  // 2.5 TiB: sector numbers above 2^32
  {
    int fd = open(ds.mnt("big.raw").c_str(), O_RDWR | O_CREAT, 0600);
    REQUIRE(fd >= 0);
    std::string data(8192, 'Z');
    REQUIRE(pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)) == 8192);
    char back[8192];
    REQUIRE(pread(fd, back, sizeof back, static_cast<off_t>(off)) == 8192);
    CHECK(std::string(back, sizeof back) == data);
    close(fd);
  }
  REQUIRE(sh("qemu-io " + ds.qemu_luks("big.raw") + " -c 'read -P 0x5a " + std::to_string(off) + " 8192'", &out) == 0);
  INFO(out);
  CHECK(out.find("Pattern verification failed") == std::string::npos);
  CHECK(out.find("read 8192/8192 bytes") != std::string::npos);
}

TEST_CASE("fio verify through encryption: direct random writes from several jobs, and unaligned buffered I/O",
          "[encrypt][fio]") {
  EncryptedDatastore ds;
  std::string out;
  int rc = sh("cd " + q(ds.t.path()) + " && fio --name=verify --filename=" + q(ds.mnt("fio.raw")) +
                  " --size=16M --offset_increment=16M --numjobs=4 --rw=randwrite --bs=4k --ioengine=libaio"
                  " --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0"
                  " --output-format=json --output=fio.json",
              &out);
  INFO(out << read_file(ds.t / "fio.json") << ds.m->log());
  REQUIRE(rc == 0);
  std::string json = read_file(ds.t / "fio.json");
  CHECK(json.find("\"error\" : 0") != std::string::npos);
  CHECK(json.find("\"error\" : 5") == std::string::npos);
  rc = sh("cd " + q(ds.t.path()) + " && fio --name=unaligned --filename=" + q(ds.mnt("fio2.raw")) +
              " --size=8M --rw=randwrite --bsrange=1000-70000 --bs_unaligned=1 --ioengine=psync --numjobs=1"
              " --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=json --output=fio2.json",
          &out);
  INFO(out << read_file(ds.t / "fio2.json"));
  REQUIRE(rc == 0);
  CHECK(read_file(ds.t / "fio2.json").find("\"error\" : 0") != std::string::npos);
  // QEMU reads the same bytes as the mount.
  REQUIRE(sh("qemu-img convert " + ds.qemu_luks("fio.raw") + " -O raw " + q(ds.t / "fio.out"), &out) == 0);
  CHECK(sh("cmp " + q(ds.t / "fio.out") + " " + q(ds.mnt("fio.raw")), &out) == 0);
}

TEST_CASE("a qcow2 image under encryption: qemu-img through the mount, and QEMU's qcow2-over-luks on the backing file",
          "[encrypt][qemu]") {
  EncryptedDatastore ds;
  std::string out;
  REQUIRE(sh("qemu-img create -f qcow2 " + q(ds.mnt("vm.qcow2")) + " 64M && qemu-io -f qcow2 " + q(ds.mnt("vm.qcow2")) +
                 " -c 'write -P 0x33 1M 256k' && qemu-img check " + q(ds.mnt("vm.qcow2")),
             &out) == 0);
  INFO(out);
  // No qcow2 header in the clear: its magic and version (8 bytes; the magic alone, 3 letters,
  // turns up by chance in a megabyte of ciphertext about once in 16 runs).
  CHECK(sh("LC_ALL=C grep -caP '\\x51\\x46\\x49\\xfb\\x00\\x00\\x00[\\x02\\x03]' " + q(ds.back("vm.qcow2")), &out) == 1);
  const std::string opts = "--object secret,id=s,file=" + q(ds.t / "k") +
                           " --image-opts driver=qcow2,file.driver=luks,file.key-secret=s,file.file.filename=" +
                           q(ds.back("vm.qcow2"));
  REQUIRE(sh("qemu-img info " + opts, &out) == 0);
  CHECK(out.find("file format: qcow2") != std::string::npos);
  CHECK(out.find("virtual size: 64 MiB") != std::string::npos);
  REQUIRE(sh("qemu-io " + opts + " -c 'read -P 0x33 1M 256k'", &out) == 0);
  CHECK(out.find("Pattern verification failed") == std::string::npos);
  CHECK(out.find("read 262144/262144 bytes") != std::string::npos);
}

namespace {

std::string ctl() {
  std::string d = testing::daemon_binary();
  return q(d.substr(0, d.rfind('/')) + "/iofilterctl");
}

}  // namespace

TEST_CASE("iofilterctl encrypt converts a plaintext image offline, and cryptsetup, QEMU and the mount read it back",
          "[encrypt][ctl][cryptsetup][qemu]") {
  EncryptedDatastore ds;
  std::string out;
  // 5 MiB + 100 bytes of plaintext with a marker and a zero MiB in the middle.
  REQUIRE(sh("head -c 5M /dev/urandom > " + q(ds.t / "plain") + " && dd if=/dev/zero of=" + q(ds.t / "plain") +
                 " bs=1M seek=2 count=1 conv=notrunc status=none && printf 'IOFILTERFS-CONVERT-MARKER%.0s' $(seq 100) "
                 ">> " + q(ds.t / "plain"),
             &out) == 0);
  REQUIRE(sh(ctl() + " encrypt " + q(ds.t / "plain") + " " + q(ds.back("conv.raw")) + " --key-file " + q(ds.t / "k") +
                 " --iter-time 10ms",
             &out) == 0);
  INFO(out);
  CHECK(out.find("conv.raw: encrypted") != std::string::npos);
  CHECK(out.find(kPass) == std::string::npos);
  CHECK(sh("grep -c IOFILTERFS-CONVERT " + q(ds.back("conv.raw")), &out) == 1);
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k") + " " + q(ds.back("conv.raw")), &out) == 0);
  // Through the mount: the plaintext, padded with zeros to whole sectors.
  REQUIRE(sh("cp " + q(ds.t / "plain") + " " + q(ds.t / "padded") + " && truncate -s %512 " + q(ds.t / "padded"),
             &out) == 0);
  CHECK(sh("cmp " + q(ds.t / "padded") + " " + q(ds.mnt("conv.raw")), &out) == 0);
  REQUIRE(sh("qemu-img convert " + ds.qemu_luks("conv.raw") + " -O raw " + q(ds.t / "qout"), &out) == 0);
  CHECK(sh("cmp " + q(ds.t / "padded") + " " + q(ds.t / "qout"), &out) == 0);

  // Refusals: an existing destination; a source the daemon has open for writing; a missing key.
  CHECK(sh(ctl() + " encrypt " + q(ds.t / "plain") + " " + q(ds.back("conv.raw")) + " --key-file " + q(ds.t / "k"),
           &out) == 1);
  CHECK(out.find("File exists (it must not exist yet)") != std::string::npos);
  int fd = open(ds.mnt("busy.raw").c_str(), O_RDWR | O_CREAT, 0600);
  REQUIRE(fd >= 0);
  REQUIRE(pwrite(fd, "x", 1, 0) == 1);
  CHECK(sh(ctl() + " encrypt " + q(ds.back("busy.raw")) + " " + q(ds.t / "busy.luks") + " --key-file " +
               q(ds.t / "k"),
           &out) == 1);
  CHECK(out.find("the image is in use") != std::string::npos);
  CHECK(access((ds.t / "busy.luks").c_str(), F_OK) != 0);
  close(fd);
  CHECK(sh(ctl() + " encrypt " + q(ds.t / "plain") + " " + q(ds.t / "x.luks") + " --key-file " + q(ds.t / "nokey"),
           &out) == 1);
  CHECK(out.find("cannot be read: No such file or directory") != std::string::npos);
  CHECK(access((ds.t / "x.luks").c_str(), F_OK) != 0);
}

TEST_CASE("iofilterctl key add, list and remove rotate passphrases without re-encrypting, and the last one stays",
          "[encrypt][ctl][cryptsetup]") {
  EncryptedDatastore ds;
  std::string out;
  REQUIRE(sh("head -c 3M /dev/urandom > " + q(ds.t / "model") + " && cp " + q(ds.t / "model") + " " +
                 q(ds.mnt("disk.raw")),
             &out) == 0);
  write_file(ds.t / "k2", "the second passphrase");
  REQUIRE(chmod((ds.t / "k2").c_str(), 0600) == 0);
  const std::string img = q(ds.back("disk.raw"));
  const std::string payload_md5 = "tail -c +2097153 " + img + " | md5sum";
  std::string before;
  REQUIRE(sh(payload_md5, &before) == 0);

  // While the disk is open in the daemon, the header is not touched.
  {
    int fd = open(ds.mnt("disk.raw").c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    CHECK(sh(ctl() + " key add " + img + " --key-file " + q(ds.t / "k") + " --new-key-file " + q(ds.t / "k2"), &out) ==
          1);
    CHECK(out.find("the image is in use") != std::string::npos);
    close(fd);
  }
  // A wrong existing passphrase: exit 4, nothing written.
  write_file(ds.t / "wrong", "wrong");
  CHECK(sh(ctl() + " key add " + img + " --key-file " + q(ds.t / "wrong") + " --new-key-file " + q(ds.t / "k2"),
           &out) == 4);
  CHECK(out.find("opens no keyslot") != std::string::npos);

  REQUIRE(sh(ctl() + " key add " + img + " --key-file " + q(ds.t / "k") + " --new-key-file " + q(ds.t / "k2") +
                 " --iter-time 10ms",
             &out) == 0);
  CHECK(out.find("passphrase added in keyslot 1") != std::string::npos);
  REQUIRE(sh(ctl() + " --json key list " + img, &out) == 0);
  CHECK(out.find("{\"slot\":0,\"active\":true") != std::string::npos);
  CHECK(out.find("{\"slot\":1,\"active\":true") != std::string::npos);
  CHECK(out.find("{\"slot\":2,\"active\":false") != std::string::npos);
  CHECK(out.find(kPass) == std::string::npos);
  CHECK(out.find("the second passphrase") == std::string::npos);
  // Both open it, in cryptsetup and through the mount.
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k") + " " + img, &out) == 0);
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k2") + " " + img, &out) == 0);
  CHECK(sh("cmp " + q(ds.t / "model") + " " + q(ds.mnt("disk.raw")), &out) == 0);

  // Remove the first passphrase: it stops opening the image, the second still does, and the
  // data was never re-encrypted.
  REQUIRE(sh(ctl() + " key remove " + img + " --key-file " + q(ds.t / "k"), &out) == 0);
  CHECK(out.find("keyslot 0 removed") != std::string::npos);
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k") + " " + img, &out) == 2);
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k2") + " " + img, &out) == 0);
  std::string after;
  REQUIRE(sh(payload_md5, &after) == 0);
  CHECK(after == before);
  int fd = open(ds.mnt("disk.raw").c_str(), O_RDONLY);
  CHECK(fd < 0);
  CHECK(errno == EACCES);
  if (fd >= 0) close(fd);
  // The policy moves to the second key (a reload): the image opens again, with its data.
  write_file(ds.t / "k", "the second passphrase");
  REQUIRE(testing::set_xattr(ds.m->mountpoint(), "user.iofilter.reload", "1") == 0);
  CHECK(sh("cmp " + q(ds.t / "model") + " " + q(ds.mnt("disk.raw")), &out) == 0);

  // The last keyslot is never removed.
  CHECK(sh(ctl() + " key remove " + img + " --key-file " + q(ds.t / "k2") + " --slot 1", &out) == 1);
  CHECK(out.find("is the last one") != std::string::npos);
  CHECK(sh("cryptsetup open --test-passphrase --key-file " + q(ds.t / "k2") + " " + img, &out) == 0);
}

TEST_CASE("a reload that drops encrypt from an open disk is refused for that disk, which keeps serving plaintext",
          "[encrypt][reload]") {
  EncryptedDatastore ds;
  std::string out;
  REQUIRE(sh("head -c 1M /dev/urandom > " + q(ds.t / "model") + " && cp " + q(ds.t / "model") + " " +
                 q(ds.mnt("disk.raw")),
             &out) == 0);
  int fd = open(ds.mnt("disk.raw").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  write_file(ds.t / "ds.yaml", "datastore:\n  images: [\"*.raw\"]\npolicies:\n  secret:\n  clear:\n"
                               "rules:\n  - { match: \"*\", policy: secret }\n");
  CHECK(testing::set_xattr(ds.m->mountpoint(), "user.iofilter.reload", "1") == EIO);
  CHECK(ds.m->log().find("disk.raw: keeps its old chain, re-plumbing to policy secret failed: encrypt cannot leave "
                         "an open disk") != std::string::npos);
  CHECK(testing::get_xattr(ds.mnt("disk.raw"), "user.iofilter.chain").find("encrypt") != std::string::npos);
  std::string buf(1 << 20, '\0');
  CHECK(pread(fd, buf.data(), buf.size(), 0) == static_cast<ssize_t>(buf.size()));
  CHECK(buf == read_file(ds.t / "model"));
  close(fd);
  // Closed, the disk follows the new policy: the container itself (the native view), 2 MiB more.
  // The kernel sends the release after close(2) returns: wait for it (slow under ASan).
  for (int i = 0; i < 500 && file_size(ds.mnt("disk.raw")) != 3u << 20; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(file_size(ds.mnt("disk.raw")) == 3u << 20);
}
