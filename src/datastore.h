// Datastore: the mounted tree — a passthrough of the backing directory, plus the open disks.
//
// Every file and directory the kernel has looked up is an Inode holding an O_PATH descriptor of
// the backing object (the shape of libfuse's passthrough_hp). A regular file that matches the
// image patterns is an image: its opens share one Disk (disk.h), whose chain every data
// operation runs through. Other files pass straight through to their backing descriptor.
//
// Threads: FUSE worker threads call everything here concurrently.
//   inodes_mu_  guards the inode table and every Inode's nlookup;
//   Inode::m    guards that inode's disk and handle count;
//   config_mu_  guards the policies in force (taken briefly, never while calling out);
//   reload_mu_  serialises reloads and policy assignments.
// Lock order: reload_mu_, inodes_mu_, Inode::m, Disk::control_mu_; config_mu_ is a leaf.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "config.h"
#include "disk.h"
#include "options.h"

namespace iofilterfs {

struct Inode {
  int fd = -1;  // O_PATH, O_NOFOLLOW
  dev_t dev = 0;
  ino_t ino = 0;
  mode_t type = 0;       // S_IFMT bits
  uint64_t nlookup = 0;  // under Datastore::inodes_mu_

  std::mutex m;
  std::shared_ptr<Disk> disk;  // under m: set while the image has open handles
  // under m: the last handle's Disk is closing (its filters drain, which can take a while: a
  // replica catching up). A new open waits for it, so it never meets the old Disk's image lock.
  bool closing = false;
  std::condition_variable closed_cv;
};

class Datastore {
 public:
  Datastore(MountOptions opt, std::shared_ptr<const DatastoreConfig> config);
  ~Datastore();

  // Opens the backing root; false with *err set when it cannot.
  bool init(std::string* err);

  const MountOptions& options() const { return opt_; }
  Inode& root() { return root_; }
  Inode& inode(fuse_ino_t ino) {
    return ino == FUSE_ROOT_ID ? root_ : *reinterpret_cast<Inode*>(static_cast<uintptr_t>(ino));
  }
  fuse_ino_t ino_of(const Inode& i) const {
    return &i == &root_ ? FUSE_ROOT_ID : static_cast<fuse_ino_t>(reinterpret_cast<uintptr_t>(&i));
  }

  // Looks `name` up in `parent`, fills *e and takes one lookup reference. Returns 0 or an errno.
  int lookup(Inode& parent, const char* name, fuse_entry_param* e);
  void forget(Inode& i, uint64_t n);

  // The inode's path relative to the backing root, or "" when it cannot be found.
  std::string relpath(const Inode& i) const;
  // A regular file that the image patterns select.
  bool is_image(const Inode& i) const;

  // The policies in force.
  std::shared_ptr<const DatastoreConfig> config() const;
  // Re-reads the policy file. Invalid: the old policies stay in force, the message is kept for
  // status and returned. Valid: swapped in, and every open disk is re-plumbed to its policy.
  Status reload(std::string* err);
  // The policy an image gets: its persistent override, else the rules.
  std::string policy_of(const Inode& i) const;
  // Assigns (or, with an empty name, clears) an image's persistent override and re-plumbs it.
  Status set_policy(Inode& i, const std::string& name, std::string* err);

  // Opens (or joins) the image's Disk for one handle.
  Status attach_disk(Inode& i, bool writable, bool direct, std::shared_ptr<Disk>* out, std::string* err);
  // Drops one handle; the last one closes the Disk.
  void detach_disk(Inode& i);

  // The open disk whose path (as it was opened) is `relpath`, or null.
  std::shared_ptr<Disk> find_open_disk(const std::string& relpath);
  // Every open disk, for status.
  std::vector<std::shared_ptr<Disk>> open_disks();
  // JSON of every open disk.
  std::string status_json();
  // Closes every disk (filters drain) at unmount.
  void shutdown();

  // Stat with the chain's view of an image's size: an open image's chain answers; for one that
  // is not open, the bottom-most filter of its policy with FilterInfo::visible_size does.
  int stat(Inode& i, struct stat* st);

  // The backing-file xattr that stores an image's policy override. The daemon hides this name
  // from clients; it lives in the trusted namespace so only root could set it directly.
  static constexpr const char* kPolicyXattr = "trusted.iofilterfs.policy";

 private:
  // stat() of an image with no open disk.
  void closed_image_size(Inode& i, struct stat* st);

  MountOptions opt_;
  mutable std::mutex config_mu_;
  std::shared_ptr<const DatastoreConfig> config_;  // under config_mu_
  std::string reload_error_;                       // under config_mu_
  uint64_t reloads_ = 0;                           // under config_mu_
  Inode root_;
  std::mutex reload_mu_;
  std::mutex inodes_mu_;
  std::map<std::pair<ino_t, dev_t>, std::unique_ptr<Inode>> inodes_;  // under inodes_mu_
};

}  // namespace iofilterfs
