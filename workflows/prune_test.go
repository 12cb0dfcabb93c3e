package workflows

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

func prunePlan(name string, removed ...string) activities.VMPrunePlan {
	at := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	p := activities.VMPrunePlan{Profile: "lab", VMUUID: "u-" + name, VMName: name, LockID: "backup/u-" + name, Policy: "keep-last 1",
		Kept: []activities.KeptPoint{{BackupID: name + "-kept", Time: at, Rules: []string{"last 1"}}}}
	for _, id := range removed {
		p.Removed = append(p.Removed, activities.RemovedPoint{BackupID: id, Time: at.Add(-time.Hour), Reason: "not kept"})
	}
	return p
}

func newPruneEnv() *testsuite.TestWorkflowEnvironment {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterWorkflow(Prune)
	env.RegisterWorkflow(PruneVM)
	env.RegisterActivity(&activities.Pruner{})
	return env
}

// TestPruneStatus: Removed lists only points removed; a VM whose PruneVM
// failed has its plan in PlannedRemoved, with its status and error.
func TestPruneStatus(t *testing.T) {
	env := newPruneEnv()
	env.OnActivity(prunerActs.PlanPrune, mock.Anything, mock.Anything).Return(&activities.PlanPruneResult{VMs: []activities.VMPrunePlan{
		prunePlan("ok", "ok-1"), prunePlan("bad", "bad-1", "bad-2"), prunePlan("none"), func() activities.VMPrunePlan {
			p := prunePlan("nolock", "nolock-1")
			p.LockID = ""
			return p
		}(),
	}}, nil)
	env.OnWorkflow(PruneVM, mock.Anything, mock.Anything).Return(
		func(_ workflow.Context, in activities.PruneVMInput) (*PruneVMResult, error) {
			if in.VMUUID == "u-bad" {
				return nil, temporal.NewNonRetryableApplicationError("merge: disk full", "NoSpace", nil)
			}
			return &PruneVMResult{VMPrunePlan: prunePlan("ok", "ok-1"), Status: PruneStatusPruned, BytesFreed: 100}, nil
		})
	env.ExecuteWorkflow(Prune, PruneInput{})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	var res PruneResult
	if err := env.GetWorkflowResult(&res); err != nil {
		t.Fatal(err)
	}
	if len(res.VMs) != 4 || res.BytesFreed != 100 || len(res.Errors) != 2 {
		t.Fatalf("result %+v, want 4 VMs, 100 bytes freed, 2 errors", res)
	}
	for _, c := range []struct {
		status  string
		removed int
		planned int
		errored bool
	}{
		{PruneStatusPruned, 1, 0, false},
		{PruneStatusFailed, 0, 2, true},
		{PruneStatusNothing, 0, 0, false},
		{PruneStatusSkipped, 0, 1, true},
	} {
		vm := res.VMs[0]
		res.VMs = res.VMs[1:]
		if vm.Status != c.status || len(vm.Removed) != c.removed || len(vm.PlannedRemoved) != c.planned || (vm.Error != "") != c.errored {
			t.Errorf("VM %s: status %q, %d removed, %d planned, error %q; want %q, %d, %d, error %v",
				vm.VMName, vm.Status, len(vm.Removed), len(vm.PlannedRemoved), vm.Error, c.status, c.removed, c.planned, c.errored)
		}
	}
}

func TestPruneDryRunStatus(t *testing.T) {
	env := newPruneEnv()
	env.OnActivity(prunerActs.PlanPrune, mock.Anything, mock.Anything).Return(&activities.PlanPruneResult{VMs: []activities.VMPrunePlan{
		prunePlan("a", "a-1"), prunePlan("b"),
	}}, nil)
	env.ExecuteWorkflow(Prune, PruneInput{DryRun: true})
	var res PruneResult
	if err := env.GetWorkflowResult(&res); err != nil {
		t.Fatal(err)
	}
	if len(res.VMs) != 2 || res.VMs[0].Status != PruneStatusDryRun || len(res.VMs[0].Removed) != 1 || res.VMs[1].Status != PruneStatusNothing {
		t.Fatalf("dry run %+v, want a: dry-run with 1 to remove, b: nothing-to-remove", res)
	}
}

// TestPruneVMRetriesBounded: a MergeImage that keeps failing with a
// retryable error ends PruneVM after MaximumAttempts, releasing the VM's
// lock, instead of retrying for a day.
func TestPruneVMRetriesBounded(t *testing.T) {
	env := newPruneEnv()
	env.OnActivity(prunerActs.PlanVM, mock.Anything, mock.Anything).Return(func() *activities.VMPrunePlan {
		p := prunePlan("vm", "vm-1")
		p.Merges = []activities.MergeStep{{}}
		return &p
	}(), nil)
	attempts := 0
	env.OnActivity(prunerActs.MergeImage, mock.Anything, mock.Anything).Return(
		func(_ context.Context, _ activities.MergeImageInput) (*activities.MergedImage, error) {
			attempts++
			return nil, errors.New("database unreachable")
		})
	env.ExecuteWorkflow(PruneVM, activities.PruneVMInput{PruneID: "p-0", Profile: "lab", VMUUID: "u-vm"})
	if err := env.GetWorkflowError(); err == nil {
		t.Fatal("PruneVM succeeded with MergeImage failing")
	}
	if attempts != 10 {
		t.Errorf("MergeImage ran %d times, want 10 (MaximumAttempts)", attempts)
	}
}
