package verify

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

const mib = 1 << 20

// write is one write of a backup: a pattern (0: NBD zeroes) at off.
type write struct {
	pattern byte
	off, n  int64
}

// makeChain builds a real three-image chain with qemu-io, each image with
// the digest file a transfer would write for it, and returns it as the
// catalog records it, oldest first:
//
//	b1 (full): 0xaa over [0, 4 MiB)
//	b2:        zeros over [1, 2 MiB), 0xbb over [4, 6 MiB)
//	b3:        0xcc over [2.5 MiB, 2.5 MiB + 64 KiB), which overwrites a
//	           part of b1's record of [2, 3 MiB)
//
// The digest files are written with algs[i] (the default, BLAKE3, beyond
// algs).
func makeChain(t *testing.T, algs ...digest.Algorithm) []Image {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	writes := [][]write{
		{{0xaa, 0, 4 * mib}},
		{{0, 1 * mib, mib}, {0xbb, 4 * mib, 2 * mib}},
		{{0xcc, 2*mib + mib/2, 64 << 10}},
	}
	var chain []Image
	for i, ws := range writes {
		path := filepath.Join(dir, "b"+strconv.Itoa(i+1)+".qcow2")
		backing := ""
		if i == 0 {
			if err := qemu.Create(ctx, path, 16*mib); err != nil {
				t.Fatal(err)
			}
		} else {
			backing = chain[i-1].Path
			if err := qemu.CreateOverlay(ctx, path, backing); err != nil {
				t.Fatal(err)
			}
		}
		var alg digest.Algorithm
		if i < len(algs) {
			alg = algs[i]
		}
		w, err := digest.Create(digest.PathOf(path), digest.Header{Image: filepath.Base(path), Capacity: 16 * mib, Overlay: i > 0, Algorithm: alg})
		if err != nil {
			t.Fatal(err)
		}
		for _, wr := range ws {
			cmd := "write -P " + strconv.Itoa(int(wr.pattern)) + " " + itoa(wr.off) + " " + itoa(wr.n)
			if wr.pattern == 0 {
				cmd = "write -z " + itoa(wr.off) + " " + itoa(wr.n)
			}
			if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, path).CombinedOutput(); err != nil {
				t.Fatalf("qemu-io: %v: %s", err, out)
			}
			for off := wr.off; off < wr.off+wr.n; {
				n := min(digest.BlockSize-off%digest.BlockSize, wr.off+wr.n-off)
				if wr.pattern == 0 {
					w.Add(digest.Zero(off, n))
				} else {
					w.Add(digest.Data(w.Algorithm(), off, bytes.Repeat([]byte{wr.pattern}, int(n))))
				}
				off += n
			}
		}
		dsize, dsum, err := w.Finish()
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, recorded(t, Image{Path: path, Backing: backing, DigestSHA256: dsum, DigestSize: dsize}))
	}
	return chain
}

