package workflows

import (
	"testing"

	"github.com/cbtflow/cbtflow/activities"
)

func TestApplyTransfers(t *testing.T) {
	p := Progress{Phase: PhaseTransferring, Disks: []DiskProgress{
		{Key: 204, Phase: DiskTransferring, Total: 1000},
		{Key: 205, Phase: DiskTransferring, Total: 2000},
		{Key: 206, Phase: DiskWaiting, Total: 10},
		{Key: 207, Phase: DiskTransferring, Total: 300},
	}}
	p.ApplyTransfers([]activities.TransferProgress{
		{Key: 204, Stage: activities.TransferStageCopying, Done: 250, Total: 1000, Rate: 50},
		{Key: 205, Stage: activities.TransferStageVerifying, Done: 2000, Total: 2000, Verified: 100, VerifyTotal: 500, Rate: 200},
		{Key: 206, Stage: activities.TransferStageCopying, Done: 5, Total: 10, Rate: 1}, // waiting in the workflow: not applied
		{Key: 207, Stage: activities.TransferStageDone},                                 // done in a TransferDisks that runs on
	})
	if !p.Live {
		t.Error("not live")
	}
	if d := p.Disks[0]; d.Done != 250 || d.Percent != 25 || d.Rate != 50 || d.ETASeconds != 15 {
		t.Errorf("copying disk: %+v, want 250 of 1000, 25%%, ETA 15 s", d)
	}
	if d := p.Disks[1]; d.Phase != DiskVerifying || d.Percent != 100 || d.Verified != 100 || d.ETASeconds != 2 {
		t.Errorf("verifying disk: %+v, want verifying, 100%%, ETA 2 s (400 bytes left at 200/s)", d)
	}
	if d := p.Disks[3]; d.Phase != DiskDone || d.Done != 300 || d.Percent != 100 || d.ETASeconds != 0 {
		t.Errorf("disk done: %+v, want done, 300 of 300, 100%%", d)
	}
	if d := p.Disks[2]; d.Done != 0 || d.Phase != DiskWaiting {
		t.Errorf("a disk the workflow does not copy took a heartbeat: %+v", d)
	}
}
