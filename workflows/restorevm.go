package workflows

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// RestoreVMInput is one restore of a restore point into a VM (`starter
// restore BACKUP_ID --to-vm VM [--disk KEY]`). Names only: no secret.
type RestoreVMInput struct {
	BackupID string `json:"backup_id"`
	// VM is the VM to write into, by name, inventory path or moref. It
	// must be powered off.
	VM string `json:"vm"`
	// Profile is the vCenter profile to reach the VM through; empty: the
	// restore point's.
	Profile string `json:"profile,omitempty"`
	// DiskKey restricts the restore to one disk; 0: every disk of the
	// point.
	DiskKey int32 `json:"disk_key,omitempty"`
	// NewVM creates a powered-off VM of that name beside VM (its folder,
	// resource pool, host and datastore), with disks of the point's
	// sizes, and restores the whole of every disk into it.
	NewVM string `json:"new_vm,omitempty"`
}

// RestoreVMResult is a completed restore into a VM.
type RestoreVMResult struct {
	RestoreID string `json:"restore_id"`
	BackupID  string `json:"backup_id"`
	VM        string `json:"vm"`
	VMUUID    string `json:"vm_uuid"`
	// Snapshot is the snapshot taken before the first write (removed
	// once every disk was written).
	Snapshot    string                         `json:"snapshot"`
	SnapshotRef string                         `json:"snapshot_ref"`
	Disks       []activities.WriteVMDiskResult `json:"disks"`
	Seconds     float64                        `json:"seconds"`
}

// RestoreVMReport is what `starter restore --to-vm --json` prints: the
// RestoreVM workflow's outcome. Status is running (--wait=false),
// completed, failed or canceled; Error says why it did not complete (it
// names the snapshot kept for a revert).
type RestoreVMReport struct {
	Status      string                         `json:"status"`
	WorkflowID  string                         `json:"workflow_id"`
	RestoreID   string                         `json:"restore_id,omitempty"`
	BackupID    string                         `json:"backup_id"`
	VM          string                         `json:"vm"`
	VMUUID      string                         `json:"vm_uuid,omitempty"`
	Snapshot    string                         `json:"snapshot,omitempty"`
	SnapshotRef string                         `json:"snapshot_ref,omitempty"`
	Error       string                         `json:"error,omitempty"`
	Disks       []activities.WriteVMDiskResult `json:"disks"`
	Seconds     float64                        `json:"seconds,omitempty"`
}

// ErrTypeRestoreVMFailed is the type of a restore into a VM that failed
// after its snapshot was taken: the message names the kept snapshot.
const ErrTypeRestoreVMFailed = "RestoreVMFailed"

// RestoreVMPhase is where a restore into a VM stands.
type RestoreVMPhase string

// The phases of a restore into a VM. One that fails stays in the phase
// it was in.
const (
	RestoreVMPlanning         RestoreVMPhase = "planning"          // PlanRestoreVM, BeginVMRestore
	RestoreVMSnapshot         RestoreVMPhase = "snapshot"          // CreateRestoreSnapshot
	RestoreVMWriting          RestoreVMPhase = "writing"           // WriteVMDisk, disk by disk
	RestoreVMRemovingSnapshot RestoreVMPhase = "removing-snapshot" // every disk written: RemoveSnapshot
	RestoreVMCompleted        RestoreVMPhase = "completed"
)

// RestoreVMDiskProgress is one disk of a restore into a VM.
type RestoreVMDiskProgress struct {
	Key      int32  `json:"key"`
	Capacity int64  `json:"capacity"`
	Phase    string `json:"phase"`          // pending, verifying, writing, done
	Mode     string `json:"mode,omitempty"` // once known: differing areas, whole disk
	Why      string `json:"why,omitempty"`
	// Done of Total bytes of the phase (the chain read back; the areas
	// written), the rate and the time left at it.
	Done       int64   `json:"done"`
	Total      int64   `json:"total"`
	Percent    float64 `json:"percent"`
	Rate       float64 `json:"rate,omitempty"`
	ETASeconds float64 `json:"eta_seconds,omitempty"`
}

