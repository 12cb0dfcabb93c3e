package digest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/zeebo/blake3"
)

const mib = 1 << 20

var head = Header{Image: "b1.qcow2", Capacity: 64 * mib, Overlay: true, BlockSize: BlockSize}

func data(off int64, n int, b byte) Record { return Data(Default, off, bytes.Repeat([]byte{b}, n)) }

// The algorithms' sums are the reference implementations' (BLAKE3-256 of
// the empty input as its authors publish it), and differ.
func TestAlgorithmSum(t *testing.T) {
	b := bytes.Repeat([]byte("cbtflow"), 10000)
	if got, want := SHA256.Sum(b), sha256.Sum256(b); got != want {
		t.Errorf("SHA256.Sum %x, want %x", got, want)
	}
	if got, want := BLAKE3.Sum(b), blake3.Sum256(b); got != want {
		t.Errorf("BLAKE3.Sum %x, want %x", got, want)
	}
	if got := fmt.Sprintf("%x", BLAKE3.Sum(nil)); got != "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262" {
		t.Errorf("BLAKE3 of nothing: %s", got)
	}
	if SHA256.Sum(b) == BLAKE3.Sum(b) {
		t.Error("SHA-256 and BLAKE3 sums are alike")
	}
	for _, a := range []Algorithm{SHA256, BLAKE3} {
		h := a.New()
		h.Write(b[:1000])
		h.Write(b[1000:])
		if got, want := h.Sum(nil), a.Sum(b); !bytes.Equal(got, want[:]) {
			t.Errorf("%v: New in pieces %x, Sum %x", a, got, want)
		}
	}
	if SHA256.String() != "SHA-256" || BLAKE3.String() != "BLAKE3" || Default != BLAKE3 {
		t.Errorf("names %q %q, default %v", SHA256, BLAKE3, Default)
	}
}

func TestWriteRead(t *testing.T) {
	for _, alg := range []Algorithm{0, SHA256, BLAKE3} {
		t.Run(fmt.Sprint(alg), func(t *testing.T) { testWriteRead(t, alg) })
	}
}

func testWriteRead(t *testing.T, alg Algorithm) {
	head := head
	head.Algorithm = alg
	path := filepath.Join(t.TempDir(), "b1.qcow2"+Suffix)
	w, err := Create(path, head)
	if err != nil {
		t.Fatal(err)
	}
	if alg == 0 {
		head.Algorithm = Default // what the file says
	}
	if w.Algorithm() != head.Algorithm {
		t.Fatalf("the writer's algorithm is %v, want %v", w.Algorithm(), head.Algorithm)
	}
	data := func(off int64, n int, b byte) Record {
		return Data(w.Algorithm(), off, bytes.Repeat([]byte{b}, n))
	}
	// Out of order, as requests complete; adjacent zeros are joined.
	w.Add(data(2*mib, mib, 2))
	w.Add(Zero(mib, mib/2))
	w.Add(data(0, mib, 1))
	w.Add(Zero(mib+mib/2, mib/2))
	w.Add(data(5*mib, 4096, 5))
	if err := w.Commit(3 * mib); err != nil {
		t.Fatal(err)
	}
	w.Add(Zero(3*mib, 2*mib))
	size, sum, err := w.Finish()
	if err != nil {
		t.Fatal(err)
	}
	f, err := Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if !f.Complete || f.Size != size || f.SHA256 != sum || f.Header != head {
		t.Fatalf("read %+v; want complete, %d bytes, %s, header %+v", f, size, sum, head)
	}
	want := []Record{data(0, mib, 1), Zero(mib, mib), data(2*mib, mib, 2), Zero(3*mib, 2*mib), data(5*mib, 4096, 5)}
	if !slices.Equal(f.Records, want) {
		t.Fatalf("records %+v\nwant %+v", f.Records, want)
	}
	if f.Totals != (Totals{Records: 5, DataBytes: 2*mib + 4096, ZeroBytes: 3 * mib}) {
		t.Errorf("totals %+v", f.Totals)
	}
	// The records carry the sums of the header's algorithm.
	if s := f.Records[0].Sum; s != head.Algorithm.Sum(bytes.Repeat([]byte{1}, mib)) {
		t.Errorf("first record's sum %x is not the %v of its bytes", s, head.Algorithm)
	}
	if raw, _ := os.ReadFile(path); raw[10] != byte(head.Algorithm) {
		t.Errorf("algorithm byte %d, want %d", raw[10], head.Algorithm)
	}
}

