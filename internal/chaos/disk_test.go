package chaos

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"slices"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/lab"
)

// capture copies a lab disk's current content into a sparse file of its
// capacity: its allocated extents are read, the rest stays a hole.
func capture(l *lab.Lab, vm string, key int32, path string) error {
	capacity, err := l.DiskCapacity(vm, key)
	if err != nil {
		return err
	}
	exts, err := l.DiskExtents(vm, key)
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(capacity); err != nil {
		return err
	}
	for _, e := range exts {
		if _, err := l.ReadDiskRange(vm, key, e.Offset, e.Length, io.NewOffsetWriter(f, e.Offset)); err != nil {
			return err
		}
	}
	return f.Close()
}

// dataRanges lists the data (non-hole) ranges of a file.
func dataRanges(f *os.File, size int64) ([][2]int64, error) {
	var out [][2]int64
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return nil, err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		hole = min(hole, size)
		out = append(out, [2]int64{data, hole})
		off = hole
	}
	return out, nil
}

// sameContent compares two sparse files byte for byte over the union of
// their data ranges (holes in both read as zeros in both) and describes
// the first difference, or returns "" when equal.
func sameContent(a, b string) (string, error) {
	fa, err := os.Open(a)
	if err != nil {
		return "", err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return "", err
	}
	defer fb.Close()
	sa, err := fa.Stat()
	if err != nil {
		return "", err
	}
	sb, err := fb.Stat()
	if err != nil {
		return "", err
	}
	if sa.Size() != sb.Size() {
		return fmt.Sprintf("sizes differ: %d and %d", sa.Size(), sb.Size()), nil
	}
	ra, err := dataRanges(fa, sa.Size())
	if err != nil {
		return "", err
	}
	rb, err := dataRanges(fb, sb.Size())
	if err != nil {
		return "", err
	}
	all := append(ra, rb...)
	slices.SortFunc(all, func(x, y [2]int64) int { return cmp.Compare(x[0], y[0]) })
	var union [][2]int64
	for _, r := range all {
		if n := len(union); n > 0 && r[0] <= union[n-1][1] {
			union[n-1][1] = max(union[n-1][1], r[1])
			continue
		}
		union = append(union, r)
	}
	bufA, bufB := make([]byte, 4<<20), make([]byte, 4<<20)
	for _, r := range union {
		for off := r[0]; off < r[1]; {
			n := min(int64(len(bufA)), r[1]-off)
			if _, err := fa.ReadAt(bufA[:n], off); err != nil {
				return "", err
			}
			if _, err := fb.ReadAt(bufB[:n], off); err != nil {
				return "", err
			}
			if !bytes.Equal(bufA[:n], bufB[:n]) {
				for i := int64(0); i < n; i++ {
					if bufA[i] != bufB[i] {
						return fmt.Sprintf("first difference at byte %d: %#02x and %#02x", off+i, bufA[i], bufB[i]), nil
					}
				}
			}
			off += n
		}
	}
	return "", nil
}

// snapshots lists the cbtflow-* snapshots of a lab VM through the vSphere
// API, as an operator would see them.
func (e *env) snapshots(ctx context.Context, vmName string) ([]string, error) {
	disks, err := e.l.Disks(vmName)
	if err != nil || len(disks) == 0 {
		return nil, fmt.Errorf("lab VM %s: %v", vmName, err)
	}
	sc := soap.NewClient(e.l.URL(), true) // the lab, on loopback
	defer sc.CloseIdleConnections()
	c, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, err
	}
	sm := session.NewManager(c)
	if err := sm.Login(ctx, url.UserPassword(e.l.User(), e.l.Password())); err != nil {
		return nil, err
	}
	defer func() { _ = sm.Logout(context.WithoutCancel(ctx)) }()
	vm := object.NewVirtualMachine(c, types.ManagedObjectReference{Type: "VirtualMachine", Value: disks[0].VMRef})
	var mvm mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"snapshot"}, &mvm); err != nil {
		return nil, err
	}
	var names []string
	var walk func([]types.VirtualMachineSnapshotTree)
	walk = func(trees []types.VirtualMachineSnapshotTree) {
		for _, s := range trees {
			if strings.HasPrefix(s.Name, activities.SnapshotPrefix) {
				names = append(names, s.Name)
			}
			walk(s.ChildSnapshotList)
		}
	}
	if mvm.Snapshot != nil {
		walk(mvm.Snapshot.RootSnapshotList)
	}
	return names, nil
}
