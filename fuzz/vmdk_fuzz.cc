// libFuzzer harness for the VMDK parser: sparse headers, footers, grain directories and tables,
// compressed grains, and descriptors (whose extent files are never opened: see backing_root).
#include "format/vmdk.h"
#include "mem_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace iofilterfs;
  fuzz::MemFile file(data, size);
  format::VmdkOptions o;
  o.path = "/nonexistent-fuzz-root/disk.vmdk";
  o.backing_root = "/nonexistent-fuzz-root";
  std::unique_ptr<format::Vmdk> v;
  std::string err;
  if (!format::Vmdk::open(&file, o, &v, &err).ok()) return 0;
  fuzz::exercise(*v, data, size);
  return 0;
}
