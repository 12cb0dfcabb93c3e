package activities

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/sparse"
)

// Catalog holds the activities that read and write the catalog.
type Catalog struct {
	Catalog *catalog.Catalog
	Repo    *repository.Repository
	// Metrics receives each committed backup's duration and changed
	// bytes; nil: none.
	Metrics Metrics
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
	// A restore into the VM writes its disks while it runs: a restore
	// point taken now would hold half-restored disks. Refused before the
	// catalog has the backup, so nothing is left to fail.
	restores, err := a.Catalog.UnfinishedVMRestores(ctx, in.VMUUID)
	if err != nil {
		return nil, permanent(err)
	}
	if len(restores) > 0 {
		r := restores[0]
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf(
			"backup of VM %q refused: restore %s of backup %s into the VM (workflow %s) has not ended, and a restore point taken now would hold half-restored disks: back the VM up once it ended (or cancel it: starter cancel %s)",
			in.VMName, r.ID, r.BackupID, r.WorkflowID, r.WorkflowID), ErrTypeRestoreIntoVMRunning, nil)
	}
	err = a.Catalog.Begin(ctx, catalog.Backup{ID: in.BackupID, Profile: in.Profile, VMUUID: in.VMUUID,
		VMName: in.VMName, Mode: in.Mode, WorkflowID: in.WorkflowID, RunID: in.RunID})
	if err != nil {
		return nil, permanent(err)
	}
	// A prune of this VM that was interrupted may have left a merge
	// pending: settle it before reading the chains (the backup holds the
	// VM's lock, so no prune runs now).
	if err := settlePending(ctx, a.Catalog, a.Repo, in.Profile, in.VMUUID); err != nil {
		return nil, err
	}
	latest, err := a.Catalog.LatestDisks(ctx, in.Profile, in.VMUUID)
	if err != nil {
		return nil, permanent(err)
	}
	policy, _, err := a.Catalog.EffectivePolicy(ctx, in.Profile, in.VMUUID)
	if err != nil {
		return nil, permanent(err)
	}
	res := &BeginBackupResult{MaxChain: policy.Chain()}
	current := map[int32]bool{}
	for _, k := range in.DiskKeys {
		current[k] = true
	}
	// In disk key order: the catalog answers with a map, and the closed
	// chains, the warnings and the log must not change order between runs.
	for _, key := range slices.Sorted(maps.Keys(latest)) {
		l := latest[key]
		if in.DiskKeys != nil && !current[l.Key] {
			if err := a.Catalog.CloseChain(ctx, in.Profile, in.VMUUID, l.Key, l.BackupID, "disk removed from the VM"); err != nil {
				return nil, permanent(err)
			}
			activity.GetLogger(ctx).Info("disk left the VM: chain closed", "vm", in.VMName, "disk", l.Key, "last_backup", l.BackupID)
			res.ClosedChains = append(res.ClosedChains, l.Key)
			continue
		}
		prev := PreviousDisk{Key: l.Key, BackupID: l.BackupID, Capacity: l.Capacity,
			ChangeID: l.ChangeID, Path: a.Repo.Resolve(l.Path)}
		chain, err := a.Catalog.Chain(ctx, l.BackupID, l.Key)
		prev.ChainLength = len(chain)
		// The space check estimates the next incremental by the largest
		// of the chain's incrementals.
		for _, link := range chain {
			if link.Mode == catalog.ModeIncremental {
				prev.RecentIncrementals++
				prev.RecentChangedBytes = max(prev.RecentChangedBytes, link.ChangedBytes)
			}
		}
		var broken *catalog.BrokenChainError
		var damage *chainDamage
		switch {
		case errors.As(err, &broken):
			// The catalog itself does not link (a row deleted by hand):
			// no retry mends that, and no overlay may build on it.
			damage = &chainDamage{backupID: chain[len(chain)-1].BackupID, reason: broken.Reason}
		case err != nil:
			return nil, permanent(err)
		case in.Mode == catalog.ModeFull:
			// Nothing builds on the chain: no need to prove it.
		default:
			if damage, err = a.verifyChain(ctx, l.Key, chain); err != nil {
				return nil, err
			}
		}
		if damage != nil {
			warning, err := a.markDamaged(ctx, l.Key, damage)
			if err != nil {
				return nil, err
			}
			prev.Damaged = damage.reason
			res.Warnings = append(res.Warnings, warning)
		}
		if prev.Damaged != "" {
			activity.GetLogger(ctx).Warn("chain damaged: full backup of the disk", "vm", in.VMName, "disk", l.Key, "reason", prev.Damaged)
		}
		// A restore into the VM wrote its disks behind CBT's back (and
		// maybe only partly, when it failed): no change ID of the chain
		// describes the disk any more.
		restored, err := a.Catalog.RestoredSince(ctx, in.VMUUID, l.BackupID)
		if err != nil {
			return nil, permanent(err)
		}
		if restored != nil {
			prev.RestoredSince = fmt.Sprintf("the VM was restored from backup %s at %s; its CBT history no longer matches the chain",
				restored.BackupID, restored.StartedAt.UTC().Format(time.RFC3339))
		}
		res.Previous = append(res.Previous, prev)
	}
	slices.SortFunc(res.Previous, func(x, y PreviousDisk) int { return cmp.Compare(x.Key, y.Key) })
	return res, nil
}

