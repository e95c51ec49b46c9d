// The journal by reference (refmap.h): the copy-before-write bookkeeping driven through fixed
// interleavings of a writer and the shipper over a byte image, a byte journal and a replica,
// and the record format of by-reference Write records and Preserve records.
#include <catch2/catch.hpp>

#include <cstring>
#include <string>
#include <vector>

#include "replicate/journal.h"
#include "replicate/refmap.h"

using namespace iofilterfs::replicate;

namespace {

// The filter's moves, by hand: an image, a journal of preserved bytes, a replica.
struct Model {
  std::string image = std::string(16, '.'), replica = std::string(16, '.'), journal;
  RefMap refs;
  uint64_t seq = 0;

  // A by-reference write: copy-before-write for what unshipped records still reference, the
  // record, then (land=true) the image write.
  uint64_t write(uint64_t off, const std::string& data, bool land = true) {
    std::vector<Span> spans;
    refs.referenced(off, data.size(), &spans);
    std::vector<std::pair<Span, uint64_t>> kept;
    for (const Span& s : spans) {
      kept.emplace_back(s, journal.size());
      journal += image.substr(s.off, s.len);  // the Preserve record's bytes
    }
    const uint64_t me = ++seq;
    refs.add(me, off, data.size());
    for (auto& [s, at] : kept) refs.attach(s.seq, Piece{s.off, s.len, at});
    if (land) finish(me, off, data);
    return me;
  }
  void finish(uint64_t me, uint64_t off, const std::string& data) {
    image.replace(off, data.size(), data);
    refs.landed(me);
  }
  // The shipper's first half: the known pieces, the rest copied from the image.
  std::vector<Piece> start(uint64_t s) {
    std::vector<Piece> known;
    refs.pieces(s, &known);
    return known;
  }
  void copy_gaps(uint64_t off, uint64_t len, const std::vector<Piece>& known) {
    for (auto [a, n] : gaps(off, len, known)) replica.replace(a, n, image.substr(a, n));
  }
  void end(uint64_t s) {
    std::vector<Piece> all;
    refs.shipped(s, &all);
    for (const Piece& p : all) replica.replace(p.off, p.len, journal.substr(p.at, p.len));
  }
  void ship(uint64_t off, uint64_t len, uint64_t s) {
    REQUIRE(refs.is_landed(s));
    auto known = start(s);
    copy_gaps(off, len, known);
    end(s);
  }
};

}  // namespace

TEST_CASE("journal by reference: an overlapping write before the ship preserves the older record's bytes",
          "[replicate][journal]") {
  Model m;
  const uint64_t r1 = m.write(0, "AAAAAAAA");
  const uint64_t w2 = m.write(4, "BBBBBBBB");  // over [4,8) of R1, not shipped yet
  CHECK(m.image == "AAAABBBBBBBB....");
  CHECK(m.journal == "AAAA");  // R1's old bytes, copied before W2 wrote
  std::vector<Span> spans;
  m.refs.referenced(0, 16, &spans);
  REQUIRE(spans.size() == 2);
  CHECK((spans[0].off == 0 && spans[0].len == 4 && spans[0].seq == r1));
  CHECK((spans[1].off == 4 && spans[1].len == 8 && spans[1].seq == w2));

  m.ship(0, 8, r1);
  CHECK(m.replica == "AAAAAAAA........");  // R1's state, not W2's bytes
  m.ship(4, 8, w2);
  CHECK(m.replica == "AAAABBBBBBBB....");
  CHECK(m.refs.records() == 2);  // until the target flushed them and the ship point passed them
  m.refs.forget_before(w2 + 1);
  CHECK(m.refs.records() == 0);
  CHECK(m.refs.extents() == 0);
}

TEST_CASE("journal by reference: a write that lands while the shipper copies the older record is undone by its piece",
          "[replicate][journal]") {
  Model m;
  const uint64_t r1 = m.write(0, "AAAAAAAA");
  auto known = m.start(r1);  // the shipper looks: no pieces yet
  CHECK(known.empty());
  const uint64_t w2 = m.write(2, "BB");  // preserves [2,4) for R1, then writes the image
  m.copy_gaps(0, 8, known);               // the copy reads W2's bytes at [2,4)
  CHECK(m.replica == "AABBAAAA........");
  m.end(r1);  // the piece attached meanwhile is among the final ones: R1's bytes win
  CHECK(m.replica == "AAAAAAAA........");
  m.ship(2, 2, w2);
  CHECK(m.replica == "AABBAAAA........");
}

