package activities_test

import (
	"context"
	"testing"
	"time"

	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/lab"
	"github.com/cbtflow/cbtflow/internal/testutil"
	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// noWorkflows is a Temporal that runs nothing: every backup is abandoned.
type noWorkflows struct{}

func (noWorkflows) DescribeWorkflow(context.Context, string, string) (*client.WorkflowExecutionDescription, error) {
	return nil, serviceerror.NewNotFound("workflow not found")
}

func (noWorkflows) ListWorkflow(context.Context, *workflowservice.ListWorkflowExecutionsRequest) (*workflowservice.ListWorkflowExecutionsResponse, error) {
	return &workflowservice.ListWorkflowExecutionsResponse{}, nil
}

// One vCenter under two profiles shows the sweeper each snapshot twice: an
// abandoned snapshot is still listed once, so it is removed and its backup
// failed once.
func TestFindOrphansOnceAcrossProfiles(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	const backupID = "20260101T000000Z-0123456789ab"
	snap := f.snapshot(t, env, vm, backupID)

	alias := f.profile
	alias.Name = "lab-alias"
	sessions := vsphere.NewSessions(map[string]vsphere.Profile{profileLab: f.profile, alias.Name: alias}, f.log)
	t.Cleanup(func() {
		if err := sessions.Close(context.Background()); err != nil {
			t.Error(err)
		}
	})
	cat, err := catalog.Open(ctxT(t, time.Minute), testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	sw := &activities.Sweeper{Sessions: sessions, Catalog: cat, Repo: f.repo, Workflows: noWorkflows{}, Namespace: "default"}
	res := mustExecute[activities.FindOrphansResult](t, newActivityEnv(t, f.log, sw), sw.FindOrphans, activities.FindOrphansInput{})
	if len(res.Snapshots) != 1 || res.Snapshots[0].SnapshotRef != snap.SnapshotRef || res.Snapshots[0].BackupID != backupID || res.Snapshots[0].VMRef != vm.ref {
		t.Errorf("orphan snapshots %+v, want %s (%s) of %s once", res.Snapshots, snap.SnapshotRef, activities.SnapshotPrefix+backupID, vm.ref)
	}
	if len(res.Backups) != 0 {
		t.Errorf("orphan backups %v, want none besides the snapshot's", res.Backups)
	}
}
