package activities

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/merge"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/retention"
	"github.com/cbtflow/cbtflow/internal/sparse"
)

// Pruner holds the activities of retention: plan what a policy removes,
// merge the removed images that kept restore points build on, and apply
// the result to the repository and the catalog crash-safely.
type Pruner struct {
	Catalog *catalog.Catalog
	Repo    *repository.Repository
	// Location is the time zone of the calendar rules (days, weeks,
	// months, years); nil means the worker's local time zone.
	Location *time.Location
}

// PlanPruneInput selects the VMs to plan for: one VM (a name or instance
// UUID, with Profile to tell apart VMs of the same name), or all.
type PlanPruneInput struct {
	VM      string `json:"vm,omitempty"`
	Profile string `json:"profile,omitempty"`
}

// PlanPruneResult is the plan of every VM selected.
type PlanPruneResult struct {
	VMs []VMPrunePlan `json:"vms"`
}

// VMPrunePlan is what a prune does to one VM's restore points.
type VMPrunePlan struct {
	Profile string `json:"profile"`
	VMUUID  string `json:"vm_uuid"`
	VMName  string `json:"vm"`
	// LockID is the VM's per-VM workflow ID (its latest backup's): the
	// prune runs under it, so no backup of the VM runs meanwhile.
	LockID string `json:"lock_id"`
	// Policy in words, and where it comes from: "vm", "default" or
	// "none" (no policy: everything is kept).
	Policy       string         `json:"policy"`
	PolicySource string         `json:"policy_source"`
	Kept         []KeptPoint    `json:"kept"`
	Removed      []RemovedPoint `json:"removed"`
	Merges       []MergeStep    `json:"merges,omitempty"`
	// BytesToFree: the space the removed images take (catalog.Disk.SpaceBytes; the merged images' growth
	// is known only once they are written).
	BytesToFree int64 `json:"bytes_to_free"`
}

// KeptPoint is a restore point the policy keeps, and the rules that keep it.
type KeptPoint struct {
	BackupID string    `json:"backup_id"`
	Time     time.Time `json:"time"`
	Rules    []string  `json:"rules"`
}

// RemovedPoint is a restore point the policy does not keep, and why.
type RemovedPoint struct {
	BackupID string    `json:"backup_id"`
	Time     time.Time `json:"time"`
	Reason   string    `json:"reason"`
}

// MergeStep rewrites one disk image of a kept restore point so that it no
// longer builds on removed ones: Removed (nearest first) are merged into
// it, and the new image builds on Base ("" = it becomes a full image).
type MergeStep struct {
	BackupID string   `json:"backup_id"`
	Key      int32    `json:"disk_key"`
	Removed  []string `json:"removed"`
	Base     string   `json:"base"`
	// Method and Bytes: how internal/merge will do it and what it moves.
	Method string `json:"method,omitempty"`
	Bytes  int64  `json:"bytes,omitempty"`
}

func (p *Pruner) location() *time.Location {
	if p.Location != nil {
		return p.Location
	}
	return time.Local
}

// PlanPrune plans the prune of every VM selected that has restore points.
// It changes nothing; a VM's prune plans again under the VM's lock.
func (p *Pruner) PlanPrune(ctx context.Context, in PlanPruneInput) (*PlanPruneResult, error) {
	points, err := p.Catalog.List(ctx, catalog.ListFilter{VM: in.VM, Profile: in.Profile, Status: catalog.StatusCommitted})
	if err != nil {
		return nil, permanent(err)
	}
	if in.VM != "" && len(points) == 0 {
		err := fmt.Errorf("prune: VM %q has no restore points in the catalog", in.VM)
		return nil, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeNoRestorePoint, err)
	}
	type vmKey struct{ profile, uuid string }
	byVM := map[vmKey][]catalog.Backup{}
	var order []vmKey
	for _, b := range points {
		k := vmKey{b.Profile, b.VMUUID}
		if _, ok := byVM[k]; !ok {
			order = append(order, k)
		}
		byVM[k] = append(byVM[k], b)
	}
	if in.VM != "" && len(order) > 1 {
		var names []string
		for _, k := range order {
			names = append(names, fmt.Sprintf("%s (profile %s)", k.uuid, k.profile))
		}
		err := fmt.Errorf("prune: %q names %d VMs: %s; give the instance UUID or --profile", in.VM, len(order), strings.Join(names, ", "))
		return nil, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeAmbiguousVM, err)
	}
	res := &PlanPruneResult{}
	for _, k := range order {
		plan, err := p.planVM(ctx, byVM[k])
		if err != nil {
			return nil, err
		}
		res.VMs = append(res.VMs, *plan)
	}
	slices.SortFunc(res.VMs, func(a, b VMPrunePlan) int {
		return strings.Compare(a.VMName+"\x00"+a.Profile+a.VMUUID, b.VMName+"\x00"+b.Profile+b.VMUUID)
	})
	return res, nil
}

