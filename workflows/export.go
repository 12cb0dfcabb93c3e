package workflows

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// ExportInput is one export of a disk as it was at a restore point, read
// only over NBD (instant access, `starter export`).
type ExportInput struct {
	BackupID string `json:"backup_id"`
	DiskKey  int32  `json:"disk_key"`
	// Listen is host:port on the worker's machine for qemu-nbd; "" is
	// 127.0.0.1 on a free port (port 0: a free port on host).
	Listen string `json:"listen,omitempty"`
}

// ExportWorkflowID is the workflow ID of the export of one disk of a
// restore point: one export of it at a time.
func ExportWorkflowID(backupID string, key int32) string {
	return "export/" + backupID + "/" + strconv.Itoa(int(key))
}

// ExportResult is never returned: an export runs until it is canceled
// (the workflow then ends canceled) or fails.
type ExportResult struct {
	BackupID string `json:"backup_id"`
	DiskKey  int32  `json:"disk_key"`
}

// ExportPhase is where an export stands.
type ExportPhase string

// The phases of an export. The workflow knows starting and exporting;
// while ServeExport runs, its heartbeat says checking, waiting or
// serving (Live).
const (
	ExportStarting  ExportPhase = "starting"  // FindRestorePoint: the catalog's record of the point and disk
	ExportExporting ExportPhase = "exporting" // ServeExport scheduled or running, no heartbeat seen yet
	ExportChecking  ExportPhase = activities.ExportStageChecking
	ExportWaiting   ExportPhase = activities.ExportStageWaiting
	ExportServing   ExportPhase = activities.ExportStageServing
)

// ExportProgress is the answer of an Export's progress query
// (QueryProgress): what the workflow knows, and the running ServeExport's
// latest heartbeat (URI, address, images, since), which the worker adds
// (Live), as for a restore's figures.
type ExportProgress struct {
	BackupID   string      `json:"backup_id"`
	VM         string      `json:"vm,omitempty"`
	DiskKey    int32       `json:"disk_key"`
	Listen     string      `json:"listen,omitempty"`
	Capacity   int64       `json:"capacity,omitempty"`
	Phase      ExportPhase `json:"phase"`
	PhaseSince time.Time   `json:"phase_since,omitzero"`
	// URI is the NBD URI to read the disk from (nbd://HOST:PORT), while
	// serving; Address is the host:port qemu-nbd listens on, Images the
	// chain it reads (top first, on the worker's machine), Since when it
	// began serving.
	URI     string    `json:"uri,omitempty"`
	Address string    `json:"address,omitempty"`
	Images  []string  `json:"images,omitempty"`
	Since   time.Time `json:"since,omitzero"`
	// Note says why it waits (a prune's merge of an image of the chain).
	Note string `json:"note,omitempty"`
	// Live says the running ServeExport's heartbeat is in the answer.
	Live bool `json:"live,omitempty"`
}

// Running reports whether ServeExport is scheduled or runs.
func (p ExportProgress) Running() bool { return p.Phase == ExportExporting }

// ApplyExport adds what the running ServeExport's latest heartbeat says.
func (p *ExportProgress) ApplyExport(b activities.ExportProgress) {
	if !p.Running() || b.Stage == "" {
		return
	}
	p.Phase, p.Live = ExportPhase(b.Stage), true
	p.URI, p.Address, p.Images, p.Since, p.Note = b.URI, b.Address, b.Images, b.Since, b.Note
}

// Export serves one disk of a restore point read-only over NBD from the
// worker that owns the repository: the chain as it is, no copy, until
// the workflow is canceled (`starter export stop`, or Ctrl-C of the
// starter that started it). It looks the point up (FindRestorePoint),
// then ServeExport takes a lease in the catalog that keeps prunes off the
// chain, checks the images cheaply and runs qemu-nbd, heartbeating the
// URI, which the progress query answers. Search attributes:
// CbtflowBackupID at once, CbtflowVM once looked up. A cancel waits for
// ServeExport to stop qemu-nbd and delete the lease.
func Export(ctx workflow.Context, in ExportInput) (*ExportResult, error) {
	prog := ExportProgress{BackupID: in.BackupID, DiskKey: in.DiskKey, Listen: in.Listen,
		Phase: ExportStarting, PhaseSince: workflow.Now(ctx)}
	if err := workflow.SetQueryHandler(ctx, QueryProgress, func() (ExportProgress, error) { return prog, nil }); err != nil {
		return nil, err
	}
	if err := checkExport(in); err != nil {
		return nil, err
	}
	_ = workflow.UpsertTypedSearchAttributes(ctx, SearchBackupID.ValueSet(in.BackupID))

	point, err := findRestorePoint(ctx, in.BackupID, in.DiskKey)
	if err != nil {
		return nil, err
	}
	prog.VM, prog.Capacity = point.VM, point.Capacity

	prog.Phase, prog.PhaseSince = ExportExporting, workflow.Now(ctx)
	var res activities.ServeExportResult
	err = workflow.ExecuteActivity(withExportActivity(ctx), restoreActs.ServeExport, activities.ServeExportInput{
		ExportID: workflow.GetInfo(ctx).WorkflowExecution.ID, BackupID: in.BackupID, DiskKey: in.DiskKey, Listen: in.Listen,
	}).Get(ctx, &res)
	if err != nil {
		return nil, err
	}
	return &ExportResult{BackupID: in.BackupID, DiskKey: in.DiskKey}, nil
}

// checkExport refuses input that makes no export, naming what is wrong.
func checkExport(in ExportInput) error {
	if strings.TrimSpace(in.BackupID) == "" {
		return invalid("export: no backup ID given")
	}
	if in.Listen != "" {
		_, port, err := net.SplitHostPort(in.Listen)
		if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 0 || n > 65535 {
			return invalid(fmt.Sprintf("export: listen address %q is not HOST:PORT on the worker's machine", in.Listen))
		}
	}
	return nil
}

// exportAttemptLimit bounds one ServeExport attempt (Temporal needs a
// bound); an attempt that reaches it is retried like a failed one, on the
// same address, so an export runs until it is stopped (`starter export
// stop`) or its retries are spent.
const exportAttemptLimit = 30 * 24 * time.Hour

// withExportActivity: ServeExport runs until canceled, heartbeating
// every second, so a dead worker is noticed in 30 s and the export
// comes back on a retry (on the same address when its port was chosen by
// the worker). Errors a retry cannot mend (an unknown point, a damaged
// chain, a bad address) end it at once; others are retried, 1 s
// doubling to 30 s, 20 times. A cancel waits for qemu-nbd to stop and
// the lease to go.
func withExportActivity(ctx workflow.Context) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout: exportAttemptLimit,
		HeartbeatTimeout:    30 * time.Second,
		WaitForCancellation: true,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 30 * time.Second,
			MaximumAttempts: 20},
	})
}
