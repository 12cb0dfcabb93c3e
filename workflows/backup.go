package workflows

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/log"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/units"
)

// ErrTypeAlreadyRunning is the type of the non-retryable error Backup
// returns when a backup of the VM is running already; its details hold the
// running workflow's ID.
const ErrTypeAlreadyRunning = "BackupAlreadyRunning"

// BackupInput is what operators, the Web UI and schedules start: a VM named
// by name, inventory path or moref, e.g. {"vm": "DC0_H0_VM0"}.
type BackupInput struct {
	VM string `json:"vm"`
	// Profile is the vCenter profile; when empty, the worker's default
	// (its CBTFLOW_PROFILE, or its only profile), which ResolveVM picks.
	Profile string `json:"profile,omitempty"`
	Mode    string `json:"mode,omitempty"` // auto (default), full or incremental
	// Detach returns as soon as the VM's backup has started, instead of
	// waiting for it to end.
	Detach bool `json:"detach,omitempty"`
	// FullEvery makes every N-th backup of a disk in auto mode a full one
	// (its chain is at most N images): schedules' --full-every. 0: the
	// VM's retention policy's max-chain, else DefaultMaxChainLength.
	FullEvery int `json:"full_every,omitempty"`
	// SkipIfRunning ends the workflow successfully, with Skipped set and
	// nothing started, when a backup of the VM runs already (however it
	// was started): what a schedule's run does, so that a skipped run is
	// not a failure. Without it, that start fails with
	// ErrTypeAlreadyRunning.
	SkipIfRunning bool `json:"skip_if_running,omitempty"`
}

// BackupResult says which per-VM backup ran, and its result unless
// detached.
type BackupResult struct {
	WorkflowID string `json:"workflow_id"`
	RunID      string `json:"run_id"`
	BackupID   string `json:"backup_id"`
	VM         string `json:"vm"`
	VMUUID     string `json:"vm_uuid"`
	// Profile is the vCenter profile the backup runs under: the input's,
	// or the worker's default.
	Profile string          `json:"profile,omitempty"`
	Result  *BackupVMResult `json:"result,omitempty"`
	// Skipped says why nothing was started (SkipIfRunning): WorkflowID is
	// then the running backup's.
	Skipped string `json:"skipped,omitempty"`
}

// AlreadyRunningDetails are the details of an ErrTypeAlreadyRunning error.
type AlreadyRunningDetails struct {
	WorkflowID string `json:"workflow_id"`
	VM         string `json:"vm"`
	VMUUID     string `json:"vm_uuid"`
}

// BackupVMInput is the backup of one VM, named for good by its instance
// UUID. Backup runs it under BackupWorkflowID(vCenter instance UUID,
// VMUUID); Profile says how the worker reaches that vCenter, and under
// which profile its restore points are kept.
type BackupVMInput struct {
	Profile  string `json:"profile"`
	VMUUID   string `json:"vm_uuid"`
	VMName   string `json:"vm,omitempty"`
	Mode     string `json:"mode,omitempty"`
	BackupID string `json:"backup_id,omitempty"` // derived from the run when empty
	// MaxParallelDisks bounds the disks transferred at once (default 2).
	MaxParallelDisks int `json:"max_parallel_disks,omitempty"`
	// MaxChainLength bounds a disk's chain in auto mode; 0: the VM's
	// retention policy's max-chain, else 30.
	MaxChainLength int `json:"max_chain_length,omitempty"`
}

// BackupVMResult is a committed restore point.
type BackupVMResult struct {
	BackupID string       `json:"backup_id"`
	VM       string       `json:"vm"`
	VMUUID   string       `json:"vm_uuid"`
	Disks    []DiskResult `json:"disks"`
	Warnings []string     `json:"warnings,omitempty"`
}

// DiskResult is one disk of a restore point.
type DiskResult struct {
	Key          int32  `json:"key"`
	Mode         string `json:"mode"`
	ChangedBytes int64  `json:"changed_bytes"`
	WrittenBytes int64  `json:"written_bytes"`
	SizeBytes    int64  `json:"size_bytes"`
	// AllocatedBytes is the space the QCOW2 file takes (it is sparse, its
	// size larger); absent from workers before it.
	AllocatedBytes int64   `json:"allocated_bytes,omitempty"`
	Path           string  `json:"path"`
	ChangeID       string  `json:"change_id"`
	Seconds        float64 `json:"seconds"`
	Note           string  `json:"note,omitempty"`
	// The sizes and the time again in human units (1.5 GiB, 4.2s), for
	// the Web UI's result view; the numbers above are the contract.
	Changed   string `json:"changed,omitempty"`
	Written   string `json:"written,omitempty"`
	Size      string `json:"size,omitempty"`
	Allocated string `json:"allocated,omitempty"`
	Duration  string `json:"duration,omitempty"`
}

// BackupReport is the object `starter backup --json` prints: the one
// definition of that contract, which the starter builds (from the
// BackupResult of the start and the BackupVMResult of the run) and the
// harnesses and the demo decode. It is not a workflow's input or result,
// so it can grow without touching recorded histories; its keys and their
// omitempty-ness are the CLI's contract and stay as they are.
type BackupReport struct {
	BackupID string `json:"backup_id"`
	VM       string `json:"vm"`
	VMUUID   string `json:"vm_uuid"`
	// Status is one of the Report* statuses.
	Status string `json:"status"`
	// Error says why a backup is not completed (or which backup runs
	// already).
	Error string `json:"error,omitempty"`
	// WorkflowID is the BackupVM's workflow ID; before a start workflow
	// named its backup, the start workflow's.
	WorkflowID string `json:"workflow_id"`
	// Disks are the restore point's, once completed; never null.
	Disks    []DiskResult `json:"disks"`
	Warnings []string     `json:"warnings,omitempty"`
}

// The statuses of a BackupReport.
const (
	ReportRunning        = "running"         // started (without --wait, or the starter was interrupted)
	ReportCompleted      = "completed"       // a restore point
	ReportFailed         = "failed"          // the start or the backup failed
	ReportCanceled       = "canceled"        // the backup was canceled
	ReportTerminated     = "terminated"      // the backup's workflow was terminated
	ReportAlreadyRunning = "already_running" // refused: a backup of the VM runs already
)

// FindDisk returns the report's disk key.
func (r BackupReport) FindDisk(key int32) (DiskResult, bool) {
	for _, d := range r.Disks {
		if d.Key == key {
			return d, true
		}
	}
	return DiskResult{}, false
}

// Progress is the answer of the progress query, of a BackupVM and of a
// Backup (which names its BackupVM once that one runs: WorkflowID, whose
// progress query follows the backup; and, once it waited for it, its
// result).
//
// The workflow knows the phases and each disk's bytes to copy; a running
// transfer's bytes done, rate and ETA are in its heartbeat details, which
// the server keeps for a pending activity: the worker adds them to the
// answer (Live), so progress costs no workflow history however large the
// disk.
type Progress struct {
	BackupID string `json:"backup_id"`
	VM       string `json:"vm,omitempty"`
	Phase    Phase  `json:"phase"`
	// PhaseSince is when the phase began (workflow time).
	PhaseSince time.Time `json:"phase_since,omitzero"`
	Snapshot   string    `json:"snapshot,omitempty"`
	// WorkflowID is, in a Backup's answer, the BackupVM that runs the
	// backup.
	WorkflowID string         `json:"workflow_id,omitempty"`
	Disks      []DiskProgress `json:"disks"`
	// Live says the running transfers' heartbeats are in Disks.
	Live bool `json:"live,omitempty"`
	// Skipped says why a Backup started nothing (SkipIfRunning).
	Skipped string `json:"skipped,omitempty"`
}

// Phase is where a backup stands, in the order it goes through them.
// A backup that fails or is canceled stays in the phase it was in; its
// outcome is the workflow's.
type Phase string

// The phases of a backup.
const (
	PhaseResolving        Phase = "resolving"         // Backup: ResolveVM, then the start of its BackupVM
	PhaseStarted          Phase = "started"           // Backup: its BackupVM (WorkflowID) runs the backup and answers its progress
	PhaseStarting         Phase = "starting"          // inputs checked, nothing asked yet
	PhasePreparing        Phase = "preparing"         // PrepareVM and BeginBackup: disks, CBT, catalog, chain check
	PhaseSnapshot         Phase = "snapshot"          // CreateSnapshot
	PhaseTransferring     Phase = "transferring"      // per disk: ChangedAreas, TransferDisk (see DiskPhase)
	PhaseCommitting       Phase = "committing"        // CommitRestorePoint
	PhaseCommitted        Phase = "committed"         // a restore point; the snapshot's removal follows
	PhaseRemovingSnapshot Phase = "removing-snapshot" // RemoveSnapshot, after the commit
	PhaseCompleted        Phase = "completed"         // committed, and the snapshot's removal ran (a failed one is logged; the sweeper removes it)
	PhaseSkipped          Phase = "skipped"           // Backup: a backup of the VM runs already (SkipIfRunning)
)

