package main

import "testing"

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