// RestoreVMProgress is the answer of a RestoreVM's progress query. The
// running WriteVMDisk's figures are its heartbeat details, which the
// worker adds (Live), as for a backup's transfers.
type RestoreVMProgress struct {
	RestoreID   string                  `json:"restore_id"`
	BackupID    string                  `json:"backup_id"`
	VM          string                  `json:"vm"`
	Phase       RestoreVMPhase          `json:"phase"`
	PhaseSince  time.Time               `json:"phase_since,omitzero"`
	Snapshot    string                  `json:"snapshot,omitempty"`
	SnapshotRef string                  `json:"snapshot_ref,omitempty"`
	Disks       []RestoreVMDiskProgress `json:"disks"`
	Live        bool                    `json:"live,omitempty"`
}

// Writing reports whether a WriteVMDisk runs (its heartbeat has
// figures).
func (p RestoreVMProgress) Writing() bool { return p.Phase == RestoreVMWriting }

// ApplyVMRestore adds what the running WriteVMDisk's latest heartbeat
// says to its disk.
func (p *RestoreVMProgress) ApplyVMRestore(b activities.VMRestoreProgress) {
	if !p.Writing() {
		return
	}
	for i := range p.Disks {
		d := &p.Disks[i]
		if d.Key != b.Key || d.Phase == "done" {
			continue
		}
		switch b.Stage {
		case activities.VMRestoreStageVerifying:
			d.Phase = "verifying"
		case activities.VMRestoreStageWriting:
			d.Phase = "writing"
		default:
			return
		}
		if b.Mode != "" {
			d.Mode = b.Mode
		}
		p.Live = true
		d.Done, d.Total, d.Rate, d.ETASeconds = b.Done, b.Total, b.Rate, 0
		if left := b.Total - b.Done; b.Rate > 0 && left > 0 {
			d.ETASeconds = float64(left) / b.Rate
		}
		d.Percent = percent(d.Done, d.Total)
	}
}

// vmRestoreActs is how RestoreVM calls its activities.
var vmRestoreActs *activities.VMRestorer

