package workflows

import (
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/activities"
)

// A disk whose VM was restored into after its latest restore point gets
// a full backup that says why; incremental mode refuses it by name.
func TestPlanDisksRestoredInto(t *testing.T) {
	const why = "the VM was restored from backup B1 at 2026-12-04T15:00:00Z; its CBT history no longer matches the chain"
	disks := []activities.VMDisk{{Key: 204, Capacity: 1 << 30}, {Key: 205, Capacity: 1 << 30}}
	prev := []activities.PreviousDisk{
		{Key: 204, BackupID: "B2", Capacity: 1 << 30, ChangeID: "c/2", Path: "/r/204/B2.qcow2", ChainLength: 2, RestoredSince: why},
		{Key: 205, BackupID: "B2", Capacity: 1 << 30, ChangeID: "c/3", Path: "/r/205/B2.qcow2", ChainLength: 2},
	}
	plans, err := planDisks(ModeAuto, disks, prev, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	if plans[0].Mode != ModeFull || plans[0].Reason != why || plans[0].FromChangeID != "" {
		t.Errorf("disk 204: %+v, want full with the restore's reason", plans[0])
	}
	if plans[1].Mode != ModeIncremental {
		t.Errorf("disk 205: %+v, want incremental", plans[1])
	}
	if _, err := planDisks(ModeIncremental, disks, prev, false, 0); err == nil || !strings.Contains(err.Error(), "restored from backup B1") {
		t.Errorf("incremental mode: %v, want a refusal naming the restore", err)
	}
}
