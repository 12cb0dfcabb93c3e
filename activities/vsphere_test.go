package activities_test

import (
	"bytes"
	"errors"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
)

func TestResolveVM(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	resolve := func(vm string) (*activities.ResolveVMResult, error) {
		return execute[activities.ResolveVMResult](t, env, f.vs.ResolveVM, activities.ResolveVMInput{Profile: profileLab, VM: vm})
	}
	labDisks, err := f.lab.Disks(lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}

	byName, err := resolve(lab.SecondDiskVM)
	if err != nil {
		t.Fatalf("ResolveVM by name: %v", err)
	}
	if byName.Profile != profileLab || byName.VMName != lab.SecondDiskVM || byName.VMRef != labDisks[0].VMRef || byName.VMUUID == "" {
		t.Fatalf("ResolveVM(%s) = %+v, want the lab's VM %s", lab.SecondDiskVM, byName, labDisks[0].VMRef)
	}
	// The vCenter by its own identity, which names the per-VM workflow.
	c, err := f.sessions.Client(ctxT(t, time.Minute), profileLab)
	if err != nil {
		t.Fatal(err)
	}
	if byName.VCenterUUID == "" || byName.VCenterUUID != c.InstanceUUID() {
		t.Errorf("ResolveVM(%s).VCenterUUID = %q, want the lab's instance UUID %q", lab.SecondDiskVM, byName.VCenterUUID, c.InstanceUUID())
	}
	for _, name := range []string{"/DC0/vm/" + lab.SecondDiskVM, byName.VMRef} {
		got, err := resolve(name)
		if err != nil {
			t.Errorf("ResolveVM(%q): %v", name, err)
		} else if *got != *byName {
			t.Errorf("ResolveVM(%q) = %+v, want %+v", name, got, byName)
		}
	}
	other, err := resolve("DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	if other.VMUUID == byName.VMUUID || other.VMRef == byName.VMRef || other.VMName != "DC0_H0_VM1" {
		t.Errorf("ResolveVM(DC0_H0_VM1) = %+v, not another VM than %+v", other, byName)
	}

	for _, unknown := range []string{"no-such-vm", "/DC0/vm/no-such-vm", "vm-999999"} {
		_, err := resolve(unknown)
		wantAppError(t, err, activities.ErrTypeVMNotFound, unknown)
	}
	_, err = resolve("")
	wantAppError(t, err, activities.ErrTypeInvalidInput)

	_, err = execute[activities.ResolveVMResult](t, env, f.vs.ResolveVM, activities.ResolveVMInput{Profile: "no-such-profile", VM: lab.SecondDiskVM})
	wantAppError(t, err, activities.ErrTypeProfileNotFound, "no-such-profile")

	_, err = execute[activities.ResolveVMResult](t, env, f.vs.ResolveVM, activities.ResolveVMInput{Profile: profileBadPass, VM: lab.SecondDiskVM})
	app := wantAppError(t, err, activities.ErrTypeLogin)
	if msg := app.Error(); strings.Contains(msg, wrongPassword) || strings.Contains(msg, f.lab.Password()) {
		t.Errorf("the login error quotes a password: %s", msg)
	}
	// The good profile still works next to the bad one.
	if _, err := resolve(lab.SecondDiskVM); err != nil {
		t.Errorf("ResolveVM after a failed login of another profile: %v", err)
	}
}