// RestoreVM writes a restore point's disks back into a powered-off VM
// (with NewVM, first CreateRestoreVM makes one beside VM):
//
//  1. PlanRestoreVM finds the point and the VM, refuses a VM that is not
//     powered off (VMPoweredOn: power it off first), a VM being backed
//     up, and disks that do not match by key and capacity;
//  2. BeginVMRestore records the restore in the catalog before anything
//     is written, so that the next backup of the VM is full whatever
//     happens next;
//  3. CreateRestoreSnapshot takes cbtflow-restore-<restore id>;
//  4. WriteVMDisk writes each disk (only the areas that differ when CBT
//     can say so, else the whole disk), retried, each attempt idempotent;
//  5. RemoveSnapshot removes the snapshot once every disk is written.
//
// On failure after the snapshot, the snapshot is kept, and the error
// (ErrTypeRestoreVMFailed) names it, by name and moref, and says to
// revert the VM to it; a canceled run ends canceled with that message in
// its details (RestoreVMCanceledMessage); the sweeper never removes it. Search
// attributes: CbtflowBackupID at once, CbtflowVM once the VM is found.
func RestoreVM(ctx workflow.Context, in RestoreVMInput) (*RestoreVMResult, error) {
	start := workflow.Now(ctx)
	restoreID := newBackupID(ctx)
	prog := RestoreVMProgress{RestoreID: restoreID, BackupID: in.BackupID, VM: in.VM, Phase: RestoreVMPlanning, PhaseSince: start,
		Disks: []RestoreVMDiskProgress{}}
	if err := workflow.SetQueryHandler(ctx, QueryProgress, func() (RestoreVMProgress, error) { return prog, nil }); err != nil {
		return nil, err
	}
	switch {
	case strings.TrimSpace(in.BackupID) == "":
		return nil, invalid("restore: no backup ID given")
	case strings.TrimSpace(in.VM) == "":
		return nil, invalid("restore: no VM to restore into given")
	case in.NewVM != "" && in.DiskKey != 0:
		return nil, temporal.NewNonRetryableApplicationError("restore: --new-vm restores every disk of the point: not with --disk",
			activities.ErrTypeRestoreRefused, nil)
	}
	_ = workflow.UpsertTypedSearchAttributes(ctx, SearchBackupID.ValueSet(in.BackupID))
	phase := func(p RestoreVMPhase) { prog.Phase, prog.PhaseSince = p, workflow.Now(ctx) }

	target, byOrder := in.VM, false
	if in.NewVM != "" {
		var made activities.CreateRestoreVMResult
		if err := workflow.ExecuteActivity(withSnapshotActivity(ctx), vmRestoreActs.CreateRestoreVM, activities.CreateRestoreVMInput{
			RestoreID: restoreID, BackupID: in.BackupID, Profile: in.Profile, Beside: in.VM, Name: in.NewVM}).Get(ctx, &made); err != nil {
			return nil, err
		}
		// Its disks have keys of their own: the point's are matched in order.
		target, byOrder = made.VMRef, true
	}
	var plan activities.PlanRestoreVMResult
	if err := workflow.ExecuteActivity(withShortActivity(ctx), vmRestoreActs.PlanRestoreVM, activities.PlanRestoreVMInput{
		BackupID: in.BackupID, VM: target, Profile: in.Profile, DiskKey: in.DiskKey, ByOrder: byOrder}).Get(ctx, &plan); err != nil {
		return nil, err
	}
	prog.VM = plan.VMName
	_ = workflow.UpsertTypedSearchAttributes(ctx, SearchVM.ValueSet(plan.VMName))
	for _, d := range plan.Disks {
		prog.Disks = append(prog.Disks, RestoreVMDiskProgress{Key: d.Key, Capacity: d.Capacity, Phase: "pending"})
	}

	// The outcome is recorded on every way out, canceled included.
	finish := func(outcome, reason string) {
		dctx, cancel := workflow.NewDisconnectedContext(ctx)
		defer cancel()
		_ = workflow.ExecuteActivity(withCatalogActivity(dctx), vmRestoreActs.FinishVMRestore, activities.FinishVMRestoreInput{
			RestoreID: restoreID, Outcome: outcome, Error: reason}).Get(dctx, nil)
	}
	// Recorded before the first write: even a restore that fails now
	// makes the next backup full. The record is finished even when a
	// cancel arrives meanwhile, and then ended at once: an abandoned
	// record of a restore that has not ended refuses the VM's backups
	// and restores (until the sweeper ends it).
	bctx, bcancel := workflow.NewDisconnectedContext(ctx)
	err := workflow.ExecuteActivity(withCatalogActivity(bctx), vmRestoreActs.BeginVMRestore, activities.BeginVMRestoreInput{
		RestoreID: restoreID, Profile: plan.Profile, VMUUID: plan.VMUUID, VMName: plan.VMName, BackupID: in.BackupID,
		WorkflowID: workflow.GetInfo(ctx).WorkflowExecution.ID}).Get(bctx, nil)
	bcancel()
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		finish("failed", causeMessage(err))
		return nil, err
	}

	phase(RestoreVMSnapshot)
	var snap activities.RestoreSnapshotResult
	// A snapshot being taken is finished even when the restore is
	// canceled meanwhile, so that its error can name it.
	sctx, scancel := workflow.NewDisconnectedContext(ctx)
	err = workflow.ExecuteActivity(withSnapshotActivity(sctx), vmRestoreActs.CreateRestoreSnapshot, activities.RestoreSnapshotInput{
		RestoreID: restoreID, Profile: plan.Profile, VMUUID: plan.VMUUID}).Get(sctx, &snap)
	scancel()
	if err != nil {
		// Nothing was written: a snapshot an attempt took before it
		// failed (or before its worker died) goes, so that no snapshot
		// stays that the error does not name.
		name := activities.RestoreSnapshotPrefix + restoreID
		rctx, rcancel := workflow.NewDisconnectedContext(ctx)
		rerr := workflow.ExecuteActivity(withCleanupActivity(rctx), vsphereActs.RemoveSnapshot, activities.RemoveSnapshotInput{
			Profile: plan.Profile, VMRef: plan.VMRef, SnapshotName: name}).Get(rctx, nil)
		rcancel()
		finish("failed", causeMessage(err))
		if rerr != nil {
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf(
				"restore of backup %s into VM %q failed before its first write: %s; the VM's snapshot %q, if it has one, could not be removed (%s): remove it",
				in.BackupID, plan.VMName, causeMessage(err), name, causeMessage(rerr)), ErrTypeRestoreVMFailed, err)
		}
		return nil, err
	}
	prog.Snapshot, prog.SnapshotRef = snap.SnapshotName, snap.SnapshotRef
	if err := ctx.Err(); err != nil {
		return nil, keptSnapshot(finish, plan, snap, err)
	}

	phase(RestoreVMWriting)
	res := &RestoreVMResult{RestoreID: restoreID, BackupID: in.BackupID, VM: plan.VMName, VMUUID: plan.VMUUID,
		Snapshot: snap.SnapshotName, SnapshotRef: snap.SnapshotRef}
	for i, d := range plan.Disks {
		prog.Disks[i].Phase = "verifying"
		var w activities.WriteVMDiskResult
		if err := workflow.ExecuteActivity(withVMWriteActivity(ctx), vmRestoreActs.WriteVMDisk, activities.WriteVMDiskInput{
			RestoreID: restoreID, BackupID: in.BackupID, Profile: plan.Profile, VMRef: plan.VMRef, VMUUID: plan.VMUUID,
			SnapshotRef: snap.SnapshotRef, SnapshotName: snap.SnapshotName, Disk: d}).Get(ctx, &w); err != nil {
			return nil, keptSnapshot(finish, plan, snap, err)
		}
		prog.Disks[i] = RestoreVMDiskProgress{Key: d.Key, Capacity: d.Capacity, Phase: "done", Mode: w.Mode, Why: w.Why,
			Done: w.DifferingBytes, Total: w.DifferingBytes, Percent: 100}
		res.Disks = append(res.Disks, w)
	}

	// Every disk is written: the snapshot goes, and the restore is
	// recorded complete, also when a cancel arrives now.
	phase(RestoreVMRemovingSnapshot)
	dctx, dcancel := workflow.NewDisconnectedContext(ctx)
	defer dcancel()
	if err := workflow.ExecuteActivity(withCleanupActivity(dctx), vsphereActs.RemoveSnapshot, activities.RemoveSnapshotInput{
		Profile: plan.Profile, VMRef: plan.VMRef, SnapshotRef: snap.SnapshotRef, SnapshotName: snap.SnapshotName}).Get(dctx, nil); err != nil {
		finish("failed", "the disks were written, but the snapshot could not be removed: "+causeMessage(err))
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf(
			"restore of backup %s into VM %q: every disk was written, but its snapshot %q (%s) could not be removed: %s; remove it by hand",
			in.BackupID, plan.VMName, snap.SnapshotName, snap.SnapshotRef, causeMessage(err)), ErrTypeRestoreVMFailed, err)
	}
	finish("completed", "")
	phase(RestoreVMCompleted)
	res.Seconds = workflow.Now(ctx).Sub(start).Seconds()
	return res, nil
}

