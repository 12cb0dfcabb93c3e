package vsphere

import (
	"errors"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/lab"
)

// wantIdentity checks that err is a *SnapshotIdentityError whose message
// names every one of names.
func wantIdentity(t *testing.T, what string, err error, names ...string) *SnapshotIdentityError {
	t.Helper()
	var ie *SnapshotIdentityError
	if !errors.Is(err, ErrSnapshotIdentity) || !errors.As(err, &ie) {
		t.Fatalf("%s: %v, want %v", what, err, ErrSnapshotIdentity)
	}
	if errors.Is(err, ErrSnapshotNotFound) || errors.Is(err, ErrVMNotFound) {
		t.Errorf("%s: an identity mismatch also matches a not-found error: %v", what, err)
	}
	for _, n := range names {
		if !strings.Contains(err.Error(), n) {
			t.Errorf("%s: %q does not name %q", what, err, n)
		}
	}
	return ie
}

// check drops CheckSnapshot's VM name.
func check(_ string, err error) error { return err }

func snapshotNames(t *testing.T, l *lab.Lab, vm string) []string {
	t.Helper()
	snaps, err := l.Snapshots(vm)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range snaps {
		names = append(names, s.Name)
	}
	return names
}

func TestCheckSnapshot(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	vm1, err := c.FindVM(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	vm2, err := c.FindVM(ctx, "DC0_C0_RP0_VM0")
	if err != nil {
		t.Fatal(err)
	}
	const ours = "cbtflow-0001"
	s, err := c.CreateSnapshot(ctx, vm1, ours)
	if err != nil {
		t.Fatal(err)
	}

	// The moref names our snapshot.
	if name, err := c.CheckSnapshot(ctx, vm1.Ref, s.Ref, ours); err != nil || name != vm1.Name {
		t.Fatalf("CheckSnapshot of our own snapshot = %q, %v, want the VM's name %q", name, err, vm1.Name)
	}
	// The right moref and name, the wrong VM: a snapshot of another VM.
	ie := wantIdentity(t, "other VM", check(c.CheckSnapshot(ctx, vm2.Ref, s.Ref, ours)), s.Ref, ours, vm1.Ref, vm2.Ref)
	if ie.GotVMRef != vm1.Ref || ie.Got != ours {
		t.Errorf("other VM: %+v", ie)
	}
	// Another name expected at the moref (another backup's).
	wantIdentity(t, "other backup", check(c.CheckSnapshot(ctx, vm1.Ref, s.Ref, "cbtflow-0002")), s.Ref, ours, "cbtflow-0002")

	// Renamed: the moref names the administrator's snapshot now.
	if err := f.lab.RenameSnapshot(vm1.Ref, s.Ref, "admin-before-upgrade"); err != nil {
		t.Fatal(err)
	}
	err = check(c.CheckSnapshot(ctx, vm1.Ref, s.Ref, ours))
	t.Logf("renamed: %v", err)
	ie = wantIdentity(t, "renamed", err, s.Ref, ours, "admin-before-upgrade")
	if ie.Got != "admin-before-upgrade" || ie.WantRef != "" {
		t.Errorf("renamed: %+v", ie)
	}
	// Reissued: our name is on another moref now.
	s2, err := c.CreateSnapshot(ctx, vm1, ours)
	if err != nil {
		t.Fatal(err)
	}
	err = check(c.CheckSnapshot(ctx, vm1.Ref, s.Ref, ours))
	t.Logf("reissued: %v", err)
	ie = wantIdentity(t, "reissued", err, s.Ref, s2.Ref, ours, "admin-before-upgrade")
	if ie.WantRef != s2.Ref {
		t.Errorf("reissued: %+v, want our snapshot at %s", ie, s2.Ref)
	}
	if _, err := c.CheckSnapshot(ctx, vm1.Ref, s2.Ref, ours); err != nil {
		t.Errorf("CheckSnapshot at the new moref: %v", err)
	}

	// Removed: gone, not a mismatch.
	if err := c.RemoveSnapshot(ctx, vm1.Ref, s2.Ref); err != nil {
		t.Fatal(err)
	}
	err = check(c.CheckSnapshot(ctx, vm1.Ref, s2.Ref, ours))
	if !errors.Is(err, ErrSnapshotNotFound) || errors.Is(err, ErrSnapshotIdentity) || errors.Is(err, ErrVMNotFound) ||
		!strings.Contains(err.Error(), s2.Ref) || !strings.Contains(err.Error(), ours) {
		t.Errorf("removed snapshot: %v, want %v naming %s and %s", err, ErrSnapshotNotFound, s2.Ref, ours)
	}

	// The VM removed with the snapshot: both not-found errors.
	ref, err := f.lab.CreateVM("check-doomed", 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	doomed, err := c.FindVM(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	ds, err := c.CreateSnapshot(ctx, doomed, ours)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.lab.RemoveVM(ref); err != nil {
		t.Fatal(err)
	}
	err = check(c.CheckSnapshot(ctx, ref, ds.Ref, ours))
	if !errors.Is(err, ErrVMNotFound) || !errors.Is(err, ErrSnapshotNotFound) || errors.Is(err, ErrSnapshotIdentity) ||
		!strings.Contains(err.Error(), ref) || !strings.Contains(err.Error(), ds.Ref) {
		t.Errorf("snapshot of a removed VM: %v, want %v and %v naming %s and %s", err, ErrVMNotFound, ErrSnapshotNotFound, ref, ds.Ref)
	}
	if _, err := c.CheckSnapshot(ctx, vm1.Ref, "", ours); err == nil {
		t.Error("CheckSnapshot without a moref: no error")
	}
}

func TestRemoveOwnSnapshot(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	vm, err := c.FindVM(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	other, err := c.FindVM(ctx, "DC0_C0_RP0_VM0")
	if err != nil {
		t.Fatal(err)
	}

	// Our own snapshot, by moref; again: nothing left to remove.
	s, err := c.CreateSnapshot(ctx, vm, "cbtflow-a")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := c.RemoveOwnSnapshot(ctx, vm.Ref, s.Ref, "cbtflow-a"); err != nil || got != s.Ref {
		t.Fatalf("RemoveOwnSnapshot = %q, %v, want %s", got, err, s.Ref)
	}
	if got, err := c.RemoveOwnSnapshot(ctx, vm.Ref, s.Ref, "cbtflow-a"); err != nil || got != "" {
		t.Fatalf("RemoveOwnSnapshot again = %q, %v, want nothing removed", got, err)
	}

	// Renamed by an administrator: left alone.
	s, err = c.CreateSnapshot(ctx, vm, "cbtflow-b")
	if err != nil {
		t.Fatal(err)
	}
	if err := f.lab.RenameSnapshot(vm.Ref, s.Ref, "admin-before-upgrade"); err != nil {
		t.Fatal(err)
	}
	if got, err := c.RemoveOwnSnapshot(ctx, vm.Ref, s.Ref, "cbtflow-b"); err != nil || got != "" {
		t.Fatalf("RemoveOwnSnapshot of a renamed snapshot = %q, %v, want nothing removed", got, err)
	}
	if names := snapshotNames(t, f.lab, vm.Ref); len(names) != 1 || names[0] != "admin-before-upgrade" {
		t.Fatalf("after removing a renamed snapshot: %v, want the administrator's", names)
	}
	if !strings.Contains(f.logs.String(), "admin-before-upgrade") {
		t.Error("the mismatch was not logged with the snapshot's name now")
	}

	// Our name under another moref (a reissued moref): that one goes, the
	// administrator's stays.
	own, err := c.CreateSnapshot(ctx, vm, "cbtflow-c")
	if err != nil {
		t.Fatal(err)
	}
	if err := f.lab.RenameSnapshot(vm.Ref, s.Ref, "cbtflow-c-not"); err != nil {
		t.Fatal(err)
	}
	if got, err := c.RemoveOwnSnapshot(ctx, vm.Ref, s.Ref, "cbtflow-c"); err != nil || got != own.Ref {
		t.Fatalf("RemoveOwnSnapshot by name = %q, %v, want %s", got, err, own.Ref)
	}
	if names := snapshotNames(t, f.lab, vm.Ref); len(names) != 1 || names[0] != "cbtflow-c-not" {
		t.Fatalf("after removing by name: %v", names)
	}
	// No moref known: by name only.
	byName, err := c.CreateSnapshot(ctx, vm, "cbtflow-d")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := c.RemoveOwnSnapshot(ctx, vm.Ref, "", "cbtflow-d"); err != nil || got != byName.Ref {
		t.Fatalf("RemoveOwnSnapshot without a moref = %q, %v, want %s", got, err, byName.Ref)
	}

	// A moref of another VM's snapshot: not touched.
	theirs, err := c.CreateSnapshot(ctx, other, "cbtflow-e")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := c.RemoveOwnSnapshot(ctx, vm.Ref, theirs.Ref, "cbtflow-e"); err != nil || got != "" {
		t.Fatalf("RemoveOwnSnapshot with another VM's moref = %q, %v, want nothing removed", got, err)
	}
	if names := snapshotNames(t, f.lab, other.Ref); len(names) != 1 || names[0] != "cbtflow-e" {
		t.Fatalf("the other VM's snapshots: %v", names)
	}

	// The VM removed: nothing to do, no error.
	ref, err := f.lab.CreateVM("remove-doomed", 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	doomed, err := c.FindVM(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	ds, err := c.CreateSnapshot(ctx, doomed, "cbtflow-f")
	if err != nil {
		t.Fatal(err)
	}
	if err := f.lab.RemoveVM(ref); err != nil {
		t.Fatal(err)
	}
	if got, err := c.RemoveOwnSnapshot(ctx, ref, ds.Ref, "cbtflow-f"); err != nil || got != "" {
		t.Fatalf("RemoveOwnSnapshot on a removed VM = %q, %v, want nothing, no error", got, err)
	}
	if _, err := c.RemoveOwnSnapshot(ctx, vm.Ref, s.Ref, ""); err == nil {
		t.Error("RemoveOwnSnapshot without a name: no error")
	}
}
