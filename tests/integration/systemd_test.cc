// Running as a service, installed: everything of iofilterfs@.service that can be proved without
// systemd as PID 1. The daemon is started with the unit's own ExecStart line and a
// NOTIFY_SOCKET this test binds and reads, as systemd would; the socket's SO_PASSCRED tells who
// sent each message, as it tells systemd for NotifyAccess=main. The unit file itself goes
// through systemd-analyze verify; its capability bounding set and no_new_privs are applied with
// setpriv(1) to a real mount; mount(8) and an fstab line run in a private mount namespace; and
// cmake --install fills a DESTDIR.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstring>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "mount.h"

using testing::daemon_binary;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;
using testing::write_file;
using Clock = std::chrono::steady_clock;

extern char** environ;

namespace {

// One datagram from the daemon, with the sender's PID from the kernel.
struct Message {
  std::string text;
  pid_t pid = -1;
  Clock::time_point at;
  std::vector<std::string> lines() const {
    std::vector<std::string> v;
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);) v.push_back(l);
    return v;
  }
  // Whether one of its lines is exactly `line` ("READY=1").
  bool has(const std::string& line) const {
    for (const auto& l : lines())
      if (l == line) return true;
    return false;
  }
  // The value of VAR=, or "".
  std::string get(const std::string& var) const {
    for (const auto& l : lines())
      if (l.rfind(var + "=", 0) == 0) return l.substr(var.size() + 1);
    return {};
  }
};

// The service manager's end of NOTIFY_SOCKET: a unix datagram socket, by path or abstract name.
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& address) : address_(address) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    int one = 1;
    REQUIRE(::setsockopt(fd_, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) == 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path, address.data(), address.size());
    socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size());
    if (address[0] == '@') a.sun_path[0] = '\0';
    else ++len;
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&a), len) == 0);
  }
  ~NotifySocket() { ::close(fd_); }
  const std::string& address() const { return address_; }

  // The next message, or nothing within `ms`.
  std::optional<Message> next(int ms) {
    timeval tv{ms / 1000, (ms % 1000) * 1000};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[4096];
    char cbuf[CMSG_SPACE(sizeof(ucred))];
    iovec iov{buf, sizeof buf};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    ssize_t n = ::recvmsg(fd_, &mh, 0);
    if (n < 0) return std::nullopt;
    Message m;
    m.text.assign(buf, static_cast<size_t>(n));
    m.at = Clock::now();
    for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
        ucred cr;
        std::memcpy(&cr, CMSG_DATA(c), sizeof cr);
        m.pid = cr.pid;
      }
    seen_.push_back(m);
    return m;
  }
  // Reads until a message with the line `want` (e.g. "READY=1"), up to `seconds`.
  std::optional<Message> wait_for(const std::string& want, int seconds = 20) {
    auto deadline = Clock::now() + std::chrono::seconds(seconds);
    while (Clock::now() < deadline) {
      auto m = next(200);
      if (m && m->has(want)) return m;
    }
    return std::nullopt;
  }
  // Every message read so far, one per line, for failure reports.
  std::string transcript() const {
    std::string s;
    for (const auto& m : seen_) {
      std::string t = m.text;
      for (char& c : t)
        if (c == '\n') c = '|';
      s += "  [" + std::to_string(m.pid) + "] " + t + "\n";
    }
    return s;
  }

 private:
  std::string address_;
  int fd_ = -1;
  std::vector<Message> seen_;
};

std::string unit_path() { return testing::source_dir() + "/systemd/iofilterfs@.service"; }
// The build tree under test (the unit and install tests run cmake --install from it).
std::string build_dir() {
  std::string bin = IOFILTERFS_BIN;
  return bin.substr(0, bin.rfind('/'));
}

// The unit's ExecStart, as systemd would run it for instance `config` (its %i.yaml replaced by
// that file), with the built binary in place of the installed one.
std::vector<std::string> exec_start(const std::string& config) {
  std::istringstream in(read_file(unit_path()));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("ExecStart=", 0) == 0) break;
  REQUIRE(line.rfind("ExecStart=/usr/bin/iofilterfs ", 0) == 0);
  std::istringstream words(line.substr(10));
  std::vector<std::string> argv;
  std::string w;
  while (words >> w) {
    if (w == "/usr/bin/iofilterfs") w = daemon_binary();
    if (w == "/etc/iofilterfs/%i.yaml") w = config;
    argv.push_back(w);
  }
  REQUIRE(argv.size() >= 3);
  return argv;
}

