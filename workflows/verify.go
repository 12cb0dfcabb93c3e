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

// VerifyPhase is where a Verify stands.
type VerifyPhase string

// The phases of a Verify. One that fails or is canceled stays in the
// phase it was in; its outcome is the workflow's.
const (
	VerifyPlanning  VerifyPhase = "planning"  // PlanVerify: the points to verify, from the catalog
	VerifyVerifying VerifyPhase = "verifying" // VerifyPoint, one disk after the other
	VerifyCompleted VerifyPhase = "completed" // every disk verified (sound or not: see Damaged)
)

// VerifyProgress is the answer of a Verify's progress query
// (QueryProgress). The workflow knows the phase and the disks; the
// running VerifyPoint's figures (its stage, bytes done of its total,
// rate) are its heartbeat details, which the worker adds (Live), as for a
// restore.
type VerifyProgress struct {
	Phase      VerifyPhase `json:"phase"`
	PhaseSince time.Time   `json:"phase_since,omitzero"`
	// Points and Disks are the restore points and disks to verify;
	// DisksDone those verified so far, Damaged those of them found
	// damaged.
	Points    int `json:"points"`
	Disks     int `json:"disks"`
	DisksDone int `json:"disks_done"`
	Damaged   int `json:"damaged"`
	// The disk being verified (verifying).
	BackupID string `json:"backup_id,omitempty"`
	VM       string `json:"vm,omitempty"`
	Key      int32  `json:"key,omitempty"`
	// Stage is the running VerifyPoint's (activities.VerifyStageChecking,
	// VerifyStageReading), with Done of Total bytes, Percent, Rate and
	// ETASeconds (0 when unknown).
	Stage      string  `json:"stage,omitempty"`
	Done       int64   `json:"done"`
	Total      int64   `json:"total"`
	Percent    float64 `json:"percent"`
	Rate       float64 `json:"rate,omitempty"`
	ETASeconds float64 `json:"eta_seconds,omitempty"`
	Live       bool    `json:"live,omitempty"`
}

// Running reports whether a VerifyPoint runs (its heartbeat has figures).
func (p VerifyProgress) Running() bool { return p.Phase == VerifyVerifying && p.BackupID != "" }

// ApplyVerify adds what the running VerifyPoint's latest heartbeat says.
func (p *VerifyProgress) ApplyVerify(b activities.VerifyProgress) {
	if !p.Running() || b.Stage == "" {
		return
	}
	p.Live = true
	p.Stage, p.Done, p.Total, p.Rate, p.ETASeconds = b.Stage, b.Done, b.Total, b.Rate, 0
	if left := b.Total - b.Done; b.Rate > 0 && left > 0 {
		p.ETASeconds = float64(left) / b.Rate
	}
	p.Percent = percent(p.Done, p.Total)
}

// Verify checks restore points against the catalog and the block digests
// recorded at backup time (activities.VerifyPoint), one disk at a time:
// every image of the chain (qemu-img check, size, SHA-256, backing link,
// digest file), then the point's blocks re-read through the chain. A
// damaged point is a result (OK false, its first problem naming the image
// and offset), not a failure; it only reads, so a retry or a second run
// is harmless.
func Verify(ctx workflow.Context, in VerifyInput) (*VerifyResult, error) {
	prog := VerifyProgress{Phase: VerifyPlanning, PhaseSince: workflow.Now(ctx)}
	if err := workflow.SetQueryHandler(ctx, QueryProgress, func() (VerifyProgress, error) { return prog, nil }); err != nil {
		return nil, err
	}
	var plan activities.PlanVerifyResult
	if err := workflow.ExecuteActivity(withCatalogActivity(ctx), catalogActs.PlanVerify, in).Get(ctx, &plan); err != nil {
		return nil, err
	}
	prog.Phase, prog.PhaseSince, prog.Points = VerifyVerifying, workflow.Now(ctx), len(plan.Targets)
	for _, t := range plan.Targets {
		prog.Disks += len(t.Keys)
	}
	if len(plan.Targets) == 1 {
		_ = workflow.UpsertTypedSearchAttributes(ctx, SearchVM.ValueSet(plan.Targets[0].VM), SearchBackupID.ValueSet(plan.Targets[0].BackupID))
	}
	vctx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		// A point's chain is re-read in full: hours for large disks.
		StartToCloseTimeout:    12 * time.Hour,
		ScheduleToCloseTimeout: 24 * time.Hour,
		// VerifyPoint heartbeats every second: a dead worker is noticed
		// in 30 s and its disk verified again by another attempt.
		HeartbeatTimeout: 30 * time.Second,
		RetryPolicy:      &temporal.RetryPolicy{InitialInterval: 5 * time.Second, MaximumInterval: time.Minute, MaximumAttempts: 5},
	})
	res := &VerifyResult{OK: true, Points: []activities.VerifyPointResult{}}
	for _, t := range plan.Targets {
		for _, k := range t.Keys {
			prog.BackupID, prog.VM, prog.Key = t.BackupID, t.VM, k
			var r activities.VerifyPointResult
			if err := workflow.ExecuteActivity(vctx, catalogActs.VerifyPoint, activities.VerifyPointInput{BackupID: t.BackupID, Key: k}).Get(ctx, &r); err != nil {
				return nil, err
			}
			prog.DisksDone++
			if !r.OK {
				prog.Damaged++
			}
			res.OK = res.OK && r.OK
			res.Points = append(res.Points, r)
		}
	}
	prog = VerifyProgress{Phase: VerifyCompleted, PhaseSince: workflow.Now(ctx), Points: prog.Points, Disks: prog.Disks,
		DisksDone: prog.DisksDone, Damaged: prog.Damaged, Percent: 100}
	return res, nil
}
