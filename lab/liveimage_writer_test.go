package lab_test

import (
	"context"
	"os"
	"testing"

	"github.com/cbtflow/cbtflow/lab"
)

// A writer outside the lab (nbdkit serving LiveImage's path to a restore)
// keeps the live image's file open for as long as it writes. A snapshot
// taken meanwhile must keep the content of its freeze: what the writer
// writes after it is in the live disk only.
func TestLiveImageWriterAcrossSnapshot(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	ref, err := l.CreateVM("restored", 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	disks, err := l.Disks(ref)
	if err != nil || len(disks) != 1 {
		t.Fatalf("disks %+v, %v", disks, err)
	}
	vm1, diskKey := ref, disks[0].Key
	vm := findVM(t, c, "restored")
	lc := labClient(t, l)
	ctx := context.Background()
	if err := lc.SetPower(ctx, vm1, false); err != nil {
		t.Fatal(err)
	}
	write(t, l, vm1, diskKey, 0, []byte("lab-one"))
	img, err := lc.LiveImage(ctx, vm1, diskKey)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(img.Path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("outside"), 0); err != nil {
		t.Fatal(err)
	}
	s1 := snapshot(t, vm, "during the restore")
	want := liveContent(t, l, vm1, diskKey)
	// The writer goes on through the file it has open.
	if _, err := f.WriteAt([]byte("later!!"), 0); err != nil {
		t.Fatal(err)
	}
	imageOf(t, l, "snapshot taken while the writer holds the live image", s1.Value, diskKey, want)
	if got := string(readAt(t, l, vm1, diskKey, 0, 7)); got != "later!!" {
		t.Errorf("the live disk starts with %q, want the writer's %q", got, "later!!")
	}
	// A guest write now (it moves a linked live image away), then the
	// writer again: its write must reach the live disk, not the snapshot.
	write(t, l, vm1, diskKey, 1<<20, []byte("guest"))
	if _, err := f.WriteAt([]byte("third!!"), 0); err != nil {
		t.Fatal(err)
	}
	imageOf(t, l, "snapshot after the guest write", s1.Value, diskKey, want)
	if got := string(readAt(t, l, vm1, diskKey, 0, 7)); got != "third!!" {
		t.Errorf("the live disk starts with %q, want the writer's %q", got, "third!!")
	}
}

// The writer writes between two snapshots without the lab seeing it: the
// second snapshot must not share the first one's image.
func TestLiveImageWriterBetweenSnapshots(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	ref, err := l.CreateVM("restored2", 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	disks, err := l.Disks(ref)
	if err != nil || len(disks) != 1 {
		t.Fatalf("disks %+v, %v", disks, err)
	}
	key := disks[0].Key
	vm := findVM(t, c, "restored2")
	lc := labClient(t, l)
	ctx := context.Background()
	if err := lc.SetPower(ctx, ref, false); err != nil {
		t.Fatal(err)
	}
	img, err := lc.LiveImage(ctx, ref, key)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(img.Path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("first!!"), 0); err != nil {
		t.Fatal(err)
	}
	s1 := snapshot(t, vm, "s1")
	want1 := liveContent(t, l, ref, key)
	if _, err := f.WriteAt([]byte("second!"), 0); err != nil {
		t.Fatal(err)
	}
	s2 := snapshot(t, vm, "s2")
	want2 := liveContent(t, l, ref, key)
	imageOf(t, l, "s1", s1.Value, key, want1)
	imageOf(t, l, "s2, the writer's second write before it", s2.Value, key, want2)
}
