package digest

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

const mib = 1 << 20

var head = Header{Image: "b1.qcow2", Capacity: 64 * mib, Overlay: true, BlockSize: BlockSize}

func data(off int64, n int, b byte) Record { return Data(off, bytes.Repeat([]byte{b}, n)) }

func TestWriteRead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b1.qcow2"+Suffix)
	w, err := Create(path, head)
	if err != nil {
		t.Fatal(err)
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
