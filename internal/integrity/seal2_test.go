package integrity

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/sparse"
)

// refSeal is the seal of content (the whole file) whose ranges covered hold
// data records, computed from its definition (seal.go) without files,
// holes or reads: the reference for sealOf.
func refSeal(content []byte, digestSHA string, covered []span, version int) string {
	h := sha256.New()
	prefix := SealPrefix
	if version == 1 {
		prefix = sealPrefix1
		h.Write([]byte(sealDomain1))
	} else {
		h.Write([]byte(sealDomain))
	}
	writeU64(h, uint64(len(content)))
	d, _ := hex.DecodeString(digestSHA)
	h.Write(d)
	hashRange := func(off, end int64) {
		if end <= off {
			return
		}
		writeU64(h, uint64(off))
		writeU64(h, uint64(end-off))
		if version == 1 {
			h.Write(content[off:end])
			return
		}
		var zero int64
		for p := off; p < end; {
			q := min(end, (p/pieceSize+1)*pieceSize)
			if bytes.Count(content[p:q], []byte{0}) == int(q-p) {
				zero += q - p
			} else {
				if zero > 0 {
					h.Write([]byte{0})
					writeU64(h, uint64(zero))
					zero = 0
				}
				h.Write([]byte{1})
				h.Write(content[p:q])
			}
			p = q
		}
		if zero > 0 {
			h.Write([]byte{0})
			writeU64(h, uint64(zero))
		}
	}
	at := int64(0)
	for _, c := range covered {
		hashRange(at, c.off)
		at = c.off + c.n
	}
	hashRange(at, int64(len(content)))
	return prefix + hex.EncodeToString(h.Sum(nil))
}

// TestSealPieces: the seal of a sparse file equals the seal of the same
// bytes written out densely, and both equal the definition's — with
// ranges that start and end off the 4 KiB grid, a data segment longer
// than one read (1 MiB) starting off the grid, explicit zero pieces inside
// data, and holes. A changed byte in a hole changes it.
func TestSealPieces(t *testing.T) {
	const size = 9<<20 + 1234
	rng := rand.New(rand.NewSource(1))
	content := make([]byte, size)
	fill := func(off, n int) { rng.Read(content[off : off+n]) }
	fill(100, 3000)                    // inside the first piece, unaligned
	fill(1<<20+777, 2<<20)             // longer than a read, off the grid
	clear(content[2<<20 : 2<<20+8192]) // zero pieces inside that data
	fill(6<<20, 64<<10)                // a subcluster's worth
	fill(size-10, 10)                  // the file's last, partial piece
	covered := []span{{5000, 1 << 20}, {(6 << 20) + 4096, 16 << 10}, {8<<20 + 3, 5}}
	digestSHA := hex.EncodeToString(make([]byte, 32))

	dir := t.TempDir()
	write := func(name string, dense bool) *os.File {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		// Sparse: write only the pieces holding data.
		for p := 0; p < size; p += pieceSize {
			q := min(size, p+pieceSize)
			if dense || bytes.Count(content[p:q], []byte{0}) != q-p {
				if _, err := f.WriteAt(content[p:q], int64(p)); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		return f
	}
	sparseFile, denseFile := write("sparse", false), write("dense", true)
	var holes int64
	if err := sparse.Segments(sparseFile, 0, size, func(_, n int64) error { holes += n; return nil }); err != nil {
		t.Fatal(err)
	}
	if holes > size/2 {
		t.Fatalf("the sparse file has %d bytes of data in %d: the file system made no holes", holes, size)
	}
	for _, version := range []int{1, 2} {
		want := refSeal(content, digestSHA, covered, version)
		for _, f := range []*os.File{sparseFile, denseFile} {
			var last int64
			got, err := sealOf(context.Background(), f, size, digestSHA, covered, version, func(n int64) { last = n })
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("version %d, %s: seal %s, the definition's %s", version, filepath.Base(f.Name()), got, want)
			}
			if last > size {
				t.Errorf("version %d: progress %d past the file's %d bytes", version, last, size)
			}
		}
	}
	// A byte written into a hole (outside the covered ranges) is seen.
	if _, err := sparseFile.WriteAt([]byte{7}, 4<<20); err != nil {
		t.Fatal(err)
	}
	got, err := sealOf(context.Background(), sparseFile, size, digestSHA, covered, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got == refSeal(content, digestSHA, covered, 2) {
		t.Error("a byte written into a hole left the seal unchanged")
	}
}

// denseCopy copies the file from into a new file to, writing every byte
// (holes become written zeros), as a copy tool that knows no holes does.
func denseCopy(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestSealOfSparseImage: an image of 2 MiB clusters is sparse (the
// subclusters no write touched are holes), its seal proves it, and a copy
// that wrote its holes out as zeros (with its digest file) proves alike;
// a byte written into one of its holes is damage.
func TestSealOfSparseImage(t *testing.T) {
	full, top := sealedChain(t)
	for _, path := range []string{full, top} {
		sum := seal(t, path)
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		var data int64
		var hole int64 = -1
		at := int64(0)
		err = sparse.Segments(f, 0, fi.Size(), func(off, n int64) error {
			if off > at && hole < 0 {
				hole = at
			}
			data, at = data+n, off+n
			return nil
		})
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if hole < 0 || data >= fi.Size() {
			t.Fatalf("%s: %d bytes of data in a file of %d: not sparse", path, data, fi.Size())
		}
		dense := filepath.Join(t.TempDir(), filepath.Base(path))
		denseCopy(t, path, dense)
		denseCopy(t, digest.PathOf(path), digest.PathOf(dense))
		if err := VerifySeal(context.Background(), dense, sum, nil); err != nil {
			t.Errorf("%s written out densely: %v", path, err)
		}
		flipByte(t, dense, hole+1000)
		wantSealDamage(t, VerifySeal(context.Background(), dense, sum, nil), dense, "has seal")
	}
}

// TestSealVersion1: an image sealed before version 2 (every byte of its
// ranges hashed as it is) still proves, and an altered byte of its
// metadata is still seen.
func TestSealVersion1(t *testing.T) {
	full, _ := sealedChain(t)
	_, sum, err := sealVersion(context.Background(), full, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !IsSeal(sum) || sum[:len(sealPrefix1)] != sealPrefix1 {
		t.Fatalf("version 1 seal %q", sum)
	}
	if sum[len(sealPrefix1):] == seal(t, full)[len(SealPrefix):] {
		t.Fatal("version 1 and version 2 seals of one image are equal: the versions are not told apart")
	}
	if err := VerifySeal(context.Background(), full, sum, nil); err != nil {
		t.Fatalf("a sound image against its version 1 seal: %v", err)
	}
	flipByte(t, full, 100) // the QCOW2 header
	wantSealDamage(t, VerifySeal(context.Background(), full, sum, nil), full)
}