// chainDamage is what made a chain unusable: the lowest restore point
// found damaged (all above it build on it) and why.
type chainDamage struct {
	backupID string
	reason   string
	marked   bool // already marked in the catalog
}

// verifyChain proves a disk's chain (top first) unchanged since commit
// before an overlay builds on it: cheaply, re-reading only images whose
// file stamp changed (see internal/integrity), and recording each stamp
// proven by a re-read at once, so a retried attempt does not read that
// image again. It returns the damage found, nil when the chain is sound. A
// missing disk folder is an error, not damage: it is what an unmounted
// repository looks like, and marking every chain damaged then would be
// wrong.
func (a *Catalog) verifyChain(ctx context.Context, key int32, chain []catalog.ChainLink) (*chainDamage, error) {
	images := make([]integrity.Image, len(chain))
	for i, link := range chain {
		if link.Damaged != "" {
			return &chainDamage{backupID: link.BackupID, reason: fmt.Sprintf("restore point %s is marked damaged: %s", link.BackupID, link.Damaged), marked: true}, nil
		}
		images[i] = integrity.Image{Path: a.Repo.Resolve(link.Path), Size: link.SizeBytes, SHA256: link.SHA256,
			Stamp: integrity.Stamp(link.Stamp)}
		if i > 0 {
			images[i-1].Backing = images[i].Path
		}
	}
	beat := func() { activity.RecordHeartbeat(ctx) }
	idx, err := integrity.CheckChain(ctx, images, beat, func(i int, out integrity.Outcome) error {
		if !out.Hashed {
			return nil
		}
		// Proven by a full re-read (e.g. a copied repository): record the
		// new stamp so the next check is cheap again.
		return a.Catalog.SetStamp(ctx, chain[i].BackupID, key, catalog.FileStamp(out.Stamp))
	})
	var d *integrity.Damage
	switch {
	case errors.As(err, &d):
		return &chainDamage{backupID: chain[idx].BackupID, reason: d.Error()}, nil
	case errors.Is(err, integrity.ErrFolderMissing):
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf(
			"disk %d: %v: is the repository %s mounted? (a --full backup starts new chains if its restore points are gone for good)",
			key, err, a.Repo.Root()), ErrTypeRepositoryUnavailable, err)
	case err != nil:
		return nil, permanent(err)
	}
	return nil, nil
}

// markDamaged marks the damaged restore point of a disk, with every one
// built on it, and returns the warning that says so. A failure is
// returned (and retried): a mark that is not written would never be
// written, since the full backup that follows hides the chain.
func (a *Catalog) markDamaged(ctx context.Context, key int32, d *chainDamage) (string, error) {
	var marked []string
	if !d.marked {
		var err error
		if marked, err = a.Catalog.MarkDamaged(ctx, d.backupID, key, d.reason); err != nil {
			return "", permanent(err)
		}
	}
	msg := fmt.Sprintf("disk %d: chain damaged: %s", key, d.reason)
	if len(marked) > 0 {
		msg += "; restore points marked damaged: " + strings.Join(marked, ", ")
	}
	return msg + "; full backup of this disk", nil
}