// A file written before BLAKE3 (algorithm byte 1), built here byte by byte
// as the format says, parses with its SHA-256 sums.
func TestSHA256File(t *testing.T) {
	b := []byte("CBTFDGST")
	b = binary.LittleEndian.AppendUint16(b, 1)
	b = append(b, 1, 0) // SHA-256, not an overlay
	b = binary.LittleEndian.AppendUint32(b, mib)
	b = binary.LittleEndian.AppendUint64(b, 8*mib)
	b = binary.LittleEndian.AppendUint16(b, 8)
	b = append(b, "a1.qcow2"...)
	block := bytes.Repeat([]byte{7}, 4096)
	sum := sha256.Sum256(block)
	b = append(b, 'D')
	b = binary.LittleEndian.AppendUint64(b, mib)
	b = binary.LittleEndian.AppendUint32(b, 4096)
	b = append(b, sum[:]...)
	b = append(b, 'E')
	for _, n := range []uint64{1, 4096, 0} {
		b = binary.LittleEndian.AppendUint64(b, n)
	}
	f, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	want := Header{Image: "a1.qcow2", Capacity: 8 * mib, BlockSize: mib, Algorithm: SHA256}
	if f.Header != want || !f.Complete {
		t.Fatalf("header %+v (complete %v), want %+v", f.Header, f.Complete, want)
	}
	if len(f.Records) != 1 || f.Records[0] != Data(SHA256, mib, block) || f.Records[0].Sum != sum {
		t.Fatalf("records %+v", f.Records)
	}
	// Written now with SHA256, the file is the same bytes (and a mark).
	path := filepath.Join(t.TempDir(), "a1.qcow2"+Suffix)
	w, err := Create(path, want)
	if err != nil {
		t.Fatal(err)
	}
	w.Add(Data(w.Algorithm(), mib, block))
	if _, _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	withMark := slices.Concat(b[:len(b)-endLen], appendMark(nil, mib+4096), b[len(b)-endLen:])
	if got, _ := os.ReadFile(path); !bytes.Equal(got, withMark) {
		t.Errorf("written with SHA256:\n%x\nwant\n%x", got, withMark)
	}
}

// An algorithm byte this release does not know is refused, by name.
func TestUnknownAlgorithm(t *testing.T) {
	hdr, err := encodeHeader(head)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []byte{0, 3, 255} {
		b := append([]byte(nil), hdr...)
		b[10] = a
		_, err := Parse(b)
		if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), fmt.Sprintf("algorithm byte %d ", a)) {
			t.Errorf("algorithm byte %d: %v, want ErrFormat naming it", a, err)
		}
	}
	h := head
	h.Algorithm = 3
	if _, err := Create(filepath.Join(t.TempDir(), "d"), h); err == nil || !strings.Contains(err.Error(), "algorithm byte 3") {
		t.Errorf("Create with algorithm 3: %v", err)
	}
}

// A resumed file keeps its algorithm: a Header without one takes the
// file's, one with another algorithm cannot resume it.
func TestResumeKeepsAlgorithm(t *testing.T) {
	for _, alg := range []Algorithm{SHA256, BLAKE3} {
		t.Run(alg.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "b1.qcow2"+Suffix)
			h := head
			h.Algorithm = alg
			w, err := Create(path, h)
			if err != nil {
				t.Fatal(err)
			}
			w.Add(Data(w.Algorithm(), 0, bytes.Repeat([]byte{1}, mib)))
			if err := w.Commit(mib); err != nil {
				t.Fatal(err)
			}
			w.Close()
			other := head
			other.Algorithm = SHA256 + BLAKE3 - alg
			if _, err := Resume(path, other, mib); !errors.Is(err, ErrCannotResume) || !strings.Contains(err.Error(), other.Algorithm.String()) {
				t.Fatalf("resume as %v: %v, want ErrCannotResume", other.Algorithm, err)
			}
			for _, want := range []Header{head, h} { // without an algorithm, with the file's
				w, err = Resume(path, want, mib)
				if err != nil {
					t.Fatal(err)
				}
				if w.Algorithm() != alg {
					t.Fatalf("resumed with %v, the file's is %v", w.Algorithm(), alg)
				}
				w.Add(Data(w.Algorithm(), mib, bytes.Repeat([]byte{2}, mib)))
				if _, _, err := w.Finish(); err != nil {
					t.Fatal(err)
				}
			}
			f, err := Read(path)
			if err != nil {
				t.Fatal(err)
			}
			want := []Record{Data(alg, 0, bytes.Repeat([]byte{1}, mib)), Data(alg, mib, bytes.Repeat([]byte{2}, mib))}
			if f.Header.Algorithm != alg || !f.Complete || !slices.Equal(f.Records, want) {
				t.Fatalf("after the resumes: %v, complete %v, records %+v", f.Header.Algorithm, f.Complete, f.Records)
			}
		})
	}
}

