// Package qcow2 knows the QCOW2 format without qemu, for the two things
// a backup does most often with it:
//
//   - it creates the repository's empty images (Create, Make,
//     MakeOverlay), byte for byte as qemu-img create makes them with
//     qemu.ImageOptions, its zeros left as holes and no process started;
//   - it reads where an image holds its disk's data, from its own
//     metadata (its header, L1 table and L2 tables): what `qemu-img map`
//     of the image alone says, read in one pass over the L2 tables the
//     image has. The cost is the image's tables, not its disk's size: an
//     empty 2 TiB overlay is its header and its L1 table.
//
// It reads the images cbtflow writes (QCOW2 version 2 or 3, 64 KiB or
// 2 MiB clusters, with or without extended L2 entries) and refuses,
// with ErrUnsupported, anything it does not fully understand: encryption,
// an external data file, compressed clusters, a header marked corrupt or
// dirty, an invalid entry. A caller then asks qemu-img, which decides.
package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/sparse"
)

// ErrUnsupported is wrapped when the image is one MapLayer does not read.
var ErrUnsupported = errors.New("qcow2: not an image this reader understands")

const (
	incompatDirty      = 1 << 0
	incompatCorrupt    = 1 << 1
	incompatDataFile   = 1 << 2
	incompatCompress   = 1 << 3
	incompatExtendedL2 = 1 << 4

	offsetMask     = 0x00fffffffffffe00 // bits 9-55: a host offset
	flagCompressed = 1 << 62
	flagZero       = 1 << 0 // standard L2 entries: the cluster reads as zeros
)

// header is what MapLayer and Check need of a QCOW2 header.
type header struct {
	version     uint32
	clusterBits uint32
	size        uint64 // the disk's size
	l1Size      uint32
	l1Offset    uint64
	extendedL2  bool

	refcountOrder  uint32 // refcounts of 1<<order bits
	rtOffset       uint64 // the refcount table
	rtClusters     uint32
	backingOffset  uint64 // the backing file's name, 0 without one
	backingSize    uint32
	backingFormat  string // the backing format extension's, "" without one
	snapshotOffset uint64
}

func unsupported(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsupported, fmt.Sprintf(format, a...))
}

// Header extensions this reader knows to change nothing of the mapping.
const (
	extEnd           = 0
	extBackingFormat = 0xe2792aca
	extFeatureNames  = 0x6803f857
)

// maxExtents bounds the mapping of one image (about 100 MiB of extents):
// a crafted image whose L1 entries all name one fragmented L2 table must
// not take the worker's memory.
const maxExtents = 1 << 21

// maxSize bounds the disk sizes read (qemu's own limit for QCOW2 is
// lower still): every offset of the disk fits an int64 with room.
const maxSize = 1 << 56