// Final reports whether nothing more happens in phase p.
func (p Phase) Final() bool { return p == PhaseCompleted || p == PhaseSkipped }

// DiskPhase is where one disk of a BackupVM stands.
type DiskPhase string

// The phases of a disk.
const (
	DiskWaiting      DiskPhase = "waiting"      // planned, or queried: waits for the snapshot, the space check or a free transfer
	DiskQuerying     DiskPhase = "querying"     // ChangedAreas: CBT's changed areas
	DiskTransferring DiskPhase = "transferring" // TransferDisk; Done and Total are bytes
	DiskVerifying    DiskPhase = "verifying"    // TransferDisk checks its image and reads it back (Verified of VerifyTotal)
	DiskDone         DiskPhase = "done"         // its image is durable, awaiting the commit
	DiskFailed       DiskPhase = "failed"       // its step failed: the backup fails
	DiskCanceled     DiskPhase = "canceled"     // not copied: the backup was canceled or another disk failed
)

// DiskProgress is one disk's progress.
type DiskProgress struct {
	Key   int32     `json:"key"`
	Mode  string    `json:"mode"`
	Phase DiskPhase `json:"phase"`
	// Done and Total are the bytes copied and to copy (CBT's changed
	// bytes, known once the disk is queried); Percent is Done of Total.
	Done    int64   `json:"done"`
	Total   int64   `json:"total"`
	Percent float64 `json:"percent"`
	// Rate is the current speed in bytes per second and ETASeconds the
	// time left at that speed, of the copy (or, verifying, of the read
	// back); 0 when unknown.
	Rate       float64 `json:"rate,omitempty"`
	ETASeconds float64 `json:"eta_seconds,omitempty"`
	// Verified of VerifyTotal bytes of the image are read back.
	Verified    int64 `json:"verified,omitempty"`
	VerifyTotal int64 `json:"verify_total,omitempty"`
}

// ApplyTransfers adds what the running transfers' heartbeats say (their
// latest details, activities.TransferProgress; a TransferDisks' per disk,
// its disks done as activities.TransferStageDone) to the disks they copy.
func (p *Progress) ApplyTransfers(beats []activities.TransferProgress) {
	for _, b := range beats {
		for i := range p.Disks {
			d := &p.Disks[i]
			if d.Key != b.Key || (d.Phase != DiskTransferring && d.Phase != DiskVerifying) {
				continue
			}
			p.Live = true
			if b.Stage == activities.TransferStageDone {
				// Done in a TransferDisks whose other disks still run.
				d.Phase, d.Done, d.Rate, d.ETASeconds, d.Percent = DiskDone, d.Total, 0, 0, 100
				continue
			}
			if b.Total > 0 {
				d.Done, d.Total = b.Done, b.Total
			}
			d.Rate, d.ETASeconds = b.Rate, 0
			left := d.Total - d.Done
			if b.Stage == activities.TransferStageVerifying {
				d.Phase = DiskVerifying
				d.Verified, d.VerifyTotal = b.Verified, b.VerifyTotal
				left = b.VerifyTotal - b.Verified
			}
			if b.Rate > 0 && left > 0 {
				d.ETASeconds = float64(left) / b.Rate
			}
			d.Percent = percent(d.Done, d.Total)
		}
	}
}

// percent is done of total, in percent; a disk with nothing to copy is
// done when it is.
func percent(done, total int64) float64 {
	if total <= 0 {
		return 0
	}
	return min(100, float64(done)*100/float64(total))
}

// Workflows call activities through these typed nil pointers.
var (
	vsphereActs  *activities.VSphere
	transferActs *activities.Transfer
	catalogActs  *activities.Catalog
	launcherActs *activities.Launcher
)

// The change of Backup's commands that made the per-VM workflow ID
// BackupWorkflowID(vCenter instance UUID, VM instance UUID) instead of
// ProfileBackupWorkflowID(profile, VM instance UUID) (workflow.GetVersion).
const (
	changeVCenterWorkflowID  = "vcenter-workflow-id"
	versionVCenterWorkflowID = 1
)

// The change of BackupVM's commands that added the repository space check
// (workflow.GetVersion): CheckSpace before the snapshot, and, once every
// disk's CBT query has run (all of them now before the first transfer),
// again with the exact changed bytes.
const (
	changeSpaceCheck  = "space-check"
	versionSpaceCheck = 1
)

// The change of BackupVM's commands that made CbtflowMode the mode that
// ran (full when any disk's backup is full), upserted once planned and
// again when a CBT reset made a disk full; before, it kept the mode asked
// for (auto).
const (
	changeModeThatRan  = "mode-that-ran"
	versionModeThatRan = 1
)

// The change of BackupVM's commands that made the snapshot and the commit
// run to their end when the backup is canceled, in a disconnected
// context: before, a cancel requested the cancel of a CreateSnapshot that
// vCenter went on with (the removal by name could come before the
// snapshot existed), and of a CommitRestorePoint that committed all the
// same (the backup ended canceled with its restore point committed).
const (
	changeUncancelableSteps  = "uncancelable-snapshot-and-commit"
	versionUncancelableSteps = 1
)

// The change of Backup's commands that set its own search attributes:
// CbtflowVM as given at once (so a Backup that cannot resolve its VM is
// found by it), then the VM's name, vCenter profile and backup ID once
// resolved, and CbtflowMode, the mode that ran, once its BackupVM ended.
// Before, only its BackupVM had them.
const (
	changeBackupSearchAttributes  = "backup-search-attributes"
	versionBackupSearchAttributes = 1
)

// The change of Backup's and BackupVM's commands that runs the short
// steps of a backup as local activities (see step): ResolveVM, PrepareVM,
// BeginBackup, CheckSpace, ChangedAreas, CommitRestorePoint and
// RemoveSnapshot. Consecutive local activities run in one workflow task,
// on the worker that runs it, so a backup goes through a few workflow
// tasks instead of one round trip through the server per step.
// CreateSnapshot (a step vCenter carries on with when the worker dies, and
// whose change IDs must be durable before anything builds on them) and
// TransferDisk (whose heartbeats carry its resume point and progress)
// stay activities, and so does FailBackup (the failure path).
//
// A run that has it has every earlier change, and asks GetVersion for
// no other (see since), and it sets only the search
// attributes that change (see
// upsertKeywords): each is a command, and a workflow task with fewer
// commands completes sooner.
const (
	changeLocalSteps  = "local-steps"
	versionLocalSteps = 1
)

// The change of BackupVM's commands that reads the disks' allocation (the
// space check's need for a full backup: RefreshStorageInfo, then the VM's
// file layout) only for the disks planned full, in a local activity
// (activities.VSphere.AllocatedBytes) after BeginBackup, where PrepareVM
// read it for every disk before: an incremental backup makes two vCenter
// calls fewer, one of them a refresh that a real vCenter may take long
// over. It is BackupVM's latest change: BackupVM asks for it first, and a
// run that has it asks for no earlier one (changeLocalSteps is then true,
// see since).
const (
	changeAllocationWhenFull  = "allocation-when-full"
	versionAllocationWhenFull = 1
)

// The change of BackupVM's commands that transfers every disk in one
// activity (activities.Transfer.TransferDisks, MaxParallelDisks at a time
// inside it) instead of a TransferDisk per disk: per backup of two disks
// an activity task and a workflow task fewer (the one that recorded the
// first disk's end and did nothing else). Its heartbeat carries each disk's
// resume point and the result of each disk done, so a retry copies no
// disk twice. It is BackupVM's latest change: BackupVM asks for it first,
// and a run that has it asks for no earlier one
// (changeAllocationWhenFull is then true, and with it every earlier
// change).
const (
	changeOneTransfer  = "one-transfer"
	versionOneTransfer = 1
)

// The change of Backup's commands that starts a detached BackupVM (the
// starter's backups) through the client, in a local activity
// (activities.Launcher.StartWorkflow), and ends in the same, first,
// workflow task. Before, it started BackupVM as a child and ended in a
// second workflow task, once the server had started the child (a transfer
// task of its own) and told the parent: per backup a workflow task, its
// writes of the workflow's state and a round trip through the server
// more. A Backup that waits for its BackupVM (schedules, the Web UI)
// still starts it as a child, whose end it waits for and whose cancel it
// asks for. It is Backup's latest change: Backup asks for it first, and a
// run that has it asks for no earlier one (changeLocalSteps is then
// true, see since).
const (
	changeDetachedStart  = "detached-start"
	versionDetachedStart = 1
)

