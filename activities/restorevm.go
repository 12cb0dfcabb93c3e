package activities

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/restore"
	"github.com/cbtflow/cbtflow/internal/source"
	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// VMRestorer holds the activities of a restore into a VM (the RestoreVM
// workflow): a restore point's disks written back over NBD into a
// powered-off VM's disks, through the same source layer backups read
// from (nbdkit's vddk plugin in write mode; in the lab, the VM's live
// disk image), after a snapshot the operator can revert to.
type VMRestorer struct {
	Sessions *vsphere.Sessions
	Catalog  *catalog.Catalog
	Repo     *repository.Repository
	// RuntimeDir holds the private folders of NBD sockets, as in
	// Transfer. Default: $TMPDIR/cbtflow-<uid>.
	RuntimeDir string
	// Copy is the template of the copier's options.
	Copy copier.Options
	// Writers opens a VM's disk for writing; source.NewWriter when nil.
	Writers func(vsphere.Profile) (source.WriteOpener, error)
}

// RestoreSnapshotPrefix starts the name of the snapshot a restore into a
// VM takes before its first write: cbtflow-restore-<restore id>. It is
// removed when the restore completes and kept when it fails, for the
// operator to revert to; the sweeper never removes it.
const RestoreSnapshotPrefix = SnapshotPrefix + "restore-"

// ErrTypeVMPoweredOn: the VM to restore into is not powered off. The
// message names it and says to power it off.
const ErrTypeVMPoweredOn = "VMPoweredOn"

// The modes of a disk's restore into a VM.
const (
	// RestoreDiffering: only the areas where the VM's disk differs from
	// the restore point are written (CBT since the point's change ID).
	RestoreDiffering = "differing areas"
	// RestoreWholeDisk: the point's allocated areas are written and the
	// rest of the disk is zeroed.
	RestoreWholeDisk = "whole disk"
)

// The stages of a WriteVMDisk, in its heartbeat details.
const (
	VMRestoreStageVerifying = restore.StageVerifying // the chain's images read back against their SHA-256
	VMRestoreStageWriting   = "writing-vm"           // the point's data written into the VM's disk
)

// PlanRestoreVMInput names a restore point and the VM to write it into.
type PlanRestoreVMInput struct {
	BackupID string `json:"backup_id"`
	// VM is the target, by name, inventory path or moref.
	VM string `json:"vm"`
	// Profile is the vCenter profile to reach it through; empty: the
	// restore point's.
	Profile string `json:"profile,omitempty"`
	// DiskKey restricts the restore to one disk; 0: every disk of the
	// point.
	DiskKey int32 `json:"disk_key,omitempty"`
	// ByOrder matches the point's disks with the VM's in order (of their
	// keys), not by key: a VM CreateRestoreVM made gives its disks keys
	// of its own.
	ByOrder bool `json:"by_order,omitempty"`
}

// RestoreVMDisk is one disk to write.
type RestoreVMDisk struct {
	Key int32 `json:"key"` // the restore point's
	// VMKey is the VM's disk written; 0: Key.
	VMKey    int32 `json:"vm_key,omitempty"`
	Capacity int64 `json:"capacity"`
	// ChangeID is the point's change ID of the disk (its snapshot's):
	// CBT since it, on the restore's snapshot, says where the VM's disk
	// differs from the point.
	ChangeID string `json:"change_id,omitempty"`
	// Differential says CBT may be asked; when false, Why says why the
	// whole disk is written.
	Differential bool   `json:"differential"`
	Why          string `json:"why,omitempty"`
}

// PlanRestoreVMResult is the restore's plan.
type PlanRestoreVMResult struct {
	BackupID    string          `json:"backup_id"`
	PointVM     string          `json:"point_vm"` // the VM the point was taken of
	Profile     string          `json:"profile"`
	VMRef       string          `json:"vm_ref"`
	VMUUID      string          `json:"vm_uuid"`
	VMName      string          `json:"vm_name"`
	VCenterUUID string          `json:"vcenter_uuid,omitempty"`
	Disks       []RestoreVMDisk `json:"disks"`
}

