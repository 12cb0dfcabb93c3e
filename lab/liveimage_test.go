package lab_test

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
)

// LiveImage is refused while the VM runs; once it is powered off it
// names the live image, and ends the disk's change-ID series: a snapshot
// taken before still answers from its own change ID, later ones refuse
// it (a reset), and the next snapshot freezes the image afresh, with what
// was written through it.
func TestLiveImage(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	write(t, l, vm1, diskKey, 0, []byte("before"))
	s1 := snapshot(t, vm, "one")
	id1 := backing(t, c, s1, diskKey).ChangeId

	if _, err := l.LiveImage(vm1, diskKey); !errors.Is(err, labapi.ErrPoweredOn) {
		t.Fatalf("LiveImage of a powered-on VM = %v, want ErrPoweredOn", err)
	}
	lc := &labapi.Client{BaseURL: l.URL().String(), Thumbprint: l.Thumbprint()}
	defer lc.CloseIdleConnections()
	if err := lc.SetPower(context.Background(), vm1, false); err != nil {
		t.Fatal(err)
	}
	img, err := lc.LiveImage(context.Background(), vm1, diskKey)
	if err != nil {
		t.Fatal(err)
	}
	// A writer outside the lab, as nbdkit's file plugin is.
	f, err := os.OpenFile(img.Path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("AFTER!"), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()

	if _, err := query(c, vm, s1, diskKey, 0, id1); err != nil {
		t.Errorf("the earlier snapshot no longer answers from its own change ID: %v", err)
	}
	s2 := snapshot(t, vm, "two")
	_, err = query(c, vm, s2, diskKey, 0, id1)
	wantFault(t, "change ID from before the live image was written", err, &types.InvalidArgument{})
	frozen, err := l.SnapshotImage(s2.Value, diskKey)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(frozen.Path)
	if err != nil || string(b[:6]) != "AFTER!" {
		t.Errorf("the next snapshot's image starts with %q (%v), want what was written through the live image", b[:6], err)
	}
}
