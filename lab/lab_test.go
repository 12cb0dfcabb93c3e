package lab_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
)

const (
	vm0      = "DC0_H0_VM0"
	vm1      = "DC0_H0_VM1"
	diskKey  = 204
	password = "lab-test-password"
	block    = lab.BlockSize
)

func startLab(t *testing.T, opts lab.Options) *lab.Lab {
	t.Helper()
	if opts.Password == "" {
		opts.Password = password
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l, err := lab.Start(ctx, opts)
	if err != nil {
		t.Fatalf("start lab: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("close lab: %v", err)
		}
	})
	return l
}

// connect logs in over TCP, as the worker does.
func connect(t *testing.T, l *lab.Lab, user, pass string) (*vim25.Client, error) {
	t.Helper()
	ctx := context.Background()
	sc := soap.NewClient(l.URL(), false)
	sc.SetThumbprint(l.URL().Host, l.Thumbprint())
	c, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, err
	}
	if err := session.NewManager(c).Login(ctx, url.UserPassword(user, pass)); err != nil {
		return nil, err
	}
	t.Cleanup(func() {
		_ = session.NewManager(c).Logout(context.Background())
		sc.CloseIdleConnections()
	})
	return c, nil
}

func mustConnect(t *testing.T, l *lab.Lab) *vim25.Client {
	t.Helper()
	c, err := connect(t, l, l.User(), password)
	if err != nil {
		t.Fatalf("login: %v", err)
	}
	return c
}

func findVM(t *testing.T, c *vim25.Client, name string) *object.VirtualMachine {
	t.Helper()
	vm, err := find.NewFinder(c).VirtualMachine(context.Background(), "/DC0/vm/"+name)
	if err != nil {
		t.Fatalf("find %s: %v", name, err)
	}
	return vm
}

func snapshot(t *testing.T, vm *object.VirtualMachine, name string) types.ManagedObjectReference {
	t.Helper()
	ctx := context.Background()
	task, err := vm.CreateSnapshot(ctx, name, "", false, false)
	if err != nil {
		t.Fatalf("create snapshot: %v", err)
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		t.Fatalf("create snapshot: %v", err)
	}
	return info.Result.(types.ManagedObjectReference)
}

func removeSnapshot(t *testing.T, c *vim25.Client, snap types.ManagedObjectReference) {
	t.Helper()
	ctx := context.Background()
	res, err := methods.RemoveSnapshot_Task(ctx, c, &types.RemoveSnapshot_Task{This: snap, RemoveChildren: false})
	if err != nil {
		t.Fatalf("remove snapshot: %v", err)
	}
	if err := object.NewTask(c, res.Returnval).Wait(ctx); err != nil {
		t.Fatalf("remove snapshot: %v", err)
	}
}

func reconfigureCBT(t *testing.T, vm *object.VirtualMachine, on bool) {
	t.Helper()
	ctx := context.Background()
	task, err := vm.Reconfigure(ctx, types.VirtualMachineConfigSpec{ChangeTrackingEnabled: types.NewBool(on)})
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		t.Fatalf("reconfigure CBT=%v: %v", on, err)
	}
}

// backing returns the disk backing of key in a VM's or snapshot's config.
func backing(t *testing.T, c *vim25.Client, ref types.ManagedObjectReference, key int32) *types.VirtualDiskFlatVer2BackingInfo {
	t.Helper()
	var devices []types.BaseVirtualDevice
	ctx := context.Background()
	switch ref.Type {
	case "VirtualMachine":
		var m mo.VirtualMachine
		if err := object.NewCommon(c, ref).Properties(ctx, ref, []string{"config.hardware.device"}, &m); err != nil {
			t.Fatalf("vm config: %v", err)
		}
		devices = m.Config.Hardware.Device
	default:
		var m mo.VirtualMachineSnapshot
		if err := object.NewCommon(c, ref).Properties(ctx, ref, []string{"config"}, &m); err != nil {
			t.Fatalf("snapshot config: %v", err)
		}
		devices = m.Config.Hardware.Device
	}
	d := object.VirtualDeviceList(devices).FindByKey(key)
	if d == nil {
		t.Fatalf("%s has no device %d", ref, key)
	}
	return d.(*types.VirtualDisk).Backing.(*types.VirtualDiskFlatVer2BackingInfo)
}

func query(c *vim25.Client, vm *object.VirtualMachine, snap types.ManagedObjectReference, key int32, start int64, changeID string) (types.DiskChangeInfo, error) {
	res, err := methods.QueryChangedDiskAreas(context.Background(), c, &types.QueryChangedDiskAreas{
		This: vm.Reference(), Snapshot: &snap, DeviceKey: key, StartOffset: start, ChangeId: changeID,
	})
	if err != nil {
		return types.DiskChangeInfo{}, err
	}
	return res.Returnval, nil
}

