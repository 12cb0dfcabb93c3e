package edgecases

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/lab"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/stack"
)

const (
	KiB = 1 << 10
	MiB = 1 << 20
	GiB = 1 << 30
)

// backupJSON is the object `starter backup --wait --json` prints.
type backupJSON struct {
	BackupID string     `json:"backup_id"`
	VM       string     `json:"vm"`
	VMUUID   string     `json:"vm_uuid"`
	Status   string     `json:"status"`
	Error    string     `json:"error"`
	Workflow string     `json:"workflow_id"`
	Disks    []diskJSON `json:"disks"`
	Warnings []string   `json:"warnings"`
}

type diskJSON struct {
	Key          int32  `json:"key"`
	Mode         string `json:"mode"`
	ChangedBytes int64  `json:"changed_bytes"`
	WrittenBytes int64  `json:"written_bytes"`
	SizeBytes    int64  `json:"size_bytes"`
	Path         string `json:"path"`
	ChangeID     string `json:"change_id"`
	Note         string `json:"note"`
}

// disk returns the result of disk key, failing t when there is none.
func (b backupJSON) disk(t testing.TB, key int32) diskJSON {
	t.Helper()
	for _, d := range b.Disks {
		if d.Key == key {
			return d
		}
	}
	t.Fatalf("backup %s has no disk %d: %+v", b.BackupID, key, b.Disks)
	return diskJSON{}
}

// listJSON is one entry of `starter list --json`.
type listJSON struct {
	BackupID string `json:"backup_id"`
	VM       string `json:"vm"`
	VMUUID   string `json:"vm_uuid"`
	Status   string `json:"status"`
	Disks    []struct {
		Key      int32  `json:"key"`
		Mode     string `json:"mode"`
		Path     string `json:"path"`
		ChangeID string `json:"change_id"`
	} `json:"disks"`
}

// decodeOne decodes stdout, which must hold exactly one JSON value.
func decodeOne(stdout string, v any) error {
	dec := json.NewDecoder(strings.NewReader(stdout))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("stdout is not one JSON value: %w\n%s", err, stdout)
	}
	var extra json.RawMessage
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return fmt.Errorf("stdout holds more than one JSON value:\n%s", stdout)
	}
	return nil
}

// pattern returns n bytes of pseudo-random data (no zero bytes).
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.UintN(255) + 1)
	}
	return b
}

func write(t testing.TB, l *lab.Lab, vm string, key int32, off int64, data []byte) {
	t.Helper()
	if n, err := l.WriteDisk(vm, key, off, bytes.NewReader(data)); err != nil || n != int64(len(data)) {
		t.Fatalf("lab write %s/%d at %d: %d bytes, %v", vm, key, off, n, err)
	}
}

// capture copies a lab disk's current content into a sparse file of the
// disk's capacity: its allocated extents are read, the rest stays a hole.
func capture(t testing.TB, l *lab.Lab, vm string, key int32, path string) {
	t.Helper()
	capacity, err := l.DiskCapacity(vm, key)
	if err != nil {
		t.Fatal(err)
	}
	exts, err := l.DiskExtents(vm, key)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(capacity); err != nil {
		t.Fatal(err)
	}
	for _, e := range exts {
		if _, err := l.ReadDiskRange(vm, key, e.Offset, e.Length, io.NewOffsetWriter(f, e.Offset)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// dataExtents lists the data (non-hole) ranges of a file.
func dataExtents(f *os.File, size int64) ([][2]int64, error) {
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

// sameContent compares two sparse files byte for byte (sizes included),
// reading only ranges that are data in either file. It returns the first
// difference, or "" when equal.
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
	ea, err := dataExtents(fa, sa.Size())
	if err != nil {
		return "", err
	}
	eb, err := dataExtents(fb, sb.Size())
	if err != nil {
		return "", err
	}
	all := append(append([][2]int64{}, ea...), eb...)
	for i := 1; i < len(all); i++ {
		for j := i; j > 0 && all[j][0] < all[j-1][0]; j-- {
			all[j], all[j-1] = all[j-1], all[j]
		}
	}
	var union [][2]int64
	for _, r := range all {
		if n := len(union); n > 0 && r[0] <= union[n-1][1] {
			union[n-1][1] = max(union[n-1][1], r[1])
			continue
		}
		union = append(union, r)
	}
	bufA, bufB := make([]byte, 4*MiB), make([]byte, 4*MiB)
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

// cbtflowSnapshots lists the snapshots named cbtflow-* of a lab VM through
// the vSphere API, as an operator would see them.
func cbtflowSnapshots(ctx context.Context, l *lab.Lab, vmRef string) ([]string, error) {
	sc := soap.NewClient(l.URL(), true) // the lab, on loopback
	defer sc.CloseIdleConnections()
	c, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, err
	}
	sm := session.NewManager(c)
	if err := sm.Login(ctx, url.UserPassword(l.User(), l.Password())); err != nil {
		return nil, err
	}
	defer func() { _ = sm.Logout(context.WithoutCancel(ctx)) }()
	vm := object.NewVirtualMachine(c, types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef})
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

// stamped returns the change IDs the lab stamped on disk key when it took
// the snapshot of backup id.
func stamped(l *lab.Lab, backupID string, key int32) []string {
	var out []string
	for _, st := range l.ChangeIDLog() {
		if st.SnapshotName == activities.SnapshotPrefix+backupID && st.DiskKey == key {
			out = append(out, st.ChangeID)
		}
	}
	return out
}

// procsOf lists the live qemu-nbd, nbdkit and qemu-img processes of a
// backup of a VM: those naming one of the backup's images (the backup ID
// is in their names) or the frozen images of the VM's snapshots in this
// lab. It waits up to a few seconds for them to go.
func procsOf(l *lab.Lab, vmRef, backupID string) []stack.Proc {
	frozen := filepath.Join(l.Dir(), "snapshots", vmRef+"-")
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []stack.Proc
		for _, p := range stack.ProcsMentioning(backupID, frozen) {
			if strings.Contains(p.Cmd, "qemu-nbd") || strings.Contains(p.Cmd, "nbdkit") || strings.Contains(p.Cmd, "qemu-img") {
				left = append(left, p)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// imageChain describes a QCOW2 and its backing chain, top first.
func imageChain(ctx context.Context, t testing.TB, path string) []qemu.ImageInfo {
	t.Helper()
	chain, err := qemu.Info(ctx, path)
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	return chain
}

// chainFiles returns the absolute file names of a chain, top first.
func chainFiles(chain []qemu.ImageInfo) []string {
	out := make([]string, 0, len(chain))
	for _, c := range chain {
		f := c.Filename
		if !filepath.IsAbs(f) {
			f, _ = filepath.Abs(f)
		}
		out = append(out, filepath.Clean(f))
	}
	return out
}
