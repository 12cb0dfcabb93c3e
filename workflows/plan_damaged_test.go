package workflows

import (
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/activities"
)

func TestPlanDamagedChainIsFull(t *testing.T) {
	disks := []activities.VMDisk{{Key: 204, Capacity: 1 << 30}, {Key: 205, Capacity: 1 << 30}}
	prev := []activities.PreviousDisk{
		{Key: 204, BackupID: "b1", Capacity: 1 << 30, ChangeID: "c/1", Path: "/r/204/b1.qcow2", ChainLength: 2,
			Damaged: "image /r/204/b0.qcow2: missing"},
		{Key: 205, BackupID: "b1", Capacity: 1 << 30, ChangeID: "c/2", Path: "/r/205/b1.qcow2", ChainLength: 2},
	}
	plans, err := planDisks(ModeAuto, disks, prev, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	if plans[0].Mode != ModeFull || plans[0].BackingPath != "" || !strings.Contains(plans[0].Reason, "chain damaged: image /r/204/b0.qcow2: missing") {
		t.Errorf("disk 204 (damaged chain): %+v, want a full backup saying why", plans[0])
	}
	if plans[1].Mode != ModeIncremental || plans[1].BackingPath != "/r/205/b1.qcow2" {
		t.Errorf("disk 205 (sound chain): %+v, want incremental", plans[1])
	}
	if _, err := planDisks(ModeIncremental, disks, prev, false, 0); err == nil || !strings.Contains(err.Error(), "chain damaged") {
		t.Errorf("--mode incremental on a damaged chain: %v, want an error naming the damage", err)
	}
}