// BeginVMRestoreInput records a restore into a VM before it writes.
type BeginVMRestoreInput struct {
	RestoreID  string `json:"restore_id"`
	Profile    string `json:"profile"`
	VMUUID     string `json:"vm_uuid"`
	VMName     string `json:"vm_name"`
	BackupID   string `json:"backup_id"`
	WorkflowID string `json:"workflow_id"`
}

// RestoreSnapshotInput asks for the restore's snapshot.
type RestoreSnapshotInput struct {
	RestoreID string `json:"restore_id"`
	Profile   string `json:"profile"`
	VMUUID    string `json:"vm_uuid"`
}

// RestoreSnapshotResult is the snapshot taken.
type RestoreSnapshotResult struct {
	SnapshotRef  string `json:"snapshot_ref"`
	SnapshotName string `json:"snapshot_name"`
}

// WriteVMDiskInput is one disk written into the VM.
type WriteVMDiskInput struct {
	RestoreID    string        `json:"restore_id"`
	BackupID     string        `json:"backup_id"`
	Profile      string        `json:"profile"`
	VMRef        string        `json:"vm_ref"`
	VMUUID       string        `json:"vm_uuid"`
	SnapshotRef  string        `json:"snapshot_ref"`
	SnapshotName string        `json:"snapshot_name"`
	Disk         RestoreVMDisk `json:"disk"`
}

// WriteVMDiskResult says what was written.
type WriteVMDiskResult struct {
	Key  int32  `json:"key"`
	Mode string `json:"mode"` // RestoreDiffering or RestoreWholeDisk
	Why  string `json:"why"`
	// DifferingBytes is what CBT reported as differing (differing areas),
	// or the disk's capacity (whole disk).
	DifferingBytes int64   `json:"differing_bytes"`
	WrittenBytes   int64   `json:"written_bytes"` // data written
	ZeroedBytes    int64   `json:"zeroed_bytes"`  // written as NBD zeroes
	Seconds        float64 `json:"seconds"`
}

// VMRestoreProgress is the heartbeat detail of WriteVMDisk: the stage,
// Done of Total bytes of it (the chain's images read back; the areas to
// write), the rate, and the resume point of the writing in its mode.
type VMRestoreProgress struct {
	Key         int32   `json:"key"`
	Stage       string  `json:"stage"`
	Mode        string  `json:"mode,omitempty"`
	Done        int64   `json:"done"`
	Total       int64   `json:"total"`
	Rate        float64 `json:"rate,omitempty"`
	ResumePoint int64   `json:"resume_point,omitempty"`
}

// CreateRestoreVMInput asks for a new VM to restore a point into.
type CreateRestoreVMInput struct {
	RestoreID string `json:"restore_id"`
	BackupID  string `json:"backup_id"`
	Profile   string `json:"profile,omitempty"` // empty: the point's
	// Beside is the VM whose folder, resource pool, host and datastore
	// the new VM gets (name, inventory path or moref).
	Beside string `json:"beside"`
	Name   string `json:"name"`
}

// CreateRestoreVMResult is the VM made.
type CreateRestoreVMResult struct {
	VMRef  string `json:"vm_ref"`
	VMName string `json:"vm_name"`
}

// FinishVMRestoreInput records a restore's outcome.
type FinishVMRestoreInput struct {
	RestoreID string `json:"restore_id"`
	Outcome   string `json:"outcome"` // completed or failed
	Error     string `json:"error,omitempty"`
}

func refusedRestore(msg string) error {
	return temporal.NewNonRetryableApplicationError(msg, ErrTypeRestoreRefused, nil)
}

func poweredOn(vm, ref, state string) error {
	return temporal.NewNonRetryableApplicationError(fmt.Sprintf(
		"VM %q (%s) is %s: power it off before restoring into it (a restore writes the VM's disks, which needs it powered off)",
		vm, ref, state), ErrTypeVMPoweredOn, nil)
}

// requirePoweredOff refuses, non-retryably and by name, a VM that is not
// powered off (poweredOn); a power state that cannot be read fails too.
func requirePoweredOff(ctx context.Context, c *vsphere.Client, vm *vsphere.VM) error {
	state, err := c.PowerState(ctx, vm.Ref)
	if err != nil {
		return permanent(err)
	}
	if state != vsphere.PoweredOff {
		return poweredOn(vm.Name, vm.Ref, state)
	}
	return nil
}

