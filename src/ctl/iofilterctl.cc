// iofilterctl: the operator's front end to a mounted datastore.
//
// A thin layer over the control attributes (user.iofilter.*) of iofilterfs(8): every command is
// a getxattr or setxattr on a path in the mount, so anything it does can be done with
// getfattr/setfattr too. No socket, no second channel. The exceptions work offline on image
// files, not through a mount: `encrypt` and `key` (luks_cmds.h).
//
// Exit codes: 0 done; 1 the operation failed; 2 usage; 3 not an iofilterfs mount or image;
// 4 permission denied.
#include <CLI/CLI.hpp>
#include <poll.h>
#include <sys/xattr.h>
#include <termios.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <climits>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "luks_cmds.h"
#include "replicate/history.h"
#include "units.h"
#include "version.h"

namespace {

constexpr int kOk = 0, kFailed = 1, kUsage = 2, kNotOurs = 3, kDenied = 4;

int exit_for(int err) {
  switch (err) {
    case 0: return kOk;
    case EPERM:
    case EACCES: return kDenied;
    case ENODATA:
    case ENOTSUP: return kNotOurs;
    default: return kFailed;
  }
}

// The value of a control attribute, or the errno.
int get(const std::string& path, const std::string& name, std::string* out) {
  const std::string full = "user.iofilter." + name;
  for (size_t cap = 4096;; cap *= 4) {
    std::string buf(cap, '\0');
    ssize_t n = ::getxattr(path.c_str(), full.c_str(), buf.data(), buf.size());
    if (n >= 0) {
      buf.resize(static_cast<size_t>(n));
      *out = std::move(buf);
      return 0;
    }
    if (errno != ERANGE || cap > (64u << 20)) return errno;
  }
}

int set(const std::string& path, const std::string& name, const std::string& value) {
  const std::string full = "user.iofilter." + name;
  return ::setxattr(path.c_str(), full.c_str(), value.data(), value.size(), 0) == 0 ? 0 : errno;
}

int report(const std::string& path, const std::string& what, int err) {
  if (err == ENODATA || err == ENOTSUP)
    std::fprintf(stderr, "iofilterctl: %s: not an iofilterfs %s\n", path.c_str(), what.c_str());
  else if (err)
    std::fprintf(stderr, "iofilterctl: %s: %s\n", path.c_str(), std::strerror(err));
  return exit_for(err);
}

// Every mounted iofilterfs datastore.
std::vector<std::string> our_mounts() {
  std::vector<std::string> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    size_t dash = line.find(" - ");
    if (dash == std::string::npos) continue;
    std::istringstream left(line.substr(0, dash)), right(line.substr(dash + 3));
    std::string a, b, c, d, mnt, fstype;
    left >> a >> b >> c >> d >> mnt;
    right >> fstype;
    if (fstype == "fuse.iofilterfs") out.push_back(mnt);
  }
  return out;
}

// The iofilterfs mount holding `path`, and the path's place in it.
bool locate(const std::string& path, std::string* mount, std::string* rel) {
  char buf[PATH_MAX];
  if (!::realpath(path.c_str(), buf)) return false;
  const std::string full = buf;
  size_t best = 0;
  for (const auto& m : our_mounts())
    if (full.size() > m.size() && full.compare(0, m.size(), m) == 0 && full[m.size()] == '/' && m.size() > best) {
      best = m.size();
      *mount = m;
      *rel = full.substr(m.size() + 1);
    }
  return best > 0;
}

std::string str(const YAML::Node& n, const char* key) {
  return n[key] && n[key].IsScalar() ? n[key].Scalar() : std::string("-");
}
double num(const YAML::Node& n, const char* key) {
  try {
    return n[key] ? n[key].as<double>() : 0.0;
  } catch (const YAML::Exception&) {
    return 0.0;
  }
}