// queryAll pages through QueryChangedDiskAreas as a backup does, checking
// that the pages tile the disk, and returns the areas and the page count.
func queryAll(t *testing.T, c *vim25.Client, vm *object.VirtualMachine, snap types.ManagedObjectReference, key int32, capacity int64, changeID string) ([]lab.Extent, int) {
	t.Helper()
	var out []lab.Extent
	pages := 0
	for start := int64(0); start < capacity; {
		info, err := query(c, vm, snap, key, start, changeID)
		if err != nil {
			t.Fatalf("query from %d: %v", start, err)
		}
		pages++
		if info.StartOffset != start || info.Length <= 0 || start+info.Length > capacity {
			t.Fatalf("page from %d covers [%d,+%d) of %d", start, info.StartOffset, info.Length, capacity)
		}
		for _, a := range info.ChangedArea {
			if a.Start < start || a.Start+a.Length > start+info.Length {
				t.Fatalf("area %+v outside its page [%d,+%d)", a, start, info.Length)
			}
			if n := len(out); n > 0 && out[n-1].End() > a.Start {
				t.Fatalf("area %+v overlaps %+v", a, out[n-1])
			}
			out = append(out, lab.Extent{Offset: a.Start, Length: a.Length})
		}
		start += info.Length
	}
	return out, pages
}

func write(t *testing.T, l *lab.Lab, vm string, key int32, off int64, data []byte) {
	t.Helper()
	n, err := l.WriteDisk(vm, key, off, bytes.NewReader(data))
	if err != nil || n != int64(len(data)) {
		t.Fatalf("write %d bytes at %d: %d, %v", len(data), off, n, err)
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// merged turns block extents into merged, ordered extents.
func merged(exts ...lab.Extent) []lab.Extent {
	var out []lab.Extent
	for _, e := range exts {
		if n := len(out); n > 0 && out[n-1].End() >= e.Offset {
			out[n-1].Length = max(out[n-1].End(), e.End()) - out[n-1].Offset
			continue
		}
		out = append(out, e)
	}
	return out
}

func ext(off, n int64) lab.Extent { return lab.Extent{Offset: off, Length: n} }

func sameExtents(t *testing.T, what string, got, want []lab.Extent) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s:\n got %v\nwant %v", what, got, want)
	}
}

func TestAllocatedAreasAndIncremental(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	capacity, err := l.DiskCapacity(vm1, diskKey)
	if err != nil || capacity != 10<<30 {
		t.Fatalf("capacity %d, %v", capacity, err)
	}

	// Known pieces: unaligned, spanning a block boundary, zeros, at the end.
	write(t, l, vm1, diskKey, 5, []byte("hello"))
	write(t, l, vm1, diskKey, 3*block-10, randomBytes(20))
	write(t, l, vm1, diskKey, 100*block, make([]byte, block)) // zeros are data too
	write(t, l, vm1, diskKey, capacity-7, []byte("the end"))
	s1 := snapshot(t, vm, "full")
	b1 := backing(t, c, s1, diskKey)
	if b1.ChangeId == "" {
		t.Fatal("snapshot disk has no change ID")
	}

	got, _ := queryAll(t, c, vm, s1, diskKey, capacity, "*")
	sameExtents(t, "allocated areas", got, []lab.Extent{
		ext(0, block), ext(2*block, 2*block), ext(100*block, block), ext(capacity-block, block),
	})

	// Scattered writes after the first snapshot.
	want := []lab.Extent{ext(7*block, block), ext(9*block, 3*block), ext(1000*block, block), ext(capacity-block, block)}
	write(t, l, vm1, diskKey, 7*block+100, []byte{1})
	write(t, l, vm1, diskKey, 9*block+1, randomBytes(2*block)) // touches 9, 10, 11
	write(t, l, vm1, diskKey, 1000*block, make([]byte, 10))    // zeros
	write(t, l, vm1, diskKey, capacity-1, []byte{9})
	s2 := snapshot(t, vm, "incr")
	b2 := backing(t, c, s2, diskKey)
	if b2.ChangeId == "" || b2.ChangeId == b1.ChangeId {
		t.Fatalf("second change ID %q after %q", b2.ChangeId, b1.ChangeId)
	}
	got, _ = queryAll(t, c, vm, s2, diskKey, capacity, b1.ChangeId)
	sameExtents(t, "changed since first snapshot", got, want)

	// Nothing changed between a snapshot and itself; the first snapshot's
	// own ID against it is empty too.
	got, _ = queryAll(t, c, vm, s2, diskKey, capacity, b2.ChangeId)
	sameExtents(t, "changed since second snapshot", got, nil)
	got, _ = queryAll(t, c, vm, s1, diskKey, capacity, b1.ChangeId)
	sameExtents(t, "first against itself", got, nil)

	// A third snapshot: changes accumulate across generations.
	write(t, l, vm1, diskKey, 50*block, []byte{1})
	s3 := snapshot(t, vm, "incr2")
	got, _ = queryAll(t, c, vm, s3, diskKey, capacity, b1.ChangeId)
	sameExtents(t, "changed across two generations", got, merged(want[0], want[1], ext(50*block, block), want[2], want[3]))

	// The frozen images hold what was written before each snapshot.
	img1, err := l.SnapshotImage(s1.Value, diskKey)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(img1.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 5)
	if _, err := f.ReadAt(buf, 5); err != nil || string(buf) != "hello" {
		t.Errorf("frozen image at 5: %q, %v", buf, err)
	}
	one := make([]byte, 1)
	if _, err := f.ReadAt(one, 7*block+100); err != nil || one[0] != 0 {
		t.Errorf("frozen image of s1 sees a later write: %v, %v", one, err)
	}
	if img1.ChangeID != b1.ChangeId || img1.Capacity != capacity {
		t.Errorf("image info %+v, want change ID %s", img1, b1.ChangeId)
	}
}

