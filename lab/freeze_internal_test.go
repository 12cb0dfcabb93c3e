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
// (copied in full, updated in place from the mirror, shared).

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
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := punchHole(d.f, off, n); err != nil {
		t.Fatal(err)
	}
	d.mark(off, n)
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

// A freeze after the previous image's snapshot went updates that image in
// place: the same file (inode), renamed, with only the changed blocks
// rewritten, and equal to the live disk, overwritten, punched, zeroed and
// partly written blocks included.
func TestFreezeInPlace(t *testing.T) {
	d, dir := newTestDisk(t)
	rng := rand.New(rand.NewSource(1))
	for i := range int64(32) {
		d.testWrite(t, i*3*BlockSize/2, randomData(rng, BlockSize))
	}
	s1 := d.testFreeze(t, dir)
	if d.frozen.inPlace || d.frozen.bytes == 0 {
		t.Fatalf("first freeze %+v, want a full copy", d.frozen)
	}
	sameImage(t, "s1", d, s1, d.content(t), liveAllocated(t, d))
	ino := inode(t, s1.path)
	d.testRelease(t, s1)
	gone(t, "released snapshot", s1.path)
	mirror := filepath.Join(dir, mirrorName(d.id))
	if inode(t, mirror) != ino {
		t.Fatal("the mirror is not the released image")
	}

	d.testWrite(t, 5*BlockSize, randomData(rng, BlockSize))        // block 5, overwritten
	d.testWrite(t, 40*BlockSize+100, randomData(rng, 2*BlockSize)) // 40-42, unaligned
	d.testWrite(t, 3*BlockSize/2, make([]byte, BlockSize))         // 1-2, zeros over data
	d.testPunch(t, 9*BlockSize, 2*BlockSize)                       // 9-10, discarded
	d.testPunch(t, 200*BlockSize, BlockSize)                       // 200, discarded, was a hole
	d.testWrite(t, 100*BlockSize+10, []byte("partly written"))     // 100, the rest a hole
	d.testWrite(t, testCapacity-5, []byte("end!!"))                // the last block
	const want = 11 * BlockSize

	s2 := d.testFreeze(t, dir)
	if !d.frozen.inPlace {
		t.Fatalf("freeze after the release %+v, want in place", d.frozen)
	}
	if d.frozen.bytes != want {
		t.Errorf("in place: %d bytes rewritten, want the %d changed", d.frozen.bytes, want)
	}
	if inode(t, s2.path) != ino {
		t.Error("in place: a new file, not the mirror")
	}
	gone(t, "mirror taken over", mirror)
	sameImage(t, "s2 in place", d, s2, d.content(t), liveAllocated(t, d))

	// Nothing written: a released image is taken over as it is.
	d.testRelease(t, s2)
	s3 := d.testFreeze(t, dir)
	if !d.frozen.inPlace || d.frozen.bytes != 0 || inode(t, s3.path) != ino || s3.path == s2.path {
		t.Errorf("unchanged freeze after the release: %+v, %s", d.frozen, s3.path)
	}
	gone(t, "released unchanged snapshot", s2.path)
	sameImage(t, "s3 unchanged", d, s3, d.content(t), liveAllocated(t, d))
}

// An image a snapshot still holds is never updated: the next freeze with
// writes in between copies the disk, and each snapshot keeps its own
// content. Once the older goes, it is deleted; the newest becomes the
// mirror.
func TestFreezeWhileHeld(t *testing.T) {
	d, dir := newTestDisk(t)
	rng := rand.New(rand.NewSource(2))
	d.testWrite(t, 0, randomData(rng, 4*BlockSize))
	s1 := d.testFreeze(t, dir)
	d.testRelease(t, s1)

	d.testWrite(t, BlockSize, randomData(rng, BlockSize))
	s2 := d.testFreeze(t, dir)
	want2, alloc2 := d.content(t), liveAllocated(t, d)
	if !d.frozen.inPlace {
		t.Fatalf("s2: %+v, want in place", d.frozen)
	}

	// s2 held: s3 shares nothing with it.
	shared := d.testFreeze(t, dir)
	if shared != s2 || !d.frozen.shared {
		t.Errorf("unchanged disk: a new image %s (%+v), want s2's shared", shared.path, d.frozen)
	}
	d.testWrite(t, 2*BlockSize, randomData(rng, BlockSize))
	d.testPunch(t, 0, BlockSize)
	s3 := d.testFreeze(t, dir)
	if d.frozen.inPlace || d.frozen.shared {
		t.Errorf("s3 while s2 is held: %+v, want a full copy", d.frozen)
	}
	if inode(t, s3.path) == inode(t, s2.path) {
		t.Fatal("s3 and the held s2 are one file")
	}
	want3, alloc3 := d.content(t), liveAllocated(t, d)
	d.testWrite(t, 3*BlockSize, randomData(rng, BlockSize))
	sameImage(t, "held s2", d, s2, want2, alloc2)
	sameImage(t, "s3 copied", d, s3, want3, alloc3)

	// s3, the newest, goes first: it becomes the mirror, and s4 starts
	// from it while s2 is still held, untouched.
	d.testRelease(t, s3)
	gone(t, "s3 released", s3.path)
	s4 := d.testFreeze(t, dir)
	if !d.frozen.inPlace || d.frozen.bytes != BlockSize {
		t.Errorf("s4 after the release of s3: %+v, want one block in place", d.frozen)
	}
	sameImage(t, "s4 from s3's image", d, s4, d.content(t), liveAllocated(t, d))
	sameImage(t, "held s2 after s4", d, s2, want2, alloc2)
	// s2 is no base for anything: it goes when released.
	d.testRelease(t, shared)
	d.testRelease(t, s2)
	gone(t, "s2 released", s2.path)
	if _, err := os.Stat(filepath.Join(dir, mirrorName(d.id))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an older image became the mirror: %v", err)
	}

	// s4, the newest, goes: it is the mirror, and s5 starts from it.
	d.testRelease(t, s4)
	d.testWrite(t, 7*BlockSize, randomData(rng, BlockSize))
	s5 := d.testFreeze(t, dir)
	if !d.frozen.inPlace || d.frozen.bytes != BlockSize {
		t.Errorf("s5: %+v, want one block in place", d.frozen)
	}
	sameImage(t, "s5", d, s5, d.content(t), liveAllocated(t, d))
	d.testRelease(t, s5)
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || entries[0].Name() != mirrorName(d.id) {
		t.Errorf("snapshots folder after every release: %v, want the mirror alone", entries)
	}
	d.close(true)
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("snapshots folder after the disk went: %v", entries)
	}
	gone(t, "removed disk", d.path)
}

