package workflows

import (
	"fmt"
	"strings"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// RestoreInput is one restore of a disk as it was at a restore point into
// a file where the worker runs (`starter restore BACKUP_ID --disk KEY --to
// FILE`). Paths only: the workflow's input names no secret.
type RestoreInput struct {
	BackupID string `json:"backup_id"`
	DiskKey  int32  `json:"disk_key"`
	// To is an absolute path on the worker's machine: a file that does
	// not exist (or, with Force, a regular file to replace).
	To     string `json:"to"`
	Format string `json:"format,omitempty"` // raw (default, sparse) or qcow2
	Force  bool   `json:"force,omitempty"`
}

// RestoreResult is a completed restore.
type RestoreResult struct {
	BackupID string   `json:"backup_id"`
	VM       string   `json:"vm"`
	DiskKey  int32    `json:"disk_key"`
	To       string   `json:"to"`
	Format   string   `json:"format"`
	Chain    []string `json:"chain"` // the images read, top first
	Bytes    int64    `json:"bytes"` // the disk's size
	Seconds  float64  `json:"seconds"`
}

// RestorePhase is where a restore stands.
type RestorePhase string

// The phases of a restore. One that fails or is canceled stays in the
// phase it was in; its outcome is the workflow's.
const (
	RestoreStarting  RestorePhase = "starting"  // FindRestorePoint: the catalog's record of the point and disk
	RestoreVerifying RestorePhase = "verifying" // RestoreDisk: target checked; the chain's images read back against their SHA-256
	RestoreWriting   RestorePhase = "writing"   // RestoreDisk: the disk written into a temporary file beside the target
	RestoreCompleted RestorePhase = "completed" // the file is complete, synced and renamed into place
)

// RestoreProgress is the answer of a Restore's progress query
// (QueryProgress). The workflow knows the phase; the running RestoreDisk's
// figures (bytes done of the phase's total, rate) are its heartbeat
// details, which the worker adds (Live), as for a backup's transfers.
type RestoreProgress struct {
	BackupID   string       `json:"backup_id"`
	VM         string       `json:"vm,omitempty"`
	DiskKey    int32        `json:"disk_key"`
	To         string       `json:"to"`
	Format     string       `json:"format"`
	Capacity   int64        `json:"capacity,omitempty"` // the disk's size, once looked up
	Phase      RestorePhase `json:"phase"`
	PhaseSince time.Time    `json:"phase_since,omitzero"`
	// Done of Total bytes of the phase: of the chain's images read back
	// (verifying), of the disk written (writing); Percent is Done of
	// Total, Rate the recent bytes per second and ETASeconds the time
	// left at that rate (0 when unknown).
	Done       int64   `json:"done"`
	Total      int64   `json:"total"`
	Percent    float64 `json:"percent"`
	Rate       float64 `json:"rate,omitempty"`
	ETASeconds float64 `json:"eta_seconds,omitempty"`
	// Live says the running RestoreDisk's heartbeat is in the figures.
	Live bool `json:"live,omitempty"`
}

// Running reports whether RestoreDisk runs (its heartbeat has figures).
func (p RestoreProgress) Running() bool {
	return p.Phase == RestoreVerifying || p.Phase == RestoreWriting
}

// ApplyRestore adds what the running RestoreDisk's latest heartbeat says.
func (p *RestoreProgress) ApplyRestore(b activities.RestoreProgress) {
	if !p.Running() {
		return
	}
	switch b.Stage {
	case activities.RestoreStageVerifying:
		p.Phase = RestoreVerifying
	case activities.RestoreStageWriting:
		p.Phase = RestoreWriting
	default:
		return
	}
	p.Live = true
	p.Done, p.Total, p.Rate, p.ETASeconds = b.Done, b.Total, b.Rate, 0
	if left := b.Total - b.Done; b.Rate > 0 && left > 0 {
		p.ETASeconds = float64(left) / b.Rate
	}
	p.Percent = percent(p.Done, p.Total)
}

// restoreActs is how Restore calls its activities.
var restoreActs *activities.Restorer

// Restore writes one disk as it was at a restore point into a file on
// the machine of the worker that runs it (the worker that owns the
// repository), so the operator's starter needs only Temporal. It looks
// the point up in the catalog (FindRestorePoint), then RestoreDisk
// refuses a bad target by name, checks the chain against the catalog
// and writes the file (a temporary file, synced and renamed). Search
// attributes: CbtflowBackupID at once, CbtflowVM once looked up. A
// cancel stops RestoreDisk at its next heartbeat and waits for it to
// remove its temporary file.
func Restore(ctx workflow.Context, in RestoreInput) (*RestoreResult, error) {
	if in.Format == "" {
		in.Format = "raw"
	}
	prog := RestoreProgress{BackupID: in.BackupID, DiskKey: in.DiskKey, To: in.To, Format: in.Format,
		Phase: RestoreStarting, PhaseSince: workflow.Now(ctx)}
	if err := workflow.SetQueryHandler(ctx, QueryProgress, func() (RestoreProgress, error) { return prog.answer(), nil }); err != nil {
		return nil, err
	}
	if err := checkRestore(in); err != nil {
		return nil, err
	}
	_ = workflow.UpsertTypedSearchAttributes(ctx, SearchBackupID.ValueSet(in.BackupID))

	point, err := findRestorePoint(ctx, in.BackupID, in.DiskKey)
	if err != nil {
		return nil, err
	}
	prog.VM, prog.Capacity = point.VM, point.Capacity

	prog.Phase, prog.PhaseSince = RestoreVerifying, workflow.Now(ctx)
	var res activities.RestoreDiskResult
	if err := workflow.ExecuteActivity(withRestoreActivity(ctx), restoreActs.RestoreDisk, activities.RestoreDiskInput{
		BackupID: in.BackupID, DiskKey: in.DiskKey, To: in.To, Format: in.Format, Force: in.Force,
	}).Get(ctx, &res); err != nil {
		return nil, err
	}
	prog.Phase, prog.PhaseSince = RestoreCompleted, workflow.Now(ctx)
	prog.Done, prog.Total = res.Bytes, res.Bytes
	return &RestoreResult{BackupID: in.BackupID, VM: point.VM, DiskKey: in.DiskKey, To: res.To, Format: in.Format,
		Chain: res.Chain, Bytes: res.Bytes, Seconds: res.Seconds}, nil
}

// findRestorePoint looks a disk of a restore point up in the catalog
// (FindRestorePoint) and, once the VM is known, sets CbtflowVM: the first
// steps of a Restore and of an Export.
func findRestorePoint(ctx workflow.Context, backupID string, key int32) (activities.FindRestorePointResult, error) {
	var point activities.FindRestorePointResult
	if err := workflow.ExecuteActivity(withCatalogActivity(ctx), restoreActs.FindRestorePoint,
		activities.FindRestorePointInput{BackupID: backupID, DiskKey: key}).Get(ctx, &point); err != nil {
		return point, err
	}
	if point.VM != "" {
		_ = workflow.UpsertTypedSearchAttributes(ctx, SearchVM.ValueSet(point.VM))
	}
	return point, nil
}

// checkRestore refuses input that makes no restore, naming what is wrong.
func checkRestore(in RestoreInput) error {
	refuse := func(msg string) error {
		return temporal.NewNonRetryableApplicationError(msg, activities.ErrTypeRestoreRefused, nil)
	}
	switch {
	case strings.TrimSpace(in.BackupID) == "":
		return invalid("restore: no backup ID given")
	case in.To == "":
		return refuse("restore: no output file given")
	case !strings.HasPrefix(in.To, "/"):
		return refuse(fmt.Sprintf("restore: %q is not an absolute path on the worker's machine", in.To))
	case in.Format != "raw" && in.Format != "qcow2":
		return refuse(fmt.Sprintf("restore: format %q is not raw or qcow2", in.Format))
	}
	return nil
}

// answer is the query's answer, its percent filled in.
func (p RestoreProgress) answer() RestoreProgress {
	p.Percent = percent(p.Done, p.Total)
	if p.Phase == RestoreCompleted {
		p.Percent = 100
	}
	return p
}

// RestoreDisk checks the chain (a read of every image) and writes the
// disk: long, so it heartbeats every second and a dead worker is noticed
// in 30 s. Every attempt starts afresh; what no retry mends (a refused
// target, an unknown or damaged point) fails at once, and anything else
// (a catalog that is down, a qemu-img that failed) is tried 3 times. A
// cancel waits for the activity to remove its temporary file.
func withRestoreActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout:    24 * time.Hour,
		ScheduleToCloseTimeout: 48 * time.Hour,
		HeartbeatTimeout:       30 * time.Second,
		WaitForCancellation:    true,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: 2 * time.Second, MaximumInterval: 30 * time.Second,
			MaximumAttempts: 3},
	})
}
