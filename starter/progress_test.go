package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/workflows"
)

func TestSteadyKeepsBytesWhileCopying(t *testing.T) {
	live := workflows.Progress{Phase: workflows.PhaseTransferring, Live: true, Disks: []workflows.DiskProgress{
		{Key: 204, Phase: workflows.DiskTransferring, Done: 600, Total: 1000, Percent: 60, Rate: 100, ETASeconds: 4},
		{Key: 205, Phase: workflows.DiskWaiting, Total: 50},
	}}
	// The next answer lacks the transfers' figures (a describe failed).
	bare := workflows.Progress{Phase: workflows.PhaseTransferring, Disks: []workflows.DiskProgress{
		{Key: 204, Phase: workflows.DiskTransferring, Total: 1000},
		{Key: 205, Phase: workflows.DiskQuerying},
	}}
	got := steady(live, bare)
	if d := got.Disks[0]; d.Done != 600 || d.Percent != 60 || d.Rate != 100 {
		t.Errorf("disk 204 after an answer without figures: %+v, want the last figures kept", d)
	}
	if d := got.Disks[1]; d.Phase != workflows.DiskQuerying {
		t.Errorf("disk 205: %+v, want the new phase (it is not copying)", d)
	}
	if bare.Disks[0].Done != 0 {
		t.Error("steady changed its argument")
	}
	// Verifying, then an answer without figures that says transferring:
	// still verifying.
	ver := workflows.Progress{Disks: []workflows.DiskProgress{{Key: 204, Phase: workflows.DiskVerifying, Done: 1000, Total: 1000, Verified: 300, VerifyTotal: 900}}}
	if d := steady(ver, bare).Disks[0]; d.Phase != workflows.DiskVerifying || d.Verified != 300 {
		t.Errorf("after verifying: %+v", d)
	}
	// Progress forward is taken.
	more := workflows.Progress{Disks: []workflows.DiskProgress{{Key: 204, Phase: workflows.DiskTransferring, Done: 800, Total: 1000}}}
	if d := steady(live, more).Disks[0]; d.Done != 800 {
		t.Errorf("forward: %+v", d)
	}
}

func TestLineViewPrintsPhasesAndDisks(t *testing.T) {
	var out bytes.Buffer
	v := &lineView{w: &out}
	p := workflows.Progress{BackupID: "b1", VM: "vm0", Phase: workflows.PhaseSnapshot, Disks: []workflows.DiskProgress{{Key: 204, Mode: "full", Phase: workflows.DiskWaiting}}}
	v.show(p)
	v.show(p) // unchanged: nothing new
	p.Phase = workflows.PhaseTransferring
	p.Disks[0] = workflows.DiskProgress{Key: 204, Mode: "full", Phase: workflows.DiskTransferring, Done: 512 << 20, Total: 1 << 30, Percent: 50, Rate: 100 << 20, ETASeconds: 5.1}
	v.show(p)
	want := "backup b1 of VM vm0: taking the snapshot\n" +
		"  disk 204 full: waiting\n" +
		"backup b1 of VM vm0: transferring\n" +
		"  disk 204 full: 512.0 MiB of 1.0 GiB (50%), 100.0 MiB/s, ETA 5.1s\n"
	if out.String() != want {
		t.Errorf("lines:\n%s\nwant:\n%s", out.String(), want)
	}
}

func TestPhaseText(t *testing.T) {
	for _, c := range []struct {
		p    workflows.Progress
		want string
	}{
		{workflows.Progress{Phase: workflows.PhaseTransferring, Disks: []workflows.DiskProgress{{Phase: workflows.DiskQuerying}}}, "querying CBT"},
		{workflows.Progress{Phase: workflows.PhaseTransferring, Disks: []workflows.DiskProgress{{Phase: workflows.DiskVerifying}, {Phase: workflows.DiskTransferring}}}, "transferring, verifying the image"},
		{workflows.Progress{Phase: workflows.PhaseRemovingSnapshot}, "removing the snapshot"},
		{workflows.Progress{Phase: workflows.PhaseCommitted}, "committing"},
	} {
		if got := phaseText(c.p); !strings.HasPrefix(got, c.want) {
			t.Errorf("phaseText(%+v) = %q, want %q", c.p, got, c.want)
		}
	}
}
