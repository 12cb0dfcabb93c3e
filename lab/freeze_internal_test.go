package lab

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"syscall"
	"testing"
)

// The freezes of one disk, on real sparse files: a snapshot's image must
// equal the live disk at its freeze, byte for byte, however it was made
// (a link to the live image, shared, copied), whatever is written after.

const testCapacity = 16 << 20

func newTestDisk(t *testing.T) (*disk, string) {
	t.Helper()
	dir := t.TempDir()
	snaps := filepath.Join(dir, "snapshots")
	if err := os.Mkdir(snaps, 0o700); err != nil {
		t.Fatal(err)
	}
	d, err := openDisk(diskID{"vm-1", 2000}, filepath.Join(dir, "live.raw"), testCapacity, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.close(true) })
	return d, snaps
}

func (d *disk) testWrite(t *testing.T, off int64, p []byte) {
	t.Helper()
	if _, err := d.writeAt(p, off); err != nil {
		t.Fatal(err)
	}
}

func (d *disk) testPunch(t *testing.T, off, n int64) {
	t.Helper()
	if err := d.punch(off, n); err != nil {
		t.Fatal(err)
	}
}

func (d *disk) testFreeze(t *testing.T, dir string) *frozenImage {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	img, err := d.freeze(dir)
	if err != nil {
		t.Fatalf("freeze: %v", err)
	}
	return img
}

func (d *disk) testRelease(t *testing.T, img *frozenImage) {
	t.Helper()
	if err := d.release(img); err != nil {
		t.Fatalf("release %s: %v", img.path, err)
	}
}

