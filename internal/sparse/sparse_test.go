package sparse

import (
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
