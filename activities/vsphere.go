package activities

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// VSphere holds the activities that talk to vCenter.
type VSphere struct {
	Sessions *vsphere.Sessions
	Repo     *repository.Repository
	// Metrics receives the age of each snapshot removed; nil: none.
	Metrics Metrics
}

func (a *VSphere) client(ctx context.Context, profile string) (*vsphere.Client, error) {
	c, err := a.Sessions.Client(ctx, profile)
	return c, permanent(err)
}

// ResolveVM finds a VM by name, inventory path or moref, and says which
// vCenter holds it (by instance UUID, whatever the profile's name). With
// no profile given it uses the worker's default (vsphere.Sessions.
// DefaultProfile: configuration a workflow cannot read) and returns it,
// so that the backup keeps it from then on.
func (a *VSphere) ResolveVM(ctx context.Context, in ResolveVMInput) (*ResolveVMResult, error) {
	if in.VM == "" {
		return nil, temporal.NewNonRetryableApplicationError("no VM given", ErrTypeInvalidInput, nil)
	}
	profile := in.Profile
	if profile == "" {
		var err error
		if profile, err = a.Sessions.DefaultProfile(); err != nil {
			return nil, permanent(err)
		}
	}
	// The connect and the inventory search may take seconds: heartbeats
	// tell that from a dead worker (the workflow's HeartbeatTimeout).
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	c, err := a.client(ctx, profile)
	if err != nil {
		return nil, err
	}
	vm, err := c.FindVM(ctx, in.VM)
	if err != nil {
		return nil, permanent(err)
	}
	return &ResolveVMResult{Profile: profile, VMRef: vm.Ref, VMUUID: vm.UUID, VMName: vm.Name, VCenterUUID: c.InstanceUUID()}, nil
}

// PrepareVM reads the VM's disks, with what each holds on its datastore
// (AllocatedBytes), and enables CBT when it is off.
func (a *VSphere) PrepareVM(ctx context.Context, in PrepareVMInput) (*PrepareVMResult, error) {
	// Enabling CBT is a reconfigure task that may take a while: heartbeats
	// tell that from a dead worker.
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	c, err := a.client(ctx, in.Profile)
	if err != nil {
		return nil, err
	}
	vm, err := c.VMByUUID(ctx, in.VMUUID)
	if err != nil {
		return nil, permanent(err)
	}
	res := &PrepareVMResult{VMRef: vm.Ref, VMName: vm.Name}
	if !vm.CBTEnabled {
		changed, err := c.EnableCBT(ctx, vm)
		if err != nil {
			return nil, permanent(err)
		}
		res.CBTJustEnabled = changed
		if changed {
			activity.GetLogger(ctx).Info("enabled changed block tracking", "vm", vm.Name)
		}
	}
	// What each disk holds (its extents in the VM's file layout): the
	// space check's need for a full backup of it. A disk the layout does
	// not know counts with its capacity. A backup that asks for it only
	// where it backs up full (AllocatedBytes) skips it here.
	var allocated map[int32]int64
	if !in.SkipAllocation {
		if allocated, err = c.AllocatedBytes(ctx, vm); err != nil {
			return nil, permanent(err)
		}
	}
	for _, d := range vm.Disks {
		disk := VMDisk{Key: d.Key, Label: d.Label, Capacity: d.Capacity, FileName: d.FileName}
		if !in.SkipAllocation {
			disk.AllocatedBytes, disk.AllocatedUnknown = allocationOf(allocated, d.Key, d.Capacity)
		}
		res.Disks = append(res.Disks, disk)
	}
	return res, nil
}

// allocationOf is a disk's allocation as AllocatedBytes found it: its
// capacity, and unknown, when the layout does not know the disk.
func allocationOf(allocated map[int32]int64, key int32, capacity int64) (int64, bool) {
	n, known := allocated[key]
	if !known {
		return capacity, true
	}
	return n, false
}

// AllocatedBytes reads what each of the given disks of a VM holds on its
// datastore (vsphere.Client.AllocatedBytes: RefreshStorageInfo, then the
// VM's file layout): the space check's need for a full backup of them.
func (a *VSphere) AllocatedBytes(ctx context.Context, in AllocatedBytesInput) (*AllocatedBytesResult, error) {
	if in.VMRef == "" || len(in.Disks) == 0 {
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("allocated bytes: a VM moref (%q) and at least one disk (%d) are needed", in.VMRef, len(in.Disks)), ErrTypeInvalidInput, nil)
	}
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	c, err := a.client(ctx, in.Profile)
	if err != nil {
		return nil, err
	}
	vm := &vsphere.VM{Ref: in.VMRef, Name: in.VMName}
	for _, d := range in.Disks {
		vm.Disks = append(vm.Disks, vsphere.Disk{Key: d.Key, Capacity: d.Capacity})
	}
	allocated, err := c.AllocatedBytes(ctx, vm)
	if err != nil {
		return nil, permanent(err)
	}
	res := &AllocatedBytesResult{}
	for _, d := range in.Disks {
		d.AllocatedBytes, d.AllocatedUnknown = allocationOf(allocated, d.Key, d.Capacity)
		res.Disks = append(res.Disks, d)
	}
	return res, nil
}