// PruneVMInput names the VM whose prune runs.
type PruneVMInput struct {
	PruneID string `json:"prune_id"`
	Profile string `json:"profile"`
	VMUUID  string `json:"vm_uuid"`
}

// checkPruneInput refuses names that are not safe repository path
// components: they become folders the prune walks and removes files in.
func checkPruneInput(pruneID, profile, vmUUID string) error {
	for _, c := range [][2]string{{"prune ID", pruneID}, {"vCenter profile", profile}, {"VM instance UUID", vmUUID}} {
		if err := repository.CheckComponent(c[0], c[1]); err != nil {
			return temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeInvalidInput, err)
		}
	}
	return nil
}

// PlanVM settles what an interrupted prune left (see settlePending),
// removes the files an earlier prune recorded as removed but could not
// delete, and plans the VM's prune again, now that no backup of it can
// run under the VM's workflow ID. A backup of the VM that the catalog
// shows running (under another form of the ID, from before an upgrade)
// makes it wait: it fails, and the next prune tries again.
func (p *Pruner) PlanVM(ctx context.Context, in PruneVMInput) (*VMPrunePlan, error) {
	if err := checkPruneInput(in.PruneID, in.Profile, in.VMUUID); err != nil {
		return nil, err
	}
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	running, err := p.Catalog.List(ctx, catalog.ListFilter{VM: in.VMUUID, Profile: in.Profile, Status: catalog.StatusRunning})
	if err != nil {
		return nil, permanent(err)
	}
	for _, b := range running {
		if b.WorkflowID != activity.GetInfo(ctx).WorkflowExecution.ID {
			err := fmt.Errorf("prune: backup %s of VM %s is running (workflow %s): the prune leaves the VM alone until it ends", b.ID, b.VMName, b.WorkflowID)
			return nil, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeBackupRunning, err)
		}
	}
	if err := settlePending(ctx, p.Catalog, p.Repo, in.Profile, in.VMUUID); err != nil {
		return nil, err
	}
	if err := p.removeStaleTemps(ctx, in); err != nil {
		return nil, err
	}
	if err := p.removeLeftovers(ctx, in); err != nil {
		return nil, err
	}
	points, err := p.committedPoints(ctx, in.Profile, in.VMUUID)
	if err != nil {
		return nil, err
	}
	if len(points) == 0 {
		return &VMPrunePlan{Profile: in.Profile, VMUUID: in.VMUUID}, nil
	}
	plan, err := p.planVM(ctx, points)
	if err != nil {
		return nil, err
	}
	for i := range plan.Merges {
		job, err := p.job(in.PruneID, points, plan.Merges[i])
		if err != nil {
			return nil, err
		}
		est, err := merge.Estimate(ctx, job)
		if err != nil {
			return nil, err
		}
		plan.Merges[i].Method, plan.Merges[i].Bytes = est.Method, est.Bytes[est.Method]
	}
	return plan, nil
}

