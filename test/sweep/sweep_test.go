package sweep

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const vm = "DC0_H0_VM1"

// Terminating a running backup and then running the sweeper leaves no
// snapshot and no partial file, and marks the backup failed; the set-up
// creates the sweeper's schedule; a sweep respects the minimum age.
func TestSweeperCleansUpATerminatedBackup(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	// The set-up creates the schedule, and running it again updates it.
	for i := 0; i < 2; i++ {
		r := starter(ctx, t, s, "setup", "--sweep-every", "1h")
		if r.ExitCode != 0 {
			t.Fatalf("starter setup (run %d): %s", i+1, r)
		}
	}
	desc, err := s.Client().ScheduleClient().GetHandle(ctx, workflows.SweeperScheduleID).Describe(ctx)
	if err != nil {
		t.Fatalf("the set-up created no schedule %s: %v", workflows.SweeperScheduleID, err)
	}
	if a, ok := desc.Schedule.Action.(*client.ScheduleWorkflowAction); !ok || a.Workflow != "Sweep" || a.TaskQueue != workflows.TaskQueue {
		t.Errorf("schedule action = %#v, want the Sweep workflow on %s", desc.Schedule.Action, workflows.TaskQueue)
	}
	// And the daily prune (issue 9).
	pdesc, err := s.Client().ScheduleClient().GetHandle(ctx, workflows.PruneScheduleID).Describe(ctx)
	if err != nil {
		t.Fatalf("the set-up created no schedule %s: %v", workflows.PruneScheduleID, err)
	}
	if a, ok := pdesc.Schedule.Action.(*client.ScheduleWorkflowAction); !ok || a.Workflow != "Prune" || a.TaskQueue != workflows.TaskQueue {
		t.Errorf("prune schedule action = %#v, want the Prune workflow on %s", pdesc.Schedule.Action, workflows.TaskQueue)
	}
	if iv := pdesc.Schedule.Spec.Intervals; len(iv) != 1 || iv[0].Every != 24*time.Hour {
		t.Errorf("prune schedule intervals = %+v, want every 24h", iv)
	}
	// And the weekly verification (issue 11).
	vdesc, err := s.Client().ScheduleClient().GetHandle(ctx, workflows.VerifyScheduleID).Describe(ctx)
	if err != nil {
		t.Fatalf("the set-up created no schedule %s: %v", workflows.VerifyScheduleID, err)
	}
	if a, ok := vdesc.Schedule.Action.(*client.ScheduleWorkflowAction); !ok || a.Workflow != "Verify" || a.TaskQueue != workflows.TaskQueue {
		t.Errorf("verify schedule action = %#v, want the Verify workflow on %s", vdesc.Schedule.Action, workflows.TaskQueue)
	}
	if iv := vdesc.Schedule.Spec.Intervals; len(iv) != 1 || iv[0].Every != 7*24*time.Hour {
		t.Errorf("verify schedule intervals = %+v, want every 168h", iv)
	}

	// A backup held mid-transfer, then terminated: no cleanup code runs.
	l := s.Lab()
	disks, err := l.Disks(vm)
	if err != nil || len(disks) == 0 {
		t.Fatalf("lab VM %s: %v %v", vm, disks, err)
	}
	key := disks[0].Key
	data := bytes.Repeat([]byte("cbtflow sweeper "), 16<<20/16)
	for off := int64(0); off < 192<<20; off += int64(len(data)) {
		if _, err := l.WriteDisk(vm, key, off, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
	}
	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	r := starter(ctx, t, s, "backup", vm, "--json")
	var started struct {
		BackupID   string `json:"backup_id"`
		WorkflowID string `json:"workflow_id"`
	}
	if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &started) != nil || started.BackupID == "" {
		t.Fatalf("starting the backup: %s", r)
	}
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	if _, err := gates.Wait(wctx, faultpoint.MidTransfer); err != nil {
		wcancel()
		t.Fatal(err)
	}
	wcancel()
	if err := s.Client().TerminateWorkflow(ctx, started.WorkflowID, "", "test: a backup killed by an operator"); err != nil {
		t.Fatal(err)
	}
	// Let the held transfer go on: its next heartbeat learns that the
	// workflow is gone and it stops. Wait until its servers are gone, so
	// nothing writes into the repository while the sweeper cleans it.
	if err := gates.Release(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the terminated transfer to stop its NBD servers", func() bool {
		for _, p := range stack.Descendants(s.WorkerPID()) {
			if strings.Contains(p.Cmd, "qemu-nbd") || strings.Contains(p.Cmd, "nbdkit") {
				return false
			}
		}
		return true
	})

	snapName := activities.SnapshotPrefix + started.BackupID
	if got := snapshots(ctx, t, s); len(got) != 1 || got[0] != snapName {
		t.Fatalf("before the sweep: snapshots %v, want the terminated backup's %s", got, snapName)
	}
	if files := stacktest.FilesOf(t, s.Repository(), started.BackupID); len(files) == 0 {
		t.Fatalf("before the sweep: no partial file of %s in the repository", started.BackupID)
	}
	if st := status(ctx, t, s, started.BackupID); st != "running" {
		t.Fatalf("before the sweep: the catalog says %s is %q, want running", started.BackupID, st)
	}

	// With the default minimum age, a fresh snapshot is left alone.
	r = starter(ctx, t, s, "sweep")
	var res workflows.SweepResult
	if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &res) != nil {
		t.Fatalf("starter sweep: %s", r)
	}
	if len(res.SnapshotsRemoved) != 0 || len(res.BackupsFailed) != 0 || len(snapshots(ctx, t, s)) != 1 {
		t.Fatalf("a sweep with the default minimum age removed a fresh snapshot: %+v", res)
	}

	r = starter(ctx, t, s, "sweep", "--min-age", "0")
	res = workflows.SweepResult{}
	if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &res) != nil {
		t.Fatalf("starter sweep --min-age 0: %s", r)
	}
	if len(res.SnapshotsRemoved) != 1 || res.SnapshotsRemoved[0] != snapName ||
		len(res.BackupsFailed) != 1 || res.BackupsFailed[0] != started.BackupID || len(res.Errors) != 0 {
		t.Errorf("sweep result %+v, want %s removed and %s failed", res, snapName, started.BackupID)
	}
	if got := snapshots(ctx, t, s); len(got) != 0 {
		t.Errorf("after the sweep: snapshots %v remain", got)
	}
	if files := stacktest.FilesOf(t, s.Repository(), started.BackupID); len(files) != 0 {
		t.Errorf("after the sweep: partial files remain: %v", files)
	}
	if st := status(ctx, t, s, started.BackupID); st != "failed" {
		t.Errorf("after the sweep: the catalog says %s is %q, want failed", started.BackupID, st)
	}

	// A second sweep finds nothing; the next backup of the VM succeeds.
	r = starter(ctx, t, s, "sweep", "--min-age", "0")
	res = workflows.SweepResult{}
	if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &res) != nil || len(res.SnapshotsRemoved)+len(res.BackupsFailed) != 0 {
		t.Errorf("second sweep: %s", r)
	}
	r = starter(ctx, t, s, "backup", vm, "--wait", "--json")
	if r.ExitCode != 0 || !strings.Contains(r.Stdout, `"status":"completed"`) {
		t.Errorf("the backup after the sweep: %s", r)
	}
	if got := snapshots(ctx, t, s); len(got) != 0 {
		t.Errorf("after the next backup: snapshots %v remain", got)
	}
}

