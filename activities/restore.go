package activities

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/restore"
)

// Restorer holds the activities of a restore (the Restore workflow): the
// worker that owns the repository writes a disk as it was at a restore
// point into a file on its own machine, with internal/restore, the code
// `starter restore --local` runs in-process.
type Restorer struct {
	Catalog *catalog.Catalog
	Repo    *repository.Repository
}

// Types of the non-retryable errors of a restore.
const (
	// ErrTypeRestoreRefused: the target may not be written (an existing
	// file without force, a directory, a FIFO, a device, a missing
	// folder, a relative path) or the format is not raw or qcow2. The
	// message names the path and what it is.
	ErrTypeRestoreRefused = "RestoreRefused"
	// ErrTypeRestorePointDamaged: an image of the chain does not match
	// the catalog (size, SHA-256, backing chain), or the point is marked
	// damaged. The message names the image.
	ErrTypeRestorePointDamaged = "RestorePointDamaged"
)

// The stages of a RestoreDisk, in its heartbeat details.
const (
	RestoreStageVerifying = restore.StageVerifying // the chain's images read back against their SHA-256
	RestoreStageWriting   = restore.StageWriting   // qemu-img writes the disk into a temporary file beside the target
)

// FindRestorePointInput names one disk of a restore point.
type FindRestorePointInput struct {
	BackupID string `json:"backup_id"`
	DiskKey  int32  `json:"disk_key"`
}

// FindRestorePointResult is what the catalog records of it.
type FindRestorePointResult struct {
	BackupID string `json:"backup_id"`
	VM       string `json:"vm"`
	VMUUID   string `json:"vm_uuid"`
	DiskKey  int32  `json:"disk_key"`
	// Capacity is the disk's size in bytes.
	Capacity int64 `json:"capacity"`
}

// RestoreDiskInput is one restore of a disk into a file where the worker
// runs.
type RestoreDiskInput struct {
	BackupID string `json:"backup_id"`
	DiskKey  int32  `json:"disk_key"`
	// To is an absolute path on the worker's machine.
	To     string `json:"to"`
	Format string `json:"format,omitempty"` // raw (default) or qcow2
	// Force replaces an existing regular file at To.
	Force bool `json:"force,omitempty"`
}

// RestoreDiskResult describes the file written.
type RestoreDiskResult struct {
	To      string   `json:"to"`
	Chain   []string `json:"chain"` // images read, top first
	Bytes   int64    `json:"bytes"` // the disk's virtual size
	Seconds float64  `json:"seconds"`
}

// RestoreProgress is the heartbeat detail of RestoreDisk: where it stands
// (one of the RestoreStage* values), Done of Total bytes of that stage
// (the chain's images read back; the disk written) and the recent rate.
// The server keeps it for the pending activity, and the worker adds it
// to the Restore workflow's progress query.
type RestoreProgress struct {
	Stage string  `json:"stage"`
	Done  int64   `json:"done"`
	Total int64   `json:"total"`
	Rate  float64 `json:"rate,omitempty"`
}

// restoreBeat is how often RestoreDisk heartbeats whatever it is doing
// (the SDK sends at most one per second, see the worker's
// MaxHeartbeatThrottleInterval): a cancel request reaches it within
// about a second, also while it reads the catalog or holds at a fault
// point.
const restoreBeat = time.Second

// FindRestorePoint returns the catalog's record of a restore point's
// disk; an unknown or uncommitted backup, or a disk it does not have,
// fails non-retryably (ErrTypeNoRestorePoint), naming it.
func (a *Restorer) FindRestorePoint(ctx context.Context, in FindRestorePointInput) (*FindRestorePointResult, error) {
	b, err := a.Catalog.Get(ctx, in.BackupID)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore: backup %s does not exist", in.BackupID), ErrTypeNoRestorePoint, nil)
	}
	if err != nil {
		return nil, permanent(err)
	}
	if b.Status != catalog.StatusCommitted {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore: backup %s is %s, not a restore point", in.BackupID, b.Status), ErrTypeNoRestorePoint, nil)
	}
	for _, d := range b.Disks {
		if d.Key == in.DiskKey {
			return &FindRestorePointResult{BackupID: b.ID, VM: b.VMName, VMUUID: b.VMUUID, DiskKey: d.Key, Capacity: d.Capacity}, nil
		}
	}
	return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore: backup %s has no disk %d", in.BackupID, in.DiskKey), ErrTypeNoRestorePoint, nil)
}

