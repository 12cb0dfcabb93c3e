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

// PruneVMResult is one VM's prune: its plan, and what it freed.
type PruneVMResult struct {
	activities.VMPrunePlan
	PruneID    string `json:"prune_id,omitempty"`
	BytesFreed int64  `json:"bytes_freed"`
	// Merged: the merged images, with the method each used.
	Merged []activities.MergedImage `json:"merged_images,omitempty"`
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
		if in.DryRun || len(vm.Removed) == 0 {
			res.VMs = append(res.VMs, PruneVMResult{VMPrunePlan: vm})
			continue
		}
		if vm.LockID == "" {
			// A catalog from before backups recorded their workflow ID:
			// without the VM's lock, a prune could meet a backup.
			res.Errors = append(res.Errors, fmt.Sprintf("VM %s (%s): its latest backup has no workflow ID in the catalog, so the prune cannot hold the VM's lock; back the VM up once, then prune", vm.VMName, vm.VMUUID))
			res.VMs = append(res.VMs, PruneVMResult{VMPrunePlan: vm})
			continue
		}
		pruneID := fmt.Sprintf("%s-%d", newBackupID(ctx), i)
		cctx := workflow.WithChildOptions(ctx, workflow.ChildWorkflowOptions{
			WorkflowID:            vm.LockID,
			TaskQueue:             TaskQueue,
			ParentClosePolicy:     enumspb.PARENT_CLOSE_POLICY_ABANDON,
			WorkflowIDReusePolicy: enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
			TypedSearchAttributes: temporal.NewSearchAttributes(SearchVM.ValueSet(vm.VMName), SearchVCenter.ValueSet(vm.Profile)),
		})
		var out PruneVMResult
		err := workflow.ExecuteChildWorkflow(cctx, PruneVM, activities.PruneVMInput{
			PruneID: pruneID, Profile: vm.Profile, VMUUID: vm.VMUUID,
		}).Get(ctx, &out)
		switch {
		case temporal.IsWorkflowExecutionAlreadyStartedError(err):
			res.Errors = append(res.Errors, fmt.Sprintf("VM %s (%s): a backup or prune of it is running as workflow %s; the next prune tries again", vm.VMName, vm.VMUUID, vm.LockID))
			res.VMs = append(res.VMs, PruneVMResult{VMPrunePlan: vm})
		case err != nil:
			res.Errors = append(res.Errors, fmt.Sprintf("VM %s (%s): %v", vm.VMName, vm.VMUUID, err))
			res.VMs = append(res.VMs, PruneVMResult{VMPrunePlan: vm})
		default:
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
	res := &PruneVMResult{VMPrunePlan: plan, PruneID: in.PruneID}
	if len(plan.Removed) == 0 {
		return res, nil
	}
	for _, step := range plan.Merges {
		var m activities.MergedImage
		if err := workflow.ExecuteActivity(withPruneActivity(ctx), prunerActs.MergeImage, activities.MergeImageInput{
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
	return res, nil
}

// withPruneActivity: prune steps read and write whole images (heartbeat
// every few seconds); a database or a worker that is down is waited for.
func withPruneActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout:    12 * time.Hour,
		ScheduleToCloseTimeout: 24 * time.Hour,
		HeartbeatTimeout:       30 * time.Second,
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second},
	})
}
