package lab

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"syscall"

	"github.com/google/uuid"
)

type diskID struct {
	vm  string // VM moref value
	key int32
}

// disk is the state of one tracked virtual disk. mu orders guest writes
// against snapshot freezes: a freeze sees every write either entirely
// before it or entirely after it, and the changed blocks it records agree
// with the image it freezes.
type disk struct {
	id   diskID
	path string

	mu       sync.Mutex
	f        *os.File // the live image
	capacity int64
	dirty    []uint64 // bitmap of blocks written since the last freeze
	touched  []int64  // the indexes of dirty's non-zero words, in the order they became so
	written  bool     // anything written (or punched) since the last freeze
	series   *series  // nil while CBT is off
	// last is the image of the most recent freeze while a snapshot holds
	// it: the next freeze shares it when nothing was written in between.
	// While it is live (a second name of the live image's file), every
	// change of the live image first moves the live image to a copy of
	// its own (unshare).
	last   *frozenImage
	frozen freezeStats // what the most recent freeze did
	seq    int         // names frozen images
	base   string      // backing file name before the first snapshot
	deltas int         // snapshots taken since the VM last had none
	gone   bool        // removed from its VM: f is nil for good
	log    *slog.Logger

	// outside: LiveImage handed the live image's path to a writer outside
	// the lab, which may hold the file open and write it at any time: a
	// freeze copies, never links (a link would share that writer's file).
	outside bool
}

// freezeStats says how a freeze made its image, for the log and tests.
type freezeStats struct {
	shared bool  // the previous image, unchanged
	linked bool  // a new name of the live image's file (false: a copy)
	bytes  int64 // a copy: the data copied
}

// series is one change-ID series of a disk: it starts when CBT is enabled
// (or the lab starts) and ends when CBT is disabled.
type series struct {
	uuid string
	gen  int
	// changes[g-1] holds the blocks written between freeze g-1 and freeze g.
	changes [][]Extent
}

func newSeries() *series { return &series{uuid: uuid.NewString()} }

func (s *series) changeID(gen int) string { return fmt.Sprintf("%s/%d", s.uuid, gen) }

// frozenImage is a snapshot's image of a disk. Snapshots taken without a
// write in between share one.
type frozenImage struct {
	path     string
	capacity int64
	refs     int
	// live: path is a hard link to the live image's file, which nothing
	// has changed since the freeze (see disk.unshare).
	live bool
}

