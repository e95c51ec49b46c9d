// Notifier: the service manager's readiness protocol (sd_notify(3)) without libsystemd.
//
// A service started with Type=notify finds in $NOTIFY_SOCKET the address of a unix datagram
// socket — a file path, or an abstract name written with a leading '@' — and reports its state
// by sending datagrams of newline-separated VARIABLE=VALUE lines there:
//
//   READY=1                          the service is up (for us: the mount answers)
//   RELOADING=1 + MONOTONIC_USEC=N   a reload has begun (READY=1 again when it is done)
//   STOPPING=1                       the service is shutting down
//   STATUS=text                      one line for `systemctl status`
//   ERRNO=N                          why it failed
//   WATCHDOG=1                       alive; required more often than $WATCHDOG_USEC
//
// The manager learns who sent a datagram from the kernel (SO_PASSCRED), so any thread of the
// main process may send (NotifyAccess=main). The protocol is small and stable, and this is all
// of it the daemon needs; vsock addresses (systemd 254+, for virtual machines) are not supported.
//
// Threads: after from_environment(), every method is safe to call from any thread.
#pragma once

#include <sys/socket.h>
#include <sys/un.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace iofilterfs {

class Notifier {
 public:
  Notifier() = default;
  ~Notifier();
  Notifier(const Notifier&) = delete;
  Notifier& operator=(const Notifier&) = delete;

  // Reads $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID and removes them from the environment,
  // so no child process inherits them. Without $NOTIFY_SOCKET the notifier stays disabled and
  // every send() is a no-op. Returns "" or a message saying why the socket cannot be used (the
  // notifier then stays disabled).
  std::string from_environment();

  bool enabled() const { return fd_ >= 0; }
  // The watchdog interval the manager asked for, in microseconds (0: no watchdog). WATCHDOG_PID,
  // when set, must name this process.
  uint64_t watchdog_usec() const { return watchdog_usec_; }

  // Sends one datagram. true when sent (or when disabled); false with errno set otherwise.
  bool send(std::string_view state) const;

  // CLOCK_MONOTONIC in microseconds, for MONOTONIC_USEC=.
  static uint64_t monotonic_usec();
  // `text` made safe as a STATUS= value: one line, at most `max` bytes.
  static std::string one_line(std::string_view text, size_t max = 400);

 private:
  int fd_ = -1;
  sockaddr_un addr_{};
  socklen_t addr_len_ = 0;
  uint64_t watchdog_usec_ = 0;
};

}  // namespace iofilterfs
