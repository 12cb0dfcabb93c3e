package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// sparseFile makes a file of size bytes with data written at the given
// offsets; everything else is a hole.
func sparseFile(t *testing.T, size int64, writes map[int64][]byte) string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "img-*.raw")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range writes {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return f.Name()
}

func TestCompareSparse(t *testing.T) {
	const size = 1 << 30 // large and sparse: a full read would be slow
	data := bytes.Repeat([]byte("cbtflow!"), 8192)
	zeros := make([]byte, 1<<20)
	flipped := bytes.Clone(data)
	flipped[4000] ^= 1
	nonzero := []byte{0, 0, 7}

	for _, tc := range []struct {
		name      string
		a, b      map[int64][]byte
		sizeB     int64
		equal     bool
		firstDiff int64
	}{
		{name: "same data at same offsets", a: map[int64][]byte{0: data, 500 << 20: data}, b: map[int64][]byte{0: data, 500 << 20: data}, equal: true, firstDiff: -1},
		{name: "both empty", equal: true, firstDiff: -1},
		{name: "zeros written on one side equal a hole on the other", a: map[int64][]byte{64 << 20: zeros}, equal: true, firstDiff: -1},
		{name: "one flipped bit", a: map[int64][]byte{3 << 20: data}, b: map[int64][]byte{3 << 20: flipped}, firstDiff: 3<<20 + 4000},
		{name: "data on one side, hole on the other", b: map[int64][]byte{size - 3: nonzero}, firstDiff: size - 1},
		{name: "data at the same place but shifted", a: map[int64][]byte{1 << 20: data}, b: map[int64][]byte{1<<20 + 8: data}, firstDiff: 1 << 20},
		{name: "different sizes", sizeB: size + 512, firstDiff: -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sb := tc.sizeB
			if sb == 0 {
				sb = size
			}
			a, b := sparseFile(t, size, tc.a), sparseFile(t, sb, tc.b)
			res, err := compareSparse(a, b)
			if err != nil {
				t.Fatal(err)
			}
			if res.Equal != tc.equal || res.FirstDiff != tc.firstDiff {
				t.Fatalf("compareSparse = equal %v, first difference %d; want %v, %d", res.Equal, res.FirstDiff, tc.equal, tc.firstDiff)
			}
			if res.Compared > 16<<20 {
				t.Errorf("read %d bytes of each file: holes were read", res.Compared)
			}
			// The same answer the other way round.
			rev, err := compareSparse(b, a)
			if err != nil {
				t.Fatal(err)
			}
			if rev.Equal != res.Equal || rev.FirstDiff != res.FirstDiff {
				t.Fatalf("reversed: equal %v, first difference %d; forward: %v, %d", rev.Equal, rev.FirstDiff, res.Equal, res.FirstDiff)
			}
		})
	}
}

func TestUnion(t *testing.T) {
	got := union(
		[]extent{{0, 10}, {20, 5}, {100, 1}},
		[]extent{{5, 10}, {25, 5}, {50, 0}, {90, 5}},
	)
	want := []extent{{0, 15}, {20, 10}, {90, 5}, {100, 1}}
	if len(got) != len(want) {
		t.Fatalf("union = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("union = %v, want %v", got, want)
		}
	}
}

func TestTable(t *testing.T) {
	rows := []row{
		{Backup: "1", Disk: 204, Mode: "full", Changed: 9 << 20, Written: 9 << 20, QCOW2: 9<<20 + 393216, Seconds: 0.42, Verified: true},
		{Backup: "2", Disk: 205, Mode: "incremental", Changed: 4 << 20, Written: 2 << 20, QCOW2: 2<<20 + 196608, Seconds: 1.5, Verified: false},
	}
	var b strings.Builder
	if err := writeTable(&b, rows); err != nil {
		t.Fatal(err)
	}
	want := "" +
		"backup  disk  mode         changed  written    QCOW2  seconds  verified\n" +
		"1       204   full         9.0 MiB  9.0 MiB  9.4 MiB     0.42  ✓\n" +
		"2       205   incremental  4.0 MiB  2.0 MiB  2.2 MiB     1.50  ✗\n"
	if b.String() != want {
		t.Fatalf("table:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestCheck(t *testing.T) {
	ok := row{Backup: "2", Disk: 204, Mode: "incremental", Changed: 4 << 20, QCOW2: 7 << 20, Verified: true}
	if bad := check([]row{ok}); len(bad) != 0 {
		t.Fatalf("check(%+v) = %v, want nothing (limit is %d)", ok, bad, maxIncrementalSize(ok.Changed))
	}
	big := ok
	big.QCOW2 = maxIncrementalSize(big.Changed) + 1
	unverified := ok
	unverified.Verified, unverified.Diff = false, "first difference at byte 7"
	fullBig := ok
	fullBig.Mode, fullBig.QCOW2 = "full", 1<<30 // the limit is for incrementals only
	bad := check([]row{big, unverified, fullBig})
	if len(bad) != 2 || !strings.Contains(bad[0], "more than 1.5") || !strings.Contains(bad[1], "differs") || !strings.Contains(bad[1], "byte 7") {
		t.Fatalf("check = %q, want one size and one verification complaint", bad)
	}
}

func TestParseEnv(t *testing.T) {
	got, err := parseEnv([]byte("export TEMPORAL_ADDRESS=127.0.0.1:17233\n\n# comment\nexport CBTFLOW_DATABASE_URL='postgres:///cbtflow_demo?host=/var/run/postgresql'\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]string{{"TEMPORAL_ADDRESS", "127.0.0.1:17233"}, {"CBTFLOW_DATABASE_URL", "postgres:///cbtflow_demo?host=/var/run/postgresql"}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("parseEnv = %q, want %q", got, want)
	}
	for _, bad := range []string{"TEMPORAL_ADDRESS=x\n", "export X='a\n", "export X=$HOME/x\n", "export =x\n"} {
		if _, err := parseEnv([]byte(bad)); err == nil {
			t.Errorf("parseEnv(%q) accepted it", bad)
		}
	}
}

func TestSize(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 3 << 20: "3.0 MiB", 10 << 30: "10.0 GiB"} {
		if got := size(n); got != want {
			t.Errorf("size(%d) = %q, want %q", n, got, want)
		}
	}
}
