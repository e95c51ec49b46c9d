// The encrypt filter's parameters and where its passphrase comes from. Validation is pure: the
// one fact it needs from the system (who owns the key file and its mode) is asked through a
// KeyFileProbe, which tests replace.
//
// Keys (exactly one of key-file and credential):
//   key-file: PATH          a file whose whole content, byte for byte, is the passphrase (as
//                           cryptsetup --key-file and QEMU's secret file= read it); absolute,
//                           owned by root, neither readable nor writable by group or others
//   credential: NAME        the same, from $CREDENTIALS_DIRECTORY/NAME (systemd LoadCredential=)
//   pbkdf-iter-time: 2s     PBKDF2 time for the keyslot of a new header (1ms .. 10m; default 2s)
//   key-size: 512           bits of the XTS key of a new header: 256 or 512 (default)
//   hash: sha256            hash of a new header: sha1, sha256 (default) or sha512
// The last three apply only when the filter writes a header (an empty image); an existing
// header says what it uses.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "secure.h"

namespace YAML { class Node; }

namespace iofilterfs::encrypt {

struct EncryptParams {
  std::string key_file;    // absolute path, or empty
  std::string credential;  // a name, or empty
  uint64_t iter_time_us = 2'000'000;
  uint32_t key_bits = 512;
  std::string hash = "sha256";
  bool operator==(const EncryptParams&) const = default;
};

// Every accepted key, in the order describe() prints them.
const std::vector<std::string>& encrypt_keys();

// What validation needs to know of a key file: 0 and the owner and mode, or an errno.
struct KeyFileFacts {
  int err = 0;
  uid_t uid = 0;
  mode_t mode = 0;  // including the type bits (S_IFREG)
};
using KeyFileProbe = std::function<KeyFileFacts(const std::string& path)>;
// stat(2), following symbolic links (the file that would be read).
KeyFileFacts stat_key_file(const std::string& path);

// "" when a key file with these facts may hold a passphrase, else why not. `daemon_uid` may own
// it besides root (0 when the daemon runs as root, so then only root).
std::string check_key_file(const std::string& path, const KeyFileFacts& f, uid_t daemon_uid);

// FilterInfo::validate: "" or a precise message; *where (may be null) is pointed at the
// offending key or value, or left alone to blame the whole parameter map. probe: null for
// stat_key_file.
std::string validate_encrypt(const YAML::Node& params, YAML::Node* where, const KeyFileProbe& probe = nullptr);
// Validates and fills *out.
std::string parse_encrypt(const YAML::Node& params, EncryptParams* out, YAML::Node* where = nullptr,
                          const KeyFileProbe& probe = nullptr);

// "key-file=/etc/iofilterfs/k pbkdf-iter-time=2s key-size=512 hash=sha256": names, never key
// material.
std::string describe_encrypt(const EncryptParams& p);

// Reads the passphrase the parameters name into *out, checking the key file's owner and mode
// again (it may have changed since the policy was loaded). Returns "" or why not (never with
// any of the file's content).
std::string read_passphrase(const EncryptParams& p, SecureBytes* out);

// Reads a whole passphrase (at most 8 MiB) from fd into *out. A regular file is read whole;
// with streams_ok a pipe or terminal is read to its end too. `what` names the source in the
// message ("" or why not, never with any of the content).
std::string read_passphrase_fd(int fd, const std::string& what, bool streams_ok, SecureBytes* out);

}  // namespace iofilterfs::encrypt
