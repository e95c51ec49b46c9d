// The policy file: what a valid file yields, and the exact FILE:LINE:COLUMN message of every
// kind of mistake. Filters come from a test registry whose "rate" filter validates like a real
// one, so the framework's dispatch to a filter's own validation is covered too.
#include <catch2/catch.hpp>

#include "config.h"
#include "suggest.h"
#include "units.h"

using namespace iofilterfs;

namespace {

Registry test_registry() {
  Registry r;
  auto make = [](const YAML::Node&) { return std::make_unique<Filter>(); };
  // rate: { iops: N > 0 }, class throttle
  r.add(FilterInfo{"rate", FilterClass::Throttle, kFilterApiVersion, "test throttle", {"iops"},
                   [](const YAML::Node& p, YAML::Node* where) -> std::string {
                     if (!p.IsMap()) return {};
                     for (const auto& kv : p) {
                       if (kv.first.Scalar() != "iops") {
                         where->reset(kv.first);
                         return "unknown key '" + kv.first.Scalar() + "'" + did_you_mean(kv.first.Scalar(), {"iops"});
                       }
                       long v = 0;
                       try {
                         v = kv.second.as<long>();
                       } catch (const YAML::Exception&) {
                         where->reset(kv.second);
                         return "iops must be a whole number";
                       }
                       if (v <= 0) {
                         where->reset(kv.second);
                         return "iops must be positive";
                       }
                     }
                     return {};
                   },
                   make});
  r.add(FilterInfo{"rate2", FilterClass::Throttle, kFilterApiVersion, "another throttle", {}, nullptr, make});
  r.add(FilterInfo{"wb", FilterClass::Cache, kFilterApiVersion, "test cache", {}, nullptr, make});
  return r;
}

std::string parse(const std::string& text, DatastoreConfig* out = nullptr) {
  DatastoreConfig c;
  std::string e = parse_config(text, "ds1.yaml", test_registry(), &c);
  if (out) *out = c;
  return e;
}

}  // namespace

TEST_CASE("a valid file yields its settings, policies and rules", "[config]") {
  DatastoreConfig c;
  REQUIRE(parse(R"(
datastore:
  backing: /srv/images
  mountpoint: /srv/filtered
  images: ["*.raw", "*.qcow2"]
  options: [allow_other, nosuid]
  threads: 48
  log-level: debug
  default-policy: bronze
policies:
  gold:
    rate: { iops: 5000 }
    wb: {}
  bronze:
    rate: { iops: 500 }
  scratch:
rules:
  - { match: "db/*.qcow2", policy: gold }
  - { match: "tmp/*", policy: scratch }
  - { match: "*.raw", policy: none }
)",
              &c) == "");
  CHECK(c.backing == "/srv/images");
  CHECK(c.mountpoint == "/srv/filtered");
  CHECK(c.options == std::vector<std::string>{"allow_other", "nosuid"});
  CHECK(c.threads == 48u);
  CHECK(c.log_level == "debug");
  REQUIRE(c.policies.size() == 3);
  CHECK(c.find_policy("gold")->filters.size() == 2);
  CHECK(c.find_policy("scratch")->filters.empty());
  CHECK(c.find_policy("none")->filters.empty());
  CHECK(c.find_policy("silver") == nullptr);
  CHECK(describe_policy(*c.find_policy("gold"), test_registry()) == "wb -> rate(iops=5000)");

  CHECK(c.is_image("vm1/disk.qcow2"));
  CHECK(c.is_image("top.raw"));
  CHECK_FALSE(c.is_image("vm1/disk.vmdk"));
  CHECK_FALSE(c.is_image("vm1/vm1.conf"));
  CHECK(c.policy_for("db/pg.qcow2") == "gold");        // first match wins
  CHECK(c.policy_for("db/sub/pg.qcow2") == "bronze");  // '*' does not cross '/' in a path pattern
  CHECK(c.policy_for("tmp/x.qcow2") == "scratch");
  CHECK(c.policy_for("a/b/c.raw") == "none");          // no '/': the file name in any directory
  CHECK(c.policy_for("web/www.qcow2") == "bronze");    // the default
}

TEST_CASE("an empty file is the defaults: every image, the empty chain", "[config]") {
  DatastoreConfig c;
  REQUIRE(parse("", &c) == "");
  CHECK(c.images == kDefaultImagePatterns);
  CHECK(c.policy_for("any.img") == "none");
  REQUIRE(parse("# only a comment\n", &c) == "");
}