func TestPaging(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{MaxExtentsPerPage: 2})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	capacity, _ := l.DiskCapacity(vm1, diskKey)
	var want []lab.Extent
	for i := int64(0); i < 9; i++ {
		off := i * 37 * block
		write(t, l, vm1, diskKey, off, []byte{byte(i + 1)})
		want = append(want, ext(off, block))
	}
	s := snapshot(t, vm, "paged")

	first, err := query(c, vm, s, diskKey, 0, "*")
	if err != nil {
		t.Fatal(err)
	}
	if len(first.ChangedArea) != 2 || first.Length != 37*block+block {
		t.Fatalf("first page: %d areas, length %d", len(first.ChangedArea), first.Length)
	}
	got, pages := queryAll(t, c, vm, s, diskKey, capacity, "*")
	sameExtents(t, "paged allocated areas", got, want)
	if pages != 5 {
		t.Errorf("%d pages, want 5", pages)
	}

	// Continuing from inside an area clips it.
	mid, err := query(c, vm, s, diskKey, 37*block+100, "*")
	if err != nil {
		t.Fatal(err)
	}
	if a := mid.ChangedArea[0]; a.Start != 37*block+100 || a.Length != block-100 {
		t.Errorf("clipped area %+v", a)
	}
	// startOffset == capacity is the empty end; beyond is a fault.
	end, err := query(c, vm, s, diskKey, capacity, "*")
	if err != nil || end.Length != 0 || len(end.ChangedArea) != 0 {
		t.Errorf("query at capacity: %+v, %v", end, err)
	}

	b := backing(t, c, s, diskKey)
	for i := int64(0); i < 5; i++ {
		write(t, l, vm1, diskKey, (i*3+1)*block, []byte{7})
	}
	s2 := snapshot(t, vm, "paged2")
	got, pages = queryAll(t, c, vm, s2, diskKey, capacity, b.ChangeId)
	sameExtents(t, "paged changes", got, []lab.Extent{ext(block, block), ext(4*block, block), ext(7*block, block), ext(10*block, block), ext(13*block, block)})
	if pages != 3 {
		t.Errorf("%d pages, want 3", pages)
	}
}

func wantFault(t *testing.T, what string, err error, target types.BaseMethodFault) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: no fault, want %T", what, target)
		return
	}
	if !fault.Is(err, target) {
		t.Errorf("%s: %v, want %T", what, err, target)
	}
}

