// The throttle filter through a real mount, measured with fio (libaio, direct=1): the accuracy
// figures of issue 6 — a 500 IOPS limit and a 20 MiB/s limit within 5%, a burst at iops-max for
// about iops-max-length, a group of two disks shared half and half, shares 2:1 and a reservation
// honoured while the backing store is congested (the fault layer adds 40 ms below every
// filter), an unthrottled neighbour unaffected — and limits changed by a reload while requests
// wait, without losing them and without spinning. Deferral (filter.h, "Deferring"): a disk at
// queue depth 128 throttled to 100 IOPS holds more requests than the daemon has worker
// threads, and its neighbour keeps its throughput (this failed before deferral: the held
// requests took every worker); reloads while writes are deferred lose none; a stop with
// requests deferred answers them; under a cache, its writes that go below (of one block or of
// several: two disks of 256 KiB writes at depth 128), the reads it forwards untouched and
// the reads that fill it (whose pages then read back equal to the image) are deferred, and
// so are reads under replicate; waits in a group hold no thread either; a re-plumb under congestion wakes the
// workers blocked in the datastore's queue (under replicate, which does not let the throttle
// defer) instead of waiting for their turns. The tests whose
// point is a figure (rates, shares, a neighbour's throughput) are left out of the ASan run
// by name (scripts/test.sh): keep "unthrottled neighbour" in the names of new ones.
//
// Every figure is printed (the machine is small and noisy; the figures are what a report
// quotes). Runs are as short as still measures honestly: 20 s for the 500 IOPS limit (the
// issue's figure), 10 s elsewhere, after a ramp where a control loop has to settle first.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "mount.h"

using testing::get_xattr;
using testing::Mount;
using testing::q;
using testing::read_file;
using testing::set_xattr;
using testing::sh;
using testing::TempDir;
using testing::write_file;