// CommitRestorePoint records every disk's new change ID, path, size and
// SHA-256 in one transaction. It first checks that each image is where the
// transfer left it, with the size it reported: a change ID is never
// recorded for data that is not there.
func (a *Catalog) CommitRestorePoint(ctx context.Context, in CommitInput) error {
	faultpoint.Hold(ctx, faultpoint.BeforeCommit)
	disks := make([]catalog.Disk, 0, len(in.Disks))
	for _, d := range in.Disks {
		fi, err := os.Stat(d.Path)
		if err != nil {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d: image %s is missing: %v", d.Key, d.Path, err), ErrTypeInvalidInput, err)
		}
		size, stamp := fi.Size(), integrity.StampOfInfo(fi)
		allocated, _ := sparse.Allocated(fi)
		if size != d.SizeBytes {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d: image %s is %d bytes, the transfer reported %d", d.Key, d.Path, size, d.SizeBytes),
				ErrTypeInvalidInput, nil)
		}
		// The catalog records paths relative to the repository root, so a
		// moved or remounted repository keeps working.
		rel, err := a.Repo.Rel(d.Path)
		if err != nil {
			return temporal.NewNonRetryableApplicationError(fmt.Sprintf("disk %d: %v", d.Key, err), ErrTypeInvalidInput, err)
		}
		// The stamp stands for the SHA-256 only if it is the one the
		// transfer saw while hashing: anything that wrote the image since
		// (a stray attempt) would otherwise pass every later chain check.
		if d.Stamp != nil && catalog.FileStamp(*d.Stamp) != catalog.FileStamp(stamp) {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d: image %s was written after the transfer hashed it (stamp %+v, now %+v)", d.Key, d.Path, *d.Stamp, stamp),
				ErrTypeInvalidInput, nil)
		}
		dsize, dsum, err := commitDigest(ctx, d)
		if err != nil {
			return err
		}
		disks = append(disks, catalog.Disk{Key: d.Key, Capacity: d.Capacity, Mode: d.Mode, Path: rel,
			BackingBackupID: d.BackingBackupID, ChangeIDFrom: d.ChangeIDFrom, ChangeID: d.ChangeID,
			ChangedBytes: d.ChangedBytes, WrittenBytes: d.WrittenBytes, SizeBytes: d.SizeBytes, SHA256: d.SHA256, Note: d.Note,
			Stamp: catalog.FileStamp(stamp), DigestSHA256: dsum, DigestSize: dsize, AllocatedBytes: allocated})
	}
	// A catalog that cannot serve (dropped, its tables gone) fails here,
	// before anything says a commit may have happened.
	if err := a.Catalog.Check(ctx); err != nil {
		return permanent(err)
	}
	// A commit repeated after an attempt that committed unheard is not
	// reported to the metrics twice.
	fresh := false
	if a.Metrics != nil {
		b, err := a.Catalog.Get(ctx, in.BackupID)
		fresh = err == nil && b.Status != catalog.StatusCommitted
	}
	// From here on the commit may happen without this attempt hearing of
	// it: the marker tells the failure path and the sweeper not to delete
	// the images on a catalog's silence.
	if err := a.markCommitting(in.BackupID); err != nil {
		return permanent(err)
	}
	if err := a.Catalog.Commit(ctx, in.BackupID, disks); err != nil {
		return permanent(err)
	}
	activity.GetLogger(ctx).Info("restore point committed", "backup", in.BackupID, "disks", len(disks))
	if fresh {
		a.reportCommit(ctx, in)
	}
	faultpoint.Hold(ctx, faultpoint.AfterCommit)
	if dir, err := a.Repo.StagingDir(in.BackupID); err == nil {
		_ = os.RemoveAll(dir)
	}
	return nil
}

// committingMarker, in a backup's staging folder, says that a commit of
// the backup may have reached the catalog.
const committingMarker = "committing"

// reportCommit reports a backup just committed: its duration, from its
// start to its commit by the catalog's clock, and its changed bytes.
func (a *Catalog) reportCommit(ctx context.Context, in CommitInput) {
	b, err := a.Catalog.Get(ctx, in.BackupID)
	if err != nil || b.FinishedAt.IsZero() {
		return
	}
	var changed int64
	for _, d := range in.Disks {
		changed += d.ChangedBytes
	}
	a.Metrics.BackupCommitted(b.FinishedAt.Sub(b.StartedAt), changed)
}

// markCommitting writes the committing marker durably.
func (a *Catalog) markCommitting(backupID string) error {
	dir, err := a.Repo.StagingDir(backupID)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, committingMarker), os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// FailBackup marks a backup failed and deletes its partial images and
