package workflows

import (
	"fmt"
	"time"

	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// SweeperScheduleID is the ID of the schedule that runs Sweep.
const SweeperScheduleID = "cbtflow-sweeper"

// DefaultSweepMinAge is how old a snapshot or a running backup must be
// before the sweeper may call it abandoned.
const DefaultSweepMinAge = 30 * time.Minute

// SweepInput configures one sweep.
type SweepInput struct {
	// MinAgeSeconds: younger snapshots and backups are left alone (default
	// DefaultSweepMinAge). Zero means the default; a negative value means
	// no minimum (tests).
	MinAgeSeconds int64 `json:"min_age_seconds,omitempty"`
}

// SweepResult says what the sweep removed.
type SweepResult struct {
	SnapshotsRemoved []string `json:"snapshots_removed,omitempty"` // snapshot names
	BackupsFailed    []string `json:"backups_failed,omitempty"`
	// Errors: what could not be swept (a vCenter, a snapshot, a backup),
	// and why; the next sweep tries again.
	Errors []string `json:"errors,omitempty"`
}

var sweeperActs *activities.Sweeper

// Sweep removes cbtflow snapshots that no running backup owns, marks their
// backups failed and deletes their partial files — what a terminated
// backup, which runs no cleanup code, leaves behind. It runs on a schedule
// (SweeperScheduleID) and can be started by hand.
func Sweep(ctx workflow.Context, in SweepInput) (*SweepResult, error) {
	minAge := int64(DefaultSweepMinAge / time.Second)
	switch {
	case in.MinAgeSeconds > 0:
		minAge = in.MinAgeSeconds
	case in.MinAgeSeconds < 0:
		minAge = 0
	}
	log := workflow.GetLogger(ctx)
	var orphans activities.FindOrphansResult
	if err := workflow.ExecuteActivity(withQueryActivity(ctx), sweeperActs.FindOrphans,
		activities.FindOrphansInput{MinAgeSeconds: minAge}).Get(ctx, &orphans); err != nil {
		return nil, err
	}
	// vCenters the sweeper could not list were skipped, not the sweep:
	// say which (absent from results recorded before they were reported,
	// so no command changes and no version is needed).
	res := &SweepResult{Errors: orphans.Errors}
	for _, s := range orphans.Snapshots {
		err := workflow.ExecuteActivity(withCleanupActivity(ctx), vsphereActs.RemoveSnapshot, activities.RemoveSnapshotInput{
			Profile: s.Profile, VMRef: s.VMRef, SnapshotRef: s.SnapshotRef, SnapshotName: s.SnapshotName,
		}).Get(ctx, nil)
		if err != nil {
			log.Error("sweeper: removing snapshot failed", "snapshot", s.SnapshotName, "vm", s.VMName, "error", err)
			res.Errors = append(res.Errors, fmt.Sprintf("snapshot %s of VM %s: %v", s.SnapshotName, s.VMName, err))
			continue
		}
		res.SnapshotsRemoved = append(res.SnapshotsRemoved, s.SnapshotName)
		if err := failBackup(ctx, s.BackupID); err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("backup %s: %v", s.BackupID, err))
			continue
		}
		res.BackupsFailed = append(res.BackupsFailed, s.BackupID)
	}
	for _, id := range orphans.Backups {
		if err := failBackup(ctx, id); err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("backup %s: %v", id, err))
			continue
		}
		res.BackupsFailed = append(res.BackupsFailed, id)
	}
	log.Info("sweep done", "snapshots_removed", len(res.SnapshotsRemoved), "backups_failed", len(res.BackupsFailed), "errors", len(res.Errors))
	return res, nil
}

func failBackup(ctx workflow.Context, backupID string) error {
	return workflow.ExecuteActivity(withCatalogActivity(ctx), catalogActs.FailBackup, activities.FailBackupInput{
		BackupID: backupID, Reason: "abandoned: its workflow ended without cleaning up (removed by the sweeper)",
	}).Get(ctx, nil)
}
