// iofilterfs: mounts a datastore directory of disk images through per-image filter chains.
#include <CLI/CLI.hpp>
#include <fuse_lowlevel.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <csignal>
#include <cstdio>
#include <memory>

#include "cli.h"
#include "datastore.h"
#include "fuse_ops.h"
#include "version.h"

using namespace iofilterfs;

namespace {

int run(MountOptions opt) {
  Datastore ds(opt);
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
        fuse_loop_config* cfg = fuse_loop_cfg_create();
        fuse_loop_cfg_set_clone_fd(cfg, 1);
        fuse_loop_cfg_set_max_threads(cfg, opt.threads);
        fuse_loop_cfg_set_idle_threads(cfg, opt.threads);  // keep workers (and their buffers)
        int r = fuse_session_loop_mt(se, cfg);
        fuse_loop_cfg_destroy(cfg);
        // libfuse's signal handler leaves the signal number as the loop's result: a stop asked
        // for with SIGTERM/SIGINT/SIGHUP is a clean exit.
        const bool clean = r == 0 || r == SIGTERM || r == SIGINT || r == SIGHUP;
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

}  // namespace

int main(int argc, char** argv) {
  MountOptions opt;
  std::vector<std::string> o_lists;
  std::string log_level = "info";

  CLI::App app{"iofilterfs - mount a datastore of disk images through I/O filter chains", "iofilterfs"};
  app.set_version_flag("-V,--version", std::string("iofilterfs ") + kVersion);
  app.add_option("BACKING", opt.backing, "directory of disk images to serve")->required();
  app.add_option("MOUNTPOINT", opt.mountpoint, "empty directory to mount the datastore on")->required();
  app.add_option("-c,--config", opt.config, "datastore policy file (YAML)");
  app.add_flag("-f,--foreground", opt.foreground, "stay in the foreground, log to stderr");
  app.add_option("-o", o_lists, "mount options, comma separated (ro, allow_other, default_permissions, "
                                 "config=FILE, threads=N, log_level=L, nosuid, nodev, noexec, noatime)");
  app.add_option("-t,--threads", opt.threads, "maximum FUSE worker threads")->check(CLI::Range(1, 1024));
  app.add_option("-l,--log-level", log_level, "trace, debug, info, warn, error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  app.add_flag("--fault-injection", opt.fault_injection,
               "allow tests to inject faults per image through user.iofilter.fault");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int r = app.exit(e);
    return r == 0 ? kExitOk : kExitUsage;
  }
  opt.log_level = log_level;
  for (const auto& l : o_lists) {
    std::string err = apply_mount_options(l, &opt);
    if (!err.empty()) {
      std::fprintf(stderr, "iofilterfs: %s\n", err.c_str());
      return kExitUsage;
    }
  }
  auto level = spdlog::level::from_str(opt.log_level);
  if (level == spdlog::level::off && opt.log_level != "off") {
    std::fprintf(stderr, "iofilterfs: unknown log level '%s'\n", opt.log_level.c_str());
    return kExitUsage;
  }
  spdlog::set_level(level);
  spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");

  if (!opt.config.empty()) {
    std::fprintf(stderr, "iofilterfs: %s: policy files are not supported by this build yet\n", opt.config.c_str());
    return kExitUsage;
  }
  std::string err = check_paths(&opt);
  if (!err.empty()) {
    std::fprintf(stderr, "iofilterfs: %s\n", err.c_str());
    return kExitUsage;
  }
  ::umask(0);  // modes arrive already masked by the caller's umask
  return run(opt);
}