func TestFaults(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	capacity, _ := l.DiskCapacity(vm1, diskKey)
	write(t, l, vm1, diskKey, 0, []byte("x"))
	s1 := snapshot(t, vm, "one")
	id1 := backing(t, c, s1, diskKey).ChangeId
	uuid, gen, _ := strings.Cut(id1, "/")
	if gen != "1" {
		t.Errorf("first change ID %q, want generation 1", id1)
	}

	for _, tc := range []struct{ what, id string }{
		{"malformed", "not-a-change-id"},
		{"malformed generation", uuid + "/x"},
		{"empty", ""},
		{"generation 0", uuid + "/0"},
		{"foreign", "52a0d4c6-7f0e-4b8c-9d1e-2f3a4b5c6d7e/1"},
		{"future", uuid + "/2"},
	} {
		_, err := query(c, vm, s1, diskKey, 0, tc.id)
		wantFault(t, tc.what+" change ID", err, &types.InvalidArgument{})
	}
	_, err := query(c, vm, s1, 999, 0, "*")
	wantFault(t, "unknown device key", err, &types.InvalidArgument{})
	_, err = query(c, vm, s1, 4000, 0, "*") // a device, but not a disk
	wantFault(t, "non-disk device key", err, &types.InvalidArgument{})
	_, err = query(c, vm, s1, diskKey, capacity+1, "*")
	wantFault(t, "start beyond capacity", err, &types.InvalidArgument{})
	_, err = query(c, vm, s1, diskKey, -1, "*")
	wantFault(t, "negative start", err, &types.InvalidArgument{})
	_, err = query(c, vm, types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: "snapshot-999999"}, diskKey, 0, "*")
	wantFault(t, "unknown snapshot", err, &types.NotFound{})
	// Another disk's change ID is foreign to this one.
	vm0obj := findVM(t, c, vm0)
	s0 := snapshot(t, vm0obj, "other")
	_, err = query(c, vm, s1, diskKey, 0, backing(t, c, s0, diskKey).ChangeId)
	wantFault(t, "other VM's change ID", err, &types.InvalidArgument{})

	// CBT off: a snapshot taken now has no change ID and answers FileFault.
	reconfigureCBT(t, vm, false)
	if id := backing(t, c, vm.Reference(), diskKey).ChangeId; id != "" {
		t.Errorf("live change ID %q with CBT off", id)
	}
	sOff := snapshot(t, vm, "cbt-off")
	if id := backing(t, c, sOff, diskKey).ChangeId; id != "" {
		t.Errorf("snapshot taken with CBT off has change ID %q", id)
	}
	_, err = query(c, vm, sOff, diskKey, 0, id1)
	wantFault(t, "snapshot with CBT off", err, &types.FileFault{})
	_, err = query(c, vm, sOff, diskKey, 0, "*")
	wantFault(t, "snapshot with CBT off, *", err, &types.FileFault{})
	// The old snapshot still answers for its own series.
	if _, err := query(c, vm, s1, diskKey, 0, id1); err != nil {
		t.Errorf("query of a snapshot taken before CBT off: %v", err)
	}

	// CBT on again: a new series; the old ID is refused.
	reconfigureCBT(t, vm, true)
	s2 := snapshot(t, vm, "cbt-on")
	id2 := backing(t, c, s2, diskKey).ChangeId
	if id2 == "" || strings.HasPrefix(id2, uuid) || !strings.HasSuffix(id2, "/1") {
		t.Errorf("change ID after re-enable %q (old %q)", id2, id1)
	}
	_, err = query(c, vm, s2, diskKey, 0, id1)
	wantFault(t, "old ID after CBT disable+enable", err, &types.InvalidArgument{})
	if _, err := query(c, vm, s2, diskKey, 0, "*"); err != nil {
		t.Errorf("* after re-enable: %v", err)
	}

	// The same through the Go API.
	if err := l.SetCBT(vm1, false); err != nil {
		t.Fatal(err)
	}
	if err := l.SetCBT(vm1, true); err != nil {
		t.Fatal(err)
	}
	s3 := snapshot(t, vm, "cbt-api")
	_, err = query(c, vm, s3, diskKey, 0, id2)
	wantFault(t, "old ID after SetCBT off+on", err, &types.InvalidArgument{})
}

