package main

import (
	"os"
	"testing"
)

func TestStatsBytes(t *testing.T) {
	stats := `elapsed time: 1.2 s
read: 8 ops, 0.001224 s, 2.00 MiB, 1.60 GiB/s op, 1.02 MiB/s total
  Request size and alignment breakdown:
    18 bits: 100.0% (8 reqs, 2.00 MiB total)
extents: 1 ops, 0.000005 s, 64.00 MiB, 12500.00 GiB/s op, 32.65 MiB/s total
total: 9 ops, 1.960459 s, 2.00 MiB, 1.02 MiB/s
`
	got, err := statsBytes(stats, "read")
	if err != nil || got != 2<<20 {
		t.Errorf("read = %d, %v", got, err)
	}
	if got, err := statsBytes(stats, "extents"); err != nil || got != 64<<20 {
		t.Errorf("extents = %d, %v", got, err)
	}
	if _, err := statsBytes(stats, "write"); err == nil {
		t.Error("missing op: no error")
	}
}

func TestStatCPU(t *testing.T) {
	// A command with spaces and a parenthesis; utime 150, stime 50,
	// cutime 300, cstime 100 ticks.
	text := "4242 (qemu-nbd (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 50 300 100 20 0 3 0 1234 100000 500 18446744073709551615\n"
	got, err := statCPU(text)
	if err != nil {
		t.Fatal(err)
	}
	if got != 6 {
		t.Errorf("statCPU = %v s, want 6 (600 ticks)", got)
	}
	if _, err := statCPU("4242 (short) S 1 2"); err == nil {
		t.Error("a short stat line was read")
	}
	self, err := procCPU(os.Getpid())
	if err != nil || self < 0 {
		t.Errorf("procCPU(self) = %v, %v", self, err)
	}
	busy, steal, cpus, err := machineCPU()
	if err != nil || busy <= 0 || steal < 0 || cpus < 1 {
		t.Errorf("machineCPU = %v s busy, %v s stolen, %d CPUs, %v", busy, steal, cpus, err)
	}
}

// TestDiskFloor: the floor writes the bytes asked for (rounded up to its
// 2 MiB writes), synced, and removes its file.
func TestDiskFloor(t *testing.T) {
	dir := t.TempDir()
	floor, err := diskFloor(dir, 5<<20, 2)
	if err != nil {
		t.Fatal(err)
	}
	if floor <= 0 {
		t.Errorf("floor %v s", floor)
	}
	if es, _ := os.ReadDir(dir); len(es) != 0 {
		t.Errorf("left behind: %v", es)
	}
}
