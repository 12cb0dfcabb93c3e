package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab/labapi"
)

// Errors of the Go API and the lab endpoints (defined with the endpoints'
// contract in labapi, so that a client matches them without linking the
// simulator); test with errors.Is.
var (
	ErrUnknownVM       = labapi.ErrUnknownVM
	ErrUnknownDisk     = labapi.ErrUnknownDisk
	ErrUnknownSnapshot = labapi.ErrUnknownSnapshot
	ErrOutOfRange      = labapi.ErrOutOfRange
	ErrImage           = labapi.ErrImage
	ErrPoweredOn       = labapi.ErrPoweredOn
)

// chunkSize is the unit of guest I/O: each chunk of a write is atomic with
// respect to a snapshot, as a guest's write request is.
const chunkSize = 1 << 20

// The Go API answers with the endpoints' types, so that a test reads the
// same values in process and over HTTP.
type (
	// DiskInfo describes a tracked disk of a VM.
	DiskInfo = labapi.DiskInfo
	// ImageInfo locates the frozen image of a snapshot's disk.
	ImageInfo = labapi.ImageInfo
	// VMInfo describes a VM.
	VMInfo = labapi.VMInfo
	// Extent is a byte range of a disk.
	Extent = labapi.Extent
	// Stamp is one change ID the lab gave a disk when a snapshot was taken.
	Stamp = labapi.Stamp
)

func (l *Lab) lockCtx() *simulator.Context {
	return &simulator.Context{Map: l.model.Service.Context.Map}
}

// findVM resolves a VM by moref value or by name, as given to CreateVM
// ("web/01") or as stored ("web%2f01").
func (l *Lab) findVM(name string) (*simulator.VirtualMachine, error) {
	reg := l.model.Service.Context.Map
	if vm, ok := reg.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: name}).(*simulator.VirtualMachine); ok {
		return vm, nil
	}
	found := l.vmsNamed(name)
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("lab: %w %q", ErrUnknownVM, name)
	case 1:
		return found[0], nil
	}
	return nil, fmt.Errorf("lab: %w: %q names more than one VM", ErrUnknownVM, name)
}

// vmsNamed returns the VMs whose stored name is name or its escaped form.
func (l *Lab) vmsNamed(name string) []*simulator.VirtualMachine {
	reg := l.model.Service.Context.Map
	escaped := EscapeName(name)
	var found []*simulator.VirtualMachine
	for _, e := range reg.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		var n string
		reg.WithLock(l.lockCtx(), vm, func() { n = vm.Name })
		if n == name || n == escaped {
			found = append(found, vm)
		}
	}
	return found
}

// Disks lists the tracked disks of a VM (by name or moref value).
func (l *Lab) Disks(vmName string) ([]DiskInfo, error) {
	vm, err := l.findVM(vmName)
	if err != nil {
		return nil, err
	}
	var out []DiskInfo
	l.model.Service.Context.Map.WithLock(l.lockCtx(), vm, func() {
		for _, dev := range vm.Config.Hardware.Device {
			vd, b := flatDisk(dev)
			if b == nil {
				continue
			}
			out = append(out, DiskInfo{VM: vm.Name, VMRef: vm.Self.Value, Key: vd.Key, Capacity: capacityOf(vd),
				FileName: b.FileName, ChangeID: b.ChangeId})
		}
	})
	return out, nil
}

// VM describes a VM (by name or moref value) and its tracked disks.
func (l *Lab) VM(vmName string) (VMInfo, error) {
	vm, err := l.findVM(vmName)
	if err != nil {
		return VMInfo{}, err
	}
	disks, err := l.Disks(vm.Self.Value)
	if err != nil {
		return VMInfo{}, err
	}
	if disks == nil {
		disks = []DiskInfo{}
	}
	info := VMInfo{Ref: vm.Self.Value, Disks: disks}
	l.model.Service.Context.Map.WithLock(l.lockCtx(), vm, func() { info.Name = vm.Name })
	return info, nil
}

