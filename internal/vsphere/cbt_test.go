package vsphere

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/cbtflow/cbtflow/lab"
)

type area struct{ Off, Len int64 }

// collect runs QueryChangedAreas and returns the areas, merged where they
// touch (a server may split or join adjacent areas).
func collect(ctx context.Context, c *Client, vmRef, snapRef string, d Disk, changeID string) ([]area, error) {
	var out []area
	err := c.QueryChangedAreas(ctx, vmRef, snapRef, d.Key, d.Capacity, changeID, func(off, n int64) error {
		if n <= 0 {
			return fmt.Errorf("empty area at %d", off)
		}
		if k := len(out); k > 0 {
			if last := out[k-1]; off < last.Off+last.Len {
				return fmt.Errorf("area %d+%d overlaps or precedes %d+%d", off, n, last.Off, last.Len)
			} else if off == last.Off+last.Len {
				out[k-1].Len += n
				return nil
			}
		}
		out = append(out, area{off, n})
		return nil
	})
	return out, err
}

// writeAreas writes a distinct byte pattern into every area of a VM disk.
func writeAreas(t *testing.T, l *lab.Lab, vm string, key int32, areas []area, fill byte) {
	t.Helper()
	for i, a := range areas {
		if _, err := l.WriteDisk(vm, key, a.Off, bytes.NewReader(bytes.Repeat([]byte{fill + byte(i)}, int(a.Len)))); err != nil {
			t.Fatal(err)
		}
	}
}

func TestQueryChangedAreas(t *testing.T) {
	for _, perPage := range []int{0, 2} {
		t.Run(fmt.Sprintf("maxExtentsPerPage=%d", perPage), func(t *testing.T) {
			f := startLab(t, lab.Options{MaxExtentsPerPage: perPage})
			ctx := ctxT(t)
			c := f.client(t)
			vm, err := c.FindVM(ctx, lab.SecondDiskVM)
			if err != nil {
				t.Fatal(err)
			}
			d := vm.Disks[1]
			const B = lab.BlockSize
			first := []area{{0, B}, {3 * B, 2 * B}, {64 * B, B}, {1 << 30, 4 * B}, {d.Capacity - B, B}}
			writeAreas(t, f.lab, vm.Name, d.Key, first, 1)
			s1, err := c.CreateSnapshot(ctx, vm, "cbtflow-1")
			if err != nil {
				t.Fatal(err)
			}
			got, err := collect(ctx, c, vm.Ref, s1.Ref, s1.Disks[1], "*")
			if err != nil {
				t.Fatalf("QueryChangedAreas(*): %v", err)
			}
			if !slices.Equal(got, first) {
				t.Fatalf("QueryChangedAreas(*) = %v, want %v", got, first)
			}
			// The other disk of the VM was not written.
			if got, err := collect(ctx, c, vm.Ref, s1.Ref, s1.Disks[0], "*"); err != nil || len(got) != 0 {
				t.Fatalf("QueryChangedAreas(*) of the untouched disk = %v, %v", got, err)
			}

			second := []area{{3 * B, B}, {10 * B, B}, {12 * B, B}, {500 * B, 3 * B}, {2 << 30, B}}
			writeAreas(t, f.lab, vm.Name, d.Key, second, 100)
			s2, err := c.CreateSnapshot(ctx, vm, "cbtflow-2")
			if err != nil {
				t.Fatal(err)
			}
			got, err = collect(ctx, c, vm.Ref, s2.Ref, s2.Disks[1], s1.Disks[1].ChangeID)
			if err != nil {
				t.Fatalf("QueryChangedAreas(change ID): %v", err)
			}
			if !slices.Equal(got, second) {
				t.Fatalf("QueryChangedAreas(%s) = %v, want %v", s1.Disks[1].ChangeID, got, second)
			}
			if got, err := collect(ctx, c, vm.Ref, s2.Ref, s2.Disks[1], s2.Disks[1].ChangeID); err != nil || len(got) != 0 {
				t.Fatalf("QueryChangedAreas(own change ID) = %v, %v, want nothing", got, err)
			}
			// fn's error stops the loop and comes back as is.
			stop := errors.New("stop")
			calls := 0
			err = c.QueryChangedAreas(ctx, vm.Ref, s2.Ref, d.Key, d.Capacity, "*", func(int64, int64) error { calls++; return stop })
			if err != stop || calls != 1 {
				t.Fatalf("QueryChangedAreas with a failing fn = %v after %d calls", err, calls)
			}
		})
	}
}