// working files. A committed backup is never touched. When the catalog
// cannot say (it does not know the backup, or cannot serve at all), the
// images go only if no commit of the backup was ever attempted (no
// committing marker): a commit that may have reached a catalog that is
// only away for now must not lose its images. Those are kept, with a
// warning, and a later sweep asks the catalog again.
func (a *Catalog) FailBackup(ctx context.Context, in FailBackupInput) error {
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	staging, err := a.Repo.StagingDir(in.BackupID)
	if err != nil {
		return permanent(err)
	}
	err = a.Catalog.Fail(ctx, in.BackupID, in.Reason)
	switch {
	case errors.Is(err, catalog.ErrCommitted):
		// Committed after all (an attempt the workflow did not hear back
		// from): only a working folder may be left.
	case errors.Is(err, catalog.ErrNotFound), catalog.Unusable(err):
		// Never begun (no images), or begun in a catalog that is gone.
		if _, serr := os.Lstat(staging); serr != nil {
			return nil
		}
		if _, serr := os.Lstat(filepath.Join(staging, committingMarker)); serr == nil {
			activity.GetLogger(ctx).Warn("the catalog cannot say whether this backup was committed, and a commit was attempted: its images are kept until it can",
				"backup", in.BackupID, "catalog_error", err)
			return nil
		}
		removed, rerr := a.removeImages(in.BackupID)
		if rerr != nil {
			return leftBehind(ctx, in.BackupID, rerr)
		}
		activity.GetLogger(ctx).Warn("backup unknown to the catalog; its partial files removed", "backup", in.BackupID,
			"partial_files_removed", removed, "catalog_error", err)
	case err != nil:
		return permanent(err)
	default:
		removed, err := a.removeImages(in.BackupID)
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
	if _, err := os.Lstat(staging); err == nil {
		if err := os.RemoveAll(staging); err != nil {
			return leftBehind(ctx, in.BackupID, err)
		}
	}
	return nil
}

// commitDigest returns the size and SHA-256 of the digest file to record
// with a disk's image. When the transfer reported them, the file must
// still have them. Otherwise (a workflow that does not pass them on) the
// complete digest file of this image found beside it is recorded, and an
// image without one is recorded without (0, "").
func commitDigest(ctx context.Context, d CommitDisk) (int64, string, error) {
	path := digest.PathOf(d.Path)
	if d.DigestSHA256 != "" {
		size, sum, err := digest.HashFile(path)
		if err != nil {
			return 0, "", temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d: digest file %s is unreadable: %v", d.Key, path, err), ErrTypeInvalidInput, err)
		}
		if size != d.DigestSize || sum != d.DigestSHA256 {
			return 0, "", temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("disk %d: digest file %s has %d bytes and SHA-256 %s, the transfer wrote %d bytes with SHA-256 %s",
					d.Key, path, size, sum, d.DigestSize, d.DigestSHA256), ErrTypeInvalidInput, nil)
		}
		return size, sum, nil
	}
	f, err := digest.Read(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, "", nil
	}
	if err == nil && f.Complete && f.Header.Image == filepath.Base(d.Path) {
		return f.Size, f.SHA256, nil
	}
	if err == nil {
		err = fmt.Errorf("incomplete, or not this image's (it names %s)", f.Header.Image)
	}
	activity.GetLogger(ctx).Warn("digest file not recorded", "disk", d.Key, "path", path, "error", err)
	return 0, "", nil
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

// removeImages deletes the images of one uncommitted backup, and their
// digest files, wherever they are in the repository (backup IDs are
// unique; the catalog may be unable to say which VM the backup was of).
// It returns how many images it removed.
func (a *Catalog) removeImages(backupID string) (int, error) {
	if err := repository.CheckComponent("backup ID", backupID); err != nil {
		return 0, err
	}
	images, err := filepath.Glob(filepath.Join(a.Repo.Root(), "*", "*", "*", backupID+".qcow2"))
	if err != nil {
		return 0, err
	}
	digests, err := filepath.Glob(filepath.Join(a.Repo.Root(), "*", "*", "*", backupID+".qcow2"+digest.Suffix))
	if err != nil {
		return 0, err
	}
	for _, m := range append(images, digests...) {
		if err := os.Remove(m); err != nil && !errors.Is(err, os.ErrNotExist) {
			return 0, err
		}
	}
	return len(images), nil
}
