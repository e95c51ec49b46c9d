#include <catch2/catch.hpp>

#include "cli.h"

using namespace iofilterfs;

TEST_CASE("mount options given with -o are applied, unknown ones refused", "[cli]") {
  MountOptions o;
  CHECK(apply_mount_options("ro,allow_other,threads=8,config=/etc/iofilterfs/ds1.yaml,nosuid,_netdev", &o).empty());
  CHECK(o.read_only);
  CHECK(o.allow_other);
  CHECK(o.threads == 8);
  CHECK(o.config == "/etc/iofilterfs/ds1.yaml");
  CHECK(o.fuse_opts == std::vector<std::string>{"nosuid"});
  CHECK(apply_mount_options("rw", &o).empty());
  CHECK_FALSE(o.read_only);
  CHECK(apply_mount_options("frobnicate", &o) == "unknown mount option 'frobnicate'");
  CHECK(apply_mount_options("threads=0", &o) == "-o threads=0: expected a number from 1 to 1024");
}