void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> w;
  for (const auto& r : rows)
    for (size_t i = 0; i < r.size(); ++i) {
      if (w.size() <= i) w.push_back(0);
      w[i] = std::max(w[i], r[i].size());
    }
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(w[i] - r[i].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

std::string human_size(double bytes) { return iofilterfs::format_size(static_cast<uint64_t>(bytes)); }

int status_of_mount(const std::string& mnt, bool json) {
  std::string s;
  if (int e = get(mnt, "status", &s)) return report(mnt, "mount", e);
  if (json) {
    std::printf("%s\n", s.c_str());
    return kOk;
  }
  YAML::Node st = YAML::Load(s);
  std::printf("%s  (backing %s, config %s, reloads %s%s)\n", mnt.c_str(), str(st, "backing").c_str(),
              str(st, "config").empty() ? "none" : str(st, "config").c_str(), str(st, "reloads").c_str(),
              st["config_error"] && !st["config_error"].IsNull() ? ", LAST RELOAD REFUSED" : "");
  if (st["config_error"] && !st["config_error"].IsNull())
    std::printf("  reload error: %s\n", st["config_error"].Scalar().c_str());
  std::vector<std::vector<std::string>> rows = {{"DISK", "POLICY", "STATE", "FORMAT", "SIZE", "DIRTY"}};
  for (const auto& d : st["disks"])
    rows.push_back({str(d, "path"), str(d, "policy"), str(d, "state"), str(d, "format"),
                    human_size(num(d, "virtual_size")), human_size(num(d, "dirty_bytes"))});
  if (rows.size() == 1) std::printf("  no open disks\n");
  else print_table(rows);
  return kOk;
}

int status_of_image(const std::string& path, bool json) {
  std::string state, policy, chain, dirty;
  if (int e = get(path, "state", &state)) return report(path, "image", e);
  get(path, "policy", &policy);
  get(path, "chain", &chain);
  get(path, "dirty", &dirty);
  if (json) {
    YAML::Node d = YAML::Load(dirty);
    std::printf("{\"path\":\"%s\",\"state\":\"%s\",\"policy\":\"%s\",\"chain\":\"%s\",\"dirty\":%s}\n", path.c_str(),
                state.c_str(), policy.c_str(), chain.c_str(), dirty.c_str());
    return kOk;
  }
  YAML::Node d = YAML::Load(dirty);
  print_table({{"path", path}, {"state", state}, {"policy", policy}, {"chain", chain},
               {"dirty", human_size(num(d, "backing_bytes")) + " (replica lacks " + human_size(num(d, "replica_bytes")) + ")"}});
  return kOk;
}

int cmd_status(const std::vector<std::string>& paths, bool json) {
  std::vector<std::string> targets = paths;
  if (targets.empty()) targets = our_mounts();
  if (targets.empty()) {
    std::fprintf(stderr, "iofilterctl: no iofilterfs datastore is mounted\n");
    return kNotOurs;
  }
  int rc = kOk;
  for (const auto& p : targets) {
    std::string probe;
    int r = get(p, "status", &probe) == 0 ? status_of_mount(p, json) : status_of_image(p, json);
    if (r != kOk) rc = r;
  }
  return rc;
}

// Flattens a JSON object into "a.b.c  value" lines.
void flatten(const YAML::Node& n, const std::string& prefix, std::vector<std::vector<std::string>>* rows) {
  if (n.IsMap()) {
    for (const auto& kv : n) flatten(kv.second, prefix.empty() ? kv.first.Scalar() : prefix + "." + kv.first.Scalar(), rows);
  } else if (n.IsScalar()) {
    rows->push_back({prefix, n.Scalar()});
  } else if (n.IsNull()) {
    rows->push_back({prefix, "-"});
  }
}

int cmd_stats(const std::string& disk, bool json) {
  std::string s;
  if (int e = get(disk, "stats", &s)) return report(disk, "image", e);
  if (json) {
    std::printf("%s\n", s.c_str());
    return kOk;
  }
  std::vector<std::vector<std::string>> rows;
  flatten(YAML::Load(s), "", &rows);
  print_table(rows);
  return kOk;
}

// ---- restore and points: the replicate filter's history (retention), read from its files ----

// The history files of DISK: named by the open disk's stats, or, with --journal DIR (the
// policy's journal directory, for an image that is not open), DIR/NAME.* as the filter names
// them. Returns 0 or the errno / exit code reason in *why.
int history_files(const std::string& disk, const std::string& journal_dir, iofilterfs::replicate::HistoryFiles* f,
                  std::string* why) {
  if (!journal_dir.empty()) {
    std::string mnt, rel = disk;
    if (!locate(disk, &mnt, &rel)) rel = disk;
    while (!rel.empty() && rel.front() == '/') rel.erase(0, 1);
    std::string name;
    for (char c : rel) name += c == '%' ? std::string("%25") : c == '/' ? std::string("%2F") : std::string(1, c);
    const std::string base = journal_dir + "/" + name;
    *f = {base + ".journal", base + ".cdp-base", base + ".cdp-meta"};
    return 0;
  }
  std::string s;
  if (int e = get(disk, "stats", &s)) return e;
  YAML::Node n = YAML::Load(s);
  YAML::Node h = n["filters"]["replicate"]["history"];
  if (!h || !h.IsMap()) {
    *why = n["open"] && !n["open"].as<bool>() ? "the image is not open (give --journal DIR)"
                                              : "no replicate filter with retention on this image";
    return EINVAL;
  }
  *f = {h["journal"].as<std::string>(), h["base"].as<std::string>(), h["meta"].as<std::string>()};
  return 0;
}

// "2026-12-01T19:40:00Z", "2026-12-01T19:40:00.250", "@1764618000.5", "now", "-30s" (ago).
bool parse_time(const std::string& t, uint64_t* ns, std::string* err) {
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  const uint64_t now_ns = uint64_t(now.tv_sec) * 1000000000ull + uint64_t(now.tv_nsec);
  if (t == "now") {
    *ns = now_ns;
    return true;
  }
  if (!t.empty() && t[0] == '-') {
    uint64_t us = 0;
    *err = iofilterfs::parse_duration(t.substr(1), &us);
    if (!err->empty()) return false;
    *ns = now_ns - std::min(now_ns, us * 1000);
    return true;
  }
  if (!t.empty() && t[0] == '@') {
    char* end = nullptr;
    double secs = std::strtod(t.c_str() + 1, &end);
    if (*end || secs < 0) {
      *err = "not a number of seconds since the epoch";
      return false;
    }
    *ns = static_cast<uint64_t>(secs * 1e9);
    return true;
  }
  struct tm tm {};
  const char* rest = strptime(t.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (!rest) rest = strptime(t.c_str(), "%Y-%m-%d %H:%M:%S", &tm);
  if (!rest) {
    *err = "not a time (2026-12-01T19:40:00Z, @EPOCH, now, or -DURATION ago)";
    return false;
  }
  uint64_t frac = 0;
  if (*rest == '.') {
    uint64_t scale = 100000000;
    for (++rest; *rest >= '0' && *rest <= '9'; ++rest, scale /= 10) frac += uint64_t(*rest - '0') * scale;
  }
  if (*rest == 'Z') ++rest;
  if (*rest) {
    *err = "unexpected text after the time (times are UTC)";
    return false;
  }
  *ns = uint64_t(timegm(&tm)) * 1000000000ull + frac;
  return true;
}

std::string format_time(uint64_t ns) {
  time_t secs = static_cast<time_t>(ns / 1000000000ull);
  struct tm tm;
  gmtime_r(&secs, &tm);
  char b[64];
  std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[96];
  std::snprintf(out, sizeof out, "%s.%03lluZ", b, static_cast<unsigned long long>(ns / 1000000ull % 1000));
  return out;
}

int cmd_points(const std::string& disk, const std::string& journal_dir, bool json) {
  iofilterfs::replicate::HistoryFiles f;
  std::string why;
  if (int e = history_files(disk, journal_dir, &f, &why)) {
    if (!why.empty()) {
      std::fprintf(stderr, "iofilterctl: %s: %s\n", disk.c_str(), why.c_str());
      return kFailed;
    }
    return report(disk, "image", e);
  }
  iofilterfs::replicate::HistoryInfo info;
  std::string e = iofilterfs::replicate::list_history(f, &info);
  if (!e.empty()) {
    std::fprintf(stderr, "iofilterctl: %s: %s\n", disk.c_str(), e.c_str());
    return kFailed;
  }
  if (json) {
    std::string s = "{\"window_start_ns\":" + std::to_string(info.window_start_ns) +
                    ",\"last_change_ns\":" + std::to_string(info.last_record_ns) +
                    ",\"records\":" + std::to_string(info.records) + ",\"points\":[";
    for (size_t i = 0; i < info.points.size(); ++i) {
      std::string name;
      for (char c : info.points[i].name) name += c == '"' || c == '\\' ? std::string("\\") + c : std::string(1, c);
      s += (i ? "," : "") + std::string("{\"name\":\"") + name + "\",\"time_ns\":" + std::to_string(info.points[i].time_ns) + "}";
    }
    std::printf("%s]}\n", s.c_str());
    return kOk;
  }
  std::printf("restorable from %s (%llu changes kept%s%s)\n", format_time(info.window_start_ns).c_str(),
              static_cast<unsigned long long>(info.records), info.last_record_ns ? ", the last at " : "",
              info.last_record_ns ? format_time(info.last_record_ns).c_str() : "");
  std::vector<std::vector<std::string>> rows = {{"POINT", "TIME"}};
  for (const auto& p : info.points) rows.push_back({p.name, format_time(p.time_ns)});
  if (rows.size() == 1) std::printf("no named restore points\n");
  else print_table(rows);
  return kOk;
}

int cmd_restore(const std::string& disk, const std::string& journal_dir, const std::string& at, const std::string& point,
                const std::string& output, bool json) {
  if (at.empty() == point.empty()) {
    std::fprintf(stderr, "iofilterctl: restore needs exactly one of --at TIME and --point NAME\n");
    return kUsage;
  }
  uint64_t at_ns = 0;
  std::string err;
  if (!at.empty() && !parse_time(at, &at_ns, &err)) {
    std::fprintf(stderr, "iofilterctl: --at '%s': %s\n", at.c_str(), err.c_str());
    return kUsage;
  }
  iofilterfs::replicate::HistoryFiles f;
  std::string why;
  if (int e = history_files(disk, journal_dir, &f, &why)) {
    if (!why.empty()) {
      std::fprintf(stderr, "iofilterctl: %s: %s\n", disk.c_str(), why.c_str());
      return kFailed;
    }
    return report(disk, "image", e);
  }
  uint64_t applied = 0;
  std::string e = iofilterfs::replicate::restore_history(f, at_ns, point, output, &applied);
  if (!e.empty()) {
    std::fprintf(stderr, "iofilterctl: %s: %s\n", disk.c_str(), e.c_str());
    return kFailed;
  }
  if (json)
    std::printf("{\"output\":\"%s\",\"applied_changes\":%llu}\n", output.c_str(), static_cast<unsigned long long>(applied));
  else
    std::printf("%s: restored to %s (%s, %llu changes applied to the base)\n", disk.c_str(), output.c_str(),
                point.empty() ? format_time(at_ns).c_str() : ("point " + point).c_str(),
                static_cast<unsigned long long>(applied));
  return kOk;
}

int cmd_filters(const std::string& mnt, bool json) {
  std::string s;
  if (int e = get(mnt, "filters", &s)) return report(mnt, "mount", e);
  if (json) {
    std::printf("%s\n", s.c_str());
    return kOk;
  }
  std::vector<std::vector<std::string>> rows = {{"NAME", "CLASS", "VERSION", "DESCRIPTION"}};
  for (const auto& f : YAML::Load(s)) rows.push_back({str(f, "name"), str(f, "class"), str(f, "version"), str(f, "description")});
  if (rows.size() == 1) std::printf("no filters installed\n");
  else print_table(rows);
  return kOk;
}

int cmd_verb(const std::string& path, const std::string& verb, const std::string& value, const char* done) {
  if (int e = set(path, verb, value)) return report(path, "image", e);
  if (done) std::printf("%s: %s\n", path.c_str(), done);
  return kOk;
}

int cmd_policy(const std::string& disk, const std::string& name, bool clear, bool json) {
  if (clear) {
    if (::removexattr(disk.c_str(), "user.iofilter.policy") != 0) return report(disk, "image", errno);
  } else if (!name.empty()) {
    if (int e = set(disk, "policy", name)) return report(disk, "image", e);
  }
  std::string p;
  if (int e = get(disk, "policy", &p)) return report(disk, "image", e);
  if (json) std::printf("{\"path\":\"%s\",\"policy\":\"%s\"}\n", disk.c_str(), p.c_str());
  else std::printf("%s\n", p.c_str());
  return kOk;
}

// One sample of every open disk's counters.
struct Sample {
  std::chrono::steady_clock::time_point at;
  std::map<std::string, YAML::Node> stats;  // by disk path
  std::map<std::string, YAML::Node> status;
};

Sample sample(const std::string& mnt) {
  Sample s;
  s.at = std::chrono::steady_clock::now();
  std::string st;
  if (get(mnt, "status", &st)) return s;
  for (const auto& d : YAML::Load(st)["disks"]) {
    std::string path = str(d, "path"), js;
    if (get(mnt + "/" + path, "stats", &js) == 0) {
      s.stats[path] = YAML::Load(js);
      s.status[path] = static_cast<const YAML::Node&>(d);
    }
  }
  return s;
}

std::string filter_value(const YAML::Node& stats, const char* filter, const char* key) {
  YAML::Node f = stats["filters"];
  if (!f || !f[filter] || !f[filter][key]) return "-";
  return f[filter][key].Scalar();
}

int cmd_top(const std::string& mnt, double interval, int iterations) {
  std::string probe;
  if (int e = get(mnt, "status", &probe)) return report(mnt, "mount", e);
  const bool tty = ::isatty(STDIN_FILENO);
  termios saved{};
  if (tty) {
    tcgetattr(STDIN_FILENO, &saved);
    termios raw = saved;
    raw.c_lflag &= static_cast<tcflag_t>(~(ICANON | ECHO));
    tcsetattr(STDIN_FILENO, TCSANOW, &raw);
  }
  Sample prev = sample(mnt);
  for (int i = 0; iterations <= 0 || i < iterations; ++i) {
    // Wait one interval, or quit on 'q'.
    pollfd p{STDIN_FILENO, POLLIN, 0};
    if (tty && ::poll(&p, 1, static_cast<int>(interval * 1000)) > 0) {
      char c = 0;
      if (::read(STDIN_FILENO, &c, 1) == 1 && (c == 'q' || c == 'Q')) break;
    } else if (!tty) {
      std::this_thread::sleep_for(std::chrono::duration<double>(interval));
    }
    Sample cur = sample(mnt);
    double dt = std::chrono::duration<double>(cur.at - prev.at).count();
    std::printf("\033[H\033[2J");
    std::printf("iofilterctl top  %s  every %.1fs  (q quits)\n\n", mnt.c_str(), interval);
    std::vector<std::vector<std::string>> rows = {{"DISK", "POLICY", "STATE", "R/s", "W/s", "RMB/s", "WMB/s", "RLAT99",
                                                   "WLAT99", "CACHE-HIT", "DIRTY", "REPL-LAG", "THR-WAIT"}};
    char b[64];
    auto fmt = [&](double v, const char* f) {
      std::snprintf(b, sizeof b, f, v);
      return std::string(b);
    };
    for (const auto& [path, st] : cur.stats) {
      const YAML::Node& old = prev.stats.count(path) ? prev.stats.at(path) : YAML::Node();
      auto rate = [&](const char* key) { return dt > 0 ? (num(st, key) - (old ? num(old, key) : 0)) / dt : 0.0; };
      const YAML::Node& status = cur.status.at(path);
      std::string hit = "-";
      std::string hits = filter_value(st, "cache", "hits"), misses = filter_value(st, "cache", "misses");
      if (hits != "-" && misses != "-") {
        double h = std::stod(hits), m = std::stod(misses);
        hit = h + m > 0 ? fmt(100 * h / (h + m), "%.0f%%") : "-";
      }
      rows.push_back({path, str(status, "policy"), str(status, "state"), fmt(rate("reads"), "%.0f"),
                      fmt(rate("writes"), "%.0f"), fmt(rate("read_bytes") / 1e6, "%.1f"),
                      fmt(rate("write_bytes") / 1e6, "%.1f"), fmt(num(st["read_latency"], "p99_us"), "%.0fus"),
                      fmt(num(st["write_latency"], "p99_us"), "%.0fus"), hit, human_size(num(status, "dirty_bytes")),
                      filter_value(st, "replicate", "lag_bytes"), filter_value(st, "throttle", "wait_us")});
    }
    if (rows.size() == 1) std::printf("no open disks\n");
    else print_table(rows);
    std::fflush(stdout);
    prev = std::move(cur);
  }
  if (tty) tcsetattr(STDIN_FILENO, TCSANOW, &saved);
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"iofilterctl - control a mounted iofilterfs datastore (a front end to its user.iofilter.* attributes)",
               "iofilterctl"};
  app.set_version_flag("-V,--version", std::string("iofilterctl ") + iofilterfs::kVersion);
  app.require_subcommand(1);
  bool json = false;
  app.add_flag("--json", json, "print JSON for scripts instead of tables");

  std::vector<std::string> status_paths;
  auto* status = app.add_subcommand("status", "every open disk of a mount, or one image (no PATH: every mount)");
  status->add_option("PATH", status_paths, "a mountpoint or an image");

  std::string disk, mnt, name;
  auto* stats = app.add_subcommand("stats", "the counters of one disk");
  stats->add_option("DISK", disk, "an image in the mount")->required();

  double interval = 1.0;
  int iterations = 0;
  auto* top = app.add_subcommand("top", "a live table of every open disk, refreshed every second");
  top->add_option("MOUNT", mnt, "the mountpoint")->required();
  top->add_option("-i,--interval", interval, "seconds between refreshes")->check(CLI::Range(0.1, 3600.0));
  top->add_option("-n,--iterations", iterations, "stop after this many refreshes (default: until q)");

  auto* flush = app.add_subcommand("flush", "drain every filter of a disk to its backing file");
  flush->add_option("DISK", disk, "an image in the mount")->required();
  int timeout = 60;
  auto* quiesce = app.add_subcommand("quiesce", "flush, then hold new writes until resume or the timeout");
  quiesce->add_option("DISK", disk, "an image in the mount")->required();
  quiesce->add_option("-t,--timeout", timeout, "seconds before writes resume by themselves (default 60)")
      ->check(CLI::Range(1, 86400));
  auto* resume = app.add_subcommand("resume", "release the writes a quiesce holds");
  resume->add_option("DISK", disk, "an image in the mount")->required();
  auto* snapshot = app.add_subcommand("snapshot", "a named restore point in every filter that keeps history");
  snapshot->add_option("DISK", disk, "an image in the mount")->required();
  snapshot->add_option("NAME", name, "the restore point's name")->required();
  bool clear = false;
  auto* policy = app.add_subcommand("policy", "show a disk's policy, or assign one (root)");
  policy->add_option("DISK", disk, "an image in the mount")->required();
  policy->add_option("NAME", name, "the policy to assign");
  policy->add_flag("--clear", clear, "drop the assignment: the rules apply again");
  auto* filters = app.add_subcommand("filters", "the installed filters: name, class, interface version");
  filters->add_option("MOUNT", mnt, "the mountpoint")->required();
  bool force = false;
  auto* cache = app.add_subcommand("cache", "the cache filter's operator commands");
  cache->require_subcommand(1);
  auto* cache_discard = cache->add_subcommand(
      "discard", "drop an image's cache file, dirty data included, when it refuses to open (needs --force)");
  cache_discard->add_option("DISK", disk, "an image in the mount (not open)")->required();
  cache_discard->add_flag("--force", force, "accept that the dirty data the cache file holds is lost");
  auto* reload = app.add_subcommand("reload", "re-read the datastore's policy file");
  reload->add_option("MOUNT", mnt, "the mountpoint")->required();
  std::string at, output, journal_dir;
  auto* restore = app.add_subcommand("restore", "rebuild a disk as it was at a moment or restore point (replicate retention)");
  restore->add_option("DISK", disk, "an image in the mount (or its path in the datastore, with --journal)")->required();
  restore->add_option("--at", at, "the moment: 2026-12-01T19:40:00Z (UTC), @EPOCH, now, or -30s (ago; write --at=-30s)");
  restore->add_option("--point", name, "a restore point made by the snapshot verb");
  restore->add_option("-o,--output", output, "the file to write the disk into (created or truncated)")->required();
  restore->add_option("--journal", journal_dir, "the policy's journal directory, to restore an image that is not open");
  auto* points = app.add_subcommand("points", "the restore points and the window of a disk's history (replicate retention)");
  points->add_option("DISK", disk, "an image in the mount (or its path in the datastore, with --journal)")->required();
  points->add_option("--journal", journal_dir, "the policy's journal directory, for an image that is not open");

  iofilterctl::EncryptOptions eo;
  std::string src, dst, iter_time = "2s", key_file, new_key_file;
  int slot = -1;
  auto* encrypt = app.add_subcommand("encrypt", "convert a plaintext image into a new LUKS1 container (offline)");
  encrypt->add_option("SRC", src, "the plaintext image (not open in a daemon)")->required();
  encrypt->add_option("DST", dst, "the container to create (must not exist)")->required();
  encrypt->add_option("--key-file", eo.key_file, "the passphrase of keyslot 0 (a file, or - for stdin)")->required();
  encrypt->add_option("--iter-time", iter_time, "PBKDF2 time for the keyslot (default 2s)");
  encrypt->add_option("--key-size", eo.key_bits, "XTS key bits: 256 or 512 (default)")->check(CLI::IsMember({256, 512}));
  encrypt->add_option("--hash", eo.hash, "sha1, sha256 (default) or sha512")
      ->check(CLI::IsMember({"sha1", "sha256", "sha512"}));
  encrypt->add_flag("--sparse", eo.sparse, "leave all-zero MiBs as holes (they read as zeros through iofilterfs only)");
  encrypt->add_flag("--progress", eo.progress, "print the percentage done on stderr");

  auto* key = app.add_subcommand("key", "an encrypted image's passphrases (offline, on the backing file)");
  key->require_subcommand(1);
  auto* key_list = key->add_subcommand("list", "the LUKS header and its keyslots");
  key_list->add_option("IMAGE", disk, "the backing file (a LUKS1 container)")->required();
  auto* key_add = key->add_subcommand("add", "a new passphrase in a free keyslot");
  key_add->add_option("IMAGE", disk, "the backing file (a LUKS1 container), not open in a daemon")->required();
  key_add->add_option("--key-file", key_file, "an existing passphrase (a file, or - for stdin)")->required();
  key_add->add_option("--new-key-file", new_key_file, "the passphrase to add (a file)")->required();
  key_add->add_option("--slot", slot, "the keyslot to use (default: the first free)")->check(CLI::Range(0, 7));
  key_add->add_option("--iter-time", iter_time, "PBKDF2 time for the new keyslot (default 2s)");
  auto* key_remove = key->add_subcommand("remove", "disable a keyslot (never the last)");
  key_remove->add_option("IMAGE", disk, "the backing file (a LUKS1 container), not open in a daemon")->required();
  key_remove->add_option("--key-file", key_file,
                         "without --slot: the passphrase to remove; with it: any passphrase of the image")
      ->required();
  key_remove->add_option("--slot", slot, "the keyslot to remove")->check(CLI::Range(0, 7));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int r = app.exit(e);
    return r == 0 ? kOk : kUsage;
  }
  try {
    if (*status) return cmd_status(status_paths, json);
    if (*stats) return cmd_stats(disk, json);
    if (*top) return cmd_top(mnt, interval, iterations);
    if (*flush) return cmd_verb(disk, "flush", "1", json ? nullptr : "flushed");
    if (*quiesce) return cmd_verb(disk, "quiesce", std::to_string(timeout), json ? nullptr : "quiesced");
    if (*resume) {
      // Sent to the mount's root: a held write keeps the image's own inode locked.
      std::string root, rel;
      if (!locate(disk, &root, &rel)) return report(disk, "image", ENOTSUP);
      if (int e = set(root, "resume", rel)) return report(disk, "image", e);
      if (!json) std::printf("%s: resumed\n", disk.c_str());
      return kOk;
    }
    if (*snapshot) return cmd_verb(disk, "snapshot", name, json ? nullptr : "snapshot taken");
    if (*encrypt || *key_add) {
      std::string e = iofilterfs::parse_duration(iter_time, &eo.iter_time_us);
      if (e.empty() && (eo.iter_time_us < 1000 || eo.iter_time_us > 600'000'000ull))
        e = "must be between 1ms and 10m";
      if (!e.empty()) {
        std::fprintf(stderr, "iofilterctl: --iter-time %s: %s\n", iter_time.c_str(), e.c_str());
        return kUsage;
      }
    }
    if (*encrypt) return iofilterctl::cmd_encrypt(src, dst, eo);
    if (*key_list) return iofilterctl::cmd_key_list(disk, json);
    if (*key_add) return iofilterctl::cmd_key_add(disk, key_file, new_key_file, slot, eo.iter_time_us, json);
    if (*key_remove) return iofilterctl::cmd_key_remove(disk, key_file, slot, json);
    if (*policy) return cmd_policy(disk, name, clear, json);
    if (*filters) return cmd_filters(mnt, json);
    if (*cache_discard) {
      if (!force) {
        std::fprintf(stderr, "iofilterctl: %s: discarding the cache loses the dirty data it holds; add --force\n",
                     disk.c_str());
        return kUsage;
      }
      return cmd_verb(disk, "discard", "cache", json ? nullptr : "cache discarded (its dirty data is lost)");
    }
    if (*restore) return cmd_restore(disk, journal_dir, at, name, output, json);
    if (*points) return cmd_points(disk, journal_dir, json);
    if (*reload) {
      int e = set(mnt, "reload", "1");
      if (e == EINVAL) {
        std::string st;
        get(mnt, "status", &st);
        YAML::Node n = YAML::Load(st);
        std::fprintf(stderr, "iofilterctl: %s: reload refused: %s\n", mnt.c_str(),
                     n["config_error"] && !n["config_error"].IsNull() ? n["config_error"].Scalar().c_str()
                                                                      : "no policy file");
        return kFailed;
      }
      if (e) return report(mnt, "mount", e);
      if (!json) std::printf("%s: reloaded\n", mnt.c_str());
      return kOk;
    }
  } catch (const YAML::Exception& e) {
    std::fprintf(stderr, "iofilterctl: unexpected reply from the daemon: %s\n", e.what());
    return kFailed;
  }
  return kUsage;
}
