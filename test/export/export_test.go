package export

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	enumspb "go.temporal.io/api/enums/v1"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const (
	vm  = "DC0_H0_VM1"
	MiB = 1 << 20
)

// exported is what `starter export --json` prints.
type exported struct {
	WorkflowID string   `json:"workflow_id"`
	BackupID   string   `json:"backup_id"`
	VM         string   `json:"vm"`
	DiskKey    int32    `json:"disk_key"`
	URI        string   `json:"uri"`
	Address    string   `json:"address"`
	Images     []string `json:"images"`
	Capacity   int64    `json:"capacity_bytes"`
}

// point is one backup and the disk's content at its time.
type point struct {
	id      string
	capture string
}

func backup(ctx context.Context, t *testing.T, s *stack.Stack, key int32, dir, name, mode string) point {
	t.Helper()
	p := point{capture: filepath.Join(dir, name+".raw")}
	stacktest.Capture(t, s.Lab(), vm, key, p.capture)
	args := []string{"backup", vm, "--wait", "--json"}
	if mode == workflows.ModeFull {
		args = append(args, "--full")
	}
	res, err := s.Starter(ctx, args...)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("%s: backup: %v %s", name, err, res)
	}
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &b); err != nil {
		t.Fatal(err)
	}
	if m := b.Disk(t, key).Mode; m != mode {
		t.Fatalf("%s: disk %d is %s, want %s", name, key, m, mode)
	}
	p.id = b.BackupID
	return p
}

// startExport starts `starter export ... --json` and waits for its line.
func startExport(ctx context.Context, t *testing.T, s *stack.Stack, id string, key int32, extra ...string) (*stack.RunningStarter, exported) {
	t.Helper()
	r, err := s.StartStarter(append([]string{"export", id, "--disk", strconv.Itoa(int(key)), "--json"}, extra...)...)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for !strings.Contains(r.Stdout(), "\n") {
		if time.Now().After(deadline) || ctx.Err() != nil {
			_ = r.Signal(syscall.SIGKILL)
			res, _ := r.Wait(ctx)
			t.Fatalf("export %s printed no URI: %s", id, res)
		}
		time.Sleep(200 * time.Millisecond)
	}
	var x exported
	if err := json.Unmarshal([]byte(r.Stdout()), &x); err != nil {
		t.Fatalf("export %s: %v: %q", id, err, r.Stdout())
	}
	return r, x
}

// nbdcopy copies the export at uri into a new file and compares it with
// the disk's content at backup time.
func sameAsCapture(ctx context.Context, t *testing.T, how, uri, out, capture string) {
	t.Helper()
	var cmd *exec.Cmd
	switch how {
	case "nbdcopy":
		cmd = exec.CommandContext(ctx, "nbdcopy", uri, out)
	case "qemu-img":
		cmd = exec.CommandContext(ctx, "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s from %s: %v: %s", how, uri, err, b)
	}
	defer os.Remove(out)
	if diff, err := stacktest.SameContent(out, capture); err != nil || diff != "" {
		t.Errorf("%s from %s differs from the disk at backup time: %s %v", how, uri, diff, err)
	}
}

