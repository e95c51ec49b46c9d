// The mount as a filesystem: everything that is not an image behaves like the backing tree,
// with the caller's ownership and the backing permissions.
#include <catch2/catch.hpp>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "mount.h"

using testing::Mount;
using testing::q;
using testing::read_file;
using testing::sh;
using testing::TempDir;
using testing::write_file;

TEST_CASE("files, directories, links and renames pass through to the backing tree", "[passthrough]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m"));
  Mount m(t / "b", t / "m");

  REQUIRE(mkdir(m.path("vm1").c_str(), 0750) == 0);
  write_file(m.path("vm1/vm1.conf"), "memory=4G\n");
  CHECK(read_file(t / "b/vm1/vm1.conf") == "memory=4G\n");
  struct stat st;
  REQUIRE(stat((t / "b/vm1").c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0750);

  // rename, RENAME_NOREPLACE and RENAME_EXCHANGE
  write_file(m.path("vm1/a"), "A");
  write_file(m.path("vm1/b"), "B");
  CHECK(renameat2(AT_FDCWD, m.path("vm1/a").c_str(), AT_FDCWD, m.path("vm1/b").c_str(), RENAME_NOREPLACE) == -1);
  CHECK(errno == EEXIST);
  REQUIRE(renameat2(AT_FDCWD, m.path("vm1/a").c_str(), AT_FDCWD, m.path("vm1/b").c_str(), RENAME_EXCHANGE) == 0);
  CHECK(read_file(t / "b/vm1/a") == "B");
  CHECK(read_file(t / "b/vm1/b") == "A");
  REQUIRE(rename(m.path("vm1/a").c_str(), m.path("vm1/c").c_str()) == 0);
  CHECK(access((t / "b/vm1/c").c_str(), F_OK) == 0);
  CHECK(access((t / "b/vm1/a").c_str(), F_OK) != 0);

  // hard link and symlink
  REQUIRE(link(m.path("vm1/c").c_str(), m.path("vm1/c2").c_str()) == 0);
  REQUIRE(stat((t / "b/vm1/c").c_str(), &st) == 0);
  CHECK(st.st_nlink == 2);
  REQUIRE(symlink("vm1.conf", m.path("vm1/conf-link").c_str()) == 0);
  char target[64] = {};
  REQUIRE(readlink(m.path("vm1/conf-link").c_str(), target, sizeof target - 1) == 8);
  CHECK(std::string(target) == "vm1.conf");
  CHECK(read_file(m.path("vm1/conf-link")) == "memory=4G\n");

  // mknod of a regular file, truncate and grow of a plain file
  REQUIRE(mknod(m.path("vm1/nvram").c_str(), S_IFREG | 0600, 0) == 0);
  REQUIRE(truncate(m.path("vm1/nvram").c_str(), 131072) == 0);
  REQUIRE(stat((t / "b/vm1/nvram").c_str(), &st) == 0);
  CHECK(st.st_size == 131072);
  CHECK((st.st_mode & 0777) == 0600);

  // owner and times (as root, the caller may give files away)
  REQUIRE(chown(m.path("vm1/nvram").c_str(), 1234, 5678) == 0);
  REQUIRE(stat((t / "b/vm1/nvram").c_str(), &st) == 0);
  CHECK(st.st_uid == 1234u);
  CHECK(st.st_gid == 5678u);
  struct timespec times[2] = {{1000000000, 0}, {1200000000, 500}};
  REQUIRE(utimensat(AT_FDCWD, m.path("vm1/nvram").c_str(), times, 0) == 0);
  REQUIRE(stat((t / "b/vm1/nvram").c_str(), &st) == 0);
  CHECK(st.st_atim.tv_sec == 1000000000);
  CHECK(st.st_mtim.tv_sec == 1200000000);
  CHECK(st.st_mtim.tv_nsec == 500);
  REQUIRE(chmod(m.path("vm1/nvram").c_str(), 0640) == 0);
  REQUIRE(stat((t / "b/vm1/nvram").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0640);

  // readdir sees what the backing has, including files made behind the mount's back
  write_file(t / "b/vm1/made-outside", "x");
  std::string out;
  sh("sleep 1.1; ls " + q(m.path("vm1")), &out);
  CHECK(out == "b\nc\nc2\nconf-link\nmade-outside\nnvram\nvm1.conf\n");

  // xattrs pass through; control names never reach the backing file
  REQUIRE(setxattr(m.path("vm1/vm1.conf").c_str(), "user.owner", "ops", 3, 0) == 0);
  char v[16] = {};
  REQUIRE(getxattr((t / "b/vm1/vm1.conf").c_str(), "user.owner", v, sizeof v) == 3);
  CHECK(std::string(v) == "ops");
  REQUIRE(removexattr(m.path("vm1/vm1.conf").c_str(), "user.owner") == 0);
  CHECK(getxattr((t / "b/vm1/vm1.conf").c_str(), "user.owner", v, sizeof v) == -1);

  // unlink, rmdir, statfs
  REQUIRE(unlink(m.path("vm1/c2").c_str()) == 0);
  CHECK(rmdir(m.path("vm1").c_str()) == -1);
  CHECK(errno == ENOTEMPTY);
  REQUIRE(sh("rm -r " + q(m.path("vm1"))) == 0);
  CHECK(access((t / "b/vm1").c_str(), F_OK) != 0);
  struct statvfs a, b;
  REQUIRE(statvfs(m.mountpoint().c_str(), &a) == 0);
  REQUIRE(statvfs((t / "b").c_str(), &b) == 0);
  CHECK(a.f_blocks == b.f_blocks);
  CHECK(a.f_bsize == b.f_bsize);

  CHECK(m.stop() == 0);
}

TEST_CASE("with allow_other, callers act as themselves and the backing permissions hold", "[passthrough][permissions]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b/shared") + " " + q(t / "m") + " && chmod 0755 " + q(t.path()) + " " + q(t / "b") +
     " && chmod 1777 " + q(t / "b/shared") + " && echo secret > " + q(t / "b/root-only") + " && chmod 0600 " +
     q(t / "b/root-only") + " && echo public > " + q(t / "b/public") + " && chmod 0644 " + q(t / "b/public") +
     " && mkdir -m 2775 " + q(t / "b/sgid") + " && chgrp 100 " + q(t / "b/sgid") + " && chmod 2777 " + q(t / "b/sgid"));
  Mount m(t / "b", t / "m", {{"-o", "allow_other"}});
  const std::string as_nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups -- ";
  std::string out;

  // Files and directories made through the mount belong to the caller.
  REQUIRE(sh(as_nobody + "bash -c " + q("touch " + m.path("shared/mine") + " && mkdir " + m.path("shared/dir")), &out) == 0);
  struct stat st;
  REQUIRE(stat((t / "b/shared/mine").c_str(), &st) == 0);
  CHECK(st.st_uid == 65534u);
  CHECK(st.st_gid == 65534u);
  REQUIRE(stat((t / "b/shared/dir").c_str(), &st) == 0);
  CHECK(st.st_uid == 65534u);
  // A setgid directory passes its group on, as on the backing filesystem.
  REQUIRE(sh(as_nobody + "touch " + q(m.path("sgid/f"))) == 0);
  REQUIRE(stat((t / "b/sgid/f").c_str(), &st) == 0);
  CHECK(st.st_gid == 100u);

  // Nothing the backing permissions deny.
  CHECK(sh(as_nobody + "cat " + q(m.path("root-only")), &out) != 0);
  CHECK(out.find("Permission denied") != std::string::npos);
  CHECK(sh(as_nobody + "cat " + q(m.path("public")), &out) == 0);
  CHECK(sh(as_nobody + "touch " + q(m.path("new-in-root"))) != 0);
  CHECK(access((t / "b/new-in-root").c_str(), F_OK) != 0);
  CHECK(sh(as_nobody + "chmod 0666 " + q(m.path("public"))) != 0);
  CHECK(sh(as_nobody + "chown 65534 " + q(m.path("public"))) != 0);
  REQUIRE(stat((t / "b/public").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0644);
  CHECK(st.st_uid == 0u);
  CHECK(sh(as_nobody + "bash -c " + q("echo x >> " + m.path("public"))) != 0);
  CHECK(read_file(t / "b/public") == "public\n");
  // Sticky directory: nobody cannot remove root's file in it.
  write_file(t / "b/shared/roots", "r");
  CHECK(sh(as_nobody + "rm -f " + q(m.path("shared/roots"))) != 0);
  CHECK(access((t / "b/shared/roots").c_str(), F_OK) == 0);
  // And may change what it owns.
  CHECK(sh(as_nobody + "chmod 0600 " + q(m.path("shared/mine"))) == 0);
  REQUIRE(stat((t / "b/shared/mine").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(m.stop() == 0);
}

TEST_CASE("a read-only mount refuses every change", "[passthrough]") {
  TempDir t;
  sh("mkdir -p " + q(t / "b") + " " + q(t / "m") + " && echo data > " + q(t / "b/f") + " && truncate -s 1M " +
     q(t / "b/disk.raw"));
  Mount m(t / "b", t / "m", {{"-o", "ro"}});
  CHECK(read_file(m.path("f")) == "data\n");
  int fd = open(m.path("disk.raw").c_str(), O_RDWR);
  CHECK(fd == -1);
  CHECK(errno == EROFS);
  CHECK(mkdir(m.path("d").c_str(), 0755) == -1);
  fd = open(m.path("disk.raw").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  char buf[512];
  CHECK(pread(fd, buf, sizeof buf, 0) == 512);
  close(fd);
  CHECK(m.stop() == 0);
}