namespace {

// One fio job's result, reads and writes together: fio's own rates, and the requests and bytes
// completed in the measured window. fio's rates divide by a runtime that includes draining the
// queue at the end, which behind a throttle takes depth/limit seconds (160 ms for 32 requests
// at 200 IOPS): rate() divides by the window itself.
struct Job {
  std::string name;
  double iops = 0, bw = 0;
  uint64_t ios = 0, bytes = 0;
  double rate(double seconds) const { return static_cast<double>(ios) / seconds; }
  double byte_rate(double seconds) const { return static_cast<double>(bytes) / seconds; }
};

// Runs fio in `dir` with `args` (global options first, then --name=... per job) and returns
// every job's result, in order. Fails the test with fio's output if it fails.
std::vector<Job> fio(const std::string& dir, const std::string& args) {
  std::string out;
  const int rc = sh("cd " + q(dir) + " && fio --output-format=json --output=fio.json " + args, &out);
  const std::string json = read_file(dir + "/fio.json");
  INFO("fio " << args << "\n" << out << json.substr(0, 4000));
  REQUIRE(rc == 0);
  YAML::Node root = YAML::Load(json.substr(json.find('{')));  // JSON is YAML
  std::vector<Job> jobs;
  for (const auto& j : root["jobs"]) {
    Job r;
    r.name = j["jobname"].as<std::string>();
    for (const char* dir : {"read", "write"}) {
      r.iops += j[dir]["iops"].as<double>();
      r.bw += j[dir]["bw_bytes"].as<double>();
      r.ios += j[dir]["total_ios"].as<uint64_t>();
      r.bytes += j[dir]["io_bytes"].as<uint64_t>();
    }
    jobs.push_back(r);
  }
  return jobs;
}

// The common fio options: 4k random reads, libaio, O_DIRECT, time based.
std::string fio_opts(int seconds, int depth, const std::string& extra = "") {
  return "--ioengine=libaio --direct=1 --rw=randread --bs=4k --time_based --runtime=" + std::to_string(seconds) +
         " --iodepth=" + std::to_string(depth) + " --randrepeat=0 --norandommap " + extra;
}

// A datastore of `images` (64 MiB raw files) and a policy file with `policies` and `rules`.
void datastore(const TempDir& t, const std::vector<std::string>& images, const std::string& yaml) {
  std::string cmd = "mkdir -p " + q(t / "b") + " " + q(t / "m");
  for (const auto& i : images) cmd += " && truncate -s 64M " + q(t / ("b/" + i));
  REQUIRE(sh(cmd) == 0);
  write_file(t / "ds.yaml", yaml);
}

// A number from a flat JSON object, e.g. the throttle's stats.
double json_number(const std::string& json, const std::string& key) {
  size_t p = json.find("\"" + key + "\":");
  if (p == std::string::npos) return -1;
  return std::atof(json.c_str() + p + key.size() + 3);
}

// CPU seconds (user + system) the process has used.
double cpu_seconds(pid_t pid) {
  std::string stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  std::istringstream in(stat.substr(stat.rfind(')') + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && in >> field; ++i)
    if (i == 14 || i == 15) ticks += std::stod(field);
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

}  // namespace

TEST_CASE("a 500 IOPS limit holds within 5% over 20 s", "[throttle][fio]") {
  TempDir t;
  datastore(t, {"disk.raw"}, "policies:\n  p: { throttle: { iops: 500 } }\nrules:\n  - { match: '*', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  auto jobs = fio(t.path(), fio_opts(20, 16) + " --name=limited --filename=" + q(m.path("disk.raw")));
  const double iops = jobs[0].rate(20);
  std::printf("throttle: iops 500 over 20 s: measured %.1f IOPS (%+.2f%%; fio's own figure %.1f)\n", iops,
              100 * (iops - 500) / 500, jobs[0].iops);
  CHECK(iops >= 475);
  CHECK(iops <= 525);
  CHECK(m.stop() == 0);
}

TEST_CASE("a 20 MiB/s limit holds within 5%", "[throttle][fio]") {
  TempDir t;
  datastore(t, {"disk.raw"},
            "policies:\n  p: { throttle: { bps: 20MiB/s } }\nrules:\n  - { match: '*', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  auto jobs = fio(t.path(), "--ioengine=libaio --direct=1 --rw=randrw --bs=128k --time_based --runtime=10 --iodepth=8"
                            " --randrepeat=0 --norandommap --name=limited --filename=" +
                                q(m.path("disk.raw")));
  const double mib = jobs[0].byte_rate(10) / (1 << 20);
  std::printf("throttle: bps 20MiB/s over 10 s (128k reads and writes): measured %.2f MiB/s (%+.2f%%; fio's own "
              "figure %.2f)\n",
              mib, 100 * (mib - 20) / 20, jobs[0].bw / (1 << 20));
  CHECK(mib >= 19);
  CHECK(mib <= 21);
  CHECK(m.stop() == 0);
}

TEST_CASE("a burst runs near iops-max for about iops-max-length after idle, then at the limit", "[throttle][fio]") {
  TempDir t;
  datastore(t, {"disk.raw"},
            "policies:\n  p: { throttle: { iops: 500, iops-max: 2000, iops-max-length: 2s } }\n"
            "rules:\n  - { match: '*', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  // A fresh disk is an idle one: its buckets are empty. fio logs the IOPS of each second.
  fio(t.path(), fio_opts(5, 32, "--write_iops_log=burst --log_avg_msec=1000") + " --name=burst --filename=" +
                    q(m.path("disk.raw")));
  std::vector<double> per_second;
  std::istringstream log(read_file(t / "burst_iops.1.log"));
  std::string line;
  while (std::getline(log, line))
    if (!line.empty()) per_second.push_back(std::atof(line.c_str() + line.find(',') + 1));
  std::string shown;
  for (double v : per_second) shown += " " + std::to_string(static_cast<int>(v));
  std::printf("throttle: iops 500, iops-max 2000, iops-max-length 2s from idle: IOPS per second:%s\n", shown.c_str());
  REQUIRE(per_second.size() >= 5);
  // The schedule (bucket.h): the burst bucket's 200 at once, 2000/s until 2.53 s, then 500/s.
  const double burst = (per_second[0] + per_second[1]) / 2, after = (per_second[3] + per_second[4]) / 2;
  std::printf("throttle: first 2 s %.0f IOPS (expected ~2100 with the burst bucket's 200), seconds 4-5 %.0f IOPS\n",
              burst, after);
  CHECK(burst >= 1800);
  CHECK(burst <= 2300);
  CHECK(after >= 450);
  CHECK(after <= 550);
  CHECK(m.stop() == 0);
}

TEST_CASE("a group of two busy disks shares one 1000 IOPS budget half and half", "[throttle][fio][group]") {
  TempDir t;
  datastore(t, {"a.raw", "b.raw"},
            "policies:\n  g: { throttle: { iops: 1000, group: pair } }\nrules:\n  - { match: '*', policy: g }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  // Different queue depths on purpose: served in arrival order, the deeper disk would take 8/9.
  auto jobs = fio(t.path(), fio_opts(10, 4) + " --name=a --iodepth=32 --filename=" + q(m.path("a.raw")) +
                                " --name=b --iodepth=4 --filename=" + q(m.path("b.raw")));
  REQUIRE(jobs.size() == 2);
  const double a = jobs[0].rate(10), b = jobs[1].rate(10), total = a + b;
  std::printf("throttle: group of 2 at 1000 IOPS (depths 32 and 4): %.1f + %.1f = %.1f IOPS, shares %.1f%% / %.1f%%\n",
              a, b, total, 100 * a / 1000, 100 * b / 1000);
  CHECK(a >= 400);
  CHECK(a <= 600);
  CHECK(b >= 400);
  CHECK(b <= 600);
  CHECK(total >= 950);
  CHECK(total <= 1050);
  CHECK(m.stop() == 0);
}

TEST_CASE("under congestion, shares 2:1 give throughput 2:1 and a reservation of 200 IOPS is met",
          "[throttle][fio][qos]") {
  TempDir t;
  datastore(t, {"hi.raw", "lo.raw", "res.raw", "x.raw", "y.raw"}, R"(
datastore:
  congestion-latency: 30ms
policies:
  hi:  { throttle: { shares: 2000 } }
  lo:  { throttle: { shares: 1000 } }
  res: { throttle: { shares: 100, reservation: 200 } }
rules:
  - { match: "hi.raw", policy: hi }
  - { match: "res.raw", policy: res }
  - { match: "*", policy: lo }
)");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection", "--threads", "160"}});
  // Hold the images open so their disks (and the fault plans) stay; every request gets 40 ms
  // below the filters, above the 30 ms threshold: a congested backing store.
  std::vector<int> fds;
  for (const char* i : {"hi.raw", "lo.raw", "res.raw", "x.raw", "y.raw"}) {
    fds.push_back(open(m.path(i).c_str(), O_RDONLY));
    REQUIRE(fds.back() >= 0);
    REQUIRE(set_xattr(m.path(i), "user.iofilter.fault", "delay=all:40ms") == 0);
  }

  SECTION("shares 2:1") {
    // 3 s of ramp: congestion is detected (0.3 s) and the window settles from the depth in
    // flight towards PARDA's equilibrium before fio starts counting.
    auto jobs = fio(t.path(), fio_opts(10, 32, "--ramp_time=3") + " --name=hi --filename=" + q(m.path("hi.raw")) +
                                  " --name=lo --filename=" + q(m.path("lo.raw")));
    REQUIRE(jobs.size() == 2);
    const std::string stats = get_xattr(m.path("hi.raw"), "user.iofilter.stats");
    const double hi = jobs[0].rate(10), lo = jobs[1].rate(10), ratio = hi / lo;
    std::printf("throttle: congested (40 ms below, threshold 30 ms), shares 2000:1000: %.1f and %.1f IOPS, ratio %.3f "
                "(%+.1f%% off 2:1); window %g, datastore latency %g us\n",
                hi, lo, ratio, 100 * (ratio - 2) / 2, json_number(stats, "window"),
                json_number(stats, "datastore_latency_us"));
    INFO(stats);
    CHECK(stats.find("\"congested\":true") != std::string::npos);
    CHECK(ratio >= 1.8);
    CHECK(ratio <= 2.2);
  }
  SECTION("a reservation of 200 IOPS while two others saturate") {
    // res has shares 100 against 1000 and 1000: by shares alone it would get a twenty-first
    // of the window; its reservation gets it 200.
    auto jobs = fio(t.path(), fio_opts(10, 32, "--ramp_time=3") + " --name=res --iodepth=32 --filename=" +
                                  q(m.path("res.raw")) + " --name=x --filename=" + q(m.path("x.raw")) +
                                  " --name=y --filename=" + q(m.path("y.raw")));
    REQUIRE(jobs.size() == 3);
    const std::string stats = get_xattr(m.path("res.raw"), "user.iofilter.stats");
    const double res = jobs[0].rate(10), x = jobs[1].rate(10), y = jobs[2].rate(10);
    std::printf("throttle: congested, reservation 200 (shares 100) against two disks of shares 1000: %.1f IOPS "
                "(%" PRIu64 " requests in 10 s); the others %.1f and %.1f; window %g\n",
                res, jobs[0].ios, x, y, json_number(stats, "window"));
    INFO(stats);
    CHECK(stats.find("\"congested\":true") != std::string::npos);
    // The scheduler serves a reservation at exactly 200/s (R tags 5 ms apart), so a 10 s window
    // counts 2000 requests, give or take the one cut by the window's edge.
    CHECK(jobs[0].ios >= 1999);
    CHECK(x > 20);
    CHECK(y > 20);
  }
  for (int fd : fds) close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("an unthrottled neighbour keeps its throughput next to a throttled disk", "[throttle][fio]") {
  TempDir t;
  datastore(t, {"slow.raw", "free.raw"},
            "policies:\n  p: { throttle: { iops: 500 } }\nrules:\n  - { match: 'slow.raw', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
  // The neighbour's backing store takes 2 ms a request (the fault layer), so its throughput is
  // set by its queue depth and that latency, not by how much CPU the machine's other tenants
  // leave: what the throttled disk could take from it is a thread, a lock or a queue, which is
  // what this measures. One fio run of the neighbour, its IOPS logged each second; the
  // throttled disk (500 IOPS, 32 requests queued) runs in the middle of it, from 2.5 s to 6.5 s.
  const int fd = open(m.path("free.raw").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  REQUIRE(set_xattr(m.path("free.raw"), "user.iofilter.fault", "delay=all:2ms") == 0);
  std::string out;
  const int rc = sh("cd " + q(t.path()) + " && (sleep 2.5; fio --output-format=json --output=slow.json " +
                        fio_opts(4, 32) + " --name=slow --filename=" + q(m.path("slow.raw")) +
                        " > slow.out 2>&1) & cd " + q(t.path()) + " && fio --output-format=json --output=free.json " +
                        fio_opts(10, 8, "--write_iops_log=free --log_avg_msec=1000") + " --name=free --filename=" +
                        q(m.path("free.raw")) + "; wait",
                    &out);
  INFO(out << read_file(t / "slow.out"));
  REQUIRE(rc == 0);
  std::vector<double> per_second;
  std::istringstream log(read_file(t / "free_iops.1.log"));
  std::string line;
  while (std::getline(log, line))
    if (!line.empty()) per_second.push_back(std::atof(line.c_str() + line.find(',') + 1));
  REQUIRE(per_second.size() >= 9);
  std::string shown;
  for (double v : per_second) shown += " " + std::to_string(static_cast<int>(v));
  // Seconds 3-5 (0-based) had the throttled disk beside; 1 and 7-8 did not (0, 2 and 6 are
  // the start and the switches). fio runs 10 s for these 9: a 9 s run sometimes logged only 8
  // seconds (the last one dropped when the job ends a hair early; seen on main too).
  const double alone = (per_second[1] + per_second[7] + per_second[8]) / 3;
  const double together = (per_second[3] + per_second[4] + per_second[5]) / 3;
  const std::string slow_json = read_file(t / "slow.json");
  const size_t ios = slow_json.find("\"total_ios\" : ");
  std::printf("throttle: neighbour (2 ms below, depth 8) IOPS per second:%s; alone %.0f, next to a disk throttled at 500 "
              "IOPS %.0f: %+.1f%% (the throttled disk did %s requests in 4 s)\n",
              shown.c_str(), alone, together, 100 * (together - alone) / alone,
              ios == std::string::npos ? "?" : slow_json.substr(ios + 14, slow_json.find(',', ios) - ios - 14).c_str());
  CHECK(together >= 0.9 * alone);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("a reload changes the limits while requests wait: none lost, none spinning, none held to the old limit",
          "[throttle][fio][reload]") {
  TempDir t;
  const std::string slow = "policies:\n  p: { throttle: { iops: 5 } }\nrules:\n  - { match: '*', policy: p }\n";
  datastore(t, {"disk.raw"}, slow);
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const int fd = open(m.path("disk.raw").c_str(), O_RDONLY);  // keeps the disk (and its counters)
  REQUIRE(fd >= 0);
  // 32 requests queued against 5 IOPS: at the old limit they would need 6 s more.
  std::string out;
  REQUIRE(sh("cd " + q(t.path()) + " && (fio --output-format=json --output=bg.json --ioengine=libaio --direct=1 "
             "--rw=randread --bs=4k --iodepth=32 --number_ios=200 --randrepeat=0 --norandommap --name=bg --filename=" +
             q(m.path("disk.raw")) + " > bg.out 2>&1 &)") == 0);
  std::string stats;
  for (int i = 0; i < 100; ++i) {
    stats = get_xattr(m.path("disk.raw"), "user.iofilter.stats");
    if (json_number(stats, "queued") >= 20) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  INFO(stats);
  REQUIRE(json_number(stats, "queued") >= 20);
  // Held requests sleep: the daemon's CPU over one second stays near zero.
  const double cpu0 = cpu_seconds(m.pid());
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const double cpu = cpu_seconds(m.pid()) - cpu0;
  std::printf("throttle: %g requests held at 5 IOPS; daemon CPU over 1 s: %.3f s\n", json_number(stats, "queued"), cpu);
  CHECK(cpu < 0.05);
  const double reads_before = json_number(get_xattr(m.path("disk.raw"), "user.iofilter.stats"), "reads");

  std::string fast = slow;
  fast.replace(fast.find("iops: 5 "), 8, "iops: 5000 ");
  write_file(t / "ds.yaml", fast);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(set_xattr(m.mountpoint(), "user.iofilter.reload", "1") == 0);
  // The 200 reads are through soon after (at 5 IOPS they would take 40 s more).
  for (int i = 0; i < 1000; ++i) {
    stats = get_xattr(m.path("disk.raw"), "user.iofilter.stats");
    if (json_number(stats, "reads") >= 200 && json_number(stats, "inflight") == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // fio writes its report as it exits.
  REQUIRE(sh("cd " + q(t.path()) + " && for i in $(seq 100); do grep -q '\"error\"' bg.json 2>/dev/null && exit 0; "
             "sleep 0.05; done; exit 1") == 0);
  std::printf("throttle: reload 5 -> 5000 IOPS with requests waiting: the remaining reads done %.3f s later\n", took);
  INFO(stats << read_file(t / "bg.out"));
  CHECK(took < 0.5);
  CHECK(json_number(stats, "queued") == 0);
  // The same filter instance took the new limits: its counters run on from before the reload.
  CHECK(json_number(stats, "reads") >= 200);
  CHECK(json_number(stats, "reads") > reads_before);
  CHECK(get_xattr(m.path("disk.raw"), "user.iofilter.chain") == "throttle(iops=5000)");
  CHECK(read_file(t / "bg.json").find("\"error\" : 0") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

// ---- deferral: a held request costs no thread ----

namespace {

// Polls the disk's throttle stats until `key` reaches at least `want` (at most ~15 s); returns
// the last stats read.
std::string wait_stat(const Mount& m, const std::string& image, const std::string& key, double want) {
  std::string stats;
  for (int i = 0; i < 300; ++i) {
    stats = get_xattr(m.path(image), "user.iofilter.stats");
    if (json_number(stats, key) >= want) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return stats;
}

// Waits (at most ~60 s) until the background fio that writes `rc_file` when it exits has
// exited; returns its exit status, or -1 if it did not exit.
int wait_fio(const std::string& rc_file) {
  for (int i = 0; i < 1200; ++i) {
    std::string rc = read_file(rc_file);
    if (!rc.empty()) return std::atoi(rc.c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1;
}

// Starts fio in the background in `dir`; its JSON goes to NAME.json, its output to NAME.out,
// its exit status to NAME.rc.
void fio_background(const std::string& dir, const std::string& name, const std::string& args) {
  REQUIRE(sh("cd " + q(dir) + " && rm -f " + name + ".rc && ((fio --output-format=json --output=" + name + ".json " +
             args + " > " + name + ".out 2>&1; echo $? > " + name + ".rc.tmp; mv " + name + ".rc.tmp " + name +
             ".rc) > /dev/null 2>&1 &)") == 0);
}

}  // namespace

TEST_CASE("a throttled disk at queue depth 128 leaves an unthrottled neighbour within 10% of its throughput alone",
          "[throttle][fio][defer]") {
  TempDir t;
  datastore(t, {"slow.raw", "free.raw"},
            "policies:\n  p: { throttle: { iops: 100 } }\nrules:\n  - { match: 'slow.raw', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
  // The neighbour's backing store takes 2 ms a request, so its throughput is its depth over
  // that latency, whatever CPU the machine's other tenants leave (as in the test above).
  const int fd = open(m.path("free.raw").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  REQUIRE(set_xattr(m.path("free.raw"), "user.iofilter.fault", "delay=all:2ms") == 0);
  const std::string free_job = fio_opts(4, 16) + " --name=free --filename=" + q(m.path("free.raw"));
  const double alone = fio(t.path(), free_job)[0].rate(4);

  // 128 requests queued at 100 IOPS: each waits up to 1.3 s, far more of them than the
  // daemon's 64 worker threads.
  fio_background(t.path(), "slow",
                 fio_opts(10, 128) + " --name=slow --filename=" + q(m.path("slow.raw")));
  std::string stats = wait_stat(m, "slow.raw", "queued", 48);
  INFO(stats);
  REQUIRE(json_number(stats, "queued") >= 48);
  const double passed_before = json_number(stats, "reads");
  const double together = fio(t.path(), free_job)[0].rate(4);
  stats = get_xattr(m.path("slow.raw"), "user.iofilter.stats");
  std::printf("throttle: neighbour (2 ms below, depth 16) alone %.0f IOPS, next to a disk at depth 128 throttled to "
              "100 IOPS %.0f IOPS: %+.1f%% (the throttled disk: %g held, %g passed meanwhile)\n",
              alone, together, 100 * (together - alone) / alone, json_number(stats, "queued"),
              json_number(stats, "reads") - passed_before);
  CHECK(together >= 0.9 * alone);
  REQUIRE(wait_fio(t / "slow.rc") == 0);
  INFO(read_file(t / "slow.out"));
  CHECK(read_file(t / "slow.json").find("\"error\" : 0") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("reloads while writes are deferred lose none: new limits in place, then the throttle removed, fio verify",
          "[throttle][fio][defer][reload]") {
  TempDir t;
  const std::string slow = "policies:\n  p: { throttle: { iops: 20 } }\nrules:\n  - { match: '*', policy: p }\n";
  datastore(t, {"disk.raw"}, slow);
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const int fd = open(m.path("disk.raw").c_str(), O_RDONLY);  // keeps the disk (and its counters)
  REQUIRE(fd >= 0);
  // 512 random 4k writes, 128 at a time, each with a checksum fio reads back afterwards.
  fio_background(t.path(), "w",
                 "--ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=128 --size=2M --verify=crc32c "
                 "--verify_fatal=1 --randrepeat=0 --name=w --filename=" +
                     q(m.path("disk.raw")));
  std::string stats = wait_stat(m, "disk.raw", "queued", 100);
  INFO(stats);
  REQUIRE(json_number(stats, "queued") >= 100);
  // New limits, taken in place: the queue stays, rescheduled.
  std::string faster = slow;
  faster.replace(faster.find("iops: 20 "), 9, "iops: 50 ");
  write_file(t / "ds.yaml", faster);
  REQUIRE(set_xattr(m.mountpoint(), "user.iofilter.reload", "1") == 0);
  CHECK(get_xattr(m.path("disk.raw"), "user.iofilter.chain") == "throttle(iops=50)");
  stats = get_xattr(m.path("disk.raw"), "user.iofilter.stats");
  std::printf("throttle: after a reload 20 -> 50 IOPS, %g writes still held\n", json_number(stats, "queued"));
  CHECK(json_number(stats, "queued") >= 50);
  // The throttle removed: what it held goes down at once, through the old chain.
  write_file(t / "ds.yaml", "policies:\n  p:\nrules:\n  - { match: '*', policy: p }\n");
  REQUIRE(set_xattr(m.mountpoint(), "user.iofilter.reload", "1") == 0);
  CHECK(get_xattr(m.path("disk.raw"), "user.iofilter.chain") == "(empty)");
  const int rc = wait_fio(t / "w.rc");
  INFO(read_file(t / "w.out") << read_file(t / "w.json").substr(0, 3000));
  CHECK(rc == 0);
  CHECK(read_file(t / "w.json").find("\"error\" : 0") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("a re-plumb lets the writes queued in a group go below unthrottled at once, none lost, fio verify",
          "[throttle][fio][defer][reload][group]") {
  TempDir t;
  const std::string group = "policies:\n  p: { throttle: { write-iops: 5, group: slow } }\n"
                            "rules:\n  - { match: '*', policy: p }\n";
  datastore(t, {"disk.raw"}, group);
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const int fd = open(m.path("disk.raw").c_str(), O_RDONLY);  // keeps the disk (and its counters)
  REQUIRE(fd >= 0);
  // 128 random 4 KiB writes at once, with checksums: at 5 IOPS the group would take 25 s.
  fio_background(t.path(), "w",
                 "--ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=128 --size=512k --verify=crc32c "
                 "--verify_fatal=1 --name=w --filename=" +
                     q(m.path("disk.raw")));
  std::string stats = wait_stat(m, "disk.raw", "queued", 100);
  INFO(stats);
  REQUIRE(json_number(stats, "queued") >= 100);
  const double before = json_number(stats, "writes"), queued = json_number(stats, "queued");
  // A cache joins the chain (more than limits change): the disk re-plumbs, and what the
  // throttle holds — parked in the group's queue — goes below first, uncharged.
  write_file(t / "ds.yaml", "policies:\n  p: { cache: { mode: write-through, memory: 16MiB }, "
                            "throttle: { write-iops: 5, group: slow } }\nrules:\n  - { match: '*', policy: p }\n");
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(set_xattr(m.mountpoint(), "user.iofilter.reload", "1") == 0);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(get_xattr(m.path("disk.raw"), "user.iofilter.chain").rfind("cache(", 0) == 0);
  stats = get_xattr(m.path("disk.raw"), "user.iofilter.stats");
  std::printf("throttle: a re-plumb with %g writes queued in a 5 IOPS group returned after %.2f s; %g of them went "
              "below meanwhile\n",
              queued, secs, json_number(stats, "writes") - before);
  CHECK(json_number(stats, "writes") - before >= 100);  // released before the swap, not at 5 IOPS
  const int rc = wait_fio(t / "w.rc");
  INFO(read_file(t / "w.out") << read_file(t / "w.json").substr(0, 3000));
  CHECK(rc == 0);
  CHECK(read_file(t / "w.json").find("\"error\" : 0") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("a re-plumb under congestion wakes the writes blocked in the datastore queue, returns at once, none lost, "
          "fio verify",
          "[throttle][fio][reload][qos]") {
  // Under replicate (which works on every write's result, so the throttle below it may not
  // defer one) every write that must wait in the datastore's queue under congestion blocks the
  // thread it is on: one of replicate's own, which carries it (offload.h). A re-plumb must
  // release them unthrottled, as it does the parked ones (the throttle first, then replicate,
  // which waits until every write it carries is done): before, it waited until the datastore's
  // scheduler let them go, a window (4 or 5) per trip below (300 ms).
  TempDir t;
  REQUIRE(sh("mkdir -p " + q(t / "replica") + " " + q(t / "state")) == 0);
  const std::string head = "datastore:\n  congestion-latency: 30ms\npolicies:\n  p: { replicate: { target: " +
                           t / "replica" + ", mode: async, journal: " + t / "state" + " }, ";
  const std::string tail = "throttle: { shares: 1000 } }\nrules:\n  - { match: 'disk.raw', policy: p }\n";
  datastore(t, {"disk.raw"}, head + tail);
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
  const int fd = open(m.path("disk.raw").c_str(), O_RDONLY);  // keeps the disk and the fault plan
  REQUIRE(fd >= 0);
  REQUIRE(set_xattr(m.path("disk.raw"), "user.iofilter.fault", "delay=all:300ms") == 0);  // congested
  // 64 random 4 KiB writes with checksums at depth 16, beside 4 KiB random writes at depth 32
  // elsewhere for 10 s: 48 threads blocked at most, fewer than replicate's 32 and the
  // daemon's 64 together.
  fio_background(t.path(), "w",
                 "--ioengine=libaio --direct=1 --name=w --rw=randwrite --bs=4k --iodepth=16 --size=256k "
                 "--verify=crc32c --verify_fatal=1 --filename=" +
                     q(m.path("disk.raw")) +
                     " --name=r --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=10 --verify=0 "
                     "--offset=1m --size=32m --randrepeat=0 --norandommap --filename=" +
                     q(m.path("disk.raw")));
  std::string stats = wait_stat(m, "disk.raw", "queued", 30);
  INFO(stats);
  REQUIRE(json_number(stats, "queued") >= 30);
  CHECK(stats.find("\"congested\":true") != std::string::npos);
  const double queued = json_number(stats, "queued"), deferred = json_number(stats, "deferred");
  // A cache joins the chain (more than limits change): the disk re-plumbs.
  write_file(t / "ds.yaml", head + "cache: { mode: write-through, memory: 16MiB }, " + tail);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(set_xattr(m.mountpoint(), "user.iofilter.reload", "1") == 0);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string chain = get_xattr(m.path("disk.raw"), "user.iofilter.chain");
  INFO(chain);
  CHECK(chain.find("cache(") != std::string::npos);
  const double carried = json_number(stats, "requests_offloaded");
  std::printf("throttle: a re-plumb under congestion (300 ms below, window %g) with %g requests queued in the "
              "datastore's scheduler (%g deferred, %g writes carried on replicate's threads so far), returned after "
              "%.2f s\n",
              json_number(stats, "window"), queued, deferred, carried, secs);
  CHECK(carried >= 30);  // the writes wait on replicate's threads, blocked in the queue
  // The scheduler alone: 30 and more at a window (4 or 5) per 300 ms, over 2 s. Released:
  // three trips below at most (the throttle's parked writes, then the writes queued for
  // replicate's threads, then the requests inside as the re-plumb locks), about 1.2 s here.
  CHECK(secs < 2.0);
  const int rc = wait_fio(t / "w.rc");
  INFO(read_file(t / "w.out") << read_file(t / "w.json").substr(0, 3000));
  CHECK(rc == 0);
  CHECK(read_file(t / "w.json").find("\"error\" : 0") != std::string::npos);
  // The stop ships what is left (a thousand records and more, each read back from the image):
  // not at 300 ms a read.
  REQUIRE(set_xattr(m.path("disk.raw"), "user.iofilter.fault", "clear") == 0);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("stopping the daemon with requests deferred answers them and exits cleanly", "[throttle][fio][defer]") {
  TempDir t;
  datastore(t, {"disk.raw"}, "policies:\n  p: { throttle: { iops: 5 } }\nrules:\n  - { match: '*', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  // At 5 IOPS, 128 queued reads would need 25 s; fio would go on for a minute.
  fio_background(t.path(), "bg", fio_opts(60, 128) + " --name=bg --filename=" + q(m.path("disk.raw")));
  const std::string stats = wait_stat(m, "disk.raw", "queued", 100);
  INFO(stats);
  REQUIRE(json_number(stats, "queued") >= 100);
  // fio keeps the image open, so only a stop (SIGTERM, as systemd's) ends the mount.
  REQUIRE(kill(m.pid(), SIGTERM) == 0);
  const int rc = m.stop();
  const std::string log = m.log();
  INFO(log.substr(log.size() > 6000 ? log.size() - 6000 : 0));
  CHECK(rc == 0);
  CHECK(log.find("unmounted") != std::string::npos);
  CHECK(log.find("Sanitizer") == std::string::npos);
  // Every request fio had in flight was answered (the held ones, at the close; later ones with
  // an error once the mount is gone), so fio ends rather than hanging.
  CHECK(wait_fio(t / "bg.rc") >= 0);
}

namespace {

// The threads of a process now.
int thread_count(pid_t pid) {
  std::string out;
  sh("ls /proc/" + std::to_string(pid) + "/task | wc -l", &out);
  return std::atoi(out.c_str());
}

}  // namespace

TEST_CASE("under a cache, held writes take no threads: write-through and write-back behind 100 write IOPS at depth "
          "128, an unthrottled neighbour unaffected, every byte verified through the cache and below",
          "[throttle][fio][defer][cache]") {
  // The cache passes a one-block write's deferral down and finishes it in a completion hook
  // (filter.h, "Completion hooks"): the block stays marked in flight until the write lands, so
  // the reads running beside the writes (2 KiB, which the cache fills) never keep old bytes.
  // write-through (in memory): every write goes below, and is cached when it lands.
  // write-back (a cache file) with a 4 KiB sequential cutoff: a 4 KiB write to a block the
  // cache holds is cached dirty, one to a block it does not hold bypasses it below (deferred).
  for (const char* mode : {"write-through", "write-back"}) {
    INFO(mode);
    TempDir t;
    const bool wb = std::string(mode) == "write-back";
    REQUIRE(sh("mkdir -p " + q(t / "c")) == 0);
    datastore(t, {"slow.raw", "free.raw"},
              std::string("policies:\n  p: { cache: { mode: ") + mode +
                  (wb ? ", device: " + t / "c" + ", size: 16MiB, sequential-cutoff: 4KiB" : ", memory: 16MiB") +
                  " }, throttle: { write-iops: 100 } }\nrules:\n  - { match: 'slow.raw', policy: p }\n");
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
    const int fd = open(m.path("free.raw").c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    const int slow_fd = open(m.path("slow.raw").c_str(), O_RDONLY);  // keeps the disk and its cache
    REQUIRE(slow_fd >= 0);
    REQUIRE(set_xattr(m.path("free.raw"), "user.iofilter.fault", "delay=all:2ms") == 0);
    const std::string free_job = fio_opts(4, 16) + " --name=free --filename=" + q(m.path("free.raw"));
    const double alone = fio(t.path(), free_job)[0].rate(4);
    const int threads_before = thread_count(m.pid());

    // 1024 random 4 KiB writes (every block of 4 MiB once), 128 at a time, each with a
    // checksum; 2 KiB random reads of the same 4 MiB beside them, which the cache fills (at a
    // modest rate: the neighbour's figure is about threads, not about this job's CPU).
    const std::string writes =
        "--ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=128 --size=4M --verify=crc32c "
        "--verify_fatal=1 --name=w --filename=";
    fio_background(t.path(), "w",
                   writes + q(m.path("slow.raw")) +
                       " --name=r --rw=randread --bs=2k --iodepth=8 --size=4M --verify=0 --rate_iops=100 --time_based "
                       "--runtime=10 --filename=" +
                       q(m.path("slow.raw")));
    std::string stats = wait_stat(m, "slow.raw", "queued", 100);
    INFO(stats);
    REQUIRE(json_number(stats, "queued") >= 100);
    const int threads_held = thread_count(m.pid());
    const double together = fio(t.path(), free_job)[0].rate(4);
    stats = get_xattr(m.path("slow.raw"), "user.iofilter.stats");
    std::printf("throttle: under a %s cache, %g writes held at 100 write IOPS (%g deferred); daemon threads %d "
                "before, %d while they are held; neighbour (2 ms below, depth 16) alone %.0f IOPS, beside them "
                "%.0f: %+.1f%%\n",
                mode, json_number(stats, "queued"), json_number(stats, "deferred"), threads_before, threads_held,
                alone, together, 100 * (together - alone) / alone);
    CHECK(json_number(stats, "deferred") >= 64);  // more than the daemon's workers
    CHECK(threads_held < threads_before + 32);    // the held writes are not on threads
    CHECK(together >= 0.9 * alone);
    const int rc = wait_fio(t / "w.rc");
    INFO(read_file(t / "w.out") << read_file(t / "w.json").substr(0, 3000));
    REQUIRE(rc == 0);  // fio's verify pass read every block back through the cache
    CHECK(read_file(t / "w.json").find("\"error\" : 0") != std::string::npos);
    // Again, now from the blocks the verify pass cached.
    std::string out;
    CHECK(sh("cd " + q(t.path()) + " && fio --verify_only " + writes + q(m.path("slow.raw")), &out) == 0);
    INFO(out);
    stats = get_xattr(m.path("slow.raw"), "user.iofilter.stats");
    INFO(stats);
    CHECK(json_number(stats, "hits") > 0);
    close(slow_fd);
    close(fd);
    CHECK(m.stop() == 0);
    // And the bytes below: the backing file itself (write-back destaged what it held).
    CHECK(sh("cd " + q(t.path()) + " && fio --verify_only " + writes + q(t / "b/slow.raw"), &out) == 0);
  }
}


TEST_CASE("multi-block writes under a cache: two disks at 20 write IOPS, 256 KiB writes at depth 128 each held "
          "without threads, an unthrottled neighbour unaffected, every byte verified through the cache and below",
          "[throttle][fio][defer][cache]") {
  // A 256 KiB write covers four 64 KiB cache blocks: the cache sends it below as one request
  // with every block marked in flight (cache_filter.h, MultiFlight), so the throttle parks it.
  // Before, its blocks went below one by one on the worker, which the throttle then held: two
  // such disks at depth 128 took all 64 workers and the neighbour waited.
  // write-through (in memory): every write goes below, its blocks cached when it lands.
  // write-back (a cache file) with a 4 KiB sequential cutoff: every 256 KiB write bypasses it.
  for (const char* mode : {"write-through", "write-back"}) {
    INFO(mode);
    TempDir t;
    const bool wb = std::string(mode) == "write-back";
    REQUIRE(sh("mkdir -p " + q(t / "c")) == 0);
    datastore(t, {"a.raw", "b.raw", "free.raw"},
              std::string("policies:\n  p: { cache: { mode: ") + mode +
                  (wb ? ", device: " + t / "c" + ", size: 16MiB, sequential-cutoff: 4KiB" : ", memory: 16MiB") +
                  " }, throttle: { write-iops: 20 } }\nrules:\n  - { match: '[ab].raw', policy: p }\n");
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
    const int fd = open(m.path("free.raw").c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    const int fa = open(m.path("a.raw").c_str(), O_RDONLY);  // keep the disks and their caches
    const int fb = open(m.path("b.raw").c_str(), O_RDONLY);
    REQUIRE(fa >= 0);
    REQUIRE(fb >= 0);
    REQUIRE(set_xattr(m.path("free.raw"), "user.iofilter.fault", "delay=all:2ms") == 0);
    const std::string free_job = fio_opts(4, 16) + " --name=free --filename=" + q(m.path("free.raw"));
    const double alone = fio(t.path(), free_job)[0].rate(4);
    const int threads_before = thread_count(m.pid());

    // 128 random 256 KiB writes per disk (every 256 KiB of 32 MiB once), all at once, each
    // with a checksum: at 20 write IOPS each disk needs 6.4 s.
    const std::string writes = "--ioengine=libaio --direct=1 --rw=randwrite --bs=256k --iodepth=128 --size=32M "
                               "--verify=crc32c --verify_fatal=1 ";
    fio_background(t.path(), "w",
                   writes + "--name=a --filename=" + q(m.path("a.raw")) + " --name=b --filename=" + q(m.path("b.raw")));
    const std::string a = wait_stat(m, "a.raw", "queued", 100);
    const std::string b = wait_stat(m, "b.raw", "queued", 100);
    INFO(a << "\n" << b);
    REQUIRE(json_number(a, "queued") >= 100);
    REQUIRE(json_number(b, "queued") >= 100);
    const double held = json_number(a, "queued") + json_number(b, "queued");
    const double deferred = json_number(a, "deferred") + json_number(b, "deferred");
    const int threads_held = thread_count(m.pid());
    const double together = fio(t.path(), free_job)[0].rate(4);
    const int threads_after = thread_count(m.pid());
    std::printf("throttle: under a %s cache, 256 KiB writes held at 20 write IOPS on two disks: %g queued (%g "
                "deferred); daemon threads %d before, %d while they are held, %d after the neighbour's run; neighbour "
                "(2 ms below, depth 16) alone %.0f IOPS, beside them %.0f: %+.1f%%\n",
                mode, held, deferred, threads_before, threads_held, threads_after, alone, together,
                100 * (together - alone) / alone);
    CHECK(deferred >= 200);  // over three times the daemon's 64 workers
    // The burst of 256 arrivals starts idle FUSE workers (libfuse keeps them), but the held
    // writes are not on threads: far fewer threads than writes held, none more while they wait.
    CHECK(threads_held - threads_before < held / 2);
    CHECK(threads_after <= threads_held + 8);
    CHECK(together >= 0.9 * alone);
    const int rc = wait_fio(t / "w.rc");
    INFO(read_file(t / "w.out") << read_file(t / "w.json").substr(0, 3000));
    REQUIRE(rc == 0);  // fio's verify pass read every block back through the cache
    CHECK(read_file(t / "w.json").find("\"error\" : 0") != std::string::npos);
    // Again through the cache (write-through: now from the blocks it filled); the same jobs in
    // the same order, so that fio expects the same seeds.
    std::string out;
    CHECK(sh("cd " + q(t.path()) + " && fio --verify_only " + writes + "--name=a --filename=" + q(m.path("a.raw")) +
                 " --name=b --filename=" + q(m.path("b.raw")),
             &out) == 0);
    INFO(out);
    if (!wb) CHECK(json_number(get_xattr(m.path("a.raw"), "user.iofilter.stats"), "hits") > 0);
    close(fa);
    close(fb);
    close(fd);
    CHECK(m.stop() == 0);
    // And the bytes below: the backing files themselves.
    CHECK(sh("cd " + q(t.path()) + " && fio --verify_only " + writes + "--name=a --filename=" + q(t / "b/a.raw") +
                 " --name=b --filename=" + q(t / "b/b.raw"),
             &out) == 0);
  }
}

namespace {

// 128 random 4 KiB reads of slow.raw queued behind its 100 IOPS limit (twice the daemon's 64
// workers: had each held a worker, at most 64 could wait and the neighbour would have none
// left), and free.raw (2 ms below, depth 16) measured alone and beside them. Checks that they
// are deferred, hold no threads, and leave the neighbour within 10%; prints the figures under
// `what`. m must have been mounted with --fault-injection; returns slow.raw's stats meanwhile.
std::string held_reads_beside_neighbour(const TempDir& t, const Mount& m, const std::string& what) {
  const int fd = open(m.path("free.raw").c_str(), O_RDONLY);  // the fault layer is the open disk's
  REQUIRE(fd >= 0);
  REQUIRE(set_xattr(m.path("free.raw"), "user.iofilter.fault", "delay=all:2ms") == 0);
  const std::string free_job = fio_opts(4, 16) + " --name=free --filename=" + q(m.path("free.raw"));
  const double alone = fio(t.path(), free_job)[0].rate(4);
  const int threads_before = thread_count(m.pid());
  fio_background(t.path(), "slow", fio_opts(10, 128) + " --name=slow --filename=" + q(m.path("slow.raw")));
  std::string stats = wait_stat(m, "slow.raw", "queued", 100);
  INFO(stats);
  REQUIRE(json_number(stats, "queued") >= 100);
  const int threads_held = thread_count(m.pid());
  const double together = fio(t.path(), free_job)[0].rate(4);
  close(fd);
  stats = get_xattr(m.path("slow.raw"), "user.iofilter.stats");
  std::printf("throttle: %s, %g reads held at 100 IOPS; daemon threads %d before, %d while they are held; neighbour "
              "(2 ms below, depth 16) alone %.0f IOPS, beside them %.0f: %+.1f%%\n",
              what.c_str(), json_number(stats, "queued"), threads_before, threads_held, alone, together,
              100 * (together - alone) / alone);
  CHECK(json_number(stats, "deferred") >= 64);  // the disk's requests deferred now, not yet answered
  CHECK(threads_held < threads_before + 32);   // the held requests are not on threads
  CHECK(together >= 0.9 * alone);
  REQUIRE(wait_fio(t / "slow.rc") == 0);
  INFO(read_file(t / "slow.out"));
  CHECK(read_file(t / "slow.json").find("\"error\" : 0") != std::string::npos);
  return stats;
}

}  // namespace

TEST_CASE("under a cache, the reads it forwards untouched are deferred: 128 held without threads, an unthrottled "
          "neighbour unaffected",
          "[throttle][fio][defer][cache]") {
  TempDir t;
  // sequential-cutoff 4KiB: every read of 4 KiB or more bypasses the cache (a miss it does not
  // fill), which it hands below untouched with its Deferrer.
  datastore(t, {"slow.raw", "free.raw"},
            "policies:\n  p: { cache: { mode: write-around, memory: 16MiB, sequential-cutoff: 4KiB }, "
            "throttle: { iops: 100 } }\nrules:\n  - { match: 'slow.raw', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
  const std::string stats = held_reads_beside_neighbour(t, m, "under a cache (reads bypass it)");
  CHECK(stats.find("\"hits\":0,") != std::string::npos);  // every read went below, none filled
  CHECK(m.stop() == 0);
}

TEST_CASE("under a cache, reads that fill it are deferred too: 128 held without threads, an unthrottled neighbour "
          "unaffected, and what they kept reads back equal to the image",
          "[throttle][fio][defer][cache]") {
  TempDir t;
  // No sequential cutoff: every read miss fills the cache, which is what it now hands below
  // with its Deferrer and finishes in a completion hook.
  datastore(t, {"slow.raw", "free.raw"},
            "policies:\n  p: { cache: { mode: write-through, memory: 16MiB, sequential-cutoff: 0 }, "
            "throttle: { iops: 100 } }\nrules:\n  - { match: 'slow.raw', policy: p }\n");
  REQUIRE(sh("head -c 4M /dev/urandom > " + q(t / "b/slow.raw")) == 0);  // 64 blocks of data
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
  const int keep = open(m.path("slow.raw").c_str(), O_RDONLY);  // the cache lives while the disk is open
  REQUIRE(keep >= 0);
  (void)held_reads_beside_neighbour(t, m, "under a cache (reads fill it)");
  // The held reads filled the cache (later ones hit what earlier ones kept), and what they kept
  // is the image's: read it all back through the mount, twice (the second time from the cache).
  const std::string stats = get_xattr(m.path("slow.raw"), "user.iofilter.stats");
  INFO(stats);
  std::printf("throttle: under a cache, after the held reads: %g hits, %g misses\n", json_number(stats, "hits"),
              json_number(stats, "misses"));
  CHECK(json_number(stats, "hits") > 0);
  CHECK(json_number(stats, "misses") > 0);
  CHECK(sh("cmp " + q(m.path("slow.raw")) + " " + q(t / "b/slow.raw")) == 0);
  const double hits = json_number(get_xattr(m.path("slow.raw"), "user.iofilter.stats"), "hits");
  CHECK(sh("cmp " + q(m.path("slow.raw")) + " " + q(t / "b/slow.raw")) == 0);
  CHECK(json_number(get_xattr(m.path("slow.raw"), "user.iofilter.stats"), "hits") > hits);
  close(keep);
  CHECK(m.stop() == 0);
}

TEST_CASE("under replicate, reads are deferred: 128 held without threads, an unthrottled neighbour unaffected",
          "[throttle][fio][defer][replicate]") {
  TempDir t;
  REQUIRE(sh("mkdir -p " + q(t / "replica") + " " + q(t / "state")) == 0);
  datastore(t, {"slow.raw", "free.raw"},
            "policies:\n  p: { replicate: { target: " + t / "replica" + ", mode: async, journal: " + t / "state" +
                " }, throttle: { iops: 100 } }\nrules:\n  - { match: 'slow.raw', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
  (void)held_reads_beside_neighbour(t, m, "under replicate");
  CHECK(m.stop() == 0);
}

TEST_CASE("under a write-back cache and a throttle, random writes of 4 KiB to 128 KiB at depth 32 verify: reads "
          "deferred over dirty, destaged and evicted blocks",
          "[throttle][fio][defer][cache]") {
  TempDir t;
  // A cache of 2 MiB under 16 MiB written four times over, each pass read back by fio's verify:
  // the destager runs and blocks are evicted and reused while reads that miss (some over dirty
  // pages, some of several blocks) wait in the throttle's queue.
  datastore(t, {"d.raw"},
            "policies:\n  p: { cache: { mode: write-back, memory: 2MiB, unsafe: true, sequential-cutoff: 0 }, "
            "throttle: { iops: 500 } }\nrules:\n  - { match: 'd.raw', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const int keep = open(m.path("d.raw").c_str(), O_RDONLY);  // the cache lives while the disk is open
  REQUIRE(keep >= 0);
  std::string out;
  const int rc = sh("cd " + q(t.path()) + " && fio --name=mixed --filename=" + q(m.path("d.raw")) +
                        " --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-128k --iodepth=32 --size=16M "
                        "--loops=4 --verify=crc32c --verify_fatal=1 2>&1",
                    &out);
  INFO(out);
  CHECK(rc == 0);
  CHECK(out.find("err= 0") != std::string::npos);
  const std::string stats = get_xattr(m.path("d.raw"), "user.iofilter.stats");
  INFO(stats);
  std::printf("throttle: write-back cache under a 500 IOPS throttle, fio randwrite verify: %g hits, %g misses, %g "
              "requests delayed\n",
              json_number(stats, "hits"), json_number(stats, "misses"), json_number(stats, "delayed"));
  CHECK(json_number(stats, "misses") > 0);
  CHECK(json_number(stats, "delayed") > 0);
  close(keep);
  CHECK(m.stop() == 0);
}

TEST_CASE("requests waiting in a group hold no thread: two disks of a 100 IOPS group at depth 128, an unthrottled "
          "neighbour unaffected",
          "[throttle][fio][defer][group]") {
  TempDir t;
  // The disks have no limit of their own: every wait is the group's (stage 2), which blocked a
  // worker per request before it parked them.
  datastore(t, {"a.raw", "b.raw", "free.raw"},
            "policies:\n  g: { throttle: { iops: 100, group: shared } }\n"
            "rules:\n  - { match: 'a.raw', policy: g }\n  - { match: 'b.raw', policy: g }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
  const int fd = open(m.path("free.raw").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  REQUIRE(set_xattr(m.path("free.raw"), "user.iofilter.fault", "delay=all:2ms") == 0);
  const std::string free_job = fio_opts(4, 16) + " --name=free --filename=" + q(m.path("free.raw"));
  const double alone = fio(t.path(), free_job)[0].rate(4);
  const int threads_before = thread_count(m.pid());

  // 256 requests in the group, four times the daemon's 64 workers.
  fio_background(t.path(), "grp",
                 fio_opts(10, 128) + " --name=a --filename=" + q(m.path("a.raw")) + " --name=b --filename=" +
                     q(m.path("b.raw")));
  std::string a = wait_stat(m, "a.raw", "queued", 100);
  std::string b = wait_stat(m, "b.raw", "queued", 100);
  INFO(a << "\n" << b);
  REQUIRE(json_number(a, "queued") >= 100);
  REQUIRE(json_number(b, "queued") >= 100);
  const int threads_held = thread_count(m.pid());
  const double a_before = json_number(a, "reads"), b_before = json_number(b, "reads");
  const auto t0 = std::chrono::steady_clock::now();
  const double together = fio(t.path(), free_job)[0].rate(4);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  a = get_xattr(m.path("a.raw"), "user.iofilter.stats");
  b = get_xattr(m.path("b.raw"), "user.iofilter.stats");
  const double ra = (json_number(a, "reads") - a_before) / secs, rb = (json_number(b, "reads") - b_before) / secs;
  std::printf("throttle: group of 2 at 100 IOPS, depth 128 each: %g and %g held, daemon threads %d before, %d while "
              "held; the group's disks %.1f + %.1f IOPS meanwhile; neighbour (2 ms below, depth 16) alone %.0f IOPS, "
              "beside them %.0f: %+.1f%%\n",
              json_number(a, "queued"), json_number(b, "queued"), threads_before, threads_held, ra, rb, alone, together,
              100 * (together - alone) / alone);
  CHECK(threads_held < threads_before + 32);
  CHECK(together >= 0.9 * alone);
  CHECK(ra + rb <= 110);  // still the group's budget
  REQUIRE(wait_fio(t / "grp.rc") == 0);
  INFO(read_file(t / "grp.out"));
  CHECK(read_file(t / "grp.json").find("\"error\" : 0") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

namespace {

// 128 writes of slow.raw at depth 128 (`writes`: fio options after the engine's, with
// --verify) behind its 100 write IOPS limit, carried on a filter's own threads (offload.h), and
// free.raw (2 ms below, depth 16) measured alone and beside them. Checks that more are deferred
// than the daemon has workers, that the neighbour stays within 10%, and that fio verified every
// block; prints the figures under `what`. Returns slow.raw's stats while they were held.
std::string carried_writes_beside_neighbour(const TempDir& t, const Mount& m, const std::string& what,
                                            const std::string& writes) {
  const int fd = open(m.path("free.raw").c_str(), O_RDONLY);  // the fault layer is the open disk's
  REQUIRE(fd >= 0);
  const int slow_fd = open(m.path("slow.raw").c_str(), O_RDONLY);  // keeps the disk and its filters
  REQUIRE(slow_fd >= 0);
  REQUIRE(set_xattr(m.path("free.raw"), "user.iofilter.fault", "delay=all:2ms") == 0);
  const std::string free_job = fio_opts(4, 16) + " --name=free --filename=" + q(m.path("free.raw"));
  const double alone = fio(t.path(), free_job)[0].rate(4);
  const int threads_before = thread_count(m.pid());
  const std::string job = "--ioengine=libaio --direct=1 --iodepth=128 --verify_fatal=1 " + writes + " --name=w --filename=";
  fio_background(t.path(), "w", job + q(m.path("slow.raw")));
  std::string stats = wait_stat(m, "slow.raw", "deferred", 100);
  INFO(stats);
  REQUIRE(json_number(stats, "deferred") >= 100);  // more than the daemon's 64 workers
  const int threads_held = thread_count(m.pid());
  const double together = fio(t.path(), free_job)[0].rate(4);
  stats = get_xattr(m.path("slow.raw"), "user.iofilter.stats");
  std::printf("throttle: %s, %g requests deferred at 100 write IOPS (%g carried so far); daemon threads %d before, "
              "%d while they are held; neighbour (2 ms below, depth 16) alone %.0f IOPS, beside them %.0f: %+.1f%%\n",
              what.c_str(), json_number(stats, "deferred"), json_number(stats, "requests_offloaded"), threads_before,
              threads_held, alone, together, 100 * (together - alone) / alone);
  CHECK(json_number(stats, "requests_offloaded") >= 100);
  // The carrying filter's pool (32 threads at most) waits below, not the mount's workers: far
  // fewer new threads than requests held (the burst of arrivals also starts idle FUSE workers,
  // which libfuse keeps).
  CHECK(threads_held - threads_before < 64);
  CHECK(together >= 0.9 * alone);
  const int rc = wait_fio(t / "w.rc");
  INFO(read_file(t / "w.out") << read_file(t / "w.json").substr(0, 3000));
  REQUIRE(rc == 0);  // fio's verify pass read every block back through the mount
  CHECK(read_file(t / "w.json").find("\"error\" : 0") != std::string::npos);
  // And the bytes the image holds, read back again.
  std::string out;
  CHECK(sh("cd " + q(t.path()) + " && fio --verify_only " + job + q(m.path("slow.raw")), &out) == 0);
  close(slow_fd);
  close(fd);
  return stats;
}

}  // namespace

TEST_CASE("under replicate, writes are carried on its own threads: depth 128 at 100 write IOPS, an unthrottled neighbour "
          "unaffected",
          "[throttle][fio][defer][replicate]") {
  // Replicate's work around a local write (its range, the journal or the send, the bitmap)
  // needs one thread from start to end, so it takes each write and carries it on a pool of its
  // own; the throttle below holds those threads. Before, it held the mount's FUSE workers: at
  // this depth all 64 of them, and the neighbour waited.
  // With a cache between them, the carried write goes below with a Deferrer of the carrying
  // thread's (Offload::Waiter): the cache finishes it in its completion hook and holds no block
  // lock while the throttle holds the write.
  for (const std::string mode : {"async", "sync", "async over a write-through cache"}) {
    INFO(mode);
    TempDir t;
    REQUIRE(sh("mkdir -p " + q(t / "replica") + " " + q(t / "state")) == 0);
    const bool cached = mode.find("cache") != std::string::npos;
    datastore(t, {"slow.raw", "free.raw"},
              "policies:\n  p: { replicate: { target: " + t / "replica" + ", mode: " + mode.substr(0, mode.find(' ')) +
                  ", journal: " + t / "state" + " }, " +
                  (cached ? "cache: { mode: write-through, memory: 16MiB }, " : "") +
                  "throttle: { write-iops: 100 } }\nrules:\n  - { match: 'slow.raw', policy: p }\n");
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
    (void)carried_writes_beside_neighbour(t, m, "under replicate (" + mode + ")",
                                          "--rw=randwrite --bs=4k --size=4M --verify=crc32c");
    REQUIRE(set_xattr(m.path("slow.raw"), "user.iofilter.flush", "1") == 0);  // the replica has every write
    CHECK(sh("cmp " + q(t / "b/slow.raw") + " " + q(t / "replica/slow.raw")) == 0);
    CHECK(m.stop() == 0);
  }
}

TEST_CASE("under a write-back cache, 2 KiB writes and reads are carried: depth 128 at 100 IOPS, an unthrottled "
          "neighbour unaffected",
          "[throttle][fio][defer][cache]") {
  // A 2 KiB write into a block the cache takes reads the rest of its 4 KiB page from below
  // first, and a 2 KiB read of a cached block reads its block's missing pages below whole; both
  // need the thread throughout (cache_filter.h), so the cache carries them on its own pool.
  TempDir t;
  REQUIRE(sh("mkdir -p " + q(t / "c")) == 0);
  datastore(t, {"slow.raw", "free.raw"},
            "policies:\n  p: { cache: { mode: write-back, device: " + t / "c" +
                ", size: 16MiB, sequential-cutoff: 0 }, throttle: { iops: 100 } }\nrules:\n"
                "  - { match: 'slow.raw', policy: p }\n");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml", "--fault-injection"}});
  const std::string stats = carried_writes_beside_neighbour(t, m, "under a write-back cache (2 KiB writes)",
                                                            "--rw=randwrite --bs=2k --size=2M --verify=crc32c");
  CHECK(m.stop() == 0);
  // Destaged at the stop: the backing file holds every block fio wrote.
  std::string out;
  CHECK(sh("cd " + q(t.path()) +
               " && fio --verify_only --ioengine=libaio --direct=1 --iodepth=128 --verify_fatal=1 --rw=randwrite "
               "--bs=2k --size=2M --verify=crc32c --name=w --filename=" +
               q(t / "b/slow.raw"),
           &out) == 0);
  INFO(out);
}

TEST_CASE("under a write-back cache, a discard, a zero-range, a truncate and a seek of a throttled disk send "
          "nothing dirty below",
          "[throttle][cache][discard]") {
  // The cache holds 8 MiB dirty behind a throttle of 20 write IOPS (128 blocks: over 6 s to
  // destage). A discard, a zero-range and a truncate drop what they cover in the cache instead
  // of destaging it first, so none waits in the throttle: the dirty data stays in the cache.
  TempDir t;
  REQUIRE(sh("mkdir -p " + q(t / "c")) == 0);
  datastore(t, {"d.raw"},
            "policies:\n  p: { cache: { mode: write-back, device: " + t / "c" +
                ", size: 32MiB, sequential-cutoff: 0 }, throttle: { write-iops: 20 } }\nrules:\n"
                "  - { match: 'd.raw', policy: p }\n");
  REQUIRE(sh("truncate -s 8M " + q(t / "b/d.raw")) == 0);
  REQUIRE(sh("head -c 8388608 /dev/urandom > " + q(t / "data")) == 0);
  std::string expect = read_file(t / "data");
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  const int keep = open(m.path("d.raw").c_str(), O_RDONLY);  // the cache lives while the disk is open
  REQUIRE(keep >= 0);
  REQUIRE(sh("dd if=" + q(t / "data") + " of=" + q(m.path("d.raw")) + " bs=64k conv=notrunc,fsync status=none") ==
          0);
  const double dirty = json_number(get_xattr(m.path("d.raw"), "user.iofilter.stats"), "dirty_bytes");
  CHECK(dirty == 8 << 20);
  // Unaligned at both ends: the pages covered in part keep their other bytes.
  struct Step {
    const char* what;
    std::string cmd;
  };
  const std::vector<Step> steps = {
      {"discard", "fallocate --punch-hole --offset 1000000 --length 3000000 " + q(m.path("d.raw"))},
      {"zero-range", "fallocate --zero-range --keep-size --offset 5000001 --length 1000000 " + q(m.path("d.raw"))},
      {"truncate", "truncate -s 7000000 " + q(m.path("d.raw"))},
      {"grow", "truncate -s 8M " + q(m.path("d.raw"))},
  };
  std::memset(expect.data() + 1000000, 0, 3000000);
  std::memset(expect.data() + 5000001, 0, 1000000);
  std::memset(expect.data() + 7000000, 0, expect.size() - 7000000);
  for (const Step& s : steps) {
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(sh(s.cmd) == 0);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("throttle: a %s of a write-back cached disk behind 20 write IOPS took %.3f s\n", s.what, secs);
  }
  // SEEK_HOLE and SEEK_DATA count the dirty pages as data without destaging them. Nothing
  // reached the backing file, all holes: the first hole is the first page the discard covers
  // whole, and data resumes at the page it covers in part at its end.
  const int fd = open(m.path("d.raw").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  CHECK(lseek(fd, 0, SEEK_HOLE) == 1003520);
  CHECK(lseek(fd, 1003520, SEEK_DATA) == 3997696);
  close(fd);
  const std::string stats = get_xattr(m.path("d.raw"), "user.iofilter.stats");
  INFO(stats);
  // Only the covered pages left the cache; nothing was destaged (not a byte went through the throttle).
  CHECK(json_number(stats, "dirty_bytes") > 2 << 20);
  CHECK(json_number(stats, "dirty_bytes") < dirty);
  CHECK(json_number(stats, "destaged_bytes") == 0);
  write_file(t / "expect", expect);
  CHECK(sh("cmp " + q(t / "expect") + " " + q(m.path("d.raw"))) == 0);
  close(keep);
  CHECK(m.stop() == 0);  // destages the rest
  CHECK(sh("cmp " + q(t / "expect") + " " + q(t / "b/d.raw")) == 0);
}
