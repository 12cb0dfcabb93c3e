package catalog

import (
	"context"
	"errors"
	"testing"
)

// A restore into a VM that began after a restore point makes RestoredSince
// name it, whatever its outcome and profile; one that began before does
// not.
func TestVMRestores(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	begin := func(id string) {
		t.Helper()
		if err := c.Begin(ctx, Backup{ID: id, Profile: "lab", VMUUID: "uuid-r", VMName: "vm-r", Mode: "auto"}); err != nil {
			t.Fatal(err)
		}
		if err := c.Commit(ctx, id, []Disk{disk(204, ModeFull, "c/"+id, "")}); err != nil {
			t.Fatal(err)
		}
	}
	begin("p1")
	if r, err := c.RestoredSince(ctx, "uuid-r", "p1"); err != nil || r != nil {
		t.Fatalf("before any restore: %+v %v", r, err)
	}
	r1 := VMRestore{ID: "r1", Profile: "other", VMUUID: "uuid-r", VMName: "vm-r", BackupID: "p1", WorkflowID: "restore-vm/r1"}
	for range 2 { // idempotent
		if err := c.BeginVMRestore(ctx, r1); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.SetVMRestoreSnapshot(ctx, "r1", "cbtflow-restore-r1 (snapshot-9)"); err != nil {
		t.Fatal(err)
	}
	got, err := c.RestoredSince(ctx, "uuid-r", "p1")
	if err != nil || got == nil || got.ID != "r1" || got.BackupID != "p1" || got.Outcome != RestoreRunning || !got.FinishedAt.IsZero() {
		t.Fatalf("after a running restore: %+v %v", got, err)
	}
	if r, err := c.RestoredSince(ctx, "uuid-other", "p1"); err != nil || r != nil {
		t.Fatalf("another VM: %+v %v", r, err)
	}
	if err := c.FinishVMRestore(ctx, "r1", RestoreFailed, "disk 204: boom"); err != nil {
		t.Fatal(err)
	}
	got, err = c.RestoredSince(ctx, "uuid-r", "p1")
	if err != nil || got == nil || got.Outcome != RestoreFailed || got.Error != "disk 204: boom" || got.FinishedAt.IsZero() ||
		got.Snapshot != "cbtflow-restore-r1 (snapshot-9)" {
		t.Fatalf("a failed restore counts too, finished: %+v %v", got, err)
	}
	// A restore point taken after the restore: its chain starts afresh.
	begin("p2")
	if r, err := c.RestoredSince(ctx, "uuid-r", "p2"); err != nil || r != nil {
		t.Fatalf("after a newer point: %+v %v", r, err)
	}
	// A restore that runs while a point is taken, and ends after it
	// began, counts for that point.
	if err := c.BeginVMRestore(ctx, VMRestore{ID: "r2", Profile: "lab", VMUUID: "uuid-r", VMName: "vm-r", BackupID: "p1"}); err != nil {
		t.Fatal(err)
	}
	begin("p3")
	// Still running: what it writes after p3's snapshot is not in p3's
	// changes, so the next backup is full (also when its workflow was
	// terminated and nothing records its end but the sweeper).
	if r, err := c.RestoredSince(ctx, "uuid-r", "p3"); err != nil || r == nil || r.ID != "r2" {
		t.Fatalf("a restore still running, begun before the point: %+v %v, want r2", r, err)
	}
	if un, err := c.UnfinishedVMRestores(ctx, ""); err != nil || len(un) != 1 || un[0].ID != "r2" {
		t.Fatalf("UnfinishedVMRestores = %+v %v, want r2", un, err)
	}
	if un, err := c.UnfinishedVMRestores(ctx, "uuid-other"); err != nil || len(un) != 0 {
		t.Fatalf("UnfinishedVMRestores(another VM) = %+v %v, want none", un, err)
	}
	if err := c.FinishVMRestore(ctx, "r2", RestoreCompleted, ""); err != nil {
		t.Fatal(err)
	}
	if r, err := c.RestoredSince(ctx, "uuid-r", "p3"); err != nil || r == nil || r.ID != "r2" {
		t.Fatalf("a restore that ended after the point began: %+v %v, want r2", r, err)
	}
	if un, err := c.UnfinishedVMRestores(ctx, "uuid-r"); err != nil || len(un) != 0 {
		t.Fatalf("UnfinishedVMRestores after the end = %+v %v, want none", un, err)
	}
	begin("p4")
	if r, err := c.RestoredSince(ctx, "uuid-r", "p4"); err != nil || r != nil {
		t.Fatalf("after a point taken once the restore ended: %+v %v", r, err)
	}
	if err := c.FinishVMRestore(ctx, "nope", RestoreCompleted, ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("FinishVMRestore(unknown) = %v, want ErrNotFound", err)
	}
	if err := c.FinishVMRestore(ctx, "r1", "maybe", ""); err == nil {
		t.Error("FinishVMRestore with a bad outcome succeeded")
	}
}
