package main

import (
	"math"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
)

// TestPhasesOf: activities of the same kind that overlap (disks in
// parallel) count once, TransferDisk's wall time is split in proportion
// to its steps, and what no activity covers is the workflows' overhead
// or the starter's.
func TestPhasesOf(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	spans := []span{
		{activity: "ResolveVM", scheduled: at(50), start: at(100), end: at(200)},
		{activity: "ChangedAreas", scheduled: at(280), start: at(300), end: at(400)},
		{activity: "ChangedAreas", scheduled: at(280), start: at(350), end: at(450)},
		// Two disks, 1 s of wall time, 1.5 s summed: 0.6 s copy, 0.3 s
		// hash summed become 0.4 s and 0.2 s.
		{activity: "TransferDisk", scheduled: at(500), start: at(500), end: at(1500), transfer: &activities.TransferDiskResult{CopySeconds: 0.4, HashSeconds: 0.2}},
		{activity: "TransferDisk", scheduled: at(500), start: at(500), end: at(1000), transfer: &activities.TransferDiskResult{CopySeconds: 0.2, HashSeconds: 0.1}},
		{activity: "SomethingNew", scheduled: at(1600), start: at(1600), end: at(1700)},
	}
	got := phasesOf(spans, at(0), at(2000), 2500*time.Millisecond)
	want := map[string]float64{
		rowResolve: 0.1, rowQuery: 0.15, rowCopy: 0.4, rowHash: 0.2, rowXferRest: 0.4, rowOther: 0.1,
		rowOverhead: 2 - 0.1 - 0.15 - 1 - 0.1, rowQueued: 0.05 + 0.02, rowStarter: 0.5, rowTotal: 2.5,
	}
	for row, w := range want {
		if math.Abs(got[row]-w) > 1e-9 {
			t.Errorf("%s = %.4f, want %.4f", row, got[row], w)
		}
	}
	if got[rowSetup] != 0 || got[rowCheck] != 0 || got[rowCommit] != 0 {
		t.Errorf("rows of nothing are not zero: %v", got)
	}
}