// Memo keys of a BackupVM started detached: the Backup workflow that
// started it (its parent, in the history of one started as a child).
const (
	MemoStartedByWorkflowID = "started_by_workflow_id"
	MemoStartedByRunID      = "started_by_run_id"
)

// Backup resolves the VM and runs its backup under the VM's canonical
// workflow ID. A second start while one runs starts nothing and fails with
// ErrTypeAlreadyRunning, whatever the VM was called and whatever profile
// of its vCenter named it.
func Backup(ctx workflow.Context, in BackupInput) (*BackupResult, error) {
	if strings.TrimSpace(in.VM) == "" {
		return nil, invalid("no VM given")
	}
	if in.Mode == "" {
		in.Mode = ModeAuto
	}
	if err := checkMode(in.Mode); err != nil {
		return nil, err
	}
	// Its progress: its own until its BackupVM runs, then the name of
	// that one (whose query follows the backup), then its result's.
	prog := Progress{VM: in.VM, Phase: PhaseResolving, PhaseSince: workflow.Now(ctx), Disks: []DiskProgress{}}
	if err := workflow.SetQueryHandler(ctx, QueryProgress, func() (Progress, error) { return prog.answer(), nil }); err != nil {
		return nil, err
	}
	// Runs recorded before a detached Backup started its BackupVM through
	// the client started it as a child (the latest change: a run with it
	// has every earlier one, see since); those recorded before the short
	// steps ran as local activities resolved the VM with an activity: on
	// replay they must.
	detachedStart := workflow.GetVersion(ctx, changeDetachedStart, workflow.DefaultVersion, versionDetachedStart) >= versionDetachedStart
	local := detachedStart || workflow.GetVersion(ctx, changeLocalSteps, workflow.DefaultVersion, versionLocalSteps) >= versionLocalSteps
	// Runs recorded before Backup set search attributes of its own must
	// not upsert them on replay.
	ownAttrs := since(ctx, local, changeBackupSearchAttributes, versionBackupSearchAttributes)
	if ownAttrs {
		_ = workflow.UpsertTypedSearchAttributes(ctx, SearchVM.ValueSet(in.VM))
	}
	// A profile left empty is the worker's to choose: configuration, which
	// a workflow cannot read. ResolveVM picks it and says which, and the
	// backup keeps that one. (Runs recorded before asked ResolveVM with a
	// profile always, and got it back: they replay the same.)
	var vm activities.ResolveVMResult
	if err := step(ctx, local, shortActivity(), vsphereActs.ResolveVM,
		activities.ResolveVMInput{Profile: in.Profile, VM: in.VM}).Get(ctx, &vm); err != nil {
		return nil, err
	}
	if vm.Profile != "" {
		in.Profile = vm.Profile
	}
	backupID := newBackupID(ctx)
	prog.VM, prog.BackupID = vm.VMName, backupID
	if ownAttrs {
		_ = workflow.UpsertTypedSearchAttributes(ctx, SearchVM.ValueSet(vm.VMName),
			SearchVCenter.ValueSet(in.Profile), SearchBackupID.ValueSet(backupID))
	}
	// Runs recorded before the child's ID named the vCenter by its
	// instance UUID started it under the profile's name: on replay they
	// must start the same child.
	wid := ProfileBackupWorkflowID(in.Profile, vm.VMUUID)
	if since(ctx, local, changeVCenterWorkflowID, versionVCenterWorkflowID) && vm.VCenterUUID != "" {
		wid = BackupWorkflowID(vm.VCenterUUID, vm.VMUUID)
	}
	vmIn := BackupVMInput{
		Profile: in.Profile, VMUUID: vm.VMUUID, VMName: vm.VMName, Mode: in.Mode, BackupID: backupID,
		MaxChainLength: in.FullEvery,
	}
	// The VM's backup runs already: nothing started.
	running := func(cause error) (*BackupResult, error) {
		if in.SkipIfRunning {
			msg := fmt.Sprintf("a backup or a prune of VM %s (%s) is running as workflow %s: nothing started", vm.VMName, vm.VMUUID, wid)
			workflow.GetLogger(ctx).Info(msg)
			prog.Phase, prog.PhaseSince, prog.Skipped, prog.WorkflowID = PhaseSkipped, workflow.Now(ctx), msg, wid
			return &BackupResult{WorkflowID: wid, VM: vm.VMName, VMUUID: vm.VMUUID, Profile: in.Profile, Skipped: msg}, nil
		}
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("a backup of VM %s (%s) is already running as workflow %s", vm.VMName, vm.VMUUID, wid),
			ErrTypeAlreadyRunning, cause, AlreadyRunningDetails{WorkflowID: wid, VM: vm.VMName, VMUUID: vm.VMUUID})
	}
	if in.Detach && detachedStart {
		started, err := startDetached(ctx, wid, vmIn)
		if err != nil {
			return nil, err
		}
		if started.Running {
			return running(nil)
		}
		runID := started.RunID
		prog.Phase, prog.PhaseSince, prog.WorkflowID = PhaseStarted, workflow.Now(ctx), wid
		return &BackupResult{WorkflowID: wid, RunID: runID, BackupID: backupID, VM: vm.VMName, VMUUID: vm.VMUUID, Profile: in.Profile}, nil
	}
	cctx := workflow.WithChildOptions(ctx, workflow.ChildWorkflowOptions{
		WorkflowID:            wid,
		TaskQueue:             TaskQueue,
		ParentClosePolicy:     enumspb.PARENT_CLOSE_POLICY_ABANDON,
		WorkflowIDReusePolicy: enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		WaitForCancellation:   true,
		TypedSearchAttributes: temporal.NewSearchAttributes(
			SearchVM.ValueSet(vm.VMName), SearchMode.ValueSet(in.Mode),
			SearchVCenter.ValueSet(in.Profile), SearchBackupID.ValueSet(backupID)),
	})
	child := workflow.ExecuteChildWorkflow(cctx, BackupVM, vmIn)
	var exec workflow.Execution
	if err := child.GetChildWorkflowExecution().Get(ctx, &exec); err != nil {
		if temporal.IsWorkflowExecutionAlreadyStartedError(err) {
			return running(err)
		}
		return nil, err
	}
	prog.Phase, prog.PhaseSince, prog.WorkflowID = PhaseStarted, workflow.Now(ctx), exec.ID
	res := &BackupResult{WorkflowID: exec.ID, RunID: exec.RunID, BackupID: backupID, VM: vm.VMName, VMUUID: vm.VMUUID, Profile: in.Profile}
	if in.Detach {
		return res, nil
	}
	if err := child.Get(ctx, &res.Result); err != nil {
		return nil, err
	}
	prog = res.Result.progress(exec.ID, workflow.Now(ctx))
	if ownAttrs {
		_ = workflow.UpsertTypedSearchAttributes(ctx, SearchMode.ValueSet(res.Result.ModeThatRan()))
	}
	return res, nil
}

// startDetached starts the BackupVM of in under wid (changeDetachedStart),
// with the search attributes a child gets and the Backup named in its
// memo, and returns its run, or the run of wid that runs already
// (Running). The request ID is the Backup's run ID: run again (its
// workflow task lost with the worker that ran it), the start finds the
// BackupVM it started while that is wid's latest run, running or ended.
// Should that BackupVM have ended and another run of wid have started
// meanwhile (within the lost task's timeout), the Backup says the VM's
// backup runs, or, when that one ended too, starts a BackupVM that
// BeginBackup refuses at once (its backup ID taken): never a second
// backup.
func startDetached(ctx workflow.Context, wid string, in BackupVMInput) (activities.StartWorkflowResult, error) {
	var started activities.StartWorkflowResult
	arg, err := json.Marshal(in)
	if err != nil {
		return started, err
	}
	self := workflow.GetInfo(ctx).WorkflowExecution
	err = step(ctx, true, launchActivity(), launcherActs.StartWorkflow, activities.StartWorkflowInput{
		WorkflowID: wid, WorkflowType: backupVMType, TaskQueue: TaskQueue, Arg: arg,
		Keywords: map[string]string{
			SearchVM.GetName(): in.VMName, SearchMode.GetName(): in.Mode,
			SearchVCenter.GetName(): in.Profile, SearchBackupID.GetName(): in.BackupID,
		},
		Memo:      map[string]string{MemoStartedByWorkflowID: self.ID, MemoStartedByRunID: self.RunID},
		RequestID: self.RunID,
	}).Get(ctx, &started)
	return started, err
}