// A daemon started the way a service manager starts one: its own process, the environment
// given, stdout and stderr to a log. SIGTERM if this test process dies; stopped and its mount
// detached on destruction, whatever happened.
class Service {
 public:
  Service(std::vector<std::string> argv, std::vector<std::string> env, std::string log, std::string mountpoint)
      : log_(std::move(log)), mountpoint_(std::move(mountpoint)) {
    std::vector<char*> av, ev;
    for (auto& a : argv) av.push_back(a.data());
    av.push_back(nullptr);
    for (char** e = environ; *e; ++e) {
      std::string s = *e;
      if (s.rfind("NOTIFY_SOCKET=", 0) != 0 && s.rfind("WATCHDOG_", 0) != 0) env.push_back(s);
    }
    for (auto& e : env) ev.push_back(e.data());
    ev.push_back(nullptr);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != parent) _exit(127);
      int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execve(av[0], av.data(), ev.data());
      _exit(127);
    }
  }
  ~Service() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      if (wait(10) == -2) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
      }
    }
    if (testing::is_mounted(mountpoint_)) sh("fusermount3 -uz " + q(mountpoint_));
  }
  pid_t pid() const { return pid_; }
  bool running() {
    if (pid_ <= 0) return false;
    int st;
    if (::waitpid(pid_, &st, WNOHANG) == 0) return true;
    pid_ = -1;
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return false;
  }
  // Waits up to `seconds` for the exit: its status (128+signal if killed), or -2 on timeout.
  int wait(int seconds) {
    for (int i = 0; i < seconds * 50; ++i) {
      if (!running()) return status_;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -2;
  }
  std::string log() const { return read_file(log_); }

 private:
  std::string log_, mountpoint_;
  pid_t pid_ = -1;
  int status_ = -1;
};

// A datastore in a temporary directory: backing b/, mountpoint m/, policy file ds1.yaml naming
// both (as /etc/iofilterfs/ds1.yaml would), and the manager's socket.
struct Datastore {
  TempDir t;
  std::string backing = t / "b", mnt = t / "m", config = t / "ds1.yaml";
  explicit Datastore(const std::string& extra = "") {
    sh("mkdir -p " + q(backing) + " " + q(mnt));
    write_file(config, policy(extra));
  }
  std::string policy(const std::string& extra) const {
    return "datastore:\n  backing: " + backing + "\n  mountpoint: " + mnt + "\n" + extra +
           "policies:\n  bronze:\n    throttle: { iops: 100000 }\nrules:\n  - { match: '*', policy: bronze }\n";
  }
};

uint64_t monotonic_usec() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000u + static_cast<uint64_t>(ts.tv_nsec) / 1000u;
}