// A grown disk drops the mirror (of the old capacity) at once; its next
// freeze copies, and the one after starts from that again.
func TestFreezeGrown(t *testing.T) {
	d, dir := newTestDisk(t)
	d.testWrite(t, testCapacity-3, []byte("end"))
	d.testRelease(t, d.testFreeze(t, dir))
	mirror := filepath.Join(dir, mirrorName(d.id))
	if _, err := os.Stat(mirror); err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	err := d.resize(2 * testCapacity)
	d.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	gone(t, "mirror of the old capacity", mirror)
	s := d.testFreeze(t, dir)
	if d.frozen.inPlace {
		t.Errorf("grown: %+v, want a full copy", d.frozen)
	}
	sameImage(t, "grown", d, s, d.content(t), liveAllocated(t, d))
	d.testRelease(t, s)
	d.testWrite(t, 2*testCapacity-BlockSize, []byte("new end"))
	s = d.testFreeze(t, dir)
	if !d.frozen.inPlace {
		t.Errorf("after the growth: %+v, want in place", d.frozen)
	}
	sameImage(t, "grown, then written", d, s, d.content(t), liveAllocated(t, d))
}

// A mirror that fails mid-update is deleted, never trusted again: the
// freeze copies instead, and is right.
func TestFreezeInPlaceFails(t *testing.T) {
	d, dir := newTestDisk(t)
	d.testWrite(t, 0, []byte("first"))
	d.testRelease(t, d.testFreeze(t, dir))
	mirror := filepath.Join(dir, mirrorName(d.id))

	// A directory in its place: renamed, it cannot be opened for writing.
	if err := os.Remove(mirror); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(mirror, 0o700); err != nil {
		t.Fatal(err)
	}
	d.testWrite(t, BlockSize, []byte("second"))
	s := d.testFreeze(t, dir)
	if d.frozen.inPlace {
		t.Errorf("%+v: want a full copy after the failed update", d.frozen)
	}
	sameImage(t, "after a failed update", d, s, d.content(t), liveAllocated(t, d))
	gone(t, "failed mirror", mirror)
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("snapshots folder holds %v, want the new image alone", entries)
	}

	// The mirror gone behind the lab's back: the same.
	d.testRelease(t, s)
	if err := os.Remove(mirror); err != nil {
		t.Fatal(err)
	}
	d.testWrite(t, 2*BlockSize, []byte("third"))
	s = d.testFreeze(t, dir)
	if d.frozen.inPlace {
		t.Errorf("%+v: want a full copy without the mirror", d.frozen)
	}
	sameImage(t, "without the mirror", d, s, d.content(t), liveAllocated(t, d))
}

// syncRange writes zeros where the file system cannot punch: the result
// reads the same. Checked here on the range logic alone (data and holes
// interleaved, a range ending in a hole).
func TestSyncRange(t *testing.T) {
	dir := t.TempDir()
	src, err := os.Create(filepath.Join(dir, "src"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.Create(filepath.Join(dir, "dst"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	for _, f := range []*os.File{src, dst} {
		if err := f.Truncate(8 * BlockSize); err != nil {
			t.Fatal(err)
		}
	}
	old := bytes.Repeat([]byte{0xee}, 8*BlockSize)
	if _, err := dst.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := src.WriteAt([]byte("data"), BlockSize+8192); err != nil {
		t.Fatal(err)
	}
	if _, err := src.WriteAt([]byte("more"), 3*BlockSize); err != nil {
		t.Fatal(err)
	}
	e := Extent{Offset: BlockSize, Length: 4 * BlockSize}
	if err := syncRange(dst, src, e); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(old)
	clear(want[e.Offset:e.End()])
	copy(want[BlockSize+8192:], "data")
	copy(want[3*BlockSize:], "more")
	got, err := io.ReadAll(io.NewSectionReader(dst, 0, 8*BlockSize))
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("synced range differs (%v)", err)
	}
	// The zeros fallback alone.
	if err := writeZeros(dst, 0, BlockSize+1); err != nil {
		t.Fatal(err)
	}
	clear(want[:BlockSize+1])
	got, _ = io.ReadAll(io.NewSectionReader(dst, 0, 8*BlockSize))
	if !bytes.Equal(got, want) {
		t.Error("writeZeros")
	}
}
