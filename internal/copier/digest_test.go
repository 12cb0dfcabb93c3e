package copier_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// checkDigests reads the digest file of a finished copy and checks that
// its records cover exactly the extents and describe the source's bytes
// with the algorithm alg.
func checkDigests(t *testing.T, path string, src *source, alg digest.Algorithm) *digest.File {
	t.Helper()
	f, err := digest.Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if !f.Complete {
		t.Fatal("digest file incomplete")
	}
	if f.Header.Algorithm != alg {
		t.Fatalf("digest file of %v, want %v", f.Header.Algorithm, alg)
	}
	raw, err := os.Open(src.path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	// The records, joined where they touch, are the extents.
	var covered []copier.Extent
	for _, r := range f.Records {
		if n := len(covered); n > 0 && covered[n-1].End() == r.Offset {
			covered[n-1].Length += r.Length
		} else {
			covered = append(covered, copier.Extent{Offset: r.Offset, Length: r.Length})
		}
		b := make([]byte, r.Length)
		if _, err := raw.ReadAt(b, r.Offset); err != nil {
			t.Fatal(err)
		}
		switch r.Kind {
		case digest.KindData:
			if alg.Sum(b) != r.Sum {
				t.Fatalf("data record at %d (%d bytes): %v digest differs from the source's bytes", r.Offset, r.Length, alg)
			}
		case digest.KindZero:
			if !bytes.Equal(b, make([]byte, len(b))) {
				t.Fatalf("zero record at %d (%d bytes): the source holds data there", r.Offset, r.Length)
			}
		}
	}
	if want := mergeExtents(append([]copier.Extent(nil), src.extents...)); !equalExtents(covered, want) {
		t.Fatalf("records cover %v\nextents are %v", covered, want)
	}
	return f
}

func equalExtents(a, b []copier.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestDigests(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src := makeSource(t, dir, 256*MiB, 48, 8, 7)
	// The fresh image's file has the default algorithm (BLAKE3), the
	// overlay's is written with SHA-256: the copier hashes with the
	// writer's.
	for _, overlay := range []bool{false, true} {
		name := map[bool]string{false: "fresh", true: "overlay"}[overlay]
		alg := map[bool]digest.Algorithm{false: 0, true: digest.SHA256}[overlay]
		t.Run(name, func(t *testing.T) {
			img := filepath.Join(dir, name+".qcow2")
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", img, "256M")
			dpath := digest.PathOf(img)
			w, err := digest.Create(dpath, digest.Header{Image: filepath.Base(img), Capacity: src.size, Overlay: overlay, Algorithm: alg})
			if err != nil {
				t.Fatal(err)
			}
			s := serveSource(t, dir, src.path)
			d := serveTarget(t, dir, img)
			// Requests of 1.5 MiB: records are cut at 1 MiB boundaries.
			_, err = copier.Copy(context.Background(), copier.Options{Source: s.URI, Target: d.URI, Extents: src.extents,
				Overlay: overlay, RequestSize: 3 * MiB / 2, Digests: w})
			if err != nil {
				t.Fatal(err)
			}
			d.Stop()
			s.Stop()
			size, sum, err := w.Finish()
			if err != nil {
				t.Fatal(err)
			}
			f := checkDigests(t, dpath, src, map[bool]digest.Algorithm{false: digest.BLAKE3, true: digest.SHA256}[overlay])
			if f.Size != size || f.SHA256 != sum {
				t.Errorf("Finish said %d bytes %s, the file has %d %s", size, sum, f.Size, f.SHA256)
			}
			if f.Totals.DataBytes != src.nonzero {
				t.Errorf("data records cover %d bytes; want the non-zero data, %d", f.Totals.DataBytes, src.nonzero)
			}
		})
	}
}

// A copy interrupted after its resume point advanced, resumed with the
// digest file as Resume left it, records every range exactly once. The
// file was begun with SHA-256 (by an older release) and is resumed with a
// header that names no algorithm: the copy goes on with the file's.
func TestDigestsResumed(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src := makeSource(t, dir, 256*MiB, 48, 8, 9)
	img := filepath.Join(dir, "img.qcow2")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", img, "256M")
	dpath := digest.PathOf(img)
	head := digest.Header{Image: filepath.Base(img), Capacity: src.size, Overlay: true}
	sha := head
	sha.Algorithm = digest.SHA256
	w, err := digest.Create(dpath, sha)
	if err != nil {
		t.Fatal(err)
	}
	s := serveSource(t, dir, src.path)
	d := serveTarget(t, dir, img)
	ctx, cancel := context.WithCancel(context.Background())
	var resume int64
	_, err = copier.Copy(ctx, copier.Options{Source: s.URI, Target: d.URI, Extents: src.extents, Overlay: true,
		FlushBytes: 4 * MiB, InFlight: 2, RequestSize: MiB,
		Progress: func(p copier.Progress) {
			if p.ResumePoint > 0 && resume == 0 {
				resume = p.ResumePoint
				cancel()
			}
		}, Digests: w})
	if err == nil || resume == 0 {
		t.Fatalf("the copy was not interrupted after a resume point (err %v, resume point %d)", err, resume)
	}
	w.Close()
	w, err = digest.Resume(dpath, head, resume)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := copier.Copy(context.Background(), copier.Options{Source: s.URI, Target: d.URI, Extents: src.extents,
		Overlay: true, ResumeFrom: resume, Digests: w}); err != nil {
		t.Fatal(err)
	}
	d.Stop()
	s.Stop()
	if _, _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	checkDigests(t, dpath, src, digest.SHA256)
	t.Logf("resumed at %d", resume)
}