// close(2) of a file in a FUSE mount sends its RELEASE asynchronously: before stopping a daemon
// whose images were open, wait until it has closed them (status lists no disk).
void wait_disks_closed(const std::string& mnt) {
  for (int i = 0; i < 500; ++i) {
    if (testing::get_xattr(mnt, "user.iofilter.status").find("\"disks\":[]") != std::string::npos) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  FAIL("the daemon still has open disks: " << testing::get_xattr(mnt, "user.iofilter.status"));
}

std::string version_of(const std::string& binary) {
  std::string out;
  REQUIRE(sh(q(binary) + " --version", &out) == 0);
  out = out.substr(out.find(' ') + 1);  // "iofilterfs 0.1.0\n"
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

}  // namespace

TEST_CASE("started as the unit starts it, the daemon is READY only once the mount answers", "[systemd]") {
  Datastore ds;
  NotifySocket sock(ds.t / "notify");
  Service svc(exec_start(ds.config), {"NOTIFY_SOCKET=" + sock.address()}, ds.t / "log", ds.mnt);

  auto ready = sock.wait_for("READY=1");
  INFO("messages:\n" << sock.transcript() << "log:\n" << svc.log());
  REQUIRE(ready);
  // Read the moment READY=1 arrived: the mount is there and answers.
  CHECK(testing::is_mounted(ds.mnt));
  CHECK(testing::get_xattr(ds.mnt, "user.iofilter.version") == version_of(daemon_binary()));
  // From the main process itself, which is still the one we started (it did not detach).
  CHECK(ready->pid == svc.pid());
  CHECK(svc.running());
  CHECK(ready->get("STATUS") == "Serving " + ds.mnt + ": no disks open");
  // Nothing before it claimed readiness or a reload.
  CHECK(sock.transcript().find("READY=1") == sock.transcript().rfind("READY=1"));
  ::kill(svc.pid(), SIGTERM);
  CHECK(svc.wait(20) == 0);
}

TEST_CASE("SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 with the new status", "[systemd]") {
  Datastore ds;
  NotifySocket sock(ds.t / "notify");
  Service svc(exec_start(ds.config), {"NOTIFY_SOCKET=" + sock.address()}, ds.t / "log", ds.mnt);
  INFO("log:\n" << svc.log());
  REQUIRE(sock.wait_for("READY=1"));
  write_file(ds.backing + "/disk.raw", std::string(1 << 20, '\0'));
  int fd = ::open((ds.mnt + "/disk.raw").c_str(), O_RDWR);
  REQUIRE(fd >= 0);

  SECTION("a valid file") {
    const uint64_t before = monotonic_usec();
    REQUIRE(::kill(svc.pid(), SIGHUP) == 0);
    auto reloading = sock.next(10000);
    REQUIRE(reloading);
    INFO("messages:\n" << sock.transcript());
    CHECK(reloading->has("RELOADING=1"));
    CHECK_FALSE(reloading->has("READY=1"));
    const uint64_t at = std::stoull(reloading->get("MONOTONIC_USEC"));
    CHECK(at >= before);
    CHECK(at <= monotonic_usec());
    CHECK(reloading->get("STATUS") == "Reloading " + ds.config);
    CHECK(reloading->pid == svc.pid());
    auto ready = sock.next(10000);
    REQUIRE(ready);
    CHECK(ready->has("READY=1"));
    CHECK(ready->get("STATUS") == "Serving " + ds.mnt + ": 1 disk open, active");
  }
  SECTION("a file with a mistake: refused, and the status says so until a good one is loaded") {
    write_file(ds.config, ds.policy("") + "bogus: 1\n");
    REQUIRE(::kill(svc.pid(), SIGHUP) == 0);
    auto reloading = sock.next(10000);
    REQUIRE(reloading);
    CHECK(reloading->has("RELOADING=1"));
    auto ready = sock.next(10000);
    REQUIRE(ready);
    INFO("messages:\n" << sock.transcript());
    CHECK(ready->has("READY=1"));
    const std::string status = ready->get("STATUS");
    CHECK(status.rfind("Serving " + ds.mnt + ": 1 disk open, active; last reload refused, old policies in force: " +
                           ds.config + ":",
                       0) == 0);
    CHECK(status.find("bogus") != std::string::npos);
    // The old policy still applies.
    CHECK(testing::get_xattr(ds.mnt + "/disk.raw", "user.iofilter.policy") == "bronze");

    write_file(ds.config, ds.policy(""));
    REQUIRE(::kill(svc.pid(), SIGHUP) == 0);
    REQUIRE(sock.wait_for("RELOADING=1", 10));
    auto again = sock.next(10000);
    REQUIRE(again);
    CHECK(again->has("READY=1"));
    CHECK(again->get("STATUS") == "Serving " + ds.mnt + ": 1 disk open, active");
  }
  ::close(fd);
  wait_disks_closed(ds.mnt);
  ::kill(svc.pid(), SIGTERM);
  CHECK(svc.wait(20) == 0);
}

TEST_CASE("SIGTERM: STOPPING=1, every open disk drained and closed, unmounted, exit status 0", "[systemd]") {
  Datastore ds;
  NotifySocket sock(ds.t / "notify");
  Service svc(exec_start(ds.config), {"NOTIFY_SOCKET=" + sock.address()}, ds.t / "log", ds.mnt);
  REQUIRE(sock.wait_for("READY=1"));
  write_file(ds.backing + "/disk.raw", std::string(1 << 20, '\0'));
  // An image held open through the stop, with writes that were never synced.
  int fd = ::open((ds.mnt + "/disk.raw").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  const std::string data(65536, 'z');
  REQUIRE(::pwrite(fd, data.data(), data.size(), 4096) == static_cast<ssize_t>(data.size()));

  REQUIRE(::kill(svc.pid(), SIGTERM) == 0);
  auto stopping = sock.wait_for("STOPPING=1");
  INFO("messages:\n" << sock.transcript() << "log:\n" << svc.log());
  REQUIRE(stopping);
  CHECK(stopping->get("STATUS") == "Stopping: unmounting " + ds.mnt + ", draining 1 open disk");
  CHECK(svc.wait(20) == 0);
  CHECK_FALSE(testing::is_mounted(ds.mnt));
  const std::string log = svc.log();
  CHECK(log.find("disk.raw: drained and closed") != std::string::npos);
  CHECK(log.find("unmounted " + ds.mnt) != std::string::npos);
  CHECK(log.find("undrained") == std::string::npos);
  ::close(fd);
  CHECK(read_file(ds.backing + "/disk.raw").substr(4096, data.size()) == data);
}

TEST_CASE("WATCHDOG=1 every half WATCHDOG_USEC while the mount answers, none while it cannot", "[systemd]") {
  Datastore ds("  threads: 1\n");  // one worker: a held request stops the session from answering
  NotifySocket sock(ds.t / "notify");
  auto argv = exec_start(ds.config);
  argv.push_back("--fault-injection");
  Service svc(argv, {"NOTIFY_SOCKET=" + sock.address(), "WATCHDOG_USEC=400000"}, ds.t / "log", ds.mnt);
  INFO("log:\n" << svc.log());
  REQUIRE(sock.wait_for("READY=1"));

  // Answering: a ping every 200 ms.
  std::vector<Clock::time_point> pings;
  auto collect = [&](int ms) {
    auto end = Clock::now() + std::chrono::milliseconds(ms);
    while (Clock::now() < end)
      if (auto m = sock.next(50); m && m->has("WATCHDOG=1")) {
        CHECK(m->pid == svc.pid());
        pings.push_back(m->at);
      }
  };
  collect(1500);
  INFO("messages:\n" << sock.transcript());
  CHECK(pings.size() >= 4);
  CHECK(pings.size() <= 9);

  // The only worker is held for 2.5 s by a delayed write: the session cannot answer, no pings.
  write_file(ds.backing + "/disk.raw", std::string(1 << 20, '\0'));
  int fd = ::open((ds.mnt + "/disk.raw").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  REQUIRE(testing::set_xattr(ds.mnt + "/disk.raw", "user.iofilter.fault", "delay=write:2500ms") == 0);
  pings.clear();
  const auto held_from = Clock::now();
  std::thread writer([fd] {
    char b[4096] = {};
    (void)::pwrite(fd, b, sizeof b, 0);
  });
  collect(4000);
  writer.join();
  ::close(fd);
  wait_disks_closed(ds.mnt);
  // Pings stopped while the write was held (from ~0.2 s after it began until ~2.5 s), and came back.
  size_t during = 0, after = 0;
  for (auto p : pings) {
    auto t = std::chrono::duration_cast<std::chrono::milliseconds>(p - held_from).count();
    if (t >= 500 && t <= 2300) ++during;
    if (t > 2800) ++after;
  }
  CHECK(during == 0);
  CHECK(after >= 3);
  ::kill(svc.pid(), SIGTERM);
  CHECK(svc.wait(20) == 0);
}

TEST_CASE("WATCHDOG_PID naming another process, and an abstract NOTIFY_SOCKET", "[systemd]") {
  Datastore ds;
  NotifySocket sock("@iofilterfs-test-" + std::to_string(::getpid()) + "-" + std::to_string(monotonic_usec()));
  Service svc(exec_start(ds.config), {"NOTIFY_SOCKET=" + sock.address(), "WATCHDOG_USEC=200000", "WATCHDOG_PID=1"},
              ds.t / "log", ds.mnt);
  auto ready = sock.wait_for("READY=1");
  INFO("messages:\n" << sock.transcript() << "log:\n" << svc.log());
  REQUIRE(ready);
  CHECK(ready->pid == svc.pid());
  // The watchdog is another process's: no pings.
  auto end = Clock::now() + std::chrono::milliseconds(1000);
  while (Clock::now() < end)
    if (auto m = sock.next(100)) CHECK_FALSE(m->has("WATCHDOG=1"));
  ::kill(svc.pid(), SIGTERM);
  CHECK(sock.wait_for("STOPPING=1"));
  CHECK(svc.wait(20) == 0);
}

TEST_CASE("a missing policy file: one clear line, exit status 2, and STATUS= and ERRNO= for the manager",
          "[systemd]") {
  TempDir t;
  NotifySocket sock(t / "notify");
  const std::string missing = t / "ds9.yaml";
  Service svc(exec_start(missing), {"NOTIFY_SOCKET=" + sock.address()}, t / "log", t / "m");
  CHECK(svc.wait(20) == 2);
  CHECK(svc.log() == missing + ": No such file or directory\n");
  auto m = sock.next(2000);
  REQUIRE(m);
  CHECK(m->get("STATUS") == "Failed: " + missing + ": No such file or directory");
  CHECK(m->get("ERRNO") == std::to_string(ENOENT));
  CHECK_FALSE(m->has("READY=1"));
}

TEST_CASE("after a daemon is killed, the next one detaches its dead mount and serves (Restart=on-failure)",
          "[systemd]") {
  Datastore ds;
  NotifySocket sock(ds.t / "notify");
  Service first(exec_start(ds.config), {"NOTIFY_SOCKET=" + sock.address()}, ds.t / "log1", ds.mnt);
  REQUIRE(sock.wait_for("READY=1"));
  ::kill(first.pid(), SIGKILL);
  CHECK(first.wait(20) == 128 + SIGKILL);
  // Left behind, dead.
  REQUIRE(testing::is_mounted(ds.mnt));
  struct stat st;
  CHECK(::stat(ds.mnt.c_str(), &st) != 0);
  CHECK(errno == ENOTCONN);

  Service second(exec_start(ds.config), {"NOTIFY_SOCKET=" + sock.address()}, ds.t / "log2", ds.mnt);
  auto ready = sock.wait_for("READY=1");
  INFO("log:\n" << second.log());
  REQUIRE(ready);
  CHECK(ready->pid == second.pid());
  CHECK(second.log().find(ds.mnt + ": detached the dead mount a previous daemon left behind") != std::string::npos);
  write_file(ds.mnt + "/f", "alive");
  CHECK(read_file(ds.backing + "/f") == "alive");
  ::kill(second.pid(), SIGTERM);
  CHECK(second.wait(20) == 0);
  CHECK_FALSE(testing::is_mounted(ds.mnt));
}

TEST_CASE("systemd-analyze verify accepts the unit, and its Documentation= pages resolve", "[systemd][docs]") {
  TempDir t;
  // The unit as installed, pointing at the binary under test; the man pages where man finds them.
  std::string unit = read_file(unit_path());
  const std::string from = "ExecStart=/usr/bin/iofilterfs ";
  REQUIRE(unit.find(from) != std::string::npos);
  unit.replace(unit.find(from), from.size(), "ExecStart=" + daemon_binary() + " ");
  write_file(t / "iofilterfs@.service", unit);
  REQUIRE(sh("cd " + q(t.path()) + " && ln -s iofilterfs@.service iofilterfs@ds1.service") == 0);
  const std::string man = testing::source_dir() + "/man";
  REQUIRE(sh("mkdir -p " + q(t / "man/man5") + " " + q(t / "man/man7") + " " + q(t / "man/man8") + " && cp " +
             q(man) + "/*.5 " + q(t / "man/man5") + " && cp " + q(man) + "/*.7 " + q(t / "man/man7") + " && cp " +
             q(man) + "/*.8 " + q(t / "man/man8")) == 0);
  std::string out;
  int rc = sh("MANPATH=" + q(t / "man") + " systemd-analyze verify " + q(t / "iofilterfs@ds1.service"), &out);
  INFO(out);
  CHECK(rc == 0);
  CHECK(out.empty());
}

TEST_CASE("the unit: notify, reload, restart, watchdog, and no mount namespace that would hide the mount",
          "[systemd]") {
  const std::string unit = read_file(unit_path());
  std::set<std::string> lines;
  std::istringstream in(unit);
  std::string l;
  while (std::getline(in, l))
    if (!l.empty() && l[0] != '#') lines.insert(l);
  for (const char* want :
       {"Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
        "RestartPreventExitStatus=2", "NoNewPrivileges=yes", "DeviceAllow=/dev/fuse rw", "WantedBy=multi-user.target"}) {
    INFO(want);
    CHECK(lines.count(want) == 1);
  }
  for (const char* key : {"WatchdogSec=", "TimeoutStopSec=", "CapabilityBoundingSet=", "After=", "Before="}) {
    INFO(key);
    CHECK(unit.find(std::string("\n") + key) != std::string::npos);
  }
  CHECK(unit.find("After=local-fs.target remote-fs.target network-online.target\n") != std::string::npos);
  CHECK(unit.find("Before=libvirtd.service") != std::string::npos);
  // Each of these makes systemd run the service in a mount namespace of its own, set up as a
  // slave of the host's: the daemon's FUSE mount would never appear on the host.
  for (const char* ns :
       {"ProtectSystem=", "ProtectHome=", "PrivateTmp=", "ReadWritePaths=", "ReadOnlyPaths=", "InaccessiblePaths=",
        "ExecPaths=", "NoExecPaths=", "BindPaths=", "BindReadOnlyPaths=", "TemporaryFileSystem=", "PrivateDevices=",
        "PrivateMounts=", "PrivateNetwork=", "PrivateIPC=", "PrivateUsers=", "ProtectKernelTunables=",
        "ProtectKernelModules=", "ProtectKernelLogs=", "ProtectControlGroups=", "ProtectProc=", "ProcSubset=",
        "RootDirectory=", "RootImage=", "MountImages=", "ExtensionImages=", "ExtensionDirectories=", "LogNamespace=",
        "NetworkNamespacePath=", "IPCNamespacePath=", "MountFlags=", "DynamicUser="}) {
    INFO(ns);
    for (const auto& line : lines) CHECK(line.rfind(ns, 0) != 0);
  }
}

TEST_CASE("inside the unit's capability bounding set, with no_new_privs, callers still act as themselves",
          "[systemd][permissions]") {
  // CapabilityBoundingSet=CAP_A CAP_B ... as setpriv(1) takes it: -all,+a,+b
  std::istringstream in(read_file(unit_path()));
  std::string line, caps = "-all";
  while (std::getline(in, line))
    if (line.rfind("CapabilityBoundingSet=", 0) == 0) {
      std::istringstream words(line.substr(22));
      std::string c;
      while (words >> c) {
        for (auto& ch : c) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        caps += ",+" + c.substr(4);
      }
    }
  REQUIRE(caps.find("+sys_admin") != std::string::npos);

  Datastore ds("  options: [allow_other]\n");
  sh("chmod 0755 " + q(ds.t.path()) + " " + q(ds.backing) + " && mkdir -m 1777 " + q(ds.backing + "/shared") + " && truncate -s 1M " + q(ds.backing + "/disk.raw"));
  NotifySocket sock(ds.t / "notify");
  auto argv = exec_start(ds.config);
  argv.insert(argv.begin(), {"/usr/bin/setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set", caps, "--"});
  Service svc(argv, {"NOTIFY_SOCKET=" + sock.address()}, ds.t / "log", ds.mnt);
  INFO("bounding set " << caps << "\nlog:\n" << svc.log());
  REQUIRE(sock.wait_for("READY=1"));
  std::string out;
  CHECK(sh("grep -E '^(CapBnd|NoNewPrivs)' /proc/" + std::to_string(svc.pid()) + "/status", &out) == 0);
  INFO(out);
  CHECK(out.find("NoNewPrivs:\t1") != std::string::npos);

  const std::string m = ds.mnt, b = ds.backing;
  auto as_nobody = [](const std::string& cmd) {
    return "setpriv --reuid=65534 --regid=65534 --clear-groups -- bash -c " + q(cmd);
  };
  // A user's files are the user's (setfsuid/setfsgid: CAP_SETUID, CAP_SETGID).
  CHECK(sh(as_nobody("echo mine > " + q(m + "/shared/u") + " && mkdir " + q(m + "/shared/d") + " && chmod 700 " +
                     q(m + "/shared/d") + " && echo x > " + q(m + "/shared/d/x") + " && chmod 600 " +
                     q(m + "/shared/u"))) == 0);
  CHECK(sh("stat -c %u:%g " + q(b + "/shared/u"), &out) == 0);
  CHECK(out == "65534:65534\n");
  // And the backing permissions hold against them.
  CHECK(sh(as_nobody("echo no > " + q(m + "/disk.raw"))) != 0);
  // Root through the mount keeps root's powers over other users' files.
  CHECK(sh("cat " + q(m + "/shared/u")) == 0);                         // CAP_DAC_OVERRIDE
  CHECK(sh("ls " + q(m + "/shared/d")) == 0);                          // CAP_DAC_OVERRIDE
  CHECK(sh("echo root >> " + q(m + "/shared/u")) == 0);                // CAP_DAC_OVERRIDE
  CHECK(sh("chmod 640 " + q(m + "/shared/u")) == 0);                   // CAP_FOWNER
  CHECK(sh("touch -d @0 " + q(m + "/shared/u")) == 0);                 // CAP_FOWNER
  CHECK(sh("chown 1:1 " + q(m + "/shared/u")) == 0);                   // CAP_CHOWN
  CHECK(sh("stat -c %u:%g:%a " + q(b + "/shared/u"), &out) == 0);
  CHECK(out == "1:1:640\n");
  CHECK(sh("echo s > " + q(m + "/suid") + " && chmod 6755 " + q(m + "/suid") + " && chown 65534:65534 " +
           q(m + "/suid") + " && chmod 6755 " + q(m + "/suid") + " && echo more >> " + q(m + "/suid")) == 0);
  CHECK(sh("stat -c %a " + q(b + "/suid"), &out) == 0);
  CHECK(out == "6755\n");                                              // CAP_FSETID
  CHECK(sh("mknod " + q(m + "/null") + " c 1 3") == 0);                // CAP_MKNOD
  // An image's policy assignment lives in trusted.* on the backing file (CAP_SYS_ADMIN).
  CHECK(testing::set_xattr(m + "/disk.raw", "user.iofilter.policy", "bronze") == 0);
  CHECK(sh("getfattr --absolute-names --only-values -n trusted.iofilterfs.policy " + q(b + "/disk.raw"), &out) == 0);
  CHECK(out == "bronze");
  // And it unmounts itself (umount2: CAP_SYS_ADMIN).
  ::kill(svc.pid(), SIGTERM);
  CHECK(svc.wait(20) == 0);
  CHECK_FALSE(testing::is_mounted(m));
}

TEST_CASE("mount -t fuse.iofilterfs and an fstab line mount the datastore, and umount unmounts", "[systemd][mount]") {
  // mount(8) drops the caller's PATH, and mount.fuse3 runs `iofilterfs` with /bin/sh's default
  // PATH: the binary must be installed in /usr/local/bin or /usr/bin. A private mount namespace
  // puts the one under test at /usr/local/bin/iofilterfs without touching the host.
  Datastore ds;
  sh("mkdir -p " + q(ds.t / "bin") + " && ln -s " + q(daemon_binary()) + " " + q(ds.t / "bin/iofilterfs"));
  write_file(ds.t / "fstab", ds.backing + " " + ds.mnt + " fuse.iofilterfs config=" + ds.config +
                                 ",nosuid,nodev,nofail,_netdev 0 0\n");
  const std::string m = q(ds.mnt), b = q(ds.backing);
  // Waits until no daemon serves the mountpoint any more (it exits by itself after umount).
  const std::string gone = "for i in $(seq 200); do pgrep -f -- " + q("iofilterfs.* " + ds.mnt + "( |$)") +
                           " >/dev/null || break; sleep 0.05; done; ! pgrep -f -- " + q("iofilterfs.* " + ds.mnt + "( |$)");
  const std::string script =
      "set -ex; trap 'umount -l " + m + " 2>/dev/null || true' EXIT\n"
      "mount --bind " + q(ds.t / "bin") + " /usr/local/bin\n"
      "mount -t fuse.iofilterfs " + b + " " + m + " -o config=" + q(ds.config) + "\n"
      "grep -F ' " + ds.mnt + " ' /proc/self/mountinfo | grep -F ' - fuse.iofilterfs iofilterfs:" + ds.backing + " '\n"
      "getfattr --only-values -n user.iofilter.status " + m + " | grep -F '\"config\":\"" + ds.config + "\"'\n"
      "echo one > " + m + "/f; test \"$(cat " + b + "/f)\" = one\n"
      "umount " + m + "\n"
      "! grep -F ' " + ds.mnt + " ' /proc/self/mountinfo\n" + gone + "\n"
      "mount -T " + q(ds.t / "fstab") + " " + m + "\n"
      "grep -F ' " + ds.mnt + " ' /proc/self/mountinfo | grep -E 'nosuid,nodev'\n"
      "echo two > " + m + "/f; test \"$(cat " + b + "/f)\" = two\n"
      "umount " + m + "\n" + gone + "\n"
      "echo all-done\n";
  write_file(ds.t / "mount.sh", script);
  std::string out;
  int rc = sh("unshare --mount --propagation private bash " + q(ds.t / "mount.sh"), &out);
  INFO(out);
  CHECK(rc == 0);
  CHECK(out.find("all-done") != std::string::npos);
  CHECK_FALSE(testing::is_mounted(ds.mnt));
}

TEST_CASE("cmake --install fills a DESTDIR with every file, and keeps an edited example.yaml", "[systemd][install]") {
  TempDir t;
  const std::string root = t / "root";
  auto install = [&](const std::string& prefix, std::string* out) {
    return sh("DESTDIR=" + q(root) + " cmake --install " + q(build_dir()) + " --prefix " + prefix, out);
  };
  std::string out;
  REQUIRE(install("/usr", &out) == 0);
  INFO(out);
  std::string files;
  REQUIRE(sh("cd " + q(root) + " && find . -type f | sort", &files) == 0);
  CHECK(files ==
        "./etc/iofilterfs/example.yaml\n"
        "./usr/bin/iofilterctl\n"
        "./usr/bin/iofilterfs\n"
        "./usr/lib/systemd/system/iofilterfs@.service\n"
        "./usr/share/man/man5/iofilterfs.yaml.5\n"
        "./usr/share/man/man7/iofilterfs.7\n"
        "./usr/share/man/man8/iofilterctl.8\n"
        "./usr/share/man/man8/iofilterfs.8\n");
  const std::string src = testing::source_dir();
  for (const char* page : {"man5/iofilterfs.yaml.5", "man7/iofilterfs.7", "man8/iofilterctl.8", "man8/iofilterfs.8"}) {
    INFO(page);
    const std::string name = std::string(page).substr(5);
    CHECK(read_file(root + "/usr/share/man/" + page) == read_file(src + "/man/" + name));
  }
  CHECK(read_file(root + "/etc/iofilterfs/example.yaml") == read_file(src + "/config/example.yaml"));
  // The unit runs the installed binary; otherwise it is the source's.
  std::string unit = read_file(src + "/systemd/iofilterfs@.service");
  CHECK(read_file(root + "/usr/lib/systemd/system/iofilterfs@.service") == unit);
  // The installed commands run and agree on the version.
  const std::string v = version_of(root + "/usr/bin/iofilterfs");
  CHECK(v == version_of(root + "/usr/bin/iofilterctl"));
  CHECK(v == version_of(daemon_binary()));

  // An edited example survives the next install; everything else is refreshed.
  write_file(root + "/etc/iofilterfs/example.yaml", "# mine\n");
  write_file(root + "/usr/share/man/man7/iofilterfs.7", "stale");
  REQUIRE(install("/usr", &out) == 0);
  CHECK(out.find("Keeping: " + root + "/etc/iofilterfs/example.yaml") != std::string::npos);
  CHECK(read_file(root + "/etc/iofilterfs/example.yaml") == "# mine\n");
  CHECK(read_file(root + "/usr/share/man/man7/iofilterfs.7") == read_file(src + "/man/iofilterfs.7"));

  // Another prefix: the unit's ExecStart follows it.
  REQUIRE(install("/usr/local", &out) == 0);
  const std::string local_unit = read_file(root + "/usr/local/lib/systemd/system/iofilterfs@.service");
  CHECK(local_unit.find("\nExecStart=/usr/local/bin/iofilterfs --foreground --config /etc/iofilterfs/%i.yaml\n") !=
        std::string::npos);
  CHECK(sh("test -x " + q(root + "/usr/local/bin/iofilterfs")) == 0);
}

TEST_CASE("every man page renders without a warning", "[systemd][docs]") {
  std::string pages;
  REQUIRE(sh("ls " + q(testing::source_dir() + "/man") + "/*.[1-9]", &pages) == 0);
  std::istringstream in(pages);
  std::string page;
  int n = 0;
  while (std::getline(in, page)) {
    std::string out;
    INFO(page << "\n" << out);
    CHECK(sh("groff -man -ww -z " + q(page), &out) == 0);
    CHECK(out.empty());
    CHECK(sh("MANWIDTH=80 man -l " + q(page) + " >/dev/null", &out) == 0);
    CHECK(out.empty());
    ++n;
  }
  CHECK(n >= 4);
}

TEST_CASE("a root daemon that cannot switch to its callers' identity refuses to start", "[systemd][permissions]") {
  // setfsuid(2) cannot fail visibly: without CAP_SETUID the daemon would serve every user as root.
  Datastore ds;
  NotifySocket sock(ds.t / "notify");
  for (const char* missing : {"setuid", "setgid"}) {
    std::string caps = "-all,+sys_admin,+chown,+dac_override,+fowner,+fsetid,+mknod";
    caps += std::string(",+") + (std::string(missing) == "setuid" ? "setgid" : "setuid");
    auto argv = exec_start(ds.config);
    argv.insert(argv.begin(), {"/usr/bin/setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set", caps, "--"});
    Service svc(argv, {"NOTIFY_SOCKET=" + sock.address()}, ds.t / "log", ds.mnt);
    INFO(missing);
    CHECK(svc.wait(20) == 2);
    const std::string want = std::string("running as root without CAP_") + (std::string(missing) == "setuid" ? "SETUID" : "SETGID") +
                             ": files would be created as root instead of as their callers";
    CHECK(svc.log() == "iofilterfs: " + want + "\n");
    auto m = sock.next(2000);
    REQUIRE(m);
    CHECK(m->get("STATUS") == "Failed: iofilterfs: " + want);
    CHECK_FALSE(testing::is_mounted(ds.mnt));
  }
}

TEST_CASE("with stderr as the journal (JOURNAL_STREAM), each log line carries its syslog priority", "[systemd]") {
  Datastore ds;
  NotifySocket sock(ds.t / "notify");
  const std::string log = ds.t / "journal";
  write_file(log, "");
  struct stat st;
  REQUIRE(::stat(log.c_str(), &st) == 0);
  const std::string stream = std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
  Service svc(exec_start(ds.config), {"NOTIFY_SOCKET=" + sock.address(), "JOURNAL_STREAM=" + stream}, log, ds.mnt);
  REQUIRE(sock.wait_for("READY=1"));
  write_file(ds.config, ds.policy("") + "bogus: 1\n");
  ::kill(svc.pid(), SIGHUP);
  REQUIRE(sock.wait_for("RELOADING=1", 10));
  REQUIRE(sock.wait_for("READY=1", 10));
  ::kill(svc.pid(), SIGTERM);
  CHECK(svc.wait(20) == 0);
  const std::string text = read_file(log);
  INFO(text);
  CHECK(text.find("<6>mounted " + ds.backing + " at " + ds.mnt) != std::string::npos);
  CHECK(text.find("<3>reload refused, the old policies stay in force: " + ds.config + ":") != std::string::npos);
  CHECK(text.find("<6>unmounted " + ds.mnt) != std::string::npos);
  std::istringstream lines(text);
  std::string l;
  while (std::getline(lines, l)) {
    INFO(l);
    CHECK((l.size() > 3 && l[0] == '<' && l[2] == '>' && l[1] >= '2' && l[1] <= '7'));
  }
}
