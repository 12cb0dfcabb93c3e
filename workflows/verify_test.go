package workflows

import (
	"testing"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
)

// A Verify's progress query follows its disks: the one being verified
// (with its VerifyPoint's figures once the worker adds them), how many are
// done and damaged; at the end, completed.
func TestVerifyProgress(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterActivity(&activities.Catalog{})
	env.OnActivity(catalogActs.PlanVerify, mock.Anything, activities.PlanVerifyInput{VM: "vm1"}).Return(&activities.PlanVerifyResult{
		Targets: []activities.VerifyTarget{{BackupID: "b1", VM: "vm1", VMUUID: "u1", Profile: "lab", Keys: []int32{204, 205}}}}, nil)
	var during []VerifyProgress
	query := func() {
		v, err := env.QueryWorkflow(QueryProgress)
		if err != nil {
			t.Fatal(err)
		}
		var p VerifyProgress
		if err := v.Get(&p); err != nil {
			t.Fatal(err)
		}
		during = append(during, p)
	}
	env.OnActivity(catalogActs.VerifyPoint, mock.Anything, activities.VerifyPointInput{BackupID: "b1", Key: 204}).Run(func(mock.Arguments) { query() }).Return(
		&activities.VerifyPointResult{BackupID: "b1", Key: 204, OK: true, BlocksRead: true}, nil)
	env.OnActivity(catalogActs.VerifyPoint, mock.Anything, activities.VerifyPointInput{BackupID: "b1", Key: 205}).Run(func(mock.Arguments) { query() }).Return(
		&activities.VerifyPointResult{BackupID: "b1", Key: 205, Problems: []activities.VerifyProblem{{Offset: 4096, Reason: "differs"}}}, nil)
	env.ExecuteWorkflow(Verify, VerifyInput{VM: "vm1"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	var res VerifyResult
	if err := env.GetWorkflowResult(&res); err != nil || res.OK || len(res.Points) != 2 {
		t.Fatalf("result %+v %v, want two disks, one damaged", res, err)
	}
	if len(during) != 2 {
		t.Fatalf("%d queries during the VerifyPoints, want 2", len(during))
	}
	for i, key := range []int32{204, 205} {
		p := during[i]
		if p.Phase != VerifyVerifying || !p.Running() || p.BackupID != "b1" || p.VM != "vm1" || p.Key != key ||
			p.Points != 1 || p.Disks != 2 || p.DisksDone != i || p.Damaged != 0 {
			t.Errorf("progress while disk %d is verified: %+v", key, p)
		}
	}
	query()
	if p := during[2]; p.Phase != VerifyCompleted || p.Running() || p.DisksDone != 2 || p.Damaged != 1 || p.Percent != 100 {
		t.Errorf("progress of the completed verification: %+v", p)
	}
}

func TestApplyVerify(t *testing.T) {
	p := VerifyProgress{Phase: VerifyVerifying, BackupID: "b1", Key: 204}
	p.ApplyVerify(activities.VerifyProgress{Stage: activities.VerifyStageReading, Done: 250, Total: 1000, Rate: 50})
	if !p.Live || p.Stage != activities.VerifyStageReading || p.Done != 250 || p.Percent != 25 || p.ETASeconds != 15 {
		t.Errorf("reading: %+v, want 250 of 1000, 25%%, ETA 15 s", p)
	}
	done := VerifyProgress{Phase: VerifyCompleted}
	done.ApplyVerify(activities.VerifyProgress{Stage: activities.VerifyStageReading, Done: 1, Total: 1000})
	if done.Live || done.Done != 0 {
		t.Errorf("a completed verification took a heartbeat: %+v", done)
	}
}
