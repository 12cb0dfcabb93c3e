package workflows

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
)

func restoreVMEnv(t *testing.T) (*testsuite.TestWorkflowEnvironment, *[]activities.FinishVMRestoreInput) {
	t.Helper()
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterActivity(&activities.VMRestorer{})
	env.RegisterActivity(&activities.VSphere{})
	env.OnActivity(vmRestoreActs.PlanRestoreVM, mock.Anything, mock.Anything).Return(&activities.PlanRestoreVMResult{BackupID: "b1",
		Profile: "lab", VMRef: "vm-1", VMUUID: "u1", VMName: "vm1",
		Disks: []activities.RestoreVMDisk{{Key: 2000, Capacity: 1 << 20}}}, nil)
	var finished []activities.FinishVMRestoreInput
	env.OnActivity(vmRestoreActs.FinishVMRestore, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.FinishVMRestoreInput) error {
		finished = append(finished, in)
		return nil
	})
	return env, &finished
}

// A cancel that arrives while BeginVMRestore records the restore ends the
// run canceled, and the record is finished: a record left running would
// refuse the VM's backups and restores until a sweep.
func TestRestoreVMCanceledWhileBeginning(t *testing.T) {
	env, finished := restoreVMEnv(t)
	env.OnActivity(vmRestoreActs.BeginVMRestore, mock.Anything, mock.Anything).After(time.Minute).Return(nil)
	env.RegisterDelayedCallback(env.CancelWorkflow, 10*time.Second)
	env.ExecuteWorkflow(RestoreVM, RestoreVMInput{BackupID: "b1", VM: "vm1"})
	var canceled *temporal.CanceledError
	if err := env.GetWorkflowError(); !errors.As(err, &canceled) {
		t.Errorf("workflow error %v, want canceled", err)
	}
	if len(*finished) != 1 || (*finished)[0].Outcome != "failed" {
		t.Errorf("FinishVMRestore calls %+v, want one, failed", *finished)
	}
}

// A failed write ends the run failed, naming the kept snapshot, and the
// record is finished failed; the snapshot is not removed.
func TestRestoreVMWriteFailedKeepsSnapshot(t *testing.T) {
	env, finished := restoreVMEnv(t)
	env.OnActivity(vmRestoreActs.BeginVMRestore, mock.Anything, mock.Anything).Return(nil)
	env.OnActivity(vmRestoreActs.CreateRestoreSnapshot, mock.Anything, mock.Anything).Return(
		&activities.RestoreSnapshotResult{SnapshotRef: "snapshot-7", SnapshotName: "cbtflow-restore-x"}, nil)
	env.OnActivity(vmRestoreActs.WriteVMDisk, mock.Anything, mock.Anything).Return(nil,
		temporal.NewNonRetryableApplicationError("disk 2000: boom", "X", nil))
	env.ExecuteWorkflow(RestoreVM, RestoreVMInput{BackupID: "b1", VM: "vm1"})
	err := env.GetWorkflowError()
	if err == nil || !strings.Contains(err.Error(), `"cbtflow-restore-x" (snapshot-7)`) || !strings.Contains(err.Error(), "boom") {
		t.Errorf("workflow error %v, want one naming the kept snapshot and the cause", err)
	}
	if len(*finished) != 1 || (*finished)[0].Outcome != "failed" {
		t.Errorf("FinishVMRestore calls %+v, want one, failed", *finished)
	}
}

// A CreateRestoreSnapshot that failed for good (an attempt may have taken
// the snapshot before it failed, or before its worker died) removes the
// restore's snapshot by name: nothing was written, and no snapshot may
// stay that the error does not name.
func TestRestoreVMSnapshotFailedRemovesIt(t *testing.T) {
	env, finished := restoreVMEnv(t)
	env.OnActivity(vmRestoreActs.BeginVMRestore, mock.Anything, mock.Anything).Return(nil)
	env.OnActivity(vmRestoreActs.CreateRestoreSnapshot, mock.Anything, mock.Anything).Return(nil,
		temporal.NewNonRetryableApplicationError(`VM "vm1" is poweredOn`, activities.ErrTypeVMPoweredOn, nil))
	var removed []activities.RemoveSnapshotInput
	env.OnActivity(vsphereActs.RemoveSnapshot, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.RemoveSnapshotInput) error {
		removed = append(removed, in)
		return nil
	})
	env.ExecuteWorkflow(RestoreVM, RestoreVMInput{BackupID: "b1", VM: "vm1"})
	if err := env.GetWorkflowError(); err == nil || !strings.Contains(err.Error(), "poweredOn") {
		t.Errorf("workflow error %v, want the snapshot's failure", err)
	}
	if len(removed) != 1 || removed[0].SnapshotRef != "" || !strings.HasPrefix(removed[0].SnapshotName, activities.RestoreSnapshotPrefix) ||
		removed[0].VMRef != "vm-1" {
		t.Errorf("RemoveSnapshot calls %+v, want one, by the restore snapshot's name", removed)
	}
	if len(*finished) != 1 || (*finished)[0].Outcome != "failed" {
		t.Errorf("FinishVMRestore calls %+v, want one, failed", *finished)
	}
}
