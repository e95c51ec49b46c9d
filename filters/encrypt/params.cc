#include "params.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "param_walk.h"
#include "units.h"

namespace iofilterfs::encrypt {
namespace {

constexpr uint64_t kMinIterTimeUs = 1000;            // 1ms
constexpr uint64_t kMaxIterTimeUs = 600ull * 1000000;  // 10m
constexpr size_t kMaxPassphrase = 8 * 1024 * 1024;    // cryptsetup's default key file limit

const char* kNeedKey = "no key given; set key-file: PATH (a passphrase file) or credential: NAME (systemd LoadCredential=)";

std::string q(std::string_view s) { return quoted(s); }

std::string format_us(uint64_t us) {
  if (us % 1000000 == 0) return std::to_string(us / 1000000) + "s";
  if (us % 1000 == 0) return std::to_string(us / 1000) + "ms";
  return std::to_string(us) + "us";
}

std::string mode_text(mode_t m) {
  char b[8];
  std::snprintf(b, sizeof b, "%04o", static_cast<unsigned>(m & 07777));
  return b;
}

bool valid_credential_name(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos && s.size() <= 255;
}

std::string check(const YAML::Node& params, EncryptParams* out, YAML::Node* where, const KeyFileProbe& probe) {
  if (!params.IsDefined() || params.IsNull()) return kNeedKey;
  if (std::string e = require_mapping(params, where); !e.empty()) return e;
  EncryptParams p;
  YAML::Node key_file_node;
  std::string e = walk_params(params, encrypt_keys(), where, [&](size_t, const YAML::Node& key, const YAML::Node& value) -> std::string {
    const std::string& name = key.Scalar();
    const std::string& v = value.Scalar();
    if (name == "key-file") {
      if (v.empty() || v[0] != '/') {
        blame(where, value);
        return "key-file must be an absolute path, not " + q(v);
      }
      p.key_file = v;
      key_file_node.reset(value);
    } else if (name == "credential") {
      if (!valid_credential_name(v)) {
        blame(where, value);
        return "credential must be a credential's name (as in LoadCredential=NAME:...), without '/', not " + q(v);
      }
      p.credential = v;
    } else if (name == "pbkdf-iter-time") {
      uint64_t us = 0;
      std::string err = parse_duration(v, &us);
      if (!err.empty()) {
        blame(where, value);
        return "pbkdf-iter-time: " + err;
      }
      if (us < kMinIterTimeUs || us > kMaxIterTimeUs) {
        blame(where, value);
        return "pbkdf-iter-time must be from 1ms to 10m, not " + q(v);
      }
      p.iter_time_us = us;
    } else if (name == "key-size") {
      if (v != "256" && v != "512") {
        blame(where, value);
        return "key-size must be 256 or 512 (bits of the aes-xts key), not " + q(v);
      }
      p.key_bits = v == "256" ? 256 : 512;
    } else if (name == "hash") {
      if (v != "sha1" && v != "sha256" && v != "sha512") {
        blame(where, value);
        return "hash must be sha1, sha256 or sha512, not " + q(v);
      }
      p.hash = v;
    }
    return "";
  });
  if (!e.empty()) return e;
  if (!p.key_file.empty() && !p.credential.empty()) {
    blame(where, params["credential"]);
    return "key-file and credential exclude each other; give one of them";
  }
  if (p.key_file.empty() && p.credential.empty()) return kNeedKey;
  if (!p.key_file.empty()) {
    KeyFileFacts f = probe ? probe(p.key_file) : stat_key_file(p.key_file);
    std::string err = check_key_file(p.key_file, f, ::geteuid());
    if (!err.empty()) {
      blame(where, key_file_node);
      return err;
    }
  }
  if (out) *out = std::move(p);
  return {};
}

}  // namespace

const std::vector<std::string>& encrypt_keys() {
  static const std::vector<std::string> keys = {"key-file", "credential", "pbkdf-iter-time", "key-size", "hash"};
  return keys;
}

KeyFileFacts stat_key_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return KeyFileFacts{errno ? errno : EIO, 0, 0};
  return KeyFileFacts{0, st.st_uid, st.st_mode};
}

