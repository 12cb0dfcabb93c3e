package qcow2

import (
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"unsafe"
)

// refDisk is what a written image must read as: a raw file.
type refDisk struct {
	t    *testing.T
	f    *os.File
	size int64
}

func newRef(t *testing.T, path string, size int64) *refDisk {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return &refDisk{t: t, f: f, size: size}
}

func (r *refDisk) write(b []byte, off int64) {
	if _, err := r.f.WriteAt(b, off); err != nil {
		r.t.Fatal(err)
	}
}

func (r *refDisk) zero(off, n int64) { r.write(make([]byte, n), off) }

// aligned returns n bytes of random data on a 4 KiB boundary in memory
// (so that the writer can write them directly), or anywhere.
func aligned(rng *rand.Rand, n int64, direct bool) []byte {
	b := make([]byte, n+8192)
	at := 4096 - int(uintptrOf(b)%4096)
	if !direct {
		at++
	}
	b = b[at : at+int(n)]
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// sameDisk asserts that the image at path reads as the raw file ref.
func sameDisk(t *testing.T, path, ref string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, ref).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img compare %s: %v\n%s", filepath.Base(path), err, out)
	}
}

// freshWriter makes a fresh image name.qcow2 of size bytes (Create, with
// its tables) in a new folder, opens it for writing the whole disk, and
// makes its raw reference name.raw.
func freshWriter(t *testing.T, name string, size int64) (w *Writer, ref *refDisk, path, refPath string) {
	t.Helper()
	dir := t.TempDir()
	path, refPath = filepath.Join(dir, name+".qcow2"), filepath.Join(dir, name+".raw")
	if err := Create(path, size, "", Range{0, size}); err != nil {
		t.Fatal(err)
	}
	ref = newRef(t, refPath, size)
	w, err := OpenWriter(path, Range{0, size})
	if err != nil {
		t.Fatal(err)
	}
	return w, ref, path, refPath
}

// flushAndCompare flushes and closes w, and asserts that its image at
// path is clean (proven, with qemu-img check's figures) and reads as the
// raw file refPath.
func flushAndCompare(t *testing.T, w *Writer, path, refPath string) {
	t.Helper()
	if err := errors.Join(w.Flush(), w.Close()); err != nil {
		t.Fatal(err)
	}
	proveAsQemu(t, path, true)
	sameDisk(t, path, refPath)
}

// writeRandom writes and zeroes random whole-subcluster ranges (some
// ending at the disk's end) into w and ref, flushing now and then.
func writeRandom(t *testing.T, w *Writer, ref *refDisk, rng *rand.Rand, ops int) {
	t.Helper()
	sub := w.Granularity()
	for i := range ops {
		off := rng.Int64N(w.Size()/sub) * sub
		n := min(rng.Int64N(40)*sub+sub, w.Size()-off)
		if rng.IntN(10) < 7 {
			b := aligned(rng, n, i%2 == 0)
			if err := w.Write(b, off); err != nil {
				t.Fatal(err)
			}
			ref.write(b, off)
		} else {
			if err := w.Zero(off, n); err != nil {
				t.Fatal(err)
			}
			ref.zero(off, n)
		}
		if rng.IntN(8) == 0 {
			if err := w.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestWriterAsQemu: random writes and zeros of whole subclusters into a
// fresh image (made by Create with its tables, by Create without, by
// qemu-img create) and into an overlay on a full image: after a Flush,
// qemu-img check finds each image clean (and Prove proves it, with
// qemu-img's figures), and it reads as a raw file given the same writes.
func TestWriterAsQemu(t *testing.T) {
	const size = 70<<20 + 512 // ends inside a subcluster
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))

	// The overlay's backing file: a full image of random data.
	baseRaw := filepath.Join(dir, "base.raw")
	base := newRef(t, baseRaw, size)
	for range 20 {
		off := rng.Int64N(size/4096) * 4096
		base.write(aligned(rng, min(rng.Int64N(3<<20)+4096, size-off), false), off)
	}
	baseImg := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on", baseRaw, baseImg)

	for _, tc := range []struct {
		name    string
		make    func(path string) error
		backing string // the raw file the disk starts as
	}{
		{"create-tables", func(p string) error { return Create(p, size, "", Range{0, size}) }, ""},
		{"create-no-tables", func(p string) error { return Create(p, size, "") }, ""},
		{"qemu-img", func(p string) error {
			create(t, p, "cluster_size=2M,extended_l2=on", size, "")
			return nil
		}, ""},
		{"overlay", func(p string) error { return Create(p, 0, "base.qcow2", Range{0, size}) }, baseRaw},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name+".qcow2")
			refPath := filepath.Join(dir, tc.name+".raw")
			ref := newRef(t, refPath, size)
			if tc.backing != "" {
				qemuImg(t, "convert", "-q", "-f", "raw", "-O", "raw", tc.backing, refPath)
			}
			if err := tc.make(path); err != nil {
				t.Fatal(err)
			}
			w, err := OpenWriter(path, Range{0, size})
			if err != nil {
				t.Fatal(err)
			}
			if w.direct == nil {
				t.Errorf("the image's file system takes O_DIRECT, the writer did not open it so")
			}
			writeRandom(t, w, ref, rng, 60)
			flushAndCompare(t, w, path, refPath)
		})
	}
}