// backupVMType is BackupVM's workflow type (Register registers it by its
// function's name).
const backupVMType = "BackupVM"

// ModeThatRan is full when any disk's backup was full, else incremental.
func (r *BackupVMResult) ModeThatRan() string {
	for _, d := range r.Disks {
		if d.Mode == ModeFull {
			return ModeFull
		}
	}
	return ModeIncremental
}

// progress is a completed backup's Progress.
func (r *BackupVMResult) progress(workflowID string, at time.Time) Progress {
	p := Progress{BackupID: r.BackupID, VM: r.VM, Phase: PhaseCompleted, PhaseSince: at, WorkflowID: workflowID, Disks: []DiskProgress{}}
	for _, d := range r.Disks {
		p.Disks = append(p.Disks, DiskProgress{Key: d.Key, Mode: d.Mode, Phase: DiskDone, Done: d.ChangedBytes, Total: d.ChangedBytes})
	}
	return p
}

// BackupVM is the backup of one VM: snapshot, CBT query and transfer of
// every disk, commit of the restore point, removal of the snapshot.
func BackupVM(ctx workflow.Context, in BackupVMInput) (*BackupVMResult, error) {
	r := &backupRun{in: in}
	if err := r.setup(ctx); err != nil {
		return nil, err
	}
	return r.run(ctx)
}

// backupRun is the state of one BackupVM.
type backupRun struct {
	in       BackupVMInput
	progress Progress
	vmRef    string
	snapshot string
	warnings []string
	log      log.Logger
	// modeShown is the mode CbtflowMode holds, once upsertMode set it.
	modeShown string
	// uncancelable: the snapshot and the commit run to their end when the
	// backup is canceled (see changeUncancelableSteps).
	uncancelable bool
	// local: the short steps run as local activities (see
	// changeLocalSteps).
	local bool
	// allocationWhenFull: the disks' allocation is read only for the
	// disks planned full (see changeAllocationWhenFull).
	allocationWhenFull bool
	// oneTransfer: every disk is transferred in one activity (see
	// changeOneTransfer).
	oneTransfer bool
}

func (r *backupRun) setup(ctx workflow.Context) error {
	if r.in.Profile == "" || r.in.VMUUID == "" {
		return invalid("BackupVM needs a profile and a VM instance UUID (start Backup to name a VM any way)")
	}
	if r.in.Mode == "" {
		r.in.Mode = ModeAuto
	}
	if err := checkMode(r.in.Mode); err != nil {
		return err
	}
	if r.in.BackupID == "" {
		r.in.BackupID = newBackupID(ctx)
	}
	if r.in.MaxParallelDisks <= 0 {
		r.in.MaxParallelDisks = 2
	}
	r.progress = Progress{BackupID: r.in.BackupID, VM: r.in.VMName, Phase: PhaseStarting, PhaseSince: workflow.Now(ctx), Disks: []DiskProgress{}}
	if err := workflow.SetQueryHandler(ctx, QueryProgress, func() (Progress, error) { return r.progress.answer(), nil }); err != nil {
		return err
	}
	r.log = workflow.GetLogger(ctx)
	// Runs recorded before the disks were transferred in one activity
	// transferred each in its own; runs recorded before the allocation
	// was read only for full disks read it in PrepareVM; runs recorded
	// before the short steps ran as local activities ran them as
	// activities: on replay they must. The newest change is asked first,
	// and implies the others.
	r.oneTransfer = workflow.GetVersion(ctx, changeOneTransfer, workflow.DefaultVersion, versionOneTransfer) >= versionOneTransfer
	r.allocationWhenFull = r.oneTransfer || workflow.GetVersion(ctx, changeAllocationWhenFull, workflow.DefaultVersion, versionAllocationWhenFull) >= versionAllocationWhenFull
	r.local = r.allocationWhenFull || workflow.GetVersion(ctx, changeLocalSteps, workflow.DefaultVersion, versionLocalSteps) >= versionLocalSteps
	return r.upsertKeywords(ctx, keyword{SearchVCenter, r.in.Profile}, keyword{SearchMode, r.in.Mode}, keyword{SearchBackupID, r.in.BackupID})
}

// run is the pipeline of one backup, step by step; every step is an
// activity (or a few), and cleanup runs on every way out.
func (r *backupRun) run(ctx workflow.Context) (res *BackupVMResult, err error) {
	vm, err := r.prepare(ctx)
	if err != nil {
		return nil, err
	}
	begun, err := r.begin(ctx, vm)
	if err != nil {
		return nil, err
	}
	// From here on the catalog has a running backup: whatever happens, it
	// ends committed or failed, and its partial files go.
	committed := false
	defer func() {
		if !committed {
			r.failBackup(ctx, err)
		}
	}()
	plans, err := r.plan(vm, begun)
	if err != nil {
		return nil, err
	}
	// Runs recorded before the space check neither checked nor queried
	// every disk before the first transfer: on replay they must not.
	spaceCheck := since(ctx, r.local, changeSpaceCheck, versionSpaceCheck)
	// Runs recorded before CbtflowMode said the mode that ran kept the
	// mode asked for: on replay they must not upsert it.
	modeThatRan := since(ctx, r.local, changeModeThatRan, versionModeThatRan)
	if modeThatRan {
		r.upsertMode(ctx, plans)
	}
	// Runs recorded before the snapshot and the commit ran to their end
	// when canceled asked them to stop there: on replay they must.
	r.uncancelable = since(ctx, r.local, changeUncancelableSteps, versionUncancelableSteps)
	if spaceCheck {
		if r.allocationWhenFull {
			if err := r.allocation(ctx, &vm, plans); err != nil {
				return nil, err
			}
		}
		if err := r.checkSpace(ctx, spaceBefore(vm, begun, plans), false); err != nil {
			return nil, err
		}
	}
	snap, err := r.takeSnapshot(ctx, vm)
	// The snapshot may exist even when the activity failed (created, then
	// the worker died): it is removed by name then.
	defer r.removeSnapshot(ctx, &snap)
	if err != nil {
		return nil, err
	}
	results, commits, err := r.transferDisks(ctx, plans, snap, spaceCheck)
	if err != nil {
		return nil, err
	}
	if modeThatRan {
		r.upsertMode(ctx, plans)
	}
	if err := r.commit(ctx, commits); err != nil {
		return nil, err
	}
	committed = true
	sort.Slice(results, func(a, b int) bool { return results[a].Key < results[b].Key })
	return &BackupVMResult{BackupID: r.in.BackupID, VM: r.in.VMName, VMUUID: r.in.VMUUID, Disks: results, Warnings: r.warnings}, nil
}

// prepare reads the VM's disks (and switches CBT on when it is off).
func (r *backupRun) prepare(ctx workflow.Context) (activities.PrepareVMResult, error) {
	r.setPhase(ctx, PhasePreparing)
	var vm activities.PrepareVMResult
	if err := step(ctx, r.local, shortActivity(), vsphereActs.PrepareVM,
		activities.PrepareVMInput{Profile: r.in.Profile, VMUUID: r.in.VMUUID, SkipAllocation: r.allocationWhenFull}).Get(ctx, &vm); err != nil {
		return vm, err
	}
	if r.local && vm.CBTJustEnabled {
		// A local activity's result is in the history only once the
		// workflow task that ran it completes, and a worker that dies
		// before that runs PrepareVM again, which then finds CBT on and
		// would not say that it was off: a timer completes the task
		// first (rare: CBT was off).
		if err := workflow.Sleep(ctx, time.Millisecond); err != nil {
			return vm, err
		}
	}
	r.vmRef = vm.VMRef
	if r.in.VMName == "" {
		r.in.VMName = vm.VMName
	}
	r.progress.VM = vm.VMName
	_ = r.upsertKeywords(ctx, keyword{SearchVM, vm.VMName})
	if len(vm.Disks) == 0 {
		return vm, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("VM %s has no disks to back up", vm.VMName), activities.ErrTypeNoDisks, nil)
	}
	return vm, nil
}