// keptSnapshot records a failed restore and returns its error, which
// names the snapshot it keeps for the operator to revert to.
func keptSnapshot(finish func(outcome, reason string), plan activities.PlanRestoreVMResult, snap activities.RestoreSnapshotResult, err error) error {
	why := causeMessage(err)
	var canceled *temporal.CanceledError
	if errors.As(err, &canceled) {
		why = "canceled"
	}
	finish("failed", why)
	msg := fmt.Sprintf(
		"restore of backup %s into VM %q failed: %s; the VM's snapshot %q (%s), taken before the first write, was kept: revert the VM to it to undo the partial restore, then remove it (or restore again)",
		plan.BackupID, plan.VMName, why, snap.SnapshotName, snap.SnapshotRef)
	if canceled != nil {
		// The run ends canceled; its details carry the message with the
		// snapshot's name (RestoreVMCanceledMessage).
		return temporal.NewCanceledError(msg)
	}
	return temporal.NewNonRetryableApplicationError(msg, ErrTypeRestoreVMFailed, err)
}

// RestoreVMCanceledMessage is the message a canceled RestoreVM left in
// its CanceledError's details (it names the snapshot kept), "" when none.
func RestoreVMCanceledMessage(err error) string {
	var c *temporal.CanceledError
	var msg string
	if errors.As(err, &c) && c.HasDetails() && c.Details(&msg) == nil {
		return msg
	}
	return ""
}

// causeMessage is the message of the innermost application error in
// err (the activity's own words), else err's.
func causeMessage(err error) string {
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return app.Message()
	}
	var canceled *temporal.CanceledError
	if errors.As(err, &canceled) {
		return "canceled"
	}
	return err.Error()
}

// WriteVMDisk verifies a chain and writes a disk: long, so it heartbeats
// every second, and a dead worker is noticed in 30 s. A retry resumes
// from the last flushed resume point (the writes are idempotent); what no
// retry mends (a powered-on VM, a damaged point, a snapshot gone) fails
// at once, and anything else is tried 5 times.
func withVMWriteActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout:    24 * time.Hour,
		ScheduleToCloseTimeout: 48 * time.Hour,
		HeartbeatTimeout:       30 * time.Second,
		WaitForCancellation:    true,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: 2 * time.Second, MaximumInterval: 30 * time.Second,
			MaximumAttempts: 5},
	})
}
