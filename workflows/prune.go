package workflows

import (
	"fmt"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// PruneScheduleID is the ID of the daily schedule that runs Prune.
const PruneScheduleID = "cbtflow-prune"

// PruneInput selects what a prune looks at: one VM (a name or instance
// UUID; Profile tells apart VMs of the same name) or every VM with
// restore points. DryRun plans and changes nothing.
type PruneInput struct {
	VM      string `json:"vm,omitempty"`
	Profile string `json:"profile,omitempty"`
	DryRun  bool   `json:"dry_run,omitempty"`
}

// PruneResult is what a prune did (or, dry, would do), per VM.
type PruneResult struct {
	DryRun     bool            `json:"dry_run"`
	VMs        []PruneVMResult `json:"vms"`
	BytesFreed int64           `json:"bytes_freed"`
	// Errors: VMs the prune could not prune, and why; the next prune
	// tries again.
	Errors []string `json:"errors,omitempty"`
}

// PruneVMResult is one VM's prune: its plan, what became of it (Status),
// and what it freed.
//
// Removed (JSON "removed") only ever lists points that are gone: for
// Status "pruned", the points the prune removed; for "dry-run", the points
// a prune would remove now (nothing was removed); for "nothing-to-remove",
// "skipped" and "failed" it is empty. A skipped or failed VM's planned
// removals are in PlannedRemoved instead, and Error says why.
type PruneVMResult struct {
	activities.VMPrunePlan
	// Status is one of the PruneStatus constants. Results of runs from
	// before it existed lack it.
	Status string `json:"status,omitempty"`
	// Error: why a skipped or failed VM was not pruned.
	Error string `json:"error,omitempty"`
	// PlannedRemoved: a skipped or failed VM's points its plan would
	// remove, not removed by this prune (a failed one may have got part
	// way: the next prune or backup of the VM settles it and tries again).
	PlannedRemoved []activities.RemovedPoint `json:"planned_removed,omitempty"`
	PruneID        string                    `json:"prune_id,omitempty"`
	BytesFreed     int64                     `json:"bytes_freed"`
	// Merged: the merged images, with the method each used.
	Merged []activities.MergedImage `json:"merged_images,omitempty"`
}

// PruneVMResult.Status values.
const (
	// PruneStatusPruned: Removed were removed, Merged written.
	PruneStatusPruned = "pruned"
	// PruneStatusNothing: the policy keeps every point.
	PruneStatusNothing = "nothing-to-remove"
	// PruneStatusDryRun: Removed is what a prune would remove.
	PruneStatusDryRun = "dry-run"
	// PruneStatusSkipped: the VM could not be pruned now (a backup or
	// prune of it running, or no lock ID); nothing was changed.
	PruneStatusSkipped = "skipped"
	// PruneStatusFailed: PruneVM failed (or timed out).
	PruneStatusFailed = "failed"
)

// notPruned is a skipped or failed VM's result: its plan, with the
// planned removals moved out of Removed.
func notPruned(vm activities.VMPrunePlan, status, why string) PruneVMResult {
	planned := vm.Removed
	vm.Removed = []activities.RemovedPoint{}
	return PruneVMResult{VMPrunePlan: vm, Status: status, Error: why, PlannedRemoved: planned}
}

var prunerActs *activities.Pruner

// Prune applies the retention policies: for each VM, it removes the
// restore points its policy does not keep, merging the data that kept
// points build on (PruneVM, one child per VM under the VM's per-VM
// workflow ID, so that it never runs beside a backup of that VM). It runs
// daily on a schedule (PruneScheduleID) and from `starter prune`.
func Prune(ctx workflow.Context, in PruneInput) (*PruneResult, error) {
	var plan activities.PlanPruneResult
	if err := workflow.ExecuteActivity(withCatalogActivity(ctx), prunerActs.PlanPrune,
		activities.PlanPruneInput{VM: in.VM, Profile: in.Profile}).Get(ctx, &plan); err != nil {
		return nil, err
	}
	res := &PruneResult{DryRun: in.DryRun}
	for i, vm := range plan.VMs {
		if len(vm.Removed) == 0 {
			res.VMs = append(res.VMs, PruneVMResult{VMPrunePlan: vm, Status: PruneStatusNothing})
			continue
		}
		if in.DryRun {
			res.VMs = append(res.VMs, PruneVMResult{VMPrunePlan: vm, Status: PruneStatusDryRun})
			continue
		}
		if vm.LockID == "" {
			// A catalog from before backups recorded their workflow ID:
			// without the VM's lock, a prune could meet a backup.
			why := "its latest backup has no workflow ID in the catalog, so the prune cannot hold the VM's lock; back the VM up once, then prune"
			res.Errors = append(res.Errors, fmt.Sprintf("VM %s (%s): %s", vm.VMName, vm.VMUUID, why))
			res.VMs = append(res.VMs, notPruned(vm, PruneStatusSkipped, why))
			continue
		}
		pruneID := fmt.Sprintf("%s-%d", newBackupID(ctx), i)
		cctx := workflow.WithChildOptions(ctx, workflow.ChildWorkflowOptions{
			WorkflowID:            vm.LockID,
			TaskQueue:             TaskQueue,
			ParentClosePolicy:     enumspb.PARENT_CLOSE_POLICY_ABANDON,
			WorkflowIDReusePolicy: enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
			// The child holds the VM's lock: bounded, so that a prune that
			// cannot end never blocks the VM's backups for long (its
			// activities' retries are bounded well within it).
			WorkflowExecutionTimeout: pruneVMTimeout,
			TypedSearchAttributes:    temporal.NewSearchAttributes(SearchVM.ValueSet(vm.VMName), SearchVCenter.ValueSet(vm.Profile)),
		})
		var out PruneVMResult
		err := workflow.ExecuteChildWorkflow(cctx, PruneVM, activities.PruneVMInput{
			PruneID: pruneID, Profile: vm.Profile, VMUUID: vm.VMUUID,
		}).Get(ctx, &out)
		switch {
		case temporal.IsWorkflowExecutionAlreadyStartedError(err):
			why := fmt.Sprintf("a backup or prune of it is running as workflow %s; the next prune tries again", vm.LockID)
			res.Errors = append(res.Errors, fmt.Sprintf("VM %s (%s): %s", vm.VMName, vm.VMUUID, why))
			res.VMs = append(res.VMs, notPruned(vm, PruneStatusSkipped, why))
		case isType(err, activities.ErrTypeExportRunning):
			// An export began on a point the plan removed or rewrote:
			// nothing changed (the catalog refused); the next prune keeps
			// its chain.
			why := rootMessage(err)
			res.Errors = append(res.Errors, fmt.Sprintf("VM %s (%s): %s", vm.VMName, vm.VMUUID, why))
			res.VMs = append(res.VMs, notPruned(vm, PruneStatusSkipped, why))
		case err != nil:
			res.Errors = append(res.Errors, fmt.Sprintf("VM %s (%s): %v", vm.VMName, vm.VMUUID, err))
			res.VMs = append(res.VMs, notPruned(vm, PruneStatusFailed, err.Error()))
		default:
			if out.Status == "" { // a PruneVM from before Status
				out.Status = PruneStatusPruned
				if len(out.Removed) == 0 {
					out.Status = PruneStatusNothing
				}
			}
			res.VMs = append(res.VMs, out)
			res.BytesFreed += out.BytesFreed
		}
	}
	return res, nil
}

// PruneVM prunes one VM. It runs under the VM's per-VM workflow ID:
// settle what an interrupted prune left, plan again, write each merged
// image beside the one it replaces, then put them in place and remove the
// points (ApplyPrune, crash-safe in every step).
func PruneVM(ctx workflow.Context, in activities.PruneVMInput) (*PruneVMResult, error) {
	if in.PruneID == "" || in.Profile == "" || in.VMUUID == "" {
		return nil, invalid("PruneVM needs a prune ID, a profile and a VM instance UUID (start Prune to name a VM any way)")
	}
	var plan activities.VMPrunePlan
	if err := workflow.ExecuteActivity(withPruneActivity(ctx), prunerActs.PlanVM, in).Get(ctx, &plan); err != nil {
		return nil, err
	}
	res := &PruneVMResult{VMPrunePlan: plan, PruneID: in.PruneID, Status: PruneStatusNothing}
	if len(plan.Removed) == 0 {
		return res, nil
	}
	for _, step := range plan.Merges {
		var m activities.MergedImage
		if err := workflow.ExecuteActivity(withMergeActivity(ctx), prunerActs.MergeImage, activities.MergeImageInput{
			PruneID: in.PruneID, Profile: in.Profile, VMUUID: in.VMUUID, Step: step,
		}).Get(ctx, &m); err != nil {
			return nil, err
		}
		res.Merged = append(res.Merged, m)
	}
	var removed []string
	for _, r := range plan.Removed {
		removed = append(removed, r.BackupID)
	}
	var applied activities.ApplyPruneResult
	if err := workflow.ExecuteActivity(withPruneActivity(ctx), prunerActs.ApplyPrune, activities.ApplyPruneInput{
		PruneID: in.PruneID, Profile: in.Profile, VMUUID: in.VMUUID, Remove: removed, Merged: res.Merged,
	}).Get(ctx, &applied); err != nil {
		return nil, err
	}
	res.BytesFreed = applied.BytesFreed
	res.Status = PruneStatusPruned
	return res, nil
}

// pruneVMTimeout bounds a PruneVM run (and so how long it holds the VM's
// lock): beyond what a prune of a VM takes even with its activities
// retried (PlanVM and ApplyPrune 2 h each at most, each merge 12 h).
const pruneVMTimeout = 24 * time.Hour

// pruneRetry: enough attempts for a worker killed or restarted and a
// database out for a few minutes (1 s doubling to 30 s: about 2.5 minutes
// of waits over 10 attempts), and no more, as the VM's lock is held.
// Errors that cannot pass (ApplicationError non-retryable) end at once.
func pruneRetry() *temporal.RetryPolicy {
	return &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second, MaximumAttempts: 10}
}

// withPruneActivity: PlanVM and ApplyPrune (catalog work, file renames and
// deletions; heartbeat every few seconds).
func withPruneActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout:    time.Hour,
		ScheduleToCloseTimeout: 2 * time.Hour,
		HeartbeatTimeout:       30 * time.Second,
		RetryPolicy:            pruneRetry(),
	})
}

// withMergeActivity: MergeImage reads and writes whole images (heartbeat
// every few seconds).
func withMergeActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout:    6 * time.Hour,
		ScheduleToCloseTimeout: 12 * time.Hour,
		HeartbeatTimeout:       30 * time.Second,
		RetryPolicy:            pruneRetry(),
	})
}
