package badinput

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	enumspb "go.temporal.io/api/enums/v1"
	failurepb "go.temporal.io/api/failure/v1"
	historypb "go.temporal.io/api/history/v1"
	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/api/workflowservice/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/cbtflow/cbtflow/internal/lab"
	"github.com/cbtflow/cbtflow/internal/stack"
)

const (
	MiB = 1 << 20
	GiB = 1 << 30
)

// backupJSON is the object `starter backup --wait --json` prints.
type backupJSON struct {
	BackupID string `json:"backup_id"`
	VM       string `json:"vm"`
	VMUUID   string `json:"vm_uuid"`
	Status   string `json:"status"`
	Error    string `json:"error"`
	Workflow string `json:"workflow_id"`
	Disks    []struct {
		Key      int32  `json:"key"`
		Mode     string `json:"mode"`
		Path     string `json:"path"`
		ChangeID string `json:"change_id"`
	} `json:"disks"`
}

// listJSON is one entry of `starter list --json`.
type listJSON struct {
	BackupID string `json:"backup_id"`
	VMUUID   string `json:"vm_uuid"`
	Status   string `json:"status"`
	Disks    []struct {
		Key       int32  `json:"key"`
		Mode      string `json:"mode"`
		Path      string `json:"path"`
		SizeBytes int64  `json:"size_bytes"`
		ChangeID  string `json:"change_id"`
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

// pattern returns n bytes of pseudo-random data without zero bytes (so no
// chunk of it is skipped as zeros).
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
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

// capture copies a lab disk's current content into a sparse file.
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

// sameContent compares two files of the same size byte for byte; data
// ranges of either file are read, ranges that are holes in both are equal.
// It returns a description of the first difference, or "" when equal.
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
	sa, _ := fa.Stat()
	sb, _ := fb.Stat()
	if sa.Size() != sb.Size() {
		return fmt.Sprintf("sizes differ: %d and %d", sa.Size(), sb.Size()), nil
	}
	var ranges [][2]int64
	for _, f := range []*os.File{fa, fb} {
		r, err := dataExtents(f, sa.Size())
		if err != nil {
			return "", err
		}
		ranges = append(ranges, r...)
	}
	sort.Slice(ranges, func(i, j int) bool { return ranges[i][0] < ranges[j][0] })
	bufA, bufB := make([]byte, 4*MiB), make([]byte, 4*MiB)
	done := int64(0) // everything below was compared
	for _, r := range ranges {
		for off := max(r[0], done); off < r[1]; {
			n := min(int64(len(bufA)), r[1]-off)
			if _, err := fa.ReadAt(bufA[:n], off); err != nil {
				return "", err
			}
			if _, err := fb.ReadAt(bufB[:n], off); err != nil {
				return "", err
			}
			if !bytes.Equal(bufA[:n], bufB[:n]) {
				for i := range n {
					if bufA[i] != bufB[i] {
						return fmt.Sprintf("first difference at byte %d", off+i), nil
					}
				}
			}
			off += n
			done = off
		}
	}
	return "", nil
}

// dataExtents lists the data ranges of a file (SEEK_DATA, SEEK_HOLE).
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

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// flipByte inverts the byte in the middle of a file.
func flipByte(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	off := fi.Size() / 2
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// repoFiles lists every entry of the repository that is not a folder,
// relative to it.
func repoFiles(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(root, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// readOnlyBind makes dir read-only for everyone, root included, with a
// read-only bind mount of dir onto itself, undone when t ends. (Root
// ignores permission bits; EROFS stops it.)
func readOnlyBind(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind mount %s: %v (the test needs root and mount rights)", dir, err)
	}
	undo := func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		undo()
		t.Fatalf("remount %s read-only: %v", dir, err)
	}
	t.Cleanup(undo)
	if err := os.WriteFile(filepath.Join(dir, ".probe"), nil, 0o600); !errors.Is(err, unix.EROFS) {
		t.Fatalf("%s is still writable after the read-only bind mount: %v", dir, err)
	}
}

// cbtflowSnapshots lists the snapshots named cbtflow-* of a lab VM, through
// the vSphere API.
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

func listWorkflows(ctx context.Context, t *testing.T, s *stack.Stack, query string) []*workflowpb.WorkflowExecutionInfo {
	t.Helper()
	var out []*workflowpb.WorkflowExecutionInfo
	var token []byte
	for {
		resp, err := s.Client().ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Namespace: stack.Namespace, Query: query, NextPageToken: token})
		if err != nil {
			t.Fatalf("list workflows %q: %v", query, err)
		}
		out = append(out, resp.GetExecutions()...)
		if token = resp.GetNextPageToken(); len(token) == 0 {
			return out
		}
	}
}