// TestWriterCrash: what a writer wrote after its last Flush is not part
// of the image when it is opened again (the image is clean, reads as of
// the flush, and the file ends at its last cluster), and writing on from
// there gives the whole disk.
func TestWriterCrash(t *testing.T) {
	const size = 40 << 20
	rng := rand.New(rand.NewPCG(3, 4))
	w, ref, path, refPath := freshWriter(t, "d", size)
	var err error
	first := aligned(rng, 6<<20, true)
	if err := w.Write(first, 0); err != nil {
		t.Fatal(err)
	}
	ref.write(first, 0)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	flushed := w.next
	// Written, never flushed: the process dies.
	later := aligned(rng, 8<<20, true)
	if err := errors.Join(w.Write(later, 20<<20), w.Close()); err != nil {
		t.Fatal(err)
	}

	w, err = OpenWriter(path, Range{0, size})
	if err != nil {
		t.Fatal(err)
	}
	if w.next != flushed {
		t.Errorf("reopened: %d clusters in use, the flush left %d", w.next, flushed)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() != flushed*w.cluster {
		t.Errorf("reopened: the file has %v bytes, want %d (its clusters in use)", fi.Size(), flushed*w.cluster)
	}
	// Checked by qemu with the writer closed (it locks the image), then
	// opened again.
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	proveAsQemu(t, path, true)
	sameDisk(t, path, refPath)
	if w, err = OpenWriter(path, Range{0, size}); err != nil {
		t.Fatal(err)
	}

	// The retry writes on, rewriting what was lost.
	if err := w.Write(later, 20<<20); err != nil {
		t.Fatal(err)
	}
	ref.write(later, 20<<20)
	writeRandom(t, w, ref, rng, 20)
	flushAndCompare(t, w, path, refPath)
}

// TestWriterConcurrent: writers and zeroers on disjoint ranges and a
// flusher at once give the image of the same writes one by one.
func TestWriterConcurrent(t *testing.T) {
	const size = 64 << 20
	w, ref, path, refPath := freshWriter(t, "c", size)
	const workers = 8
	span := int64(size / workers)
	data := make([][]byte, workers)
	for i := range data {
		data[i] = aligned(rand.New(rand.NewPCG(uint64(i), 5)), span, i%2 == 0)
		ref.write(data[i], int64(i)*span)
	}
	var wg sync.WaitGroup
	errs := make(chan error, workers+1)
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				errs <- nil
				return
			default:
			}
			if err := w.Flush(); err != nil {
				errs <- err
				return
			}
		}
	}()
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			base := int64(i) * span
			for at := int64(0); at < span; at += 256 << 10 {
				// Each 256 KiB: a zero of its first subcluster, then
				// the data over it.
				if err := w.Zero(base+at, w.Granularity()); err != nil {
					errs <- err
					return
				}
				if err := w.Write(data[i][at:at+256<<10], base+at); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	flushAndCompare(t, w, path, refPath)
}