TEST_CASE("every mistake gets FILE:LINE:COLUMN and a precise message", "[config]") {
  struct Case {
    const char* text;
    const char* message;
  };
  const Case cases[] = {
      {"datastore: {backing: /x\n", "ds1.yaml:2:1: end of map flow not found"},
      {"policies:\n  gold: [\n", "ds1.yaml:3:1: end of sequence flow not found"},
      {"datastor:\n  backing: /x\n", "ds1.yaml:1:1: unknown key 'datastor' in the file (did you mean 'datastore'?)"},
      {"datastore:\n  mountpiont: /m\n",
       "ds1.yaml:2:3: unknown key 'mountpiont' in datastore (did you mean 'mountpoint'?)"},
      {"datastore:\n  colour: blue\n", "ds1.yaml:2:3: unknown key 'colour' in datastore"},
      {"datastore:\n  threads: many\n", "ds1.yaml:2:12: datastore.threads must be a whole number, not 'many'"},
      {"datastore:\n  threads: 0\n", "ds1.yaml:2:12: datastore.threads must be from 1 to 1024, not 0"},
      {"datastore:\n  images: '*.raw'\n", "ds1.yaml:2:11: datastore.images must be a list of strings, not '*.raw'"},
      {"datastore:\n  images: []\n", "ds1.yaml:2:11: datastore.images must name at least one pattern"},
      {"datastore:\n  log-level: loud\n",
       "ds1.yaml:2:14: unknown log level 'loud' (trace, debug, info, warn, error, critical, off)"},
      {"datastore:\n  backing: [a, b]\n", "ds1.yaml:2:12: datastore.backing must be a non-empty string, not a list"},
      {"datastore: 7\n", "ds1.yaml:1:12: datastore must be a mapping, not '7'"},
      {"datastore:\n  backing: /a\n  backing: /b\n", "ds1.yaml:3:3: duplicate key 'backing' in datastore"},
      {"policies:\n  gold:\n    rate: { iops: 10 }\n    rate2: { }\n",
       "ds1.yaml:4:5: policy 'gold' has two filters of class throttle: 'rate' and 'rate2'"},
      {"policies:\n  gold:\n    ratee: { iops: 10 }\n",
       "ds1.yaml:3:5: unknown filter 'ratee' in policy 'gold' (did you mean 'rate'?) (installed: rate, rate2, wb)"},
      {"policies:\n  gold:\n    rate: { iops: -5 }\n", "ds1.yaml:3:19: rate: iops must be positive"},
      {"policies:\n  gold:\n    rate: { iosp: 5 }\n", "ds1.yaml:3:13: rate: unknown key 'iosp' (did you mean 'iops'?)"},
      {"policies:\n  gold:\n    rate: { iops: fast }\n", "ds1.yaml:3:19: rate: iops must be a whole number"},
      {"policies:\n  gold:\n    rate: 500\n",
       "ds1.yaml:3:11: the parameters of filter 'rate' must be a mapping, not '500'"},
      {"policies:\n  none:\n", "ds1.yaml:2:3: 'none' is the built-in policy without filters; choose another name"},
      {"policies:\n  gold:\nrules:\n  - { match: '*', policy: glod }\n",
       "ds1.yaml:4:27: rule for '*' names unknown policy 'glod' (did you mean 'gold'?)"},
      {"rules:\n  - { match: '*' }\n", "ds1.yaml:2:5: a rule needs 'policy'"},
      {"rules:\n  - { match: '*', policy: none, when: later }\n", "ds1.yaml:2:33: unknown key 'when' in a rule"},
      {"rules: {match: x}\n", "ds1.yaml:1:8: rules must be a list of { match: GLOB, policy: NAME }, not a mapping"},
      {"datastore:\n  default-policy: silver\npolicies:\n  gold:\n",
       "ds1.yaml:2:19: default-policy names unknown policy 'silver'"},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    CHECK(parse(c.text) == c.message);
  }
}

TEST_CASE("a missing file is named with the system's reason", "[config]") {
  DatastoreConfig c;
  CHECK(load_config("/nonexistent/ds.yaml", test_registry(), &c) == "/nonexistent/ds.yaml: No such file or directory");
}

TEST_CASE("suggestions only for likely typos", "[config]") {
  CHECK(closest_name("mountpiont", {"backing", "mountpoint"}) == "mountpoint");
  CHECK(closest_name("thread", {"threads"}) == "threads");
  CHECK(closest_name("colour", {"backing", "mountpoint", "threads"}) == "");
  CHECK(closest_name("x", {"y"}) == "");
  CHECK(edit_distance("kitten", "sitting") == 3);
  CHECK(edit_distance("iosp", "iops") == 1);
}

TEST_CASE("view: the datastore default and a policy's own, validated", "[config]") {
  DatastoreConfig c;
  std::string e = parse_config(
      "datastore:\n  view: raw\npolicies:\n  keep:\n    view: native\n    rate: { iops: 5 }\n  inherit:\n"
      "    rate: { iops: 5 }\n",
      "v.yaml", test_registry(), &c);
  REQUIRE(e.empty());
  CHECK(c.view == "raw");
  CHECK(c.view_for("keep") == "native");
  CHECK(c.view_for("inherit") == "raw");
  CHECK(c.view_for(kNoPolicy) == "raw");
  CHECK(c.any_raw_view());
  CHECK(c.find_policy("keep")->filters.size() == 1);  // view is not a filter

  DatastoreConfig d;
  REQUIRE(parse_config("policies:\n  p:\n    view: raw\n", "v.yaml", test_registry(), &d).empty());
  CHECK(d.view_for("p") == "raw");
  CHECK(d.view_for(kNoPolicy) == "native");

  DatastoreConfig bad;
  CHECK(parse_config("datastore:\n  view: qcow\n", "v.yaml", test_registry(), &bad) ==
        "v.yaml:2:9: datastore.view must be 'native' or 'raw', not 'qcow'");
  CHECK(parse_config("policies:\n  p:\n    view: [raw]\n", "v.yaml", test_registry(), &bad) ==
        "v.yaml:3:11: policy 'p' view must be a non-empty string, not a list");
}
