// iofilterfs: mounts a datastore of disk images through per-image filter chains.
//
//   iofilterfs [OPTIONS] BACKING MOUNTPOINT      mount (BACKING/MOUNTPOINT may come from --config)
//   iofilterfs check-config FILE [--backing DIR] validate a policy file and show what it assigns
#include <CLI/CLI.hpp>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/fsuid.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#include "cli.h"
#include "config.h"
#include "datastore.h"
#include "fuse_ops.h"
#include "notify.h"
#include "version.h"

using namespace iofilterfs;

namespace {

// ---- the service manager -------------------------------------------------------------------
//
// Under systemd (Type=notify, see systemd/iofilterfs@.service) the daemon tells the manager what
// it is doing through Notifier (notify.h); everywhere else those calls are no-ops.
//   READY=1      only once the mount answers: the health thread's first probe (a getxattr of
//                user.iofilter.version on the mount's root, made through the kernel like any
//                client's) has come back, so FUSE_INIT has been answered and a worker is serving;
//   WATCHDOG=1   every half $WATCHDOG_USEC while that probe keeps coming back: a session that
//                cannot answer (the request loop dead, every worker stuck) stops the pings and
//                the manager restarts the service. The probe touches no disk, so a disk whose
//                filters are slow or stuck (a long flush, a held quiesce) does not restart the
//                whole datastore: a failure inside one disk's filters affects that disk only;
//   RELOADING=1 / READY=1 around a SIGHUP reload, with the outcome in STATUS=;
//   STATUS=      one line: the open disks and their health, and a refused reload;
//   STOPPING=1   when the request loop has ended, before the filters drain and the mount goes.

// STATUS= text: the open disks by state, the first unhealthy one with its reason, and a
// refused reload. Reads the datastore's own status JSON (the same the status xattr returns).
std::string status_line(Datastore& ds) {
  YAML::Node st;
  try {
    st = YAML::Load(ds.status_json());
  } catch (const std::exception& e) {
    return std::string("status unavailable: ") + e.what();
  }
  size_t n = 0, active = 0, quiesced = 0, degraded = 0, failed = 0;
  std::string first_bad;
  for (const auto& d : st["disks"]) {
    ++n;
    const std::string state = d["state"].as<std::string>("");
    if (state == "active") ++active;
    else if (state == "quiesced") ++quiesced;
    else {
      if (state.rfind("degraded", 0) == 0) ++degraded;
      else ++failed;
      if (first_bad.empty()) first_bad = d["path"].as<std::string>("") + " " + state;
    }
  }
  std::string s = "Serving " + st["mountpoint"].as<std::string>("") + ": ";
  if (n == 0) s += "no disks open";
  else if (active == n) s += std::to_string(n) + (n == 1 ? " disk open, active" : " disks open, all active");
  else {
    s += std::to_string(n) + (n == 1 ? " disk open (" : " disks open (");
    std::string parts;
    auto part = [&](size_t k, const char* what) {
      if (k) parts += (parts.empty() ? "" : ", ") + std::to_string(k) + " " + what;
    };
    part(active, "active");
    part(quiesced, "quiesced");
    part(degraded, "degraded");
    part(failed, "failed");
    s += parts + ")";
    if (!first_bad.empty()) s += "; " + first_bad;
  }
  if (st["config_error"] && !st["config_error"].IsNull())
    s += "; last reload refused, old policies in force: " + st["config_error"].as<std::string>("");
  return Notifier::one_line(s);
}

// What the manager has been told, shared by the threads that tell it. mu_ orders the messages
// (RELOADING=1 never before the first READY=1) and guards the last STATUS= sent.
class Service {
 public:
  Service(Notifier& notify, Datastore& ds) : notify_(notify), ds_(ds) {}
  bool enabled() const { return notify_.enabled(); }