// planVM applies the VM's policy to its restore points (newest first, all
// of one VM) and works out the merges each disk needs.
func (p *Pruner) planVM(ctx context.Context, points []catalog.Backup) (*VMPrunePlan, error) {
	b0 := points[0]
	plan := &VMPrunePlan{Profile: b0.Profile, VMUUID: b0.VMUUID, VMName: b0.VMName, LockID: b0.WorkflowID}
	policy, source, err := p.Catalog.EffectivePolicy(ctx, b0.Profile, b0.VMUUID)
	if err != nil {
		return nil, permanent(err)
	}
	plan.PolicySource = string(source)
	if source == catalog.PolicyNone {
		plan.Policy = "none: every restore point is kept"
		for _, b := range points {
			plan.Kept = append(plan.Kept, KeptPoint{BackupID: b.ID, Time: b.StartedAt, Rules: []string{"no policy"}})
		}
		return plan, nil
	}
	plan.Policy = policy.String()
	// The rules count restore points that restore: a damaged one is
	// removed (it cannot be kept usefully), and named as such.
	var sound []retention.Point
	damaged := map[string]string{}
	for _, b := range points {
		if why := damagedReason(b); why != "" {
			damaged[b.ID] = why
			continue
		}
		sound = append(sound, retention.Point{ID: b.ID, Time: b.StartedAt})
	}
	keep := map[string]bool{}
	for _, d := range retention.Select(sound, policy, p.location()) {
		if d.Keep {
			keep[d.ID] = true
			plan.Kept = append(plan.Kept, KeptPoint{BackupID: d.ID, Time: d.Time, Rules: d.Reasons})
		}
	}
	if err := p.keepExported(ctx, points, keep, plan); err != nil {
		return nil, err
	}
	diskOf := map[string]map[int32]catalog.Disk{}
	for _, b := range points {
		diskOf[b.ID] = map[int32]catalog.Disk{}
		for _, d := range b.Disks {
			diskOf[b.ID][d.Key] = d
		}
		if keep[b.ID] {
			continue
		}
		reason := "not kept by the policy (" + plan.Policy + ")"
		if why := damaged[b.ID]; why != "" {
			reason = "damaged: " + why
		}
		plan.Removed = append(plan.Removed, RemovedPoint{BackupID: b.ID, Time: b.StartedAt, Reason: reason})
		for _, d := range b.Disks {
			plan.BytesToFree += d.SpaceBytes()
		}
	}
	// A kept image that builds on removed ones gets their data merged in.
	for _, b := range points {
		if !keep[b.ID] {
			continue
		}
		for _, d := range b.Disks {
			step := MergeStep{BackupID: b.ID, Key: d.Key}
			for base := d.BackingBackupID; base != ""; {
				if keep[base] {
					step.Base = base
					break
				}
				row, ok := diskOf[base][d.Key]
				if !ok {
					err := fmt.Errorf("prune: restore point %s disk %d builds on %s, which has no such disk in the catalog", b.ID, d.Key, base)
					return nil, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeInvalidInput, err)
				}
				step.Removed = append(step.Removed, base)
				base = row.BackingBackupID
			}
			if len(step.Removed) > 0 {
				plan.Merges = append(plan.Merges, step)
			}
		}
	}
	return plan, nil
}

// keepExported keeps every restore point a running export reads (the
// exported point and the points its chain builds on), whatever the
// policy says, with the rule "exported (ID)": qemu-nbd serves those
// images as they are, so none of them may be removed or rewritten by a
// merge; the prune goes on with every other point. ApplyPrune's catalog
// transactions check again under the VM's lock, for an export that
// starts after this plan.
func (p *Pruner) keepExported(ctx context.Context, points []catalog.Backup, keep map[string]bool, plan *VMPrunePlan) error {
	exported, err := p.Catalog.ExportedPoints(ctx, plan.Profile, plan.VMUUID)
	if err != nil {
		return permanent(err)
	}
	if len(exported) == 0 {
		return nil
	}
	for _, b := range points {
		leases := exported[b.ID]
		if len(leases) == 0 {
			continue
		}
		rule := "exported (" + strings.Join(leases, ", ") + ")"
		if keep[b.ID] {
			for i := range plan.Kept {
				if plan.Kept[i].BackupID == b.ID {
					plan.Kept[i].Rules = append(plan.Kept[i].Rules, rule)
				}
			}
			continue
		}
		keep[b.ID] = true
		plan.Kept = append(plan.Kept, KeptPoint{BackupID: b.ID, Time: b.StartedAt, Rules: []string{rule}})
	}
	// Newest first, as the policy's decisions.
	slices.SortStableFunc(plan.Kept, func(a, b KeptPoint) int {
		if c := b.Time.Compare(a.Time); c != 0 {
			return c
		}
		return strings.Compare(b.BackupID, a.BackupID)
	})
	return nil
}

