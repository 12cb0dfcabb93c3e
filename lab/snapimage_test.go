package lab_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	"github.com/cbtflow/cbtflow/lab"
)

// liveContent is a disk's whole content now.
func liveContent(t *testing.T, l *lab.Lab, vm string, key int32) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := l.ReadDisk(vm, key, &buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// imageOf returns the path of a snapshot's frozen image and checks that
// it holds want.
func imageOf(t *testing.T, l *lab.Lab, what, snapshot string, key int32, want []byte) string {
	t.Helper()
	path, got := imageBytes(t, l, what, snapshot, key)
	if !bytes.Equal(got, want) {
		t.Errorf("%s: the frozen image of disk %d differs from the live disk at the snapshot", what, key)
	}
	return path
}

// imageBytes returns the path and the content of a snapshot's frozen
// image.
func imageBytes(t *testing.T, l *lab.Lab, what, snapshot string, key int32) (string, []byte) {
	t.Helper()
	img, err := l.SnapshotImage(snapshot, key)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	got, err := os.ReadFile(img.Path)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return img.Path, got
}

func noPath(t *testing.T, what, path string) {
	t.Helper()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s: %s still resolves: %v", what, path, err)
	}
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	names := []string{}
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// A removed snapshot's frozen image no longer resolves, and every
// snapshot's image equals the live disk at the snapshot, however the disk
// is written, punched or grown after it, while other snapshots are held
// too. No file is left in the snapshots folder once the snapshots go, and
// the live images go with their disks (RemoveDisk, RemoveVM), not with
// their snapshots' images.
func TestSnapshotImages(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "lab")
	l, err := lab.Start(context.Background(), lab.Options{Dir: dir, Password: password})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = l.Close()
		}
	})
	c := mustConnect(t, l)
	snaps := filepath.Join(dir, "snapshots")
	ref, err := l.CreateVM("frozen", 4<<20, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	disks, err := l.Disks(ref)
	if err != nil || len(disks) != 2 {
		t.Fatalf("disks %+v, %v", disks, err)
	}
	a, b := disks[0].Key, disks[1].Key
	vm := findVM(t, c, "frozen")
	write(t, l, ref, a, 0, randomBytes(20*block))
	write(t, l, ref, b, block, randomBytes(3*block))

	s1 := snapshot(t, vm, "s1")
	p1a := imageOf(t, l, "s1", s1.Value, a, liveContent(t, l, ref, a))
	p1b := imageOf(t, l, "s1", s1.Value, b, liveContent(t, l, ref, b))
	removeSnapshot(t, c, s1)
	noPath(t, "removed s1", p1a)
	noPath(t, "removed s1", p1b)
	if got := dirNames(t, snaps); len(got) != 0 {
		t.Errorf("after the only snapshot went, the snapshots folder holds %v", got)
	}

	// Overwritten, punched and zeroed blocks; disk b unchanged.
	write(t, l, ref, a, 3*block+7, randomBytes(block))
	write(t, l, ref, a, 10*block, make([]byte, block))
	if err := l.PunchHole(ref, a, 15*block, 2*block); err != nil {
		t.Fatal(err)
	}
	s2 := snapshot(t, vm, "s2")
	want2a, want2b := liveContent(t, l, ref, a), liveContent(t, l, ref, b)
	p2a := imageOf(t, l, "s2", s2.Value, a, want2a)
	p2b := imageOf(t, l, "s2", s2.Value, b, want2b)

	// s3 while s2 is held: independent images of the changed disk.
	write(t, l, ref, a, 0, randomBytes(block))
	if err := l.PunchHole(ref, a, 5*block, block); err != nil {
		t.Fatal(err)
	}
	s3 := snapshot(t, vm, "s3")
	want3a := liveContent(t, l, ref, a)
	p3a := imageOf(t, l, "s3", s3.Value, a, want3a)
	write(t, l, ref, a, 1*block, randomBytes(block))
	imageOf(t, l, "s2 after s3", s2.Value, a, want2a)
	imageOf(t, l, "s2 after s3", s2.Value, b, want2b)
	imageOf(t, l, "s3 after a write", s3.Value, a, want3a)
	if p3a == p2a {
		t.Error("s3 shares s2's image of a changed disk")
	}

	removeSnapshot(t, c, s2)
	removeSnapshot(t, c, s3)
	for _, p := range []string{p2a, p2b, p3a} {
		noPath(t, "removed s2, s3", p)
	}
	if got := dirNames(t, snaps); len(got) != 0 {
		t.Errorf("after every snapshot went, the snapshots folder holds %v", got)
	}

	// Growth (refused while the VM has snapshots, as by vSphere).
	if err := l.GrowDisk(ref, a, 8<<20); err != nil {
		t.Fatal(err)
	}
	write(t, l, ref, a, 8<<20-3, []byte("end"))
	s4 := snapshot(t, vm, "s4")
	imageOf(t, l, "s4 after the growth", s4.Value, a, liveContent(t, l, ref, a))
	removeSnapshot(t, c, s4)

	// A removed disk's live image goes with it.
	s5 := snapshot(t, vm, "s5")
	removeSnapshot(t, c, s5)
	if err := l.RemoveDisk(ref, b); err != nil {
		t.Fatal(err)
	}
	noPath(t, "removed disk", filepath.Join(dir, "disks", fmt.Sprintf("%s-%d.raw", ref, b)))
	live := dirNames(t, filepath.Join(dir, "disks"))
	if err := l.RemoveVM(ref); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, snaps); len(got) != 0 {
		t.Errorf("after RemoveVM the snapshots folder holds %v", got)
	}
	want := slices.DeleteFunc(live, func(n string) bool { return n == fmt.Sprintf("%s-%d.raw", ref, a) })
	if got := dirNames(t, filepath.Join(dir, "disks")); !reflect.DeepEqual(got, want) {
		t.Errorf("after RemoveVM the disks folder holds %v, want %v", got, want)
	}

	// A held snapshot of a default VM's disk goes with Close.
	snapshot(t, findVM(t, c, vm1), "s6")
	closed = true
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, dir); !reflect.DeepEqual(got, []string{"disks", "tls.crt", "tls.key"}) {
		t.Errorf("after Close the lab dir holds %v", got)
	}
	if got := dirNames(t, filepath.Join(dir, "disks")); !reflect.DeepEqual(got, want) {
		t.Errorf("after Close the disks folder holds %v, want the live images %v", got, want)
	}
}