  // The mount answers: READY=1 and the first STATUS=.
  void ready() {
    std::lock_guard<std::mutex> g(mu_);
    if (ready_ || stopping_) return;
    ready_ = true;
    status_ = status_line(ds_);
    send("READY=1\nSTATUS=" + status_);
    spdlog::info("ready: {}", status_);
  }
  void reloading(const std::string& file) {
    std::lock_guard<std::mutex> g(mu_);
    if (!ready_ || stopping_) return;
    send("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(Notifier::monotonic_usec()) + "\nSTATUS=" +
         Notifier::one_line("Reloading " + file));
  }
  void reloaded() {
    std::lock_guard<std::mutex> g(mu_);
    if (!ready_ || stopping_) return;
    status_ = status_line(ds_);
    send("READY=1\nSTATUS=" + status_);
  }
  // A STATUS= line when the disks' health has changed since the last one.
  void refresh() {
    if (!notify_.enabled()) return;
    std::string s = status_line(ds_);
    std::lock_guard<std::mutex> g(mu_);
    if (!ready_ || stopping_ || s == status_) return;
    status_ = s;
    send("STATUS=" + status_);
  }
  void stopping(const std::string& why) {
    std::lock_guard<std::mutex> g(mu_);
    stopping_ = true;
    send("STOPPING=1\nSTATUS=" + Notifier::one_line(why));
  }
  void status(const std::string& text) {
    std::lock_guard<std::mutex> g(mu_);
    send("STATUS=" + Notifier::one_line(text));
  }
  void watchdog() { send("WATCHDOG=1"); }

 private:
  void send(const std::string& msg) {
    if (!notify_.send(msg) && !send_failed_.exchange(true))
      spdlog::warn("cannot notify the service manager: {}", std::strerror(errno));
  }
  Notifier& notify_;
  Datastore& ds_;
  std::mutex mu_;
  bool ready_ = false;     // under mu_
  bool stopping_ = false;  // under mu_
  std::string status_;     // under mu_
  std::atomic<bool> send_failed_{false};
};

// SIGHUP asks for a reload. The handler only pokes an eventfd; a thread of our own reloads,
// and between signals refreshes the STATUS= line.
int g_reload_fd = -1;

void on_sighup(int) {
  uint64_t one = 1;
  ssize_t r = ::write(g_reload_fd, &one, sizeof one);
  (void)r;
}

class ReloadThread {
 public:
  ReloadThread(Datastore& ds, Service& svc) : ds_(ds), svc_(svc) {
    g_reload_fd = ::eventfd(0, EFD_CLOEXEC);
    thread_ = std::thread([this] { loop(); });
    struct sigaction sa {};
    sa.sa_handler = on_sighup;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGHUP, &sa, nullptr);  // replaces libfuse's "SIGHUP exits"
  }
  ~ReloadThread() {
    signal(SIGHUP, SIG_IGN);
    stop_ = true;
    on_sighup(0);
    thread_.join();
    ::close(g_reload_fd);
  }

 private:
  static constexpr int kStatusPeriodMs = 10000;
  void loop() {
    pollfd p{g_reload_fd, POLLIN, 0};
    for (;;) {
      int r = ::poll(&p, 1, svc_.enabled() ? kStatusPeriodMs : -1);
      if (stop_) return;
      if (r == 0) {
        svc_.refresh();
        continue;
      }
      uint64_t n;
      if (r < 0 || ::read(g_reload_fd, &n, sizeof n) != sizeof n) continue;
      std::string err;
      spdlog::info("SIGHUP: reloading the policy file");
      svc_.reloading(ds_.options().config);
      (void)ds_.reload(&err);  // logs its outcome; an invalid file leaves the old policies
      svc_.reloaded();
    }
  }
  Datastore& ds_;
  Service& svc_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Sends READY=1 once the mount answers, then WATCHDOG=1 while it keeps answering (see above).
// A probe stuck in the kernel is released with an error when the session's device is closed at
// unmount, so the thread is joined only after fuse_session_unmount.
class HealthThread {
 public:
  HealthThread(Service& svc, std::string mountpoint, uint64_t watchdog_usec)
      : svc_(svc), mountpoint_(std::move(mountpoint)), watchdog_usec_(watchdog_usec) {
    thread_ = std::thread([this] { loop(); });
  }
  ~HealthThread() {
    stop();
    thread_.join();
  }
  // No more pings (the loop has ended; the thread may still be inside a probe).
  void stop() {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
    cv_.notify_all();
  }