func TestBackingNamesAndTwoDisks(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm0)
	disks, err := l.Disks(vm0)
	if err != nil {
		t.Fatal(err)
	}
	if len(disks) != 2 {
		t.Fatalf("%s has %d disks, want 2: %+v", vm0, len(disks), disks)
	}
	k1, k2 := disks[0].Key, disks[1].Key
	if k1 != diskKey || k2 == k1 || disks[1].Capacity != 10<<30 {
		t.Fatalf("disks %+v", disks)
	}

	base1 := backing(t, c, vm.Reference(), k1).FileName
	base2 := backing(t, c, vm.Reference(), k2).FileName
	if base1 != "[LocalDS_0] DC0_H0_VM0/disk1.vmdk" || base2 != "[LocalDS_0] DC0_H0_VM0/disk2.vmdk" {
		t.Fatalf("base names %q %q", base1, base2)
	}

	write(t, l, vm0, k1, 0, []byte("one"))
	write(t, l, vm0, k2, 5*block, []byte("two"))
	s1 := snapshot(t, vm, "s1")
	for _, k := range []int32{k1, k2} {
		live, snap := backing(t, c, vm.Reference(), k), backing(t, c, s1, k)
		base := map[int32]string{k1: base1, k2: base2}[k]
		if snap.FileName != base {
			t.Errorf("disk %d: snapshot config names %q, want base %q", k, snap.FileName, base)
		}
		if want := strings.TrimSuffix(base, ".vmdk") + "-000001.vmdk"; live.FileName != want {
			t.Errorf("disk %d: live config names %q, want %q", k, live.FileName, want)
		}
		if live.ChangeId == "" || live.ChangeId != snap.ChangeId {
			t.Errorf("disk %d: live change ID %q, snapshot %q", k, live.ChangeId, snap.ChangeId)
		}
	}
	id1 := backing(t, c, s1, k1).ChangeId
	id2 := backing(t, c, s1, k2).ChangeId
	if u1, _, _ := strings.Cut(id1, "/"); strings.HasPrefix(id2, u1) {
		t.Errorf("disks share a change-ID series: %s %s", id1, id2)
	}
	capacity := disks[0].Capacity
	got, _ := queryAll(t, c, vm, s1, k1, capacity, "*")
	sameExtents(t, "disk 1 allocated", got, []lab.Extent{ext(0, block)})
	got, _ = queryAll(t, c, vm, s1, k2, capacity, "*")
	sameExtents(t, "disk 2 allocated", got, []lab.Extent{ext(5*block, block)})

	write(t, l, vm0, k2, 8*block, []byte("more"))
	s2 := snapshot(t, vm, "s2")
	if want := strings.TrimSuffix(base1, ".vmdk") + "-000002.vmdk"; backing(t, c, vm.Reference(), k1).FileName != want {
		t.Errorf("live name after second snapshot %q, want %q", backing(t, c, vm.Reference(), k1).FileName, want)
	}
	if got := backing(t, c, s2, k1).FileName; got != strings.TrimSuffix(base1, ".vmdk")+"-000001.vmdk" {
		t.Errorf("second snapshot's config names %q", got)
	}
	got, _ = queryAll(t, c, vm, s2, k1, capacity, id1)
	sameExtents(t, "disk 1 unchanged", got, nil)
	got, _ = queryAll(t, c, vm, s2, k2, capacity, id2)
	sameExtents(t, "disk 2 changed", got, []lab.Extent{ext(8*block, block)})
	_, err = query(c, vm, s2, k2, 0, id1)
	wantFault(t, "disk 1's ID on disk 2", err, &types.InvalidArgument{})

	// Removing every snapshot consolidates: the base names come back.
	removeSnapshot(t, c, s2)
	removeSnapshot(t, c, s1)
	if got := backing(t, c, vm.Reference(), k1).FileName; got != base1 {
		t.Errorf("live name after removing all snapshots %q, want %q", got, base1)
	}
}

func TestSnapshotRemovalFreesImage(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	write(t, l, vm1, diskKey, 0, []byte("a"))
	s1 := snapshot(t, vm, "s1")
	s2 := snapshot(t, vm, "s2") // nothing written: shares s1's image
	img1, err := l.SnapshotImage(s1.Value, diskKey)
	if err != nil {
		t.Fatal(err)
	}
	img2, _ := l.SnapshotImage(s2.Value, diskKey)
	if img1.Path != img2.Path {
		t.Errorf("unchanged disk frozen twice: %s, %s", img1.Path, img2.Path)
	}
	write(t, l, vm1, diskKey, 0, []byte("b"))
	s3 := snapshot(t, vm, "s3")
	img3, _ := l.SnapshotImage(s3.Value, diskKey)
	if img3.Path == img1.Path {
		t.Fatal("changed disk shares the old image")
	}
	if !strings.HasPrefix(img1.Path, l.Dir()) {
		t.Errorf("image %s outside the lab dir %s", img1.Path, l.Dir())
	}

	removeSnapshot(t, c, s1)
	if _, err := os.Stat(img1.Path); err != nil {
		t.Errorf("image still needed by s2 was removed: %v", err)
	}
	if _, err := l.SnapshotImage(s1.Value, diskKey); !errors.Is(err, lab.ErrUnknownSnapshot) {
		t.Errorf("removed snapshot: %v", err)
	}
	removeSnapshot(t, c, s2)
	if _, err := os.Stat(img1.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("image of removed snapshots still there: %v", err)
	}
	if _, err := os.Stat(img3.Path); err != nil {
		t.Errorf("image of s3 gone: %v", err)
	}
	// RemoveAllSnapshots frees the rest.
	task, err := vm.RemoveAllSnapshot(context.Background(), nil)
	if err == nil {
		err = task.Wait(context.Background())
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img3.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("image after RemoveAllSnapshots: %v", err)
	}
}