func TestPrepareVM(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	ctx := ctxT(t, time.Minute)
	r := mustExecute[activities.ResolveVMResult](t, env, f.vs.ResolveVM, activities.ResolveVMInput{Profile: profileLab, VM: lab.SecondDiskVM})
	labDisks, err := f.lab.Disks(lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	if len(labDisks) != 2 {
		t.Fatalf("the lab's %s has %d disks, want 2", lab.SecondDiskVM, len(labDisks))
	}
	checkDisks := func(p *activities.PrepareVMResult) {
		t.Helper()
		if p.VMRef != r.VMRef || p.VMName != lab.SecondDiskVM || len(p.Disks) != len(labDisks) {
			t.Fatalf("PrepareVM = %+v, want VM %s with %d disks", p, r.VMRef, len(labDisks))
		}
		for i, d := range p.Disks {
			l := labDisks[i]
			if d.Key != l.Key || d.Capacity != l.Capacity || d.FileName != l.FileName || d.Label == "" {
				t.Errorf("disk %d = %+v, the lab says %+v", i, d, l)
			}
		}
		if p.Disks[0].Key == p.Disks[1].Key || p.Disks[0].FileName == p.Disks[1].FileName {
			t.Errorf("the two disks are not distinct: %+v", p.Disks)
		}
	}

	if err := f.lab.SetCBT(lab.SecondDiskVM, false); err != nil {
		t.Fatal(err)
	}
	in := activities.PrepareVMInput{Profile: profileLab, VMUUID: r.VMUUID}
	p := mustExecute[activities.PrepareVMResult](t, env, f.vs.PrepareVM, in)
	checkDisks(p)
	if !p.CBTJustEnabled {
		t.Errorf("PrepareVM with CBT off: CBTJustEnabled false")
	}
	c, err := f.sessions.Client(ctx, profileLab)
	if err != nil {
		t.Fatal(err)
	}
	vm, err := c.VMByUUID(ctx, r.VMUUID)
	if err != nil {
		t.Fatal(err)
	}
	if !vm.CBTEnabled {
		t.Errorf("CBT is still off in vCenter after PrepareVM")
	}

	p = mustExecute[activities.PrepareVMResult](t, env, f.vs.PrepareVM, in)
	checkDisks(p)
	if p.CBTJustEnabled {
		t.Errorf("PrepareVM with CBT on: CBTJustEnabled true")
	}
	// Enabled for real: the next snapshot stamps change IDs.
	s := f.snapshot(t, env, vmInfo{ref: r.VMRef, uuid: r.VMUUID}, "prep1")
	for _, d := range s.Disks {
		if d.ChangeID == "" {
			t.Errorf("disk %d of the snapshot after PrepareVM has no change ID", d.Key)
		}
	}

	const unknown = "00000000-1111-2222-3333-444444444444"
	_, err = execute[activities.PrepareVMResult](t, env, f.vs.PrepareVM, activities.PrepareVMInput{Profile: profileLab, VMUUID: unknown})
	wantAppError(t, err, activities.ErrTypeVMNotFound, unknown)
	_, err = execute[activities.PrepareVMResult](t, env, f.vs.PrepareVM, activities.PrepareVMInput{Profile: "no-such-profile", VMUUID: r.VMUUID})
	wantAppError(t, err, activities.ErrTypeProfileNotFound, "no-such-profile")
}

// stampsOf returns the lab's change-ID stamps of one snapshot.
func stampsOf(l *lab.Lab, snapshot string) map[int32]string {
	out := map[int32]string{}
	for _, s := range l.ChangeIDLog() {
		if s.Snapshot == snapshot {
			out[s.DiskKey] = s.ChangeID
		}
	}
	return out
}

// snapshotsNamed lists the snapshots of vmRef named name, anywhere in its tree.
func (f *fixture) snapshotsNamed(t *testing.T, vmRef, name string) []vsphere.SnapshotInfo {
	t.Helper()
	ctx := ctxT(t, time.Minute)
	c, err := f.sessions.Client(ctx, profileLab)
	if err != nil {
		t.Fatal(err)
	}
	all, err := c.Snapshots(ctx, activities.SnapshotPrefix)
	if err != nil {
		t.Fatal(err)
	}
	var out []vsphere.SnapshotInfo
	for _, s := range all {
		if s.VMRef == vmRef && s.Name == name {
			out = append(out, s)
		}
	}
	return out
}

func TestCreateSnapshot(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)

	s1 := f.snapshot(t, env, vm, "snap1")
	again := f.snapshot(t, env, vm, "snap1")
	if !reflect.DeepEqual(s1, again) {
		t.Errorf("CreateSnapshot retried with the same backup ID:\n got %+v\nwant %+v", again, s1)
	}
	if s1.SnapshotName != activities.SnapshotPrefix+"snap1" || s1.SnapshotRef == "" {
		t.Errorf("snapshot = %s %q, want a moref named %q", s1.SnapshotRef, s1.SnapshotName, activities.SnapshotPrefix+"snap1")
	}
	if got := f.snapshotsNamed(t, vm.ref, "cbtflow-snap1"); len(got) != 1 || got[0].Ref != s1.SnapshotRef {
		t.Errorf("snapshots named cbtflow-snap1 in the VM's tree: %+v, want only %s", got, s1.SnapshotRef)
	}
	stamps := stampsOf(f.lab, s1.SnapshotRef)
	if len(stamps) != 2 || len(s1.Disks) != 2 {
		t.Fatalf("the lab stamped %v for %s, the snapshot has disks %+v: want 2 of each", stamps, s1.SnapshotRef, s1.Disks)
	}
	for i, d := range s1.Disks {
		want := vm.disks[i]
		if d.Key != want.Key || d.Capacity != want.Capacity || d.FileName != want.FileName {
			t.Errorf("snapshot disk %+v, the VM's disk is %+v", d, want)
		}
		if d.ChangeID == "" || d.ChangeID != stamps[d.Key] {
			t.Errorf("disk %d: change ID %q, the lab stamped %q", d.Key, d.ChangeID, stamps[d.Key])
		}
	}

	// A new backup gets a new snapshot and new change IDs.
	s2 := f.snapshot(t, env, vm, "snap2")
	if s2.SnapshotRef == s1.SnapshotRef {
		t.Fatalf("a second backup reused snapshot %s", s1.SnapshotRef)
	}
	stamps2 := stampsOf(f.lab, s2.SnapshotRef)
	for _, d := range s2.Disks {
		if d.ChangeID == "" || d.ChangeID != stamps2[d.Key] || d.ChangeID == stamps[d.Key] {
			t.Errorf("disk %d of the second snapshot: change ID %q, lab stamped %q, first was %q", d.Key, d.ChangeID, stamps2[d.Key], stamps[d.Key])
		}
	}
	if n := len(f.lab.ChangeIDLog()); n != 4 {
		t.Errorf("the lab stamped %d change IDs, want 4 (two snapshots of two disks)", n)
	}

	// A moref that names another VM now (the backup's VM removed from the
	// inventory and added again at a new one): no snapshot of either, and
	// an error naming both morefs, not a snapshot the backup's later steps
	// would miss.
	other := mustExecute[activities.ResolveVMResult](t, env, f.vs.ResolveVM, activities.ResolveVMInput{Profile: profileLab, VM: "DC0_H0_VM1"})
	_, err := execute[activities.CreateSnapshotResult](t, env, f.vs.CreateSnapshot, activities.CreateSnapshotInput{
		Profile: profileLab, VMRef: other.VMRef, VMUUID: vm.uuid, BackupID: "moved"})
	wantAppError(t, err, activities.ErrTypeVMNotFound, "at "+vm.ref+" now, not at "+other.VMRef)
	for _, ref := range []string{vm.ref, other.VMRef} {
		if got := f.snapshotsNamed(t, ref, activities.SnapshotPrefix+"moved"); len(got) != 0 {
			t.Errorf("snapshots of %s named %smoved: %+v, want none", ref, activities.SnapshotPrefix, got)
		}
	}
}

