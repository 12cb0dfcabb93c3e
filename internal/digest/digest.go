// Package digest records what a backup wrote into a QCOW2 image, block by
// block, in a digest file beside the image (<image>.digests), so that a
// restore point's data can be proven later by reading it again
// (internal/verify).
//
// A digest file is a header and a sequence of records, sorted by offset
// and not overlapping:
//
//   - a data record is the digest of a range the copier read from the
//     source and wrote: at most BlockSize bytes, never across a multiple
//     of BlockSize on the disk (a 2 MiB write makes two records). The
//     header names the file's algorithm: BLAKE3-256 for files written
//     now, SHA-256 for files written before (still read and checked);
//   - a zero record is a range of any length that the image reads as
//     zeros: written as NBD zeroes on an overlay, skipped on a fresh image,
//     read as all-zero or reported as a hole by the source's block status.
//     A zero record holds no digest, so any part of it can be checked;
//   - a mark says that every record below its offset is in the file and
//     that the image holds that data durably (written after the copier's
//     FLUSH, before its resume point advances): a retried transfer keeps
//     the records below its resume point and carries on;
//   - an end record closes a complete file, with the count of records and
//     bytes it covers.
//
// Ranges of the disk that the backup did not copy have no record. The
// file's own SHA-256 (always SHA-256, whatever its records' algorithm) and
// size are recorded in the catalog with the image.
//
// The encoding is binary, little-endian:
//
//	header: "CBTFDGST" | version u16 (1) |
//	        algorithm u8 (1: SHA-256, 2: BLAKE3-256) |
//	        flags u8 (1: overlay) | block size u32 | capacity u64 |
//	        name length u16 | image file name
//	'D' offset u64 | length u32 | digest [32] (the header's algorithm)
//	'Z' offset u64 | length u64
//	'M' offset u64
//	'E' records u64 | data bytes u64 | zero bytes u64
//
// The package knows nothing of Temporal, of NBD or of the catalog.
package digest

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"

	"github.com/zeebo/blake3"
)

// BlockSize is the largest range one data record covers, and its
// alignment on the disk.
const BlockSize = 1 << 20

// Suffix is appended to an image's path to name its digest file.
const Suffix = ".digests"

// PathOf returns the digest file of the image at imagePath.
func PathOf(imagePath string) string { return imagePath + Suffix }

const (
	magic          = "CBTFDGST"
	version        = 1
	flagOverlay    = 1
	maxNameLength  = 1024
	headerFixedLen = 8 + 2 + 1 + 1 + 4 + 8 + 2
)

// Record kinds.
const (
	KindData = 'D'
	KindZero = 'Z'
	kindMark = 'M'
	kindEnd  = 'E'
)

const (
	dataLen = 1 + 8 + 4 + SumSize
	zeroLen = 1 + 8 + 8
	markLen = 1 + 8
	endLen  = 1 + 8 + 8 + 8
)

// SumSize is the length of a data record's digest, for every algorithm.
const SumSize = 32

// Algorithm is the hash of a digest file's data records, its header's
// algorithm byte.
type Algorithm uint8

// The algorithms a digest file's records are made with. The zero
// Algorithm is none: a Header without one is written with Default.
const (
	SHA256 Algorithm = 1 // SHA-256, the files written before BLAKE3
	BLAKE3 Algorithm = 2 // BLAKE3 with a 256-bit output

	// Default is the algorithm of files written now.
	Default = BLAKE3
)

// Known reports whether a is an algorithm this release reads and writes.
func (a Algorithm) Known() bool { return a == SHA256 || a == BLAKE3 }

// String names the algorithm: "SHA-256", "BLAKE3".
func (a Algorithm) String() string {
	switch a {
	case SHA256:
		return "SHA-256"
	case BLAKE3:
		return "BLAKE3"
	}
	return fmt.Sprintf("digest algorithm %d", uint8(a))
}

// Sum returns the digest of b. It panics for an algorithm that is not
// Known (a Header or File's algorithm always is).
func (a Algorithm) Sum(b []byte) [SumSize]byte {
	switch a {
	case SHA256:
		return sha256.Sum256(b)
	case BLAKE3:
		return blake3.Sum256(b)
	}
	panic(fmt.Sprintf("digest: Sum with unknown %v", a))
}