// restorePoint is the catalog's committed backup backupID; an unknown or
// uncommitted one is refused non-retryably (NoRestorePoint).
func (a *VMRestorer) restorePoint(ctx context.Context, backupID string) (*catalog.Backup, error) {
	b, err := a.Catalog.Get(ctx, backupID)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore: backup %s does not exist", backupID), ErrTypeNoRestorePoint, nil)
	}
	if err != nil {
		return nil, permanent(err)
	}
	if b.Status != catalog.StatusCommitted {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore: backup %s is %s, not a restore point", backupID, b.Status), ErrTypeNoRestorePoint, nil)
	}
	return b, nil
}

// PlanRestoreVM looks the restore point up, finds the VM to write it
// into and matches their disks by key. It refuses, non-retryably and by
// name, what no retry mends: an unknown or uncommitted point
// (NoRestorePoint), an unknown VM (VMNotFound), a VM that is not powered
// off (VMPoweredOn), a VM whose backup runs or into which another restore
// has not ended, a disk the VM lacks or whose capacity differs from the
// point's (RestoreRefused).
func (a *VMRestorer) PlanRestoreVM(ctx context.Context, in PlanRestoreVMInput) (*PlanRestoreVMResult, error) {
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	b, err := a.restorePoint(ctx, in.BackupID)
	if err != nil {
		return nil, err
	}
	profile := cmp.Or(in.Profile, b.Profile)
	c, err := a.Sessions.Client(ctx, profile)
	if err != nil {
		return nil, permanent(err)
	}
	vm, err := c.FindVM(ctx, in.VM)
	if err != nil {
		return nil, permanent(err)
	}
	if err := requirePoweredOff(ctx, c, vm); err != nil {
		return nil, err
	}
	running, err := a.Catalog.List(ctx, catalog.ListFilter{VM: vm.UUID, Status: catalog.StatusRunning})
	if err != nil {
		return nil, permanent(err)
	}
	if len(running) > 0 {
		return nil, refusedRestore(fmt.Sprintf("restore: backup %s of VM %q is running: restore into the VM once it ended (starter status %s)",
			running[0].ID, vm.Name, vm.Name))
	}
	// Two restores into one VM would write its disks at once (and the
	// second's snapshot would hold the first's half-written disks): the
	// starter gives each restore a workflow ID of its own, so the catalog
	// says whether another one has not ended.
	others, err := a.Catalog.UnfinishedVMRestores(ctx, vm.UUID)
	if err != nil {
		return nil, permanent(err)
	}
	self := activity.GetInfo(ctx).WorkflowExecution.ID
	for _, r := range others {
		if r.WorkflowID == self {
			continue
		}
		return nil, refusedRestore(fmt.Sprintf("restore: restore %s of backup %s into VM %q (workflow %s) has not ended: wait for it to end, or cancel it (starter cancel %s), before restoring into the VM again",
			r.ID, r.BackupID, vm.Name, r.WorkflowID, r.WorkflowID))
	}
	res := &PlanRestoreVMResult{BackupID: b.ID, PointVM: b.VMName, Profile: profile, VMRef: vm.Ref, VMUUID: vm.UUID,
		VMName: vm.Name, VCenterUUID: c.InstanceUUID()}
	vmDisks := map[int32]vsphere.Disk{}
	var keys []string
	for _, d := range vm.Disks {
		vmDisks[d.Key] = d
		keys = append(keys, strconv.Itoa(int(d.Key)))
	}
	if in.ByOrder {
		if len(vm.Disks) != len(b.Disks) {
			return nil, refusedRestore(fmt.Sprintf("restore: VM %q has %d disks, restore point %s has %d", vm.Name, len(vm.Disks), b.ID, len(b.Disks)))
		}
		vmDisks = map[int32]vsphere.Disk{}
		ordered := slices.SortedFunc(slices.Values(vm.Disks), func(x, y vsphere.Disk) int { return int(x.Key) - int(y.Key) })
		for i, d := range b.Disks { // sorted by key
			vmDisks[d.Key] = ordered[i]
		}
	}
	found := false
	for _, d := range b.Disks {
		if in.DiskKey != 0 && d.Key != in.DiskKey {
			continue
		}
		found = true
		if d.Damaged != "" {
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore: restore point %s disk %d is marked damaged: %s",
				b.ID, d.Key, d.Damaged), ErrTypeRestorePointDamaged, nil)
		}
		vd, ok := vmDisks[d.Key]
		switch {
		case !ok:
			return nil, refusedRestore(fmt.Sprintf("restore: VM %q has no disk %d (its disks: %s); restore into a new VM with --new-vm NAME",
				vm.Name, d.Key, strings.Join(keys, ", ")))
		case vd.Capacity != d.Capacity:
			return nil, refusedRestore(fmt.Sprintf("restore: disk %d of VM %q has %d bytes, restore point %s's has %d: restore into a new VM with --new-vm NAME",
				d.Key, vm.Name, vd.Capacity, b.ID, d.Capacity))
		}
		rd := RestoreVMDisk{Key: d.Key, Capacity: d.Capacity, ChangeID: d.ChangeID}
		if vd.Key != d.Key {
			rd.VMKey = vd.Key
		}
		switch {
		case vm.UUID != b.VMUUID:
			rd.Why = fmt.Sprintf("VM %q is not the restore point's VM %q: CBT cannot say what differs", vm.Name, b.VMName)
		case d.ChangeID == "":
			rd.Why = "the restore point has no change ID for the disk"
		case !vm.CBTEnabled:
			rd.Why = "changed block tracking is off on the VM"
		default:
			rd.Differential = true
		}
		res.Disks = append(res.Disks, rd)
	}
	if !found {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore: backup %s has no disk %d", in.BackupID, in.DiskKey), ErrTypeNoRestorePoint, nil)
	}
	return res, nil
}