func TestQueryChangedAreasFaults(t *testing.T) {
	f := startLab(t, lab.Options{MaxExtentsPerPage: 2})
	ctx := ctxT(t)
	c := f.client(t)
	vm, err := c.FindVM(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	d := vm.Disks[0]
	const B = lab.BlockSize
	writeAreas(t, f.lab, vm.Name, d.Key, []area{{0, B}, {4 * B, B}, {8 * B, B}, {12 * B, B}, {16 * B, B}}, 1)
	s, err := c.CreateSnapshot(ctx, vm, "cbtflow-faults")
	if err != nil {
		t.Fatal(err)
	}
	d = s.Disks[0]
	noop := func(int64, int64) error { return nil }

	foreignVM, err := c.FindVM(ctx, "DC0_C0_RP0_VM0")
	if err != nil {
		t.Fatal(err)
	}
	other, err := c.CreateSnapshot(ctx, foreignVM, "cbtflow-other")
	if err != nil {
		t.Fatal(err)
	}
	foreign := other.Disks[0].ChangeID

	for _, tc := range []struct {
		name, snap, changeID string
		key                  int32
		fault                string
	}{
		{"malformed change ID", s.Ref, "not-a-change-id", d.Key, "InvalidArgument"},
		{"foreign change ID", s.Ref, foreign, d.Key, "InvalidArgument"},
		{"unknown disk", s.Ref, "*", 9999, "InvalidArgument"},
		{"unknown snapshot", "snapshot-999999", "*", d.Key, "NotFound"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := c.QueryChangedAreas(ctx, vm.Ref, tc.snap, tc.key, d.Capacity, tc.changeID, noop)
			var ce *CBTError
			if !errors.As(err, &ce) {
				t.Fatalf("QueryChangedAreas = %v, want a *CBTError", err)
			}
			if ce.Fault != tc.fault || !ce.FirstQuery || ce.Msg == "" {
				t.Fatalf("CBTError = %+v, want Fault %s on the first query", ce, tc.fault)
			}
			if got := errors.Is(err, ErrSnapshotNotFound); got != (tc.fault == "NotFound") {
				t.Errorf("errors.Is(ErrSnapshotNotFound) = %v for %s", got, tc.fault)
			}
		})
	}

	// A snapshot taken with CBT off: FileFault.
	if err := f.lab.SetCBT(vm.Name, false); err != nil {
		t.Fatal(err)
	}
	off, err := c.CreateSnapshot(ctx, vm, "cbtflow-cbt-off")
	if err != nil {
		t.Fatal(err)
	}
	var ce *CBTError
	if err := c.QueryChangedAreas(ctx, vm.Ref, off.Ref, d.Key, d.Capacity, d.ChangeID, noop); !errors.As(err, &ce) || ce.Fault != "FileFault" || !ce.FirstQuery {
		t.Fatalf("QueryChangedAreas on a snapshot taken with CBT off = %v, want FileFault on the first query", err)
	}

	// A fault in the middle of the paging (the snapshot disappears after
	// the first page) is not the first query's.
	pages := 0
	err = c.QueryChangedAreas(ctx, vm.Ref, s.Ref, d.Key, d.Capacity, "*", func(int64, int64) error {
		pages++
		if pages == 1 {
			return c.RemoveSnapshot(ctx, vm.Ref, s.Ref)
		}
		return nil
	})
	if !errors.As(err, &ce) || ce.FirstQuery || ce.Fault != "NotFound" || !errors.Is(err, ErrSnapshotNotFound) {
		t.Fatalf("QueryChangedAreas after the snapshot was removed while paging = %v (%d areas), want NotFound, not on the first query", err, pages)
	}

	if err := c.QueryChangedAreas(ctx, vm.Ref, s.Ref, d.Key, d.Capacity, "", noop); err == nil {
		t.Fatal("an empty change ID was accepted")
	}
}