std::string check_key_file(const std::string& path, const KeyFileFacts& f, uid_t daemon_uid) {
  if (f.err) return "key file " + q(path) + " cannot be read: " + std::strerror(f.err);
  if (!S_ISREG(f.mode)) return "key file " + q(path) + " is not a regular file";
  if ((f.uid != 0 && f.uid != daemon_uid) || (f.mode & 0066))
    return "key file " + q(path) +
           " must be owned by root and neither readable nor writable by group or others (it is owned by uid " +
           std::to_string(f.uid) + " with mode " + mode_text(f.mode) + "; chown root and chmod 600 it)";
  return {};
}

std::string validate_encrypt(const YAML::Node& params, YAML::Node* where, const KeyFileProbe& probe) {
  return check(params, nullptr, where, probe);
}

std::string parse_encrypt(const YAML::Node& params, EncryptParams* out, YAML::Node* where, const KeyFileProbe& probe) {
  return check(params, out, where, probe);
}

std::string describe_encrypt(const EncryptParams& p) {
  std::string s = p.key_file.empty() ? "credential=" + p.credential : "key-file=" + p.key_file;
  s += " pbkdf-iter-time=" + format_us(p.iter_time_us);
  s += " key-size=" + std::to_string(p.key_bits);
  s += " hash=" + p.hash;
  return s;
}

std::string read_passphrase_fd(int fd, const std::string& what, bool streams_ok, SecureBytes* out) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return what + " cannot be read: " + std::strerror(errno);
  const bool regular = S_ISREG(st.st_mode);
  if (!regular && !(streams_ok && (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode) || S_ISSOCK(st.st_mode))))
    return what + " is not a regular file";
  if (regular && st.st_size <= 0) return what + " is empty";
  if (regular && static_cast<uint64_t>(st.st_size) > kMaxPassphrase) return what + " is larger than 8 MiB";
  // A stream's length is unknown: read into a locked buffer of the largest passphrase, then
  // keep only what came.
  SecureBytes buf(regular ? static_cast<size_t>(st.st_size) : kMaxPassphrase);
  size_t got = 0;
  while (got < buf.size()) {
    ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return what + " cannot be read: " + std::strerror(errno);
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (regular && got != buf.size()) return what + " changed while it was read";
  if (got == 0) return what + " is empty";
  if (!regular) {
    uint8_t extra;
    if (got == buf.size() && ::read(fd, &extra, 1) == 1) return what + " is larger than 8 MiB";
    SecureBytes exact(buf.data(), got);
    buf = std::move(exact);
  }
  *out = std::move(buf);
  return {};
}

std::string read_passphrase(const EncryptParams& p, SecureBytes* out) {
  std::string path, what;
  if (!p.key_file.empty()) {
    path = p.key_file;
    what = "key file " + q(path);
  } else {
    const char* dir = std::getenv("CREDENTIALS_DIRECTORY");
    if (!dir || !*dir)
      return "credential " + q(p.credential) + ": $CREDENTIALS_DIRECTORY is not set (give the service LoadCredential=" +
             p.credential + ":PATH)";
    path = std::string(dir) + "/" + p.credential;
    what = "credential " + q(p.credential);
  }
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return what + " cannot be read: " + std::strerror(errno);
  std::string err;
  if (!p.key_file.empty()) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) err = what + " cannot be read: " + std::strerror(errno);
    else err = check_key_file(path, KeyFileFacts{0, st.st_uid, st.st_mode}, ::geteuid());
  }
  if (err.empty()) err = read_passphrase_fd(fd, what, false, out);
  ::close(fd);
  return err;
}

}  // namespace iofilterfs::encrypt
