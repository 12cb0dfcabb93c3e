package workflows

import (
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// VerifyScheduleID is the schedule `starter setup` creates: a Verify of
// every VM's newest restore point, weekly by default.
const VerifyScheduleID = "cbtflow-verify"

// VerifyInput says what a Verify checks (activities.PlanVerifyInput): a
// restore point by its backup ID, the newest of a VM, or the newest of
// every VM.
type VerifyInput = activities.PlanVerifyInput

// VerifyResult is every disk's verification; OK when all are sound.
type VerifyResult struct {
	OK     bool                           `json:"ok"`
	Points []activities.VerifyPointResult `json:"points"`
}

// Verify checks restore points against the catalog and the block digests
// recorded at backup time (activities.VerifyPoint), one disk at a time:
// every image of the chain (qemu-img check, size, SHA-256, backing link,
// digest file), then the point's blocks re-read through the chain. A
// damaged point is a result (OK false, its first problem naming the image
// and offset), not a failure; it only reads, so a retry or a second run
// is harmless.
func Verify(ctx workflow.Context, in VerifyInput) (*VerifyResult, error) {
	var plan activities.PlanVerifyResult
	if err := workflow.ExecuteActivity(withCatalogActivity(ctx), catalogActs.PlanVerify, in).Get(ctx, &plan); err != nil {
		return nil, err
	}
	if len(plan.Targets) == 1 {
		_ = workflow.UpsertTypedSearchAttributes(ctx, SearchVM.ValueSet(plan.Targets[0].VM), SearchBackupID.ValueSet(plan.Targets[0].BackupID))
	}
	vctx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		// A point's chain is re-read in full: hours for large disks.
		StartToCloseTimeout:    12 * time.Hour,
		ScheduleToCloseTimeout: 24 * time.Hour,
		HeartbeatTimeout:       2 * time.Minute,
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: 5 * time.Second, MaximumInterval: time.Minute, MaximumAttempts: 5},
	})
	res := &VerifyResult{OK: true, Points: []activities.VerifyPointResult{}}
	for _, t := range plan.Targets {
		for _, k := range t.Keys {
			var r activities.VerifyPointResult
			if err := workflow.ExecuteActivity(vctx, catalogActs.VerifyPoint, activities.VerifyPointInput{BackupID: t.BackupID, Key: k}).Get(ctx, &r); err != nil {
				return nil, err
			}
			res.OK = res.OK && r.OK
			res.Points = append(res.Points, r)
		}
	}
	return res, nil
}
