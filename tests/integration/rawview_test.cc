// The raw view through a real mount: a qcow2 image under `view: raw` appears as NAME.raw, its
// guest disk. QEMU's tools are the reference: the view reads as `qemu-img convert -O raw`,
// writes through it leave an image `qemu-img check` calls clean, and a daemon killed mid-write
// leaves an image with no corruption and every fsync'd write in it.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include "mount.h"

using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;

namespace {

void must(const std::string& cmd) {
  std::string out;
  int rc = sh(cmd, &out);
  INFO(cmd << "\n" << out);
  REQUIRE(rc == 0);
}

// A datastore whose images are in the raw view, except under native/.
void write_policy(const TempDir& t) {
  testing::write_file(t / "ds.yaml",
                      "datastore:\n  view: raw\npolicies:\n  plain:\n    view: native\n"
                      "rules:\n  - { match: \"native/*\", policy: plain }\n");
}

}  // namespace

TEST_CASE("raw view: images are listed as NAME.raw and read as qemu-img convert does", "[rawview]") {
  TempDir t;
  must("mkdir -p " + q(t / "b/native") + " " + q(t / "m"));
  write_policy(t);
  const std::string b = t / "b";
  must("qemu-img create -q -f qcow2 -o compat=0.10 " + q(b + "/v2.qcow2") + " 16M");
  must("qemu-io -f qcow2 -c 'write -P 0x21 100k 300k' -c 'write -P 0x22 9M 1M' " + q(b + "/v2.qcow2") + " >/dev/null");
  must("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k " + q(b + "/ext.qcow2") + " 16M");
  must("qemu-io -f qcow2 -c 'write -P 0x31 4k 4k' -c 'write -z 1M 64k' -c 'write -P 0x32 15M 12k' " +
       q(b + "/ext.qcow2") + " >/dev/null");
  must("head -c 16M /dev/urandom > " + q(t / "src.raw") + " && qemu-img convert -c -O qcow2 " + q(t / "src.raw") + " " +
       q(b + "/comp.qcow2"));
  // A chain inside the datastore: base.img (raw, not a qcow2: stays native) <- top.qcow2.
  must("head -c 16M /dev/urandom > " + q(b + "/base.img"));
  must("cd " + q(b) + " && qemu-img create -q -f qcow2 -b base.img -F raw top.qcow2 16M");
  must("qemu-io -f qcow2 -c 'write -P 0x41 2M 5k' " + q(b + "/top.qcow2") + " >/dev/null");
  must("cp " + q(b + "/v2.qcow2") + " " + q(b + "/native/n.qcow2"));
  // VMDK: a sparse file with its descriptor inside, and a descriptor beside a flat extent.
  must("qemu-img create -q -f vmdk " + q(b + "/sp.vmdk") + " 16M");
  must("qemu-io -f vmdk -c 'write -P 0x51 64k 200k' " + q(b + "/sp.vmdk") + " >/dev/null");
  must("qemu-img create -q -f vmdk -o subformat=monolithicFlat " + q(b + "/fl.vmdk") + " 16M");
  must("qemu-io -f vmdk -c 'write -P 0x52 1M 3k' " + q(b + "/fl.vmdk") + " >/dev/null");

  Mount m(b, t / "m", {{"--config", t / "ds.yaml"}});
  std::string out;
  must("ls " + q(m.mountpoint()) + " > " + q(t / "ls.txt"));
  const std::string ls = read_file(t / "ls.txt");
  INFO(ls);
  CHECK(ls.find("v2.qcow2.raw\n") != std::string::npos);
  CHECK(ls.find("top.qcow2.raw\n") != std::string::npos);
  CHECK(ls.find("base.img\n") != std::string::npos);  // raw files have no raw view
  CHECK(ls.find("v2.qcow2\n") == std::string::npos);  // the native name is hidden
  CHECK(access(m.path("v2.qcow2").c_str(), F_OK) != 0);
  CHECK(access(m.path("native/n.qcow2").c_str(), F_OK) == 0);  // policy view: native
  CHECK(access(m.path("native/n.qcow2.raw").c_str(), F_OK) != 0);
  struct stat st {};
  REQUIRE(stat(m.path("comp.qcow2.raw").c_str(), &st) == 0);
  CHECK(st.st_size == 16 << 20);  // the virtual size, before anything opened it

  CHECK(ls.find("sp.vmdk.raw\n") != std::string::npos);
  CHECK(ls.find("fl.vmdk.raw\n") != std::string::npos);
  CHECK(ls.find("fl-flat.vmdk\n") != std::string::npos);  // a flat extent is plain bytes: native
  for (const char* name : {"v2.qcow2", "ext.qcow2", "comp.qcow2", "top.qcow2", "sp.vmdk", "fl.vmdk"}) {
    INFO(name << "\n" << m.log());
    must("qemu-img convert -U -O raw " + q(b + "/" + name) + " " + q(t / "expect.raw"));
    CHECK(sh("cmp " + q(t / "expect.raw") + " " + q(m.path(std::string(name) + ".raw")), &out) == 0);
  }
  // SEEK_DATA/SEEK_HOLE come from the L2 map: only 9M..10M and 100k..400k hold data.
  must("python3 -c \"import os; f=os.open('" + m.path("v2.qcow2.raw") +
       "', os.O_RDONLY); d=os.lseek(f, 1<<20, os.SEEK_DATA); h=os.lseek(f, d, os.SEEK_HOLE); "
       "assert (d, h) == (9<<20, 10<<20), (d, h)\"");
  // A write through the VMDK view lands where QEMU reads it.
  must("dd if=/dev/urandom of=" + q(t / "chunk") + " bs=48k count=1 status=none");
  must("dd if=" + q(t / "chunk") + " of=" + q(m.path("sp.vmdk.raw")) +
       " bs=48k seek=100 conv=notrunc,fsync status=none");
  m.stop();
  must("qemu-img check -f vmdk " + q(b + "/sp.vmdk"));
  must("qemu-img convert -f vmdk -O raw " + q(b + "/sp.vmdk") + " " + q(t / "sp.raw"));
  must("cmp -n 49152 -i 4915200:0 " + q(t / "sp.raw") + " " + q(t / "chunk"));
}

