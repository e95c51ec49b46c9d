// Format detection by content: qcow2 header fields, VMDK sparse headers and descriptors, raw.
#include <catch2/catch.hpp>

#include "image.h"

using namespace iofilterfs;

namespace {

void put_be32(std::string& s, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) s[off + i] = static_cast<char>(v >> (24 - 8 * i));
}
void put_be64(std::string& s, size_t off, uint64_t v) {
  put_be32(s, off, static_cast<uint32_t>(v >> 32));
  put_be32(s, off + 4, static_cast<uint32_t>(v));
}
void put_le64(std::string& s, size_t off, uint64_t v) {
  for (int i = 0; i < 8; ++i) s[off + i] = static_cast<char>(v >> (8 * i));
}

}  // namespace

TEST_CASE("qcow2 is detected by magic with version, size and backing file", "[image]") {
  std::string h(1024, '\0');
  h.replace(0, 4, "QFI\xfb");
  put_be32(h, 4, 3);
  put_be64(h, 24, 20ull << 30);
  put_be64(h, 8, 512);  // backing file name offset
  put_be32(h, 16, 8);   // and length
  h.replace(512, 8, "base.img");
  ImageInfo i = detect_image(h, 196608);
  CHECK(i.format == "qcow2");
  CHECK(i.version == 3);
  CHECK(i.virtual_size == (20ull << 30));
  CHECK(i.backing_file == "base.img");
}

TEST_CASE("a VMDK sparse extent is detected with its capacity and create type", "[image]") {
  std::string h(2048, '\0');
  h.replace(0, 4, "KDMV");
  put_le64(h, 12, 2097152);  // capacity: 1 GiB in sectors
  put_le64(h, 28, 1);        // descriptor at sector 1
  put_le64(h, 36, 2);        // two sectors long
  std::string d = "# Disk DescriptorFile\nversion=1\ncreateType=\"streamOptimized\"\nRW 2097152 SPARSE \"x.vmdk\"\n";
  h.replace(512, d.size(), d);
  ImageInfo i = detect_image(h, 65536);
  CHECK(i.format == "vmdk");
  CHECK(i.virtual_size == (1ull << 30));
  CHECK(i.subformat == "streamOptimized");
}

TEST_CASE("a VMDK text descriptor lists its extents and sums their sizes", "[image]") {
  std::string d =
      "# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\ncreateType=\"twoGbMaxExtentFlat\"\r\n\r\n"
      "# Extent description\r\nRW 4194304 FLAT \"disk-f001.vmdk\" 0\r\nRW 2048 FLAT \"disk-f002.vmdk\" 0\r\n"
      "\r\nddb.virtualHWVersion = \"4\"\r\n";
  ImageInfo i = detect_image(d, d.size());
  CHECK(i.format == "vmdk");
  CHECK(i.subformat == "twoGbMaxExtentFlat");
  CHECK(i.extents == std::vector<std::string>{"disk-f001.vmdk", "disk-f002.vmdk"});
  CHECK(i.virtual_size == (4194304ull + 2048) * 512);
}

TEST_CASE("anything else is raw, sized by the file", "[image]") {
  std::string h(512, 'x');
  ImageInfo i = detect_image(h, 10 << 20);
  CHECK(i.format == "raw");
  CHECK(i.virtual_size == (10u << 20));
  CHECK(detect_image("", 0).format == "raw");
  CHECK(detect_image("QFI", 3).format == "raw");  // too short to be a header
  CHECK(detect_image("# Disk DescriptorFile\nnothing here\n", 36).format == "raw");
}
