package copier_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/qcow2"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// openImage makes a fresh image (or an overlay on backing, named in
// dir) for the extents and opens it for the copier to write.
func openImage(t *testing.T, path string, size int64, backing string, ex []copier.Extent) *qcow2.Writer {
	t.Helper()
	rs := copier.Ranges(ex)
	if backing != "" {
		size = 0
	}
	if err := qcow2.Create(path, size, backing, rs...); err != nil {
		t.Fatal(err)
	}
	w, err := qcow2.OpenWriter(path, rs...)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// proven asserts that the image at path is clean by qcow2.Prove (which
// proves only what qemu-img check finds clean without leaks).
func proven(t *testing.T, path string) {
	t.Helper()
	if _, err := qcow2.Prove(context.Background(), path); err != nil {
		t.Fatalf("%s is not proven clean: %v", filepath.Base(path), err)
	}
}

// widened is ex widened to whole units of g, as a copy into an image
// copies them.
func widened(ex []copier.Extent, g, size int64) []copier.Extent {
	var out []copier.Extent
	for _, e := range ex {
		lo, hi := e.Offset/g*g, min((e.End()+g-1)/g*g, size)
		out = append(out, copier.Extent{Offset: lo, Length: hi - lo})
	}
	return mergeExtents(out)
}

// TestImage: the copier writes the image itself (Options.Image): a full
// copy and an incremental of changes on 4 KiB (not on the image's 64 KiB
// subclusters: the copy widens them, reading the rest from the source),
// new data, zero bytes and holes over old data, with digests: each image
// reads as the source, is clean, and its records cover the widened
// extents with the source's bytes.
func TestImage(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src := makeSource(t, dir, 1<<30, 256, 32, 11)
	full := filepath.Join(dir, "full.qcow2")
	const g = 64 << 10

	copyInto := func(img string, w *qcow2.Writer, ex []copier.Extent, overlay bool) *copier.Result {
		t.Helper()
		dw, err := digest.Create(digest.PathOf(img), digest.Header{Image: filepath.Base(img), Capacity: src.size, Overlay: overlay})
		if err != nil {
			t.Fatal(err)
		}
		s := serveSource(t, dir, src.path)
		res, err := copier.Copy(context.Background(), copier.Options{Source: s.URI, Image: w, Extents: ex,
			Overlay: overlay, Digests: dw})
		s.Stop()
		if err := errors.Join(err, w.Close()); err != nil {
			t.Fatal(err)
		}
		if _, _, err := dw.Finish(); err != nil {
			t.Fatal(err)
		}
		return res
	}

	w := openImage(t, full, src.size, "", src.extents)
	res := copyInto(full, w, src.extents, false)
	t.Logf("full copy: %+v", *res)
	if err := compare(t, src.path, full); err != nil {
		t.Fatal(err)
	}
	proven(t, full)
	checkDigests(t, digest.PathOf(full), src, digest.BLAKE3)
	if res.Written != src.nonzero || res.Zeroed != 0 {
		t.Errorf("written %d, zeroed %d; want exactly the non-zero data %d, nothing zeroed", res.Written, res.Zeroed, src.nonzero)
	}
	if a := allocated(t, full); a > src.nonzero+8*MiB {
		t.Errorf("full.qcow2 holds %d bytes; want at most the %d non-zero bytes plus metadata", a, src.nonzero)
	}

	// Changes of 4 to 60 KiB on 4 KiB: new data, zero bytes, holes.
	r := rand.New(rand.NewPCG(12, 13))
	f, err := os.OpenFile(src.path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var changed []copier.Extent
	for i := range 400 {
		n := (r.Int64N(15) + 1) * 4096
		off := r.Int64N((src.size-n)/4096) * 4096
		if i%2 == 0 { // over old data
			off = src.data[r.IntN(len(src.data))] + r.Int64N(MiB/4096-16)*4096
		}
		buf := make([]byte, n)
		switch i % 3 {
		case 0:
			fill(r, buf)
			_, err = f.WriteAt(buf, off)
		case 1:
			_, err = f.WriteAt(buf, off)
		case 2:
			err = syscall.Fallocate(int(f.Fd()), 0x01|0x02, off, n) // KEEP_SIZE|PUNCH_HOLE
		}
		if err != nil {
			t.Fatal(err)
		}
		changed = append(changed, copier.Extent{Offset: off, Length: n})
	}
	f.Close()
	changed = mergeExtents(changed)

	for _, overlay := range []bool{true, false} {
		name := map[bool]string{true: "over.qcow2", false: "wrong.qcow2"}[overlay]
		img := filepath.Join(dir, name)
		// The copy reuses the full copy's buffers (the process keeps
		// them): stale bytes in them must never reach the image.
		if n := copier.PoisonKeptBuffers(0xee); n == 0 {
			t.Fatal("no buffer kept from the full copy for the next")
		}
		res := copyInto(img, openImage(t, img, 0, "full.qcow2", changed), changed, overlay)
		err := compare(t, src.path, img)
		if !overlay {
			// The check has teeth: zeros skipped let the backing show.
			if err == nil {
				t.Fatal("an overlay copied with zero chunks skipped compares identical: the test cannot see skipped zeros")
			}
			continue
		}
		t.Logf("incremental: %+v (%d bytes changed)", *res, total(changed))
		if err != nil {
			t.Fatal(err)
		}
		proven(t, img)
		wide := *src
		wide.extents = widened(changed, g, src.size)
		checkDigests(t, digest.PathOf(img), &wide, digest.BLAKE3)
		if res.Read > total(wide.extents) || res.Skipped != 0 {
			t.Errorf("read %d bytes, skipped %d: want at most the widened extents' %d, nothing skipped in an overlay", res.Read, res.Skipped, total(wide.extents))
		}
	}
}

// TestImageResumed: a copy into an image stopped after its resume point
// advanced goes on, after the image is opened again, from that point:
// the image is then the source's, and clean.
func TestImageResumed(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src, _ := smallSource(t, dir)
	img := filepath.Join(dir, "img.qcow2")
	s := serveSource(t, dir, src.path)
	w := openImage(t, img, src.size, "", src.extents)
	ctx, cancel := context.WithCancel(context.Background())
	var resume int64
	_, err := copier.Copy(ctx, copier.Options{Source: s.URI, Image: w, Extents: src.extents,
		FlushBytes: 4 * MiB, InFlight: 2, RequestSize: MiB,
		Progress: func(p copier.Progress) {
			if p.ResumePoint > 0 && resume == 0 {
				resume = p.ResumePoint
				cancel()
			}
		}})
	w.Close()
	if err == nil || resume == 0 || resume >= src.extents[len(src.extents)-1].End() {
		t.Fatalf("the copy was not interrupted in the middle (err %v, resume point %d)", err, resume)
	}
	w, err = qcow2.OpenWriter(img)
	if err != nil {
		t.Fatal(err)
	}
	res, err := copier.Copy(context.Background(), copier.Options{Source: s.URI, Image: w, Extents: src.extents, ResumeFrom: resume})
	if err := errors.Join(err, w.Close()); err != nil {
		t.Fatal(err)
	}
	t.Logf("resumed at %d: %+v", resume, *res)
	if err := compare(t, src.path, img); err != nil {
		t.Fatal(err)
	}
	proven(t, img)

	// A resume point off the image's subclusters is refused, naming it.
	w, err = qcow2.OpenWriter(img)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := copier.Copy(context.Background(), copier.Options{Source: s.URI, Image: w, Extents: src.extents, ResumeFrom: 4096}); err == nil {
		t.Error("a resume point of 4096 into an image of 64 KiB subclusters was taken")
	}
}

// TestImageEdges: a resume point past the last extent, off the
// subclusters where that extent ends, copies nothing; an image larger
// than the disk (qemu-img rounds a capacity up to 512 bytes) is refused,
// naming both sizes, where its last subcluster could not be copied whole.
func TestImageEdges(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src, _ := smallSource(t, dir)
	s := serveSource(t, dir, src.path)
	ex := []copier.Extent{{Offset: src.data[0], Length: 100 << 10}}
	w := openImage(t, filepath.Join(dir, "end.qcow2"), src.size, "", ex)
	res, err := copier.Copy(context.Background(), copier.Options{Source: s.URI, Image: w, Extents: ex, ResumeFrom: ex[0].End()})
	if err := errors.Join(err, w.Close()); err != nil {
		t.Fatalf("resumed at the end of the extents: %v", err)
	}
	if res.Read != 0 || res.Written != 0 {
		t.Errorf("resumed at the end: %+v, want nothing read or written", *res)
	}

	const odd = 3<<20 + 100
	raw := filepath.Join(dir, "odd.raw")
	if err := os.WriteFile(raw, make([]byte, odd), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "odd.qcow2")
	if err := qcow2.Make(context.Background(), img, odd); err != nil {
		t.Fatal(err)
	}
	w, err = qcow2.OpenWriter(img)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	so := serveSource(t, dir, raw)
	_, err = copier.Copy(context.Background(), copier.Options{Source: so.URI, Image: w, Extents: []copier.Extent{{Offset: 0, Length: odd}}})
	if err == nil || !strings.Contains(err.Error(), "3145828") || !strings.Contains(err.Error(), "3146240") {
		t.Errorf("an image of %d bytes for a disk of %d: %v, want an error naming both", w.Size(), odd, err)
	}
}
