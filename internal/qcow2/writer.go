package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Writer writes a disk's data into a QCOW2 image in process: the
// backup's copy without an NBD server on the target side. It takes the
// images Create makes (and qemu-img's of the same layout: version 3,
// extended L2 entries, 16-bit refcounts, no internal snapshots), fresh or
// overlays, and writes them as qemu would, so that qemu-img check finds
// them clean and qemu reads them: data into new clusters at the end of
// the file, each subcluster it writes marked allocated in its L2 entry,
// each range it zeroes marked zero, the new clusters counted in the
// refcount block.
//
// It never reads the backing file: every write and zero covers whole
// subclusters (64 KiB with the 2 MiB clusters of Create), except at the
// disk's end, so no part of a subcluster must be copied from below. The
// caller aligns its ranges (Granularity).
//
// Data goes to the file with O_DIRECT where the file system and the
// buffer allow it (nbd.NewBuffer's memory is aligned), so a backup does
// not fill the page cache. Metadata stays in memory until Flush, which
// writes the refcounts of the new clusters and makes them and the data
// durable (one sync), then writes the L2 and L1 tables (another):
// a crash at any point leaves an image qemu-img check finds clean or
// leaking, never one that points at what was not written, and the image
// holds at least what the last Flush covered. A failed Flush breaks the
// writer (the kernel may have dropped what it could not write): reopen
// the image to go on.
//
// Write, Zero and Flush may be called from several goroutines, on
// ranges that do not overlap.
type Writer struct {
	f      *os.File // metadata, and data the direct file cannot take
	direct *os.File // O_DIRECT; nil where the file system refuses it

	size     int64 // the disk's
	cluster  int64
	sub      int64 // a subcluster: cluster / 32
	perTable int64 // disk bytes one L2 table maps
	l1Offset int64
	refBlock int64 // the refcount block of clusters 0 to limit
	limit    int64 // clusters it counts

	mu      sync.Mutex
	l1      []uint64
	l1Dirty bool
	slices  map[int64]*l2Slice // by their offset in the file
	next    int64              // the first cluster not in use
	counted int64              // clusters below it have their refcount on disk
	broken  error

	flushMu sync.Mutex
}

// ErrLocked is wrapped when OpenWriter finds the image in use.
var ErrLocked = errors.New("the image is locked")

// l2Slice is 4 KiB of an L2 table (256 entries), as last read or
// changed.
type l2Slice struct {
	b     [sliceSize]byte
	dirty bool
}

const sliceSize = 4096

// OpenWriter opens the image at path for writing. written are the ranges
// of the disk the caller will write or zero: an image whose refcount
// block could not count the clusters they need (more than 2 TiB of file
// with 2 MiB clusters), or of a layout Writer does not write, gives an
// error wrapping ErrUnsupported; qemu-nbd can write it.
//
// The image is locked while it is open (an open file description lock
// on the whole file): an image another Writer, or a qemu process, has
// open gives an error wrapping ErrLocked, before anything is read or
// cut, and qemu opens none the Writer has (a transfer's stale attempt
// that still writes cannot share the image with its retry). Clusters
// past the last one the refcounts count (data an attempt wrote before it
// crashed, never made part of the image) are cut off.
func OpenWriter(path string, written ...Range) (*Writer, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("qcow2: open %s for writing: %w", path, err)
	}
	lock := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lock); err != nil {
		f.Close()
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("qcow2: open %s for writing: %w (another process has it open: a writer, or qemu)", path, ErrLocked)
		}
		return nil, fmt.Errorf("qcow2: lock %s for writing: %w", path, err)
	}
	w, err := openWriter(f, written)
	if err != nil {
		f.Close()
		return nil, err
	}
	if d, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0); err == nil {
		w.direct = d
	}
	return w, nil
}