// BeginVMRestore records the restore in the catalog before anything is
// written: from then on the next backup of the VM is full, whatever the
// restore's outcome (catalog.RestoredSince). Idempotent.
func (a *VMRestorer) BeginVMRestore(ctx context.Context, in BeginVMRestoreInput) error {
	if err := repository.CheckComponent("restore ID", in.RestoreID); err != nil {
		return temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeInvalidInput, err)
	}
	return permanent(a.Catalog.BeginVMRestore(ctx, catalog.VMRestore{ID: in.RestoreID, Profile: in.Profile, VMUUID: in.VMUUID,
		VMName: in.VMName, BackupID: in.BackupID, WorkflowID: in.WorkflowID}))
}

// CreateRestoreSnapshot takes the restore's snapshot,
// cbtflow-restore-<restore id>, or finds it when an earlier attempt made
// it, after checking again that the VM is powered off; it records the
// snapshot in the catalog's row of the restore.
func (a *VMRestorer) CreateRestoreSnapshot(ctx context.Context, in RestoreSnapshotInput) (*RestoreSnapshotResult, error) {
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	c, err := a.Sessions.Client(ctx, in.Profile)
	if err != nil {
		return nil, permanent(err)
	}
	vm, err := c.VMByUUID(ctx, in.VMUUID)
	if err != nil {
		return nil, permanent(err)
	}
	if err := requirePoweredOff(ctx, c, vm); err != nil {
		return nil, err
	}
	name := RestoreSnapshotPrefix + in.RestoreID
	snap, err := c.CreateSnapshotDescribed(ctx, vm, name,
		"cbtflow restore "+in.RestoreID+": the VM before the restore (removed when it completes; revert to it to undo a failed restore)")
	if err != nil {
		return nil, permanent(err)
	}
	if err := a.Catalog.SetVMRestoreSnapshot(ctx, in.RestoreID, fmt.Sprintf("%s (%s)", snap.Name, snap.Ref)); err != nil {
		return nil, permanent(err)
	}
	activity.GetLogger(ctx).Info("restore snapshot taken", "vm", vm.Name, "restore", in.RestoreID, "snapshot", snap.Ref)
	return &RestoreSnapshotResult{SnapshotRef: snap.Ref, SnapshotName: snap.Name}, nil
}

