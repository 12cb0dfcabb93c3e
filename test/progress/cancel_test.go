package progress

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// status, watch and cancel on a running backup, held mid-transfer:
// status lists it with its phase and progress, watch follows it to its
// end, cancel ends it: no snapshot left on the VM, nothing committed, and
// the VM's next backup is correct (its restore equals the disk).
func TestStatusWatchCancel(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	run := func(args ...string) stack.StarterResult {
		t.Helper()
		r, err := s.Starter(ctx, args...)
		if err != nil {
			t.Fatalf("starter %v: %v", args, err)
		}
		return r
	}
	disks, err := s.Lab().Disks(vm)
	if err != nil || len(disks) == 0 {
		t.Fatalf("lab VM %s: disks %+v (%v)", vm, disks, err)
	}
	key, moref := disks[0].Key, disks[0].VMRef
	writeData(t, s, key, 0, 256*MiB, 1)
	var first stacktest.BackupJSON
	if r := run("backup", vm, "--wait", "--json"); r.ExitCode != 0 || stacktest.DecodeOne(r.Stdout, &first) != nil {
		t.Fatalf("first backup: %s", r)
	}
	if r := run("status"); r.ExitCode != 0 || !strings.Contains(r.Stdout, "no backup is running") {
		t.Errorf("status with nothing running: %s", r)
	}

	// The second backup, held in the middle of its transfer.
	writeData(t, s, key, 512*MiB, 256*MiB, 50)
	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = gates.Release(faultpoint.MidTransfer) }()
	var second stacktest.BackupJSON
	if r := run("backup", vm, "--json"); r.ExitCode != 0 || stacktest.DecodeOne(r.Stdout, &second) != nil || second.Status != workflows.ReportRunning {
		t.Fatalf("second backup: %s", r)
	}
	wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer wcancel()
	if _, err := gates.Wait(wctx, faultpoint.MidTransfer); err != nil {
		t.Fatalf("the second backup never reached the middle of its transfer: %v", err)
	}

	// status: the running backup, its phase and bytes (live, from the
	// transfer's heartbeats), as JSON and for a person.
	var entries []struct {
		BackupID string             `json:"backup_id"`
		VM       string             `json:"vm"`
		Progress workflows.Progress `json:"progress"`
	}
	deadline := time.Now().Add(time.Minute)
	for {
		r := run("status", vm, "--json")
		if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &entries) != nil {
			t.Fatalf("status --json: %s", r)
		}
		if len(entries) == 1 && entries[0].Progress.Live && disk(entries[0].Progress, key).Done > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status --json never showed the running backup's bytes: %s", r)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if en := entries[0]; en.BackupID != second.BackupID || en.VM != vm || en.Progress.Phase != workflows.PhaseTransferring ||
		disk(en.Progress, key).Total < 256*MiB {
		t.Errorf("status --json: %+v", en)
	}
	if r := run("status"); r.ExitCode != 0 || !strings.Contains(r.Stdout, second.BackupID) || !strings.Contains(r.Stdout, "transferring") ||
		!strings.Contains(r.Stdout, fmt.Sprintf("disk %d", key)) || !strings.Contains(r.Stdout, "MiB") {
		t.Errorf("status: %s", r)
	}
	if r := run("status", "DC0_H0_VM1"); r.ExitCode != 0 || !strings.Contains(r.Stdout, "no backup of VM DC0_H0_VM1 is running") {
		t.Errorf("status of another VM: %s", r)
	}

	// watch (no terminal: lines) follows it; cancel ends it.
	watch, err := s.StartStarter("watch", vm)
	if err != nil {
		t.Fatal(err)
	}
	// Once watch follows it (it printed the phase), cancel.
	deadline = time.Now().Add(time.Minute)
	for !strings.Contains(watch.Stdout(), "transferring") {
		if time.Now().After(deadline) {
			t.Fatalf("watch never showed the running backup: stdout %q, stderr %q", watch.Stdout(), watch.Stderr())
		}
		time.Sleep(100 * time.Millisecond)
	}
	cancelRun, err := s.StartStarter("cancel", second.BackupID)
	if err != nil {
		t.Fatal(err)
	}
	// Once the cancel is requested (in the backup's history), release the
	// held transfer: it sees the cancel at its next heartbeat.
	deadline = time.Now().Add(time.Minute)
	for !cancelRequested(ctx, t, s, second.WorkflowID) {
		if time.Now().After(deadline) {
			t.Fatalf("the cancel never reached backup %s: cancel's stderr %q", second.BackupID, cancelRun.Stderr())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := gates.Release(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	cr, err := cancelRun.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cr.ExitCode != 0 || !strings.Contains(cr.Stdout, second.BackupID) || !strings.Contains(cr.Stdout, "canceled") {
		t.Fatalf("cancel: %s", cr)
	}
	wr, err := watch.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if wr.ExitCode != 1 || !strings.Contains(wr.Stdout, "transferring") || !strings.Contains(wr.Stdout, second.BackupID+" of VM "+vm) ||
		!strings.Contains(wr.Stdout, "canceled") {
		t.Errorf("watch of the canceled backup: want exit 1, its phases and the canceled summary; got %s", wr)
	}
	if r := run("cancel", second.BackupID); r.ExitCode != 1 || !strings.Contains(r.Stderr, "not running") {
		t.Errorf("cancel of a backup that ended: %s", r)
	}

	// Nothing left: no snapshot, nothing committed.
	snaps, err := stacktest.Snapshots(ctx, s.Lab(), moref)
	if err != nil || len(snaps) != 0 {
		t.Errorf("snapshots of %s after the cancel: %v (%v), want none", vm, snaps, err)
	}
	var list []stacktest.ListJSON
	if r := run("list", vm, "--json"); r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &list) != nil {
		t.Fatalf("list: %s", r)
	}
	for _, e := range list {
		if e.BackupID == second.BackupID && (e.Status == "committed" || e.Restorable) {
			t.Errorf("the canceled backup is in the catalog as %s (restorable %v)", e.Status, e.Restorable)
		}
	}

	// The next backup is correct: an incremental on the first, whose
	// restore equals the disk.
	var third stacktest.BackupJSON
	if r := run("backup", vm, "--wait", "--json"); r.ExitCode != 0 || stacktest.DecodeOne(r.Stdout, &third) != nil {
		t.Fatalf("the backup after the cancel: %s", r)
	}
	if d := third.Disk(t, key); d.Mode != workflows.ModeIncremental {
		t.Errorf("the backup after the cancel: disk %d %s, want incremental", key, d.Mode)
	}
	dir := t.TempDir()
	want, got := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "restored.raw")
	stacktest.Capture(t, s.Lab(), vm, key, want)
	if r := run("restore", third.BackupID, "--disk", fmt.Sprint(key), "--to", got); r.ExitCode != 0 {
		t.Fatalf("restore: %s", r)
	}
	if diff, err := stacktest.SameContent(want, got); err != nil || diff != "" {
		t.Errorf("the restore of the backup after the cancel differs from the disk: %s %v", diff, err)
	}
}

// cancelRequested reports whether workflow id's history holds a cancel
// request.
func cancelRequested(ctx context.Context, t *testing.T, s *stack.Stack, id string) bool {
	t.Helper()
	for _, ev := range stacktest.History(ctx, t, s, id, "") {
		if ev.GetEventType() == enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED {
			return true
		}
	}
	return false
}
