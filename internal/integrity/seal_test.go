package integrity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/qcow2"
	"github.com/cbtflow/cbtflow/internal/qemu"
)

// write is one write of a test image: n bytes of value pattern at off, or
// zeroes (pattern -1).
type write struct {
	off, n  int64
	pattern int
}

// sealedImage makes a real QCOW2 image (over backing, when set) with
// qemu-io and its digest file as a transfer would: a data record per
// written range, a zero record per zeroed one.
func sealedImage(t *testing.T, path, backing string, writes []write) {
	t.Helper()
	sealedImageOf(t, path, backing, 0, writes)
}

// sealedImageOf is sealedImage with the digest file's records made with
// alg (0: the default).
func sealedImageOf(t *testing.T, path, backing string, alg digest.Algorithm, writes []write) {
	t.Helper()
	ctx := context.Background()
	var err error
	if backing == "" {
		err = qemu.Create(ctx, path, 64<<20)
	} else {
		err = qemu.CreateOverlay(ctx, path, backing)
	}
	if err != nil {
		t.Fatal(err)
	}
	w, err := digest.Create(digest.PathOf(path), digest.Header{Image: filepath.Base(path), Capacity: 64 << 20, Overlay: backing != "", Algorithm: alg})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	args := []string{"-f", "qcow2"}
	for _, x := range writes {
		if x.pattern < 0 {
			args = append(args, "-c", fmt.Sprintf("write -z %d %d", x.off, x.n))
			w.Add(digest.Zero(x.off, x.n))
			continue
		}
		args = append(args, "-c", fmt.Sprintf("write -P %d %d %d", x.pattern, x.off, x.n))
		w.Add(digest.Data(w.Algorithm(), x.off, bytes.Repeat([]byte{byte(x.pattern)}, int(x.n))))
	}
	if out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	if err := w.Commit(64 << 20); err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
}

// sealedChain is a full image and an overlay with partial clusters (the
// rest of a 64 KiB cluster filled from the backing file) and a zeroed range.
func sealedChain(t *testing.T) (full, top string) {
	t.Helper()
	return sealedChainOf(t, 0)
}

// sealedChainOf is sealedChain with digest files of alg.
func sealedChainOf(t *testing.T, alg digest.Algorithm) (full, top string) {
	t.Helper()
	dir := t.TempDir()
	full, top = filepath.Join(dir, "b1.qcow2"), filepath.Join(dir, "b2.qcow2")
	sealedImageOf(t, full, "", alg, []write{{0, 1 << 20, 1}, {10 << 20, 100 << 10, 2}, {20 << 20, 1 << 20, 5}})
	sealedImageOf(t, top, full, alg, []write{{512 << 10, 64 << 10, 3}, {20<<20 + 4096, 10 << 10, 4}, {30 << 20, 1 << 20, -1}})
	return full, top
}