func openDisk(id diskID, path string, capacity int64, log *slog.Logger) (*disk, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	d := &disk{id: id, path: path, f: f, log: log}
	if err := d.resize(capacity); err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// resize follows the capacity of the VM's config. Called with mu held (or
// before d is shared).
func (d *disk) resize(capacity int64) error {
	if capacity == d.capacity {
		return nil
	}
	if err := d.unshare(); err != nil {
		return err
	}
	if err := d.f.Truncate(capacity); err != nil {
		return err
	}
	if capacity < d.capacity {
		// Shrinking is not a thing disks do; keep the bitmap consistent.
		d.dirty, d.touched = nil, nil
		d.written = true
	}
	old := d.capacity
	d.capacity = capacity
	words := (blocks(capacity) + 63) / 64
	if int64(len(d.dirty)) < words {
		d.dirty = append(d.dirty, make([]uint64, words-int64(len(d.dirty)))...)
	}
	if old > 0 && capacity > old {
		// A grown disk: the new range counts as changed (a false positive
		// CBT allows), so that an incremental backup sees it.
		d.mark(old, capacity-old)
	}
	return nil
}

func blocks(n int64) int64 { return (n + BlockSize - 1) / BlockSize }

// mark records a change of [off, off+n). Called with mu held.
func (d *disk) mark(off, n int64) {
	if n <= 0 {
		return
	}
	d.written = true
	for b := off / BlockSize; b < blocks(off+n); b++ {
		w := b / 64
		if d.dirty[w] == 0 {
			d.touched = append(d.touched, w)
		}
		d.dirty[w] |= 1 << (b % 64)
	}
}

// takeDirty returns the changed blocks as merged extents clipped to the
// capacity, and clears the bitmap. Called with mu held. Its cost follows
// the words written since the last freeze (touched), not the disk's size:
// a 2 TiB disk's bitmap has half a million words.
func (d *disk) takeDirty() []Extent {
	slices.Sort(d.touched)
	var out []Extent
	for _, w := range d.touched {
		word := d.dirty[w]
		d.dirty[w] = 0
		for word != 0 {
			bit := int64(bits.TrailingZeros64(word))
			word &= word - 1
			start := (w*64 + bit) * BlockSize
			if start >= d.capacity {
				break
			}
			end := min(start+BlockSize, d.capacity)
			if n := len(out); n > 0 && out[n-1].End() == start {
				out[n-1].Length = end - out[n-1].Offset
			} else {
				out = append(out, Extent{Offset: start, Length: end - start})
			}
		}
	}
	d.touched = d.touched[:0]
	return out
}

// freeze makes (or shares) the frozen image of the disk's current content
// and closes the current generation of the change series. Called with mu
// held.
//
// It costs what vSphere's redirect-on-write snapshot costs: nothing that
// grows with the disk. The image is a second name (a hard link) of the
// live image's file, and the live image moves to a copy of its own only
// when it is next changed while a snapshot still holds the image
// (unshare). A backup's snapshot, read and removed with nothing written
// meanwhile, never copies anything. The live image's data is copied into
// the image instead (holes stay holes) where the file system has no hard
// link for it, and once LiveImage handed the file to a writer outside the
// lab (outside).
func (d *disk) freeze(dir string) (*frozenImage, error) {
	changed := d.takeDirty()
	if d.series != nil {
		d.series.gen++
		d.series.changes = append(d.series.changes, changed)
	}
	// After LiveImage the writer may have written since, unseen.
	if d.last != nil && !d.written && !d.outside && d.last.capacity == d.capacity {
		d.last.refs++
		d.frozen = freezeStats{shared: true}
		return d.last, nil
	}
	d.written = false
	d.last = nil // a held image stays its snapshots'
	d.seq++
	path := filepath.Join(dir, fmt.Sprintf("%s-%d-%06d.raw", d.id.vm, d.id.key, d.seq))
	// A writer outside the lab (LiveImage) may hold the live image's file
	// open and write it: the image is a copy then.
	if !d.outside {
		err := os.Link(d.path, path)
		if err == nil {
			d.frozen = freezeStats{linked: true}
			d.last = &frozenImage{path: path, capacity: d.capacity, refs: 1, live: true}
			return d.last, nil
		}
		d.log.Warn("frozen image not linked to the live image, copying the disk", "vm", d.id.vm, "disk", d.id.key, "err", err)
	}
	n, err := sparseCopy(d.f, path, d.capacity)
	if err != nil {
		_ = os.Remove(path)
		// The next freeze must not share what this one did not freeze.
		d.written = true
		return nil, err
	}
	d.frozen = freezeStats{bytes: n}
	d.last = &frozenImage{path: path, capacity: d.capacity, refs: 1}
	return d.last, nil
}

// unshare is called before every change of the live image (a write, a
// punch, a resize, a writer outside the lab): when a held frozen image is
// still the live image's file, the live image moves to a copy of it (a
// sparse copy into a new file, renamed over the live image's name), and
// the frozen image keeps the file, and what a reader that has it open
// reads, unchanged. Called with mu held and f open. A failed copy leaves
// both as they were.
func (d *disk) unshare() error {
	img := d.last
	if img == nil || !img.live {
		return nil
	}
	tmp := d.path + ".unshare"
	_ = os.Remove(tmp) // a leftover of a lab that died mid-copy
	n, err := sparseCopy(d.f, tmp, d.capacity)
	// The copy is opened before it takes the live image's name: once it
	// has the name, nothing may fail.
	var f *os.File
	if err == nil {
		f, err = os.OpenFile(tmp, os.O_RDWR, 0)
	}
	if err == nil {
		if err = os.Rename(tmp, d.path); err != nil {
			f.Close()
		}
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("lab: copy the live image of disk %d of %s away from its snapshot's: %w", d.id.key, d.id.vm, err)
	}
	d.f.Close()
	d.f = f
	img.live = false
	d.log.Debug("live image copied away from a held snapshot image", "vm", d.id.vm, "disk", d.id.key, "bytes", n)
	return nil
}

// release drops one reference to img; the last removes its name (the
// live image's file stays where the image was live).
func (d *disk) release(img *frozenImage) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	img.refs--
	if img.refs > 0 {
		return nil
	}
	if d.last == img {
		d.last = nil
	}
	img.live = false
	return os.Remove(img.path)
}

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

