#include "image.h"

#include <unistd.h>

#include <cstring>
#include <sstream>

namespace iofilterfs {
namespace {

uint32_t be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}
uint64_t be64(const unsigned char* p) { return (uint64_t{be32(p)} << 32) | be32(p + 4); }
uint32_t le32(const unsigned char* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
uint64_t le64(const unsigned char* p) { return uint64_t{le32(p)} | (uint64_t{le32(p + 4)} << 32); }

// Parses a VMDK text descriptor: createType and the extent lines
//   RW 4192256 SPARSE "disk-s001.vmdk"
//   RW 2048 FLAT "disk-flat.vmdk" 0
bool parse_vmdk_descriptor(std::string_view text, ImageInfo* info) {
  std::istringstream in{std::string(text)};
  std::string line;
  uint64_t sectors = 0;
  bool any = false;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.rfind("createType", 0) == 0) {
      size_t q1 = line.find('"'), q2 = line.rfind('"');
      if (q1 != std::string::npos && q2 > q1) info->subformat = line.substr(q1 + 1, q2 - q1 - 1);
      continue;
    }
    std::istringstream ls(line);
    std::string access, type;
    uint64_t n = 0;
    if (!(ls >> access >> n >> type)) continue;
    if (access != "RW" && access != "RDONLY" && access != "NOACCESS") continue;
    size_t q1 = line.find('"'), q2 = line.find('"', q1 + 1);
    if (q1 == std::string::npos || q2 == std::string::npos) continue;
    info->extents.push_back(line.substr(q1 + 1, q2 - q1 - 1));
    sectors += n;
    any = true;
  }
  if (any) info->virtual_size = sectors * 512;
  return any;
}

}  // namespace

ImageInfo detect_image(std::string_view head, uint64_t file_size) {
  ImageInfo info;
  info.virtual_size = file_size;
  const auto* p = reinterpret_cast<const unsigned char*>(head.data());
  if (head.size() >= 32 && std::memcmp(p, "QFI\xfb", 4) == 0) {
    info.format = "qcow2";
    info.version = be32(p + 4);
    info.virtual_size = be64(p + 24);
    uint64_t bf_off = be64(p + 8);
    uint32_t bf_len = be32(p + 16);
    if (bf_off && bf_len && bf_len <= 1023 && bf_off + bf_len <= head.size())
      info.backing_file.assign(head.data() + bf_off, bf_len);
    return info;
  }
  if (head.size() >= 20 && std::memcmp(p, "KDMV", 4) == 0) {
    info.format = "vmdk";
    info.virtual_size = le64(p + 12) * 512;
    // The embedded descriptor (offset and size in sectors at 28 and 36) names the subformat.
    if (head.size() >= 44) {
      uint64_t doff = le64(p + 28) * 512, dlen = le64(p + 36) * 512;
      if (doff && dlen && doff < head.size()) {
        std::string_view d = head.substr(doff, std::min<uint64_t>(dlen, head.size() - doff));
        d = d.substr(0, d.find('\0'));
        ImageInfo tmp;
        parse_vmdk_descriptor(d, &tmp);
        info.subformat = tmp.subformat;
      }
    }
    if (info.subformat.empty()) info.subformat = "monolithicSparse";
    return info;
  }
  std::string_view text = head.substr(0, head.find('\0'));
  if (text.rfind("# Disk DescriptorFile", 0) == 0) {
    ImageInfo v;
    v.format = "vmdk";
    if (parse_vmdk_descriptor(text, &v)) return v;
  }
  return info;
}

ImageInfo detect_image_fd(int fd, uint64_t file_size) {
  static constexpr size_t kHead = 64 * 1024;
  std::string head(std::min<uint64_t>(kHead, file_size), '\0');
  ssize_t n = head.empty() ? 0 : ::pread(fd, head.data(), head.size(), 0);
  head.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return detect_image(head, file_size);
}

}  // namespace iofilterfs