// begin records the running backup in the catalog and learns each disk's
// previous restore point, its chain proven (or found damaged).
func (r *backupRun) begin(ctx workflow.Context, vm activities.PrepareVMResult) (activities.BeginBackupResult, error) {
	in := r.in
	info := workflow.GetInfo(ctx)
	keys := make([]int32, 0, len(vm.Disks))
	for _, d := range vm.Disks {
		keys = append(keys, d.Key)
	}
	var begun activities.BeginBackupResult
	if err := step(ctx, r.local, beginActivity(), catalogActs.BeginBackup, activities.BeginBackupInput{
		BackupID: in.BackupID, Profile: in.Profile, VMUUID: in.VMUUID, VMName: vm.VMName, Mode: in.Mode,
		WorkflowID: info.WorkflowExecution.ID, RunID: info.WorkflowExecution.RunID, DiskKeys: keys,
	}).Get(ctx, &begun); err != nil {
		return begun, err
	}
	// Damaged chains were marked in the catalog; their disks get a full
	// backup (planDisks), and the result says why.
	r.warnings = append(r.warnings, begun.Warnings...)
	for _, k := range begun.ClosedChains {
		r.warnings = append(r.warnings, fmt.Sprintf("disk %d was removed from the VM: its chain is closed (its restore points stay restorable)", k))
	}
	return begun, nil
}

// failBackup marks the backup failed and removes its partial files, in a
// disconnected context so a canceled backup still cleans up.
func (r *backupRun) failBackup(ctx workflow.Context, cause error) {
	dctx, cancel := workflow.NewDisconnectedContext(ctx)
	defer cancel()
	reason := "canceled"
	if cause != nil {
		reason = cause.Error()
	}
	if err := workflow.ExecuteActivity(withCleanupActivity(dctx), catalogActs.FailBackup,
		activities.FailBackupInput{BackupID: r.in.BackupID, Reason: reason}).Get(dctx, nil); err != nil {
		r.log.Error("marking the backup failed", "backup", r.in.BackupID, "error", err)
	}
}

// plan decides full or incremental per disk (pure: no activity).
func (r *backupRun) plan(vm activities.PrepareVMResult, begun activities.BeginBackupResult) ([]diskPlan, error) {
	// The input's bound wins; else the VM's retention policy's (max-chain),
	// which BeginBackup reads; else the default.
	maxChain := r.in.MaxChainLength
	if maxChain <= 0 {
		maxChain = begun.MaxChain
	}
	plans, err := planDisks(r.in.Mode, vm.Disks, begun.Previous, vm.CBTJustEnabled, maxChain)
	if err != nil {
		return nil, temporal.NewNonRetryableApplicationError(err.Error(), activities.ErrTypeNoRestorePoint, nil)
	}
	if vm.CBTJustEnabled {
		// CBT was off since the last backup (someone disabled it): the
		// chains of the disks backed up before are broken, as by a reset.
		had := map[int32]bool{}
		for _, p := range begun.Previous {
			had[p.Key] = true
		}
		for _, p := range plans {
			if had[p.Key] {
				warning := fmt.Sprintf("disk %d: changed block tracking was off and has been enabled again: the change IDs of its earlier restore points are void; full backup of this disk", p.Key)
				r.log.Warn(warning, "backup", r.in.BackupID)
				r.warnings = append(r.warnings, warning)
			}
		}
	}
	for _, p := range plans {
		r.progress.Disks = append(r.progress.Disks, DiskProgress{Key: p.Key, Mode: p.Mode, Phase: DiskWaiting})
	}
	return plans, nil
}

// allocation reads the allocation of the disks planned full into vm's
// disks (PrepareVM left it out): nothing for a backup of incrementals
// only.
func (r *backupRun) allocation(ctx workflow.Context, vm *activities.PrepareVMResult, plans []diskPlan) error {
	full := map[int32]bool{}
	for _, p := range plans {
		if p.Mode == ModeFull {
			full[p.Key] = true
		}
	}
	in := activities.AllocatedBytesInput{Profile: r.in.Profile, VMRef: vm.VMRef, VMName: vm.VMName}
	for _, d := range vm.Disks {
		if full[d.Key] {
			in.Disks = append(in.Disks, activities.AllocationDisk{Key: d.Key, Capacity: d.Capacity})
		}
	}
	if len(in.Disks) == 0 {
		return nil
	}
	var res activities.AllocatedBytesResult
	if err := step(ctx, r.local, shortActivity(), vsphereActs.AllocatedBytes, in).Get(ctx, &res); err != nil {
		return err
	}
	got := map[int32]activities.AllocationDisk{}
	for _, d := range res.Disks {
		got[d.Key] = d
	}
	for i := range vm.Disks {
		d := &vm.Disks[i]
		if !full[d.Key] {
			continue
		}
		if a, ok := got[d.Key]; ok {
			d.AllocatedBytes, d.AllocatedUnknown = a.AllocatedBytes, a.AllocatedUnknown
		} else { // not answered for: counted as the layout counts a disk it does not know
			d.AllocatedBytes, d.AllocatedUnknown = d.Capacity, true
		}
	}
	return nil
}

// spaceBefore is what each planned disk will write, as known before the
// snapshot: a full disk its allocated bytes (AllocatedBytes; PrepareVM in
// runs recorded before; its capacity when the VM's file layout does not
// know it); an incremental the most any of
// the recent incrementals in its chain changed (BeginBackup), 0 when it
// has none yet. Only CBT's answer, after the snapshot, is exact: the
// check runs again then.
func spaceBefore(vm activities.PrepareVMResult, begun activities.BeginBackupResult, plans []diskPlan) []activities.SpaceDisk {
	disks := map[int32]activities.VMDisk{}
	for _, d := range vm.Disks {
		disks[d.Key] = d
	}
	prev := map[int32]activities.PreviousDisk{}
	for _, p := range begun.Previous {
		prev[p.Key] = p
	}
	out := make([]activities.SpaceDisk, 0, len(plans))
	for _, p := range plans {
		sd := activities.SpaceDisk{Key: p.Key, Mode: p.Mode}
		switch d := disks[p.Key]; {
		case p.Mode == ModeIncremental:
			sd.Bytes, sd.Basis, sd.Incrementals = prev[p.Key].RecentChangedBytes, activities.SpaceEstimated, prev[p.Key].RecentIncrementals
		case d.AllocatedUnknown:
			sd.Bytes, sd.Basis = d.AllocatedBytes, activities.SpaceCapacity
		default:
			sd.Bytes, sd.Basis = d.AllocatedBytes, activities.SpaceAllocated
		}
		out = append(out, sd)
	}
	return out
}

// checkSpace fails the backup with activities.ErrTypeRepositoryFull when
// the repository's free space is less than what disks will write plus the
// margin (activities.CheckSpace). Before the snapshot (afterQuery false)
// nothing is on the VM yet; after the queries, the snapshot is removed by
// the way out of every failure, and no image was written.
func (r *backupRun) checkSpace(ctx workflow.Context, disks []activities.SpaceDisk, afterQuery bool) error {
	var res activities.CheckSpaceResult
	return step(ctx, r.local, spaceActivity(), transferActs.CheckSpace, activities.CheckSpaceInput{
		BackupID: r.in.BackupID, VMName: r.in.VMName, Disks: disks, AfterQuery: afterQuery,
	}).Get(ctx, &res)
}

// takeSnapshot takes the backup's snapshot; its config holds each disk's
// change ID for the next backup.
func (r *backupRun) takeSnapshot(ctx workflow.Context, vm activities.PrepareVMResult) (activities.CreateSnapshotResult, error) {
	r.setPhase(ctx, PhaseSnapshot)
	var snap activities.CreateSnapshotResult
	actx := ctx
	if r.uncancelable {
		dctx, cancel := workflow.NewDisconnectedContext(ctx)
		defer cancel()
		actx = dctx
	}
	err := workflow.ExecuteActivity(withSnapshotActivity(actx), vsphereActs.CreateSnapshot, activities.CreateSnapshotInput{
		Profile: r.in.Profile, VMRef: vm.VMRef, VMUUID: r.in.VMUUID, BackupID: r.in.BackupID,
	}).Get(actx, &snap)
	if err == nil {
		r.snapshot = snap.SnapshotRef
		r.progress.Snapshot = snap.SnapshotRef
		if ctx.Err() != nil {
			// Canceled while vCenter took it: it exists now, and the way
			// out removes it by its moref.
			return snap, temporal.NewCanceledError()
		}
	}
	return snap, err
}