// write is one guest write of the tests: data at an offset, zeros, or a
// discard (hole).
type write struct {
	off, n int64
	zero   bool // write zeros
	punch  bool // discard
	seed   byte
}

func (w write) extent() copier.Extent { return copier.Extent{Offset: w.off, Length: w.n} }

// pattern returns n bytes of data no block of which is all zeros.
func pattern(n int64, seed byte) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x = x*1664525 + 1013904223
		b[i] = byte(x>>24) | 1
	}
	return b
}

// apply does the writes in the lab, on disk key of the two-disk VM.
func (f *fixture) apply(t *testing.T, key int32, ws ...write) []copier.Extent {
	t.Helper()
	var exts []copier.Extent
	for _, w := range ws {
		var err error
		switch {
		case w.punch:
			err = f.lab.PunchHole(lab.SecondDiskVM, key, w.off, w.n)
		case w.zero:
			_, err = f.lab.WriteDisk(lab.SecondDiskVM, key, w.off, bytes.NewReader(make([]byte, w.n)))
		default:
			_, err = f.lab.WriteDisk(lab.SecondDiskVM, key, w.off, bytes.NewReader(pattern(w.n, w.seed)))
		}
		if err != nil {
			t.Fatalf("guest write %+v: %v", w, err)
		}
		exts = append(exts, w.extent())
	}
	return exts
}

