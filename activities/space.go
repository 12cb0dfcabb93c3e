package activities

import (
	"context"
	"fmt"
	"strings"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/repository"
)

// The margin the space check adds to what a backup's disks write:
// SpaceMarginPercent of their bytes (QCOW2's L2 and refcount tables, about
// 0.001% of the data with 2 MiB clusters of extended L2 entries, and the
// slack of an estimate) plus SpaceMarginPerDisk for each disk (each
// image's header, L1 and refcount tables, which qemu writes as whole 2 MiB
// clusters before the transfer frees their zeros, an L2 table of 2 MiB for
// each 256 GiB region the writes touch, the extents file in the staging
// folder).
const (
	SpaceMarginPercent = 5
	SpaceMarginPerDisk = 64 << 20
)

// SpaceNeeded is what disks need in the repository: their bytes, and the
// margin on top (SpaceMarginPercent of the bytes, plus SpaceMarginPerDisk
// per disk).
func SpaceNeeded(disks []SpaceDisk) (bytes, margin int64) {
	for _, d := range disks {
		bytes += max(d.Bytes, 0)
	}
	margin = (bytes*SpaceMarginPercent+99)/100 + int64(len(disks))*SpaceMarginPerDisk
	return bytes, margin
}

// CheckSpace compares the free space of the repository's file system
// (repository.SpaceOf, statfs: what the worker, unprivileged, may still
// write) with what the
// backup's disks will write plus the margin (SpaceNeeded), and fails with
// a non-retryable ErrTypeRepositoryFull naming the repository, the space
// needed, per disk, and the space free, when it does not fit. The
// workflow runs it before the snapshot, with each disk's allocated bytes
// (a full) or the most its recent incrementals changed (an incremental),
// and again after the CBT queries with their exact changed bytes.
func (a *Transfer) CheckSpace(ctx context.Context, in CheckSpaceInput) (*CheckSpaceResult, error) {
	root := a.Repo.Root()
	space, err := repository.SpaceOf(root)
	if err != nil {
		return nil, permanent(fmt.Errorf("free space of repository %s: %w", root, err))
	}
	bytes, margin := SpaceNeeded(in.Disks)
	res := &CheckSpaceResult{Repository: root, FreeBytes: space.Free, NeededBytes: bytes, MarginBytes: margin}
	log := activity.GetLogger(ctx)
	if res.FreeBytes >= bytes+margin {
		log.Info("repository space checked", "backup", in.BackupID, "repository", root, "free", res.FreeBytes,
			"needed", bytes, "margin", margin, "after_query", in.AfterQuery)
		return res, nil
	}
	msg := SpaceMessage(in, *res)
	log.Error("repository too small for the backup", "backup", in.BackupID, "error", msg)
	return nil, temporal.NewNonRetryableApplicationError(msg, ErrTypeRepositoryFull, nil, *res)
}

// SpaceMessage says why a backup does not fit, e.g.
//
//	repository /srv/cbtflow has 120 MiB (125829120 bytes) free; the backup
//	of VM web01 needs about 2 GiB (2189426688 bytes: disk 204: full, 2 GiB
//	allocated; disk 205: incremental, about 40 MiB changed, the most of
//	its last 3 incremental(s)) plus a margin of 232 MiB (243689063 bytes:
//	5% + 64 MiB per disk), 2.3 GiB in all; checked before the snapshot: no
//	snapshot was taken and nothing written. Free space in the repository
//	(or prune old restore points) and back up again
func SpaceMessage(in CheckSpaceInput, r CheckSpaceResult) string {
	about := "about "
	if in.AfterQuery {
		about = ""
	}
	parts := make([]string, 0, len(in.Disks))
	for _, d := range in.Disks {
		var what string
		switch d.Basis {
		case SpaceAllocated:
			what = HumanBytes(d.Bytes) + " allocated"
		case SpaceCapacity:
			what = HumanBytes(d.Bytes) + ", its capacity (its allocation is unknown)"
		case SpaceEstimated:
			if d.Incrementals == 0 {
				what = "changed bytes unknown until the CBT query (no earlier incremental)"
			} else {
				what = fmt.Sprintf("about %s changed, the most of its last %d incremental(s)", HumanBytes(d.Bytes), d.Incrementals)
			}
		default:
			if d.Mode == ModeFull {
				what = HumanBytes(d.Bytes) + " allocated"
			} else {
				what = HumanBytes(d.Bytes) + " changed"
			}
		}
		parts = append(parts, fmt.Sprintf("disk %d: %s, %s", d.Key, d.Mode, what))
	}
	when := "checked before the snapshot: no snapshot was taken and nothing written"
	if in.AfterQuery {
		when = "checked after the CBT query: nothing was written, and the snapshot is removed"
	}
	return fmt.Sprintf("repository %s has %s (%d bytes) free; the backup of VM %s needs %s%s (%d bytes: %s) plus a margin of %s (%d bytes: %d%% + %s per disk), %s in all; %s. Free space in the repository (or prune old restore points) and back up again",
		r.Repository, HumanBytes(r.FreeBytes), r.FreeBytes, in.VMName, about, HumanBytes(r.NeededBytes), r.NeededBytes,
		strings.Join(parts, "; "), HumanBytes(r.MarginBytes), r.MarginBytes, SpaceMarginPercent, HumanBytes(SpaceMarginPerDisk),
		HumanBytes(r.NeededBytes+r.MarginBytes), when)
}

// HumanBytes writes n in binary units: "512 bytes", "40 MiB", "2.1 GiB"
// (one decimal below 100 of a unit, none when whole).
func HumanBytes(n int64) string {
	if n < 1024 && n > -1024 {
		return fmt.Sprintf("%d bytes", n)
	}
	v := float64(n)
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := -1
	for i < len(units)-1 && (v >= 1024 || v <= -1024) {
		v /= 1024
		i++
	}
	s := fmt.Sprintf("%.1f", v)
	if v >= 100 || v <= -100 || strings.HasSuffix(s, ".0") {
		s = fmt.Sprintf("%.0f", v)
	}
	return s + " " + units[i]
}