// CreateRestoreVM creates a powered-off VM beside another (its folder,
// resource pool, host and datastore) with thin disks of the restore
// point's capacities, in the order of their keys, for a restore into a
// new VM. Idempotent: the VM an earlier attempt made (its notes name this
// restore) is found and returned. A name another VM has is refused
// (RestoreRefused).
func (a *VMRestorer) CreateRestoreVM(ctx context.Context, in CreateRestoreVMInput) (*CreateRestoreVMResult, error) {
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	b, err := a.restorePoint(ctx, in.BackupID)
	if err != nil {
		return nil, err
	}
	profile := cmp.Or(in.Profile, b.Profile)
	c, err := a.Sessions.Client(ctx, profile)
	if err != nil {
		return nil, permanent(err)
	}
	beside, err := c.FindVM(ctx, in.Beside)
	if err != nil {
		return nil, permanent(err)
	}
	var capacities []int64
	for _, d := range b.Disks {
		capacities = append(capacities, d.Capacity)
	}
	vm, err := c.CreateVMBeside(ctx, beside.Ref, in.Name, capacities,
		fmt.Sprintf("cbtflow restore %s of backup %s (VM %s)", in.RestoreID, b.ID, b.VMName))
	if errors.Is(err, vsphere.ErrVMNameTaken) {
		return nil, refusedRestore(fmt.Sprintf("restore: --new-vm %q: %v: choose another name", in.Name, err))
	}
	if err != nil {
		return nil, permanent(err)
	}
	activity.GetLogger(ctx).Info("VM created for the restore", "vm", vm.Name, "vm_ref", vm.Ref, "beside", beside.Name, "restore", in.RestoreID)
	return &CreateRestoreVMResult{VMRef: vm.Ref, VMName: vm.Name}, nil
}

// FinishVMRestore records the restore's outcome in the catalog.
func (a *VMRestorer) FinishVMRestore(ctx context.Context, in FinishVMRestoreInput) error {
	err := a.Catalog.FinishVMRestore(ctx, in.RestoreID, in.Outcome, in.Error)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil // never begun: nothing to record
	}
	return permanent(err)
}

func (a *VMRestorer) writer(p vsphere.Profile) (source.WriteOpener, error) {
	if a.Writers != nil {
		return a.Writers(p)
	}
	return source.NewWriter(p)
}

func (a *VMRestorer) runtimeDir() (string, error) {
	dir := a.RuntimeDir
	if dir == "" {
		dir = filepath.Join(os.TempDir(), fmt.Sprintf("cbtflow-%d", os.Getuid()))
	}
	return dir, os.MkdirAll(dir, 0o700)
}