func TestChangeIDLog(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm0)
	s1 := snapshot(t, vm, "first")
	s2 := snapshot(t, vm, "second")
	stamps := l.ChangeIDLog()
	if len(stamps) != 4 {
		t.Fatalf("%d stamps, want 4: %+v", len(stamps), stamps)
	}
	seen := map[string]bool{}
	for i, s := range stamps {
		snap := []types.ManagedObjectReference{s1, s2}[i/2]
		name := []string{"first", "second"}[i/2]
		if s.VM != vm0 || s.VMRef != vm.Reference().Value || s.Snapshot != snap.Value || s.SnapshotName != name || s.Time.IsZero() {
			t.Errorf("stamp %d: %+v", i, s)
		}
		if got := backing(t, c, snap, s.DiskKey).ChangeId; got != s.ChangeID {
			t.Errorf("stamp %d: %s, snapshot config has %s", i, s.ChangeID, got)
		}
		if seen[s.ChangeID] {
			t.Errorf("change ID %s stamped twice", s.ChangeID)
		}
		seen[s.ChangeID] = true
	}
	// The endpoint serves the same log.
	lc := &labapi.Client{BaseURL: l.URL().String(), Thumbprint: l.Thumbprint()}
	defer lc.CloseIdleConnections()
	remote, err := lc.ChangeIDLog(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for i := range remote {
		remote[i].Time, stamps[i].Time = time.Time{}, time.Time{}
	}
	if !reflect.DeepEqual(remote, stamps) {
		t.Errorf("endpoint log %+v\nwant %+v", remote, stamps)
	}
}

func TestRestartRefusesOldChangeIDs(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx := context.Background()
	l1, err := lab.Start(ctx, lab.Options{Dir: dir, Password: password})
	if err != nil {
		t.Fatal(err)
	}
	c1 := mustConnect(t, l1)
	write(t, l1, vm1, diskKey, block, []byte("kept"))
	s := snapshot(t, findVM(t, c1, vm1), "before")
	old := backing(t, c1, s, diskKey).ChangeId
	thumb := l1.Thumbprint()
	if err := l1.Close(); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "snapshots", "*")); len(left) != 0 {
		t.Errorf("frozen images left after close: %v", left)
	}
	if _, err := os.Stat(filepath.Join(dir, "vcsim")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("simulator folder left after close: %v", err)
	}

	l2 := startLab(t, lab.Options{Dir: dir})
	c2 := mustConnect(t, l2)
	if l2.Thumbprint() != thumb {
		t.Errorf("thumbprint changed across restart on the same dir")
	}
	vm := findVM(t, c2, vm1)
	s2 := snapshot(t, vm, "after")
	fresh := backing(t, c2, s2, diskKey).ChangeId
	if fresh == old {
		t.Fatalf("restarted lab re-issued %s", old)
	}
	_, err = query(c2, vm, s2, diskKey, 0, old)
	wantFault(t, "change ID of the previous lab", err, &types.InvalidArgument{})
	// The disk content survived.
	var buf bytes.Buffer
	if _, err := l2.ReadDiskRange(vm1, diskKey, block, 4, &buf); err != nil || buf.String() != "kept" {
		t.Errorf("content after restart %q, %v", buf.String(), err)
	}
	for _, st := range l2.ChangeIDLog() {
		if st.ChangeID == old {
			t.Errorf("restarted lab logs an old ID")
		}
	}
}

func TestLogin(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{User: "backup@lab.local"})
	if _, err := connect(t, l, "backup@lab.local", "wrong"); !fault.Is(err, &types.InvalidLogin{}) {
		t.Errorf("wrong password: %v, want InvalidLogin", err)
	}
	if _, err := connect(t, l, lab.DefaultUser, password); !fault.Is(err, &types.InvalidLogin{}) {
		t.Errorf("wrong user: %v, want InvalidLogin", err)
	}
	if _, err := connect(t, l, "backup@lab.local", password); err != nil {
		t.Errorf("right password: %v", err)
	}
	if u := l.URL(); u.User != nil || u.Scheme != "https" || u.Path != "/sdk" || !strings.HasPrefix(u.Host, "127.0.0.1:") {
		t.Errorf("URL %s", u)
	}
	if _, err := lab.Start(context.Background(), lab.Options{Listen: "0.0.0.0:0"}); err == nil {
		t.Error("lab listens on a non-loopback address")
	}
}

func TestCloseRemovesEverything(t *testing.T) {
	t.Parallel()
	tmp := t.TempDir()
	l, err := lab.Start(context.Background(), lab.Options{Password: password, Dir: filepath.Join(tmp, "lab")})
	if err != nil {
		t.Fatal(err)
	}
	own, err := lab.Start(context.Background(), lab.Options{Password: password})
	if err != nil {
		t.Fatal(err)
	}
	ownDir, addr := own.Dir(), own.URL().Host
	if err := own.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(ownDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("own dir left: %v", err)
	}
	sc := soap.NewClient(&url.URL{Scheme: "https", Host: addr, Path: "/sdk"}, true)
	if _, err := vim25.NewClient(context.Background(), sc); err == nil {
		t.Errorf("closed lab still serves on %s", addr)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(filepath.Join(tmp, "lab"))
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"disks", "tls.crt", "tls.key"}; !reflect.DeepEqual(names, want) {
		t.Errorf("after close the caller's dir holds %v, want %v", names, want)
	}
}

