#include "notify.h"

#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace iofilterfs {

Notifier::~Notifier() {
  if (fd_ >= 0) ::close(fd_);
}

std::string Notifier::from_environment() {
  const char* sock = std::getenv("NOTIFY_SOCKET");
  const char* wd = std::getenv("WATCHDOG_USEC");
  const char* wd_pid = std::getenv("WATCHDOG_PID");
  std::string path = sock ? sock : "";
  std::string usec = wd ? wd : "", pid = wd_pid ? wd_pid : "";
  ::unsetenv("NOTIFY_SOCKET");
  ::unsetenv("WATCHDOG_USEC");
  ::unsetenv("WATCHDOG_PID");
  if (path.empty()) return {};

  if (!usec.empty() && (pid.empty() || pid == std::to_string(::getpid()))) {
    char* end;
    unsigned long long n = std::strtoull(usec.c_str(), &end, 10);
    if (*end == '\0') watchdog_usec_ = n;
  }

  addr_ = {};
  addr_.sun_family = AF_UNIX;
  if (path[0] != '/' && path[0] != '@')
    return "NOTIFY_SOCKET=" + path + ": only a socket path or an abstract '@' name is supported";
  if (path.size() >= sizeof addr_.sun_path) return "NOTIFY_SOCKET=" + path + ": address too long";
  std::memcpy(addr_.sun_path, path.data(), path.size());
  if (path[0] == '@') addr_.sun_path[0] = '\0';  // abstract: no terminating NUL, the length says
  addr_len_ = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + (path[0] == '/' ? 1 : 0));

  fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return std::string("NOTIFY_SOCKET: socket: ") + std::strerror(errno);
  return {};
}

bool Notifier::send(std::string_view state) const {
  if (fd_ < 0) return true;
  ssize_t n = ::sendto(fd_, state.data(), state.size(), MSG_NOSIGNAL, reinterpret_cast<const sockaddr*>(&addr_),
                       addr_len_);
  return n == static_cast<ssize_t>(state.size());
}

uint64_t Notifier::monotonic_usec() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000u + static_cast<uint64_t>(ts.tv_nsec) / 1000u;
}

std::string Notifier::one_line(std::string_view text, size_t max) {
  std::string s;
  for (char c : text) s += (c == '\n' || c == '\r') ? ' ' : c;
  if (s.size() > max) {
    size_t cut = max - 3;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // not inside a UTF-8 sequence
    s = s.substr(0, cut) + "...";
  }
  return s;
}

}  // namespace iofilterfs
