package workflows

import (
	"context"
	"testing"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
)

func TestSweepRemovesOrphans(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterWorkflow(Sweep)
	env.RegisterActivity(&activities.Sweeper{})
	env.RegisterActivity(&activities.VSphere{})
	env.RegisterActivity(&activities.Catalog{})
	var gotAge int64
	env.OnActivity(sweeperActs.FindOrphans, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.FindOrphansInput) (*activities.FindOrphansResult, error) {
			gotAge = in.MinAgeSeconds
			return &activities.FindOrphansResult{
				Snapshots: []activities.OrphanSnapshot{
					{Profile: "lab", VMRef: "vm-1", SnapshotRef: "snapshot-1", SnapshotName: "cbtflow-b1", BackupID: "b1"},
					{Profile: "lab", VMRef: "vm-2", SnapshotRef: "snapshot-2", SnapshotName: "cbtflow-b2", BackupID: "b2"},
				},
				Backups: []string{"b3"},
			}, nil
		})
	var removed []string
	env.OnActivity(vsphereActs.RemoveSnapshot, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.RemoveSnapshotInput) error {
			if in.SnapshotRef == "snapshot-2" {
				return temporal.NewNonRetryableApplicationError("vCenter refused", "Test", nil)
			}
			removed = append(removed, in.SnapshotRef)
			return nil
		})
	var failed []string
	env.OnActivity(catalogActs.FailBackup, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.FailBackupInput) error {
			failed = append(failed, in.BackupID)
			return nil
		})
	env.ExecuteWorkflow(Sweep, SweepInput{})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	var res SweepResult
	if err := env.GetWorkflowResult(&res); err != nil {
		t.Fatal(err)
	}
	if gotAge != int64(DefaultSweepMinAge.Seconds()) {
		t.Errorf("min age %d", gotAge)
	}
	if len(removed) != 1 || removed[0] != "snapshot-1" {
		t.Errorf("removed %v", removed)
	}
	// A snapshot that could not be removed keeps its backup as it is: the
	// next sweep tries again.
	if len(failed) != 2 || failed[0] != "b1" || failed[1] != "b3" {
		t.Errorf("failed %v", failed)
	}
	if len(res.Errors) != 1 || len(res.SnapshotsRemoved) != 1 || len(res.BackupsFailed) != 2 {
		t.Errorf("result %+v", res)
	}
}

// A vCenter the sweeper could not list is named in the sweep's result,
// and the snapshots found on the others are still removed.
func TestSweepReportsVCentersNotSwept(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterWorkflow(Sweep)
	env.RegisterActivity(&activities.Sweeper{})
	env.RegisterActivity(&activities.VSphere{})
	env.RegisterActivity(&activities.Catalog{})
	const notSwept = `vCenter profile "vc2" not swept: vCenter unreachable`
	env.OnActivity(sweeperActs.FindOrphans, mock.Anything, mock.Anything).Return(&activities.FindOrphansResult{
		Snapshots: []activities.OrphanSnapshot{{Profile: "vc1", VMRef: "vm-1", SnapshotRef: "snapshot-1", SnapshotName: "cbtflow-b1", BackupID: "b1"}},
		Errors:    []string{notSwept},
	}, nil)
	env.OnActivity(vsphereActs.RemoveSnapshot, mock.Anything, mock.Anything).Return(nil)
	env.OnActivity(catalogActs.FailBackup, mock.Anything, mock.Anything).Return(nil)
	env.ExecuteWorkflow(Sweep, SweepInput{})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	var res SweepResult
	if err := env.GetWorkflowResult(&res); err != nil {
		t.Fatal(err)
	}
	if len(res.Errors) != 1 || res.Errors[0] != notSwept {
		t.Errorf("errors %q, want [%q]", res.Errors, notSwept)
	}
	if len(res.SnapshotsRemoved) != 1 || len(res.BackupsFailed) != 1 {
		t.Errorf("result %+v, want snapshot-1 removed and b1 failed", res)
	}
}