func TestWriteReadAndErrors(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	capacity, _ := l.DiskCapacity(vm1, diskKey)
	data := randomBytes(3*block + 123)
	write(t, l, vm1, diskKey, 7*block+5, data)
	var buf bytes.Buffer
	if _, err := l.ReadDiskRange(vm1, diskKey, 7*block+5, int64(len(data)), &buf); err != nil || !bytes.Equal(buf.Bytes(), data) {
		t.Errorf("read back: %v", err)
	}
	if err := l.PunchHole(vm1, diskKey, 8*block, block); err != nil {
		t.Fatal(err)
	}
	exts, err := l.DiskExtents(vm1, diskKey)
	if err != nil || len(exts) != 2 {
		t.Errorf("extents after punch %v, %v", exts, err)
	}

	if _, err := l.WriteDisk("nope", diskKey, 0, strings.NewReader("x")); !errors.Is(err, lab.ErrUnknownVM) {
		t.Errorf("unknown VM: %v", err)
	}
	if _, err := l.WriteDisk(vm1, 999, 0, strings.NewReader("x")); !errors.Is(err, lab.ErrUnknownDisk) {
		t.Errorf("unknown disk: %v", err)
	}
	if _, err := l.WriteDisk(vm1, diskKey, capacity+1, strings.NewReader("x")); !errors.Is(err, lab.ErrOutOfRange) {
		t.Errorf("offset beyond capacity: %v", err)
	}
	if n, err := l.WriteDisk(vm1, diskKey, capacity-2, strings.NewReader("xyz")); !errors.Is(err, lab.ErrOutOfRange) || n != 2 {
		t.Errorf("write across the end: %d, %v", n, err)
	}

	// The same errors through the endpoints.
	lc := &labapi.Client{BaseURL: l.URL().String()}
	defer lc.CloseIdleConnections()
	ctx := context.Background()
	if _, err := lc.WriteDisk(ctx, "nope", diskKey, 0, strings.NewReader("x"), 1); !errors.Is(err, lab.ErrUnknownVM) {
		t.Errorf("client unknown VM: %v", err)
	}
	if _, err := lc.WriteDisk(ctx, vm1, 999, 0, strings.NewReader("x"), 1); !errors.Is(err, lab.ErrUnknownDisk) {
		t.Errorf("client unknown disk: %v", err)
	}
	if _, err := lc.WriteDisk(ctx, vm1, diskKey, capacity, strings.NewReader("x"), 1); !errors.Is(err, lab.ErrOutOfRange) {
		t.Errorf("client offset beyond capacity: %v", err)
	}
	if _, err := lc.SnapshotImage(ctx, "snapshot-424242", diskKey); !errors.Is(err, lab.ErrUnknownSnapshot) {
		t.Errorf("client unknown snapshot: %v", err)
	}
	bad := &labapi.Client{BaseURL: l.URL().String(), Thumbprint: "00:11"}
	defer bad.CloseIdleConnections()
	if _, err := bad.Disks(ctx, vm1); err == nil {
		t.Error("client accepted a certificate with another thumbprint")
	}

	// Streaming read of a whole (small part of a) disk through the client.
	out, err := os.Create(filepath.Join(t.TempDir(), "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	info, err := lc.ReadDisk(ctx, vm1, diskKey, out)
	if err != nil || info.Capacity != capacity {
		t.Fatalf("client read: %+v, %v", info, err)
	}
	got := make([]byte, len(data))
	if _, err := out.ReadAt(got, 7*block+5); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), data...)
	clear(want[block-5 : 2*block-5]) // the punched block
	if !bytes.Equal(got, want) {
		t.Error("client read differs from what was written")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(out.Name(), &st); err != nil || st.Blocks*512 > 1<<20 {
		t.Errorf("read file not sparse: %d bytes allocated, %v", st.Blocks*512, err)
	}
}

// TestWritesRaceSnapshots checks that a snapshot sees each write chunk
// entirely or not at all, and that the change tracking agrees with the
// frozen images.
func TestWritesRaceSnapshots(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	capacity, _ := l.DiskCapacity(vm1, diskKey)
	const n = 64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range n {
			if _, err := l.WriteDisk(vm1, diskKey, int64(i)*2*block, bytes.NewReader(bytes.Repeat([]byte{byte(i + 1)}, block))); err != nil {
				t.Error(err)
			}
		}
	}()
	var snaps []types.ManagedObjectReference
	for range 4 {
		snaps = append(snaps, snapshot(t, vm, "race"))
	}
	wg.Wait()
	snaps = append(snaps, snapshot(t, vm, "after"))

	prevID := ""
	seen := map[int64]bool{}
	for _, s := range snaps {
		img, err := l.SnapshotImage(s.Value, diskKey)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(img.Path)
		if err != nil {
			t.Fatal(err)
		}
		present := map[int64]bool{}
		buf := make([]byte, block)
		for i := range int64(n) {
			if _, err := f.ReadAt(buf, i*2*block); err != nil {
				t.Fatal(err)
			}
			switch {
			case bytes.Equal(buf, bytes.Repeat([]byte{byte(i + 1)}, block)):
				present[i*2*block] = true
			case !bytes.Equal(buf, make([]byte, block)):
				t.Errorf("snapshot %s sees a torn write at block %d", s.Value, i*2)
			}
		}
		f.Close()
		if prevID != "" {
			changed, _ := queryAll(t, c, vm, s, diskKey, capacity, prevID)
			for _, e := range changed {
				if !present[e.Offset] || seen[e.Offset] {
					t.Errorf("snapshot %s reports %v changed: present %v, already seen %v", s.Value, e, present[e.Offset], seen[e.Offset])
				}
			}
			for off := range present {
				if !seen[off] && !containsOffset(changed, off) {
					t.Errorf("snapshot %s misses the change at %d", s.Value, off)
				}
			}
		} else {
			alloc, _ := queryAll(t, c, vm, s, diskKey, capacity, "*")
			for off := range present {
				if !containsOffset(alloc, off) {
					t.Errorf("first snapshot misses allocated %d", off)
				}
			}
		}
		for off := range present {
			seen[off] = true
		}
		prevID = backing(t, c, s, diskKey).ChangeId
	}
	if len(seen) != n {
		t.Errorf("last snapshot sees %d of %d writes", len(seen), n)
	}
}