// transferDisks backs up every planned disk, MaxParallelDisks at a time.
// One failed disk fails the backup: the others are canceled rather than
// copied for nothing. With checkSpace, every disk's changed areas are
// queried first, then the repository's space is checked against their
// exact changed bytes, and only then are the disks copied; without it
// (runs recorded before the space check), each disk is queried and copied
// in one go.
func (r *backupRun) transferDisks(ctx workflow.Context, plans []diskPlan, snap activities.CreateSnapshotResult, checkSpace bool) ([]DiskResult, []activities.CommitDisk, error) {
	r.setPhase(ctx, PhaseTransferring)
	snapDisks := map[int32]activities.SnapshotDisk{}
	for _, d := range snap.Disks {
		snapDisks[d.Key] = d
	}
	results := make([]DiskResult, len(plans))
	commits := make([]activities.CommitDisk, len(plans))
	if !checkSpace {
		err := r.eachDisk(ctx, plans, snapDisks, snap.SnapshotRef, func(gctx workflow.Context, i int, sd activities.SnapshotDisk) error {
			res, c, err := r.backupDisk(gctx, &plans[i], sd, snap.SnapshotRef)
			results[i], commits[i] = res, c
			return err
		})
		if err != nil {
			return nil, nil, err
		}
		return results, commits, nil
	}
	areas := make([]activities.ChangedAreasResult, len(plans))
	err := r.eachDisk(ctx, plans, snapDisks, snap.SnapshotRef, func(gctx workflow.Context, i int, _ activities.SnapshotDisk) error {
		a, err := r.queryDisk(gctx, &plans[i], snap.SnapshotRef)
		if err == nil {
			areas[i] = a
			r.setDisk(plans[i].Key, DiskWaiting, 0, a.ChangedBytes)
		}
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	exact := make([]activities.SpaceDisk, len(plans))
	for i, p := range plans {
		exact[i] = activities.SpaceDisk{Key: p.Key, Mode: p.Mode, Bytes: areas[i].ChangedBytes, Basis: activities.SpaceChanged}
	}
	if err := r.checkSpace(ctx, exact, true); err != nil {
		return nil, nil, err
	}
	if r.oneTransfer {
		return r.copyDisks(ctx, plans, snapDisks, snap.SnapshotRef, areas)
	}
	err = r.eachDisk(ctx, plans, snapDisks, snap.SnapshotRef, func(gctx workflow.Context, i int, sd activities.SnapshotDisk) error {
		res, c, err := r.copyDisk(gctx, &plans[i], sd, snap.SnapshotRef, areas[i])
		results[i], commits[i] = res, c
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return results, commits, nil
}

// eachDisk runs fn for every planned disk with its disk of the snapshot,
// MaxParallelDisks at a time. The first failure cancels the others and is
// returned, the disk named.
func (r *backupRun) eachDisk(ctx workflow.Context, plans []diskPlan, snapDisks map[int32]activities.SnapshotDisk, snapRef string,
	fn func(gctx workflow.Context, i int, sd activities.SnapshotDisk) error) error {
	tctx, cancelDisks := workflow.WithCancel(ctx)
	defer cancelDisks()
	sem := workflow.NewSemaphore(tctx, int64(r.in.MaxParallelDisks))
	var firstErr error
	fail := func(err error) {
		if firstErr == nil {
			firstErr = err
			cancelDisks()
		}
	}
	wg := workflow.NewWaitGroup(ctx)
	for i := range plans {
		sd, ok := snapDisks[plans[i].Key]
		if !ok {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d is not in snapshot %s", plans[i].Key, snapRef), activities.ErrTypeInvalidInput, nil)
		}
		wg.Add(1)
		workflow.Go(tctx, func(gctx workflow.Context) {
			defer wg.Done()
			if err := sem.Acquire(gctx, 1); err != nil {
				r.setDisk(plans[i].Key, DiskCanceled, -1, -1)
				return
			}
			defer sem.Release(1)
			if gctx.Err() != nil {
				r.setDisk(plans[i].Key, DiskCanceled, -1, -1)
				return
			}
			if err := fn(gctx, i, sd); err != nil {
				r.setDisk(plans[i].Key, DiskFailed, -1, -1)
				fail(fmt.Errorf("disk %d: %w", plans[i].Key, err))
			}
		})
	}
	wg.Wait(ctx)
	if ctx.Err() != nil {
		return temporal.NewCanceledError()
	}
	return firstErr
}

// commit records the restore point: every disk's image and new change ID
// in one transaction.
func (r *backupRun) commit(ctx workflow.Context, commits []activities.CommitDisk) error {
	r.setPhase(ctx, PhaseCommitting)
	actx := ctx
	if r.uncancelable {
		// A cancel does not interrupt a commit that began: the backup then
		// ends committed (and says so), never canceled with a restore
		// point the catalog holds all the same.
		dctx, cancel := workflow.NewDisconnectedContext(ctx)
		defer cancel()
		actx = dctx
	}
	if err := step(actx, r.local, catalogActivity(), catalogActs.CommitRestorePoint,
		activities.CommitInput{BackupID: r.in.BackupID, Disks: commits}).Get(actx, nil); err != nil {
		return err
	}
	r.setPhase(ctx, PhaseCommitted)
	return nil
}

// backupDisk queries the disk's changed areas and transfers them.
func (r *backupRun) backupDisk(ctx workflow.Context, p *diskPlan, sd activities.SnapshotDisk, snapRef string) (DiskResult, activities.CommitDisk, error) {
	areas, err := r.queryDisk(ctx, p, snapRef)
	if err != nil {
		return DiskResult{}, activities.CommitDisk{}, err
	}
	return r.copyDisk(ctx, p, sd, snapRef, areas)
}

// queryDisk asks CBT for the disk's changed areas since its previous
// restore point (all its allocated areas for a full). A refused change ID
// is a CBT reset: the disk becomes a full backup (p changes).
func (r *backupRun) queryDisk(ctx workflow.Context, p *diskPlan, snapRef string) (activities.ChangedAreasResult, error) {
	in := r.in
	query := func(changeID string) (activities.ChangedAreasResult, error) {
		var areas activities.ChangedAreasResult
		err := step(ctx, r.local, queryActivity(), vsphereActs.ChangedAreas, activities.ChangedAreasInput{
			Profile: in.Profile, VMRef: r.vmRef, SnapshotRef: snapRef, BackupID: in.BackupID,
			Key: p.Key, Capacity: p.Capacity, ChangeID: changeID,
		}).Get(ctx, &areas)
		return areas, err
	}
	r.setDisk(p.Key, DiskQuerying, 0, 0)
	from := "*"
	if p.Mode == ModeIncremental {
		from = p.FromChangeID
	}
	areas, err := query(from)
	if err != nil && p.Mode == ModeIncremental && isType(err, activities.ErrTypeCBTReset) {
		// CBT was reset since the last backup: the stored change ID means
		// nothing any more, so this disk starts a new chain.
		warning := fmt.Sprintf("disk %d: changed block tracking was reset (%s); full backup of this disk", p.Key, rootMessage(err))
		r.log.Warn(warning, "backup", in.BackupID)
		r.warnings = append(r.warnings, warning)
		*p = diskPlan{Key: p.Key, Capacity: p.Capacity, Mode: ModeFull, Reason: "changed block tracking was reset"}
		r.setMode(p.Key, ModeFull)
		areas, err = query("*")
	}
	return areas, err
}

// copyDisks transfers every disk's changed areas (queryDisk) into its
// image in one activity (changeOneTransfer), MaxParallelDisks at a time.
func (r *backupRun) copyDisks(ctx workflow.Context, plans []diskPlan, snapDisks map[int32]activities.SnapshotDisk, snapRef string,
	areas []activities.ChangedAreasResult) ([]DiskResult, []activities.CommitDisk, error) {
	in := activities.TransferDisksInput{MaxParallel: r.in.MaxParallelDisks}
	for i := range plans {
		sd, ok := snapDisks[plans[i].Key]
		if !ok {
			return nil, nil, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d is not in snapshot %s", plans[i].Key, snapRef), activities.ErrTypeInvalidInput, nil)
		}
		in.Disks = append(in.Disks, r.transferInput(&plans[i], sd, snapRef, areas[i]))
	}
	for i := range plans {
		r.setDisk(plans[i].Key, DiskTransferring, 0, areas[i].ChangedBytes)
	}
	var tr activities.TransferDisksResult
	err := workflow.ExecuteActivity(withTransfersActivity(ctx, len(in.Disks), in.MaxParallel), transferActs.TransferDisks, in).Get(ctx, &tr)
	if err == nil && len(tr.Disks) != len(plans) {
		err = temporal.NewNonRetryableApplicationError(fmt.Sprintf("TransferDisks answered for %d disks of %d", len(tr.Disks), len(plans)), activities.ErrTypeInvalidInput, nil)
	}
	// Canceled: the backup ends canceled, even when the transfer ended
	// before it saw the cancel (as eachDisk does).
	if ctx.Err() != nil {
		for _, p := range plans {
			r.setDisk(p.Key, DiskCanceled, -1, -1)
		}
		return nil, nil, temporal.NewCanceledError()
	}
	if err != nil {
		for _, p := range plans {
			r.setDisk(p.Key, DiskFailed, -1, -1)
		}
		return nil, nil, err
	}
	results := make([]DiskResult, len(plans))
	commits := make([]activities.CommitDisk, len(plans))
	for i := range plans {
		results[i], commits[i] = r.transferred(&plans[i], snapDisks[plans[i].Key], areas[i], tr.Disks[i])
	}
	return results, commits, nil
}

// transferInput is the transfer of the disk's changed areas (queryDisk)
// into its image.
func (r *backupRun) transferInput(p *diskPlan, sd activities.SnapshotDisk, snapRef string, areas activities.ChangedAreasResult) activities.TransferDiskInput {
	in := r.in
	return activities.TransferDiskInput{
		Profile: in.Profile, VMRef: r.vmRef, VMUUID: in.VMUUID, SnapshotRef: snapRef, BackupID: in.BackupID,
		Key: p.Key, Capacity: p.Capacity, FileName: sd.FileName, Mode: p.Mode, BackingPath: p.BackingPath,
		ExtentsFile: areas.ExtentsFile, ChangedBytes: areas.ChangedBytes,
	}
}

// copyDisk transfers the disk's changed areas (queryDisk) into its image.
func (r *backupRun) copyDisk(ctx workflow.Context, p *diskPlan, sd activities.SnapshotDisk, snapRef string, areas activities.ChangedAreasResult) (DiskResult, activities.CommitDisk, error) {
	r.setDisk(p.Key, DiskTransferring, 0, areas.ChangedBytes)
	var tr activities.TransferDiskResult
	if err := workflow.ExecuteActivity(withTransferActivity(ctx), transferActs.TransferDisk, r.transferInput(p, sd, snapRef, areas)).Get(ctx, &tr); err != nil {
		return DiskResult{}, activities.CommitDisk{}, err
	}
	res, c := r.transferred(p, sd, areas, tr)
	return res, c, nil
}

// transferred is the result and the commit of a disk whose transfer
// ended with tr.
func (r *backupRun) transferred(p *diskPlan, sd activities.SnapshotDisk, areas activities.ChangedAreasResult, tr activities.TransferDiskResult) (DiskResult, activities.CommitDisk) {
	in := r.in
	r.setDisk(p.Key, DiskDone, areas.ChangedBytes, areas.ChangedBytes)
	note := ""
	if p.Mode == ModeFull && in.Mode != ModeFull {
		note = p.Reason
	}
	res := DiskResult{Key: p.Key, Mode: p.Mode, ChangedBytes: areas.ChangedBytes, WrittenBytes: tr.WrittenBytes,
		SizeBytes: tr.SizeBytes, AllocatedBytes: tr.AllocatedBytes, Path: tr.Path, ChangeID: sd.ChangeID, Seconds: tr.Seconds, Note: note,
		Changed: units.Bytes(areas.ChangedBytes), Written: units.Bytes(tr.WrittenBytes), Size: units.Bytes(tr.SizeBytes), Duration: units.Seconds(tr.Seconds)}
	if tr.AllocatedBytes > 0 {
		res.Allocated = units.Bytes(tr.AllocatedBytes)
	}
	c := activities.CommitDisk{Key: p.Key, Capacity: p.Capacity, Mode: p.Mode, Path: tr.Path,
		BackingBackupID: p.BackingBackupID, ChangeIDFrom: p.FromChangeID, ChangeID: sd.ChangeID,
		ChangedBytes: areas.ChangedBytes, WrittenBytes: tr.WrittenBytes, SizeBytes: tr.SizeBytes, SHA256: tr.SHA256, Note: note, Stamp: tr.Stamp,
		DigestSHA256: tr.DigestSHA256, DigestSize: tr.DigestSize}
	return res, c
}

// removeSnapshot runs on every exit path, in a disconnected context so a
// canceled backup still cleans up. A failure is logged: the sweeper removes
// what is left.
func (r *backupRun) removeSnapshot(ctx workflow.Context, snap *activities.CreateSnapshotResult) {
	if r.vmRef == "" {
		return
	}
	dctx, cancel := workflow.NewDisconnectedContext(ctx)
	defer cancel()
	committed := r.progress.Phase == PhaseCommitted
	if committed {
		r.setPhase(ctx, PhaseRemovingSnapshot)
	}
	err := step(dctx, r.local, cleanupActivity(), vsphereActs.RemoveSnapshot, activities.RemoveSnapshotInput{
		Profile: r.in.Profile, VMRef: r.vmRef, SnapshotRef: snap.SnapshotRef,
		SnapshotName: SnapshotName(r.in.BackupID),
	}).Get(dctx, nil)
	if committed {
		r.setPhase(ctx, PhaseCompleted)
	}
	if err != nil {
		r.log.Error("removing the snapshot failed; the sweeper will remove it", "backup", r.in.BackupID, "error", err)
	}
}

func (r *backupRun) setDisk(key int32, phase DiskPhase, done, total int64) {
	for i := range r.progress.Disks {
		if d := &r.progress.Disks[i]; d.Key == key {
			d.Phase = phase
			if done >= 0 {
				d.Done = done
			}
			if total >= 0 {
				d.Total = total
			}
		}
	}
}

func (r *backupRun) setPhase(ctx workflow.Context, phase Phase) {
	r.progress.Phase, r.progress.PhaseSince = phase, workflow.Now(ctx)
}

// answer is the progress query's answer: a copy, its percents filled in.
func (p Progress) answer() Progress {
	p.Disks = append([]DiskProgress(nil), p.Disks...)
	for i := range p.Disks {
		d := &p.Disks[i]
		d.Percent = percent(d.Done, d.Total)
		if d.Phase == DiskDone {
			d.Percent = 100
		}
	}
	return p
}

// upsertMode sets CbtflowMode to the mode the backup runs (full when any
// disk's is), once the plan says it and again when a disk turned full
// (a CBT reset).
func (r *backupRun) upsertMode(ctx workflow.Context, plans []diskPlan) {
	mode := ModeIncremental
	for _, p := range plans {
		if p.Mode == ModeFull {
			mode = ModeFull
		}
	}
	if mode == r.modeShown {
		return
	}
	r.modeShown = mode
	_ = r.upsertKeywords(ctx, keyword{SearchMode, mode})
}

// keyword is a keyword search attribute's value.
type keyword struct {
	key   temporal.SearchAttributeKeyKeyword
	value string
}

// upsertKeywords sets search attributes: all of them, in a run recorded
// before the short steps ran as local activities (as it did); else only
// those whose value changes (Backup starts BackupVM with its VM, profile,
// mode and backup ID already set), and nothing when none does.
func (r *backupRun) upsertKeywords(ctx workflow.Context, kws ...keyword) error {
	have := workflow.GetTypedSearchAttributes(ctx)
	var set []temporal.SearchAttributeUpdate
	for _, kw := range kws {
		if v, ok := have.GetKeyword(kw.key); r.local && ok && v == kw.value {
			continue
		}
		set = append(set, kw.key.ValueSet(kw.value))
	}
	if len(set) == 0 {
		return nil
	}
	return workflow.UpsertTypedSearchAttributes(ctx, set...)
}

func (r *backupRun) setMode(key int32, mode string) {
	for i := range r.progress.Disks {
		if r.progress.Disks[i].Key == key {
			r.progress.Disks[i].Mode = mode
		}
	}
}

// SnapshotName is the name of a backup's snapshot; the sweeper removes
// snapshots with this prefix that no running backup owns.
func SnapshotName(backupID string) string { return activities.SnapshotPrefix + backupID }

// newBackupID derives a backup ID from the workflow's start time and run
// ID: deterministic on replay, sortable, and unique per run. Run IDs are
// UUIDv7, whose leading digits are a timestamp: the random tail is what
// tells two runs of the same second apart.
func newBackupID(ctx workflow.Context) string {
	info := workflow.GetInfo(ctx)
	run := strings.ReplaceAll(info.WorkflowExecution.RunID, "-", "")
	if len(run) > 12 {
		run = run[len(run)-12:]
	}
	return info.WorkflowStartTime.UTC().Format("20060102T150405Z") + "-" + run
}

func checkMode(mode string) error {
	switch mode {
	case ModeAuto, ModeFull, ModeIncremental:
		return nil
	}
	return invalid(fmt.Sprintf("mode %q is not auto, full or incremental", mode))
}

func invalid(msg string) error {
	return temporal.NewNonRetryableApplicationError(msg, activities.ErrTypeInvalidInput, nil)
}

// isType reports whether err carries an ApplicationError of type t.
func isType(err error, t string) bool {
	var app *temporal.ApplicationError
	return errors.As(err, &app) && app.Type() == t
}

// rootMessage is the message of the innermost ApplicationError.
func rootMessage(err error) string {
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return app.Message()
	}
	return err.Error()
}

// since reports whether a run has a change of its commands: a run with
// the local steps (changeLocalSteps) has every earlier change and asks no
// more (each GetVersion is a command, a marker, and another, an upsert of
// TemporalChangeVersion); a run without asks GetVersion, as it did.
func since(ctx workflow.Context, local bool, changeID string, version workflow.Version) bool {
	return local || workflow.GetVersion(ctx, changeID, workflow.DefaultVersion, version) >= version
}

// step runs one step of a backup: an activity with opts, or, when local
// (changeLocalSteps), a local activity with the same time limits and
// retries, and so the same errors: an attempt's error and whether it is
// retried are the activity's own (its non-retryable types), whichever way
// it runs.
//
// Only steps that can run again from the start do (each is read-only or
// idempotent: a local activity whose workflow task is lost, with the
// worker that ran it, runs again in the next one) and none whose
// heartbeats say anything: a local activity records none. Their
// heartbeats, when they run as activities, only tell a dead worker from a
// slow step; a local activity needs none for that: the workflow task that
// runs it times out (the SDK keeps a task open while a local activity
// runs longer, and its workflow task timeout, 10 s, is shorter than their
// heartbeat timeouts), and the next task runs it again. A cancel reaches a
// local activity through its context, as a heartbeat's answer reaches an
// activity; one that comes while the workflow task runs them is seen when
// they end.
func step(ctx workflow.Context, local bool, opts workflow.ActivityOptions, activity, in any) workflow.Future {
	if !local {
		return workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, opts), activity, in)
	}
	return workflow.ExecuteLocalActivity(workflow.WithLocalActivityOptions(ctx, workflow.LocalActivityOptions{
		ScheduleToCloseTimeout: opts.ScheduleToCloseTimeout,
		StartToCloseTimeout:    opts.StartToCloseTimeout,
		RetryPolicy:            opts.RetryPolicy,
	}), activity, in)
}

// Activity options. Every activity has a total time limit
// (ScheduleToClose), so retries are bounded; long ones heartbeat, so a dead
// worker is noticed in seconds. A backup's short steps run with the same
// time limits and retries as local activities (step).
//
// The first contact with vCenter (ResolveVM, PrepareVM) comes before
// anything exists to clean up, and an operator waits for its answer: it
// gives up after FirstContactAttempts attempts, about 30 s (retries after
// 1, 2, 4, 8 and 16 s), with the last attempt's error (an unreachable
// vCenter: activities.ErrTypeUnreachable). The next run tries again.
// Errors no retry can fix (unknown VM or profile, refused login) fail at
// once. Each attempt's connect is bounded by the vsphere package
// (DefaultDialTimeout, DefaultConnectTimeout), so a vCenter that does not
// answer ends the same way: in about a minute when nothing answers the
// connection, about two when a server takes it and never replies. They
// heartbeat, so a dead worker is noticed within 30 s here too.
func shortActivity() workflow.ActivityOptions {
	return workflow.ActivityOptions{
		StartToCloseTimeout:    time.Minute,
		ScheduleToCloseTimeout: 10 * time.Minute,
		HeartbeatTimeout:       30 * time.Second, // they heartbeat every 10 s
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second,
			MaximumAttempts: FirstContactAttempts},
	}
}

