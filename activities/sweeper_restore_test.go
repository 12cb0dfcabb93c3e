package activities_test

import (
	"context"
	"slices"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// A restore into a VM keeps its snapshot, cbtflow-restore-<id>, when it
// fails, for the operator to revert to: the sweeper never calls it an
// orphan, though no workflow runs it, while an abandoned backup's
// snapshot on the same VM is one.
func TestFindOrphansLeavesRestoreSnapshots(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	const backupID = "20260101T000000Z-0123456789ab"
	backupSnap := f.snapshot(t, env, vm, backupID)
	c, err := f.sessions.Client(ctxT(t, time.Minute), profileLab)
	if err != nil {
		t.Fatal(err)
	}
	v, err := c.VMByUUID(ctxT(t, time.Minute), vm.uuid)
	if err != nil {
		t.Fatal(err)
	}
	kept, err := c.CreateSnapshot(ctxT(t, time.Minute), v, activities.RestoreSnapshotPrefix+"20260101T000100Z-0123456789ab")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.RemoveSnapshot(context.Background(), vm.ref, kept.Ref) })
	cat, err := catalog.Open(ctxT(t, time.Minute), testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	sw := &activities.Sweeper{Sessions: f.sessions, Catalog: cat, Repo: f.repo, Workflows: noWorkflows{}, Namespace: "default"}
	res := mustExecute[activities.FindOrphansResult](t, newActivityEnv(t, f.log, sw), sw.FindOrphans, activities.FindOrphansInput{})
	if len(res.Snapshots) != 1 || res.Snapshots[0].SnapshotRef != backupSnap.SnapshotRef {
		t.Errorf("orphan snapshots %+v, want only the backup's %s, never the restore's %s (%s)", res.Snapshots,
			backupSnap.SnapshotRef, kept.Name, kept.Ref)
	}
}

// A restore into a VM whose workflow is gone without recording its
// outcome (terminated) stays unfinished in the catalog, which makes every
// backup of the VM full: the sweep records it as failed, naming its kept
// snapshot; one whose workflow runs is left alone.
func TestFindOrphansFinishesAbandonedRestores(t *testing.T) {
	f := newFixture(t, lab.Options{})
	cat, err := catalog.Open(ctxT(t, time.Minute), testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	ctx := ctxT(t, time.Minute)
	for _, id := range []string{"gone", "running"} {
		if err := cat.BeginVMRestore(ctx, catalog.VMRestore{ID: id, Profile: profileLab, VMUUID: "uuid-" + id, VMName: "vm-" + id,
			BackupID: "b", WorkflowID: "restore-vm/b/" + id}); err != nil {
			t.Fatal(err)
		}
	}
	if err := cat.SetVMRestoreSnapshot(ctx, "gone", "cbtflow-restore-gone (snapshot-7)"); err != nil {
		t.Fatal(err)
	}
	sw := &activities.Sweeper{Sessions: f.sessions, Catalog: cat, Repo: f.repo, Workflows: runningOnly{"restore-vm/b/running"},
		Namespace: "default"}
	mustExecute[activities.FindOrphansResult](t, newActivityEnv(t, f.log, sw), sw.FindOrphans, activities.FindOrphansInput{})
	un, err := cat.UnfinishedVMRestores(ctx, "")
	if err != nil || len(un) != 1 || un[0].ID != "running" {
		t.Fatalf("unfinished restores after the sweep: %+v %v, want only the running one", un, err)
	}
	if err := cat.Begin(ctx, catalog.Backup{ID: "p", Profile: profileLab, VMUUID: "uuid-gone", VMName: "vm-gone", Mode: "auto"}); err != nil {
		t.Fatal(err)
	}
	if r, err := cat.RestoredSince(ctx, "uuid-gone", "p"); err != nil || r != nil {
		t.Errorf("RestoredSince for a point begun after the sweep: %+v %v, want none", r, err)
	}
}

// runningOnly is a Temporal that runs only the workflows named.
type runningOnly []string

func (r runningOnly) DescribeWorkflow(_ context.Context, id, _ string) (*client.WorkflowExecutionDescription, error) {
	if slices.Contains(r, id) {
		return &client.WorkflowExecutionDescription{WorkflowExecutionMetadata: client.WorkflowExecutionMetadata{Status: enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING}}, nil
	}
	return nil, serviceerror.NewNotFound("workflow not found")
}

func (runningOnly) ListWorkflow(context.Context, *workflowservice.ListWorkflowExecutionsRequest) (*workflowservice.ListWorkflowExecutionsResponse, error) {
	return &workflowservice.ListWorkflowExecutionsResponse{}, nil
}
