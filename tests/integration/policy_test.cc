// Policy files through a real daemon: start-up, check-config, reload (SIGHUP and the reload
// xattr, a broken file refused whole), and per-image assignment that survives a restart.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <signal.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "config.h"
#include "mount.h"

using testing::daemon_binary;
using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;
using testing::write_file;

namespace {

// Waits until `pred` holds (the daemon reloads on its own thread after SIGHUP).
template <typename P>
bool eventually(P pred) {
  for (int i = 0; i < 250; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

const char* kTwoPolicies = R"(
datastore:
  images: ["*.raw", "*.qcow2"]
policies:
  gold:
  bronze:
rules:
  - { match: "db/*", policy: gold }
  - { match: "*", policy: bronze }
)";

}  // namespace

TEST_CASE("the policy file names the datastore, the command line overrides it", "[policy]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b/db") + " " + q(t / "m") + " " + q(t / "m2") + " && truncate -s 1M " + q(t / "b/db/pg.raw") +
     " " + q(t / "b/web.raw") + " " + q(t / "b/notes.img"));
  write_file(t / "ds1.yaml", std::string("datastore:\n  backing: ") + t / "b" + "\n  mountpoint: " + t / "m" +
                                 "\n  images: [\"*.raw\"]\npolicies:\n  gold:\nrules:\n  - { match: \"db/*\", policy: gold }\n");
  {
    // BACKING and MOUNTPOINT from the file.
    std::string out;
    REQUIRE(sh(q(daemon_binary()) + " --config " + q(t / "ds1.yaml"), &out) == 0);
    REQUIRE(testing::is_mounted(t / "m"));
    CHECK(testing::get_xattr(t / "m/db/pg.raw", "user.iofilter.policy") == "gold");
    CHECK(testing::get_xattr(t / "m/web.raw", "user.iofilter.policy") == "none");
    CHECK(testing::get_xattr(t / "m/notes.img", "user.iofilter.policy") == "ERR:No data available");  // not an image here
    CHECK(sh("fusermount3 -u " + q(t / "m")) == 0);
  }
  // The command line's MOUNTPOINT wins over the file's.
  Mount m(t / "b", t / "m2", {{"--config", t / "ds1.yaml"}});
  CHECK(testing::get_xattr(m.path("db/pg.raw"), "user.iofilter.policy") == "gold");
  CHECK_FALSE(testing::is_mounted(t / "m"));
  CHECK(m.stop() == 0);
}

TEST_CASE("a broken policy file stops the daemon before mounting, with FILE:LINE:COLUMN", "[policy]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  write_file(t / "bad.yaml", "policies:\n  gold:\n    throtle: { iops: 5 }\n");
  std::string out;
  CHECK(sh(q(daemon_binary()) + " " + q(t / "b") + " " + q(t / "m") + " --config " + q(t / "bad.yaml"), &out) == 2);
  CHECK(out.rfind(t / "bad.yaml" + ":3:5: unknown filter 'throtle' in policy 'gold'", 0) == 0);
  CHECK(std::count(out.begin(), out.end(), '\n') == 1);
  CHECK_FALSE(testing::is_mounted(t / "m"));
  CHECK(sh(q(daemon_binary()) + " " + q(t / "b") + " " + q(t / "m") + " -o config=" + q(t / "missing.yaml"), &out) == 2);
  CHECK(out == t / "missing.yaml" + ": No such file or directory\n");
}

TEST_CASE("check-config shows each rule's and each image's policy, and refuses a bad file", "[policy]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b/db") + " && truncate -s 1M " + q(t / "b/db/pg.qcow2") + " " + q(t / "b/www.raw") + " " +
     q(t / "b/readme.txt"));
  write_file(t / "ds.yaml", kTwoPolicies);
  std::string out;
  REQUIRE(sh(q(daemon_binary()) + " check-config " + q(t / "ds.yaml") + " --backing " + q(t / "b"), &out) == 0);
  INFO(out);
  CHECK(out.find(t / "ds.yaml" + ": valid: 2 policies, 2 rules") != std::string::npos);
  CHECK(out.find("1. db/*") != std::string::npos);
  CHECK(out.find("db/pg.qcow2                      gold (rule): (empty)") != std::string::npos);
  CHECK(out.find("www.raw                          bronze (rule): (empty)") != std::string::npos);
  CHECK(out.find("readme.txt") == std::string::npos);

  write_file(t / "bad.yaml", "rules:\n  - { match: '*', policy: silver }\n");
  CHECK(sh(q(daemon_binary()) + " check-config " + q(t / "bad.yaml"), &out) == 2);
  CHECK(out == t / "bad.yaml" + ":2:27: rule for '*' names unknown policy 'silver'\n");
}