func damagedReason(b catalog.Backup) string {
	for _, d := range b.Disks {
		if d.Damaged != "" {
			return fmt.Sprintf("disk %d: %s", d.Key, d.Damaged)
		}
	}
	return ""
}

// tempSuffix marks a prune's new image beside the one it replaces.
const tempSuffix = ".merging"

// imagePath is the absolute path of disk key's image of restore point id
// among points.
func (p *Pruner) imagePath(points []catalog.Backup, id string, key int32) (string, error) {
	for _, b := range points {
		if b.ID != id {
			continue
		}
		for _, d := range b.Disks {
			if d.Key == key {
				return p.Repo.Resolve(d.Path), nil
			}
		}
	}
	return "", fmt.Errorf("prune: restore point %s has no disk %d in the catalog", id, key)
}

// committedPoints returns the VM's restore points, newest first.
func (p *Pruner) committedPoints(ctx context.Context, profile, vmUUID string) ([]catalog.Backup, error) {
	points, err := p.Catalog.List(ctx, catalog.ListFilter{VM: vmUUID, Profile: profile, Status: catalog.StatusCommitted})
	if err != nil {
		return nil, permanent(err)
	}
	return points, nil
}

// job turns a merge step into internal/merge's terms.
func (p *Pruner) job(pruneID string, points []catalog.Backup, s MergeStep) (merge.Job, error) {
	pathOf := func(id string) (string, error) { return p.imagePath(points, id, s.Key) }
	top, err := pathOf(s.BackupID)
	if err != nil {
		return merge.Job{}, err
	}
	j := merge.Job{Top: top, Temp: filepath.Join(filepath.Dir(top), "."+filepath.Base(top)+"."+pruneID+tempSuffix)}
	for _, id := range s.Removed {
		path, err := pathOf(id)
		if err != nil {
			return merge.Job{}, err
		}
		j.Removed = append(j.Removed, path)
	}
	if s.Base != "" {
		if j.Base, err = pathOf(s.Base); err != nil {
			return merge.Job{}, err
		}
	}
	return j, nil
}

// MergeImageInput is one merge of a VM's prune.
type MergeImageInput struct {
	PruneID string    `json:"prune_id"`
	Profile string    `json:"profile"`
	VMUUID  string    `json:"vm_uuid"`
	Step    MergeStep `json:"step"`
}

// MergedImage is a merged image written, durable and verified beside the
// image it replaces.
type MergedImage struct {
	BackupID  string `json:"backup_id"`
	Key       int32  `json:"disk_key"`
	Base      string `json:"base"`
	TempPath  string `json:"temp_path"` // relative to the repository root
	SizeBytes int64  `json:"size_bytes"`
	SHA256    string `json:"sha256"`
	Inode     int64  `json:"inode"`
	MtimeNs   int64  `json:"mtime_ns"`
	CtimeNs   int64  `json:"ctime_ns"`
	Method    string `json:"method"`
	OldSize   int64  `json:"old_size_bytes"`
	// OldAllocated and Allocated are the space the image it replaces and
	// the merged image take (their blocks: images are sparse); absent
	// from workers before them, when the sizes stand for them.
	OldAllocated int64 `json:"old_allocated_bytes,omitempty"`
	Allocated    int64 `json:"allocated_bytes,omitempty"`
}

// freed is the space the merge gives back (negative when the merged image
// takes more than the one it replaces).
func (m MergedImage) freed() int64 {
	if m.OldAllocated > 0 && m.Allocated > 0 {
		return m.OldAllocated - m.Allocated
	}
	return m.OldSize - m.SizeBytes
}

