package sparse

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// A file with data at 1 MiB and at 3 MiB in a 4 MiB file: the segments of
// the whole file and of ranges that cut them.
func TestSegments(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const mib = 1 << 20
	if err := f.Truncate(4 * mib); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 64<<10)
	for i := range data {
		data[i] = 1
	}
	for _, off := range []int64{mib, 3 * mib} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	type seg struct{ Off, N int64 }
	collect := func(off, end int64) []seg {
		var got []seg
		if err := Segments(f, off, end, func(o, n int64) error { got = append(got, seg{o, n}); return nil }); err != nil {
			t.Fatal(err)
		}
		return got
	}
	// File systems store data in blocks: a segment may be longer than
	// what was written, never shorter, and never reach the next write.
	whole := collect(0, 4*mib)
	if len(whole) != 2 || whole[0].Off > mib || whole[0].Off+whole[0].N < mib+64<<10 || whole[0].Off+whole[0].N > 3*mib ||
		whole[1].Off > 3*mib || whole[1].Off+whole[1].N < 3*mib+64<<10 {
		t.Fatalf("segments of the whole file: %v, want data around 1 MiB and 3 MiB (64 KiB each)", whole)
	}
	if got := collect(mib+4096, mib+8192); !reflect.DeepEqual(got, []seg{{mib + 4096, 4096}}) {
		t.Errorf("segments inside the first write: %v, want the whole range", got)
	}
	if got := collect(2*mib, 3*mib); len(got) != 0 {
		t.Errorf("segments of a hole: %v, want none", got)
	}
	if got := collect(4*mib, 4*mib); len(got) != 0 {
		t.Errorf("segments of an empty range: %v", got)
	}
}

// TestPuncher: written zeros become holes, whole 4 KiB pieces only, in the
// ranges given; the file reads the same and keeps its size.
func TestPuncher(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	content := make([]byte, 1<<20)
	for i := 100; i < 200; i++ { // in the first piece: it stays
		content[i] = 1
	}
	for i := 512 << 10; i < 512<<10+10; i++ { // a piece in the middle
		content[i] = 2
	}
	if err := os.WriteFile(path, content, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := NewPuncher(f)
	// Two ranges: the first stops short of a piece's end (that piece is
	// not punched), the second runs to the end.
	if err := p.Zeros(context.Background(), 0, 256<<10+100); err != nil {
		t.Fatal(err)
	}
	if err := p.Zeros(context.Background(), 300<<10, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	want := int64(256<<10-4096) + (1<<20 - 300<<10 - 4096)
	if p.Freed() != want {
		t.Errorf("freed %d bytes, want %d", p.Freed(), want)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, content) {
		t.Fatal("the file reads differently after punching")
	}
	var data int64
	if err := Segments(f, 0, 1<<20, func(_, n int64) error { data += n; return nil }); err != nil {
		t.Fatal(err)
	}
	if data > 1<<20-want {
		t.Errorf("%d bytes of data segments after punching %d of %d", data, want, 1<<20)
	}
}