func TestResume(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b1.qcow2"+Suffix)
	w, err := Create(path, head)
	if err != nil {
		t.Fatal(err)
	}
	w.Add(data(0, mib, 1))
	w.Add(data(mib, mib, 2))
	if err := w.Commit(2 * mib); err != nil {
		t.Fatal(err)
	}
	w.Add(data(2*mib, mib, 3))
	if err := w.Commit(3 * mib); err != nil {
		t.Fatal(err)
	}
	w.Add(data(3*mib, mib, 4)) // never committed: the attempt dies
	w.Close()
	// A crash in the middle of a record leaves it cut short.
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	fh.Write([]byte{KindData, 1, 2, 3})
	fh.Close()

	if _, err := Resume(path, head, 4*mib); !errors.Is(err, ErrCannotResume) {
		t.Fatalf("resume past the last commit: %v, want ErrCannotResume", err)
	}
	other := head
	other.Image = "b2.qcow2"
	if _, err := Resume(path, other, 2*mib); !errors.Is(err, ErrCannotResume) {
		t.Fatalf("resume of another image's file: %v, want ErrCannotResume", err)
	}
	if _, err := Resume(path+".gone", head, 2*mib); !errors.Is(err, ErrCannotResume) {
		t.Fatalf("resume of a missing file: %v, want ErrCannotResume", err)
	}
	// The heartbeat that said 3 MiB was lost: the retry resumes from 2.
	w, err = Resume(path, head, 2*mib)
	if err != nil {
		t.Fatal(err)
	}
	w.Add(data(2*mib, mib, 3))
	w.Add(data(3*mib, mib, 4))
	if _, _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	f, err := Read(path)
	if err != nil {
		t.Fatal(err)
	}
	want := []Record{data(0, mib, 1), data(mib, mib, 2), data(2*mib, mib, 3), data(3*mib, mib, 4)}
	if !f.Complete || !slices.Equal(f.Records, want) {
		t.Fatalf("after the resume: complete %v, records %+v", f.Complete, f.Records)
	}
	// A finished file resumed at its end (a retry after the copy) ends the
	// same.
	w, err = Resume(path, head, 4*mib)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	if f2, err := Read(path); err != nil || !f2.Complete || !slices.Equal(f2.Records, want) {
		t.Fatalf("resumed at the end: %v %+v", err, f2)
	}
}

func TestMalformed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d")
	w, err := Create(path, head)
	if err != nil {
		t.Fatal(err)
	}
	w.Add(data(0, 4096, 1))
	if _, _, err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(path)
	crossing := appendRecord(nil, Record{Kind: KindData, Offset: mib - 10, Length: 20})
	hdr, _ := encodeHeader(head)
	for name, b := range map[string][]byte{
		"bad magic":       append([]byte("XXXXXXXX"), good[8:]...),
		"short":           good[:10],
		"cut record":      good[:len(good)-endLen-3],
		"crosses a block": append(hdr, crossing...),
		"after the end":   append(append([]byte(nil), good...), appendMark(nil, 0)...),
		"bad totals":      append(append(hdr, appendRecord(nil, data(0, 10, 1))...), appendEnd(nil, Totals{Records: 2})...),
	} {
		if _, err := Parse(b); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: %v, want ErrFormat", name, err)
		}
	}
	// Without its end record a file is incomplete, not malformed.
	f, err := Parse(good[:len(good)-endLen])
	if err != nil || f.Complete {
		t.Errorf("without the end record: %v, complete %v", err, f != nil && f.Complete)
	}
}

// BenchmarkData: a data record's digest, of a 64 KiB write and of a
// whole block, with each algorithm (go test -run XXX -bench .).
func BenchmarkData(b *testing.B) {
	for _, alg := range []Algorithm{SHA256, BLAKE3} {
		for _, n := range []int{64 << 10, BlockSize} {
			buf := bytes.Repeat([]byte("cbtflow!"), n/8)
			b.Run(fmt.Sprintf("%v/%dKiB", alg, n>>10), func(b *testing.B) {
				b.SetBytes(int64(n))
				for b.Loop() {
					Data(alg, 0, buf)
				}
			})
		}
	}
}
