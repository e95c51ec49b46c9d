#include "luks_cmds.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "encrypt/convert.h"
#include "encrypt/luks1.h"
#include "encrypt/params.h"
#include "encrypt/secure.h"

namespace iofilterctl {
namespace {

namespace enc = iofilterfs::encrypt;
namespace l1 = iofilterfs::encrypt::luks1;

constexpr int kOk = 0, kFailed = 1, kDenied = 4;

int fail(const std::string& what, const std::string& why) {
  std::fprintf(stderr, "iofilterctl: %s: %s\n", what.c_str(), why.c_str());
  return kFailed;
}

std::string sys_error(const char* op) { return std::string(op) + ": " + std::strerror(errno); }

// An open image file with the whole-file lock the daemon takes on the images it opens (an OFD
// lock: shared for reading, exclusive for writing), so neither changes a file the other has.
class LockedFile {
 public:
  ~LockedFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  // "" or why not.
  std::string open(const std::string& path, bool write) {
    fd_ = ::open(path.c_str(), (write ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY);
    if (fd_ < 0) return sys_error("open");
    struct stat st {};
    if (::fstat(fd_, &st) != 0) return sys_error("stat");
    if (!S_ISREG(st.st_mode)) return "not a regular file";
    struct flock fl {};
    fl.l_type = write ? F_WRLCK : F_RDLCK;
    fl.l_whence = SEEK_SET;
    if (::fcntl(fd_, F_OFD_SETLK, &fl) != 0) {
      if (errno == EAGAIN || errno == EACCES)
        return "the image is in use (an iofilterfs daemon or another program has it open); close the disk first";
      return sys_error("lock");
    }
    size_ = static_cast<uint64_t>(st.st_size);
    return {};
  }
  int fd() const { return fd_; }
  uint64_t size() const { return size_; }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
};

bool pread_all(int fd, void* buf, size_t len, uint64_t off, size_t* got) {
  *got = 0;
  while (*got < len) {
    ssize_t n = ::pread(fd, static_cast<char*>(buf) + *got, len - *got, static_cast<off_t>(off + *got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) break;
    *got += static_cast<size_t>(n);
  }
  return true;
}

bool pwrite_all(int fd, const void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd, static_cast<const char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

std::string read_key(const std::string& path, enc::SecureBytes* out) {
  if (path.empty()) return "no passphrase given (--key-file)";
  if (path == "-") return enc::read_passphrase_fd(STDIN_FILENO, "standard input", true, out);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return "key file " + path + " cannot be read: " + std::strerror(errno);
  std::string err = enc::read_passphrase_fd(fd, "key file " + path, true, out);
  ::close(fd);
  return err;
}

// The image's header and its whole header area (everything before the payload).
struct Container {
  l1::Header h;
  std::vector<uint8_t> area;
};

std::string load(const LockedFile& f, Container* c) {
  uint8_t phdr[l1::kPhdrSize];
  size_t got = 0;
  if (!pread_all(f.fd(), phdr, sizeof phdr, 0, &got)) return sys_error("read");
  if (!l1::has_magic(phdr, got)) return "not a LUKS container (no LUKS header)";
  std::string err = l1::parse_header(phdr, got, &c->h);
  if (!err.empty()) return "the LUKS header cannot be used: " + err;
  c->area.assign(c->h.payload_bytes_offset(), 0);
  if (!pread_all(f.fd(), c->area.data(), c->area.size(), 0, &got)) return sys_error("read");
  if (got < c->h.key_material_end()) return "the file ends inside its keyslots";
  return {};
}

// Unlocks with the passphrase in key_file: Ok with the master key and the slot it opened.
int unlock(const std::string& image, const Container& c, const std::string& key_file, enc::SecureBytes* master,
           int* slot) {
  enc::SecureBytes pass;
  std::string err = read_key(key_file, &pass);
  if (!err.empty()) return fail(image, err);
  std::string_view area(reinterpret_cast<const char*>(c.area.data()), c.area.size());
  switch (l1::unlock(c.h, area, pass, master, slot, &err)) {
    case l1::Unlock::Ok: return kOk;
    case l1::Unlock::WrongKey:
      std::fprintf(stderr, "iofilterctl: %s: the passphrase opens no keyslot\n", image.c_str());
      return kDenied;
    case l1::Unlock::Error: break;
  }
  return fail(image, err);
}

// Opens the image for writing under its lock, loads its header area and unlocks it with the
// passphrase in key_file. 0, or the exit code after the reason is printed.
int open_unlocked(const std::string& image, const std::string& key_file, LockedFile* f, Container* c,
                  enc::SecureBytes* master, int* opened) {
  std::string err = f->open(image, true);
  if (err.empty()) err = load(*f, c);
  if (!err.empty()) return fail(image, err);
  return unlock(image, *c, key_file, master, opened);
}

// Writes the bytes [off, off+len) of the header area back, then makes them durable.
std::string store(const LockedFile& f, const Container& c, uint64_t off, uint64_t len) {
  if (!pwrite_all(f.fd(), c.area.data() + off, len, off)) return sys_error("write");
  if (::fdatasync(f.fd()) != 0) return sys_error("fdatasync");
  return {};
}

std::string slot_range(const l1::Header& h, int slot, uint64_t* off, uint64_t* len) {
  *off = uint64_t{h.slots[slot].key_material_offset} * l1::kSectorSize;
  *len = h.slot_material_bytes(slot);
  return {};
}

}  // namespace

int cmd_encrypt(const std::string& src, const std::string& dst, const EncryptOptions& o) {
  enc::SecureBytes pass;
  std::string err = read_key(o.key_file, &pass);
  if (!err.empty()) return fail(dst, err);
  LockedFile in;
  err = in.open(src, false);
  if (!err.empty()) return fail(src, err);
  struct stat st {};
  ::fstat(in.fd(), &st);
  int out = ::open(dst.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, st.st_mode & 0777);
  if (out < 0) return fail(dst, sys_error("create") + (errno == EEXIST ? " (it must not exist yet)" : ""));
  enc::EncryptParams p;
  p.iter_time_us = o.iter_time_us;
  p.key_bits = o.key_bits;
  p.hash = o.hash;
  enc::ConvertStats stats;
  int last_pct = -1;
  auto progress = [&](uint64_t done, uint64_t total) {
    if (!o.progress || total == 0) return;
    int pct = static_cast<int>(done * 100 / total);
    if (pct != last_pct) std::fprintf(stderr, "\r%s: %d%%", dst.c_str(), pct);
    last_pct = pct;
  };
  err = enc::encrypt_image(in.fd(), out, p, pass, o.sparse, &stats, progress);
  if (o.progress && last_pct >= 0) std::fprintf(stderr, "\n");
  ::close(out);
  if (!err.empty()) {
    ::unlink(dst.c_str());
    return fail(dst, err + " (the partial file is removed)");
  }
  std::printf("%s: encrypted %s into a LUKS1 container (aes-xts-plain64, %u-bit key, %s): payload %llu bytes at "
              "offset %llu%s\n",
              dst.c_str(), src.c_str(), o.key_bits, o.hash.c_str(),
              static_cast<unsigned long long>(stats.payload_bytes),
              static_cast<unsigned long long>(stats.payload_offset),
              o.sparse ? (", " + std::to_string(stats.skipped_bytes) + " zero bytes left as holes").c_str() : "");
  return kOk;
}

int cmd_key_list(const std::string& image, bool json) {
  LockedFile f;
  std::string err = f.open(image, false);
  if (!err.empty()) return fail(image, err);
  Container c;
  err = load(f, &c);
  if (!err.empty()) return fail(image, err);
  const l1::Header& h = c.h;
  if (json) {
    std::printf("{\"cipher\":\"%s-%s\",\"key_bits\":%u,\"hash\":\"%s\",\"uuid\":\"%s\",\"payload_offset\":%llu,"
                "\"keyslots\":[",
                h.cipher_name.c_str(), h.cipher_mode.c_str(), h.key_bytes * 8, h.hash_spec.c_str(), h.uuid.c_str(),
                static_cast<unsigned long long>(h.payload_bytes_offset()));
    for (int i = 0; i < l1::kNumKeyslots; ++i)
      std::printf("%s{\"slot\":%d,\"active\":%s,\"iterations\":%u}", i ? "," : "", i,
                  h.slots[i].is_active() ? "true" : "false", h.slots[i].iterations);
    std::printf("]}\n");
    return kOk;
  }
  std::printf("%s: LUKS1 %s-%s, %u-bit key, hash %s, uuid %s, payload at %llu\n", image.c_str(),
              h.cipher_name.c_str(), h.cipher_mode.c_str(), h.key_bytes * 8, h.hash_spec.c_str(), h.uuid.c_str(),
              static_cast<unsigned long long>(h.payload_bytes_offset()));
  std::printf("SLOT  STATE     ITERATIONS\n");
  for (int i = 0; i < l1::kNumKeyslots; ++i)
    std::printf("%-4d  %-8s  %u\n", i, h.slots[i].is_active() ? "active" : "free", h.slots[i].iterations);
  return kOk;
}

int cmd_key_add(const std::string& image, const std::string& key_file, const std::string& new_key_file, int slot,
                uint64_t iter_time_us, bool json) {
  LockedFile f;
  Container c;
  enc::SecureBytes master;
  int opened = -1;
  if (int r = open_unlocked(image, key_file, &f, &c, &master, &opened)) return r;
  enc::SecureBytes fresh;
  std::string err = read_key(new_key_file, &fresh);
  if (!err.empty()) return fail(image, err);
  if (slot < 0) {
    for (int i = 0; i < l1::kNumKeyslots && slot < 0; ++i)
      if (!c.h.slots[i].is_active()) slot = i;
    if (slot < 0) return fail(image, "every keyslot is in use; remove one first");
  }
  err = l1::add_keyslot(&c.h, &c.area, master, fresh, slot, 0, iter_time_us);
  if (!err.empty()) return fail(image, err);
  // The key material first, then the header that activates it: a crash in between leaves the
  // slot free, never active over half-written material.
  uint64_t off = 0, len = 0;
  slot_range(c.h, slot, &off, &len);
  err = store(f, c, off, len);
  if (err.empty()) err = store(f, c, 0, l1::kPhdrSize);
  if (!err.empty()) return fail(image, err);
  if (json) std::printf("{\"slot\":%d,\"iterations\":%u}\n", slot, c.h.slots[slot].iterations);
  else std::printf("%s: passphrase added in keyslot %d (%u iterations)\n", image.c_str(), slot, c.h.slots[slot].iterations);
  return kOk;
}

int cmd_key_remove(const std::string& image, const std::string& key_file, int slot, bool json) {
  LockedFile f;
  Container c;
  enc::SecureBytes master;
  int opened = -1;
  if (int r = open_unlocked(image, key_file, &f, &c, &master, &opened)) return r;
  if (slot < 0) slot = opened;
  std::string err = l1::kill_keyslot(&c.h, &c.area, slot);
  if (!err.empty()) return fail(image, err);
  // The header first (the slot stops being active), then the wiped material.
  uint64_t off = 0, len = 0;
  slot_range(c.h, slot, &off, &len);
  err = store(f, c, 0, l1::kPhdrSize);
  if (err.empty()) err = store(f, c, off, len);
  if (!err.empty()) return fail(image, err);
  if (json) std::printf("{\"slot\":%d}\n", slot);
  else std::printf("%s: keyslot %d removed\n", image.c_str(), slot);
  return kOk;
}

}  // namespace iofilterctl
