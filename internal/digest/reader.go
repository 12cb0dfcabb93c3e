package digest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
)

// File is a digest file as read.
type File struct {
	// Header is the file's; its Algorithm is the one its data records'
	// sums were made with.
	Header  Header
	Records []Record // sorted by offset, not overlapping
	// Complete says the file ends with its end record, whose totals
	// matched the records.
	Complete bool
	Totals   Totals
	// Size and SHA256 (hex) are the file's own.
	Size   int64
	SHA256 string
}

// Read reads and checks the digest file at path: header, records in
// order, data records within one block, and the end record's totals. A
// file without an end record is returned with Complete false; anything
// malformed is an error wrapping ErrFormat.
func Read(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	f, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("digest: %s: %w", path, err)
	}
	return f, nil
}

// Parse reads a digest file's bytes (see Read).
func Parse(b []byte) (*File, error) {
	h, n, err := parseHeader(b)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(b)
	f := &File{Header: h, Size: int64(len(b)), SHA256: hex.EncodeToString(sum[:])}
	sc := scanner{b: b, pos: n, block: int64(h.blockSize())}
	for {
		it, ok, err := sc.next()
		if err != nil {
			return nil, err
		}
		if !ok {
			return f, nil
		}
		if f.Complete {
			return nil, formatErr("a record at byte %d follows the end record", it.pos)
		}
		switch it.kind {
		case KindData, KindZero:
			f.Records = append(f.Records, it.rec)
			f.Totals.add(it.rec)
		case kindEnd:
			if it.totals != f.Totals {
				return nil, formatErr("the end record counts %+v, the records %+v", it.totals, f.Totals)
			}
			f.Complete = true
		}
	}
}

func parseHeader(b []byte) (Header, int, error) {
	if len(b) < headerFixedLen {
		return Header{}, 0, formatErr("%d bytes, too short for a header", len(b))
	}
	if string(b[:8]) != magic {
		return Header{}, 0, formatErr("bad magic %q", b[:8])
	}
	if v := binary.LittleEndian.Uint16(b[8:10]); v != version {
		return Header{}, 0, formatErr("version %d, this release reads %d", v, version)
	}
	var h Header
	if h.Algorithm = Algorithm(b[10]); !h.Algorithm.Known() {
		return Header{}, 0, formatErr("unknown digest algorithm byte %d (this release reads %d: %v, %d: %v)",
			b[10], SHA256, SHA256, BLAKE3, BLAKE3)
	}
	h.Overlay = b[11]&flagOverlay != 0
	h.BlockSize = int(binary.LittleEndian.Uint32(b[12:16]))
	h.Capacity = int64(binary.LittleEndian.Uint64(b[16:24]))
	n := int(binary.LittleEndian.Uint16(b[24:26]))
	if h.BlockSize <= 0 || h.Capacity < 0 || n == 0 || n > maxNameLength || len(b) < headerFixedLen+n {
		return Header{}, 0, formatErr("bad header (block size %d, capacity %d, name of %d bytes)", h.BlockSize, h.Capacity, n)
	}
	h.Image = string(b[headerFixedLen : headerFixedLen+n])
	return h, headerFixedLen + n, nil
}

// item is one record, mark or end as scanned, with its position.
type item struct {
	kind   byte
	pos    int // first byte
	end    int // just past it
	rec    Record
	mark   int64
	totals Totals
}

// scanner walks the records after the header, checking their order.
type scanner struct {
	b     []byte
	pos   int
	block int64
	last  int64 // end of the last record
}

// next returns the next item; false at the end of the bytes. A record cut
// short at the end is an error (Resume treats it as the end).
func (s *scanner) next() (item, bool, error) {
	if s.pos >= len(s.b) {
		return item{}, false, nil
	}
	it := item{kind: s.b[s.pos], pos: s.pos}
	need := 0
	switch it.kind {
	case KindData:
		need = dataLen
	case KindZero:
		need = zeroLen
	case kindMark:
		need = markLen
	case kindEnd:
		need = endLen
	default:
		return item{}, false, formatErr("unknown record kind %q at byte %d", it.kind, s.pos)
	}
	if len(s.b)-s.pos < need {
		return item{}, false, formatErr("record %q at byte %d cut short", it.kind, s.pos)
	}
	r := s.b[s.pos+1 : s.pos+need]
	le := binary.LittleEndian
	switch it.kind {
	case KindData:
		it.rec = Record{Kind: KindData, Offset: int64(le.Uint64(r)), Length: int64(le.Uint32(r[8:]))}
		copy(it.rec.Sum[:], r[12:])
		if it.rec.Length > s.block || (it.rec.Offset/s.block != (it.rec.End()-1)/s.block) {
			return item{}, false, formatErr("data record at byte %d (offset %d, %d bytes) crosses a %d-byte block", s.pos, it.rec.Offset, it.rec.Length, s.block)
		}
	case KindZero:
		it.rec = Record{Kind: KindZero, Offset: int64(le.Uint64(r)), Length: int64(le.Uint64(r[8:]))}
	case kindMark:
		it.mark = int64(le.Uint64(r))
	case kindEnd:
		it.totals = Totals{Records: int64(le.Uint64(r)), DataBytes: int64(le.Uint64(r[8:])), ZeroBytes: int64(le.Uint64(r[16:]))}
	}
	if it.kind == KindData || it.kind == KindZero {
		if it.rec.Offset < 0 || it.rec.Length <= 0 || it.rec.End() < it.rec.Offset {
			return item{}, false, formatErr("record at byte %d has offset %d and length %d", s.pos, it.rec.Offset, it.rec.Length)
		}
		if it.rec.Offset < s.last {
			return item{}, false, formatErr("record at byte %d (offset %d) overlaps or precedes the one before it (ending at %d)", s.pos, it.rec.Offset, s.last)
		}
		s.last = it.rec.End()
	}
	s.pos += need
	it.end = s.pos
	return it, true, nil
}

// sameHeader checks that a file's header is the one expected and returns
// it and its length. A want without an Algorithm takes the file's: the
// records kept and those to come are made alike. A want with another
// algorithm than the file's does not match.
func sameHeader(b []byte, want Header) (Header, int, error) {
	h, n, err := parseHeader(b)
	if err != nil {
		return Header{}, 0, err
	}
	if want.Algorithm == 0 {
		want.Algorithm = h.Algorithm
	}
	if want.Algorithm != h.Algorithm {
		return Header{}, 0, fmt.Errorf("digest: the file's records are %v digests, not %v", h.Algorithm, want.Algorithm)
	}
	enc, err := encodeHeader(want)
	if err != nil {
		return Header{}, 0, err
	}
	if !bytes.Equal(b[:n], enc) {
		return Header{}, 0, fmt.Errorf("digest: the file's header (%+v) is not this image's (%+v)", h, want)
	}
	return h, n, nil
}
