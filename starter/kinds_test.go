package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/workflows"
)

// status prints a table per kind with running workflows (restores, then
// verifications), their phase and figures; nothing when none runs.
func TestPrintKindStatus(t *testing.T) {
	var out bytes.Buffer
	if err := printKindStatus(&out, nil); err != nil || out.Len() != 0 {
		t.Fatalf("nothing running: %q %v, want nothing", out.String(), err)
	}
	started := time.Now().Add(-time.Minute)
	entries := []statusEntry{
		{Kind: "restore", WorkflowID: "restore/b1/204/x", BackupID: "b1", VM: "vm1", StartedAt: started,
			Restore: &workflows.RestoreProgress{BackupID: "b1", DiskKey: 204, To: "/r/disk.raw", Phase: workflows.RestoreWriting,
				Done: 1 << 30, Total: 4 << 30, Rate: 100 << 20, ETASeconds: 30, Live: true}},
		{Kind: "verify", WorkflowID: "verify/abc", VM: "vm2", StartedAt: started,
			Verify: &workflows.VerifyProgress{Phase: workflows.VerifyVerifying, Points: 1, Disks: 2, DisksDone: 1,
				BackupID: "b2", Key: 205, Stage: "reading", Done: 1 << 20, Total: 4 << 20, Live: true}},
		{Kind: "verify", WorkflowID: "verify/def", StartedAt: started, Error: "query failed",
			Verify: &workflows.VerifyProgress{}},
	}
	if err := printKindStatus(&out, entries); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{
		"RESTORE", "restore/b1/204/x", "vm1", "/r/disk.raw", "writing", "1.0 GiB of 4.0 GiB (25%)", "100.0 MiB/s", "ETA",
		"VERIFICATION", "verify/abc", "disk 205 of restore point b2 (2 of 2 disks): re-reading the blocks", "1.0 MiB of 4.0 MiB (25%)",
		"verify/def", "progress unknown (query failed)",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("status lacks %q:\n%s", want, got)
		}
	}
	if strings.Index(got, "RESTORE") > strings.Index(got, "VERIFICATION") {
		t.Errorf("restores not listed before verifications:\n%s", got)
	}
}

func TestVerifyPhaseText(t *testing.T) {
	for _, c := range []struct {
		p    workflows.VerifyProgress
		want string
	}{
		{workflows.VerifyProgress{Phase: workflows.VerifyPlanning}, "looking up the restore points"},
		{workflows.VerifyProgress{Phase: workflows.VerifyVerifying, BackupID: "b1", Key: 204, Disks: 3, Stage: "checking"},
			"disk 204 of restore point b1 (1 of 3 disks): checking the chain's images"},
		{workflows.VerifyProgress{Phase: workflows.VerifyCompleted, DisksDone: 3, Damaged: 1}, "completed: 3 disks, 1 damaged"},
	} {
		if got := verifyPhaseText(c.p); got != c.want {
			t.Errorf("%+v: %q, want %q", c.p, got, c.want)
		}
	}
}