// recorded fills in the image's size and SHA-256 as a commit records them.
func recorded(t *testing.T, im Image) Image {
	t.Helper()
	size, sum, err := integrity.Hash(context.Background(), im.Path, nil)
	if err != nil {
		t.Fatal(err)
	}
	im.Size, im.SHA256 = size, sum
	return im
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func verifyChain(t *testing.T, chain []Image) *Result {
	t.Helper()
	res, err := Chain(context.Background(), chain, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestSoundChain(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	res := verifyChain(t, chain)
	if !res.OK() || !res.BlocksRead {
		t.Fatalf("a sound chain: %v (blocks read %v)", res.Err(), res.BlocksRead)
	}
	// b1: [0,1) [3,4) checked, [1,2) overwritten by b2, [2,3) skipped
	// (b3 overwrote a part); b2: 3 records; b3: 1.
	if res.CheckedRecords != 6 || res.SkippedRecords != 1 || res.SkippedBytes != mib {
		t.Errorf("checked %d records, skipped %d (%d bytes); want 6 and 1 (1 MiB)", res.CheckedRecords, res.SkippedRecords, res.SkippedBytes)
	}
	// The top image alone, and the two lower ones alone, are sound too.
	if res := verifyChain(t, chain[:2]); !res.OK() {
		t.Errorf("b1 ← b2: %v", res.Err())
	}
	if res := verifyChain(t, chain[:1]); !res.OK() || res.CheckedRecords != 4 {
		t.Errorf("b1: %v, %d records checked", res.Err(), res.CheckedRecords)
	}
}

// hostOffset returns where the data of guest offset off lives in the
// image file itself (qemu-img map), failing when it lives elsewhere.
func hostOffset(t *testing.T, path string, off int64) int64 {
	t.Helper()
	out, err := exec.Command("qemu-img", "map", "--output=json", "-f", "qcow2", path).Output()
	if err != nil {
		t.Fatal(err)
	}
	var m []struct {
		Start, Length, Offset int64
		Data                  bool
		Depth                 int
	}
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	for _, e := range m {
		if e.Start <= off && off < e.Start+e.Length && e.Data && e.Depth == 0 {
			return e.Offset + off - e.Start
		}
	}
	t.Fatalf("%s holds no data cluster of its own at %d: %s", path, off, out)
	return 0
}

func wantProblem(t *testing.T, res *Result, file string, offset int64, reason string) {
	t.Helper()
	p := res.First()
	if p == nil {
		t.Fatalf("no problem found; want one in %s", file)
	}
	if p.File != file || p.Offset != offset || !strings.Contains(p.Reason, reason) {
		t.Fatalf("first problem %q (file %s, offset %d); want file %s, offset %d, reason with %q", p, p.File, p.Offset, file, offset, reason)
	}
	if err := res.Err(); err == nil || !strings.Contains(err.Error(), file) {
		t.Errorf("the error %v does not name %s", err, file)
	}
}

// flipByte flips a bit of the byte that image i of the chain holds at
// guest offset off, and records the image's new size and SHA-256: the
// catalog follows the flip, only the block digests see it.
func flipByte(t *testing.T, chain []Image, i int, off int64) {
	t.Helper()
	path := chain[i].Path
	at := hostOffset(t, path, off)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := []byte{0}
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x01
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	f.Close()
	chain[i] = recorded(t, chain[i])
}

func TestFlippedByteInAMiddleImage(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	mid := chain[1].Path
	flipByte(t, chain, 1, 4*mib+12345)
	res := verifyChain(t, chain)
	if !res.BlocksRead || len(res.Problems) != 1 {
		t.Fatalf("problems %v (blocks read %v); want the one flipped block", res.Problems, res.BlocksRead)
	}
	wantProblem(t, res, mid, 4*mib, "reads with BLAKE3")
	if p := res.First(); p.Image != mid || p.Length != mib {
		t.Errorf("problem %+v: want image %s and the 1 MiB record", p, mid)
	}
}

// A chain whose images' digest files have different algorithms (those an
// older release wrote with SHA-256 below, newer ones with BLAKE3): each
// record is checked with its own file's, and a flipped byte is found in
// either kind, named with its file's algorithm.
func TestMixedAlgorithms(t *testing.T) {
	testutil.CheckNoChildren(t)
	for _, algs := range [][]digest.Algorithm{
		{digest.SHA256, digest.BLAKE3, digest.SHA256},
		{digest.BLAKE3, digest.SHA256, digest.BLAKE3},
	} {
		t.Run(algs[0].String()+"-"+algs[1].String(), func(t *testing.T) {
			chain := makeChain(t, algs...)
			for i, im := range chain {
				if f, err := digest.Read(digest.PathOf(im.Path)); err != nil || f.Header.Algorithm != algs[i] {
					t.Fatalf("b%d's digest file: %v, %+v; want %v", i+1, err, f, algs[i])
				}
			}
			res := verifyChain(t, chain)
			if !res.OK() || res.CheckedRecords != 6 {
				t.Fatalf("a sound chain: %v, %d records checked", res.Err(), res.CheckedRecords)
			}
			// b1's record of [0, 1 MiB) and b2's of [4, 5 MiB).
			flipByte(t, chain, 0, 777)
			flipByte(t, chain, 1, 4*mib+12345)
			res = verifyChain(t, chain)
			if !res.BlocksRead || len(res.Problems) != 2 {
				t.Fatalf("problems %v (blocks read %v); want the two flipped blocks", res.Problems, res.BlocksRead)
			}
			wantProblem(t, res, chain[0].Path, 0, "reads with "+algs[0].String())
			if p := res.Problems[1]; p.File != chain[1].Path || p.Offset != 4*mib || !strings.Contains(p.Reason, "reads with "+algs[1].String()) {
				t.Errorf("second problem %q (file %s, offset %d); want b2's at 4 MiB with %v", p, p.File, p.Offset, algs[1])
			}
		})
	}
}

func TestTruncatedImage(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	mid := chain[1].Path
	if err := os.Truncate(mid, chain[1].Size-4096); err != nil {
		t.Fatal(err)
	}
	res := verifyChain(t, chain)
	wantProblem(t, res, mid, -1, "were recorded at commit")
	if res.BlocksRead {
		t.Error("blocks were read through a damaged chain")
	}
}

func TestBackingLinkChanged(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	top := chain[2].Path
	if out, err := exec.Command("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", top).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img rebase: %v: %s", err, out)
	}
	res := verifyChain(t, chain)
	wantProblem(t, res, top, -1, "backing file")
	if res.BlocksRead {
		t.Error("blocks were read through a damaged chain")
	}
}

func TestMissingDigestFile(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	gone := digest.PathOf(chain[1].Path)
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}
	res := verifyChain(t, chain)
	wantProblem(t, res, gone, -1, "digest file missing")
	if p := res.First(); p.Image != chain[1].Path {
		t.Errorf("problem names image %s, want %s", p.Image, chain[1].Path)
	}
}

func TestDigestFileChanged(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	path := digest.PathOf(chain[0].Path)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-40] ^= 0xff
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	wantProblem(t, verifyChain(t, chain), path, -1, "the catalog recorded")
}