func TestChangedAreas(t *testing.T) {
	for _, tc := range []struct {
		name    string
		perPage int
	}{{"one page", 0}, {"two extents per page", 2}} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, lab.Options{MaxExtentsPerPage: tc.perPage})
			env := f.newEnv(t)
			vm := f.prepareVM(t, env)
			disk := vm.disks[1]
			key, capacity := disk.Key, disk.Capacity
			query := func(backupID string, s *activities.CreateSnapshotResult, changeID string) (*activities.ChangedAreasResult, []copier.Extent) {
				t.Helper()
				res := mustExecute[activities.ChangedAreasResult](t, env, f.vs.ChangedAreas, activities.ChangedAreasInput{
					Profile: profileLab, VMRef: vm.ref, SnapshotRef: s.SnapshotRef, BackupID: backupID,
					Key: key, Capacity: capacity, ChangeID: changeID})
				staging, err := f.repo.StagingDir(backupID)
				if err != nil {
					t.Fatal(err)
				}
				if filepath.Dir(res.ExtentsFile) != staging {
					t.Errorf("extents file %s is not in the backup's staging folder %s", res.ExtentsFile, staging)
				}
				exts := readExtentsFile(t, res.ExtentsFile)
				if res.Extents != len(exts) || res.ChangedBytes != sumLengths(exts) {
					t.Errorf("result says %d extents, %d bytes; the file holds %d extents, %d bytes",
						res.Extents, res.ChangedBytes, len(exts), sumLengths(exts))
				}
				return res, exts
			}
			check := func(what string, got, want []copier.Extent) {
				t.Helper()
				if !slices.Equal(got, want) {
					t.Errorf("%s:\n got %v\nwant %v", what, got, want)
				}
			}

			// Unaligned writes, one across a block boundary, one at the
			// very end of the disk: CBT answers in whole 64 KiB blocks.
			first := f.apply(t, key,
				write{off: 1<<20 + 10, n: 100, seed: 1},
				write{off: 100*lab.BlockSize - 1, n: 2, seed: 2},
				write{off: 7 << 20, n: 3 << 20, seed: 3},
				write{off: 5<<30 - 10<<10, n: 200 << 10, seed: 4},
				write{off: capacity - 1000, n: 1000, seed: 5},
			)
			s1 := f.snapshot(t, env, vm, "ca1")
			_, all := query("ca1", s1, "*")
			check(`"*" after the first writes`, all, blocks(first...))
			if len(all) <= 2 {
				t.Fatalf("only %d extents: the test would not page", len(all))
			}

			// The other disk was never written: nothing allocated.
			other := mustExecute[activities.ChangedAreasResult](t, env, f.vs.ChangedAreas, activities.ChangedAreasInput{
				Profile: profileLab, VMRef: vm.ref, SnapshotRef: s1.SnapshotRef, BackupID: "ca1",
				Key: vm.disks[0].Key, Capacity: vm.disks[0].Capacity, ChangeID: "*"})
			if other.Extents != 0 || other.ChangedBytes != 0 || len(readExtentsFile(t, other.ExtentsFile)) != 0 {
				t.Errorf("the unwritten disk has changed areas: %+v", other)
			}
			if other.ExtentsFile == extentsFilePath(t, f, "ca1", key) {
				t.Errorf("both disks share the extents file %s", other.ExtentsFile)
			}

			// Overwrites, zeros and a discard count as changes too.
			second := f.apply(t, key,
				write{off: 7<<20 + 1<<20, n: 4 << 10, seed: 6},
				write{off: 1 << 20, n: 64 << 10, zero: true},
				write{off: 8 << 20, n: 1 << 20, punch: true},
				write{off: 9 << 30, n: 3 * lab.BlockSize, seed: 7},
				write{off: 2 << 30, n: 10, zero: true},
			)
			s2 := f.snapshot(t, env, vm, "ca2")
			_, since := query("ca2", s2, snapDisk(t, s1, key).ChangeID)
			check("changed since the first snapshot", since, blocks(second...))
			_, none := query("ca2", s2, snapDisk(t, s2, key).ChangeID)
			check("changed since the snapshot itself", none, nil)
		})
	}
}