// Disk describes one tracked disk of a VM.
func (l *Lab) Disk(vmName string, key int32) (DiskInfo, error) {
	disks, err := l.Disks(vmName)
	if err != nil {
		return DiskInfo{}, err
	}
	for _, d := range disks {
		if d.Key == key {
			return d, nil
		}
	}
	keys := make([]int32, 0, len(disks))
	for _, d := range disks {
		keys = append(keys, d.Key)
	}
	return DiskInfo{}, fmt.Errorf("lab: %w %d on VM %q (disks: %v)", ErrUnknownDisk, key, vmName, keys)
}

// DiskCapacity returns the capacity of a VM's disk in bytes.
func (l *Lab) DiskCapacity(vmName string, key int32) (int64, error) {
	info, err := l.Disk(vmName, key)
	return info.Capacity, err
}

func (l *Lab) liveDisk(vmName string, key int32) (*disk, error) {
	info, err := l.Disk(vmName, key)
	if err != nil {
		return nil, err
	}
	return l.disk(info.VMRef, key, info.Capacity)
}

func rangeErr(off, n, capacity int64) error {
	return fmt.Errorf("lab: %w: offset %d + %d bytes is beyond the capacity %d", ErrOutOfRange, off, n, capacity)
}

// WriteDisk writes guest data from r into a VM's disk at byte offset off,
// streaming, and returns the bytes written. Every written block counts as
// changed, zeros included. Data past the capacity is refused: what fits is
// written, then the error is ErrOutOfRange.
func (l *Lab) WriteDisk(vmName string, key int32, off int64, r io.Reader) (int64, error) {
	d, err := l.liveDisk(vmName, key)
	if err != nil {
		return 0, err
	}
	if off < 0 || off > d.capacitySafe() {
		return 0, rangeErr(off, 0, d.capacitySafe())
	}
	buf := make([]byte, chunkSize)
	var done int64
	for {
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			w, err := d.writeAt(buf[:n], off+done)
			done += w
			if err != nil {
				return done, err
			}
		}
		switch {
		case rerr == io.EOF || rerr == io.ErrUnexpectedEOF:
			return done, nil
		case rerr != nil:
			return done, fmt.Errorf("lab: write disk: %w", rerr)
		}
	}
}

// closedErr explains a nil f. Called with mu held.
func (d *disk) closedErr() error {
	if d.gone {
		return fmt.Errorf("lab: %w: disk %d of %s was removed", ErrUnknownDisk, d.id.key, d.id.vm)
	}
	return errors.New("lab: closed")
}

func (d *disk) capacitySafe() int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.capacity
}

func (d *disk) writeAt(p []byte, off int64) (int64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f == nil {
		return 0, d.closedErr()
	}
	n := int64(len(p))
	var tooLong error
	if off+n > d.capacity {
		tooLong = rangeErr(off, n, d.capacity)
		n = max(d.capacity-off, 0)
	}
	if err := d.unshare(); err != nil {
		return 0, err
	}
	w, err := d.f.WriteAt(p[:n], off)
	d.mark(off, int64(w))
	if err != nil {
		return int64(w), fmt.Errorf("lab: write disk: %w", err)
	}
	return int64(w), tooLong
}

// PunchHole deallocates [off, off+length) of a VM's disk: the guest
// discarded it (it reads as zeros). It counts as a change.
func (l *Lab) PunchHole(vmName string, key int32, off, length int64) error {
	d, err := l.liveDisk(vmName, key)
	if err != nil {
		return err
	}
	return d.punch(off, length)
}

// punch deallocates [off, off+length) of the live image.
func (d *disk) punch(off, length int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f == nil {
		return d.closedErr()
	}
	if off < 0 || length < 0 || off+length > d.capacity {
		return rangeErr(off, length, d.capacity)
	}
	if err := d.unshare(); err != nil {
		return err
	}
	if err := punchHole(d.f, off, length); err != nil {
		return fmt.Errorf("lab: punch hole: %w", err)
	}
	d.mark(off, length)
	return nil
}

