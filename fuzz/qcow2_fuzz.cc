// libFuzzer harness for the qcow2 parser: header, extensions, L1/L2/refcount walks, compressed
// clusters, and the write path's allocation over whatever the input claims.
#include "format/qcow2.h"
#include "mem_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace iofilterfs;
  fuzz::MemFile file(data, size);
  format::Qcow2Options o;
  o.backing_root = "/nonexistent-fuzz-root";  // no backing file is ever opened
  std::unique_ptr<format::Qcow2> q;
  std::string err;
  if (!format::Qcow2::open(&file, o, &q, &err).ok()) return 0;
  fuzz::exercise(*q, data, size);
  return 0;
}