// CreateSnapshot takes the backup's snapshot, "cbtflow-<backup id>", or
// finds it when an earlier attempt made it. The disks' change IDs are read
// from the snapshot's config.
func (a *VSphere) CreateSnapshot(ctx context.Context, in CreateSnapshotInput) (*CreateSnapshotResult, error) {
	c, err := a.client(ctx, in.Profile)
	if err != nil {
		return nil, err
	}
	// PrepareVM found the VM by its instance UUID: its moref is checked
	// against that UUID, and the VM looked up by it again only when the
	// moref no longer names it.
	vm, err := c.VMAt(ctx, in.VMRef, in.VMUUID)
	if err != nil {
		return nil, permanent(err)
	}
	if in.VMRef != "" && vm.Ref != in.VMRef {
		// The backup's later steps (its CBT queries, the snapshot's
		// removal) name the VM by the moref it began with: a snapshot taken
		// at the new one would be left for the sweeper.
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("VM %s (instance UUID %s) is at %s now, not at %s where this backup found it (removed from the inventory and added again?): no snapshot taken; back it up again",
				vm.Name, in.VMUUID, vm.Ref, in.VMRef), ErrTypeVMNotFound, nil)
	}
	name := SnapshotPrefix + in.BackupID
	stop := heartbeatEvery(ctx, 10*time.Second, nil)
	snap, err := c.CreateSnapshot(ctx, vm, name)
	stop()
	if err != nil {
		return nil, permanent(err)
	}
	res := &CreateSnapshotResult{SnapshotRef: snap.Ref, SnapshotName: snap.Name}
	for _, d := range snap.Disks {
		res.Disks = append(res.Disks, SnapshotDisk{Key: d.Key, Capacity: d.Capacity, FileName: d.FileName, ChangeID: d.ChangeID})
	}
	activity.GetLogger(ctx).Info("snapshot taken", "vm", vm.Name, "backup", in.BackupID, "snapshot", snap.Ref)
	faultpoint.Hold(ctx, faultpoint.AfterSnapshot)
	return res, nil
}