// content is the live disk's whole content now.
func (d *disk) content(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := d.readRange(0, d.capacitySafe(), &buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// allocated is what "*" would report for f: its allocated blocks.
func allocated(t *testing.T, f *os.File, capacity int64) []Extent {
	t.Helper()
	exts, err := dataExtents(f, capacity)
	if err != nil {
		t.Fatal(err)
	}
	return alignExtents(exts, capacity)
}

// sameImage checks that img holds want, and the same allocated blocks as
// the live disk (a punched block is a hole in both).
func sameImage(t *testing.T, what string, d *disk, img *frozenImage, want []byte, wantAlloc []Extent) {
	t.Helper()
	got, err := os.ReadFile(img.path)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if !bytes.Equal(got, want) {
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				t.Errorf("%s: image %s differs from the live disk at its freeze from byte %d (sizes %d, %d)", what, img.path, i, len(got), len(want))
				break
			}
		}
		if len(got) != len(want) {
			t.Errorf("%s: image %s has %d bytes, want %d", what, img.path, len(got), len(want))
		}
	}
	if wantAlloc == nil {
		return
	}
	f, err := os.Open(img.path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got := allocated(t, f, img.capacity); !reflect.DeepEqual(got, wantAlloc) {
		t.Errorf("%s: allocated blocks of the image %v, of the live disk %v", what, got, wantAlloc)
	}
}

func liveAllocated(t *testing.T, d *disk) []Extent {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	return allocated(t, d.f, d.capacity)
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func gone(t *testing.T, what, path string) {
	t.Helper()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s: %s still resolves: %v", what, path, err)
	}
}

func randomData(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	rng.Read(b)
	return b
}

// readerOf opens img as nbdkit does, for the whole life of a snapshot.
func readerOf(t *testing.T, img *frozenImage) *os.File {
	t.Helper()
	f, err := os.Open(img.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// sameThroughReader checks that a reader opened before the changes still
// reads want.
func sameThroughReader(t *testing.T, what string, r *os.File, want []byte) {
	t.Helper()
	got, err := io.ReadAll(io.NewSectionReader(r, 0, int64(len(want))+1))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s: a reader opened at the freeze reads other content (%d bytes, want %d)", what, len(got), len(want))
	}
}

// A freeze is a second name of the live image's file: nothing copied. The
// first change after it moves the live image to a copy of its own; the
// snapshot's image, and a reader that had it open, keep the content of
// the freeze, overwritten, punched, zeroed and partly written blocks
// included, and the live disk has every change.
func TestFreezeLinks(t *testing.T) {
	d, dir := newTestDisk(t)
	rng := rand.New(rand.NewSource(1))
	for i := range int64(32) {
		d.testWrite(t, i*3*BlockSize/2, randomData(rng, BlockSize))
	}
	s1 := d.testFreeze(t, dir)
	if !d.frozen.linked || d.frozen.bytes != 0 || !s1.live {
		t.Fatalf("freeze %+v (live %v), want a link", d.frozen, s1.live)
	}
	if inode(t, s1.path) != inode(t, d.path) {
		t.Fatal("the frozen image is not the live image's file")
	}
	want1, alloc1 := d.content(t), liveAllocated(t, d)
	r := readerOf(t, s1)

	d.testWrite(t, 5*BlockSize, randomData(rng, BlockSize)) // block 5, overwritten
	if inode(t, s1.path) == inode(t, d.path) || s1.live {
		t.Fatal("written while held: the live image is still the frozen image's file")
	}
	moved := inode(t, d.path)
	d.testWrite(t, 40*BlockSize+100, randomData(rng, 2*BlockSize)) // 40-42, unaligned
	d.testWrite(t, 3*BlockSize/2, make([]byte, BlockSize))         // 1-2, zeros over data
	d.testPunch(t, 9*BlockSize, 2*BlockSize)                       // 9-10, discarded
	d.testPunch(t, 200*BlockSize, BlockSize)                       // 200, discarded, was a hole
	d.testWrite(t, 100*BlockSize+10, []byte("partly written"))     // 100, the rest a hole
	d.testWrite(t, testCapacity-5, []byte("end!!"))                // the last block
	if inode(t, d.path) != moved {
		t.Error("the live image was copied again: once is enough")
	}
	sameImage(t, "s1 after the writes", d, s1, want1, alloc1)
	sameThroughReader(t, "s1 after the writes", r, want1)

	live := d.content(t)
	for _, c := range []struct {
		off  int64
		want []byte
	}{{5 * BlockSize, nil}, {9 * BlockSize, make([]byte, 2*BlockSize)}, {100*BlockSize + 10, []byte("partly written")}, {testCapacity - 5, []byte("end!!")}} {
		if c.want != nil && !bytes.Equal(live[c.off:c.off+int64(len(c.want))], c.want) {
			t.Errorf("the live disk at %d does not hold what was written there", c.off)
		}
	}
	if bytes.Equal(live[5*BlockSize:6*BlockSize], want1[5*BlockSize:6*BlockSize]) {
		t.Error("the live disk's block 5 was not overwritten")
	}

	// The next freeze links the moved live image; its release removes
	// the name alone.
	s2 := d.testFreeze(t, dir)
	if !d.frozen.linked || inode(t, s2.path) != moved {
		t.Errorf("s2: %+v, want a link to the live image", d.frozen)
	}
	sameImage(t, "s2", d, s2, live, liveAllocated(t, d))
	d.testRelease(t, s2)
	gone(t, "released s2", s2.path)
	if !bytes.Equal(d.content(t), live) || inode(t, d.path) != moved {
		t.Error("releasing a linked image changed the live disk")
	}
	d.testRelease(t, s1)
	gone(t, "released s1", s1.path)
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("snapshots folder after every release: %v", entries)
	}
	// Nothing held: a write changes the live image's file in place.
	d.testWrite(t, 0, []byte("in place"))
	if inode(t, d.path) != moved {
		t.Error("a write with no snapshot held copied the live image")
	}
}

// Snapshots without a write in between share one image; each snapshot
// keeps the content of its freeze whatever is written, punched or frozen
// after it, and whichever goes first.
func TestFreezeWhileHeld(t *testing.T) {
	d, dir := newTestDisk(t)
	rng := rand.New(rand.NewSource(2))
	d.testWrite(t, 0, randomData(rng, 4*BlockSize))
	s1 := d.testFreeze(t, dir)
	want1, alloc1 := d.content(t), liveAllocated(t, d)
	shared := d.testFreeze(t, dir)
	if shared != s1 || !d.frozen.shared {
		t.Errorf("unchanged disk: a new image %s (%+v), want s1's shared", shared.path, d.frozen)
	}
	d.testRelease(t, shared)
	if _, err := os.Stat(s1.path); err != nil {
		t.Fatalf("one of two snapshots went: %v", err)
	}

	d.testWrite(t, BlockSize, randomData(rng, BlockSize))
	d.testPunch(t, 0, BlockSize)
	s2 := d.testFreeze(t, dir)
	want2, alloc2 := d.content(t), liveAllocated(t, d)
	r2 := readerOf(t, s2)
	d.testWrite(t, 2*BlockSize, randomData(rng, BlockSize))
	s3 := d.testFreeze(t, dir)
	want3, alloc3 := d.content(t), liveAllocated(t, d)
	d.testWrite(t, 3*BlockSize, randomData(rng, BlockSize))
	for _, img := range []*frozenImage{s1, s2, s3} {
		if img.live {
			t.Errorf("%s: live after a write", img.path)
		}
	}
	sameImage(t, "held s1", d, s1, want1, alloc1)
	sameImage(t, "held s2", d, s2, want2, alloc2)
	sameImage(t, "held s3", d, s3, want3, alloc3)

	// The newest goes first, then the oldest: the middle one is intact.
	d.testRelease(t, s3)
	d.testRelease(t, s1)
	gone(t, "s3 released", s3.path)
	gone(t, "s1 released", s1.path)
	d.testWrite(t, 7*BlockSize, randomData(rng, BlockSize))
	sameImage(t, "s2 after the others went", d, s2, want2, alloc2)
	sameThroughReader(t, "s2 after the others went", r2, want2)
	d.testRelease(t, s2)
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("snapshots folder after every release: %v", entries)
	}

	// A disk removed while a snapshot holds it: the image stays until the
	// snapshot goes.
	s4 := d.testFreeze(t, dir)
	want4 := d.content(t)
	d.close(true)
	gone(t, "removed disk", d.path)
	sameImage(t, "s4 of the removed disk", d, s4, want4, nil)
	d.testRelease(t, s4)
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("snapshots folder after the disk and its snapshot went: %v", entries)
	}
}