TEST_CASE("reload by SIGHUP and by xattr re-plumbs open disks, a broken file is refused whole", "[policy][reload]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b/db") + " " + q(t / "m") + " && truncate -s 4M " + q(t / "b/db/pg.raw") + " " +
     q(t / "b/www.raw"));
  write_file(t / "ds.yaml", kTwoPolicies);
  Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
  int fd = open(m.path("www.raw").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  CHECK(testing::get_xattr(m.path("www.raw"), "user.iofilter.policy") == "bronze");

  // SIGHUP: www.raw now matches a rule for gold.
  std::string next = kTwoPolicies;
  next.replace(next.find("db/*"), 4, "www*");
  write_file(t / "ds.yaml", next);
  REQUIRE(kill(m.pid(), SIGHUP) == 0);
  CHECK(eventually([&] { return testing::get_xattr(m.path("www.raw"), "user.iofilter.policy") == "gold"; }));
  CHECK(pwrite(fd, "still", 5, 0) == 5);  // the open handle kept working

  // A broken file: refused whole, the old policies stay, the reason is in the status.
  write_file(t / "ds.yaml", "policies:\n  gold:\n  - nonsense\n");
  CHECK(testing::set_xattr(m.mountpoint(), "user.iofilter.reload", "1") == EINVAL);
  std::string status = testing::get_xattr(m.mountpoint(), "user.iofilter.status");
  CHECK(status.find("\"config_error\":\"" + t / "ds.yaml" + ":3:3:") != std::string::npos);
  CHECK(testing::get_xattr(m.path("www.raw"), "user.iofilter.policy") == "gold");
  CHECK(m.log().find("reload refused, the old policies stay in force: " + t / "ds.yaml" + ":3:3:") != std::string::npos);
  REQUIRE(kill(m.pid(), SIGHUP) == 0);  // SIGHUP with a broken file does not stop the daemon either
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  CHECK(m.mounted());

  // Fixed again: the error clears and the rules apply.
  write_file(t / "ds.yaml", kTwoPolicies);
  CHECK(testing::set_xattr(m.mountpoint(), "user.iofilter.reload", "1") == 0);
  CHECK(testing::get_xattr(m.path("www.raw"), "user.iofilter.policy") == "bronze");
  CHECK(testing::get_xattr(m.mountpoint(), "user.iofilter.status").find("\"config_error\":null") != std::string::npos);
  close(fd);
  CHECK(m.stop() == 0);
}

TEST_CASE("an image's assigned policy overrides the rules and survives a restart", "[policy]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && truncate -s 1M " + q(t / "b/www.raw") + " && echo x > " +
     q(t / "b/notes.txt"));
  write_file(t / "ds.yaml", kTwoPolicies);
  {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    CHECK(testing::get_xattr(m.path("www.raw"), "user.iofilter.policy") == "bronze");
    CHECK(testing::set_xattr(m.path("www.raw"), "user.iofilter.policy", "gold") == 0);
    CHECK(testing::get_xattr(m.path("www.raw"), "user.iofilter.policy") == "gold");
    CHECK(testing::set_xattr(m.path("www.raw"), "user.iofilter.policy", "platinum") == EINVAL);
    CHECK(testing::set_xattr(m.path("notes.txt"), "user.iofilter.policy", "gold") == ENOTSUP);
    std::string out;
    CHECK(sh("setpriv --reuid=65534 --regid=65534 --clear-groups -- setfattr -n user.iofilter.policy -v bronze " +
                 q(m.path("www.raw")),
             &out) != 0);
    // The assignment lives with the file, hidden from clients.
    CHECK(sh("getfattr -d -m - " + q(m.path("www.raw")), &out) == 0);
    CHECK(out.find("trusted.iofilterfs") == std::string::npos);
    CHECK(m.stop() == 0);
  }
  {
    Mount m(t / "b", t / "m", {{"--config", t / "ds.yaml"}});
    CHECK(testing::get_xattr(m.path("www.raw"), "user.iofilter.policy") == "gold");
    // Removing the assignment hands the image back to the rules.
    CHECK(removexattr(m.path("www.raw").c_str(), "user.iofilter.policy") == 0);
    CHECK(testing::get_xattr(m.path("www.raw"), "user.iofilter.policy") == "bronze");
    CHECK(m.stop() == 0);
  }
}

TEST_CASE("every example in config/ loads", "[policy][docs]") {
  std::string out;
  REQUIRE(sh("ls " + q(testing::source_dir() + "/config") + "/*.yaml", &out) == 0);
  std::istringstream files(out);
  std::string f;
  int n = 0;
  while (std::getline(files, f)) {
    std::string res;
    INFO(f << "\n" << res);
    CHECK(sh(q(daemon_binary()) + " check-config " + q(f), &res) == 0);
    ++n;
  }
  CHECK(n >= 2);
}

TEST_CASE("every key the parser accepts is in iofilterfs.yaml(5)", "[policy][docs]") {
  std::string page = read_file(testing::source_dir() + "/man/iofilterfs.yaml.5");
  REQUIRE_FALSE(page.empty());
  // groff escapes hyphens; a key must appear as a whole word: "iops" inside "read\-iops" or
  // "iops\-max" does not count.
  auto documented = [&](std::string key) {
    std::string esc;
    for (char c : key) esc += c == '-' ? std::string("\\-") : std::string(1, c);
    auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '\\'; };
    for (size_t p = page.find(esc); p != std::string::npos; p = page.find(esc, p + 1)) {
      char before = p ? page[p - 1] : ' ', after = p + esc.size() < page.size() ? page[p + esc.size()] : ' ';
      if (!word(before) && !word(after)) return true;
    }
    return false;
  };
  for (std::string key : iofilterfs::config_keys()) {
    key = key.substr(key.rfind('.') + 1);
    INFO("key " << key);
    CHECK(documented(key));
  }
  for (const auto& f : iofilterfs::Registry::instance().all()) {
    INFO("filter " << f.name);
    CHECK(documented(f.name));
    for (const auto& key : f.params) {
      INFO("filter " << f.name << " key " << key);
      CHECK(documented(key));
    }
  }
}