// MergeImage writes the merged image of one step beside the kept image
// (which it never modifies): flushed, synced, compared with the kept
// point's disk and hashed. A retry starts it afresh.
func (p *Pruner) MergeImage(ctx context.Context, in MergeImageInput) (*MergedImage, error) {
	if err := checkPruneInput(in.PruneID, in.Profile, in.VMUUID); err != nil {
		return nil, err
	}
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	points, err := p.committedPoints(ctx, in.Profile, in.VMUUID)
	if err != nil {
		return nil, err
	}
	// Each attempt writes its own file: an earlier attempt that is still
	// running somewhere (a worker cut off from Temporal) and removes its
	// file when it gives up never removes this one's. Files of earlier
	// attempts of this step go first: they would take the space.
	attempt := activity.GetInfo(ctx).Attempt
	job, err := p.job(fmt.Sprintf("%s-a%d", in.PruneID, attempt), points, in.Step)
	if err != nil {
		return nil, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeInvalidInput, err)
	}
	for a := int32(1); a < attempt; a++ {
		old, err := p.job(fmt.Sprintf("%s-a%d", in.PruneID, a), points, in.Step)
		if err == nil {
			if err := os.Remove(old.Temp); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("prune: %w", err)
			}
		}
	}
	// The images merged must be the ones committed: a merge of a damaged
	// image would bake the damage into a kept restore point (qemu-img
	// compare compares with the same damaged view) and delete the
	// evidence. Cheap while the file stamps are unchanged.
	chain, err := p.Catalog.Chain(ctx, in.Step.BackupID, in.Step.Key)
	if err != nil {
		return nil, permanent(err)
	}
	cat := &Catalog{Catalog: p.Catalog, Repo: p.Repo}
	damage, err := cat.verifyChain(ctx, in.Step.Key, chain)
	if err != nil {
		return nil, err
	}
	if damage != nil {
		warning, err := cat.markDamaged(ctx, in.Step.Key, damage)
		if err != nil {
			return nil, err
		}
		err = fmt.Errorf("prune: not merged: %s", warning)
		return nil, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeImageCorrupt, err)
	}
	faultpoint.Hold(ctx, faultpoint.BeforeMerge)
	est, err := merge.Estimate(ctx, job)
	if err != nil {
		return nil, mergeError(err)
	}
	res, err := merge.Run(ctx, job, est, func() { activity.RecordHeartbeat(ctx) })
	if err != nil {
		return nil, mergeError(err)
	}
	faultpoint.Hold(ctx, faultpoint.AfterMerge)
	rel, err := p.Repo.Rel(job.Temp)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(job.Top)
	if err != nil {
		return nil, err
	}
	oldAllocated, _ := sparse.Allocated(fi)
	var allocated int64
	if tfi, err := os.Stat(job.Temp); err == nil {
		allocated, _ = sparse.Allocated(tfi)
	}
	return &MergedImage{BackupID: in.Step.BackupID, Key: in.Step.Key, Base: in.Step.Base, TempPath: rel,
		SizeBytes: res.Size, SHA256: res.SHA256, Inode: res.Stamp.Inode, MtimeNs: res.Stamp.MtimeNs,
		CtimeNs: res.Stamp.CtimeNs, Method: est.Method, OldSize: fi.Size(),
		OldAllocated: oldAllocated, Allocated: allocated}, nil
}

// exportedError types a catalog transaction refused because an export
// that began after the plan reads a point the prune would remove or
// rewrite: nothing changed, and retrying in the VM's lock would only
// hold it while the export runs; the next prune plans around it.
func exportedError(err error) error {
	if errors.Is(err, catalog.ErrExported) {
		msg := "prune: " + strings.TrimPrefix(err.Error(), "catalog: ") + "; the next prune keeps its chain and removes the rest"
		return temporal.NewNonRetryableApplicationError(msg, ErrTypeExportRunning, err)
	}
	return permanent(err)
}