// WriteVMDisk writes one disk of the restore point into the VM's disk.
// It verifies the point's chain against the catalog first (as a restore
// into a file does), checks that the restore's snapshot is still the one
// it took and that the VM is powered off, then decides what to write:
//
//   - differing areas, when the plan allows it: CBT since the point's
//     change ID, asked on the restore's snapshot, covers every area where
//     the VM's disk may differ from the point; the point's data is
//     written there, and zeroes where the point has none;
//   - the whole disk, when CBT cannot say (a refused change ID: the VM's
//     CBT was reset, the change ID is of another series, the lab
//     restarted) or the plan says so: the point's allocated areas as
//     data, NBD zeroes everywhere else.
//
// The point is served read-only by qemu-nbd from its top image and
// copied by the copier into the VM's disk, opened for writing through
// the source layer. Every attempt writes the same data to the same
// places, so a retry is safe; it resumes from the resume point it
// heartbeated (advanced only after a FLUSH) when it writes in the same
// mode.
func (a *VMRestorer) WriteVMDisk(ctx context.Context, in WriteVMDiskInput) (*WriteVMDiskResult, error) {
	start := time.Now()
	log := activity.GetLogger(ctx)
	key := in.Disk.Key
	var resume VMRestoreProgress
	if activity.HasHeartbeatDetails(ctx) {
		if err := activity.GetHeartbeatDetails(ctx, &resume); err != nil || resume.Key != key {
			resume = VMRestoreProgress{}
		}
	}
	var mu sync.Mutex
	latest := VMRestoreProgress{Key: key, Stage: VMRestoreStageVerifying}
	beat := func() {
		mu.Lock()
		p := latest
		mu.Unlock()
		activity.RecordHeartbeat(ctx, p)
	}
	set := func(p VMRestoreProgress) {
		mu.Lock()
		latest = p
		mu.Unlock()
		beat()
	}
	stop := heartbeatEvery(ctx, restoreBeat, func() any {
		mu.Lock()
		defer mu.Unlock()
		return latest
	})
	defer stop()
	beat()

	// The chain is proven before a byte of the VM is written.
	meter := newRateMeter()
	chain, err := restore.VerifyChain(ctx, a.Catalog, restore.Options{BackupID: in.BackupID, DiskKey: key, Repository: a.Repo.Root(),
		Progress: func(p restore.Progress) {
			set(VMRestoreProgress{Key: key, Stage: VMRestoreStageVerifying, Done: p.Done, Total: p.Total, Rate: meter.observe(time.Now(), p.Done)})
		}})
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, restoreError(err)
	}
	if chain.Bytes != in.Disk.Capacity {
		return nil, refusedRestore(fmt.Sprintf("restore: restore point %s disk %d holds %d bytes, the VM's disk %d", in.BackupID, key, chain.Bytes, in.Disk.Capacity))
	}

	profile, err := a.Sessions.Profile(in.Profile)
	if err != nil {
		return nil, permanent(err)
	}
	vc, err := a.Sessions.Client(ctx, in.Profile)
	if err != nil {
		return nil, permanent(err)
	}
	what := fmt.Sprintf("disk %d of VM %s (%s)", key, in.VMRef, in.VMUUID)
	if _, err := vc.CheckSnapshot(ctx, in.VMRef, in.SnapshotRef, in.SnapshotName); err != nil {
		return nil, snapshotErr(what, err)
	}
	vm, err := vc.VMByUUID(ctx, in.VMUUID)
	if err != nil {
		return nil, permanent(err)
	}
	if err := requirePoweredOff(ctx, vc, vm); err != nil {
		return nil, err
	}
	vmKey := key
	if in.Disk.VMKey != 0 {
		vmKey = in.Disk.VMKey
	}
	i := slices.IndexFunc(vm.Disks, func(d vsphere.Disk) bool { return d.Key == vmKey })
	if i < 0 || vm.Disks[i].Capacity != in.Disk.Capacity {
		return nil, refusedRestore(fmt.Sprintf("restore: VM %q no longer has disk %d of %d bytes", vm.Name, vmKey, in.Disk.Capacity))
	}
	live := vm.Disks[i] // the disk the VM writes now: the delta of the restore's snapshot

	mode, why := RestoreWholeDisk, in.Disk.Why
	extents := []copier.Extent{{Offset: 0, Length: in.Disk.Capacity}}
	differing := in.Disk.Capacity
	if in.Disk.Differential {
		var areas []copier.Extent
		var n int64
		err := vc.QueryChangedAreas(ctx, in.VMRef, in.SnapshotRef, vmKey, in.Disk.Capacity, in.Disk.ChangeID, func(off, l int64) error {
			n += l
			if k := len(areas) - 1; k >= 0 && areas[k].End() == off {
				areas[k].Length += l
				return nil
			}
			areas = append(areas, copier.Extent{Offset: off, Length: l})
			return nil
		})
		var cbt *vsphere.CBTError
		switch {
		case err == nil:
			mode, extents, differing = RestoreDiffering, areas, n
			why = fmt.Sprintf("CBT since the restore point's change ID %s reports %d bytes that differ", in.Disk.ChangeID, n)
		case errors.As(err, &cbt) && cbt.Fault == "NotFound":
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("%s: the restore's snapshot %s is gone: %s", what, in.SnapshotRef, cbt.Msg), ErrTypeSnapshotGone, err)
		case errors.As(err, &cbt):
			why = fmt.Sprintf("CBT cannot say what differs since the restore point (%s: %s)", cbt.Fault, cbt.Msg)
		default:
			return nil, permanent(err)
		}
	}
	log.Info("writing a restore point's disk into the VM", "vm", vm.Name, "disk", key, "backup", in.BackupID, "mode", mode,
		"why", why, "bytes", differing)

	opts := a.Copy
	if resume.Mode == mode && resume.Stage == VMRestoreStageWriting {
		opts.ResumeFrom = resume.ResumePoint
		log.Info("resuming the write into the VM", "disk", key, "resume_point", resume.ResumePoint)
	}
	written := VMRestoreProgress{Key: key, Stage: VMRestoreStageWriting, Mode: mode, Total: differing, ResumePoint: opts.ResumeFrom}
	set(written)
	var res *copier.Result
	if len(extents) > 0 {
		runDir, err := a.runtimeDir()
		if err != nil {
			return nil, permanent(err)
		}
		base := filepath.Join(runDir, "restore-"+in.RestoreID+"-"+strconv.Itoa(int(key)))
		src, err := qemu.StartQemuNBD(ctx, qemu.QemuNBDOptions{Image: chain.Chain[0], Format: "qcow2", ReadOnly: true, Dir: base + "-r"})
		if err != nil {
			return nil, permanent(err)
		}
		defer src.Close()
		wr, err := a.writer(profile)
		if err != nil {
			return nil, permanent(err)
		}
		dst, err := wr.OpenWrite(ctx, source.WriteRequest{Profile: profile, VMRef: vm.Ref,
			Disk: vsphere.Disk{Key: vmKey, Capacity: live.Capacity, FileName: live.FileName}, Dir: base + "-w"})
		if errors.Is(err, source.ErrPoweredOn) {
			return nil, poweredOn(vm.Name, vm.Ref, "not powered off")
		}
		if err != nil {
			return nil, permanent(err)
		}
		defer dst.Close()
		opts.Source, opts.Target = src.URI(), dst.URI()
		opts.Extents = extents
		// Zeroes are written, never skipped: the VM's disk holds other
		// data where the point has none.
		opts.Overlay = true
		if faultpoint.Active(ctx) && opts.ProgressInterval == 0 {
			opts.ProgressInterval = 10 * time.Millisecond
		}
		halfway := false
		rate := newRateMeter()
		opts.Progress = func(p copier.Progress) {
			set(VMRestoreProgress{Key: key, Stage: VMRestoreStageWriting, Mode: mode, Done: p.Done, Total: p.Total,
				Rate: rate.observe(time.Now(), p.Done), ResumePoint: p.ResumePoint})
			// Half the disk written, or, for a copy whose progress came
			// no sooner (a small disk, a busy machine), at its end, before
			// the power state is read again: the hold is always met.
			if faultpoint.Enabled && !halfway && p.Total > 0 && p.Done*2 >= p.Total {
				halfway = true
				faultpoint.Hold(ctx, faultpoint.MidVMRestore)
			}
		}
		res, err = copier.Copy(ctx, opts)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, permanent(fmt.Errorf("restore: disk %d into VM %q: %w", key, vm.Name, err))
		}
		// The copy ended with a FLUSH: the data is durable in the VM's disk.
		if err := dst.Close(); err != nil {
			return nil, fmt.Errorf("restore: disk %d into VM %q: stopping nbdkit: %w", key, vm.Name, err)
		}
		// The power state was checked before the write began; a VM
		// started meanwhile (vSphere's lock on a disk VDDK writes
		// forbids it, the lab's live image does not) wrote into the disk
		// while it was restored: the disk is neither the point nor the
		// VM's, and no retry can tell which areas it wrote.
		state, err := vc.PowerState(ctx, vm.Ref)
		if err != nil {
			return nil, permanent(err)
		}
		if state != vsphere.PoweredOff {
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf(
				"VM %q (%s) was powered on while its disk %d was being restored (now %s): the disk mixes the restore point with what the VM wrote; power it off and restore again",
				vm.Name, vm.Ref, vmKey, state), ErrTypeVMPoweredOn, nil)
		}
	} else {
		res = &copier.Result{}
	}
	took := time.Since(start)
	log.Info("disk restored into the VM", "vm", vm.Name, "disk", key, "backup", in.BackupID, "mode", mode,
		"written", res.Written, "zeroed", res.Zeroed, "seconds", took.Seconds())
	return &WriteVMDiskResult{Key: key, Mode: mode, Why: why, DifferingBytes: differing, WrittenBytes: res.Written,
		ZeroedBytes: res.Zeroed, Seconds: took.Seconds()}, nil
}
