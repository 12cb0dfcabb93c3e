package e2e

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

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/internal/lab"
	"github.com/cbtflow/cbtflow/internal/stack"
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
}

type diskJSON struct {
	Key          int32  `json:"key"`
	Mode         string `json:"mode"`
	ChangedBytes int64  `json:"changed_bytes"`
	WrittenBytes int64  `json:"written_bytes"`
	Path         string `json:"path"`
	ChangeID     string `json:"change_id"`
}

func (b backupJSON) disk(t *testing.T, key int32) diskJSON {
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

// checkBackupContract checks the shape of `backup --wait --json`'s output
// field by field, beyond what decoding into backupJSON would accept.
func checkBackupContract(t *testing.T, res stack.StarterResult, repo string) backupJSON {
	t.Helper()
	if res.ExitCode != 0 {
		t.Fatalf("backup failed: %s", res)
	}
	var raw map[string]any
	if err := decodeOne(res.Stdout, &raw); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"backup_id", "vm", "vm_uuid", "status"} {
		if s, ok := raw[k].(string); !ok || s == "" {
			t.Errorf("backup JSON: %q is %v, want a non-empty string", k, raw[k])
		}
	}
	disks, ok := raw["disks"].([]any)
	if !ok || len(disks) == 0 {
		t.Fatalf("backup JSON: disks is %v, want a non-empty array", raw["disks"])
	}
	for i, d := range disks {
		m, ok := d.(map[string]any)
		if !ok {
			t.Fatalf("backup JSON: disks[%d] is not an object", i)
		}
		if k, ok := m["key"].(float64); !ok || k != float64(int64(k)) || k <= 0 {
			t.Errorf("backup JSON: disks[%d].key is %v, want a positive integer", i, m["key"])
		}
		for _, f := range []string{"changed_bytes", "written_bytes"} {
			if n, ok := m[f].(float64); !ok || n < 0 || n != float64(int64(n)) {
				t.Errorf("backup JSON: disks[%d].%s is %v, want an integer >= 0", i, f, m[f])
			}
		}
		for _, f := range []string{"mode", "path", "change_id"} {
			if s, ok := m[f].(string); !ok || s == "" {
				t.Errorf("backup JSON: disks[%d].%s is %v, want a non-empty string", i, f, m[f])
			}
		}
	}
	var b backupJSON
	if err := json.Unmarshal([]byte(res.Stdout), &b); err != nil {
		t.Fatal(err)
	}
	if b.Status != "completed" {
		t.Errorf("backup JSON: status %q, want completed", b.Status)
	}
	for _, d := range b.Disks {
		if !filepath.IsAbs(d.Path) || !strings.HasPrefix(d.Path, repo+string(filepath.Separator)) {
			t.Errorf("disk %d: path %q is not an absolute path in the repository %s", d.Key, d.Path, repo)
		}
		if _, err := os.Stat(d.Path); err != nil {
			t.Errorf("disk %d: %v", d.Key, err)
		}
	}
	return b
}

// pattern returns n bytes of pseudo-random data (no zero runs).
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64() | 0x0101010101010101
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n - n%8; i < n; i++ {
		b[i] = byte(r.UintN(255) + 1)
	}
	return b
}

func write(t *testing.T, l *lab.Lab, vm string, key int32, off int64, data []byte) {
	t.Helper()
	if n, err := l.WriteDisk(vm, key, off, bytes.NewReader(data)); err != nil || n != int64(len(data)) {
		t.Fatalf("lab write %s/%d at %d: %d bytes, %v", vm, key, off, n, err)
	}
}

// capture copies a lab disk's current content into a sparse file: its
// allocated extents are read, the rest stays a hole (the disk reads zeros
// there).
func capture(t *testing.T, l *lab.Lab, vm string, key int32, path string) {
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

// dataExtents lists the data (non-hole) ranges of a file with SEEK_DATA and
// SEEK_HOLE.
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

// sameContent compares two sparse files of the same size byte for byte:
// every range that is data in either file is read from both and compared;
// every other range is a hole in both, which reads as zeros in both. It
// returns a description of the first difference, or "" when equal.
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
	// The union of both files' data ranges, merged.
	all := append(append([][2]int64{}, ea...), eb...)
	sortRanges(all)
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

func sortRanges(r [][2]int64) {
	for i := 1; i < len(r); i++ {
		for j := i; j > 0 && r[j][0] < r[j-1][0]; j-- {
			r[j], r[j-1] = r[j-1], r[j]
		}
	}
}

// cbtflowSnapshots lists the snapshots named cbtflow-* of a lab VM, through
// the vSphere API as an operator would see them.
func cbtflowSnapshots(ctx context.Context, l *lab.Lab, vmRef string) ([]string, error) {
	sc := soap.NewClient(l.URL(), true) // the lab, on loopback
	defer sc.CloseIdleConnections()
	c, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, err
	}
	sm := session.NewManager(c)
	if err := sm.Login(ctx, urlUser(l)); err != nil {
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
			if strings.HasPrefix(s.Name, "cbtflow-") {
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

func urlUser(l *lab.Lab) *url.Userinfo { return url.UserPassword(l.User(), l.Password()) }