// mergeError types what no retry of a merge changes: too little space
// (the VM's lock would be held for nothing), and a merged image that does
// not show the kept point's disk.
func mergeError(err error) error {
	switch {
	case errors.Is(err, merge.ErrNoSpace):
		return temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeRepositoryFull, err)
	case errors.Is(err, merge.ErrVerify):
		return temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeImageCorrupt, err)
	}
	return permanent(err)
}

// ApplyPruneInput is the end of a VM's prune: the merged images to put in
// place and the restore points to remove.
type ApplyPruneInput struct {
	PruneID string        `json:"prune_id"`
	Profile string        `json:"profile"`
	VMUUID  string        `json:"vm_uuid"`
	Remove  []string      `json:"remove"`
	Merged  []MergedImage `json:"merged"`
}

// ApplyPruneResult says what the prune freed.
type ApplyPruneResult struct {
	BytesFreed int64 `json:"bytes_freed"`
}

// ApplyPrune puts the merged images in place and removes the restore
// points, in an order that leaves every restore point the catalog shows
// restorable at every instant:
//
//  1. the new images are recorded as pending merges (one transaction);
//  2. each is renamed over the image it replaces (atomic: the file at the
//     path shows the same disk before and after) and the folder synced;
//  3. one transaction records the new images and deletes the removed
//     points' rows;
//  4. the removed points' files are deleted.
//
// A retry after a crash at any step goes on from where it stopped.
func (p *Pruner) ApplyPrune(ctx context.Context, in ApplyPruneInput) (*ApplyPruneResult, error) {
	if err := checkPruneInput(in.PruneID, in.Profile, in.VMUUID); err != nil {
		return nil, err
	}
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	points, err := p.committedPoints(ctx, in.Profile, in.VMUUID)
	if err != nil {
		return nil, err
	}
	files := map[string][]string{} // backup ID → absolute paths of its images and their digest files
	sizes := map[string]int64{}
	for _, b := range points {
		for _, d := range b.Disks {
			path := p.Repo.Resolve(d.Path)
			files[b.ID] = append(files[b.ID], path, path+digest.Suffix)
			sizes[b.ID] += d.SpaceBytes() + d.DigestSize
		}
	}
	var freed int64
	var merged []catalog.MergedImage
	for _, m := range in.Merged {
		merged = append(merged, catalog.MergedImage{BackupID: m.BackupID, Key: m.Key, Backing: m.Base,
			SizeBytes: m.SizeBytes, SHA256: m.SHA256, TempPath: m.TempPath, AllocatedBytes: m.Allocated,
			Stamp: catalog.FileStamp{Inode: m.Inode, MtimeNs: m.MtimeNs, CtimeNs: m.CtimeNs}})
		freed += m.freed()
	}
	var removeFiles []string
	committed := true
	for _, id := range in.Remove {
		if _, ok := files[id]; ok {
			committed = false
			freed += sizes[id]
			removeFiles = append(removeFiles, files[id]...)
			continue
		}
		// Gone from the catalog: an earlier attempt committed, and only
		// files may remain, where the repository puts a point's images.
		left, size, err := p.imagesLeft(in.Profile, in.VMUUID, id)
		if err != nil {
			return nil, err
		}
		freed += size
		removeFiles = append(removeFiles, left...)
	}
	if !committed || len(in.Remove) == 0 {
		if len(merged) > 0 {
			if err := p.Catalog.BeginMerges(ctx, in.PruneID, merged); err != nil {
				return nil, exportedError(err)
			}
		}
		for i, m := range in.Merged {
			path, err := p.putInPlace(ctx, points, m)
			if err != nil {
				return nil, err
			}
			// The rename changed the file's ctime: record the stamp it has
			// now (same inode and mtime: the hash still proves it).
			_, st, err := integrity.StampOf(path)
			if err != nil {
				return nil, err
			}
			if st.Inode == m.Inode {
				merged[i].Stamp = catalog.FileStamp(st)
			}
		}
		faultpoint.Hold(ctx, faultpoint.BeforePruneCommit)
	}
	// Recorded once; a retry after the commit gets the bytes the first
	// attempt counted (the files it still finds are among them).
	freed, err = p.Catalog.Prune(ctx, catalog.PruneRecord{ID: in.PruneID, Profile: in.Profile, VMUUID: in.VMUUID,
		Removed: in.Remove, BytesFreed: freed}, merged)
	if err != nil {
		return nil, exportedError(err)
	}
	faultpoint.Hold(ctx, faultpoint.AfterPruneCommit)
	dirs := map[string]bool{}
	for _, f := range removeFiles {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("prune: removing %s: %w", f, err)
		}
		dirs[filepath.Dir(f)] = true
	}
	for d := range dirs {
		if err := syncDir(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	// What failed attempts of MergeImage left (each attempt has its own
	// file): the prune is recorded, no merge of this VM is pending.
	if err := p.removeStaleTemps(ctx, PruneVMInput{PruneID: in.PruneID, Profile: in.Profile, VMUUID: in.VMUUID}); err != nil {
		return nil, err
	}
	activity.GetLogger(ctx).Info("prune applied", "vm", in.VMUUID, "removed", len(in.Remove), "merged", len(in.Merged), "bytes_freed", freed)
	return &ApplyPruneResult{BytesFreed: freed}, nil
}

// imagesLeft returns the images (and their digest files) of a restore
// point that the catalog no longer records (an earlier attempt of the
// prune removed its rows) and their bytes: those at the repository's
// image path of the point in each disk folder of the VM.
func (p *Pruner) imagesLeft(profile, vmUUID, backupID string) ([]string, int64, error) {
	dir := filepath.Join(p.Repo.Root(), profile, vmUUID)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("prune: %w", err)
	}
	var paths []string
	var size int64
	for _, e := range entries {
		key, err := strconv.ParseInt(e.Name(), 10, 32)
		if !e.IsDir() || err != nil {
			continue
		}
		path, err := p.Repo.ImagePath(repository.Key{Profile: profile, VMUUID: vmUUID, DiskKey: int32(key), BackupID: backupID})
		if err != nil {
			return nil, 0, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeInvalidInput, err)
		}
		// The image and its digest file (internal/digest), each on its
		// own: an interrupted removal may have left either.
		for _, f := range []string{path, path + digest.Suffix} {
			if fi, err := os.Stat(f); err == nil {
				paths = append(paths, f)
				size += fi.Size()
			}
		}
	}
	return paths, size, nil
}

