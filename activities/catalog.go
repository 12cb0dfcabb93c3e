package activities

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/repository"
)

// Catalog holds the activities that read and write the catalog.
type Catalog struct {
	Catalog *catalog.Catalog
	Repo    *repository.Repository
	// Hooks pauses at step boundaries in fault tests; nil in production.
	Hooks Pauser
}

// BeginBackup records a running backup and returns each disk's latest
// committed restore point.
func (a *Catalog) BeginBackup(ctx context.Context, in BeginBackupInput) (*BeginBackupResult, error) {
	// The names become repository paths: check them all, in a fixed order
	// so the same bad input always gets the same message.
	for _, c := range [][2]string{{"backup ID", in.BackupID}, {"vCenter profile", in.Profile}, {"VM instance UUID", in.VMUUID}} {
		if err := repository.CheckComponent(c[0], c[1]); err != nil {
			return nil, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeInvalidInput, err)
		}
	}
	err := a.Catalog.Begin(ctx, catalog.Backup{ID: in.BackupID, Profile: in.Profile, VMUUID: in.VMUUID,
		VMName: in.VMName, Mode: in.Mode, WorkflowID: in.WorkflowID, RunID: in.RunID})
	if err != nil {
		return nil, permanent(err)
	}
	latest, err := a.Catalog.LatestDisks(ctx, in.Profile, in.VMUUID)
	if err != nil {
		return nil, err
	}
	res := &BeginBackupResult{}
	current := map[int32]bool{}
	for _, k := range in.DiskKeys {
		current[k] = true
	}
	for _, l := range latest {
		if in.DiskKeys != nil && !current[l.Key] {
			if err := a.Catalog.CloseChain(ctx, in.Profile, in.VMUUID, l.Key, l.BackupID, "disk removed from the VM"); err != nil {
				return nil, err
			}
			activity.GetLogger(ctx).Info("disk left the VM: chain closed", "vm", in.VMName, "disk", l.Key, "last_backup", l.BackupID)
			res.ClosedChains = append(res.ClosedChains, l.Key)
			continue
		}
		chain, err := a.Catalog.Chain(ctx, l.BackupID, l.Key)
		if err != nil {
			return nil, err
		}
		res.Previous = append(res.Previous, PreviousDisk{Key: l.Key, BackupID: l.BackupID, Capacity: l.Capacity,
			ChangeID: l.ChangeID, Path: l.Path, ChainLength: len(chain)})
	}
	slices.SortFunc(res.Previous, func(x, y PreviousDisk) int { return cmp.Compare(x.Key, y.Key) })
	return res, nil
}

// CommitRestorePoint records every disk's new change ID, path, size and
// SHA-256 in one transaction. It first checks that each image is where the
// transfer left it, with the size it reported: a change ID is never
// recorded for data that is not there.
func (a *Catalog) CommitRestorePoint(ctx context.Context, in CommitInput) error {
	pause(a.Hooks, ctx, PauseBeforeCommit)
	disks := make([]catalog.Disk, 0, len(in.Disks))
	for _, d := range in.Disks {
		fi, err := os.Stat(d.Path)
		if err != nil {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d: image %s is missing: %v", d.Key, d.Path, err), ErrTypeInvalidInput, err)
		}
		if fi.Size() != d.SizeBytes {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d: image %s is %d bytes, the transfer reported %d", d.Key, d.Path, fi.Size(), d.SizeBytes),
				ErrTypeInvalidInput, nil)
		}
		disks = append(disks, catalog.Disk{Key: d.Key, Capacity: d.Capacity, Mode: d.Mode, Path: d.Path,
			BackingBackupID: d.BackingBackupID, ChangeIDFrom: d.ChangeIDFrom, ChangeID: d.ChangeID,
			ChangedBytes: d.ChangedBytes, WrittenBytes: d.WrittenBytes, SizeBytes: d.SizeBytes, SHA256: d.SHA256, Note: d.Note})
	}
	if err := a.Catalog.Commit(ctx, in.BackupID, disks); err != nil {
		return permanent(err)
	}
	activity.GetLogger(ctx).Info("restore point committed", "backup", in.BackupID, "disks", len(disks))
	pause(a.Hooks, ctx, PauseAfterCommit)
	if dir, err := a.Repo.StagingDir(in.BackupID); err == nil {
		_ = os.RemoveAll(dir)
	}
	return nil
}

// FailBackup marks a backup failed and deletes its partial images and
// working files. A committed backup is never touched.
func (a *Catalog) FailBackup(ctx context.Context, in FailBackupInput) error {
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	err := a.Catalog.Fail(ctx, in.BackupID, in.Reason)
	switch {
	case errors.Is(err, catalog.ErrCommitted):
		return nil
	case errors.Is(err, catalog.ErrNotFound):
		// Never begun: there can be no images, only working files.
	case err != nil:
		return err
	default:
		b, err := a.Catalog.Get(ctx, in.BackupID)
		if err != nil {
			return err
		}
		removed, err := a.removeImages(b.Profile, b.VMUUID, b.ID)
		if err != nil {
			return leftBehind(ctx, in.BackupID, err)
		}
		activity.GetLogger(ctx).Info("backup marked failed", "backup", in.BackupID, "partial_files_removed", removed)
	}
	// Only when the folder exists: on a read-only repository (the very
	// fault that may have failed the backup, before any folder was made)
	// RemoveAll of a missing folder fails with EROFS, and FailBackup would
	// be retried for its whole time limit while the VM's workflow stays
	// open.
	if dir, err := a.Repo.StagingDir(in.BackupID); err == nil {
		if _, err := os.Lstat(dir); err == nil {
			if err := os.RemoveAll(dir); err != nil {
				return leftBehind(ctx, in.BackupID, err)
			}
		}
	}
	return nil
}

// leftBehind decides about partial files that cannot be removed. The
// backup is marked failed already, which is what counts: its files are
// never read. When the repository refuses for good (read-only, no
// permission), retrying would keep the VM's workflow open for the
// activity's whole time limit and refuse every later backup of the VM as
// "already running", so the files are left, with a warning, for the
// operator or a later sweep. Other errors are retried.
func leftBehind(ctx context.Context, backupID string, err error) error {
	if permanentType(err) == "" {
		return err
	}
	activity.GetLogger(ctx).Warn("backup marked failed; its partial files cannot be removed now", "backup", backupID, "error", err)
	return nil
}

// removeImages deletes the images of one uncommitted backup.
func (a *Catalog) removeImages(profile, vmUUID, backupID string) (int, error) {
	probe, err := a.Repo.DiskDir(repository.Key{Profile: profile, VMUUID: vmUUID, DiskKey: 0, BackupID: backupID})
	if err != nil {
		return 0, err
	}
	matches, err := filepath.Glob(filepath.Join(filepath.Dir(probe), "*", backupID+".qcow2"))
	if err != nil {
		return 0, err
	}
	for _, m := range matches {
		if err := os.Remove(m); err != nil && !errors.Is(err, os.ErrNotExist) {
			return 0, err
		}
	}
	return len(matches), nil
}