 private:
  bool probe(std::string* err) {
    char buf[64];
    if (::getxattr(mountpoint_.c_str(), "user.iofilter.version", buf, sizeof buf) >= 0) return true;
    *err = std::strerror(errno);
    return false;
  }
  // Sleeps `ms`; false when stopped meanwhile.
  bool sleep_ms(uint64_t ms) {
    std::unique_lock<std::mutex> g(mu_);
    return !cv_.wait_for(g, std::chrono::milliseconds(ms), [this] { return stop_; });
  }
  bool stopped() {
    std::lock_guard<std::mutex> g(mu_);
    return stop_;
  }
  void loop() {
    std::string err;
    while (!probe(&err)) {
      spdlog::debug("the mount does not answer yet: {}", err);
      if (!sleep_ms(50)) return;
    }
    if (stopped()) return;
    svc_.ready();
    if (watchdog_usec_ == 0) return;
    const uint64_t period_ms = std::max<uint64_t>(watchdog_usec_ / 2000, 1);
    spdlog::info("watchdog: {} ms, pinging every {} ms while the mount answers", watchdog_usec_ / 1000, period_ms);
    svc_.watchdog();
    while (sleep_ms(period_ms)) {
      if (!probe(&err)) {
        if (!stopped()) spdlog::warn("watchdog: the mount did not answer ({}); not pinging", err);
        continue;
      }
      if (stopped()) return;
      svc_.watchdog();
    }
  }
  Service& svc_;
  const std::string mountpoint_;
  const uint64_t watchdog_usec_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // under mu_
  std::thread thread_;
};

// Closes every open disk, so that each filter drains what the backing file lacks. Returns how
// many could not (each is logged); Datastore::shutdown() afterwards finds them closed.
size_t drain_all(Datastore& ds) {
  size_t bad = 0;
  for (const auto& d : ds.open_disks()) {
    Status s = d->close();
    if (!s.ok()) {
      ++bad;
      spdlog::error("{}: stopped with undrained data: {}", d->relpath(), s.what ? s.what : std::strerror(s.err));
    } else {
      spdlog::info("{}: drained and closed", d->relpath());
    }
  }
  ds.shutdown();
  return bad;
}

// A daemon that died without unmounting (SIGKILL, the watchdog's SIGABRT, a crash) leaves its
// mount behind, dead: every access to it fails with ENOTCONN. Restart=on-failure would then be
// refused forever; so a dead iofilterfs mount on our mountpoint is detached first. Only ours
// (type fuse.iofilterfs) and only when dead: a live mount is refused as "already mounted".
void detach_dead_mount(const std::string& mountpoint) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p = fs::absolute(mountpoint, ec).lexically_normal();
  if (ec || !p.has_filename()) return;
  char parent[PATH_MAX];
  if (!::realpath(p.parent_path().c_str(), parent)) return;
  const std::string target = (fs::path(parent) / p.filename()).string();

  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  bool ours = false;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, up, devno, root, mnt, rest;
    if (!(ls >> id >> up >> devno >> root >> mnt)) continue;
    std::string un;  // mountinfo escapes space, tab, newline and backslash as \ooo
    for (size_t i = 0; i < mnt.size(); ++i) {
      if (mnt[i] == '\\' && i + 3 < mnt.size() + 1) {
        un += static_cast<char>(std::strtol(mnt.substr(i + 1, 3).c_str(), nullptr, 8));
        i += 3;
      } else {
        un += mnt[i];
      }
    }
    size_t dash = line.find(" - ");
    if (un == target && dash != std::string::npos && line.compare(dash + 3, 16, "fuse.iofilterfs ") == 0) ours = true;
  }
  struct stat st;
  if (!ours || ::stat(target.c_str(), &st) == 0 || errno != ENOTCONN) return;
  if (::umount2(target.c_str(), MNT_DETACH) == 0)
    spdlog::warn("{}: detached the dead mount a previous daemon left behind", target);
  else
    spdlog::warn("{}: a previous daemon's mount is dead and cannot be detached: {}", target, std::strerror(errno));
}

// A root daemon serves each request with the caller's fsuid and fsgid (creds.h). setfsuid(2)
// and setfsgid(2) cannot report failure: without CAP_SETUID/CAP_SETGID (a service's too tight
// capability bounding set) they would silently leave the daemon acting as root, creating
// root-owned files for every user. So try both once, before mounting. Returns "" or why not.
std::string check_identity_switch() {
  if (::geteuid() != 0) return {};
  constexpr uid_t kProbe = 65534;
  ::setfsuid(kProbe);
  const bool uid_ok = static_cast<uid_t>(::setfsuid(static_cast<uid_t>(-1))) == kProbe;
  ::setfsuid(0);
  ::setfsgid(kProbe);
  const bool gid_ok = static_cast<gid_t>(::setfsgid(static_cast<gid_t>(-1))) == kProbe;
  ::setfsgid(0);
  if (uid_ok && gid_ok) return {};
  return std::string("running as root without ") + (uid_ok ? "" : "CAP_SETUID") + (uid_ok || gid_ok ? "" : " and ") +
         (gid_ok ? "" : "CAP_SETGID") + ": files would be created as root instead of as their callers";
}