// putInPlace renames a merged image over the image it replaces, unless an
// earlier attempt did.
func (p *Pruner) putInPlace(ctx context.Context, points []catalog.Backup, m MergedImage) (string, error) {
	path, err := p.imagePath(points, m.BackupID, m.Key)
	if err != nil {
		return "", err
	}
	temp := p.Repo.Resolve(m.TempPath)
	if _, err := os.Stat(temp); errors.Is(err, os.ErrNotExist) {
		// Renamed already? The file at the path is then the new one: the
		// rename keeps its inode.
		if _, st, err := integrity.StampOf(path); err == nil && st.Inode == m.Inode {
			return path, nil
		}
		err := fmt.Errorf("prune: the merged image %s is gone and %s is not it", temp, path)
		return "", temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeImageCorrupt, err)
	}
	if err := os.Rename(temp, path); err != nil {
		return "", fmt.Errorf("prune: %w", err)
	}
	return path, syncDir(filepath.Dir(path))
}

// removeStaleTemps deletes merged images that an interrupted prune of
// this VM left and that no pending merge names (settlePending ran first).
func (p *Pruner) removeStaleTemps(ctx context.Context, in PruneVMInput) error {
	pending, err := p.Catalog.PendingMerges(ctx, in.Profile, in.VMUUID)
	if err != nil {
		return permanent(err)
	}
	keep := map[string]bool{}
	for _, pm := range pending {
		keep[p.Repo.Resolve(pm.TempPath)] = true
	}
	dir := filepath.Join(p.Repo.Root(), in.Profile, in.VMUUID)
	return filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasPrefix(d.Name(), ".") && strings.HasSuffix(d.Name(), tempSuffix) && !keep[path] {
			activity.GetLogger(ctx).Info("prune: removing an interrupted prune's image", "path", path)
			return os.Remove(path)
		}
		return nil
	})
}