// ChangedAreas asks CBT for the areas of one disk that changed since
// ChangeID ("*": the allocated areas) and writes them to a file in the
// backup's staging folder.
func (a *VSphere) ChangedAreas(ctx context.Context, in ChangedAreasInput) (*ChangedAreasResult, error) {
	c, err := a.client(ctx, in.Profile)
	if err != nil {
		return nil, err
	}
	dir, err := a.Repo.StagingDir(in.BackupID)
	if err != nil {
		return nil, temporal.NewNonRetryableApplicationError(err.Error(), ErrTypeInvalidInput, err)
	}
	// A moref alone proves nothing after a vCenter restart: the change
	// IDs and areas must be those of this backup's snapshot.
	if _, err := c.CheckSnapshot(ctx, in.VMRef, in.SnapshotRef, SnapshotPrefix+in.BackupID); err != nil {
		return nil, snapshotErr(fmt.Sprintf("disk %d", in.Key), err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, permanent(err)
	}
	var extents []copier.Extent
	var changed int64
	stop := heartbeatEvery(ctx, 10*time.Second, nil)
	err = c.QueryChangedAreas(ctx, in.VMRef, in.SnapshotRef, in.Key, in.Capacity, in.ChangeID, func(off, n int64) error {
		if n <= 0 {
			return nil
		}
		changed += n
		if k := len(extents) - 1; k >= 0 && extents[k].End() == off {
			extents[k].Length += n
			return nil
		}
		extents = append(extents, copier.Extent{Offset: off, Length: n})
		return nil
	})
	stop()
	if err != nil {
		var cbt *vsphere.CBTError
		if errors.As(err, &cbt) {
			switch {
			case cbt.Fault == "NotFound":
				return nil, temporal.NewNonRetryableApplicationError(
					fmt.Sprintf("disk %d: snapshot %s is gone: %s", in.Key, in.SnapshotRef, cbt.Msg), ErrTypeSnapshotGone, err)
			case cbt.FirstQuery && in.ChangeID != "*" && (cbt.Fault == "InvalidArgument" || cbt.Fault == "FileFault"):
				return nil, temporal.NewNonRetryableApplicationError(
					fmt.Sprintf("disk %d: change ID %s refused (%s: %s)", in.Key, in.ChangeID, cbt.Fault, cbt.Msg), ErrTypeCBTReset, err)
			default:
				return nil, temporal.NewNonRetryableApplicationError(
					fmt.Sprintf("disk %d: changed areas since %s: %s: %s", in.Key, in.ChangeID, cbt.Fault, cbt.Msg), ErrTypeCBTQuery, err)
			}
		}
		return nil, permanent(err)
	}
	file := filepath.Join(dir, strconv.Itoa(int(in.Key))+".extents.json")
	if err := writeExtents(file, extents); err != nil {
		return nil, permanent(err)
	}
	return &ChangedAreasResult{ExtentsFile: file, Extents: len(extents), ChangedBytes: changed}, nil
}

// RemoveSnapshot removes the backup's snapshot, and never another: by
// moref only while the moref still names SnapshotName on the VM; else the
// snapshot named SnapshotName, if any (see vsphere.RemoveOwnSnapshot). A
// snapshot already gone, or gone with its VM, is no error.
func (a *VSphere) RemoveSnapshot(ctx context.Context, in RemoveSnapshotInput) error {
	faultpoint.Hold(ctx, faultpoint.BeforeRemoveSnapshot)
	if !strings.HasPrefix(in.SnapshotName, SnapshotPrefix) || in.SnapshotName == SnapshotPrefix {
		return temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("refusing to remove snapshot %q (%s): cbtflow removes only its own %s<backup id> snapshots", in.SnapshotName, in.SnapshotRef, SnapshotPrefix),
			ErrTypeInvalidInput, nil)
	}
	c, err := a.client(ctx, in.Profile)
	if err != nil {
		return err
	}
	stop := heartbeatEvery(ctx, 10*time.Second, nil)
	defer stop()
	removed, err := c.RemoveOwnSnapshot(ctx, in.VMRef, in.SnapshotRef, in.SnapshotName)
	if err != nil {
		return permanent(err)
	}
	log := activity.GetLogger(ctx)
	switch {
	case removed == "":
		log.Info("no snapshot to remove", "snapshot", in.SnapshotRef, "snapshot_name", in.SnapshotName)
	case removed != in.SnapshotRef && in.SnapshotRef != "":
		log.Warn("snapshot removed by name: its moref names another snapshot now", "snapshot", removed,
			"snapshot_name", in.SnapshotName, "moref_given", in.SnapshotRef)
	default:
		log.Info("snapshot removed", "snapshot", removed, "snapshot_name", in.SnapshotName)
	}
	// The snapshot is taken right after its backup begins: its age is
	// counted from the backup ID's timestamp.
	if began, ok := BackupStart(strings.TrimPrefix(in.SnapshotName, SnapshotPrefix)); ok && removed != "" {
		metricsOr(a.Metrics).SnapshotRemoved(time.Since(began))
	}
	return nil
}

// snapshotErr turns a failed identity check of the backup's snapshot into
// the activity's error; what names the disk. A moref that names another
// snapshot is permanent (ErrTypeSnapshotIdentity), and so is a snapshot
// that vanished, alone or with its VM (ErrTypeSnapshotGone); anything else
// (an unreachable vCenter) goes through permanent.
func snapshotErr(what string, err error) error {
	switch {
	case errors.Is(err, vsphere.ErrSnapshotIdentity):
		return temporal.NewNonRetryableApplicationError(what+": "+err.Error(), ErrTypeSnapshotIdentity, err)
	case errors.Is(err, vsphere.ErrSnapshotNotFound):
		return temporal.NewNonRetryableApplicationError(what+": "+err.Error(), ErrTypeSnapshotGone, err)
	}
	return permanent(err)
}

// writeExtents writes extents as a JSON array, atomically.
func writeExtents(path string, extents []copier.Extent) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	if extents == nil {
		extents = []copier.Extent{}
	}
	if err := json.NewEncoder(w).Encode(extents); err != nil {
		f.Close()
		return err
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// readExtents reads a file written by writeExtents.
func readExtents(path string) ([]copier.Extent, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var extents []copier.Extent
	if err := json.Unmarshal(b, &extents); err != nil {
		return nil, fmt.Errorf("extents file %s: %w", path, err)
	}
	return extents, nil
}

// heartbeatEvery heartbeats with details from fn (or none) until stop is
// called, so a long vCenter call does not look like a dead worker.
func heartbeatEvery(ctx context.Context, every time.Duration, fn func() any) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
				if fn != nil {
					activity.RecordHeartbeat(ctx, fn())
				} else {
					activity.RecordHeartbeat(ctx)
				}
			}
		}
	}()
	return func() { close(done) }
}