func starter(ctx context.Context, t *testing.T, s *stack.Stack, args ...string) stack.StarterResult {
	t.Helper()
	r, err := s.Starter(ctx, args...)
	if err != nil {
		t.Fatalf("starter %v: %v", args, err)
	}
	return r
}

// snapshots lists the cbtflow snapshots of every VM, through cbtflow's own
// vSphere client and the stack's profile.
func snapshots(ctx context.Context, t *testing.T, s *stack.Stack) []string {
	t.Helper()
	profiles, err := vsphere.LoadProfiles(s.VCentersFile())
	if err != nil {
		t.Fatal(err)
	}
	sessions := vsphere.NewSessions(profiles, slog.New(slog.DiscardHandler))
	defer sessions.Close(context.WithoutCancel(ctx))
	c, err := sessions.Client(ctx, "lab")
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := c.Snapshots(ctx, activities.SnapshotPrefix)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, sn := range snaps {
		names = append(names, sn.Name)
	}
	return names
}

func status(ctx context.Context, t *testing.T, s *stack.Stack, backupID string) string {
	t.Helper()
	r := starter(ctx, t, s, "list", vm, "--json")
	var list []struct {
		BackupID string `json:"backup_id"`
		Status   string `json:"status"`
	}
	if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &list) != nil {
		t.Fatalf("starter list: %s", r)
	}
	for _, b := range list {
		if b.BackupID == backupID {
			return b.Status
		}
	}
	return ""
}

func waitFor(ctx context.Context, t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !ok() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("waiting for %s: timed out", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