// A disk grown while a snapshot holds its image: the image keeps the old
// capacity and content, and the next freeze has the new capacity.
func TestFreezeGrown(t *testing.T) {
	d, dir := newTestDisk(t)
	d.testWrite(t, testCapacity-3, []byte("end"))
	s1 := d.testFreeze(t, dir)
	want1 := d.content(t)
	d.mu.Lock()
	err := d.resize(2 * testCapacity)
	d.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	sameImage(t, "held across the growth", d, s1, want1, nil)
	d.testWrite(t, 2*testCapacity-BlockSize, []byte("new end"))
	s2 := d.testFreeze(t, dir)
	if s2 == s1 || s2.capacity != 2*testCapacity {
		t.Errorf("grown: image %s of %d bytes", s2.path, s2.capacity)
	}
	sameImage(t, "grown", d, s2, d.content(t), liveAllocated(t, d))
}

// Where the snapshots' folder is on another file system than the live
// images (no hard link across), a freeze copies the live image's data, and
// a later write changes the live image in place.
func TestFreezeCopiesWithoutLink(t *testing.T) {
	d, _ := newTestDisk(t)
	dir, err := os.MkdirTemp("/dev/shm", "cbtflow-lab-test-")
	if err != nil {
		t.Fatalf("a folder on tmpfs, another file system than the test's: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if st, lst := devOf(t, dir), devOf(t, d.path); st == lst {
		t.Fatalf("%s and %s are on one file system: the test needs two", dir, d.path)
	}
	d.testWrite(t, BlockSize, []byte("copied"))
	s := d.testFreeze(t, dir)
	if d.frozen.linked || d.frozen.bytes <= 0 || d.frozen.bytes > BlockSize || s.live {
		t.Errorf("freeze across file systems: %+v, want a copy of the written block's data", d.frozen)
	}
	want, alloc := d.content(t), liveAllocated(t, d)
	ino := inode(t, d.path)
	d.testWrite(t, 0, []byte("after"))
	if inode(t, d.path) != ino {
		t.Error("a write after a copied freeze moved the live image")
	}
	sameImage(t, "copied", d, s, want, alloc)
	d.testRelease(t, s)
	gone(t, "released copy", s.path)
}

// A failed move of the live image fails the write and changes nothing:
// the snapshot's image and the live disk are as they were, and the next
// write moves it.
func TestUnshareFails(t *testing.T) {
	d, dir := newTestDisk(t)
	d.testWrite(t, 0, []byte("before"))
	s := d.testFreeze(t, dir)
	want := d.content(t)
	// A folder with a file in it where the copy goes: it cannot be made.
	block := d.path + ".unshare"
	if err := os.MkdirAll(filepath.Join(block, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := d.writeAt([]byte("refused"), 0); err == nil {
		t.Fatal("the write succeeded though the live image could not be moved")
	}
	if !s.live || inode(t, s.path) != inode(t, d.path) {
		t.Error("a failed move unlinked the snapshot's image from the live image")
	}
	sameImage(t, "after a failed move", d, s, want, nil)
	if !bytes.Equal(d.content(t), want) {
		t.Error("a failed move changed the live disk")
	}
	if err := os.RemoveAll(block); err != nil {
		t.Fatal(err)
	}
	d.testWrite(t, 0, []byte("after!"))
	sameImage(t, "after the move", d, s, want, nil)
	if got := d.content(t); string(got[:6]) != "after!" {
		t.Errorf("the live disk starts with %q", got[:6])
	}
	gone(t, "the copy's temporary name", block)
}

func devOf(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Dev)
}

// takeDirty, which walks only the bitmap's words written since the last
// freeze, returns what a scan of the whole bitmap returns: random marks,
// adjacent words merged, a last block cut at a capacity that is no
// multiple of the block size; and leaves the bitmap clear.
func TestTakeDirty(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	for round := range 200 {
		capacity := int64(1+rng.Intn(40*64))*BlockSize - int64(rng.Intn(2))*1024
		d := &disk{capacity: capacity, dirty: make([]uint64, (blocks(capacity)+63)/64)}
		for range rng.Intn(30) {
			off := rng.Int63n(capacity)
			n := min(1+rng.Int63n(int64(rng.Intn(3)+1)*64*BlockSize), capacity-off)
			d.mark(off, n)
		}
		var want []Extent
		for b := range blocks(capacity) {
			if d.dirty[b/64]&(1<<(b%64)) == 0 {
				continue
			}
			start, end := b*BlockSize, min((b+1)*BlockSize, capacity)
			if n := len(want); n > 0 && want[n-1].End() == start {
				want[n-1].Length = end - want[n-1].Offset
			} else {
				want = append(want, Extent{Offset: start, Length: end - start})
			}
		}
		if got := d.takeDirty(); !reflect.DeepEqual(got, want) {
			t.Fatalf("round %d (capacity %d): takeDirty %v, want %v", round, capacity, got, want)
		}
		for i, w := range d.dirty {
			if w != 0 {
				t.Fatalf("round %d: word %d left set after takeDirty", round, i)
			}
		}
		if got := d.takeDirty(); got != nil {
			t.Fatalf("round %d: a second takeDirty returned %v", round, got)
		}
	}
}
