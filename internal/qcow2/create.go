package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

// Range is a range of the disk, in bytes.
type Range struct{ Offset, Length int64 }

// Make makes a fresh image of size bytes at path, as qemu.Create does:
// by Create, or by qemu-img create where Create cannot. It refuses to
// overwrite an existing file. written, when known, are the ranges of the
// disk that will be written (Create makes their L2 tables).
func Make(ctx context.Context, path string, size int64, written ...Range) error {
	if err := Create(path, size, "", written...); !errors.Is(err, ErrUnsupported) {
		return err
	}
	return qemu.Create(ctx, path, size)
}

// MakeOverlay makes an overlay at path on backing (a QCOW2 image, named
// relative to path's folder in the overlay), as qemu.CreateOverlay does:
// by Create, or by qemu-img create where Create cannot. It refuses to
// overwrite an existing file; written are as for Make.
func MakeOverlay(ctx context.Context, path, backing string, written ...Range) error {
	rel, err := qemu.RelativeBacking(path, backing)
	if err != nil {
		return err
	}
	if err := Create(path, 0, rel, written...); !errors.Is(err, ErrUnsupported) {
		return err
	}
	return qemu.CreateOverlay(ctx, path, backing)
}

// The layout of the images Create makes: qemu.ImageOptions
// (cluster_size=2M,extended_l2=on) and qemu's other defaults for QCOW2
// version 3 (16-bit refcounts, zlib compression, no lazy refcounts).
const (
	createClusterBits   = 21
	createCluster       = 1 << createClusterBits
	createRefcountOrder = 4
	createL2Entries     = createCluster / 16 // extended L2 entries: 16 bytes
	headerLength        = 112
	maxBackingName      = 1023    // qemu's limit
	l1Copied            = 1 << 63 // an L1 entry's table has refcount 1
)

// featureNames is the feature name table qemu writes into every image it
// creates: (type, bit, name) of every feature it knows.
var featureNames = []struct {
	kind, bit byte
	name      string
}{
	{0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
	{0, 3, "compression type"}, {0, 4, "extended L2 entries"},
	{1, 0, "lazy refcounts"},
	{2, 0, "bitmaps"}, {2, 1, "raw external data"},
}

// Create makes an empty QCOW2 image of capacity bytes at path, which must
// not exist, as `qemu-img create -f qcow2 -o cluster_size=2M,extended_l2=on`
// makes it, byte for byte — without a process, and without writing its
// metadata's zeros: qemu-img writes three 2 MiB clusters (header,
// refcount table, refcount block) whole; here they are the few bytes that
// are not zero, the rest holes. backing, when set, is the overlay's
// backing file (a QCOW2, named as given: relative to path's folder, or
// absolute); the image then takes its size from it, as qemu-img create -b
// does, and capacity must be 0.
//
// written, when given, are the ranges of the disk that will be written:
// Create then also makes the L2 table of every 256 GiB of the disk they
// touch, empty (a hole of the file: every entry unallocated), and points
// the L1 table at it. qemu allocates a missing table as it writes: it
// writes the new table whole and syncs the file twice (the table, then
// the L1 entry) each time, 8 times for a 2 TiB disk written all over; a
// table that exists is only updated. The image is then no longer the one
// qemu-img create makes byte for byte, but one it could have made:
// qemu-img check finds it clean and every byte of it unallocated.
//
// An image it cannot make so (a capacity not a multiple of 512 bytes, an
// L1 table of more than one cluster, a backing file whose header it does
// not read) gives an error wrapping ErrUnsupported: qemu-img can.
func Create(path string, capacity int64, backing string, written ...Range) error {
	if backing != "" {
		size, err := backingSize(path, backing)
		if err != nil {
			return err
		}
		if capacity != 0 && capacity != size {
			return unsupported("an overlay of %d bytes on a backing file of %d", capacity, size)
		}
		capacity = size
	}
	if capacity <= 0 {
		return fmt.Errorf("qcow2: create %s: size must be positive, got %d", path, capacity)
	}
	if capacity%512 != 0 {
		return unsupported("a disk of %d bytes (not a multiple of 512)", capacity)
	}
	l1Size := (uint64(capacity) + createCluster*createL2Entries - 1) / (createCluster * createL2Entries)
	if l1Size*8 > createCluster {
		return unsupported("a disk of %d bytes (an L1 table of more than one cluster)", capacity)
	}
	if len(backing) > maxBackingName {
		return unsupported("a backing file name of %d bytes", len(backing))
	}
	head := header0(uint64(capacity), uint32(l1Size), backing)
	// The tables written ranges need, in the clusters after the L1 table.
	need := make([]bool, l1Size)
	for _, r := range written {
		if r.Length <= 0 {
			continue
		}
		if r.Offset < 0 || r.Offset >= capacity || r.Length > capacity-r.Offset {
			return fmt.Errorf("qcow2: create %s: range of %d bytes at %d outside a disk of %d bytes", path, r.Length, r.Offset, capacity)
		}
		const mapped = createCluster * createL2Entries // by one table
		for i := r.Offset / mapped; i <= (r.Offset+r.Length-1)/mapped; i++ {
			need[i] = true
		}
	}
	var tables []uint64 // their L1 indices, in order
	for i, ok := range need {
		if ok {
			tables = append(tables, uint64(i))
		}
	}
	clusters := 4 + len(tables)
	if clusters > createCluster/2 {
		return unsupported("%d L2 tables (more than one refcount block counts)", len(tables))
	}

	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("qcow2: create %s: %w", path, err)
	}
	be := binary.BigEndian
	// Cluster 0 the header, 1 the refcount table, 2 its one refcount
	// block, 3 the L1 table (all zero: no L2 table yet), as qemu-img lays
	// them out; the refcount block counts those four clusters.
	// The L2 tables follow, in clusters 4 on, each L1 entry with the
	// flag that says its table is the image's own (refcount 1).
	refTable := be.AppendUint64(nil, 2*createCluster)
	var refBlock []byte
	for range clusters {
		refBlock = be.AppendUint16(refBlock, 1)
	}
	size := int64(3*createCluster + l1Size*8)
	var l1 []byte
	if len(tables) > 0 {
		l1 = make([]byte, l1Size*8)
		for k, i := range tables {
			be.PutUint64(l1[i*8:], uint64(4+k)*createCluster|l1Copied)
		}
		size = int64(clusters) * createCluster
	}
	err = errors.Join(
		write(f, head, 0),
		write(f, refTable, createCluster),
		write(f, refBlock, 2*createCluster),
		write(f, l1, 3*createCluster),
		f.Truncate(size),
	)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("qcow2: create %s: %w", path, err)
	}
	return nil
}