// removeLeftovers deletes the images of restore points that earlier
// prunes of the VM removed from the catalog but could not delete (a
// PruneVM that ended between its catalog transaction and the deletions).
func (p *Pruner) removeLeftovers(ctx context.Context, in PruneVMInput) error {
	ids, err := p.Catalog.PrunedPoints(ctx, in.Profile, in.VMUUID)
	if err != nil {
		return permanent(err)
	}
	for _, id := range ids {
		left, _, err := p.imagesLeft(in.Profile, in.VMUUID, id)
		if err != nil {
			return err
		}
		for _, f := range left {
			activity.GetLogger(ctx).Info("prune: removing an image an earlier prune removed from the catalog", "path", f)
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("prune: %w", err)
			}
		}
	}
	return nil
}

// settlePending settles the merges an interrupted prune of the VM left
// pending, on proof only: when the file at the image's path is the new
// image (same size and SHA-256), the catalog records it; when it is the
// old one (same size, and its seal or SHA-256 holds), the pending row and
// the new file go. A file that cannot be
// read (an unmounted repository, an I/O error) is an error, retried: a
// guess here could make the catalog describe the wrong file. A file that
// is neither is left as it is, with its pending row and the new file:
// the chain check then finds the image damaged, and the new file stays
// for the operator. It runs under the VM's lock only (a prune or a backup
// of the VM), never beside the prune that wrote the rows.
func settlePending(ctx context.Context, cat *catalog.Catalog, repo *repository.Repository, profile, vmUUID string) error {
	pending, err := cat.PendingMerges(ctx, profile, vmUUID)
	if err != nil {
		return permanent(err)
	}
	for _, pm := range pending {
		b, err := cat.Get(ctx, pm.BackupID)
		if err != nil {
			return permanent(err)
		}
		var old *catalog.Disk
		for i := range b.Disks {
			if b.Disks[i].Key == pm.Key {
				old = &b.Disks[i]
			}
		}
		if old == nil {
			return fmt.Errorf("prune: restore point %s has no disk %d", pm.BackupID, pm.Key)
		}
		path := repo.Resolve(old.Path)
		fi, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("prune: settling the interrupted merge of %s disk %d: %w (is the repository mounted?)", pm.BackupID, pm.Key, err)
		}
		// Which proof the file holds: the merged image's (its SHA-256), or
		// the old image's (its seal or SHA-256). Damage is "not this one";
		// any other error says nothing about the file.
		is := func(size int64, proof string) (bool, error) {
			if fi.Size() != size {
				return false, nil
			}
			err := integrity.Verify(ctx, path, proof, func(int64) { activity.RecordHeartbeat(ctx) })
			if d := (*integrity.Damage)(nil); errors.As(err, &d) {
				return false, nil
			}
			return err == nil, err
		}
		applied, err := is(pm.SizeBytes, pm.SHA256)
		if err != nil {
			return fmt.Errorf("prune: settling the interrupted merge of %s disk %d: %w", pm.BackupID, pm.Key, err)
		}
		if !applied {
			isOld, err := is(old.SizeBytes, old.SHA256)
			if err != nil {
				return fmt.Errorf("prune: settling the interrupted merge of %s disk %d: %w", pm.BackupID, pm.Key, err)
			}
			if !isOld {
				activity.GetLogger(ctx).Warn("an interrupted prune's merge: the image is neither the old one nor the merged one; left for the chain check",
					"backup", pm.BackupID, "disk", pm.Key, "path", path, "merged_image", repo.Resolve(pm.TempPath))
				continue
			}
		}
		if err := cat.SettleMerge(ctx, pm.BackupID, pm.Key, applied); err != nil {
			return permanent(err)
		}
		if !applied {
			if err := os.Remove(repo.Resolve(pm.TempPath)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		activity.GetLogger(ctx).Info("settled an interrupted prune's merge", "backup", pm.BackupID, "disk", pm.Key, "prune", pm.PruneID, "applied", applied)
	}
	return nil
}

// syncDir makes a folder's entries (a rename, a removal) durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