func readHeader(f *os.File) (header, error) {
	var b [4096]byte
	n, err := f.ReadAt(b[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return header{}, err
	}
	if n < 72 {
		return header{}, unsupported("%s is too short for a QCOW2 header", f.Name())
	}
	be := binary.BigEndian
	if string(b[:4]) != "QFI\xfb" {
		return header{}, unsupported("%s has no QCOW2 magic", f.Name())
	}
	h := header{clusterBits: be.Uint32(b[20:24]), size: be.Uint64(b[24:32]), l1Size: be.Uint32(b[36:40]),
		l1Offset: be.Uint64(b[40:48]), version: be.Uint32(b[4:8]),
		refcountOrder: 4, rtOffset: be.Uint64(b[48:56]), rtClusters: be.Uint32(b[56:60]),
		backingOffset: be.Uint64(b[8:16]), backingSize: be.Uint32(b[16:20]), snapshotOffset: be.Uint64(b[64:72])}
	if h.clusterBits < 9 || h.clusterBits > 21 {
		return header{}, unsupported("%s: cluster bits %d", f.Name(), h.clusterBits)
	}
	cluster := uint64(1) << h.clusterBits
	headerLength := uint64(72)
	switch h.version {
	case 2:
	case 3:
		headerLength = uint64(be.Uint32(b[100:104]))
		if n < 104 || headerLength < 104 || headerLength > uint64(n) || headerLength%8 != 0 {
			return header{}, unsupported("%s: version 3 header of %d bytes", f.Name(), headerLength)
		}
		incompat := be.Uint64(b[72:80])
		if incompat&^(incompatCompress|incompatExtendedL2) != 0 {
			return header{}, unsupported("%s: incompatible features %#x", f.Name(), incompat)
		}
		h.extendedL2 = incompat&incompatExtendedL2 != 0
		// qemu refuses to open an image whose compression type is
		// unknown, or disagrees with the compression feature bit; and
		// one that says its data file is raw without a data file.
		var ctype byte
		if headerLength > 104 {
			ctype = b[104]
		}
		if ctype > 1 || (ctype != 0) != (incompat&incompatCompress != 0) {
			return header{}, unsupported("%s: compression type %d with incompatible features %#x", f.Name(), ctype, incompat)
		}
		if autoclear := be.Uint64(b[88:96]); autoclear != 0 {
			return header{}, unsupported("%s: autoclear features %#x", f.Name(), autoclear)
		}
		if h.refcountOrder = be.Uint32(b[96:100]); h.refcountOrder > 6 {
			return header{}, unsupported("%s: refcount order %d", f.Name(), h.refcountOrder)
		}
	default:
		return header{}, unsupported("%s: QCOW2 version %d", f.Name(), h.version)
	}
	if crypt := be.Uint32(b[32:36]); crypt != 0 {
		return header{}, unsupported("%s: encrypted (method %d)", f.Name(), crypt)
	}
	if snapshots := be.Uint32(b[60:64]); snapshots != 0 {
		return header{}, unsupported("%s: %d internal snapshots", f.Name(), snapshots)
	}
	if h.size%512 != 0 || h.size > maxSize {
		return header{}, unsupported("%s: a disk of %d bytes", f.Name(), h.size)
	}
	if h.extendedL2 && h.clusterBits < 14 {
		return header{}, unsupported("%s: extended L2 entries with cluster bits %d", f.Name(), h.clusterBits)
	}
	// Offsets past what an entry can name (qemu's offset masks) are not
	// read: they would not fit an int64.
	if h.l1Offset%cluster != 0 || h.l1Offset > maxSize {
		return header{}, unsupported("%s: L1 table at %d, not on a cluster", f.Name(), h.l1Offset)
	}
	if rt := be.Uint64(b[48:56]); rt == 0 || rt%cluster != 0 || rt > maxSize {
		return header{}, unsupported("%s: refcount table at %d, not on a cluster", f.Name(), rt)
	}
	// qemu's limits: a refcount table of at most 8 MiB, a backing file
	// name of at most 1023 bytes.
	if uint64(h.rtClusters) > 8<<20>>h.clusterBits {
		return header{}, unsupported("%s: a refcount table of %d clusters", f.Name(), h.rtClusters)
	}
	if h.backingOffset != 0 && (h.backingSize > 1023 || h.backingOffset+uint64(h.backingSize) > cluster) {
		return header{}, unsupported("%s: a backing file name of %d bytes", f.Name(), h.backingSize)
	}
	// Header extensions, up to the end marker, within the header's
	// cluster and before the backing file's name: only those known to
	// say nothing of the mapping.
	end := min(uint64(n), cluster)
	if bfo := be.Uint64(b[8:16]); bfo != 0 {
		end = min(end, bfo)
	}
	for at := headerLength; ; {
		if at+8 > end {
			return header{}, unsupported("%s: header extensions run past %d", f.Name(), end)
		}
		typ, length := be.Uint32(b[at:]), uint64(be.Uint32(b[at+4:]))
		if typ == extEnd {
			// qemu checks the length of every extension, the end's too.
			if length != 0 {
				return header{}, unsupported("%s: header extension end of %d bytes", f.Name(), length)
			}
			break
		}
		if typ != extBackingFormat && typ != extFeatureNames {
			return header{}, unsupported("%s: header extension %#x", f.Name(), typ)
		}
		if typ == extBackingFormat {
			// qemu refuses a name of 16 bytes or more.
			if length >= 16 || at+8+length > end {
				return header{}, unsupported("%s: a backing format of %d bytes", f.Name(), length)
			}
			h.backingFormat = string(b[at+8 : at+8+length])
		}
		at += 8 + (length+7)/8*8
		if at > end {
			return header{}, unsupported("%s: header extension %#x of %d bytes runs past %d", f.Name(), typ, length, end)
		}
	}
	// The L1 table must map the whole disk and no more than qemu allows
	// (32 MiB of entries).
	entryBytes := uint64(8)
	if h.extendedL2 {
		entryBytes = 16
	}
	perL2 := (uint64(1) << h.clusterBits) / entryBytes
	perL1 := perL2 << h.clusterBits // disk bytes one L1 entry maps
	need := (h.size + perL1 - 1) / perL1
	if uint64(h.l1Size) < need || h.l1Size > 32<<20/8 {
		return header{}, unsupported("%s: L1 table of %d entries for a disk of %d bytes", f.Name(), h.l1Size, h.size)
	}
	return h, nil
}

// MapLayer returns the mapping of the QCOW2 image open as f alone (its
// backing file not opened), as qemu.MapLayer returns qemu-img's: every
// range of the disk, in order, either data at an offset of the file
// (Data, HasOffset, Present), zeros the image says it reads (Zero,
// Present), or a range it does not hold (Zero, not Present: without a
// backing file it reads zeros). Adjacent ranges of one kind are merged
// (data only where their offsets follow each other). An image it does not
// understand gives an error wrapping ErrUnsupported.
func MapLayer(f *os.File) ([]qemu.MapExtent, error) {
	h, err := readHeader(f)
	if err != nil {
		return nil, err
	}
	cluster := int64(1) << h.clusterBits
	entryBytes := int64(8)
	if h.extendedL2 {
		entryBytes = 16
	}
	perL2 := cluster / entryBytes
	l2Span := perL2 * cluster // disk bytes an L2 table maps
	size := int64(h.size)
	m := &mapper{size: size}

	l1, err := readL1(f, h)
	if err != nil {
		return nil, err
	}
	// The tables are read one after the other; the kernel reads them all
	// at once when asked first (they are not in the page cache after a
	// writer that bypassed it, qemu-nbd's O_DIRECT).
	for i := int64(0); i*l2Span < size; i++ {
		if off := int64(binary.BigEndian.Uint64(l1[i*8:]) & offsetMask); off != 0 {
			_ = unix.Fadvise(int(f.Fd()), off, cluster, unix.FADV_WILLNEED)
		}
	}
	buf := make([]byte, dataPiece)
	for i := int64(0); i*l2Span < size; i++ {
		start := i * l2Span
		l2Offset := int64(binary.BigEndian.Uint64(l1[i*8:]) & offsetMask)
		if l2Offset == 0 {
			m.add(start, l2Span, kindAbsent, 0)
			continue
		}
		if l2Offset%cluster != 0 {
			return nil, unsupported("%s: L2 table at %d, not on a cluster", f.Name(), l2Offset)
		}
		// Only the table's data is read: its holes (never written, or
		// zeros a compaction freed) are empty entries, as are its pages
		// of zeros.
		next := int64(0) // the first entry not yet mapped
		absentTo := func(j int64) {
			if j > next {
				m.add(start+next*cluster, (j-next)*cluster, kindAbsent, 0)
				next = j
			}
		}
		err := dataPieces(f, buf, l2Offset, cluster, func(rel int64, b []byte) error {
			if len(m.out) > maxExtents {
				return unsupported("%s: more than %d extents", f.Name(), maxExtents)
			}
			for at := int64(0); at < int64(len(b)); at += 4096 {
				page := b[at:min(int64(len(b)), at+4096)]
				if sparse.IsZero(page) {
					continue
				}
				for k := int64(0); k < int64(len(page)); k += entryBytes {
					if emptyEntry(page[k : k+entryBytes]) {
						// Absent, as a run of them up to the next entry
						// that is not (absentTo) maps it: a page of a
						// large disk's table holds a few entries of its
						// scattered writes among hundreds of empty ones.
						continue
					}
					j := (rel + at + k) / entryBytes
					if start+j*cluster >= size {
						return nil
					}
					absentTo(j)
					if err := m.entry(f.Name(), h, page[k:k+entryBytes], start+j*cluster, cluster); err != nil {
						return err
					}
					next = j + 1
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		absentTo(perL2)
	}
	return m.out, nil
}

// emptyEntry reports whether b, an L2 entry of 8 or 16 bytes, is all
// zero: no cluster, no flag, no subcluster (an absent cluster in either
// format).
func emptyEntry(b []byte) bool {
	if binary.BigEndian.Uint64(b) != 0 {
		return false
	}
	return len(b) < 16 || binary.BigEndian.Uint64(b[8:]) == 0
}

// l2Entry is one L2 entry, decoded.
type l2Entry struct {
	raw         uint64
	host        int64 // the cluster's offset in the file, 0 if none
	zeroFlag    bool  // a standard entry's: the cluster reads as zeros
	alloc, zero uint32
}

// decodeL2 decodes the L2 entry b of the cluster at disk offset at, and
// refuses (ErrUnsupported) one this package does not read or that is
// malformed: a compressed cluster, an offset not on a cluster, the zero
// flag where the image's format has none, an invalid subcluster bitmap.
func decodeL2(name string, h header, b []byte, at, cluster int64) (l2Entry, error) {
	e := l2Entry{raw: binary.BigEndian.Uint64(b)}
	if e.raw&flagCompressed != 0 {
		return e, unsupported("%s: a compressed cluster at disk offset %d", name, at)
	}
	e.host = int64(e.raw & offsetMask)
	if e.host%cluster != 0 {
		return e, unsupported("%s: a cluster at %d, not on a cluster", name, e.host)
	}
	e.zeroFlag = e.raw&flagZero != 0
	if !h.extendedL2 {
		if e.zeroFlag && h.version < 3 {
			return e, unsupported("%s: the zero flag in a version %d image at disk offset %d", name, h.version, at)
		}
		return e, nil
	}
	if e.zeroFlag {
		return e, unsupported("%s: the zero flag in an extended L2 entry at disk offset %d", name, at)
	}
	bitmap := binary.BigEndian.Uint64(b[8:])
	e.alloc, e.zero = uint32(bitmap), uint32(bitmap>>32)
	if e.host == 0 && e.alloc != 0 || e.alloc&e.zero != 0 {
		return e, unsupported("%s: an invalid subcluster bitmap %#x at disk offset %d", name, bitmap, at)
	}
	return e, nil
}

// readL1 reads the L1 table of the image open as f, whose header is h.
func readL1(f *os.File, h header) ([]byte, error) {
	l1 := make([]byte, int64(h.l1Size)*8)
	if _, err := f.ReadAt(l1, int64(h.l1Offset)); err != nil {
		return nil, fmt.Errorf("qcow2: %s: L1 table: %w", f.Name(), err)
	}
	return l1, nil
}

// entry maps the cluster at disk offset at from its L2 entry b.
func (m *mapper) entry(name string, h header, b []byte, at, cluster int64) error {
	e, err := decodeL2(name, h, b, at, cluster)
	if err != nil {
		return err
	}
	host, alloc, zero := e.host, e.alloc, e.zero
	if !h.extendedL2 {
		switch {
		case e.zeroFlag:
			m.add(at, cluster, kindZero, 0)
		case host == 0:
			m.add(at, cluster, kindAbsent, 0)
		default:
			m.add(at, cluster, kindData, host)
		}
		return nil
	}
	// Whole clusters of one kind at once: most of a large disk's
	// entries are empty.
	switch {
	case alloc == 0 && zero == 0:
		m.add(at, cluster, kindAbsent, 0)
		return nil
	case zero == ^uint32(0):
		m.add(at, cluster, kindZero, 0)
		return nil
	case alloc == ^uint32(0):
		m.add(at, cluster, kindData, host)
		return nil
	}
	sub := cluster / 32
	for k := int64(0); k < 32; k++ {
		switch {
		case alloc&(1<<k) != 0:
			m.add(at+k*sub, sub, kindData, host+k*sub)
		case zero&(1<<k) != 0:
			m.add(at+k*sub, sub, kindZero, 0)
		default:
			m.add(at+k*sub, sub, kindAbsent, 0)
		}
	}
	return nil
}

// dataPiece is the most of a table dataPieces calls fn with at once.
const dataPiece = 64 << 10

// dataPieces calls fn with the bytes of [off, off+n) of f the file
// stores, in order, in pieces of at most dataPiece (of buf, which holds
// at least that) starting on 4 KiB from off (rel: the piece's offset from
// off): the holes between them (never written, or zeros a compaction
// freed) read as zeros, so a caller takes them as empty entries without
// reading them. off is on a cluster, so on 4 KiB.
func dataPieces(f *os.File, buf []byte, off, n int64, fn func(rel int64, b []byte) error) error {
	var inner error // a read's or fn's, returned as it is
	err := sparse.Segments(f, off, off+n, func(at, k int64) error {
		lo, hi := (at-off)&^4095, min(n, (at-off+k+4095)&^4095)
		for rel := lo; rel < hi; rel += dataPiece {
			b := buf[:min(dataPiece, hi-rel)]
			if _, err := f.ReadAt(b, off+rel); err != nil {
				inner = fmt.Errorf("qcow2: %s: reading %d bytes at %d: %w", f.Name(), len(b), off+rel, err)
				return inner
			}
			if inner = fn(rel, b); inner != nil {
				return inner
			}
		}
		return nil
	})
	if err != nil && err != inner {
		return fmt.Errorf("qcow2: %s: finding the data of %d bytes at %d: %w", f.Name(), n, off, err)
	}
	return err
}

type kind int

const (
	kindAbsent kind = iota // the image does not hold it
	kindZero               // the image reads it as zeros
	kindData               // the image holds it at an offset of its file
)

// mapper builds the merged extents, clipped to the disk's size.
type mapper struct {
	size int64
	out  []qemu.MapExtent
}

func (m *mapper) add(start, n int64, k kind, offset int64) {
	n = min(n, m.size-start)
	if n <= 0 {
		return
	}
	if i := len(m.out) - 1; i >= 0 {
		last := &m.out[i]
		same := last.End() == start && last.Data == (k == kindData) && last.Present == (k != kindAbsent)
		if same && (k != kindData || last.Offset+last.Length == offset) {
			last.Length += n
			return
		}
	}
	e := qemu.MapExtent{Start: start, Length: n, Present: k != kindAbsent, Zero: k != kindData, Data: k == kindData}
	if k == kindData {
		e.Offset, e.HasOffset = offset, true
	}
	m.out = append(m.out, e)
}