// journald reads the syslog priority of each line of a service's stderr from a "<N>" prefix
// (sd-daemon(3)); its own timestamps make ours redundant.
class SyslogPriorityFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    static constexpr char kPriority[] = {'7', '7', '6', '4', '3', '2', '6'};  // trace .. critical, off
    const char p[3] = {'<', kPriority[static_cast<int>(msg.level)], '>'};
    dest.append(p, p + 3);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<SyslogPriorityFlag>(); }
};

// $JOURNAL_STREAM names the journal's stream as DEVICE:INODE; it counts only while stderr is it.
bool stderr_is_journal() {
  const char* js = std::getenv("JOURNAL_STREAM");
  struct stat st;
  if (!js || ::fstat(STDERR_FILENO, &st) != 0) return false;
  return std::string(js) == std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
}

int run(MountOptions opt, std::shared_ptr<const DatastoreConfig> config, Notifier& notify) {
  Datastore ds(opt, std::move(config));
  Service svc(notify, ds);
  std::string err;
  if (!ds.init(&err)) {
    std::fprintf(stderr, "iofilterfs: %s\n", err.c_str());
    svc.status("Failed: " + err);
    return kExitUsage;
  }

  // Options for the kernel. allow_other is only ever given with default_permissions, so the
  // kernel checks every access against the backing file's mode and owner.
  std::string fo = "fsname=iofilterfs:" + opt.backing + ",subtype=iofilterfs,max_read=1048576";
  if (opt.read_only) fo += ",ro";
  if (opt.allow_other) fo += ",allow_other,default_permissions";
  else if (opt.default_permissions) fo += ",default_permissions";
  for (const auto& o : opt.fuse_opts) fo += "," + o;
  const char* argv[] = {"iofilterfs", "-o", fo.c_str()};
  fuse_args args = FUSE_ARGS_INIT(3, const_cast<char**>(argv));

  // Under a service manager the daemon must stay the process it started (Type=notify): never
  // detach then, -f or not.
  const bool foreground = opt.foreground || notify.enabled();
  if (notify.enabled() && !opt.foreground)
    spdlog::info("NOTIFY_SOCKET is set: staying in the foreground for the service manager");

  const fuse_lowlevel_ops& ops = datastore_operations();
  fuse_session* se = fuse_session_new(&args, &ops, sizeof ops, &ds);
  if (!se) {
    std::fprintf(stderr, "iofilterfs: could not create the FUSE session\n");
    svc.status("Failed: could not create the FUSE session");
    return kExitFailure;
  }
  int rc = kExitFailure;
  if (fuse_set_signal_handlers(se) == 0) {
    if (fuse_session_mount(se, opt.mountpoint.c_str()) == 0) {
      if (!foreground) {
        // Once detached, stderr is gone: log to syslog (the journal).
        spdlog::set_default_logger(spdlog::syslog_logger_mt("iofilterfs", "iofilterfs", LOG_PID));
      }
      std::unique_ptr<HealthThread> health;  // outlives the unmount: see HealthThread
      if (fuse_daemonize(foreground ? 1 : 0) == 0) {
        ReloadThread reloader(ds, svc);  // after daemonizing: threads do not survive fork
        if (notify.enabled()) health = std::make_unique<HealthThread>(svc, opt.mountpoint, notify.watchdog_usec());
        fuse_loop_config* cfg = fuse_loop_cfg_create();
        fuse_loop_cfg_set_clone_fd(cfg, 1);
        fuse_loop_cfg_set_max_threads(cfg, opt.threads);
        fuse_loop_cfg_set_idle_threads(cfg, opt.threads);  // keep workers (and their buffers)
        int r = fuse_session_loop_mt(se, cfg);
        fuse_loop_cfg_destroy(cfg);
        if (health) health->stop();
        // libfuse's signal handler leaves the signal number as the loop's result: a stop asked
        // for with SIGTERM/SIGINT is a clean exit.
        const bool clean = r == 0 || r == SIGTERM || r == SIGINT;
        rc = clean ? kExitOk : kExitFailure;
        if (!clean) spdlog::error("session loop ended with error {}", r);
        const size_t open = ds.open_disks().size();
        svc.stopping("Stopping: unmounting " + opt.mountpoint + ", draining " + std::to_string(open) +
                     (open == 1 ? " open disk" : " open disks"));
      } else {
        svc.status("Failed: could not detach");
      }
      fuse_session_unmount(se);
      health.reset();
      if (size_t bad = drain_all(ds)) {
        rc = kExitFailure;
        svc.status("Stopped with undrained data on " + std::to_string(bad) + (bad == 1 ? " disk" : " disks"));
      }
      spdlog::info("unmounted {}", opt.mountpoint);
    } else {
      std::fprintf(stderr, "iofilterfs: could not mount %s\n", opt.mountpoint.c_str());
      svc.status("Failed: could not mount " + opt.mountpoint);
    }
    fuse_remove_signal_handlers(se);
  }
  fuse_session_destroy(se);
  fuse_opt_free_args(&args);
  return rc;
}

