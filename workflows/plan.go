package workflows

import (
	"fmt"

	"github.com/cbtflow/cbtflow/activities"
)

// DefaultMaxChainLength bounds a disk's chain: past it, the next backup of
// the disk is full, so a restore never reads through an endless chain.
const DefaultMaxChainLength = activities.DefaultMaxChain

// diskPlan is what the backup does with one disk.
type diskPlan struct {
	Key      int32
	Capacity int64
	Mode     string // full or incremental
	// For an incremental: the previous restore point.
	FromChangeID    string
	BackingBackupID string
	BackingPath     string
	// Reason says why a disk is full although auto mode was asked.
	Reason string
}

// planDisks decides per disk between a full and an incremental backup.
func planDisks(mode string, disks []activities.VMDisk, previous []activities.PreviousDisk, cbtJustEnabled bool, maxChain int) ([]diskPlan, error) {
	if maxChain <= 0 {
		maxChain = DefaultMaxChainLength
	}
	prev := map[int32]activities.PreviousDisk{}
	for _, p := range previous {
		prev[p.Key] = p
	}
	var plans []diskPlan
	for _, d := range disks {
		p := diskPlan{Key: d.Key, Capacity: d.Capacity, Mode: ModeFull}
		last, ok := prev[d.Key]
		switch {
		case mode == ModeFull:
			p.Reason = "full backup requested"
		case !ok:
			p.Reason = "no previous restore point"
		case last.Damaged != "":
			p.Reason = "chain damaged: " + last.Damaged
		case last.RestoredSince != "":
			p.Reason = last.RestoredSince
		case last.Capacity != d.Capacity:
			p.Reason = fmt.Sprintf("disk size changed from %d to %d bytes", last.Capacity, d.Capacity)
		case cbtJustEnabled:
			p.Reason = "changed block tracking was just enabled"
		case last.ChangeID == "":
			p.Reason = "previous restore point has no change ID"
		case mode == ModeAuto && last.ChainLength >= maxChain:
			p.Reason = fmt.Sprintf("chain has %d images (limit %d)", last.ChainLength, maxChain)
		default:
			p.Mode = ModeIncremental
			p.FromChangeID = last.ChangeID
			p.BackingBackupID = last.BackupID
			p.BackingPath = last.Path
		}
		if mode == ModeIncremental && p.Mode != ModeIncremental {
			return nil, fmt.Errorf("disk %d cannot be backed up incrementally: %s", d.Key, p.Reason)
		}
		plans = append(plans, p)
	}
	return plans, nil
}
