package lab_test

import (
	"context"
	"os"
	"testing"

	"github.com/vmware/govmomi/object"

	"github.com/cbtflow/cbtflow/lab"
)

// A writer outside the lab is nbdkit serving LiveImage's path to a
// restore: it keeps the live image's file open for as long as it writes,
// unseen by the lab.

// poweredOff is a new VM of one 4 MiB disk, powered off so that LiveImage
// hands out its disk.
func poweredOff(t *testing.T, l *lab.Lab, name string) (ref string, key int32, vm *object.VirtualMachine) {
	t.Helper()
	ref, err := l.CreateVM(name, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	disks, err := l.Disks(ref)
	if err != nil || len(disks) != 1 {
		t.Fatalf("disks %+v, %v", disks, err)
	}
	if err := labClient(t, l).SetPower(context.Background(), ref, false); err != nil {
		t.Fatal(err)
	}
	return ref, disks[0].Key, findVM(t, mustConnect(t, l), name)
}

// outsideWriter opens the disk's live image as LiveImage's writer does,
// for the rest of the test.
func outsideWriter(t *testing.T, l *lab.Lab, vm string, key int32) *os.File {
	t.Helper()
	img, err := labClient(t, l).LiveImage(context.Background(), vm, key)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(img.Path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func writeAt(t *testing.T, f *os.File, s string) {
	t.Helper()
	if _, err := f.WriteAt([]byte(s), 0); err != nil {
		t.Fatal(err)
	}
}

// What a writer outside the lab writes is in the next snapshot's image
// and in no earlier one: a snapshot held across LiveImage keeps its image
// (the live image moves to a copy first), and the next snapshot does not
// share it.
func TestLiveImageKeepsSnapshots(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	ref, key, vm := poweredOff(t, l, "kept")
	first := func(what, s, want string) {
		t.Helper()
		_, got := imageBytes(t, l, what, s, key)
		if string(got[:len(want)]) != want {
			t.Errorf("%s: the image starts with %q, want %q", what, got[:len(want)], want)
		}
	}

	write(t, l, ref, key, 0, []byte("lab-one"))
	s1 := snapshot(t, vm, "one")
	f := outsideWriter(t, l, ref, key)
	writeAt(t, f, "outside")
	f.Close()
	first("held across LiveImage", s1.Value, "lab-one")
	if got := string(readAt(t, l, ref, key, 0, 7)); got != "outside" {
		t.Errorf("the live disk starts with %q after the outside write", got)
	}
	s2 := snapshot(t, vm, "two")
	first("taken after LiveImage", s2.Value, "outside")
	removeSnapshot(t, c, s1)

	f = outsideWriter(t, l, ref, key)
	writeAt(t, f, "again!!")
	f.Close()
	first("held across the second LiveImage", s2.Value, "outside")
	removeSnapshot(t, c, s2)
	s3 := snapshot(t, vm, "three")
	first("taken after it", s3.Value, "again!!")
}

// A snapshot taken while the writer holds the file must keep the content
// of its freeze: what the writer writes after it is in the live disk
// only, before and after a guest write.
func TestLiveImageWriterAcrossSnapshot(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	ref, key, vm := poweredOff(t, l, "restored")
	write(t, l, ref, key, 0, []byte("lab-one"))
	f := outsideWriter(t, l, ref, key)
	writeAt(t, f, "outside")
	s1 := snapshot(t, vm, "during the restore")
	want := liveContent(t, l, ref, key)
	// The writer goes on through the file it has open.
	writeAt(t, f, "later!!")
	imageOf(t, l, "snapshot taken while the writer holds the live image", s1.Value, key, want)
	if got := string(readAt(t, l, ref, key, 0, 7)); got != "later!!" {
		t.Errorf("the live disk starts with %q, want the writer's %q", got, "later!!")
	}
	// A guest write now (it moves a linked live image away), then the
	// writer again: its write must reach the live disk, not the snapshot.
	write(t, l, ref, key, 1<<20, []byte("guest"))
	writeAt(t, f, "third!!")
	imageOf(t, l, "snapshot after the guest write", s1.Value, key, want)
	if got := string(readAt(t, l, ref, key, 0, 7)); got != "third!!" {
		t.Errorf("the live disk starts with %q, want the writer's %q", got, "third!!")
	}
}

// The writer writes between two snapshots without the lab seeing it: the
// second snapshot must not share the first one's image.
func TestLiveImageWriterBetweenSnapshots(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	ref, key, vm := poweredOff(t, l, "restored2")
	f := outsideWriter(t, l, ref, key)
	writeAt(t, f, "first!!")
	s1 := snapshot(t, vm, "s1")
	want1 := liveContent(t, l, ref, key)
	writeAt(t, f, "second!")
	s2 := snapshot(t, vm, "s2")
	want2 := liveContent(t, l, ref, key)
	imageOf(t, l, "s1", s1.Value, key, want1)
	imageOf(t, l, "s2, the writer's second write before it", s2.Value, key, want2)
}