// leases are the live export leases in the stack's catalog.
func leases(ctx context.Context, t *testing.T, db *pgx.Conn) []string {
	t.Helper()
	rows, err := db.Query(ctx, `SELECT id FROM exports WHERE expires_at > now() ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// answers reports whether something accepts connections at addr.
func answers(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func workflowStatus(ctx context.Context, t *testing.T, s *stack.Stack, wid string) enumspb.WorkflowExecutionStatus {
	t.Helper()
	d, err := s.Client().DescribeWorkflow(ctx, wid, "")
	if err != nil {
		t.Fatal(err)
	}
	return d.Status
}

func TestExport(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	l := s.Lab()
	disks, err := l.Disks(vm)
	if err != nil || len(disks) != 1 {
		t.Fatalf("lab VM %s: %+v %v", vm, disks, err)
	}
	key := disks[0].Key
	k := strconv.Itoa(int(key))
	capacity, err := l.DiskCapacity(vm, key)
	if err != nil {
		t.Fatal(err)
	}
	db, err := pgx.Connect(ctx, s.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(context.Background())
	dir := t.TempDir()

	// A chain of three images: a full and two incrementals, with data
	// overwritten, added, and zeroed between them.
	for i := range int64(4) {
		stacktest.WriteDisk(t, l, vm, key, i*(capacity/4), stacktest.Pattern(uint64(i+1), 3*MiB))
	}
	first := backup(ctx, t, s, key, dir, "first", workflows.ModeFull)
	stacktest.WriteDisk(t, l, vm, key, MiB, stacktest.Pattern(11, 2*MiB))
	stacktest.WriteDisk(t, l, vm, key, capacity/2+5*MiB, stacktest.Pattern(12, MiB))
	second := backup(ctx, t, s, key, dir, "second", workflows.ModeIncremental)
	stacktest.WriteDisk(t, l, vm, key, capacity/4, make([]byte, 2*MiB))
	stacktest.WriteDisk(t, l, vm, key, capacity-MiB, stacktest.Pattern(13, MiB))
	third := backup(ctx, t, s, key, dir, "third", workflows.ModeIncremental)
	// The lab's disk goes on changing: the export must show the point.
	stacktest.WriteDisk(t, l, vm, key, 0, stacktest.Pattern(14, 4*MiB))

	// 1. The third point, served as its chain of three images: nbdcopy
	// and qemu-img convert read the disk as it was at backup time.
	r, x := startExport(ctx, t, s, third.id, key)
	wid := workflows.ExportWorkflowID(third.id, key)
	if x.WorkflowID != wid || x.BackupID != third.id || x.VM != vm || x.DiskKey != key || x.Capacity != capacity ||
		!strings.HasPrefix(x.URI, "nbd://127.0.0.1:") || x.URI != "nbd://"+x.Address || len(x.Images) != 3 {
		t.Errorf("export --json: %+v, want workflow %s, backup %s, VM %s, disk %d, an nbd://127.0.0.1 URI and 3 images", x, wid, third.id, vm, key)
	}
	sameAsCapture(ctx, t, "nbdcopy", x.URI, filepath.Join(dir, "nbdcopy.raw"), third.capture)
	sameAsCapture(ctx, t, "qemu-img", x.URI, filepath.Join(dir, "qemu-img.raw"), third.capture)
	if got := leases(ctx, t, db); !slices.Equal(got, []string{wid}) {
		t.Errorf("leases while exporting: %v, want [%s]", got, wid)
	}

	// 2. starter status lists it with its URI, in text and JSON.
	res, err := s.Starter(ctx, "status")
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Stdout, x.URI) || !strings.Contains(res.Stdout, third.id) ||
		!strings.Contains(res.Stdout, "serving") {
		t.Errorf("status while exporting: want the export's URI, point and phase: %v %s", err, res)
	}
	res, err = s.Starter(ctx, "status", vm, "--json")
	var entries []struct {
		Kind       string                    `json:"kind"`
		WorkflowID string                    `json:"workflow_id"`
		Export     *workflows.ExportProgress `json:"export"`
	}
	if err == nil {
		err = json.Unmarshal([]byte(res.Stdout), &entries)
	}
	if err != nil || len(entries) != 1 || entries[0].Kind != "export" || entries[0].WorkflowID != wid || entries[0].Export == nil ||
		entries[0].Export.URI != x.URI {
		t.Errorf("status --json while exporting: %v %+v, want the export with URI %s", err, entries, x.URI)
	}

	// 3. A second export of the disk is refused, naming the first.
	res, err = s.Starter(ctx, "export", third.id, "--disk", k)
	if err != nil || res.ExitCode != 3 || !strings.Contains(res.Stderr, "already exported at "+x.URI) {
		t.Errorf("a second export: want exit 3 naming %s: %v %s", x.URI, err, res)
	}

	// 4. Ctrl-C stops it: the starter exits 0, qemu-nbd is gone, and so
	// are the lease and the workflow.
	if err := r.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	res, err = r.Wait(ctx)
	if err != nil || res.ExitCode != 0 {
		t.Errorf("the interrupted export's starter: want exit 0: %v %s", err, res)
	}
	if ps := stack.ProcsMentioning(x.Images[0]); len(ps) != 0 {
		t.Errorf("after Ctrl-C, processes still serve %s: %v", x.Images[0], ps)
	}
	if c, err := net.DialTimeout("tcp", x.Address, 2*time.Second); err == nil {
		c.Close()
		t.Errorf("after Ctrl-C, %s still accepts connections", x.Address)
	}
	if got := leases(ctx, t, db); len(got) != 0 {
		t.Errorf("leases after Ctrl-C: %v, want none", got)
	}
	if st := workflowStatus(ctx, t, s, wid); st != enumspb.WORKFLOW_EXECUTION_STATUS_CANCELED {
		t.Errorf("the export's workflow after Ctrl-C: %s, want canceled", st)
	}

	// 5. A worker killed while it serves takes its qemu-nbd with it; the
	// export comes back on the retry, on the same address, with its
	// lease.
	res, err = s.Starter(ctx, "export", third.id, "--disk", k, "--detach", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("export --detach: %v %s", err, res)
	}
	var dx exported
	if err := json.Unmarshal([]byte(res.Stdout), &dx); err != nil {
		t.Fatalf("export --detach --json: %v %q", err, res.Stdout)
	}
	if err := s.KillWorker(); err != nil {
		t.Fatal(err)
	}
	if ps := stack.WaitGone(10*time.Second, dx.Images[0]); len(ps) != 0 {
		t.Errorf("10 s after the worker's SIGKILL, processes still serve %s: %v", dx.Images[0], ps)
	}
	if err := s.StartWorker(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		v, err := s.Client().QueryWorkflow(ctx, wid, "", workflows.QueryProgress)
		var p workflows.ExportProgress
		if err == nil {
			err = v.Get(&p)
		}
		if err == nil && p.Phase == workflows.ExportServing && p.URI == dx.URI && answers(dx.Address) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the export did not come back at %s after the worker's restart: %+v %v", dx.URI, p, err)
		}
		time.Sleep(time.Second)
	}
	sameAsCapture(ctx, t, "nbdcopy", dx.URI, filepath.Join(dir, "again.raw"), third.capture)
	if got := leases(ctx, t, db); !slices.Equal(got, []string{wid}) {
		t.Errorf("leases after the retry: %v, want [%s]", got, wid)
	}
	res, err = s.Starter(ctx, "export", "stop", wid)
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Stdout, "export "+wid+" stopped") {
		t.Errorf("export stop %s: %v %s", wid, err, res)
	}

	// 6. A prune with keep-last 1 while the oldest point is exported
	// keeps it, and prunes the rest: the second point is merged into the
	// third. The export still reads the first point's disk.
	res, err = s.Starter(ctx, "export", first.id, "--disk", k, "--detach", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("export --detach: %v %s", err, res)
	}
	var fx exported
	if err := json.Unmarshal([]byte(res.Stdout), &fx); err != nil || len(fx.Images) != 1 {
		t.Fatalf("export --detach --json: %v %+v", err, fx)
	}
	if res, err = s.Starter(ctx, "retention", "set", vm, "--keep-last", "1"); err != nil || res.ExitCode != 0 {
		t.Fatalf("retention set: %v %s", err, res)
	}
	pr := prune(ctx, t, s)
	wantRule := "exported (" + workflows.ExportWorkflowID(first.id, key) + ")"
	if pr.Status != workflows.PruneStatusPruned || len(pr.Removed) != 1 || pr.Removed[0].BackupID != second.id {
		t.Errorf("prune while the first point is exported: %+v, want pruned, %s removed", pr, second.id)
	}
	kept := map[string][]string{}
	for _, kp := range pr.Kept {
		kept[kp.BackupID] = kp.Rules
	}
	if !slices.Contains(kept[first.id], wantRule) || len(kept[third.id]) == 0 || len(kept) != 2 {
		t.Errorf("prune kept %v, want %s by %q and %s", kept, first.id, wantRule, third.id)
	}
	sameAsCapture(ctx, t, "nbdcopy", fx.URI, filepath.Join(dir, "first.out"), first.capture)
	out := filepath.Join(dir, "third.out")
	if res, err := s.Starter(ctx, "restore", third.id, "--disk", k, "--to", out); err != nil || res.ExitCode != 0 {
		t.Fatalf("restore of the third point after the prune: %v %s", err, res)
	}
	if diff, err := stacktest.SameContent(out, third.capture); err != nil || diff != "" {
		t.Errorf("the third point after the prune differs from the disk at its backup: %s %v", diff, err)
	}
	_ = os.Remove(out)

	// 7. export stop ends it; the next prune removes the first point.
	res, err = s.Starter(ctx, "export", "stop", first.id, "--disk", k)
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Stdout, "stopped") {
		t.Errorf("export stop: %v %s", err, res)
	}
	if got := leases(ctx, t, db); len(got) != 0 {
		t.Errorf("leases after export stop: %v, want none", got)
	}
	if res, err = s.Starter(ctx, "export", "stop", first.id, "--disk", k); err != nil || res.ExitCode != 1 ||
		!strings.Contains(res.Stderr, "no export "+workflows.ExportWorkflowID(first.id, key)+" is running") {
		t.Errorf("export stop of a stopped export: want exit 1 naming it: %v %s", err, res)
	}
	pr = prune(ctx, t, s)
	if pr.Status != workflows.PruneStatusPruned || len(pr.Removed) != 1 || pr.Removed[0].BackupID != first.id {
		t.Errorf("prune after export stop: %+v, want %s removed", pr, first.id)
	}

	// 8. A --listen address whose port is taken: qemu-nbd cannot listen,
	// and the starter says so while the attempts are retried (not when
	// they are spent, minutes later); Ctrl-C then stops the export
	// before it served: exit 1, no lease, the workflow canceled.
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	busy, err := s.StartStarter("export", third.id, "--disk", k, "--listen", taken.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(time.Minute)
	for !strings.Contains(busy.Stderr(), "Address already in use") && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(busy.Stderr(), "Address already in use") || !strings.Contains(busy.Stderr(), "retried") {
		t.Errorf("export on a taken port: the starter did not say qemu-nbd cannot listen within a minute: %s", busy.Stderr())
	}
	if err := busy.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	res, err = busy.Wait(ctx)
	taken.Close()
	if err != nil || res.ExitCode != 1 || !strings.Contains(res.Stderr, "interrupted before it served") {
		t.Errorf("export on a taken port, interrupted: want exit 1, interrupted before it served: %v %s", err, res)
	}
	if st := workflowStatus(ctx, t, s, wid); st != enumspb.WORKFLOW_EXECUTION_STATUS_CANCELED {
		t.Errorf("the export on a taken port after Ctrl-C: %s, want canceled", st)
	}

	// 9. Usage errors and an unknown point.
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"export", third.id}, 2, `--disk "" is not a device key`},
		{[]string{"export", third.id, "--disk", k, "--listen", "nowhere"}, 2, `--listen "nowhere" is not HOST:PORT`},
		{[]string{"export", "stop", third.id}, 2, "give --disk KEY"},
		{[]string{"export", "20990101T000000Z-000000000000", "--disk", k}, 1, "backup 20990101T000000Z-000000000000 does not exist"},
	} {
		res, err := s.Starter(ctx, c.args...)
		if err != nil || res.ExitCode != c.code || !strings.Contains(res.Stderr, c.want) {
			t.Errorf("starter %v: want exit %d and %q: %v %s", c.args, c.code, c.want, err, res)
		}
	}
	if got := leases(ctx, t, db); len(got) != 0 {
		t.Errorf("leases at the end: %v, want none", got)
	}
}

// prune prunes the VM and returns its result.
func prune(ctx context.Context, t *testing.T, s *stack.Stack) workflows.PruneVMResult {
	t.Helper()
	res, err := s.Starter(ctx, "prune", vm, "--wait", "--json")
	if err != nil {
		t.Fatalf("prune: %v %s", err, res)
	}
	var pr workflows.PruneResult
	if err := stacktest.DecodeOne(res.Stdout, &pr); err != nil || len(pr.VMs) != 1 {
		t.Fatalf("prune: %v %s", err, res)
	}
	if res.ExitCode != 0 {
		t.Errorf("prune: exit %d: %s", res.ExitCode, fmt.Sprint(pr.Errors))
	}
	return pr.VMs[0]
}