func containsOffset(exts []lab.Extent, off int64) bool {
	for _, e := range exts {
		if e.Offset <= off && off < e.End() {
			return true
		}
	}
	return false
}

// TestCloseStopsGoroutines is not parallel: it runs before the parallel
// tests start, so every simulator goroutine it sees is its own.
func TestCloseStopsGoroutines(t *testing.T) {
	l, err := lab.Start(context.Background(), lab.Options{Password: password})
	if err != nil {
		t.Fatal(err)
	}
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	snapshot(t, vm, "s")
	lc := &labapi.Client{BaseURL: l.URL().String()}
	if _, err := lc.Disks(context.Background(), vm1); err != nil {
		t.Fatal(err)
	}
	lc.CloseIdleConnections()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	var stacks string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		buf := make([]byte, 1<<20)
		stacks = ""
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, "govmomi/simulator") || strings.Contains(g, "cbtflow/lab.") && !strings.Contains(g, "TestCloseStopsGoroutines") {
				stacks += g + "\n\n"
			}
		}
		if stacks == "" {
			return
		}
	}
	t.Errorf("goroutines left after Close:\n%s", stacks)
}

// TestSourceFilters: the frozen-image endpoint names the lab's source
// filters, from Options.SourceFilters and then SetSourceFilters, so that a
// fault test configures the lab, never cbtflow's profiles; filters beyond
// the fault filters are refused at Start and by SetSourceFilters.
func TestSourceFilters(t *testing.T) {
	t.Parallel()
	eio := []labapi.Filter{{Filter: "error", Params: []string{"error=EIO", "error-pread-rate=5%"}}}
	l := startLab(t, lab.Options{SourceFilters: eio})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	s1 := snapshot(t, vm, "s1")
	lc := &labapi.Client{BaseURL: l.URL().String(), Thumbprint: l.Thumbprint()}
	defer lc.CloseIdleConnections()
	ctx := context.Background()
	img, err := lc.SnapshotImage(ctx, s1.Value, diskKey)
	if err != nil || !reflect.DeepEqual(img.Filters, eio) {
		t.Fatalf("image %+v, %v: want the filters %+v", img, err, eio)
	}
	delay := []labapi.Filter{{Filter: "delay", Params: []string{"delay-read=10ms"}}}
	if err := l.SetSourceFilters(delay); err != nil {
		t.Fatal(err)
	}
	if img, err = lc.SnapshotImage(ctx, s1.Value, diskKey); err != nil || !reflect.DeepEqual(img.Filters, delay) {
		t.Errorf("after SetSourceFilters: %+v, %v: want %+v", img.Filters, err, delay)
	}
	if err := l.SetSourceFilters(nil); err != nil {
		t.Fatal(err)
	}
	if img, err = lc.SnapshotImage(ctx, s1.Value, diskKey); err != nil || img.Filters != nil {
		t.Errorf("after SetSourceFilters(nil): %+v, %v: want none", img.Filters, err)
	}

	bad := []labapi.Filter{{Filter: "log", Params: []string{"logfile=/tmp/x"}}}
	if err := l.SetSourceFilters(bad); err == nil || !strings.Contains(err.Error(), `"log"`) {
		t.Errorf("SetSourceFilters(log) = %v, want a refusal naming it", err)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if l2, err := lab.Start(sctx, lab.Options{SourceFilters: bad}); err == nil {
		_ = l2.Close()
		t.Error("Start with the log filter succeeded")
	}
}
