package workflows

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
)

// An Export looks its point up, then serves until canceled; the cancel
// waits for ServeExport (WaitForCancellation) and the workflow ends
// canceled.
func TestExportWorkflowServesUntilCanceled(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterActivity(&activities.Restorer{})
	env.SetStartWorkflowOptions(client.StartWorkflowOptions{ID: "export/b1/204"})
	env.OnActivity(restoreActs.FindRestorePoint, mock.Anything, activities.FindRestorePointInput{BackupID: "b1", DiskKey: 204}).Return(
		&activities.FindRestorePointResult{BackupID: "b1", VM: "vm1", DiskKey: 204, Capacity: 1000}, nil)
	served := false
	env.OnActivity(restoreActs.ServeExport, mock.Anything, activities.ServeExportInput{ExportID: "export/b1/204", BackupID: "b1", DiskKey: 204, Listen: "0.0.0.0:10809"}).Return(
		func(ctx context.Context, in activities.ServeExportInput) (*activities.ServeExportResult, error) {
			served = true
			env.CancelWorkflow()
			<-ctx.Done()
			return nil, ctx.Err()
		})
	env.ExecuteWorkflow(Export, ExportInput{BackupID: "b1", DiskKey: 204, Listen: "0.0.0.0:10809"})
	if err := env.GetWorkflowError(); !served || !temporal.IsCanceledError(err) {
		t.Errorf("export canceled while serving: served %v, %v; want it served, then canceled", served, err)
	}
	v, err := env.QueryWorkflow(QueryProgress)
	if err != nil {
		t.Fatal(err)
	}
	var p ExportProgress
	if err := v.Get(&p); err != nil || p.Phase != ExportExporting || p.VM != "vm1" || p.Capacity != 1000 || p.Listen != "0.0.0.0:10809" {
		t.Errorf("progress of the canceled export: %+v %v", p, err)
	}
}

func TestExportRefusesBadInput(t *testing.T) {
	for _, c := range []struct {
		in   ExportInput
		want string
	}{
		{ExportInput{DiskKey: 204}, "no backup ID"},
		{ExportInput{BackupID: "b1", DiskKey: 204, Listen: "nowhere"}, `listen address "nowhere" is not HOST:PORT`},
		{ExportInput{BackupID: "b1", DiskKey: 204, Listen: "h:99999"}, `listen address "h:99999" is not HOST:PORT`},
	} {
		var s testsuite.WorkflowTestSuite
		env := s.NewTestWorkflowEnvironment()
		env.RegisterActivity(&activities.Restorer{})
		env.ExecuteWorkflow(Export, c.in)
		err := env.GetWorkflowError()
		var app *temporal.ApplicationError
		if !errors.As(err, &app) || !app.NonRetryable() || !strings.Contains(app.Message(), c.want) {
			t.Errorf("%+v: %v, want a non-retryable error saying %q", c.in, err, c.want)
		}
	}
}

func TestApplyExport(t *testing.T) {
	since := time.Date(2026, 12, 4, 15, 0, 0, 0, time.UTC)
	p := ExportProgress{Phase: ExportExporting}
	p.ApplyExport(activities.ExportProgress{Stage: activities.ExportStageServing, URI: "nbd://h:1", Address: "h:1", Images: []string{"/a"}, Since: since})
	if !p.Live || p.Phase != ExportServing || p.URI != "nbd://h:1" || p.Address != "h:1" || len(p.Images) != 1 || !p.Since.Equal(since) {
		t.Errorf("serving: %+v", p)
	}
	starting := ExportProgress{Phase: ExportStarting}
	starting.ApplyExport(activities.ExportProgress{Stage: activities.ExportStageServing, URI: "nbd://h:1"})
	if starting.Live || starting.URI != "" {
		t.Errorf("an export not yet exporting took a heartbeat: %+v", starting)
	}
}