// RestoreDisk writes one disk of a restore point into the file in.To on
// the worker's machine: the target is refused by name first (as
// restore.CheckTarget says), then every image of the chain is checked
// against the catalog and the disk is written into a temporary file in
// the target's folder, synced and renamed (restore.Disk). It heartbeats
// its progress (RestoreProgress). Canceled, it stops at its next
// heartbeat: qemu-img is killed and the temporary file removed, so no
// partial target exists. Every attempt starts afresh, so a retry after
// a dead worker is safe (an earlier attempt's temporary file, a hidden
// `.NAME.partial-*`, may stay beside the target then).
func (a *Restorer) RestoreDisk(ctx context.Context, in RestoreDiskInput) (*RestoreDiskResult, error) {
	start := time.Now()
	if !filepath.IsAbs(in.To) {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore: %q is not an absolute path on the worker's machine", in.To), ErrTypeRestoreRefused, nil)
	}
	o := restore.Options{BackupID: in.BackupID, DiskKey: in.DiskKey, Repository: a.Repo.Root(), To: in.To, Format: in.Format, Force: in.Force}
	if o.Format == "" {
		o.Format = "raw"
	}
	if _, err := restore.CheckTarget(o); err != nil {
		return nil, restoreError(err)
	}

	var mu sync.Mutex
	latest := RestoreProgress{Stage: RestoreStageVerifying}
	beat := func() {
		mu.Lock()
		p := latest
		mu.Unlock()
		activity.RecordHeartbeat(ctx, p)
	}
	defer heartbeatEvery(ctx, restoreBeat, func() any {
		mu.Lock()
		defer mu.Unlock()
		return latest
	})()
	beat()
	stage, meter, halfway := "", newRateMeter(), false
	o.Progress = func(p restore.Progress) {
		if p.Stage != stage {
			stage, meter = p.Stage, newRateMeter()
		}
		rate := meter.observe(time.Now(), p.Done)
		mu.Lock()
		latest = RestoreProgress{Stage: p.Stage, Done: p.Done, Total: p.Total, Rate: rate}
		mu.Unlock()
		beat()
		if faultpoint.Enabled && !halfway && p.Stage == RestoreStageWriting && p.Total > 0 && p.Done*2 >= p.Total && p.Done < p.Total {
			halfway = true
			faultpoint.Hold(ctx, faultpoint.MidRestore)
		}
	}
	res, err := restore.Disk(ctx, a.Catalog, o)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, restoreError(err)
	}
	took := time.Since(start)
	activity.GetLogger(ctx).Info("disk restored", "backup", in.BackupID, "disk", in.DiskKey, "to", in.To,
		"format", o.Format, "chain", len(res.Chain), "bytes", res.Bytes, "seconds", took.Seconds())
	return &RestoreDiskResult{To: in.To, Chain: res.Chain, Bytes: res.Bytes, Seconds: took.Seconds()}, nil
}

// restoreError makes what no retry can fix non-retryable, with the
// message restore gave (it names what was wrong).
func restoreError(err error) error {
	switch {
	case errors.Is(err, restore.ErrRefused):
		return temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeRestoreRefused, nil)
	case errors.Is(err, restore.ErrNotFound):
		return temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeNoRestorePoint, nil)
	case errors.Is(err, restore.ErrDamaged):
		return temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeRestorePointDamaged, nil)
	}
	return permanent(err)
}
