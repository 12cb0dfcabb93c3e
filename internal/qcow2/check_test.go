package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

// proveAsQemu asserts what Prove and Check say of the image at path
// against what qemu-img check says. Prove never calls clean an image
// qemu-img check does not find clean without leaks; with mustProve, it
// proves every image qemu-img finds so, with qemu-img's figures. Check
// returns qemu-img's result (or fails as qemu-img check does) either way.
// It returns qemu-img's result, nil when qemu-img check failed.
func proveAsQemu(t *testing.T, path string, mustProve bool) *qemu.CheckResult {
	t.Helper()
	name := filepath.Base(path)
	want, qemuErr := qemu.Check(t.Context(), path)
	got, proveErr := Prove(t.Context(), path)
	switch {
	case qemuErr == nil && want.Clean() && want.Leaks == 0:
		if proveErr == nil && *got != *want {
			t.Errorf("%s: Prove says %+v, qemu-img check %+v", name, *got, *want)
		}
		if proveErr != nil && mustProve {
			t.Errorf("%s: qemu-img check finds it clean (%+v); Prove: %v", name, want, proveErr)
		}
	case proveErr == nil:
		t.Errorf("%s: qemu-img check finds %+v (%v); Prove calls it clean", name, want, qemuErr)
	}
	if proveErr != nil && !errors.Is(proveErr, ErrNotProven) && !errors.Is(proveErr, ErrUnsupported) {
		t.Errorf("%s: Prove: %v, wrapping neither ErrNotProven nor ErrUnsupported", name, proveErr)
	}
	checked, err := Check(t.Context(), path)
	switch {
	case qemuErr != nil:
		if err == nil || err.Error() != qemuErr.Error() {
			t.Errorf("%s: qemu-img check fails (%v); Check: %+v, %v", name, qemuErr, checked, err)
		}
		return nil
	case err != nil:
		t.Fatalf("%s: Check: %v", name, err)
	case *checked != *want:
		t.Errorf("%s: Check says %+v, qemu-img check %+v", name, *checked, *want)
	}
	return want
}

// TestProveAsQemuImg: images of every layout cbtflow reads (2 MiB
// clusters with extended L2 entries, 64 KiB clusters with and without),
// full and overlays, made by qemu-img and by Create (with tables), written
// by qemu with data, zeros stored and not, discards, part clusters, a
// disk that ends inside a cluster, and a dense image of qemu-img convert:
// Prove proves each clean with the figures qemu-img check prints of it.
func TestProveAsQemuImg(t *testing.T) {
	const mib = 1 << 20
	size := int64(70*mib + 3*64<<10 + 4096)
	for _, opts := range []string{"", qemu.ImageOptions, "cluster_size=64K,extended_l2=on"} {
		t.Run(strings.ReplaceAll(opts, ",", "+"), func(t *testing.T) {
			dir := t.TempDir()
			fresh := filepath.Join(dir, "fresh.qcow2")
			create(t, fresh, opts, size, "")
			proveAsQemu(t, fresh, true)
			base, top, empty := sampleImages(t, dir, opts, size)
			for _, p := range []string{base, top, empty} {
				proveAsQemu(t, p, true)
			}
			dense := filepath.Join(dir, "dense.qcow2")
			qemuImg(t, "convert", "-O", "qcow2", top, dense)
			proveAsQemu(t, dense, true)
		})
	}
	t.Run("created", func(t *testing.T) {
		dir := t.TempDir()
		const gib = int64(1) << 30
		const table = 256 * gib
		base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
		if err := Create(base, 2<<40, "", Range{0, 2 * mib}, Range{5 * table, mib}); err != nil {
			t.Fatal(err)
		}
		proveAsQemu(t, base, true)
		qemuIO(t, base, "write -q -P 0x11 0 1M", fmt.Sprintf("write -q -P 0x11 %d 1M", 5*table),
			fmt.Sprintf("write -q -P 0x12 %d 64K", 7*table)) // a table qemu makes
		if err := Create(top, 0, "base.qcow2", Range{64 << 10, 64 << 10}, Range{3*table - 64<<10, 128 << 10}); err != nil {
			t.Fatal(err)
		}
		qemuIO(t, top, "write -q -P 0x22 64K 64K", fmt.Sprintf("write -q -P 0x33 %d 128K", 3*table-64<<10))
		for _, p := range []string{base, top} {
			proveAsQemu(t, p, true)
		}
	})
}