func write(f *os.File, b []byte, off int64) error {
	if len(b) == 0 {
		return nil
	}
	_, err := f.WriteAt(b, off)
	return err
}

// header0 is the start of cluster 0: the version 3 header, its
// extensions (the backing file's format, the feature name table, the
// end) and the backing file's name.
func header0(capacity uint64, l1Size uint32, backing string) []byte {
	be := binary.BigEndian
	b := make([]byte, headerLength, 1024)
	copy(b, "QFI\xfb")
	be.PutUint32(b[4:], 3)
	be.PutUint32(b[20:], createClusterBits)
	be.PutUint64(b[24:], capacity)
	be.PutUint32(b[36:], l1Size)
	be.PutUint64(b[40:], 3*createCluster) // L1 table
	be.PutUint64(b[48:], createCluster)   // refcount table
	be.PutUint32(b[56:], 1)               // its clusters
	be.PutUint64(b[72:], incompatExtendedL2)
	be.PutUint32(b[96:], createRefcountOrder)
	be.PutUint32(b[100:], headerLength)
	// b[104] compression type 0 (zlib), then padding to 112.
	ext := func(kind uint32, data []byte) {
		b = be.AppendUint32(b, kind)
		b = be.AppendUint32(b, uint32(len(data)))
		b = append(b, data...)
		for len(b)%8 != 0 {
			b = append(b, 0)
		}
	}
	if backing != "" {
		ext(extBackingFormat, []byte("qcow2"))
	}
	var names []byte
	for _, n := range featureNames {
		e := make([]byte, 48)
		e[0], e[1] = n.kind, n.bit
		copy(e[2:], n.name)
		names = append(names, e...)
	}
	ext(extFeatureNames, names)
	ext(extEnd, nil)
	if backing != "" {
		be.PutUint64(b[8:], uint64(len(b)))
		be.PutUint32(b[16:], uint32(len(backing)))
		b = append(b, backing...)
	}
	return b
}

// backingSize reads the disk size of the overlay at path's backing file,
// named as the overlay names it.
func backingSize(path, backing string) (int64, error) {
	p := backing
	if !filepath.IsAbs(p) {
		p = filepath.Join(filepath.Dir(path), p)
	}
	f, err := os.Open(p)
	if err != nil {
		return 0, fmt.Errorf("qcow2: create overlay %s: backing file: %w", path, err)
	}
	defer f.Close()
	h, err := readHeader(f)
	if err != nil {
		return 0, err
	}
	return int64(h.size), nil
}