// dataExtents lists the allocated ranges of f up to size, using
// SEEK_DATA/SEEK_HOLE. It moves f's offset.
func dataExtents(f *os.File, size int64) ([]Extent, error) { return dataExtentsIn(f, 0, size) }

// dataExtentsIn lists the allocated ranges of f within [off, end). It
// moves f's offset.
func dataExtentsIn(f *os.File, off, end int64) ([]Extent, error) {
	var out []Extent
	for off < end {
		data, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break
		}
		if err != nil {
			return nil, err
		}
		if data >= end {
			break
		}
		hole, err := f.Seek(data, seekHole)
		if err != nil {
			return nil, err
		}
		hole = min(hole, end)
		out = append(out, Extent{Offset: data, Length: hole - data})
		off = hole
	}
	return out, nil
}

// sparseCopy copies the allocated ranges of src into a new file of size
// bytes at dst: holes stay holes, so a mostly empty disk copies in
// milliseconds (and with copy_file_range, reflinks where the file system
// can). It returns the bytes copied.
func sparseCopy(src *os.File, dst string, size int64) (int64, error) {
	exts, err := dataExtents(src, size)
	if err != nil {
		return 0, err
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	if err := out.Truncate(size); err != nil {
		out.Close()
		return 0, err
	}
	var n int64
	for _, e := range exts {
		if err := copyExtent(out, src, e); err != nil {
			out.Close()
			return n, err
		}
		n += e.Length
	}
	return n, out.Close()
}

// copyExtent copies e from src to the same place in dst. It moves both
// files' offsets.
func copyExtent(dst, src *os.File, e Extent) error {
	if _, err := src.Seek(e.Offset, io.SeekStart); err != nil {
		return err
	}
	if _, err := dst.Seek(e.Offset, io.SeekStart); err != nil {
		return err
	}
	// *os.File.ReadFrom uses copy_file_range for a LimitedReader over a file.
	n, err := dst.ReadFrom(io.LimitReader(src, e.Length))
	if err == nil && n != e.Length {
		err = fmt.Errorf("short copy at %d: %d of %d bytes", e.Offset, n, e.Length)
	}
	return err
}

// punchHole deallocates [off, off+n) of f, keeping its size: it reads as
// zeros.
func punchHole(f *os.File, off, n int64) error {
	const punchHole, keepSize = 0x02, 0x01 // FALLOC_FL_*
	return syscall.Fallocate(int(f.Fd()), punchHole|keepSize, off, n)
}

// alignExtents widens extents to whole blocks (clipped to capacity) and
// merges what touches.
func alignExtents(exts []Extent, capacity int64) []Extent {
	var out []Extent
	for _, e := range exts {
		start := e.Offset / BlockSize * BlockSize
		end := min(blocks(e.End())*BlockSize, capacity)
		if n := len(out); n > 0 && out[n-1].End() >= start {
			out[n-1].Length = max(out[n-1].End(), end) - out[n-1].Offset
			continue
		}
		out = append(out, Extent{Offset: start, Length: end - start})
	}
	return out
}

// unionExtents merges several sorted extent lists.
func unionExtents(lists ...[]Extent) []Extent {
	var all []Extent
	for _, l := range lists {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Offset < all[j].Offset })
	var out []Extent
	for _, e := range all {
		if n := len(out); n > 0 && out[n-1].End() >= e.Offset {
			out[n-1].Length = max(out[n-1].End(), e.End()) - out[n-1].Offset
			continue
		}
		out = append(out, e)
	}
	return out
}
