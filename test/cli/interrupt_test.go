package cli

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

// Ctrl-C (SIGINT) or SIGTERM of `starter backup VM --wait` while the
// backup runs: the starter exits 4 at once and says that the backup goes
// on in the background, with its backup ID and workflow ID and how to
// follow and cancel it (with --json: the backup as status "running"); the
// backup, held at a fault point meanwhile, then goes on and commits, and
// nothing ever asked Temporal to cancel it.
func TestInterruptedWaitLeavesTheBackupRunning(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const vm = "DC0_H0_VM1"
	l := s.Lab()
	disks, err := l.Disks(vm)
	if err != nil || len(disks) != 1 {
		t.Fatalf("lab VM %s: %+v %v", vm, disks, err)
	}
	key := disks[0].Key
	// Enough data that a progress report falls between half and all of
	// the copy, where the mid-transfer point holds it (as in make chaos).
	chunk := stacktest.Pattern(7, 16<<20)
	for off := int64(0); off < 320<<20; off += int64(len(chunk)) {
		stacktest.WriteDisk(t, l, vm, key, off, chunk)
	}
	gates := s.FaultPoints()

	for i, c := range []struct {
		name  string
		point string
		sig   syscall.Signal
		json  bool
	}{
		{"SIGINT mid-transfer", faultpoint.MidTransfer, syscall.SIGINT, false},
		{"SIGTERM after the snapshot, --json", faultpoint.AfterSnapshot, syscall.SIGTERM, true},
	} {
		t.Logf("%s", c.name)
		if err := gates.Arm(c.point); err != nil {
			t.Fatal(err)
		}
		// Released on every way out, so the stack can stop.
		t.Cleanup(func() { _ = gates.Release(c.point) })
		args := []string{"backup", vm, "--wait"}
		if c.json {
			args = append(args, "--json")
		}
		st, err := s.StartStarter(args...)
		if err != nil {
			t.Fatal(err)
		}
		wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
		_, err = gates.Wait(wctx, c.point)
		wcancel()
		if err != nil {
			_ = st.Signal(syscall.SIGKILL)
			r, _ := st.Wait(ctx)
			t.Fatalf("%s: %v\nstarter: %s", c.name, err, r)
		}
		// The starter logs the start before it waits for the end.
		waitFor(ctx, t, "the starter to log the backup's start", func() bool {
			return strings.Contains(st.Stderr(), "backup started")
		})

		// What runs: the catalog's running backup and its workflow.
		var running []stacktest.ListJSON
		for _, e := range list(ctx, t, s, vm) {
			if e.Status == "running" {
				running = append(running, e)
			}
		}
		if len(running) != 1 {
			t.Fatalf("%s: %d running backups of %s in the catalog, want 1: %+v", c.name, len(running), vm, running)
		}
		id := running[0].BackupID
		// Temporal's own view: the one running BackupVM of that backup.
		var workflowID string
		waitFor(ctx, t, "Temporal to list the workflow of backup "+id, func() bool {
			wfs := stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'BackupVM' AND ExecutionStatus = 'Running' AND CbtflowBackupID = '%s'", id))
			if len(wfs) == 1 {
				workflowID = wfs[0].GetExecution().GetWorkflowId()
			}
			return workflowID != ""
		})

		sent := time.Now()
		if err := st.Signal(c.sig); err != nil {
			t.Fatal(err)
		}
		rctx, rcancel := context.WithTimeout(ctx, time.Minute)
		r, err := st.Wait(rctx)
		rcancel()
		if err != nil {
			t.Fatalf("%s: the starter did not exit by itself: %v\n%s", c.name, err, r)
		}
		t.Logf("%s: exit %d %s after the signal\nstderr: %s", c.name, r.ExitCode, time.Since(sent).Round(time.Millisecond), r.Stderr)
		if r.ExitCode != 4 {
			t.Errorf("%s: exit code %d, want 4\n%s", c.name, r.ExitCode, r)
		}
		for _, want := range []string{
			"interrupted: backup " + id + " of VM " + vm + " goes on in the background (workflow " + workflowID + ")",
			"the starter did not cancel it",
			"follow it: starter watch " + id,
			"starter status " + vm,
			"/namespaces/default/workflows/" + url.PathEscape(workflowID),
			"temporal workflow describe --address " + s.TemporalAddress() + " --namespace default --workflow-id " + workflowID,
			"cancel it: starter cancel " + id,
		} {
			if !strings.Contains(r.Stderr, want) {
				t.Errorf("%s: stderr lacks %q:\n%s", c.name, want, r.Stderr)
			}
		}
		if strings.Contains(r.Stderr, "context canceled") {
			t.Errorf("%s: stderr still reports the interrupt as a failure:\n%s", c.name, r.Stderr)
		}
		if c.json {
			var raw map[string]any
			if err := stacktest.DecodeOne(r.Stdout, &raw); err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			for k, want := range map[string]string{"backup_id": id, "vm": vm, "vm_uuid": running[0].VMUUID, "status": "running", "workflow_id": workflowID} {
				if raw[k] != want {
					t.Errorf("%s: JSON %s = %v, want %q\n%s", c.name, k, raw[k], want, r.Stdout)
				}
			}
			if d, ok := raw["disks"].([]any); !ok || len(d) != 0 {
				t.Errorf("%s: JSON disks = %v, want []", c.name, raw["disks"])
			}
			if _, ok := raw["error"]; ok {
				t.Errorf("%s: JSON has an error for a running backup: %v", c.name, raw["error"])
			}
		} else if want := "backup " + id + " of VM " + vm + " (" + running[0].VMUUID + "): running\n"; r.Stdout != want {
			t.Errorf("%s: stdout %q, want %q", c.name, r.Stdout, want)
		}

		// The starter is gone; the backup is still held, and running.
		desc, err := s.Client().DescribeWorkflow(ctx, workflowID, "")
		if err != nil {
			t.Fatal(err)
		}
		if st := desc.Status; st != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
			t.Fatalf("%s: after the starter exited, workflow %s is %s, want running", c.name, workflowID, st)
		}
		if !gates.Reached(c.point) {
			t.Errorf("%s: the backup is no longer held at %s", c.name, c.point)
		}

		// Let it go on: it commits without any starter waiting.
		if err := gates.Release(c.point); err != nil {
			t.Fatal(err)
		}
		var status string
		waitFor(ctx, t, "backup "+id+" to commit", func() bool {
			for _, e := range list(ctx, t, s, vm) {
				if e.BackupID == id {
					status = e.Status
				}
			}
			return status != "running"
		})
		if status != "committed" {
			t.Fatalf("%s: backup %s ended %q after the interrupt, want committed", c.name, id, status)
		}
		// The snapshot goes after the commit: wait for the workflow's end
		// before looking for it.
		if err := s.Client().GetWorkflow(ctx, workflowID, "").Get(ctx, nil); err != nil {
			t.Fatalf("%s: workflow %s: %v", c.name, workflowID, err)
		}
		for _, ev := range stacktest.History(ctx, t, s, workflowID, "") {
			if ev.GetEventType() == enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED {
				t.Errorf("%s: workflow %s was asked to cancel (event %d)", c.name, workflowID, ev.GetEventId())
			}
		}
		if snaps, err := stacktest.Snapshots(ctx, l, disks[0].VMRef); err != nil || len(snaps) != 0 {
			t.Errorf("%s: after the commit, snapshots %v (%v)", c.name, snaps, err)
		}
		if i == 0 {
			// The second backup is an incremental with little to copy:
			// write a little so it has something to transfer.
			stacktest.WriteDisk(t, l, vm, key, 1<<30, stacktest.Pattern(8, 1<<20))
		}
	}
}

// waitFor polls cond every 200 ms until it holds, failing t when ctx ends
// first.
func waitFor(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