// TestWriterRefuses: ranges that are not whole subclusters, or outside
// the disk, are refused, naming them; images of another layout, or that
// the ranges would take past one refcount block, are left to qemu-nbd
// (ErrUnsupported).
func TestWriterRefuses(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "r.qcow2")
	if err := Create(path, 8<<20, ""); err != nil {
		t.Fatal(err)
	}
	w, err := OpenWriter(path, Range{0, 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, c := range []struct {
		off, n int64
		want   string
	}{
		{4096, 64 << 10, "not whole subclusters"},
		{0, 4096, "not whole subclusters"},
		{8<<20 - 64<<10, 128 << 10, "outside a disk"},
		{-64 << 10, 64 << 10, "outside a disk"},
	} {
		err := w.Write(make([]byte, c.n), c.off)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "r.qcow2") {
			t.Errorf("write of %d at %d: %v, want an error naming the image and %q", c.n, c.off, err, c.want)
		}
		if err := w.Zero(c.off, c.n); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("zero of %d at %d: %v, want %q", c.n, c.off, err, c.want)
		}
	}

	// A second refcount block (the table's second entry).
	two := filepath.Join(dir, "two-blocks.qcow2")
	if err := Create(two, 8<<20, ""); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(two, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0, 0, 0, 0, 0, 0x80, 0, 0}, createCluster+8); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := OpenWriter(two); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "more than one refcount block") {
		t.Errorf("an image with two refcount blocks: %v, want ErrUnsupported naming them", err)
	}

	small := filepath.Join(dir, "small-clusters.qcow2")
	create(t, small, "cluster_size=65536", 8<<20, "")
	if _, err := OpenWriter(small); !errors.Is(err, ErrUnsupported) {
		t.Errorf("an image without extended L2 entries: %v, want ErrUnsupported", err)
	}
	huge := filepath.Join(dir, "huge.qcow2")
	if err := Create(huge, 4<<40, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenWriter(huge, Range{0, 3 << 40}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("3 TiB of writes into one refcount block: %v, want ErrUnsupported", err)
	}
	w2, err := OpenWriter(huge, Range{0, 1 << 30}, Range{3 << 40, 1 << 30})
	if err != nil {
		t.Fatalf("2 GiB of writes on a 4 TiB disk: %v", err)
	}
	w2.Close()
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// TestWriterReopenCounts: an image written before (a resumed copy) is
// opened again for ranges whose clusters it mostly has: only the clusters
// still to take count against the refcount block (16 KiB clusters, whose
// one refcount block counts 8192 of them, make it small).
func TestWriterReopenCounts(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "small.qcow2")
	const cluster, size = 16 << 10, 256 << 20 // 16384 clusters
	create(t, path, "cluster_size=16K,extended_l2=on", size, "")
	first := Range{0, 5000 * cluster}
	w, err := OpenWriter(path, first)
	if err != nil {
		t.Fatal(err)
	}
	sub := w.Granularity()
	b := aligned(rand.New(rand.NewPCG(1, 1)), sub, false)
	for c := int64(0); c < 5000; c++ {
		if err := w.Write(b, c*cluster); err != nil {
			t.Fatal(err)
		}
	}
	if err := errors.Join(w.Flush(), w.Close()); err != nil {
		t.Fatal(err)
	}
	// 5000 clusters had, 3000 more to take: within the 8192.
	w, err = OpenWriter(path, Range{0, 8000 * cluster})
	if err != nil {
		t.Fatalf("reopened for 8000 clusters of which 5000 are there: %v", err)
	}
	w.Close()
	if _, err := OpenWriter(path, Range{0, 9000 * cluster}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("reopened for 4000 clusters more than the 5000 there: %v, want ErrUnsupported", err)
	}
	proveAsQemu(t, path, true)
}

// TestWriterLocks: an image a Writer has open is not opened by another
// (ErrLocked, nothing cut) nor by qemu; closed, it is.
func TestWriterLocks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l.qcow2")
	if err := Create(path, 8<<20, "", Range{0, 8 << 20}); err != nil {
		t.Fatal(err)
	}
	w, err := OpenWriter(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenWriter(path); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "l.qcow2") {
		t.Errorf("a second writer: %v, want ErrLocked naming the image", err)
	}
	if out, err := exec.Command("qemu-img", "info", "-U", path).CombinedOutput(); err != nil {
		t.Errorf("qemu-img info -U (no lock) of an image being written: %v\n%s", err, out)
	}
	if out, _ := exec.Command("qemu-io", "-f", "qcow2", "-c", "write 0 64k", path).CombinedOutput(); !strings.Contains(string(out), "lock") {
		t.Errorf("qemu-io opened an image a Writer has open, or failed for another reason than its lock:\n%s", out)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, err = OpenWriter(path)
	if err != nil {
		t.Fatalf("reopened after Close: %v", err)
	}
	w.Close()
}