func seal(t *testing.T, path string) string {
	t.Helper()
	_, sum, err := Seal(context.Background(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !IsSeal(sum) {
		t.Fatalf("Seal(%s) = %q, not a seal", path, sum)
	}
	return sum
}

// sealedRecord records the full image at path as a commit would: size,
// seal and stamp.
func sealedRecord(t *testing.T, path string) Image {
	t.Helper()
	size, st, err := StampOf(path)
	if err != nil {
		t.Fatal(err)
	}
	return Image{Path: path, Size: size, SHA256: seal(t, path), Stamp: st}
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// hostSpans returns where the disk range [off, off+n) lies in the image
// file itself (its data, not its zero clusters), in disk order.
func hostSpans(off, n int64, ext []qemu.MapExtent) []span {
	var out []span
	for _, p := range recordParts(off, n, ext, false) {
		if !p.zero {
			out = append(out, p.span)
		}
	}
	return out
}

// hostOf returns where the image at path holds disk offset off itself.
func hostOf(t *testing.T, path string, off int64) int64 {
	t.Helper()
	ext, err := qemu.MapLayer(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	s := hostSpans(off, 1, ext)
	if len(s) != 1 {
		t.Fatalf("%s does not hold disk offset %d itself: %+v", path, off, ext)
	}
	return s[0].off
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestSealSoundImages(t *testing.T) {
	full, top := sealedChain(t)
	for _, path := range []string{full, top} {
		sum := seal(t, path)
		if again := seal(t, path); again != sum {
			t.Errorf("%s sealed twice: %s, then %s", path, sum, again)
		}
		if err := VerifySeal(context.Background(), path, sum, nil); err != nil {
			t.Errorf("VerifySeal of a sound %s: %v", path, err)
		}
		if err := Verify(context.Background(), path, sum, nil); err != nil {
			t.Errorf("Verify of a sound %s: %v", path, err)
		}
		// The seal is not the file's SHA-256, and a SHA-256 still verifies.
		_, plain, err := Hash(context.Background(), path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(sum, plain) {
			t.Errorf("the seal %s holds the file's SHA-256", sum)
		}
		if err := Verify(context.Background(), path, plain, nil); err != nil {
			t.Errorf("Verify of %s against its SHA-256: %v", path, err)
		}
	}
}

// TestSealReadsLittle: sealing reads the file's metadata and the parts of
// clusters no record covers, not the records' data.
func TestSealReadsLittle(t *testing.T) {
	full, top := sealedChain(t)
	for _, c := range []struct {
		path    string
		written int64 // bytes of data records
	}{{full, 1<<20 + 100<<10 + 1<<20}, {top, 64<<10 + 10<<10}} {
		df, err := digest.Read(digest.PathOf(c.path))
		if err != nil {
			t.Fatal(err)
		}
		ext, err := qemu.MapLayer(context.Background(), c.path)
		if err != nil {
			t.Fatal(err)
		}
		spans, err := recordSpans(df.Records, ext, c.path == full)
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		for _, s := range spans {
			n += s.n
		}
		if n != c.written {
			t.Errorf("%s: the records cover %d bytes of the file, want %d", c.path, n, c.written)
		}
	}
}

func wantSealDamage(t *testing.T, err error, path string, says ...string) {
	t.Helper()
	var d *Damage
	if !errors.As(err, &d) {
		t.Fatalf("got %v, want Damage of %s", err, path)
	}
	if d.Path != path {
		t.Errorf("Damage names %s, want %s", d.Path, path)
	}
	for _, s := range says {
		if !strings.Contains(d.Reason, s) {
			t.Errorf("Damage %q does not say %q", d.Reason, s)
		}
	}
}

func TestSealDetectsAlteration(t *testing.T) {
	full, top := sealedChain(t)
	sums := map[string]string{full: seal(t, full), top: seal(t, top)}
	cases := []struct {
		name  string
		image string
		alter func(t *testing.T, path string)
		says  []string
	}{
		{"a byte of a record's data", top, func(t *testing.T, p string) { flipByte(t, p, hostOf(t, p, 20<<20+4096+100)) },
			[]string{"holds other data at disk offset 20975616 (10240 bytes)", "(BLAKE3 ", ".digests"}},
		{"a byte of a full image's data", full, func(t *testing.T, p string) { flipByte(t, p, hostOf(t, p, 10<<20+5)) },
			[]string{"holds other data at disk offset 10485760"}},
		{"a byte a cluster holds from the backing file", top, func(t *testing.T, p string) { flipByte(t, p, hostOf(t, p, 20<<20+100)) },
			[]string{"has seal"}},
		{"a byte of the header", top, func(t *testing.T, p string) { flipByte(t, p, 0x68+7) }, nil},
		{"a byte appended", full, func(t *testing.T, p string) {
			f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.Write([]byte{0}); err != nil {
				t.Fatal(err)
			}
		}, []string{"has seal"}},
		{"a digest of the digest file", top, func(t *testing.T, p string) {
			// A data record's digest: the file stays well formed.
			b, err := os.ReadFile(digest.PathOf(p))
			if err != nil {
				t.Fatal(err)
			}
			r := digest.Data(digest.Default, 512<<10, bytes.Repeat([]byte{3}, 64<<10))
			at := bytes.Index(b, r.Sum[:])
			if at < 0 {
				t.Fatal("the record's digest is not in the digest file")
			}
			flipByte(t, digest.PathOf(p), int64(at+3))
		}, []string{"has seal"}},
		{"the digest file removed", full, func(t *testing.T, p string) {
			if err := os.Remove(digest.PathOf(p)); err != nil {
				t.Fatal(err)
			}
		}, []string{"digest file", "missing"}},
		{"the digest file cut short", full, func(t *testing.T, p string) {
			if err := os.Truncate(digest.PathOf(p), 20); err != nil {
				t.Fatal(err)
			}
		}, []string{"digest file", "malformed"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, filepath.Base(c.image))
			copyFile(t, c.image, path)
			copyFile(t, digest.PathOf(c.image), digest.PathOf(path))
			if c.image == top {
				// The overlay names its backing file by a relative path.
				copyFile(t, full, filepath.Join(dir, filepath.Base(full)))
			}
			if err := VerifySeal(context.Background(), path, sums[c.image], nil); err != nil {
				t.Fatalf("the copy before the change: %v", err)
			}
			c.alter(t, path)
			wantSealDamage(t, VerifySeal(context.Background(), path, sums[c.image], nil), path, c.says...)
			wantSealDamage(t, Verify(context.Background(), path, sums[c.image], nil), path)
		})
	}
}

// TestSealRecordAlgorithms: images whose digest files were written with
// SHA-256 (an older release's) and with BLAKE3 are sealed and verified,
// each record checked with its file's algorithm, and a byte of a record's
// data altered is found and named with it.
func TestSealRecordAlgorithms(t *testing.T) {
	for _, alg := range []digest.Algorithm{digest.SHA256, digest.BLAKE3} {
		t.Run(alg.String(), func(t *testing.T) {
			full, top := sealedChainOf(t, alg)
			for _, path := range []string{full, top} {
				df, err := digest.Read(digest.PathOf(path))
				if err != nil || df.Header.Algorithm != alg {
					t.Fatalf("%s's digest file: %v, %+v; want %v", path, err, df, alg)
				}
				sum := seal(t, path)
				if err := VerifySeal(context.Background(), path, sum, nil); err != nil {
					t.Fatalf("VerifySeal of a sound %s: %v", path, err)
				}
				// A byte of the first data record's data.
				r := df.Records[0]
				if r.Kind != digest.KindData {
					t.Fatalf("%s: first record %+v", path, r)
				}
				flipByte(t, path, hostOf(t, path, r.Offset+7))
				err = VerifySeal(context.Background(), path, sum, nil)
				wantSealDamage(t, err, path, fmt.Sprintf("holds other data at disk offset %d (%d bytes)", r.Offset, r.Length),
					"("+alg.String()+" ", digest.PathOf(path))
				wantSealDamage(t, Verify(context.Background(), path, sum, nil), path, "("+alg.String()+" ")
			}
		})
	}
}

func TestSealNeedsTheRecordsData(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "b1.qcow2")
	sealedImage(t, path, "", []write{{0, 64 << 10, 1}})
	// A digest file that records a write the image does not hold.
	w, err := digest.Create(digest.PathOf(path), digest.Header{Image: "b1.qcow2", Capacity: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	w.Add(digest.Data(w.Algorithm(), 0, bytes.Repeat([]byte{1}, 64<<10)))
	w.Add(digest.Data(w.Algorithm(), 40<<20, bytes.Repeat([]byte{1}, 64<<10)))
	if err := w.Commit(64 << 20); err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if _, _, err := Seal(context.Background(), path, nil); !errors.Is(err, ErrNotSealable) {
		t.Errorf("Seal of an image without a recorded write: %v, want ErrNotSealable", err)
	}
	// No digest file at all.
	if err := os.Remove(digest.PathOf(path)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Seal(context.Background(), path, nil); !errors.Is(err, ErrNotSealable) {
		t.Errorf("Seal without a digest file: %v, want ErrNotSealable", err)
	}
}

// TestCheckUsesTheSeal: a chain check re-reads an image whose stamp changed
// against its seal.
func TestCheckUsesTheSeal(t *testing.T) {
	full, _ := sealedChain(t)
	im := sealedRecord(t, full)
	im.Stamp = Stamp{Inode: im.Stamp.Inode} // changed: the image is re-read
	out, err := Check(context.Background(), im, nil)
	if err != nil || !out.Hashed {
		t.Fatalf("Check with a changed stamp: %+v, %v; want a sound re-read", out, err)
	}
	flipByte(t, full, hostOf(t, full, 100))
	_, err = Check(context.Background(), im, nil)
	wantSealDamage(t, err, full, "holds other data at disk offset 0")
}

// TestVerifySealBeats: the bytes a check reports read grow with the read
// and never pass the file's size (a restore shows them as its progress).
func TestVerifySealBeats(t *testing.T) {
	full, _ := sealedChain(t)
	sum := seal(t, full)
	fi, err := os.Stat(full)
	if err != nil {
		t.Fatal(err)
	}
	defer func(d time.Duration) { beatEvery = d }(beatEvery)
	beatEvery = 0 // a beat at every read
	var beats []int64
	if err := VerifySeal(context.Background(), full, sum, func(n int64) { beats = append(beats, n) }); err != nil {
		t.Fatal(err)
	}
	if len(beats) < 3 {
		t.Fatalf("%d beats, want one per read: %v", len(beats), beats)
	}
	for i, n := range beats {
		if n > fi.Size() || (i > 0 && n < beats[i-1]) {
			t.Fatalf("beats %v: not growing up to the file's %d bytes", beats, fi.Size())
		}
	}
}

// viaQemuImg makes the seal map images with qemu-img only, as it does
// those its own reader (package qcow2) refuses.
func viaQemuImg(t *testing.T) {
	t.Helper()
	saved := layerMap
	layerMap = func(*os.File) ([]qemu.MapExtent, error) { return nil, qcow2.ErrUnsupported }
	t.Cleanup(func() { layerMap = saved })
}

// fakeQemuImg points qemu.QemuImg at a script for the test.
func fakeQemuImg(t *testing.T, script string, mode os.FileMode) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu-img")
	if err := os.WriteFile(p, []byte(script), mode); err != nil {
		t.Fatal(err)
	}
	old := qemu.QemuImg
	qemu.QemuImg = p
	t.Cleanup(func() { qemu.QemuImg = old })
}

// TestVerifySealQemuImgFailing: qemu-img that cannot run, or that dies
// by a signal (the OOM killer), says nothing about the image: the check
// fails with a plain error, never Damage (which would mark the chain
// damaged). qemu-img that refuses the image says Damage.
func TestVerifySealQemuImgFailing(t *testing.T) {
	full, _ := sealedChain(t)
	sum := seal(t, full)
	for _, c := range []struct {
		name   string
		script string
		mode   os.FileMode
	}{
		{"killed by a signal", "#!/bin/sh\nkill -KILL $$\n", 0o755},
		{"not executable", "#!/bin/sh\nexit 0\n", 0o644},
	} {
		t.Run(c.name, func(t *testing.T) {
			viaQemuImg(t)
			fakeQemuImg(t, c.script, c.mode)
			for _, err := range []error{
				VerifySeal(context.Background(), full, sum, nil),
				Verify(context.Background(), full, sum, nil),
			} {
				var d *Damage
				if err == nil || errors.As(err, &d) {
					t.Errorf("got %v, want a plain error", err)
				}
			}
		})
	}
	// A file qemu-img cannot read as QCOW2 is damaged.
	dir := t.TempDir()
	path := filepath.Join(dir, filepath.Base(full))
	copyFile(t, full, path)
	copyFile(t, digest.PathOf(full), digest.PathOf(path))
	flipByte(t, path, 0)
	wantSealDamage(t, VerifySeal(context.Background(), path, sum, nil), path, "mapping")
}

// TestVerifySealFileReplaced: a file renamed over the image's path while
// it is checked (a prune's merged image, which a restore does not wait
// for) is not taken for damage of the file the check opened: the mapping
// is of the one file, the bytes of the other.
func TestVerifySealFileReplaced(t *testing.T) {
	full, top := sealedChain(t)
	sum := seal(t, full)
	dir := t.TempDir()
	path := filepath.Join(dir, filepath.Base(full))
	copyFile(t, full, path)
	copyFile(t, digest.PathOf(full), digest.PathOf(path))
	other := filepath.Join(dir, "other")
	copyFile(t, top, other)
	real, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	// qemu-img starts just after the rename. (The seal's own reader
	// maps the file it opened, so only the way through qemu-img can mix
	// two files.)
	viaQemuImg(t)
	fakeQemuImg(t, fmt.Sprintf("#!/bin/sh\nmv -f %s %s\nexec %s \"$@\"\n", other, path, real), 0o755)
	err = VerifySeal(context.Background(), path, sum, nil)
	var d *Damage
	if err == nil || errors.As(err, &d) {
		t.Fatalf("got %v, want a plain error", err)
	}
}

// pieceImage makes an image at path (over backing, when set), applies the
// qemu-io commands, and writes its digest file with one data record of a
// 1 MiB piece at offset 0 holding data: what the copier records for a
// piece with zero blocks in it, which it skips on a fresh image and
// writes as NBD zeroes on an overlay.
func pieceImage(t *testing.T, path, backing string, data []byte, cmds ...string) {
	t.Helper()
	ctx := context.Background()
	var err error
	if backing == "" {
		err = qemu.Create(ctx, path, 64<<20)
	} else {
		err = qemu.CreateOverlay(ctx, path, backing)
	}
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	if out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	w, err := digest.Create(digest.PathOf(path), digest.Header{Image: filepath.Base(path), Capacity: 64 << 20, Overlay: backing != ""})
	if err != nil {
		t.Fatal(err)
	}
	w.Add(digest.Data(w.Algorithm(), 0, data))
	if _, _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
}

// TestSealPieceWithZeroBlocks: a data record whose piece holds an all-zero
// 64 KiB block (skipped on a fresh image, a zero cluster on an overlay) is
// sealed, its zeros taken from the image's own mapping, not its data read;
// a block the image does not hold itself (its backing file's shows
// through) still makes it unsealable.
func TestSealPieceWithZeroBlocks(t *testing.T) {
	dir := t.TempDir()
	piece := bytes.Repeat([]byte{7}, 1<<20)
	copy(piece[64<<10:128<<10], make([]byte, 64<<10))
	full := filepath.Join(dir, "b1.qcow2")
	pieceImage(t, full, "", piece, "write -P 7 0 64k", "write -P 7 128k 896k")
	top := filepath.Join(dir, "b2.qcow2")
	pieceImage(t, top, full, piece, "write -P 7 0 64k", "write -z -u 64k 64k", "write -P 7 128k 896k")
	topAlloc := filepath.Join(dir, "b3.qcow2")
	pieceImage(t, topAlloc, full, piece, "write -P 7 0 64k", "write -z 64k 64k", "write -P 7 128k 896k")
	for _, path := range []string{full, top, topAlloc} {
		sum := seal(t, path)
		if err := VerifySeal(context.Background(), path, sum, nil); err != nil {
			t.Errorf("VerifySeal of a sound %s: %v", path, err)
		}
		df, err := digest.Read(digest.PathOf(path))
		if err != nil {
			t.Fatal(err)
		}
		ext, err := qemu.MapLayer(context.Background(), path)
		if err != nil {
			t.Fatal(err)
		}
		spans, err := recordSpans(df.Records, ext, path == full)
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		for _, s := range spans {
			n += s.n
		}
		if n != 1<<20-64<<10 {
			t.Errorf("%s: the record covers %d bytes of the file, want %d", path, n, 1<<20-64<<10)
		}
	}

	// Altered: data where the zero block was, a byte of the data.
	for _, c := range []struct {
		name, image string
		alter       func(t *testing.T, path string)
	}{
		{"data written over the zero block", full, func(t *testing.T, p string) {
			if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 9 70k 4k", p).CombinedOutput(); err != nil {
				t.Fatalf("qemu-io: %v: %s", err, out)
			}
		}},
		{"data written over the zero cluster", top, func(t *testing.T, p string) {
			if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 9 70k 4k", p).CombinedOutput(); err != nil {
				t.Fatalf("qemu-io: %v: %s", err, out)
			}
		}},
		{"a byte of the data", top, func(t *testing.T, p string) { flipByte(t, p, hostOf(t, p, 200<<10)) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := t.TempDir()
			path := filepath.Join(d, filepath.Base(c.image))
			copyFile(t, c.image, path)
			copyFile(t, digest.PathOf(c.image), digest.PathOf(path))
			copyFile(t, full, filepath.Join(d, "b1.qcow2"))
			copyFile(t, digest.PathOf(full), digest.PathOf(filepath.Join(d, "b1.qcow2")))
			sum := seal(t, path)
			c.alter(t, path)
			wantSealDamage(t, VerifySeal(context.Background(), path, sum, nil), path)
		})
	}

	// The backing file's block shows through the overlay: not its own.
	through := filepath.Join(dir, "b4.qcow2")
	pieceImage(t, through, full, piece, "write -P 7 0 64k", "write -P 7 128k 896k")
	if _, _, err := Seal(context.Background(), through, nil); !errors.Is(err, ErrNotSealable) {
		t.Errorf("Seal of an overlay whose record's block is its backing file's: %v, want ErrNotSealable", err)
	}
}

// TestCheckSealedNeedsItsDigestFile: a chain check of a sealed image whose
// stamp is unchanged (no data read) still finds its digest file gone:
// without it the seal cannot be proven, and a restore would refuse every
// point built on the image.
func TestCheckSealedNeedsItsDigestFile(t *testing.T) {
	full, _ := sealedChain(t)
	im := sealedRecord(t, full)
	if out, err := Check(context.Background(), im, nil); err != nil || out.Hashed {
		t.Fatalf("Check of an unchanged image: %+v, %v; want sound, not re-read", out, err)
	}
	if err := os.Remove(digest.PathOf(full)); err != nil {
		t.Fatal(err)
	}
	_, err := Check(context.Background(), im, nil)
	wantSealDamage(t, err, full, "digest file", "missing")
}