TEST_CASE("journal by reference: a record is not shipped before its image write lands, chains of overwrites",
          "[replicate][journal]") {
  Model m;
  const uint64_t r1 = m.write(0, "AAAA");
  const uint64_t w2 = m.write(0, "BBBB", false);  // committed, image write still on its way
  CHECK_FALSE(m.refs.is_landed(w2));
  CHECK(m.refs.is_landed(r1));
  m.finish(w2, 0, "BBBB");
  const uint64_t w3 = m.write(2, "CCCCCC");  // over W2 (which owns [0,4) now), not R1
  CHECK(m.journal == "AAAABB");              // R1's [0,4), then W2's [2,4)
  m.ship(0, 4, r1);
  CHECK(m.replica == "AAAA............");
  m.ship(0, 4, w2);
  CHECK(m.replica == "BBBB............");
  m.ship(2, 6, w3);
  CHECK(m.replica == "BBCCCCCC........");
  CHECK(m.replica == m.image);
}

TEST_CASE("journal by reference: shipped records are shipped again after a rewind until forgotten, drop ends references",
          "[replicate][journal]") {
  Model m;
  const uint64_t r1 = m.write(0, "AAAA");
  m.ship(0, 4, r1);
  const uint64_t w2 = m.write(0, "BB");  // R1 is shipped but not flushed: still preserved for
  CHECK(m.journal == "AA");
  m.replica = std::string(16, '.');  // the target lost what was not flushed: ship again
  m.ship(0, 4, r1);
  CHECK(m.replica == "AAAA............");
  m.ship(0, 2, w2);
  CHECK(m.replica == "BBAA............");
  m.refs.forget_before(w2);  // R1 flushed and past the ship point: no more preserving for it
  std::vector<Span> sp;
  m.refs.referenced(0, 16, &sp);
  REQUIRE(sp.size() == 1);
  CHECK((sp[0].off == 0 && sp[0].len == 2 && sp[0].seq == w2));

  RefMap refs;
  refs.add(1, 0, 100, true);
  std::vector<Piece> out;
  refs.forget_before(2);
  CHECK_FALSE(refs.attach(1, Piece{0, 10, 0}));
  refs.add(2, 0, 100, true);
  refs.add(3, 200, 100, true);
  refs.drop(50, 200);
  std::vector<Span> spans;
  refs.referenced(0, 1000, &spans);
  REQUIRE(spans.size() == 2);
  CHECK((spans[0].off == 0 && spans[0].len == 50 && spans[0].seq == 2));
  CHECK((spans[1].off == 250 && spans[1].len == 50 && spans[1].seq == 3));
  // forgetting ends only the forgotten records' references.
  refs.add(4, 20, 10, true);
  refs.forget_before(3);
  spans.clear();
  refs.referenced(0, 1000, &spans);
  REQUIRE(spans.size() == 2);
  CHECK((spans[0].off == 20 && spans[0].len == 10 && spans[0].seq == 4));
  CHECK(gaps(0, 10, {Piece{2, 2, 0}, Piece{6, 4, 0}}) == std::vector<std::pair<uint64_t, uint64_t>>{{0, 2}, {4, 2}});
  CHECK(gaps(0, 4, {Piece{0, 4, 0}}).empty());
}