TEST_CASE("raw view: fio verify through the view leaves a clean image equal to the view", "[rawview][fio]") {
  TempDir t;
  must("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  write_policy(t);
  const std::string img = t / "b/disk.qcow2";
  must("qemu-img create -q -f qcow2 " + q(img) + " 64M");
  {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    std::string out;
    int rc = sh("cd " + q(t.path()) + " && fio --name=verify --filename=" + q(m.path("disk.qcow2.raw")) +
                    " --size=16M --offset_increment=16M --numjobs=3 --rw=randwrite --bs=4k --ioengine=libaio"
                    " --iodepth=16 --direct=1 --verify=crc32c --verify_state_save=0 --verify_fatal=1 --do_verify=1"
                    " --randrepeat=0 --output-format=json --output=fio.json",
                &out);
    INFO(out << read_file(t / "fio.json") << m.log());
    REQUIRE(rc == 0);
    CHECK(read_file(t / "fio.json").find("\"error\" : 0") != std::string::npos);
    // Growth, zeroing and a hole punched through the view.
    must("truncate -s 80M " + q(m.path("disk.qcow2.raw")));
    must("fallocate -z -o 1M -l 3M " + q(m.path("disk.qcow2.raw")));
    must("fallocate -p -o 20M -l 1M " + q(m.path("disk.qcow2.raw")));
    must("dd if=/dev/urandom of=" + q(m.path("disk.qcow2.raw")) + " bs=64k seek=1200 count=16 conv=notrunc,fsync status=none");
    must("cp " + q(m.path("disk.qcow2.raw")) + " " + q(t / "view.raw"));
  }
  std::string out;
  int rc = sh("qemu-img check " + q(img), &out);
  INFO(out);
  CHECK(rc == 0);
  CHECK(out.find("No errors were found") != std::string::npos);
  must("qemu-img info " + q(img) + " | grep -q '(83886080 bytes)'");
  must("qemu-img compare -f qcow2 -F raw " + q(img) + " " + q(t / "view.raw"));
  must("qemu-io -f qcow2 -c 'read -P 0 1M 3M' -c 'read -P 0 20M 1M' " + q(img) + " | grep -vq failed");
  CHECK(sh("qemu-io -f qcow2 -c 'read -P 0 1M 3M' -c 'read -P 0 20M 1M' " + q(img) + " | grep -q failed") != 0);
}

TEST_CASE("raw view: an image QEMU left dirty (lazy refcounts) is repaired by the first write", "[rawview]") {
  TempDir t;
  must("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  write_policy(t);
  const std::string img = t / "b/lazy.qcow2";
  must("qemu-img create -q -f qcow2 -o lazy_refcounts=on " + q(img) + " 32M");
  // qemu-io dies with its refcounts unwritten: the dirty bit stays set, qemu-img check finds errors.
  sh("qemu-io -f qcow2 -c 'write -P 0x71 0 2M' -c 'write -P 0x72 5M 100k' -c 'sigraise 9' " + q(img));
  must("od -An -tx1 -j79 -N1 " + q(img) + " | grep -q 01");
  CHECK(sh("qemu-img check " + q(img)) != 0);
  {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    must("qemu-img convert -U -O raw " + q(img) + " " + q(t / "before.raw"));
    CHECK(sh("cmp " + q(t / "before.raw") + " " + q(m.path("lazy.qcow2.raw"))) == 0);
    must("dd if=/dev/urandom of=" + q(t / "chunk") + " bs=64k count=3 status=none");
    must("dd if=" + q(t / "chunk") + " of=" + q(m.path("lazy.qcow2.raw")) +
         " bs=64k seek=200 conv=notrunc,fsync status=none");
  }
  std::string out;
  int rc = sh("qemu-img check " + q(img), &out);
  INFO(out);
  CHECK(rc == 0);
  CHECK(out.find("No errors were found") != std::string::npos);
  must("od -An -tx1 -j79 -N1 " + q(img) + " | grep -q 00");
  must("qemu-io -f qcow2 -c 'read -P 0x71 0 2M' -c 'read -P 0x72 5M 100k' " + q(img) + " | grep -vq failed");
  CHECK(sh("qemu-io -f qcow2 -c 'read -P 0x71 0 2M' -c 'read -P 0x72 5M 100k' " + q(img) + " | grep -q failed") != 0);
  must("qemu-img convert -O raw " + q(img) + " " + q(t / "after.raw"));
  must("cmp -n 196608 -i 13107200:0 " + q(t / "after.raw") + " " + q(t / "chunk"));
}

TEST_CASE("raw view: SIGKILL during writes and discards leaves no corruption and every fsync'd write", "[rawview][crash]") {
  TempDir t;
  must("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  write_policy(t);
  const std::string img = t / "b/disk.qcow2";
  must("qemu-img create -q -f qcow2 -o cluster_size=16k " + q(img) + " 64M");
  constexpr size_t kSlot = 24 * 1024;  // straddles 16k clusters: partial-cluster allocations too
  constexpr int kSlots = (64 << 20) / kSlot;
  // slot -> pattern byte (0: punched, reads as zeros) of every change an fsync completed.
  std::map<int, unsigned char> acked;
  int checked = 0, punched = 0;
  for (int round = 0; round < 10; ++round) {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    const std::string view = m.path("disk.qcow2.raw");
    std::mt19937 rng(1000 + round);
    std::vector<int> order(kSlots);
    for (int i = 0; i < kSlots; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    std::atomic<bool> stop{false};
    std::map<int, unsigned char> round_acked;
    std::vector<std::pair<int, unsigned char>> since_sync;  // changes no fsync has covered yet
    std::thread writer([&] {
      int fd = ::open(view.c_str(), O_RDWR);
      if (fd < 0) return;
      std::vector<char> buf(kSlot);
      // Rewrites (in place), fresh allocations, and punch-holes whose clusters are reused.
      for (uint64_t i = 0; !stop.load(); ++i) {
        int slot = order[i % kSlots];
        unsigned char pat = static_cast<unsigned char>(1 + (slot * 7 + round * 13 + i / kSlots) % 250);
        std::memset(buf.data(), pat, kSlot);
        since_sync.emplace_back(slot, pat);  // before the call: a crash inside it leaves it in doubt
        if (::pwrite(fd, buf.data(), kSlot, static_cast<off_t>(slot) * kSlot) != static_cast<ssize_t>(kSlot)) break;
        if (i % 8 == 7) {  // discard a slot written a few steps ago
          int victim = order[(i - 5) % kSlots];
          since_sync.emplace_back(victim, 0);
          if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(victim) * kSlot, kSlot) != 0)
            break;
        }
        if (i % 4 == 3) {
          if (::fsync(fd) != 0) break;
          for (auto& [s, p] : since_sync) round_acked[s] = p;
          since_sync.clear();
        }
      }
      ::close(fd);
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(200 + 60 * round));
    ::kill(m.pid(), SIGKILL);
    stop = true;
    writer.join();
    m.stop();
    for (auto& kv : round_acked) acked[kv.first] = kv.second;
    for (auto& kv : since_sync) acked.erase(kv.first);  // not covered by an fsync: any state is right
    std::string out;
    int rc = sh("qemu-img check " + q(img), &out);
    INFO("round " << round << ": " << out);
    // 0: clean; 3: only leaked clusters (a crash between a count and its use). Never corruption.
    CHECK((rc == 0 || rc == 3));
    CHECK(out.find("ERROR") == std::string::npos);
    if (rc == 3) must("qemu-img check -q -r leaks " + q(img));
    // Every change an fsync acknowledged, in this round or before, is in the image.
    must("qemu-img convert -O raw " + q(img) + " " + q(t / "after.raw"));
    const std::string after = read_file(t / "after.raw");
    REQUIRE(after.size() == 64u << 20);
    int missing = 0;
    for (auto& [slot, pat] : acked) {
      const std::string want(kSlot, static_cast<char>(pat));
      if (after.compare(static_cast<size_t>(slot) * kSlot, kSlot, want) != 0) ++missing;
    }
    CHECK(missing == 0);
    checked += static_cast<int>(round_acked.size());
    for (auto& kv : round_acked) punched += kv.second == 0;
  }
  INFO(checked << " fsync'd changes, " << punched << " of them punch-holes");
  CHECK(checked > 100);
  CHECK(punched > 10);
}

TEST_CASE("raw view: truncate grows every writable VMDK kind, and QEMU reads the grown disk", "[rawview][vmdk]") {
  TempDir t;
  must("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  write_policy(t);
  const std::string b = t / "b";
  struct Kind {
    const char* name;
    const char* sub;
    uint64_t to;
  } kinds[] = {
      {"ms", "monolithicSparse", 6ull << 30},  // its grain directory moves to the end
      {"mf", "monolithicFlat", 48ull << 20},
      {"vf", "vmfs", 48ull << 20},
      {"ts", "twoGbMaxExtentSparse", (2ull << 30) + (8ull << 20)},  // a second extent file
      {"tf", "twoGbMaxExtentFlat", (2ull << 30) + (8ull << 20)},
  };
  for (auto& k : kinds) {
    const std::string img = b + "/" + k.name + ".vmdk";
    if (std::string(k.sub) == "vmfs") {  // qemu-img cannot make one; QEMU reads it
      must("qemu-img create -q -f vmdk -o subformat=monolithicFlat " + q(img) + " 16M");
      must("sed -i -e 's/\"monolithicFlat\"/\"vmfs\"/' -e 's/ FLAT \\(\"[^\"]*\"\\) 0$/ VMFS \\1/' " + q(img));
    } else {
      must("qemu-img create -q -f vmdk -o subformat=" + std::string(k.sub) + " " + q(img) + " 16M");
    }
    must("qemu-io -f vmdk -c 'write -P 0x61 1M 64k' -c 'write -P 0x62 16320k 64k' " + q(img) + " >/dev/null");
  }
  must("head -c 256k /dev/urandom > " + q(t / "chunk"));
  {
    Mount m(b, t / "m", {{"--config", t / "ds.yaml"}});
    for (auto& k : kinds) {
      const std::string view = m.path(std::string(k.name) + ".vmdk.raw");
      INFO(k.sub << "\n" << m.log());
      CHECK(sh("truncate -s 8M " + q(view)) != 0);  // shrinking is refused
      must("truncate -s " + std::to_string(k.to) + " " + q(view));
      struct stat st {};
      REQUIRE(stat(view.c_str(), &st) == 0);
      CHECK(static_cast<uint64_t>(st.st_size) == k.to);
      // Across the old end (16M - 64k .. 16M + 192k), and the last 256k of the new disk.
      must("dd if=" + q(t / "chunk") + " of=" + q(view) + " bs=64k seek=255 conv=notrunc,fsync status=none");
      must("dd if=" + q(t / "chunk") + " of=" + q(view) + " bs=64k seek=" + std::to_string(k.to / 65536 - 4) +
           " conv=notrunc,fsync status=none");
    }
  }
  for (auto& k : kinds) {
    const std::string img = b + "/" + k.name + ".vmdk";
    INFO(k.sub);
    std::string out;
    int rc = sh("qemu-img check -f vmdk " + q(img), &out);
    INFO(out);
    CHECK(rc == 0);
    must("qemu-img info -f vmdk " + q(img) + " | grep -q '(" + std::to_string(k.to) + " bytes)'");
    must("qemu-img convert -f vmdk -O raw " + q(img) + " " + q(t / "after.raw"));
    must("cmp -n 262144 -i 16711680:0 " + q(t / "after.raw") + " " + q(t / "chunk"));
    must("cmp -n 262144 -i " + std::to_string(k.to - 262144) + ":0 " + q(t / "after.raw") + " " + q(t / "chunk"));
    must("qemu-io -f vmdk -c 'read -P 0x61 1M 64k' -c 'read -P 0 17M 8M' " + q(img) + " | grep -vq failed");
    CHECK(sh("qemu-io -f vmdk -c 'read -P 0x61 1M 64k' -c 'read -P 0 17M 8M' " + q(img) + " | grep -q failed") != 0);
  }
  // The view, mounted again, reads as QEMU does (the whole disk for the small ones; the start
  // and the end of the 2 GiB ones).
  Mount m(b, t / "m", {{"--config", t / "ds.yaml"}});
  for (auto& k : kinds) {
    const std::string img = b + "/" + k.name + ".vmdk";
    const std::string view = m.path(std::string(k.name) + ".vmdk.raw");
    INFO(k.sub << "\n" << m.log());
    must("qemu-img convert -U -f vmdk -O raw " + q(img) + " " + q(t / "after.raw"));
    if (k.to < (1ull << 30)) {
      must("cmp " + q(t / "after.raw") + " " + q(view));
    } else {
      const std::string tail = std::to_string(k.to - (64ull << 20));
      must("cmp -n 33554432 " + q(t / "after.raw") + " " + q(view));
      must("cmp -i " + tail + ":" + tail + " " + q(t / "after.raw") + " " + q(view));
    }
  }
}