func openWriter(f *os.File, written []Range) (*Writer, error) {
	name := f.Name()
	h, err := readHeader(f)
	if err != nil {
		return nil, err
	}
	if h.version != 3 || !h.extendedL2 || h.refcountOrder != createRefcountOrder {
		return nil, unsupported("%s: version %d, extended L2 %v, refcount order %d: the writer writes version 3 images with extended L2 entries and 16-bit refcounts",
			name, h.version, h.extendedL2, h.refcountOrder)
	}
	cluster := int64(1) << h.clusterBits
	w := &Writer{f: f, size: int64(h.size), cluster: cluster, sub: cluster / 32,
		perTable: cluster / 16 * cluster, l1Offset: int64(h.l1Offset),
		limit: cluster * 8 / 16, slices: map[int64]*l2Slice{}}
	be := binary.BigEndian

	// The refcount table: one block, counting the clusters from 0 (its
	// holes read as empty entries, and are not read).
	buf := make([]byte, dataPiece)
	err = dataPieces(f, buf, int64(h.rtOffset), int64(h.rtClusters)*cluster, func(rel int64, b []byte) error {
		for i := 0; i < len(b); i += 8 {
			e := int64(be.Uint64(b[i:]) &^ 511)
			switch {
			case rel+int64(i) == 0:
				w.refBlock = e
			case e != 0:
				return unsupported("%s: more than one refcount block", name)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if w.refBlock == 0 || w.refBlock%cluster != 0 {
		return nil, unsupported("%s: the first refcount block at %d", name, w.refBlock)
	}
	// The clusters in use: up to the last one with a refcount.
	err = dataPieces(f, buf, w.refBlock, cluster, func(rel int64, b []byte) error {
		for i := len(b) - 2; i >= 0; i -= 2 {
			if be.Uint16(b[i:]) != 0 {
				w.next = max(w.next, (rel+int64(i))/2+1)
				break
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	w.counted = w.next

	l1, err := readL1(f, h)
	if err != nil {
		return nil, err
	}
	w.l1 = make([]uint64, h.l1Size)
	for i := range w.l1 {
		w.l1[i] = be.Uint64(l1[i*8:])
		if t := int64(w.l1[i] & offsetMask); t%cluster != 0 || t >= w.next*cluster || (t != 0 && w.l1[i]&l1Copied == 0) {
			return nil, unsupported("%s: L1 entry %d (%#x) names a table at %d", name, i, w.l1[i], t)
		}
	}

	// The clusters the ranges may need (a data cluster each, and their
	// missing tables) must be countable by the one refcount block.
	need := w.next
	lastCluster, lastTable := int64(-1), int64(-1)
	for _, r := range written {
		if r.Length <= 0 {
			continue
		}
		if r.Offset < 0 || r.Offset >= w.size || r.Length > w.size-r.Offset {
			return nil, fmt.Errorf("qcow2: %s: range of %d bytes at %d outside a disk of %d bytes", name, r.Length, r.Offset, w.size)
		}
		first, last := r.Offset/cluster, (r.Offset+r.Length-1)/cluster
		if first == lastCluster {
			first++
		}
		need += max(last-first+1, 0)
		lastCluster = last
		for t := r.Offset / w.perTable; t <= (r.Offset+r.Length-1)/w.perTable; t++ {
			if t != lastTable && w.l1[t]&offsetMask == 0 {
				need++
			}
			lastTable = t
		}
	}
	if need > w.limit {
		// Counted again, exactly: an image written before (a resumed
		// copy) has clusters for part of the ranges already.
		more, err := w.missing(written)
		if err != nil {
			return nil, err
		}
		if need = w.next + more; need > w.limit {
			return nil, unsupported("%s: %d clusters, more than one refcount block counts (%d)", name, need, w.limit)
		}
	}

	// The file ends at the last cluster in use, whole: what lies past it
	// is no part of the image.
	if err := f.Truncate(w.next * cluster); err != nil {
		return nil, fmt.Errorf("qcow2: %s: %w", name, err)
	}
	return w, nil
}

// missing counts the clusters the sorted ranges would take: a data
// cluster for each cluster of the disk they touch that has none, and the
// tables missing.
func (w *Writer) missing(written []Range) (int64, error) {
	var n int64
	tables := map[int64]bool{}
	next := int64(0) // the first cluster not yet counted
	for _, r := range written {
		if r.Length <= 0 {
			continue
		}
		for c := max(r.Offset/w.cluster, next); c <= (r.Offset+r.Length-1)/w.cluster; c++ {
			next = c + 1
			at := c * w.cluster
			if t := at / w.perTable; w.l1[t]&offsetMask == 0 {
				if !tables[t] {
					tables[t] = true
					n++
				}
				n++
				continue
			}
			s, i, err := w.slot(at) // its table exists: nothing is taken
			if err != nil {
				return 0, err
			}
			if binary.BigEndian.Uint64(s.b[i:])&offsetMask == 0 {
				n++
			}
		}
	}
	return n, nil
}

// Size is the disk's size in bytes.
func (w *Writer) Size() int64 { return w.size }

// Granularity is the unit of Write and Zero: the subcluster.
func (w *Writer) Granularity() int64 { return w.sub }

// Close closes the image's file. It does not flush.
func (w *Writer) Close() error {
	err := w.f.Close()
	if w.direct != nil {
		err = errors.Join(err, w.direct.Close())
	}
	return err
}

// Err returns the error of the Flush that failed, nil while none did:
// after one, nothing more can be written.
func (w *Writer) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.broken
}

// check refuses a range that is not whole subclusters of the disk.
func (w *Writer) check(op string, off, n int64) error {
	if n <= 0 || off < 0 || off >= w.size || n > w.size-off {
		return fmt.Errorf("qcow2: %s: %s of %d bytes at %d outside a disk of %d bytes", w.f.Name(), op, n, off, w.size)
	}
	if off%w.sub != 0 || (n%w.sub != 0 && off+n != w.size) {
		return fmt.Errorf("qcow2: %s: %s of %d bytes at %d is not whole subclusters of %d bytes", w.f.Name(), op, n, off, w.sub)
	}
	return nil
}

// Write writes p at disk offset off: whole subclusters, or up to the
// disk's end.
func (w *Writer) Write(p []byte, off int64) error {
	n := int64(len(p))
	if err := w.check("write", off, n); err != nil {
		return err
	}
	type piece struct{ host, lo, hi int64 }
	var pieces []piece
	w.mu.Lock()
	err := w.clusters(off, n, func(s *l2Slice, i int, e l2Entry, lo, hi int64) error {
		if e.host == 0 {
			host, err := w.alloc()
			if err != nil {
				return err
			}
			e.host = host
			binary.BigEndian.PutUint64(s.b[i:], uint64(host)|l1Copied)
			s.dirty = true
		}
		pieces = append(pieces, piece{e.host + lo%w.cluster, lo - off, hi - off})
		return nil
	})
	w.mu.Unlock()
	if err != nil {
		return err
	}
	for _, pc := range pieces {
		if err := w.pwrite(p[pc.lo:pc.hi], pc.host); err != nil {
			return fmt.Errorf("qcow2: %s: writing %d bytes of the disk at %d: %w", w.f.Name(), pc.hi-pc.lo, off+pc.lo, err)
		}
	}
	// Only now the subclusters say they hold data.
	return w.mark(off, n, true)
}

// Zero makes the disk read zeros at [off, off+n): whole subclusters, or
// up to the disk's end; in an overlay, the backing file no longer shows
// through there.
func (w *Writer) Zero(off, n int64) error {
	if err := w.check("zero", off, n); err != nil {
		return err
	}
	return w.mark(off, n, false)
}

// mark sets the subclusters of [off, off+n) allocated (data) or zero.
func (w *Writer) mark(off, n int64, data bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.clusters(off, n, func(s *l2Slice, i int, e l2Entry, lo, hi int64) error {
		in := lo % w.cluster
		first, last := in/w.sub, (in+hi-lo-1)/w.sub
		bits := uint32(1)<<(last+1) - uint32(1)<<first
		if last == 31 {
			bits = ^uint32(0) << first
		}
		if data {
			e.alloc, e.zero = e.alloc|bits, e.zero&^bits
		} else {
			e.alloc, e.zero = e.alloc&^bits, e.zero|bits
		}
		binary.BigEndian.PutUint64(s.b[i+8:], uint64(e.zero)<<32|uint64(e.alloc))
		s.dirty = true
		return nil
	})
}

// clusters calls fn with the L2 entry of every cluster [off, off+n)
// touches (its slice, its place in it, its fields) and the part of the
// range in it, making missing tables. w.mu is held.
func (w *Writer) clusters(off, n int64, fn func(s *l2Slice, i int, e l2Entry, lo, hi int64) error) error {
	if w.broken != nil {
		return w.broken
	}
	for at := off; at < off+n; {
		end := min(off+n, (at/w.cluster+1)*w.cluster)
		s, i, err := w.slot(at)
		if err != nil {
			return err
		}
		e, err := decodeL2(w.f.Name(), header{extendedL2: true, version: 3}, s.b[i:i+16], at, w.cluster)
		if err != nil {
			return err
		}
		if e.host != 0 && e.raw&l1Copied == 0 {
			return fmt.Errorf("qcow2: %s: the cluster at disk offset %d is shared", w.f.Name(), at)
		}
		if err := fn(s, i, e, at, end); err != nil {
			return err
		}
		at = end
	}
	return nil
}

// slot returns the slice holding the L2 entry of the cluster at disk
// offset at, and the entry's place in it, reading the slice or making
// the table.
func (w *Writer) slot(at int64) (*l2Slice, int, error) {
	t := at / w.perTable
	table := int64(w.l1[t] & offsetMask)
	if table == 0 {
		var err error
		if table, err = w.alloc(); err != nil {
			return nil, 0, err
		}
		// A new cluster is a hole: an empty table.
		w.l1[t] = uint64(table) | l1Copied
		w.l1Dirty = true
	}
	pos := table + at%w.perTable/w.cluster*16
	key := pos &^ (sliceSize - 1)
	s := w.slices[key]
	if s == nil {
		s = &l2Slice{}
		if _, err := w.f.ReadAt(s.b[:], key); err != nil {
			return nil, 0, fmt.Errorf("qcow2: %s: L2 table at %d: %w", w.f.Name(), key, err)
		}
		w.slices[key] = s
	}
	return s, int(pos - key), nil
}

// alloc takes the next cluster, the file grown to hold it whole (so a
// data write never extends the file), and returns its offset.
func (w *Writer) alloc() (int64, error) {
	if w.next >= w.limit {
		return 0, fmt.Errorf("qcow2: %s: no cluster left that the refcount block counts", w.f.Name())
	}
	if err := w.f.Truncate((w.next + 1) * w.cluster); err != nil {
		return 0, fmt.Errorf("qcow2: %s: %w", w.f.Name(), err)
	}
	w.next++
	return (w.next - 1) * w.cluster, nil
}

// pwrite writes b at host offset off, directly where it can.
func (w *Writer) pwrite(b []byte, off int64) error {
	f := w.f
	if w.direct != nil && off%4096 == 0 && len(b)%4096 == 0 && uintptr(unsafe.Pointer(unsafe.SliceData(b)))%4096 == 0 {
		f = w.direct
	}
	_, err := f.WriteAt(b, off)
	return err
}

// Flush makes durable every Write and Zero that returned before it was
// called: their data, then the refcounts of the clusters they took, then
// the L2 and L1 entries that point at them.
func (w *Writer) Flush() error {
	w.flushMu.Lock()
	defer w.flushMu.Unlock()
	w.mu.Lock()
	if w.broken != nil {
		w.mu.Unlock()
		return w.broken
	}
	type dirty struct {
		at int64
		b  [sliceSize]byte
	}
	var tables []dirty
	for at, s := range w.slices {
		if s.dirty {
			tables = append(tables, dirty{at, s.b})
			s.dirty = false
		}
	}
	var l1 []byte
	if w.l1Dirty {
		for _, e := range w.l1 {
			l1 = binary.BigEndian.AppendUint64(l1, e)
		}
		w.l1Dirty = false
	}
	from, to := w.counted, w.next
	w.counted = w.next
	w.mu.Unlock()

	slices.SortFunc(tables, func(a, b dirty) int { return int(a.at - b.at) })
	err := func() error {
		if to > from {
			refs := make([]byte, 2*(to-from))
			for i := 1; i < len(refs); i += 2 {
				refs[i] = 1
			}
			if _, err := w.f.WriteAt(refs, w.refBlock+2*from); err != nil {
				return err
			}
		}
		if err := w.f.Sync(); err != nil {
			return err
		}
		if len(tables) == 0 && l1 == nil {
			return nil
		}
		for _, t := range tables {
			if _, err := w.f.WriteAt(t.b[:], t.at); err != nil {
				return err
			}
		}
		if l1 != nil {
			if _, err := w.f.WriteAt(l1, w.l1Offset); err != nil {
				return err
			}
		}
		return w.f.Sync()
	}()
	if err != nil {
		err = fmt.Errorf("qcow2: %s: flush: %w", w.f.Name(), err)
		w.mu.Lock()
		w.broken = fmt.Errorf("%w (an earlier flush failed: reopen the image)", err)
		w.mu.Unlock()
	}
	return err
}
