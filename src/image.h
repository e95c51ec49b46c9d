// Image awareness: what format a file is, by its content, not its name.
//
//   qcow2  – magic "QFI\xfb"; version and virtual size from the big-endian header
//            (QEMU docs/interop/qcow2.txt: magic @0, version @4, size @24).
//   vmdk   – a hosted sparse extent (magic "KDMV", little-endian capacity in sectors @12), or a
//            text descriptor ("# Disk DescriptorFile") whose extent lines name the data files
//            and their sizes in sectors.
//   raw    – anything else; the virtual size is the file size.
//
// Pure: works on bytes already read, so the unit tests feed it buffers.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace iofilterfs {

struct ImageInfo {
  std::string format = "raw";  // raw, qcow2, vmdk
  uint32_t version = 0;        // qcow2 version
  uint64_t virtual_size = 0;   // bytes the guest sees
  std::string subformat;       // vmdk: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, ...
  std::vector<std::string> extents;  // vmdk descriptor: extent file names, in order
  std::string backing_file;    // qcow2: the backing file name from the header, if any
};

// `head` is the start of the file (at least 512 bytes when the file has them; up to 64 KiB
// helps a text descriptor), `file_size` its length. For qcow2, the backing file name is read
// from `head` when it lies within it.
ImageInfo detect_image(std::string_view head, uint64_t file_size);

// Reads the head of an open descriptor and detects it.
ImageInfo detect_image_fd(int fd, uint64_t file_size);

}  // namespace iofilterfs