// image is a clean test image to damage: a 2 MiB-cluster image with
// extended L2 entries (qemu.ImageOptions) holding data in two L2 tables,
// and where its metadata is.
type image struct {
	path     string
	h        header
	l1       int64   // the L1 table's offset
	l2       []int64 // the L2 tables' offsets
	data     []int64 // offsets of the L2 entries of the first table's data clusters
	rt       int64   // the refcount table's offset
	block    int64   // the first refcount block's offset
	fileSize int64
}

func damageable(t *testing.T, dir string) *image {
	t.Helper()
	const gib = int64(1) << 30
	p := filepath.Join(dir, "image.qcow2")
	if err := Create(p, 600*gib, "", Range{0, 8 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, p, "write -q -P 1 0 2M", "write -q -P 2 2M 64K", "write -q -P 3 6M 128K",
		fmt.Sprintf("write -q -P 4 %d 1M", 300*gib))
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := readHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	im := &image{path: p, h: h, l1: int64(h.l1Offset), rt: int64(h.rtOffset)}
	u64 := func(off int64) uint64 {
		var b [8]byte
		if _, err := f.ReadAt(b[:], off); err != nil {
			t.Fatal(err)
		}
		return binary.BigEndian.Uint64(b[:])
	}
	for i := int64(0); i < int64(h.l1Size); i++ {
		if e := u64(im.l1+i*8) & offsetMask; e != 0 {
			im.l2 = append(im.l2, int64(e))
		}
	}
	for j := int64(0); j < 8; j++ {
		if u64(im.l2[0]+j*16) != 0 {
			im.data = append(im.data, im.l2[0]+j*16)
		}
	}
	im.block = int64(u64(im.rt))
	fi, _ := f.Stat()
	im.fileSize = fi.Size()
	if len(im.l2) != 2 || len(im.data) != 3 {
		t.Fatalf("the test image has %d L2 tables and %d data clusters in its first: want 2 and 3", len(im.l2), len(im.data))
	}
	if r := proveAsQemu(t, p, true); r == nil || !r.Clean() || r.Leaks != 0 {
		t.Fatalf("the test image is not clean: %+v", r)
	}
	return im
}

func (im *image) put64(t *testing.T, off int64, v uint64) {
	t.Helper()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	im.write(t, off, b[:])
}

func (im *image) get64(t *testing.T, off int64) uint64 {
	t.Helper()
	b := make([]byte, 8)
	f, err := os.Open(im.path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b)
}

func (im *image) write(t *testing.T, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(im.path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// refcount sets the stored refcount of the cluster at file offset off.
func (im *image) refcount(t *testing.T, off int64, n uint16) {
	t.Helper()
	im.write(t, im.block+off/createCluster*2, []byte{byte(n >> 8), byte(n)})
}

// TestProveRefusesDamage: an image damaged in each way qemu-img check
// counts (and a few it may not) is not proven clean, and Check returns
// what qemu-img check says of it. Prove never calls clean what differs
// from a clean image.
func TestProveRefusesDamage(t *testing.T) {
	const copied = uint64(1) << 63
	for _, tc := range []struct {
		name      string
		damage    func(t *testing.T, im *image)
		qemuFinds bool // qemu-img check reports it (corruption, error or leak)
	}{
		{"data cluster not on a cluster", func(t *testing.T, im *image) {
			im.put64(t, im.data[1], im.get64(t, im.data[1])+512)
		}, true},
		{"data cluster used twice", func(t *testing.T, im *image) {
			im.put64(t, im.data[1], im.get64(t, im.data[0]))
		}, true},
		{"data cluster past the file's end", func(t *testing.T, im *image) {
			im.put64(t, im.data[1], uint64(im.fileSize+4*createCluster)|copied)
		}, true},
		{"data cluster's copied flag cleared", func(t *testing.T, im *image) {
			im.put64(t, im.data[1], im.get64(t, im.data[1])&^copied)
		}, true},
		{"L2 table's copied flag cleared", func(t *testing.T, im *image) {
			im.put64(t, im.l1, im.get64(t, im.l1)&^copied)
		}, true},
		{"L2 entry's reserved bit", func(t *testing.T, im *image) {
			im.put64(t, im.data[1], im.get64(t, im.data[1])|1<<3)
		}, false},
		{"zero flag in an extended L2 entry", func(t *testing.T, im *image) {
			im.put64(t, im.data[1], im.get64(t, im.data[1])|1)
		}, false},
		{"compressed cluster", func(t *testing.T, im *image) {
			im.put64(t, im.data[1], im.get64(t, im.data[1])|1<<62)
		}, false},
		{"data cluster's refcount 0", func(t *testing.T, im *image) {
			im.refcount(t, int64(im.get64(t, im.data[0])&offsetMask), 0)
		}, true},
		{"data cluster's refcount 2", func(t *testing.T, im *image) {
			im.refcount(t, int64(im.get64(t, im.data[0])&offsetMask), 2)
		}, true},
		{"L2 table's refcount 0", func(t *testing.T, im *image) {
			im.refcount(t, im.l2[1], 0)
		}, true},
		{"unused cluster counted (a leak)", func(t *testing.T, im *image) {
			// A cluster added at the file's end, counted used.
			end := (im.fileSize + createCluster - 1) / createCluster * createCluster
			if err := os.Truncate(im.path, end+createCluster); err != nil {
				t.Fatal(err)
			}
			im.refcount(t, end, 1)
		}, true},
		{"subcluster allocated and zero", func(t *testing.T, im *image) {
			bm := im.get64(t, im.data[1]+8)
			im.put64(t, im.data[1]+8, bm|bm<<32)
		}, true},
		{"unallocated cluster with allocated subclusters", func(t *testing.T, im *image) {
			im.put64(t, im.l2[0]+7*16+8, 1)
		}, true},
		{"L2 table not on a cluster", func(t *testing.T, im *image) {
			im.put64(t, im.l1, im.get64(t, im.l1)+512)
		}, true},
		{"L2 table past the file's end", func(t *testing.T, im *image) {
			im.put64(t, im.l1, uint64(im.fileSize+8*createCluster)|copied)
		}, true},
		{"refcount block gone", func(t *testing.T, im *image) {
			im.put64(t, im.rt, 0)
		}, true},
		{"refcount block past an int64", func(t *testing.T, im *image) {
			im.put64(t, im.rt, 0xb7<<56)
		}, true},
		{"refcount block not on a cluster", func(t *testing.T, im *image) {
			im.put64(t, im.rt, uint64(im.block+512))
		}, true},
		{"header marked corrupt", func(t *testing.T, im *image) {
			im.put64(t, 72, im.get64(t, 72)|incompatCorrupt)
		}, false},
		{"file cut short", func(t *testing.T, im *image) {
			if err := os.Truncate(im.path, im.fileSize-2*createCluster); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"data cluster used by two tables", func(t *testing.T, im *image) {
			im.put64(t, im.l2[1]+5*16, im.get64(t, im.data[0]))
			im.put64(t, im.l2[1]+5*16+8, im.get64(t, im.data[0]+8))
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := damageable(t, t.TempDir())
			tc.damage(t, im)
			r := proveAsQemu(t, im.path, false)
			if _, err := Prove(t.Context(), im.path); err == nil {
				t.Fatal("Prove calls the damaged image clean")
			} else {
				t.Logf("Prove: %v", err)
			}
			if found := r == nil || !r.Clean() || r.Leaks > 0; tc.qemuFinds && !found {
				t.Errorf("qemu-img check finds nothing (%+v): the damage is not what the case says", r)
			}
		})
	}
}

// TestProvePastTheDisk: an L2 entry that maps past the disk's end (the
// last table of a disk that ends inside it) is not proven clean.
func TestProvePastTheDisk(t *testing.T) {
	p := filepath.Join(t.TempDir(), "small.qcow2")
	create(t, p, "cluster_size=64K", 10<<20, "")
	qemuIO(t, p, "write -q -P 1 0 64K")
	proveAsQemu(t, p, true)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	h, err := readHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	if _, err := f.ReadAt(b[:], int64(h.l1Offset)); err != nil {
		t.Fatal(err)
	}
	l2 := int64(binary.BigEndian.Uint64(b[:]) & offsetMask)
	if _, err := f.ReadAt(b[:], l2); err != nil {
		t.Fatal(err)
	}
	// 10 MiB is 160 clusters: entry 200 maps past the disk.
	if _, err := f.WriteAt(b[:], l2+200*8); err != nil {
		t.Fatal(err)
	}
	f.Close()
	proveAsQemu(t, p, false)
	if _, err := Prove(t.Context(), p); !errors.Is(err, ErrNotProven) {
		t.Fatalf("Prove of an entry past the disk: %v", err)
	}
}

// TestProveRefcountPastTheFile: a refcount of a cluster past the file's
// end, which qemu-img check does not look at, does not keep Prove from
// proving the image clean with qemu-img's figures (Prove does not read
// it: the rest of the refcount block qemu writes whole).
func TestProveRefcountPastTheFile(t *testing.T) {
	im := damageable(t, t.TempDir())
	im.refcount(t, (im.fileSize/createCluster+3)*createCluster, 1)
	if r := proveAsQemu(t, im.path, true); r == nil || !r.Clean() || r.Leaks != 0 {
		t.Fatalf("qemu-img check: %+v", r)
	}
}

// TestProveRefusesWhatQemuCannotOpen: an image whose metadata counts
// clean but which qemu-img check cannot open (exit 1) — a header field
// or extension qemu refuses, or a backing chain it cannot open — is not
// proven clean, and Prove does not panic on offsets past an int64.
func TestProveRefusesWhatQemuCannotOpen(t *testing.T) {
	const mib = 1 << 20
	put := func(t *testing.T, p string, off int64, b []byte) {
		t.Helper()
		im := &image{path: p}
		im.write(t, off, b)
	}
	u64 := func(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
	u32 := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	for _, tc := range []struct {
		name    string
		opts    string
		overlay bool
		damage  func(t *testing.T, p string, h header)
	}{
		{"backing file missing", qemu.ImageOptions, true, func(t *testing.T, p string, h header) {
			if err := os.Remove(filepath.Join(filepath.Dir(p), "base.qcow2")); err != nil {
				t.Fatal(err)
			}
		}},
		{"backing file's backing file missing", qemu.ImageOptions, true, func(t *testing.T, p string, h header) {
			dir := filepath.Dir(p)
			if err := os.Rename(filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "mid.qcow2")); err != nil {
				t.Fatal(err)
			}
			create(t, filepath.Join(dir, "base0.qcow2"), qemu.ImageOptions, 64*mib, "")
			create(t, filepath.Join(dir, "base.qcow2"), qemu.ImageOptions, 0, "base0.qcow2")
			if err := os.Remove(filepath.Join(dir, "base0.qcow2")); err != nil {
				t.Fatal(err)
			}
		}},
		{"backing format unknown", qemu.ImageOptions, true, func(t *testing.T, p string, h header) {
			f, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			i := strings.Index(string(f[:4096]), "qcow2")
			put(t, p, int64(i), []byte("qcowx"))
		}},
		{"backing file name of 1024 bytes", qemu.ImageOptions, true, func(t *testing.T, p string, h header) {
			name := strings.Repeat("./", (1024-len("base.qcow2"))/2) + "base.qcow2"
			put(t, p, int64(h.backingOffset), []byte(name))
			put(t, p, 16, u32(uint32(len(name))))
		}},
		{"backing format extension of 16 bytes", qemu.ImageOptions, false, func(t *testing.T, p string, h header) {
			ext := append(append(u32(extBackingFormat), u32(16)...), "qcow2\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"...)
			put(t, p, 112, append(ext, make([]byte, 8)...))
		}},
		{"header extension end with a length past the cluster", qemu.ImageOptions, false, func(t *testing.T, p string, h header) {
			ext := append(append(u32(extBackingFormat), u32(5)...), "qcow2\x00\x00\x00"...)
			put(t, p, 112, append(append(ext, u32(0)...), u32(4<<20)...))
		}},
		{"unknown compression type", qemu.ImageOptions, false, func(t *testing.T, p string, h header) {
			put(t, p, 104, []byte{7})
		}},
		{"compression bit with zlib", qemu.ImageOptions, false, func(t *testing.T, p string, h header) {
			put(t, p, 72, u64(incompatExtendedL2|incompatCompress))
		}},
		{"data-file-raw without a data file", qemu.ImageOptions, false, func(t *testing.T, p string, h header) {
			put(t, p, 88, u64(2))
		}},
		{"refcount table of 129 64 KiB clusters", "cluster_size=64K", false, func(t *testing.T, p string, h header) {
			// The table moved to the file's end, 129 clusters (qemu's
			// limit: 8 MiB), counted in the refcount block.
			const c = 64 << 10
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			rt := int64(h.rtOffset)
			blk := int64(binary.BigEndian.Uint64(b[rt:]) & offsetMask)
			at := (int64(len(b)) + c - 1) / c
			if err := os.Truncate(p, (at+129)*c); err != nil {
				t.Fatal(err)
			}
			put(t, p, at*c, b[rt:rt+int64(h.rtClusters)*c])
			put(t, p, rt, make([]byte, c))
			put(t, p, 48, u64(uint64(at*c)))
			put(t, p, 56, u32(129))
			for k := at; k < at+129; k++ {
				put(t, p, blk+2*k, []byte{0, 1})
			}
			put(t, p, blk+2*(rt/c), []byte{0, 0})
		}},
		{"snapshot table offset past an int64, without snapshots", qemu.ImageOptions, false, func(t *testing.T, p string, h header) {
			put(t, p, 64, u64(0xffffffff00000000))
		}},
		{"refcount table offset past an int64", qemu.ImageOptions, false, func(t *testing.T, p string, h header) {
			put(t, p, 48, u64(1<<63))
		}},
		{"L1 table offset past an int64", qemu.ImageOptions, false, func(t *testing.T, p string, h header) {
			put(t, p, 40, u64(1<<63))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "image.qcow2")
			if tc.overlay {
				create(t, filepath.Join(dir, "base.qcow2"), tc.opts, 64*mib, "")
				create(t, p, tc.opts, 0, "base.qcow2")
			} else {
				create(t, p, tc.opts, 64*mib, "")
			}
			qemuIO(t, p, "write -q -P 1 0 1M")
			proveAsQemu(t, p, true)
			f, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			h, err := readHeader(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			tc.damage(t, p, h)
			if r := proveAsQemu(t, p, false); r != nil {
				t.Errorf("qemu-img check opens it (%+v): the damage is not what the case says", r)
			}
			if _, err := Prove(t.Context(), p); err == nil {
				t.Fatal("Prove calls an image qemu-img check cannot open clean")
			} else {
				t.Logf("Prove: %v", err)
			}
		})
	}
}

// TestProveBackingFIFO: an overlay whose backing file name names a FIFO
// does not block Prove (qemu-img check itself blocks on it: Prove does
// not ask it here).
func TestProveBackingFIFO(t *testing.T) {
	dir := t.TempDir()
	create(t, filepath.Join(dir, "base.qcow2"), qemu.ImageOptions, 64<<20, "")
	p := filepath.Join(dir, "image.qcow2")
	create(t, p, qemu.ImageOptions, 0, "base.qcow2")
	if err := os.Remove(filepath.Join(dir, "base.qcow2")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "base.qcow2"), 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := Prove(t.Context(), p)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Prove calls an overlay on a FIFO clean")
		}
		t.Logf("Prove: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("Prove blocks on a backing FIFO")
	}
}