func history(ctx context.Context, t *testing.T, s *stack.Stack, id, run string) []*historypb.HistoryEvent {
	t.Helper()
	var events []*historypb.HistoryEvent
	it := s.Client().GetWorkflowHistory(ctx, id, run, false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	for it.HasNext() {
		ev, err := it.Next()
		if err != nil {
			t.Fatalf("history of %s: %v", id, err)
		}
		events = append(events, ev)
	}
	return events
}

// activityRuns summarizes the activities of one history.
type activityRuns struct {
	scheduled map[string]int                                    // activity type → times scheduled
	attempts  map[string][]int32                                // activity type → attempt of each started event
	failures  map[string][]*failurepb.Failure                   // activity type → failures
	canceled  map[string]int                                    // activity type → cancellations
	closed    *historypb.WorkflowExecutionFailedEventAttributes // nil unless the workflow failed
	status    enumspb.EventType                                 // the last event's type
}

func summarize(events []*historypb.HistoryEvent) activityRuns {
	r := activityRuns{scheduled: map[string]int{}, attempts: map[string][]int32{}, failures: map[string][]*failurepb.Failure{}, canceled: map[string]int{}}
	names := map[int64]string{}
	for _, ev := range events {
		switch ev.GetEventType() {
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
			name := ev.GetActivityTaskScheduledEventAttributes().GetActivityType().GetName()
			names[ev.GetEventId()] = name
			r.scheduled[name]++
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_STARTED:
			a := ev.GetActivityTaskStartedEventAttributes()
			r.attempts[names[a.GetScheduledEventId()]] = append(r.attempts[names[a.GetScheduledEventId()]], a.GetAttempt())
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_FAILED:
			a := ev.GetActivityTaskFailedEventAttributes()
			r.failures[names[a.GetScheduledEventId()]] = append(r.failures[names[a.GetScheduledEventId()]], a.GetFailure())
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
			r.canceled[names[ev.GetActivityTaskCanceledEventAttributes().GetScheduledEventId()]]++
		case enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
			r.closed = ev.GetWorkflowExecutionFailedEventAttributes()
		}
	}
	if len(events) > 0 {
		r.status = events[len(events)-1].GetEventType()
	}
	return r
}

// protoContains reports whether any string or bytes field of m, at any
// depth (payload data included), contains needle.
func protoContains(m protoreflect.Message, needle []byte) bool {
	found := false
	value := func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch fd.Kind() {
		case protoreflect.StringKind:
			return strings.Contains(v.String(), string(needle))
		case protoreflect.BytesKind:
			return bytes.Contains(v.Bytes(), needle)
		case protoreflect.MessageKind, protoreflect.GroupKind:
			return protoContains(v.Message(), needle)
		}
		return false
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len() && !found; i++ {
				found = value(fd, l.Get(i))
			}
		case fd.IsMap():
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				found = strings.Contains(k.String(), string(needle)) || value(fd.MapValue(), mv)
				return !found
			})
		default:
			found = value(fd, v)
		}
		return !found
	})
	return found
}
