package lab_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
)

func labClient(t *testing.T, l *lab.Lab) *labapi.Client {
	t.Helper()
	lc := &labapi.Client{BaseURL: l.URL().String(), Thumbprint: l.Thumbprint()}
	t.Cleanup(lc.CloseIdleConnections)
	return lc
}

// disk returns device key of a VM's config as a govmomi client sees it.
func disk(t *testing.T, c *vim25.Client, vm types.ManagedObjectReference, key int32) *types.VirtualDisk {
	t.Helper()
	devices, err := object.NewVirtualMachine(c, vm).Device(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	d, ok := devices.FindByKey(key).(*types.VirtualDisk)
	if !ok {
		t.Fatalf("%s has no disk %d", vm.Value, key)
	}
	return d
}

func diskKeys(t *testing.T, c *vim25.Client, vm types.ManagedObjectReference) []int32 {
	t.Helper()
	devices, err := object.NewVirtualMachine(c, vm).Device(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var keys []int32
	for _, d := range devices.SelectByType((*types.VirtualDisk)(nil)) {
		keys = append(keys, d.GetVirtualDevice().Key)
	}
	return keys
}

func wantCapacity(t *testing.T, c *vim25.Client, vm types.ManagedObjectReference, key int32, capacity int64) {
	t.Helper()
	d := disk(t, c, vm, key)
	if d.CapacityInBytes != capacity || d.CapacityInKB*1024 != capacity {
		t.Errorf("disk %d: capacityInBytes %d, capacityInKB %d; want %d bytes", key, d.CapacityInBytes, d.CapacityInKB, capacity)
	}
}

func editDisk(vm *object.VirtualMachine, d *types.VirtualDisk) error {
	return vm.EditDevice(context.Background(), d)
}

func readAt(t *testing.T, l *lab.Lab, vm string, key int32, off, n int64) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := l.ReadDiskRange(vm, key, off, n, &buf); err != nil {
		t.Fatalf("read %d bytes at %d: %v", n, off, err)
	}
	return buf.Bytes()
}

func TestGrowDisk(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	lc := labClient(t, l)
	ctx := context.Background()
	vm := findVM(t, c, vm1)
	old, _ := l.DiskCapacity(vm1, diskKey)
	write(t, l, vm1, diskKey, 0, []byte("start"))
	write(t, l, vm1, diskKey, old-7, []byte("the end"))
	s1 := snapshot(t, vm, "before")
	id1 := backing(t, c, s1, diskKey).ChangeId

	// Refused while a snapshot exists: Go API, endpoint and a real ReconfigVM.
	if err := l.GrowDisk(vm1, diskKey, old+1<<20); !errors.Is(err, lab.ErrHasSnapshots) {
		t.Errorf("grow with a snapshot: %v", err)
	}
	if err := lc.GrowDisk(ctx, vm1, diskKey, old+1<<20); !errors.Is(err, lab.ErrHasSnapshots) {
		t.Errorf("client grow with a snapshot: %v", err)
	}
	d := disk(t, c, vm.Reference(), diskKey)
	d.CapacityInBytes, d.CapacityInKB = old+1<<20, (old+1<<20)/1024
	err := editDisk(vm, d)
	wantFault(t, "ReconfigVM grow with a snapshot", err, &types.InvalidDeviceOperation{})
	var ido *types.InvalidDeviceOperation
	if _, ok := fault.As(err, &ido); !ok || len(ido.FaultMessage) == 0 || !strings.Contains(ido.FaultMessage[0].Message, "snapshots") {
		t.Errorf("fault of a grow with a snapshot does not explain itself: %#v", ido)
	}
	wantCapacity(t, c, vm.Reference(), diskKey, old)
	removeSnapshot(t, c, s1)

	// Bad capacities.
	for _, bad := range []int64{old, old - 1024, old + 512, old + 1, 64 << 40} {
		if err := l.GrowDisk(vm1, diskKey, bad); !errors.Is(err, lab.ErrBadCapacity) {
			t.Errorf("grow to %d: %v, want ErrBadCapacity", bad, err)
		}
	}
	if err := lc.GrowDisk(ctx, vm1, diskKey, old+512); !errors.Is(err, lab.ErrBadCapacity) {
		t.Errorf("client grow to an odd size: %v", err)
	}
	if err := l.GrowDisk(vm1, 999, old+1024); !errors.Is(err, lab.ErrUnknownDisk) {
		t.Errorf("grow an unknown disk: %v", err)
	}
	if err := lc.GrowDisk(ctx, "nope", diskKey, old+1024); !errors.Is(err, lab.ErrUnknownVM) {
		t.Errorf("client grow on an unknown VM: %v", err)
	}

	// Grow by three blocks and 5 KiB: content kept, the tail reads zeros.
	grown := old + 3*block + 5*1024
	if err := l.GrowDisk(vm1, diskKey, grown); err != nil {
		t.Fatal(err)
	}
	wantCapacity(t, c, vm.Reference(), diskKey, grown)
	if b := backing(t, c, vm.Reference(), diskKey); b.FileName != "[LocalDS_0] DC0_H0_VM1/disk1.vmdk" {
		t.Errorf("backing after grow %q", b.FileName)
	}
	if got := string(readAt(t, l, vm1, diskKey, old-7, 7)); got != "the end" {
		t.Errorf("old end after grow %q", got)
	}
	if got := readAt(t, l, vm1, diskKey, old, grown-old); !bytes.Equal(got, make([]byte, grown-old)) {
		t.Error("grown range is not zeros")
	}
	if info, err := lc.Disk(ctx, vm1, diskKey); err != nil || info.Capacity != grown {
		t.Errorf("client disk after grow %+v, %v", info, err)
	}

	// CBT goes on: the old change ID is valid and the grown range counts as
	// changed; * lists what is allocated.
	write(t, l, vm1, diskKey, grown-3, []byte("xyz"))
	s2 := snapshot(t, vm, "after")
	id2 := backing(t, c, s2, diskKey).ChangeId
	if u1, _, _ := strings.Cut(id1, "/"); !strings.HasPrefix(id2, u1+"/") || !strings.HasSuffix(id2, "/2") {
		t.Errorf("change ID after grow %q, before %q: want the same series", id2, id1)
	}
	got, _ := queryAll(t, c, vm, s2, diskKey, grown, id1)
	sameExtents(t, "changed since before the growth", got, []lab.Extent{ext(old, grown-old)})
	got, _ = queryAll(t, c, vm, s2, diskKey, grown, "*")
	last := (grown - 3) / block * block
	sameExtents(t, "allocated after growth", got, []lab.Extent{ext(0, block), ext(old-block, block), ext(last, grown-last)})
	_, err = query(c, vm, s2, diskKey, grown+1, "*")
	wantFault(t, "start beyond the grown capacity", err, &types.InvalidArgument{})
	img, err := l.SnapshotImage(s2.Value, diskKey)
	if err != nil || img.Capacity != grown {
		t.Errorf("image after grow %+v, %v", img, err)
	}
	if st, err := os.Stat(img.Path); err != nil || st.Size() != grown {
		t.Errorf("frozen image size %v, %v", st, err)
	}
	removeSnapshot(t, c, s2)

	// A real ReconfigVM grows it the same way, capacityInKB alone included;
	// odd sizes and shrinking are refused.
	vmObj := findVM(t, c, vm1)
	d = disk(t, c, vm.Reference(), diskKey)
	d.CapacityInKB += 1024
	if err := editDisk(vmObj, d); err != nil {
		t.Fatalf("ReconfigVM grow by capacityInKB: %v", err)
	}
	wantCapacity(t, c, vm.Reference(), diskKey, grown+1<<20)
	if capacity, _ := l.DiskCapacity(vm1, diskKey); capacity != grown+1<<20 {
		t.Errorf("lab capacity after ReconfigVM grow %d", capacity)
	}
	if got := readAt(t, l, vm1, diskKey, grown-3, 3); string(got) != "xyz" {
		t.Errorf("content after ReconfigVM grow %q", got)
	}
	d = disk(t, c, vm.Reference(), diskKey)
	d.CapacityInBytes += 512
	d.CapacityInKB = 0
	wantFault(t, "ReconfigVM grow by 512 bytes", editDisk(vmObj, d), &types.InvalidDeviceSpec{})
	d = disk(t, c, vm.Reference(), diskKey)
	d.CapacityInBytes -= 1 << 20
	d.CapacityInKB = d.CapacityInBytes / 1024
	wantFault(t, "ReconfigVM shrink", editDisk(vmObj, d), &types.InvalidDeviceOperation{})
	wantCapacity(t, c, vm.Reference(), diskKey, grown+1<<20)

	// Through the endpoint.
	if err := lc.GrowDisk(ctx, vm1, diskKey, grown+2<<20); err != nil {
		t.Fatal(err)
	}
	wantCapacity(t, c, vm.Reference(), diskKey, grown+2<<20)
}

func TestAddAndRemoveDisk(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	lc := labClient(t, l)
	ctx := context.Background()
	vm := findVM(t, c, vm1)
	ref := vm.Reference()

	k1, err := l.AddDisk(vm1, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := lc.AddDisk(ctx, vm1, 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	if k1 == diskKey || k2 == diskKey || k1 == k2 {
		t.Fatalf("new keys %d, %d", k1, k2)
	}
	if keys := diskKeys(t, c, ref); len(keys) != 3 {
		t.Errorf("disks in the config %v", keys)
	}
	wantCapacity(t, c, ref, k1, 1<<30)
	wantCapacity(t, c, ref, k2, 2<<20)
	for k, want := range map[int32]string{k1: "[LocalDS_0] DC0_H0_VM1/DC0_H0_VM1.vmdk", k2: "[LocalDS_0] DC0_H0_VM1/DC0_H0_VM1_1.vmdk"} {
		b := backing(t, c, ref, k)
		if b.FileName != want || b.ChangeId != "" || b.ThinProvisioned == nil || !*b.ThinProvisioned {
			t.Errorf("disk %d: file %q (want %q), change ID %q, thin %v", k, b.FileName, want, b.ChangeId, b.ThinProvisioned)
		}
	}
	if exts, err := l.DiskExtents(vm1, k1); err != nil || len(exts) != 0 {
		t.Errorf("new disk not empty: %v, %v", exts, err)
	}
	for _, bad := range []int64{0, -1024, 1000, 1<<20 + 512} {
		if _, err := l.AddDisk(vm1, bad); !errors.Is(err, lab.ErrBadCapacity) {
			t.Errorf("add a disk of %d bytes: %v", bad, err)
		}
	}
	if _, err := lc.AddDisk(ctx, vm1, 1000); !errors.Is(err, lab.ErrBadCapacity) {
		t.Errorf("client add an odd disk: %v", err)
	}
	if _, err := lc.AddDisk(ctx, "nope", 1<<20); !errors.Is(err, lab.ErrUnknownVM) {
		t.Errorf("client add to an unknown VM: %v", err)
	}

	// Tracked like the others: a snapshot stamps change IDs of their own
	// series, * lists what was written.
	write(t, l, vm1, k1, 5*block, []byte("new disk"))
	s1 := snapshot(t, vm, "s1")
	id1 := backing(t, c, s1, k1).ChangeId
	idBase := backing(t, c, s1, diskKey).ChangeId
	if id1 == "" || backing(t, c, s1, k2).ChangeId == "" {
		t.Fatalf("new disks without change IDs: %q %q", id1, backing(t, c, s1, k2).ChangeId)
	}
	if u, _, _ := strings.Cut(idBase, "/"); strings.HasPrefix(id1, u) {
		t.Errorf("new disk shares the series of disk %d: %s %s", diskKey, id1, idBase)
	}
	got, _ := queryAll(t, c, vm, s1, k1, 1<<30, "*")
	sameExtents(t, "new disk allocated", got, []lab.Extent{ext(5*block, block)})
	got, _ = queryAll(t, c, vm, s1, k2, 2<<20, "*")
	sameExtents(t, "empty new disk allocated", got, nil)

	// Removal is refused while a snapshot exists; adding is not.
	if err := l.RemoveDisk(vm1, k2); !errors.Is(err, lab.ErrHasSnapshots) {
		t.Errorf("remove with a snapshot: %v", err)
	}
	if err := lc.RemoveDisk(ctx, vm1, k2); !errors.Is(err, lab.ErrHasSnapshots) {
		t.Errorf("client remove with a snapshot: %v", err)
	}
	err = vm.RemoveDevice(ctx, false, disk(t, c, ref, k2))
	wantFault(t, "ReconfigVM remove with a snapshot", err, &types.InvalidDeviceOperation{})
	k3, err := l.AddDisk(vm1, 4<<20)
	if err != nil {
		t.Fatalf("add with a snapshot: %v", err)
	}
	_, err = query(c, vm, s1, k3, 0, "*")
	wantFault(t, "disk added after the snapshot", err, &types.InvalidArgument{})
	write(t, l, vm1, k1, 9*block, []byte("more"))
	s2 := snapshot(t, vm, "s2")
	if backing(t, c, s2, k3).ChangeId == "" {
		t.Error("disk added with a snapshot present has no change ID at the next one")
	}
	got, _ = queryAll(t, c, vm, s2, k1, 1<<30, id1)
	sameExtents(t, "new disk changed", got, []lab.Extent{ext(9*block, block)})
	task, err := vm.RemoveAllSnapshot(ctx, nil)
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}

	// Removal: gone from the config, untracked, image deleted.
	image := filepath.Join(l.Dir(), "disks", fmt.Sprintf("%s-%d.raw", ref.Value, k2))
	if _, err := os.Stat(image); err != nil {
		t.Fatalf("image of disk %d: %v", k2, err)
	}
	if err := lc.RemoveDisk(ctx, vm1, k2); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(image); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("image of a removed disk: %v", err)
	}
	if _, err := l.Disk(vm1, k2); !errors.Is(err, lab.ErrUnknownDisk) {
		t.Errorf("removed disk: %v", err)
	}
	if err := l.RemoveDisk(vm1, k1); err != nil {
		t.Fatal(err)
	}
	if _, err := l.WriteDisk(vm1, k1, 0, strings.NewReader("x")); !errors.Is(err, lab.ErrUnknownDisk) {
		t.Errorf("write to a removed disk: %v", err)
	}
	if err := l.RemoveDisk(vm1, k1); !errors.Is(err, lab.ErrUnknownDisk) {
		t.Errorf("remove twice: %v", err)
	}
	if keys := diskKeys(t, c, ref); len(keys) != 2 {
		t.Errorf("disks after removals %v", keys)
	}

	// A disk added by a plain govmomi client is tracked too.
	devices, err := vm.Device(ctx)
	if err != nil {
		t.Fatal(err)
	}
	raw := devices.CreateDisk(devices.PickController((*types.VirtualSCSIController)(nil)), types.ManagedObjectReference{}, "[LocalDS_0] DC0_H0_VM1/extra.vmdk")
	raw.CapacityInKB = 8 << 10
	if err := vm.AddDevice(ctx, raw); err != nil {
		t.Fatal(err)
	}
	disks, err := l.Disks(vm1)
	if err != nil {
		t.Fatal(err)
	}
	var extra *lab.DiskInfo
	for i := range disks {
		if disks[i].FileName == "[LocalDS_0] DC0_H0_VM1/extra.vmdk" {
			extra = &disks[i]
		}
	}
	if extra == nil || extra.Capacity != 8<<20 {
		t.Fatalf("disk added by a client: %+v", disks)
	}
	write(t, l, vm1, extra.Key, 8<<20-4, []byte("tail"))
	wantCapacity(t, c, ref, extra.Key, 8<<20)
}

func TestCreateVMNames(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	lc := labClient(t, l)
	ctx := context.Background()
	finder := find.NewFinder(c)

	for i, name := range []string{"web/01", "../../etc", "my vm", "sérvéur-ü", `back\slash 100%`} {
		escaped := lab.EscapeName(name)
		caps := []int64{1 << 30, 64 << 20}
		var ref string
		var err error
		if i%2 == 0 {
			ref, err = l.CreateVM(name, caps...)
		} else {
			ref, err = lc.CreateVM(ctx, name, caps...)
		}
		if err != nil {
			t.Fatalf("create %q: %v", name, err)
		}
		// govmomi finds it by its stored (escaped) name, not by the raw one.
		vm, err := finder.VirtualMachine(ctx, "/DC0/vm/"+escaped)
		if err != nil || vm.Reference().Value != ref {
			t.Fatalf("find %q as /DC0/vm/%s: %v, %v", name, escaped, vm, err)
		}
		if rel, err := finder.VirtualMachine(ctx, escaped); err != nil || rel.Reference().Value != ref {
			t.Errorf("find %q relative: %v", escaped, err)
		}
		if strings.Contains(name, "/") {
			if _, err := finder.VirtualMachine(ctx, "/DC0/vm/"+name); err == nil {
				t.Errorf("the raw name %q with a slash found a VM", name)
			}
		}
		var m mo.VirtualMachine
		if err := vm.Properties(ctx, vm.Reference(), []string{"name", "config", "runtime.powerState"}, &m); err != nil {
			t.Fatal(err)
		}
		if m.Name != escaped || m.Config.Name != escaped {
			t.Errorf("%q: name %q, config name %q, want %q", name, m.Name, m.Config.Name, escaped)
		}
		if want := "[LocalDS_0] " + escaped + "/" + escaped + ".vmx"; m.Config.Files.VmPathName != want {
			t.Errorf("%q: vmx %q, want %q", name, m.Config.Files.VmPathName, want)
		}
		if m.Config.ChangeTrackingEnabled == nil || !*m.Config.ChangeTrackingEnabled || m.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
			t.Errorf("%q: CBT %v, power %s", name, m.Config.ChangeTrackingEnabled, m.Runtime.PowerState)
		}
		disks := object.VirtualDeviceList(m.Config.Hardware.Device).SelectByType((*types.VirtualDisk)(nil))
		if len(disks) != 2 {
			t.Fatalf("%q: %d disks", name, len(disks))
		}
		for j, dev := range disks {
			d := dev.(*types.VirtualDisk)
			file := escaped + ".vmdk"
			if j == 1 {
				file = escaped + "_1.vmdk"
			}
			if b := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); b.FileName != "[LocalDS_0] "+escaped+"/"+file {
				t.Errorf("%q: disk %d file %q", name, j, b.FileName)
			}
			if d.CapacityInBytes != caps[j] || d.CapacityInKB*1024 != caps[j] {
				t.Errorf("%q: disk %d capacity %d / %d KB", name, j, d.CapacityInBytes, d.CapacityInKB)
			}
		}
		// The lab finds it by raw name, stored name and moref, also over HTTP.
		for _, n := range []string{name, escaped, ref} {
			if got, err := l.Disks(n); err != nil || len(got) != 2 || got[0].VMRef != ref || got[0].VM != escaped {
				t.Errorf("lab disks of %q: %+v, %v", n, got, err)
			}
			if info, err := lc.VM(ctx, n); err != nil || info.Ref != ref || info.Name != escaped || len(info.Disks) != 2 {
				t.Errorf("client VM %q: %+v, %v", n, info, err)
			}
		}
		// Tracked with CBT like the default VMs.
		key := disks[1].GetVirtualDevice().Key
		if _, err := lc.WriteDisk(ctx, name, key, 3*block, strings.NewReader("guest"), 5); err != nil {
			t.Fatal(err)
		}
		s := snapshot(t, vm, "first")
		if backing(t, c, s, key).ChangeId == "" {
			t.Errorf("%q: no change ID", name)
		}
		got, _ := queryAll(t, c, vm, s, key, 64<<20, "*")
		sameExtents(t, name+" allocated", got, []lab.Extent{ext(3*block, block)})
	}

	// The folder of "../../etc" stays inside the datastore.
	if hits, _ := filepath.Glob(filepath.Join(l.Dir(), "vcsim", "*", "..%2f..%2fetc", "..%2f..%2fetc.vmx")); len(hits) != 1 {
		entries, _ := filepath.Glob(filepath.Join(l.Dir(), "vcsim", "*", "*"))
		t.Errorf("vmx of ../../etc not in a datastore folder: %v", entries)
	}
	if _, err := os.Stat(filepath.Join(l.Dir(), "etc")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a folder escaped the datastore: %v", err)
	}

	// Refusals.
	for _, name := range []string{"web/01", "web%2f01", "DC0_H0_VM0"} {
		if _, err := l.CreateVM(name); !errors.Is(err, lab.ErrVMExists) {
			t.Errorf("create %q again: %v", name, err)
		}
	}
	if _, err := lc.CreateVM(ctx, "my vm"); !errors.Is(err, lab.ErrVMExists) {
		t.Errorf("client create a taken name: %v", err)
	}
	for _, name := range []string{"", ".", "..", "a\nb", " lead", "trail ", strings.Repeat("x", 81), strings.Repeat("/", 27), "bad\xff"} {
		if _, err := l.CreateVM(name); !errors.Is(err, lab.ErrBadName) {
			t.Errorf("create %q: %v, want ErrBadName", name, err)
		}
	}
	if _, err := lc.CreateVM(ctx, ".."); !errors.Is(err, lab.ErrBadName) {
		t.Errorf("client create ..: %v", err)
	}
	if _, err := l.CreateVM("odd", 1<<20, 1000); !errors.Is(err, lab.ErrBadCapacity) {
		t.Errorf("create with an odd disk: %v", err)
	}

	// A VM without disks, then given one.
	ref, err := lc.CreateVM(ctx, "diskless")
	if err != nil {
		t.Fatal(err)
	}
	if info, err := lc.VM(ctx, "diskless"); err != nil || len(info.Disks) != 0 || info.Ref != ref {
		t.Errorf("diskless VM %+v, %v", info, err)
	}
	if disks, err := lc.Disks(ctx, "diskless"); err != nil || len(disks) != 0 {
		t.Errorf("client disks of a diskless VM %v, %v", disks, err)
	}
	key, err := l.AddDisk("diskless", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if b := backing(t, c, types.ManagedObjectReference{Type: "VirtualMachine", Value: ref}, key); b.FileName != "[LocalDS_0] diskless/diskless.vmdk" {
		t.Errorf("disk added to a diskless VM: %q", b.FileName)
	}

	// Removal: by raw name, with a snapshot; the name can be used again.
	web, err := l.VM("web/01")
	if err != nil {
		t.Fatal(err)
	}
	webRef := web.Ref
	images, _ := filepath.Glob(filepath.Join(l.Dir(), "disks", webRef+"-*.raw"))
	if len(images) != 2 {
		t.Fatalf("images of web/01: %v", images)
	}
	if err := l.RemoveVM("web/01"); err != nil {
		t.Fatal(err)
	}
	if _, err := finder.VirtualMachine(ctx, "/DC0/vm/web%2f01"); err == nil {
		t.Error("removed VM still found")
	}
	if _, err := l.Disks("web/01"); !errors.Is(err, lab.ErrUnknownVM) {
		t.Errorf("disks of a removed VM: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(l.Dir(), "disks", webRef+"-*.raw")); len(left) != 0 {
		t.Errorf("images left after RemoveVM: %v", left)
	}
	if left, _ := filepath.Glob(filepath.Join(l.Dir(), "snapshots", webRef+"-*")); len(left) != 0 {
		t.Errorf("frozen images left after RemoveVM: %v", left)
	}
	if err := lc.RemoveVM(ctx, "sérvéur-ü"); err != nil {
		t.Fatal(err)
	}
	if err := lc.RemoveVM(ctx, "sérvéur-ü"); !errors.Is(err, lab.ErrUnknownVM) {
		t.Errorf("remove twice: %v", err)
	}
	again, err := l.CreateVM("web/01", 1<<20)
	if err != nil || again == webRef {
		t.Errorf("create web/01 again: %s, %v", again, err)
	}
}

func TestRestartDropsAddedDisks(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	l1, err := lab.Start(context.Background(), lab.Options{Dir: dir, Password: password})
	if err != nil {
		t.Fatal(err)
	}
	write(t, l1, vm1, diskKey, 0, []byte("kept"))
	k, err := l1.AddDisk(vm1, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	write(t, l1, vm1, k, 0, []byte("added"))
	if _, err := l1.CreateVM("temp", 1<<20); err != nil {
		t.Fatal(err)
	}
	before, _ := filepath.Glob(filepath.Join(dir, "disks", "*.raw"))
	if err := l1.Close(); err != nil {
		t.Fatal(err)
	}
	l2 := startLab(t, lab.Options{Dir: dir})
	after, _ := filepath.Glob(filepath.Join(dir, "disks", "*.raw"))
	if len(after) != len(before)-2 {
		t.Errorf("images before the restart %v, after %v", before, after)
	}
	if got := string(readAt(t, l2, vm1, diskKey, 0, 4)); got != "kept" {
		t.Errorf("default disk after restart %q", got)
	}
	// A disk added after the restart may get the same key: it is empty.
	k2, err := l2.AddDisk(vm1, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if exts, err := l2.DiskExtents(vm1, k2); err != nil || len(exts) != 0 {
		t.Errorf("new disk (key %d, before %d) not empty: %v, %v", k2, k, exts, err)
	}
}
