// iofilterfs: mounts a datastore of disk images through per-image filter chains.
//
//   iofilterfs [OPTIONS] BACKING MOUNTPOINT      mount (BACKING/MOUNTPOINT may come from --config)
//   iofilterfs check-config FILE [--backing DIR] validate a policy file and show what it assigns
#include <CLI/CLI.hpp>
#include <fuse_lowlevel.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <thread>

#include "cli.h"
#include "config.h"
#include "datastore.h"
#include "fuse_ops.h"
#include "version.h"

using namespace iofilterfs;

namespace {

// SIGHUP asks for a reload. The handler only pokes an eventfd; a thread of our own reloads.
int g_reload_fd = -1;

void on_sighup(int) {
  uint64_t one = 1;
  ssize_t r = ::write(g_reload_fd, &one, sizeof one);
  (void)r;
}

class ReloadThread {
 public:
  explicit ReloadThread(Datastore& ds) : ds_(ds) {
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
  void loop() {
    uint64_t n;
    while (::read(g_reload_fd, &n, sizeof n) == sizeof n && !stop_) {
      std::string err;
      spdlog::info("SIGHUP: reloading the policy file");
      (void)ds_.reload(&err);  // logs its outcome; an invalid file leaves the old policies
    }
  }
  Datastore& ds_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

int run(MountOptions opt, std::shared_ptr<const DatastoreConfig> config) {
  Datastore ds(opt, std::move(config));
  std::string err;
  if (!ds.init(&err)) {
    std::fprintf(stderr, "iofilterfs: %s\n", err.c_str());
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

  const fuse_lowlevel_ops& ops = datastore_operations();
  fuse_session* se = fuse_session_new(&args, &ops, sizeof ops, &ds);
  if (!se) {
    std::fprintf(stderr, "iofilterfs: could not create the FUSE session\n");
    return kExitFailure;
  }
  int rc = kExitFailure;
  if (fuse_set_signal_handlers(se) == 0) {
    if (fuse_session_mount(se, opt.mountpoint.c_str()) == 0) {
      if (!opt.foreground) {
        // Once detached, stderr is gone: log to syslog (the journal).
        spdlog::set_default_logger(spdlog::syslog_logger_mt("iofilterfs", "iofilterfs", LOG_PID));
      }
      if (fuse_daemonize(opt.foreground ? 1 : 0) == 0) {
        ReloadThread reloader(ds);  // after daemonizing: threads do not survive fork
        fuse_loop_config* cfg = fuse_loop_cfg_create();
        fuse_loop_cfg_set_clone_fd(cfg, 1);
        fuse_loop_cfg_set_max_threads(cfg, opt.threads);
        fuse_loop_cfg_set_idle_threads(cfg, opt.threads);  // keep workers (and their buffers)
        int r = fuse_session_loop_mt(se, cfg);
        fuse_loop_cfg_destroy(cfg);
        // libfuse's signal handler leaves the signal number as the loop's result: a stop asked
        // for with SIGTERM/SIGINT is a clean exit.
        const bool clean = r == 0 || r == SIGTERM || r == SIGINT;
        rc = clean ? kExitOk : kExitFailure;
        if (!clean) spdlog::error("session loop ended with error {}", r);
      }
      fuse_session_unmount(se);
      ds.shutdown();
      spdlog::info("unmounted {}", opt.mountpoint);
    } else {
      std::fprintf(stderr, "iofilterfs: could not mount %s\n", opt.mountpoint.c_str());
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
    return r == 0 ? kExitOk : kExitUsage;
  }
  auto fail = [](const std::string& msg) {
    std::fprintf(stderr, "iofilterfs: %s\n", msg.c_str());
    return kExitUsage;
  };
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
    if (!err.empty()) {
      std::fprintf(stderr, "%s\n", err.c_str());
      return kExitUsage;
    }
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
  spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");

  if (std::string err = check_paths(&opt); !err.empty()) return fail(err);
  ::umask(0);  // modes arrive already masked by the caller's umask
  return run(opt, std::move(config));
}