// New returns a hash that computes the digest Sum returns, for data
// written in pieces. It panics for an algorithm that is not Known.
func (a Algorithm) New() hash.Hash {
	switch a {
	case SHA256:
		return sha256.New()
	case BLAKE3:
		return blake3.New()
	}
	panic(fmt.Sprintf("digest: New with unknown %v", a))
}

// Header describes the image a digest file belongs to.
type Header struct {
	// Image is the image's file name (no folder): <backup id>.qcow2.
	Image string
	// Capacity is the disk's size in bytes.
	Capacity int64
	// Overlay says the image builds on a backing file.
	Overlay bool
	// BlockSize is the data records' largest length and alignment;
	// BlockSize when zero.
	BlockSize int
	// Algorithm is the data records' hash. Create writes Default when it
	// is zero; Resume then keeps the file's. Read and Parse return the
	// file's.
	Algorithm Algorithm
}

func (h Header) algorithm() Algorithm {
	if h.Algorithm == 0 {
		return Default
	}
	return h.Algorithm
}

func (h Header) blockSize() int {
	if h.BlockSize <= 0 {
		return BlockSize
	}
	return h.BlockSize
}

// Record is one range of the disk the image holds as the backup wrote it.
type Record struct {
	Kind   byte // KindData or KindZero
	Offset int64
	Length int64
	// Sum is the digest of the range's bytes (data records only), made
	// with the algorithm of the digest file it is in.
	Sum [SumSize]byte
}

// End returns the offset just past the record.
func (r Record) End() int64 { return r.Offset + r.Length }

// Data returns the data record of b, read from the disk at off, with its
// digest made by a (the algorithm of the file it is for).
func Data(a Algorithm, off int64, b []byte) Record {
	return Record{Kind: KindData, Offset: off, Length: int64(len(b)), Sum: a.Sum(b)}
}

// Zero returns the zero record of n bytes at off.
func Zero(off, n int64) Record { return Record{Kind: KindZero, Offset: off, Length: n} }

// ErrFormat is wrapped by errors about a digest file that cannot be read
// as one: bad magic, unknown version, a truncated or malformed record.
var ErrFormat = errors.New("digest: malformed digest file")

func formatErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(format, args...))
}

func encodeHeader(h Header) ([]byte, error) {
	if len(h.Image) == 0 || len(h.Image) > maxNameLength {
		return nil, fmt.Errorf("digest: image name of %d bytes", len(h.Image))
	}
	if a := h.algorithm(); !a.Known() {
		return nil, fmt.Errorf("digest: unknown algorithm byte %d", uint8(a))
	}
	b := make([]byte, 0, headerFixedLen+len(h.Image))
	b = append(b, magic...)
	b = binary.LittleEndian.AppendUint16(b, version)
	b = append(b, byte(h.algorithm()))
	var flags byte
	if h.Overlay {
		flags |= flagOverlay
	}
	b = append(b, flags)
	b = binary.LittleEndian.AppendUint32(b, uint32(h.blockSize()))
	b = binary.LittleEndian.AppendUint64(b, uint64(h.Capacity))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(h.Image)))
	return append(b, h.Image...), nil
}

func appendRecord(b []byte, r Record) []byte {
	b = append(b, r.Kind)
	b = binary.LittleEndian.AppendUint64(b, uint64(r.Offset))
	if r.Kind == KindData {
		b = binary.LittleEndian.AppendUint32(b, uint32(r.Length))
		return append(b, r.Sum[:]...)
	}
	return binary.LittleEndian.AppendUint64(b, uint64(r.Length))
}

func appendMark(b []byte, off int64) []byte {
	b = append(b, kindMark)
	return binary.LittleEndian.AppendUint64(b, uint64(off))
}

// Totals count what a digest file covers.
type Totals struct {
	Records   int64
	DataBytes int64
	ZeroBytes int64
}

func (t *Totals) add(r Record) {
	t.Records++
	if r.Kind == KindData {
		t.DataBytes += r.Length
	} else {
		t.ZeroBytes += r.Length
	}
}

func appendEnd(b []byte, t Totals) []byte {
	b = append(b, kindEnd)
	b = binary.LittleEndian.AppendUint64(b, uint64(t.Records))
	b = binary.LittleEndian.AppendUint64(b, uint64(t.DataBytes))
	return binary.LittleEndian.AppendUint64(b, uint64(t.ZeroBytes))
}