TEST_CASE("journal by reference: the record ring keeps sequence order across growth, wrap-around, forgetting and an out-of-order add",
          "[replicate][journal]") {
  RefMap refs;
  // Records 1..300 (sequence numbers with gaps, as Preserve records take some), each owning
  // its own 10 bytes; the ring grows from 64 slots while it wraps, since the front is forgotten
  // on the way.
  uint64_t seq = 0;
  std::vector<uint64_t> seqs;
  for (int i = 0; i < 300; ++i) {
    seq += 1 + i % 3;
    seqs.push_back(seq);
    refs.add(seq, static_cast<uint64_t>(i) * 10, 10, i % 2 == 0);
    if (i % 50 == 49) refs.forget_before(seqs[static_cast<size_t>(i) - 20]);
  }
  CHECK(refs.records() == 20 + 1);  // the last forget kept the last 21 (i = 279..299)
  CHECK(refs.extents() == 21);
  for (size_t i = 0; i < seqs.size(); ++i) {
    INFO("record " << i << " seq " << seqs[i]);
    const bool kept = i >= 279;
    CHECK(refs.attach(seqs[i], Piece{i * 10, 1, i}) == kept);
    // A forgotten record counts as landed (the shipper never waits for it).
    CHECK(refs.is_landed(seqs[i]) == (!kept || i % 2 == 0));
  }
  std::vector<Piece> ps;
  refs.pieces(seqs[290], &ps);
  REQUIRE(ps.size() == 1);
  CHECK((ps[0].off == 2900 && ps[0].at == 290));
  // A record added out of order still lands at its place: found, and forgotten with its elders.
  refs.add(seqs[279] + 1, 5000, 10, true);
  CHECK(refs.records() == 22);
  CHECK(refs.attach(seqs[279] + 1, Piece{5000, 1, 0}));
  refs.forget_before(seqs[280]);
  CHECK(refs.records() == 20);
  CHECK_FALSE(refs.attach(seqs[279] + 1, Piece{5000, 1, 0}));
  std::vector<Span> spans;
  refs.referenced(5000, 10, &spans);
  CHECK(spans.empty());
  // landed() of a record that is not there changes nothing; clear() empties everything.
  refs.landed(1);
  refs.clear();
  CHECK(refs.records() == 0);
  CHECK(refs.extents() == 0);
  CHECK(refs.is_landed(seqs.back()));
  refs.add(seq + 1, 0, 4, false);
  CHECK_FALSE(refs.is_landed(seq + 1));
  refs.landed(seq + 1);
  CHECK(refs.is_landed(seq + 1));
}

TEST_CASE("journal by reference: extent nodes come from a free list that a burst leaves trimmed", "[replicate][journal]") {
  NodePool pool;
  void* a = pool.get(48);
  void* b = pool.get(48);
  pool.put(a, 48);
  CHECK(pool.spare() == 1);
  CHECK(pool.get(48) == a);  // reused, not allocated
  CHECK(pool.spare() == 0);
  void* other = pool.get(16);  // another size: not pooled
  pool.put(other, 16);
  CHECK(pool.spare() == 0);
  pool.put(a, 48);
  pool.put(b, 48);
  CHECK(pool.spare() == 2);
  pool.trim(1);
  CHECK(pool.spare() == 1);

  // Through the map: 5000 disjoint extents, then all forgotten: the spares are cut back.
  RefMap refs;
  for (uint64_t s = 1; s <= 5000; ++s) refs.add(s, s * 100, 10, true);
  CHECK(refs.extents() == 5000);
  refs.forget_before(5001);
  CHECK(refs.extents() == 0);
  CHECK(refs.records() == 0);
}

TEST_CASE("journal by reference: record format of by-reference writes and preserved bytes", "[replicate][journal]") {
  RecordHeader h;
  make_record(&h, RecType::Write, 5, 0, 4096, 1 << 20, nullptr, 0, kByRef);
  CHECK(check_record(h, nullptr, 5) == "");
  make_record(&h, RecType::Write, 5, 0, 4096, 1 << 20, nullptr, 0);
  CHECK(check_record(h, nullptr, 5) == "write record length mismatch");
  std::string data(8, '\0');
  const uint64_t owner = 3;
  std::memcpy(data.data(), &owner, 8);
  data += "old!";
  make_record(&h, RecType::Preserve, 6, 0, 100, 4, data.data(), static_cast<uint32_t>(data.size()));
  CHECK(check_record(h, data.data(), 6) == "");
  make_record(&h, RecType::Preserve, 6, 0, 100, 5, data.data(), static_cast<uint32_t>(data.size()));
  CHECK(check_record(h, data.data(), 6) == "preserve record length mismatch");
}