// extentsFilePath is the extents file ChangedAreas writes for disk key of a backup.
func extentsFilePath(t *testing.T, f *fixture, backupID string, key int32) string {
	t.Helper()
	dir, err := f.repo.StagingDir(backupID)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, strconv.Itoa(int(key))+".extents.json")
}

func TestChangedAreasRefused(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	disk := vm.disks[1]
	query := func(backupID, snap, changeID string) error {
		_, err := execute[activities.ChangedAreasResult](t, env, f.vs.ChangedAreas, activities.ChangedAreasInput{
			Profile: profileLab, VMRef: vm.ref, SnapshotRef: snap, BackupID: backupID,
			Key: disk.Key, Capacity: disk.Capacity, ChangeID: changeID})
		return err
	}

	f.apply(t, disk.Key, write{off: 0, n: 1 << 20, seed: 1})
	s1 := f.snapshot(t, env, vm, "r1")
	id1 := snapDisk(t, s1, disk.Key).ChangeID
	f.apply(t, disk.Key, write{off: 4 << 20, n: 1 << 20, seed: 2})

	// A snapshot taken while CBT is off: FileFault, a reset for a stored ID.
	if err := f.lab.SetCBT(lab.SecondDiskVM, false); err != nil {
		t.Fatal(err)
	}
	off := f.snapshot(t, env, vm, "r-off")
	wantAppError(t, query("r-off", off.SnapshotRef, id1), activities.ErrTypeCBTReset, id1)
	// "*" is not a stored change ID: the same fault is a failed query.
	wantAppError(t, query("r-off", off.SnapshotRef, "*"), activities.ErrTypeCBTQuery)

	// Off and on again: a new change-ID series; the old ID is refused.
	if err := f.lab.SetCBT(lab.SecondDiskVM, true); err != nil {
		t.Fatal(err)
	}
	f.apply(t, disk.Key, write{off: 8 << 20, n: 1 << 20, seed: 3})
	s2 := f.snapshot(t, env, vm, "r2")
	id2 := snapDisk(t, s2, disk.Key).ChangeID
	if id2 == "" || strings.Split(id2, "/")[0] == strings.Split(id1, "/")[0] {
		t.Fatalf("after CBT off and on, change ID %q continues the series of %q", id2, id1)
	}
	wantAppError(t, query("r2", s2.SnapshotRef, id1), activities.ErrTypeCBTReset, id1)
	for _, foreign := range []string{
		"52a7b0c4-1d2e-4f30-8a4b-5c6d7e8f9a0b/1", // another disk's or vCenter's series
		"not-a-change-id",
		strings.Split(id2, "/")[0] + "/99", // newer than the snapshot
	} {
		wantAppError(t, query("r2", s2.SnapshotRef, foreign), activities.ErrTypeCBTReset, foreign)
	}
	// The new series works.
	if err := query("r2", s2.SnapshotRef, id2); err != nil {
		t.Errorf("ChangedAreas with the snapshot's own change ID: %v", err)
	}

	// The snapshot is gone.
	if err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
		SnapshotRef: s1.SnapshotRef, SnapshotName: s1.SnapshotName}); err != nil {
		t.Fatal(err)
	}
	wantAppError(t, query("r1", s1.SnapshotRef, "*"), activities.ErrTypeSnapshotGone, s1.SnapshotRef)
}