// An image without a digest file (made before digests) hides what it
// wrote: the records below it are not checked, those above are.
func TestUndigestedImage(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	chain[1].DigestSHA256, chain[1].DigestSize = "", 0
	res := verifyChain(t, chain)
	if !res.OK() || len(res.Undigested) != 1 || res.Undigested[0] != chain[1].Path {
		t.Fatalf("%v, undigested %v", res.Err(), res.Undigested)
	}
	if res.CheckedRecords != 1 || res.SkippedRecords != 4 {
		t.Errorf("checked %d, skipped %d records; want 1 (b3's) and 4 (b1's)", res.CheckedRecords, res.SkippedRecords)
	}
}

func TestSpans(t *testing.T) {
	cov := merge(nil, []span{{10, 20}, {30, 40}})
	cov = merge(cov, []span{{20, 25}, {50, 60}})
	if want := []span{{10, 25}, {30, 40}, {50, 60}}; !equalSpans(cov, want) {
		t.Fatalf("merge: %v, want %v", cov, want)
	}
	for _, c := range []struct {
		s    span
		want []span
	}{
		{span{0, 10}, []span{{0, 10}}},
		{span{0, 11}, []span{{0, 10}}},
		{span{12, 24}, nil},
		{span{24, 35}, []span{{25, 30}}},
		{span{5, 70}, []span{{5, 10}, {25, 30}, {40, 50}, {60, 70}}},
		{span{60, 61}, []span{{60, 61}}},
	} {
		if got := uncovered(cov, c.s); !equalSpans(got, c.want) {
			t.Errorf("uncovered %v: %v, want %v", c.s, got, c.want)
		}
	}
}

func equalSpans(a, b []span) bool {
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

// A prune merged removed points into the middle image: its own records
// are checked, those below it are not (what was merged in is not
// recorded).
func TestPartialDigest(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	chain[1].DigestPartial = true
	res := verifyChain(t, chain)
	if !res.OK() || res.CheckedRecords != 4 || res.SkippedRecords != 4 {
		t.Fatalf("%v: checked %d, skipped %d records; want b2's 3 and b3's 1 checked, b1's 4 skipped", res.Err(), res.CheckedRecords, res.SkippedRecords)
	}
}

// Another image's digest file, recorded as this one's, is caught by the
// name in its header.
func TestDigestFileOfAnotherImage(t *testing.T) {
	testutil.CheckNoChildren(t)
	chain := makeChain(t)
	b, err := os.ReadFile(digest.PathOf(chain[0].Path))
	if err != nil {
		t.Fatal(err)
	}
	path := digest.PathOf(chain[1].Path)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	size, sum, err := digest.HashFile(path)
	if err != nil {
		t.Fatal(err)
	}
	chain[1].DigestSHA256, chain[1].DigestSize = sum, size
	wantProblem(t, verifyChain(t, chain), path, -1, "the one of image b1.qcow2")
}