// ReadDisk streams the current content of a VM's disk, its whole capacity,
// into w.
func (l *Lab) ReadDisk(vmName string, key int32, w io.Writer) (int64, error) {
	d, err := l.liveDisk(vmName, key)
	if err != nil {
		return 0, err
	}
	return d.readRange(0, d.capacitySafe(), w)
}

// ReadDiskRange streams length bytes of a VM's disk from off into w.
func (l *Lab) ReadDiskRange(vmName string, key int32, off, length int64, w io.Writer) (int64, error) {
	d, err := l.liveDisk(vmName, key)
	if err != nil {
		return 0, err
	}
	return d.readRange(off, length, w)
}

func (d *disk) readRange(off, length int64, w io.Writer) (int64, error) {
	if c := d.capacitySafe(); off < 0 || length < 0 || off+length > c {
		return 0, rangeErr(off, length, c)
	}
	buf := make([]byte, chunkSize)
	var done int64
	for done < length {
		n := min(int64(len(buf)), length-done)
		d.mu.Lock()
		var err error
		if d.f == nil {
			err = d.closedErr()
		} else {
			_, err = d.f.ReadAt(buf[:n], off+done)
		}
		d.mu.Unlock()
		if err != nil {
			return done, fmt.Errorf("lab: read disk: %w", err)
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// DiskExtents lists the allocated ranges of a VM's disk image (the rest
// reads as zeros).
func (l *Lab) DiskExtents(vmName string, key int32) ([]Extent, error) {
	d, err := l.liveDisk(vmName, key)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f == nil {
		return nil, d.closedErr()
	}
	exts, err := dataExtents(d.f, d.capacity)
	if err != nil {
		return nil, fmt.Errorf("lab: disk extents: %w", err)
	}
	return exts, nil
}

// SnapshotImage locates the frozen image of disk key in a snapshot (moref
// value, e.g. "snapshot-123"). The file is read-only by convention and
// exists until the snapshot is removed or the lab closes. Its Filters are
// the lab's source filters (Options.SourceFilters, SetSourceFilters).
func (l *Lab) SnapshotImage(snapshot string, key int32) (ImageInfo, error) {
	l.mu.Lock()
	rec := l.snaps[snapshot]
	filters := slices.Clone(l.filters)
	l.mu.Unlock()
	if rec == nil {
		return ImageInfo{}, fmt.Errorf("lab: %w %q: %s", ErrUnknownSnapshot, snapshot, l.goneReason(snapshot))
	}
	sd := rec.disks[key]
	if sd == nil {
		return ImageInfo{}, fmt.Errorf("lab: %w %d in snapshot %q", ErrUnknownDisk, key, snapshot)
	}
	if sd.img == nil {
		return ImageInfo{}, fmt.Errorf("lab: %w: snapshot %q disk %d: %v", ErrImage, snapshot, key, sd.err)
	}
	return ImageInfo{Path: sd.img.path, Capacity: sd.capacity, ChangeID: sd.changeID, VM: rec.vmName, Snapshot: rec.ref, Key: key,
		Filters: filters}, nil
}

// LiveImage locates the live image of a VM's disk for a writer outside
// the lab: the write-mode twin of SnapshotImage, as VDDK opens a VM's
// disk without a snapshot to write into it (a restore). It is refused
// with ErrPoweredOn unless the VM is powered off (runtime.powerState), as
// vSphere refuses to open a running VM's disk for writing.
//
// Writes through the image bypass the lab, so its change tracking cannot
// see them: the disk's change-ID series ends here (the next snapshot
// starts a new one, and every earlier change ID is refused from then on,
// as after a CBT reset), and the next snapshot makes a new image rather
// than share the previous one; a snapshot that still holds an image of
// the disk keeps it, the live image moving to a copy of its own first.
// Nothing the lab answers later can then miss what such a writer wrote.
// The writer may keep the file open: from then on, every snapshot of the
// disk copies the live image (never a link of the file, never a share).
func (l *Lab) LiveImage(vmName string, key int32) (ImageInfo, error) {
	vm, err := l.findVM(vmName)
	if err != nil {
		return ImageInfo{}, err
	}
	var state types.VirtualMachinePowerState
	var name string
	l.model.Service.Context.Map.WithLock(l.lockCtx(), vm, func() { state, name = vm.Runtime.PowerState, vm.Name })
	if state != types.VirtualMachinePowerStatePoweredOff {
		return ImageInfo{}, fmt.Errorf("lab: %w: VM %q (%s) is %s; its disks are written only while it is powered off",
			ErrPoweredOn, name, vm.Self.Value, state)
	}
	info, err := l.Disk(vm.Self.Value, key)
	if err != nil {
		return ImageInfo{}, err
	}
	d, err := l.disk(info.VMRef, key, info.Capacity)
	if err != nil {
		return ImageInfo{}, err
	}
	d.mu.Lock()
	if d.f == nil {
		err := d.closedErr()
		d.mu.Unlock()
		return ImageInfo{}, err
	}
	// The writer writes the live image's file: a snapshot's image must not
	// be that file any more.
	if err := d.unshare(); err != nil {
		d.mu.Unlock()
		return ImageInfo{}, err
	}
	ended := d.series != nil
	d.series = nil
	// The dirty bitmap will miss what the writer writes, and the writer
	// may keep the file open past the next snapshot: no later freeze may
	// share the previous image or be a link of the file.
	d.outside = true
	d.mu.Unlock()
	l.log.Info("live disk image opened for writing", "vm", name, "disk", key, "change_series_ended", ended)
	return ImageInfo{Path: d.path, Capacity: info.Capacity, VM: name, Key: key}, nil
}

// SetPower powers a VM (by name or moref value) on or off through the
// vSphere API (PowerOnVM_Task, PowerOffVM_Task), as an operator would;
// a VM already in that state is left as it is.
func (l *Lab) SetPower(vmName string, on bool) error {
	vm, err := l.findVM(vmName)
	if err != nil {
		return err
	}
	return l.session(func(ctx context.Context, c *vim25.Client) error {
		ovm := object.NewVirtualMachine(c, vm.Self)
		state, err := ovm.PowerState(ctx)
		if err != nil {
			return fmt.Errorf("lab: power state of %s: %w", vmName, err)
		}
		var task *object.Task
		switch {
		case on && state != types.VirtualMachinePowerStatePoweredOn:
			task, err = ovm.PowerOn(ctx)
		case !on && state != types.VirtualMachinePowerStatePoweredOff:
			task, err = ovm.PowerOff(ctx)
		default:
			return nil
		}
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return fmt.Errorf("lab: power %s %s: %w", map[bool]string{true: "on", false: "off"}[on], vmName, err)
		}
		l.log.Info("VM powered", "vm", vmName, "on", on)
		return nil
	})
}

// SetSourceFilters replaces Options.SourceFilters: the nbdkit filters
// SnapshotImage names from now on (nil: none). A reader that already
// opened an image keeps the filters it was given.
func (l *Lab) SetSourceFilters(fs []labapi.Filter) error {
	if err := labapi.CheckFilters(fs); err != nil {
		return fmt.Errorf("lab: source filters: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.filters = slices.Clone(fs)
	return nil
}

// ChangeIDLog returns every change ID the lab stamped, oldest first.
func (l *Lab) ChangeIDLog() []Stamp {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.stamps)
}

// SetCBT switches change tracking of a VM on or off, as ReconfigVM with
// changeTrackingEnabled does. Off ends the change-ID series of its disks;
// the first snapshot after switching on starts a new one.
func (l *Lab) SetCBT(vmName string, enabled bool) error {
	vm, err := l.findVM(vmName)
	if err != nil {
		return err
	}
	l.model.Service.Context.Map.WithLock(l.lockCtx(), vm, func() {
		vm.Config.ChangeTrackingEnabled = types.NewBool(enabled)
		if !enabled {
			l.cbtOff(vm)
		}
	})
	return nil
}