// launchActivity: a start of a workflow (Backup's detached BackupVM), a
// request to the Temporal server the worker polls, retried while it cannot
// be reached for a few minutes.
func launchActivity() workflow.ActivityOptions {
	return workflow.ActivityOptions{
		StartToCloseTimeout:    30 * time.Second,
		ScheduleToCloseTimeout: 5 * time.Minute,
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second},
	}
}

// CatalogRetryLimit bounds the retries of a catalog step: a database
// that is down longer fails the backup (its snapshot is removed, and the
// failure path or the sweeper removes its partial images).
const CatalogRetryLimit = 10 * time.Minute

// FirstContactAttempts bounds the attempts of a backup's first vCenter
// calls (see shortActivity).
const FirstContactAttempts = 6

// Catalog steps are short transactions: a worker that dies in one is
// replaced after StartToCloseTimeout; they are idempotent, so an attempt
// that overlaps a slow one is harmless. They retry only what can heal (a
// database that is down or restarting), for CatalogRetryLimit; what
// cannot (a database without cbtflow's tables, a chain that does not
// link) fails at once.
func catalogActivity() workflow.ActivityOptions {
	return workflow.ActivityOptions{
		StartToCloseTimeout:    20 * time.Second,
		ScheduleToCloseTimeout: CatalogRetryLimit,
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second},
	}
}

