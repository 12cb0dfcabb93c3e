package workflows

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
)

func TestRestoreWorkflow(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterActivity(&activities.Restorer{})
	env.OnActivity(restoreActs.FindRestorePoint, mock.Anything, activities.FindRestorePointInput{BackupID: "b1", DiskKey: 204}).Return(
		&activities.FindRestorePointResult{BackupID: "b1", VM: "vm1", DiskKey: 204, Capacity: 1000}, nil)
	env.OnActivity(restoreActs.RestoreDisk, mock.Anything, activities.RestoreDiskInput{BackupID: "b1", DiskKey: 204, To: "/r/disk.raw", Format: "raw"}).Return(
		&activities.RestoreDiskResult{To: "/r/disk.raw", Chain: []string{"/repo/b1.qcow2"}, Bytes: 1000, Seconds: 1}, nil)
	env.ExecuteWorkflow(Restore, RestoreInput{BackupID: "b1", DiskKey: 204, To: "/r/disk.raw"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	var res RestoreResult
	if err := env.GetWorkflowResult(&res); err != nil {
		t.Fatal(err)
	}
	if res.VM != "vm1" || res.Bytes != 1000 || res.Format != "raw" || res.To != "/r/disk.raw" || len(res.Chain) != 1 {
		t.Errorf("result %+v", res)
	}
	v, err := env.QueryWorkflow(QueryProgress)
	if err != nil {
		t.Fatal(err)
	}
	var p RestoreProgress
	if err := v.Get(&p); err != nil {
		t.Fatal(err)
	}
	if p.Phase != RestoreCompleted || p.Percent != 100 || p.VM != "vm1" || p.Capacity != 1000 {
		t.Errorf("progress of a completed restore: %+v", p)
	}
}

func TestRestoreRefusesBadInput(t *testing.T) {
	for _, c := range []struct {
		in   RestoreInput
		want string
	}{
		{RestoreInput{DiskKey: 204, To: "/r/x"}, "no backup ID"},
		{RestoreInput{BackupID: "b1", DiskKey: 204, To: "rel/x"}, `"rel/x" is not an absolute path`},
		{RestoreInput{BackupID: "b1", DiskKey: 204, To: "/r/x", Format: "vmdk"}, `format "vmdk" is not raw or qcow2`},
	} {
		var s testsuite.WorkflowTestSuite
		env := s.NewTestWorkflowEnvironment()
		env.RegisterActivity(&activities.Restorer{})
		env.ExecuteWorkflow(Restore, c.in)
		err := env.GetWorkflowError()
		var app *temporal.ApplicationError
		if !errors.As(err, &app) || !app.NonRetryable() || !strings.Contains(app.Message(), c.want) {
			t.Errorf("%+v: %v, want a non-retryable error saying %q", c.in, err, c.want)
		}
	}
}

func TestApplyRestore(t *testing.T) {
	p := RestoreProgress{Phase: RestoreVerifying}
	p.ApplyRestore(activities.RestoreProgress{Stage: activities.RestoreStageWriting, Done: 250, Total: 1000, Rate: 50})
	if !p.Live || p.Phase != RestoreWriting || p.Done != 250 || p.Percent != 25 || p.ETASeconds != 15 {
		t.Errorf("writing: %+v, want 250 of 1000, 25%%, ETA 15 s", p)
	}
	done := RestoreProgress{Phase: RestoreCompleted, Done: 1000, Total: 1000}
	done.ApplyRestore(activities.RestoreProgress{Stage: activities.RestoreStageWriting, Done: 1, Total: 1000})
	if done.Done != 1000 || done.Live {
		t.Errorf("a completed restore took a heartbeat: %+v", done)
	}
}