// iofilterfs check-config FILE [--backing DIR]
int check_config(int argc, char** argv) {
  std::string file, backing;
  CLI::App app{"Validate a datastore policy file and show the chain each rule and image gets, without mounting",
               "iofilterfs check-config"};
  app.add_option("FILE", file, "the policy file")->required();
  app.add_option("-b,--backing", backing, "the datastore directory to list (default: datastore.backing)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int r = app.exit(e);
    return r == 0 ? kExitOk : kExitUsage;
  }
  DatastoreConfig c;
  const Registry& reg = Registry::instance();
  std::string err = load_config(file, reg, &c);
  if (!err.empty()) {
    std::fprintf(stderr, "%s\n", err.c_str());
    return kExitUsage;
  }
  std::printf("%s: valid: %zu policies, %zu rules\n", file.c_str(), c.policies.size(), c.rules.size());
  std::printf("\npolicies (filters in chain order):\n");
  for (const auto& p : c.policies) std::printf("  %-16s %s\n", p.name.c_str(), describe_policy(p, reg).c_str());
  std::printf("\nrules (first match wins):\n");
  int n = 0;
  for (const auto& r : c.rules)
    std::printf("  %d. %-24s -> %-12s %s\n", ++n, r.match.c_str(), r.policy.c_str(),
                describe_policy(*c.find_policy(r.policy), reg).c_str());
  std::printf("  (default)                   -> %-12s %s\n", c.default_policy.c_str(),
              describe_policy(*c.find_policy(c.default_policy), reg).c_str());
  const bool asked = !backing.empty();
  if (!asked) backing = c.backing;
  if (backing.empty()) return kExitOk;
  if (!asked && !std::filesystem::is_directory(backing)) {
    std::printf("\n(datastore.backing %s is not a directory here: no images to list)\n", backing.c_str());
    return kExitOk;
  }
  std::printf("\nimages in %s:\n", backing.c_str());
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::pair<std::string, std::string>> rows;
  for (auto it = fs::recursive_directory_iterator(backing, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    std::string rel = fs::relative(it->path(), backing, ec).string();
    if (!c.is_image(rel)) continue;
    std::string policy = c.policy_for(rel), how = "rule";
    char buf[256];
    ssize_t len = ::getxattr(it->path().c_str(), Datastore::kPolicyXattr, buf, sizeof buf);
    if (len > 0 && c.find_policy(std::string(buf, static_cast<size_t>(len)))) {
      policy = std::string(buf, static_cast<size_t>(len));
      how = "assigned";
    }
    rows.emplace_back(rel, policy + " (" + how + "): " + describe_policy(*c.find_policy(policy), reg));
  }
  if (ec) {
    std::fprintf(stderr, "iofilterfs: %s: %s\n", backing.c_str(), ec.message().c_str());
    return kExitUsage;
  }
  std::sort(rows.begin(), rows.end());
  for (const auto& [rel, what] : rows) std::printf("  %-32s %s\n", rel.c_str(), what.c_str());
  if (rows.empty()) std::printf("  (none)\n");
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "check-config") return check_config(argc - 1, argv + 1);

  // First, so that a refusal reaches the service manager too (STATUS=, ERRNO=).
  Notifier notify;
  const std::string notify_err = notify.from_environment();

  MountOptions opt;
  std::vector<std::string> o_lists;
  std::string log_level;

  CLI::App app{"iofilterfs - mount a datastore of disk images through I/O filter chains\n"
               "  iofilterfs check-config FILE [--backing DIR]   validate a policy file (see --help there)",
               "iofilterfs"};
  app.set_version_flag("-V,--version", std::string("iofilterfs ") + kVersion);
  app.add_option("BACKING", opt.backing, "directory of disk images to serve (default: datastore.backing)");
  app.add_option("MOUNTPOINT", opt.mountpoint, "empty directory to mount it on (default: datastore.mountpoint)");
  app.add_option("-c,--config", opt.config, "datastore policy file (YAML)");
  app.add_flag("-f,--foreground", opt.foreground, "stay in the foreground, log to stderr");
  app.add_option("-o", o_lists, "mount options, comma separated (ro, allow_other, default_permissions, "
                                 "config=FILE, threads=N, log_level=L, nosuid, nodev, noexec, noatime)");
  auto* threads = app.add_option("-t,--threads", opt.threads, "maximum FUSE worker threads (default 64)")
                      ->check(CLI::Range(1, 1024));
  auto* level = app.add_option("-l,--log-level", log_level, "trace, debug, info (default), warn, error")
                    ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  app.add_flag("--fault-injection", opt.fault_injection,
               "allow tests to inject faults per image through user.iofilter.fault");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int r = app.exit(e);
    if (r != 0) notify.send("STATUS=" + Notifier::one_line(std::string("Failed: ") + e.what()) + "\nERRNO=22");
    return r == 0 ? kExitOk : kExitUsage;
  }
  // A refusal: one line on stderr (and to the service manager), exit status 2.
  auto refuse = [&notify](const std::string& line, int err) {
    std::fprintf(stderr, "%s\n", line.c_str());
    notify.send("STATUS=" + Notifier::one_line("Failed: " + line) + "\nERRNO=" + std::to_string(err));
    return kExitUsage;
  };
  auto fail = [&](const std::string& msg) { return refuse("iofilterfs: " + msg, EINVAL); };
  // -o config=FILE counts like --config: read the -o lists once to find it.
  {
    MountOptions probe;
    for (const auto& l : o_lists)
      if (std::string e = apply_mount_options(l, &probe); !e.empty()) return fail(e);
    if (opt.config.empty()) opt.config = probe.config;
  }

  // The policy file first, then the command line over it.
  auto config = std::make_shared<DatastoreConfig>();
  if (!opt.config.empty()) {
    std::string err = load_config(opt.config, Registry::instance(), config.get());
    if (!err.empty()) return refuse(err, ::access(opt.config.c_str(), R_OK) == 0 ? EINVAL : errno);
    if (opt.backing.empty()) opt.backing = config->backing;
    if (opt.mountpoint.empty()) opt.mountpoint = config->mountpoint;
    for (const auto& o : config->options)
      if (std::string e = apply_mount_options(o, &opt); !e.empty()) return fail(opt.config + ": datastore.options: " + e);
    if (!threads->count() && config->threads) opt.threads = *config->threads;
  }
  for (const auto& l : o_lists)
    if (std::string e = apply_mount_options(l, &opt); !e.empty()) return fail(e);
  // The log level: --log-level, else -o log_level=, else the file's, else info.
  if (level->count()) opt.log_level = log_level;
  else if (opt.log_level.empty()) opt.log_level = config->log_level.empty() ? "info" : config->log_level;
  if (opt.backing.empty() || opt.mountpoint.empty())
    return fail("BACKING and MOUNTPOINT are required (on the command line or as datastore.backing and "
                "datastore.mountpoint in the policy file)");

  auto lvl = spdlog::level::from_str(opt.log_level);
  if (lvl == spdlog::level::off && opt.log_level != "off") return fail("unknown log level '" + opt.log_level + "'");
  spdlog::set_level(lvl);
  if (stderr_is_journal()) {
    auto f = std::make_unique<spdlog::pattern_formatter>();
    f->add_flag<SyslogPriorityFlag>('*').set_pattern("%*%v");
    spdlog::set_formatter(std::move(f));
  } else {
    spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  }
  if (!notify_err.empty()) spdlog::warn("{}: not notifying the service manager", notify_err);

  if (std::string err = check_identity_switch(); !err.empty()) return fail(err);
  detach_dead_mount(opt.mountpoint);
  if (std::string err = check_paths(&opt); !err.empty()) return fail(err);
  ::umask(0);  // modes arrive already masked by the caller's umask
  return run(opt, std::move(config), notify);
}