// runRemove runs RemoveSnapshot, which returns nothing but an error.
func runRemove(t *testing.T, env *testsuite.TestActivityEnvironment, f *fixture, in activities.RemoveSnapshotInput) error {
	t.Helper()
	_, err := env.ExecuteActivity(f.vs.RemoveSnapshot, in)
	return err
}

func TestRemoveSnapshot(t *testing.T) {
	f := newFixture(t, lab.Options{})
	m := &recordedMetrics{}
	f.vs.Metrics = m
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[0].Key
	create := func(id string) *activities.CreateSnapshotResult {
		return mustExecute[activities.CreateSnapshotResult](t, env, f.vs.CreateSnapshot,
			activities.CreateSnapshotInput{Profile: profileLab, VMRef: vm.ref, VMUUID: vm.uuid, BackupID: id})
	}
	gone := func(s *activities.CreateSnapshotResult) {
		t.Helper()
		if left := f.snapshotsNamed(t, vm.ref, s.SnapshotName); len(left) != 0 {
			t.Errorf("snapshot %s is still in the VM's tree: %+v", s.SnapshotName, left)
		}
		if _, err := f.lab.SnapshotImage(s.SnapshotRef, key); !errors.Is(err, lab.ErrUnknownSnapshot) {
			t.Errorf("the lab still knows snapshot %s: %v", s.SnapshotRef, err)
		}
	}

	s1 := create("rm1")
	keep := create("rm-keep")
	for i := range 2 {
		err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
			SnapshotRef: s1.SnapshotRef, SnapshotName: s1.SnapshotName})
		if err != nil {
			t.Fatalf("RemoveSnapshot by moref, call %d: %v", i+1, err)
		}
		gone(s1)
	}

	// The snapshot activity died before it returned the moref: by name.
	s2 := create("rm2")
	for i := range 2 {
		err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
			SnapshotName: s2.SnapshotName})
		if err != nil {
			t.Fatalf("RemoveSnapshot by name, call %d: %v", i+1, err)
		}
		gone(s2)
	}

	// Only the named snapshots went.
	if left := f.snapshotsNamed(t, vm.ref, keep.SnapshotName); len(left) != 1 || left[0].Ref != keep.SnapshotRef {
		t.Errorf("snapshot %s (%s) was removed too: %+v", keep.SnapshotName, keep.SnapshotRef, left)
	}
	if err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
		SnapshotRef: keep.SnapshotRef, SnapshotName: keep.SnapshotName}); err != nil {
		t.Fatal(err)
	}
	gone(keep)

	err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: "no-such-profile", VMRef: vm.ref, SnapshotName: "cbtflow-x"})
	wantAppError(t, err, activities.ErrTypeProfileNotFound)

	// The age of a removed snapshot is reported, counted from its backup
	// ID's timestamp; IDs without one (those above) report none.
	if len(m.snapshots) != 0 {
		t.Errorf("snapshot ages reported for IDs without a timestamp: %v", m.snapshots)
	}
	aged := create(time.Now().UTC().Add(-time.Hour).Format("20060102T150405Z") + "-age")
	if err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
		SnapshotRef: aged.SnapshotRef, SnapshotName: aged.SnapshotName}); err != nil {
		t.Fatal(err)
	}
	gone(aged)
	if len(m.snapshots) != 1 || m.snapshots[0] < time.Hour-time.Second || m.snapshots[0] > time.Hour+5*time.Minute {
		t.Errorf("snapshot ages reported: %v, want one of about an hour", m.snapshots)
	}
}