// BeginBackup is a catalog step that also proves every chain unchanged
// before an overlay builds on it: cheap (a stat and a header read per
// image), except that an image whose file stamp changed (a copied
// repository) is re-read in full. It heartbeats, so a dead worker is
// noticed in 30 s however long a re-read takes (as a local activity, in
// the workflow task's timeout: see step).
func beginActivity() workflow.ActivityOptions {
	return workflow.ActivityOptions{
		StartToCloseTimeout:    time.Hour,
		ScheduleToCloseTimeout: time.Hour + CatalogRetryLimit,
		HeartbeatTimeout:       30 * time.Second, // it heartbeats every 10 s
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second},
	}
}

// The space check is a statfs: short; it retries only what can heal (a
// repository mount that is back), for CatalogRetryLimit. Too little room
// fails at once (activities.ErrTypeRepositoryFull).
func spaceActivity() workflow.ActivityOptions {
	return workflow.ActivityOptions{
		StartToCloseTimeout:    time.Minute,
		ScheduleToCloseTimeout: CatalogRetryLimit,
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second},
	}
}

func queryActivity() workflow.ActivityOptions {
	return workflow.ActivityOptions{
		StartToCloseTimeout:    30 * time.Minute,
		ScheduleToCloseTimeout: 2 * time.Hour,
		HeartbeatTimeout:       30 * time.Second, // it heartbeats every 10 s
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second},
	}
}

func cleanupActivity() workflow.ActivityOptions {
	return workflow.ActivityOptions{
		StartToCloseTimeout:    10 * time.Minute,
		ScheduleToCloseTimeout: time.Hour,
		HeartbeatTimeout:       30 * time.Second, // the activities heartbeat every 10 s
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second},
	}
}

func withSnapshotActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout:    30 * time.Minute,
		ScheduleToCloseTimeout: time.Hour,
		HeartbeatTimeout:       30 * time.Second, // it heartbeats every 10 s
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: 2 * time.Second, MaximumInterval: time.Minute},
	})
}

// A transfer resumes from its last flushed resume point, so retries are
// cheap; but the copier already retries each failed request, so an error
// that outlives 8 attempts (a disk that cannot be read) is not going away,
// and the snapshot should not stay on the VM for long: about 3 minutes.
func withTransferActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, transferActivity())
}

func transferActivity() workflow.ActivityOptions {
	return workflow.ActivityOptions{
		StartToCloseTimeout:    24 * time.Hour,
		ScheduleToCloseTimeout: 48 * time.Hour,
		HeartbeatTimeout:       15 * time.Second,
		WaitForCancellation:    true,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: 2 * time.Second, MaximumInterval: 30 * time.Second,
			MaximumAttempts: 8},
	}
}

// withTransfersActivity: TransferDisks of n disks, maxParallel at a time,
// with the limits TransferDisk has for one disk, for each round of
// maxParallel disks, and its attempts for each disk: errors of different
// disks, each costing an attempt (a retry keeps the disks done), do not
// use up the budget of one; a disk that keeps failing is tried in every
// attempt, up to 8 per disk of the backup, before the backup fails.
func withTransfersActivity(ctx workflow.Context, n, maxParallel int) workflow.Context {
	opts := transferActivity()
	rounds := time.Duration((n + max(maxParallel, 1) - 1) / max(maxParallel, 1))
	opts.StartToCloseTimeout *= max(rounds, 1)
	opts.ScheduleToCloseTimeout *= max(rounds, 1)
	policy := *opts.RetryPolicy
	policy.MaximumAttempts *= int32(max(n, 1))
	opts.RetryPolicy = &policy
	return workflow.WithActivityOptions(ctx, opts)
}

// The options of shortActivity, catalogActivity, queryActivity and
// cleanupActivity in a workflow context, for the steps that always run as
// activities (FailBackup, and those of the other workflows).
func withShortActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, shortActivity())
}

func withCatalogActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, catalogActivity())
}

func withQueryActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, queryActivity())
}

func withCleanupActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, cleanupActivity())
}
