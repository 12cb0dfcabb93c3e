package restore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const vm = "DC0_H0_VM1"

// remote is a starter that knows only Temporal: its repository folder
// does not exist and its catalog URL names a port nothing listens on, so
// anything it read of either would fail.
type remote struct {
	s    *stack.Stack
	repo string
	dir  string
}

func newRemote(t *testing.T, s *stack.Stack) *remote {
	base := t.TempDir()
	return &remote{s: s, repo: filepath.Join(base, "no-such-repository"), dir: base}
}

func (r *remote) cmd(args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	c := exec.Command(r.s.Binaries().Starter, args...)
	c.Dir = r.dir
	c.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + r.dir,
		"TMPDIR=" + r.dir,
		"TEMPORAL_ADDRESS=" + r.s.TemporalAddress(),
		"TEMPORAL_NAMESPACE=" + stack.Namespace,
		"CBTFLOW_REPOSITORY=" + r.repo,
		"CBTFLOW_DATABASE_URL=postgres://cbtflow@127.0.0.1:1/nothing?connect_timeout=1",
		"CBTFLOW_VCENTERS=" + filepath.Join(r.dir, "no-such-vcenters.json"),
	}
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	return c, &stdout, &stderr
}

// result is one run of the remote starter.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return "exit " + strconv.Itoa(r.code) + "\nstdout: " + r.stdout + "\nstderr: " + r.stderr
}

func (r *remote) run(ctx context.Context, t *testing.T, args ...string) result {
	t.Helper()
	c, stdout, stderr := r.cmd(args...)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	return r.wait(ctx, t, c, stdout, stderr)
}

func (r *remote) wait(ctx context.Context, t *testing.T, c *exec.Cmd, stdout, stderr *bytes.Buffer) result {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatalf("starter %v: %v", c.Args, err)
		}
	case <-ctx.Done():
		_ = c.Process.Kill()
		<-done
		t.Fatalf("starter %v did not end: %v\nstderr: %s", c.Args, ctx.Err(), stderr)
	}
	return result{code: c.ProcessState.ExitCode(), stdout: stdout.String(), stderr: stderr.String()}
}

var workflowInLog = regexp.MustCompile(`workflow=(restore/\S+)`)

// workflowOf is the Restore workflow a starter's log names.
func workflowOf(t *testing.T, stderr string) string {
	t.Helper()
	m := workflowInLog.FindStringSubmatch(stderr)
	if m == nil {
		t.Fatalf("the starter's log names no restore workflow: %s", stderr)
	}
	return m[1]
}

// leftovers are the files in dir (temporary files included).
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

func TestRestoreWorkflow(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	l := s.Lab()
	disks, err := l.Disks(vm)
	if err != nil || len(disks) != 1 {
		t.Fatalf("lab VM %s: %+v %v", vm, disks, err)
	}
	key := disks[0].Key
	capacity, err := l.DiskCapacity(vm, key)
	if err != nil {
		t.Fatal(err)
	}
	// Data in 16 areas across the disk, so that qemu-img reports its
	// progress midway.
	for i := range int64(16) {
		stacktest.WriteDisk(t, l, vm, key, i*(capacity/16), stacktest.Pattern(uint64(i+1), 4<<20))
	}
	r, err := s.Starter(ctx, "backup", vm, "--full", "--wait", "--json")
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("backup: %v %s", err, r)
	}
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(r.Stdout, &b); err != nil {
		t.Fatal(err)
	}
	data := t.TempDir()
	capture := filepath.Join(data, "capture.raw")
	stacktest.Capture(t, l, vm, key, capture)
	out := filepath.Join(data, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	rs := newRemote(t, s)
	k := strconv.Itoa(int(key))

	// 1. Through the workflow, from a starter without the repository or
	// the catalog: the worker writes the disk as it was at backup time.
	target := filepath.Join(out, "disk.raw")
	res := rs.run(ctx, t, "restore", b.BackupID, "--disk", k, "--to", target)
	if res.code != 0 {
		t.Fatalf("restore through the workflow: %s", res)
	}
	if diff, err := stacktest.SameContent(target, capture); err != nil || diff != "" {
		t.Errorf("the restored file differs from the disk at backup time: %s %v", diff, err)
	}
	if res.stdout != "" {
		t.Errorf("restore printed %q on stdout (not a terminal): want nothing, as before", res.stdout)
	}
	if _, err := os.Stat(rs.repo); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the starter's repository folder %s: %v, want it never made", rs.repo, err)
	}
	wid := workflowOf(t, res.stderr)
	// Its search attributes find it by backup ID and VM.
	q := "WorkflowType = 'Restore' AND CbtflowBackupID = '" + b.BackupID + "' AND CbtflowVM = '" + vm + "'"
	deadline := time.Now().Add(30 * time.Second)
	for {
		found := stacktest.ListWorkflows(ctx, t, s, q)
		if len(found) == 1 && found[0].GetExecution().GetWorkflowId() == wid && found[0].GetStatus() == enumspb.WORKFLOW_EXECUTION_STATUS_COMPLETED {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("visibility %q: %v, want the completed restore %s", q, found, wid)
		}
		time.Sleep(500 * time.Millisecond)
	}
	// qcow2, over the file with --force.
	res = rs.run(ctx, t, "restore", b.BackupID, "--disk", k, "--to", target, "--force", "--format", "qcow2")
	if res.code != 0 {
		t.Fatalf("restore --force --format qcow2: %s", res)
	}
	if head, err := os.ReadFile(target); err != nil || !bytes.HasPrefix(head, []byte("QFI\xfb")) {
		t.Errorf("restore --format qcow2 --force: %s is not a QCOW2 (%v)", target, err)
	}

	// 2. Bad input fails at once, not retried, naming what was wrong, and
	// writes nothing.
	if err := os.Mkdir(filepath.Join(out, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	before := leftovers(t, out)
	for _, c := range []struct {
		id, key, to, want, errType string
	}{
		{b.BackupID, k, target, "starter: restore: " + target + " exists (a regular file of", activities.ErrTypeRestoreRefused},
		{b.BackupID, k, filepath.Join(out, "dir"), "starter: restore: " + filepath.Join(out, "dir") + " is a directory: give the path of a file to write", activities.ErrTypeRestoreRefused},
		{"20990101T000000Z-000000000000", k, filepath.Join(out, "x.raw"), "starter: restore: backup 20990101T000000Z-000000000000 does not exist", activities.ErrTypeNoRestorePoint},
		{b.BackupID, "99", filepath.Join(out, "x.raw"), "starter: restore: backup " + b.BackupID + " has no disk 99", activities.ErrTypeNoRestorePoint},
	} {
		// A failure no retry mends ends at once: the history shows one
		// attempt, failed non-retryably (below), not a wall-clock bound,
		// which a busy machine overruns (it took 20.04 s of a 20 s bound
		// once, with the activity failed in its first attempt at once).
		res := rs.run(ctx, t, "restore", c.id, "--disk", c.key, "--to", c.to)
		if res.code != 1 || !strings.Contains(res.stderr, c.want) {
			t.Errorf("restore %s disk %s to %s: want exit 1 and %q, got %s", c.id, c.key, c.to, c.want, res)
			continue
		}
		attempts, failed := 0, 0
		for _, e := range stacktest.History(ctx, t, s, workflowOf(t, res.stderr), "") {
			if a := e.GetActivityTaskStartedEventAttributes(); a != nil {
				attempts = max(attempts, int(a.GetAttempt()))
			}
			if f := e.GetActivityTaskFailedEventAttributes(); f != nil {
				failed++
				if info := f.GetFailure().GetApplicationFailureInfo(); !info.GetNonRetryable() || info.GetType() != c.errType {
					t.Errorf("restore %s disk %s to %s: the activity failed with type %q, non-retryable %v; want %q, non-retryable",
						c.id, c.key, c.to, info.GetType(), info.GetNonRetryable(), c.errType)
				}
			}
		}
		if attempts != 1 || failed != 1 {
			t.Errorf("restore %s disk %s to %s: %d attempts, %d failures; want 1 failed attempt", c.id, c.key, c.to, attempts, failed)
		}
	}
	if after := leftovers(t, out); strings.Join(after, " ") != strings.Join(before, " ") {
		t.Errorf("refused restores left files: before %v, after %v", before, after)
	}

	// 3. Mid-restore: the progress query answers the live bytes written;
	// a cancel then leaves no file, not even a temporary one.
	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.MidRestore); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = gates.Release(faultpoint.MidRestore) }()
	held := filepath.Join(out, "held.raw")
	c, stdout, stderr := rs.cmd("restore", b.BackupID, "--disk", k, "--to", held)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
	if _, err := gates.Wait(wctx, faultpoint.MidRestore); err != nil {
		wcancel()
		_ = c.Process.Kill()
		t.Fatalf("%v\nstderr: %s", err, stderr)
	}
	wcancel()
	wid = workflowOf(t, stderr.String())
	var p workflows.RestoreProgress
	deadline = time.Now().Add(30 * time.Second)
	for {
		v, err := s.Client().QueryWorkflow(ctx, wid, "", workflows.QueryProgress)
		if err == nil {
			err = v.Get(&p)
		}
		if err == nil && p.Live && p.Phase == workflows.RestoreWriting && p.Done > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("progress of the held restore: %+v %v, want live bytes written", p, err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if p.Total != capacity || p.Done >= p.Total || p.Percent <= 0 || p.Percent >= 100 || p.BackupID != b.BackupID ||
		p.VM != vm || p.DiskKey != key || p.To != held || p.Capacity != capacity {
		t.Errorf("progress of the restore held midway: %+v, want bytes of %d done, under the total", p, capacity)
	}
	// status lists it (as JSON and for a person), watch follows it and
	// cancel (by its backup ID) ends it: all from the remote starter.
	statusRestore(ctx, t, rs, wid, b.BackupID, held)
	watch, watchOut, watchErr := rs.cmd("watch", wid)
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(time.Minute)
	for !strings.Contains(watchOut.String(), "writing") {
		if time.Now().After(deadline) {
			t.Fatalf("watch %s never showed the restore writing: stdout %q, stderr %q", wid, watchOut, watchErr)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if cr := rs.run(ctx, t, "cancel", b.BackupID); cr.code != 0 || !strings.Contains(cr.stdout, wid) || !strings.Contains(cr.stdout, "canceled: no file was written") {
		t.Errorf("cancel %s (its running restore): %s", b.BackupID, cr)
	}
	if wr := rs.wait(ctx, t, watch, watchOut, watchErr); wr.code != 1 || !strings.Contains(wr.stdout, "restore of backup "+b.BackupID+" of VM "+vm) ||
		!strings.Contains(wr.stderr, "was canceled: no file was written") {
		t.Errorf("watch of the canceled restore: want exit 1, its phases and why it ended; got %s", wr)
	}
	if cr := rs.run(ctx, t, "cancel", wid); cr.code != 1 || !strings.Contains(cr.stderr, "is not running") {
		t.Errorf("cancel of a restore that ended: %s", cr)
	}
	res = rs.wait(ctx, t, c, stdout, stderr)
	if want := "was canceled: no file was written"; res.code != 1 || !strings.Contains(res.stderr, want) {
		t.Errorf("the canceled restore's starter: want exit 1 and %q, got %s", want, res)
	}
	if after := leftovers(t, out); strings.Join(after, " ") != strings.Join(before, " ") {
		t.Errorf("a canceled restore left files: before %v, after %v", before, after)
	}
	if desc, err := s.Client().DescribeWorkflow(ctx, wid, ""); err != nil || desc.Status != enumspb.WORKFLOW_EXECUTION_STATUS_CANCELED {
		t.Errorf("the canceled restore's workflow: %+v %v, want canceled", desc, err)
	}
	if err := gates.Release(faultpoint.MidRestore); err != nil {
		t.Fatal(err)
	}

	// 4. --local runs in the starter's process, from the catalog and the
	// repository: the remote starter has neither.
	res = rs.run(ctx, t, "restore", b.BackupID, "--disk", k, "--to", filepath.Join(out, "local.raw"), "--local")
	if res.code != 1 {
		t.Errorf("restore --local without the catalog: want exit 1, got %s", res)
	}
	r, err = s.Starter(ctx, "restore", b.BackupID, "--disk", k, "--to", filepath.Join(out, "local.raw"), "--local")
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("restore --local: %v %s", err, r)
	}
	if diff, err := stacktest.SameContent(filepath.Join(out, "local.raw"), capture); err != nil || diff != "" {
		t.Errorf("restore --local differs from the disk at backup time: %s %v", diff, err)
	}

	// 5. On a terminal: a headline and the bars of the verification and
	// the writing, both done at the end.
	tty, err := testutil.OpenPTY(40, 200)
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	onTTY := filepath.Join(out, "tty.raw")
	c, stdout, stderr = rs.cmd("restore", b.BackupID, "--disk", k, "--to", onTTY)
	c.Stdout = tty.Slave
	c.Env = append(c.Env, "TERM=xterm")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	tty.CloseSlave()
	res = rs.wait(ctx, t, c, stdout, stderr)
	tty.Drain()
	screen := tty.Output()
	if res.code != 0 {
		t.Fatalf("restore on a terminal: %s\nterminal: %q", res, screen)
	}
	for _, want := range []string{"restore of backup " + b.BackupID + " of VM " + vm + " disk " + k + " to " + onTTY, "verify", "write", "done, "} {
		if !strings.Contains(screen, want) {
			t.Errorf("the terminal lacks %q: %q", want, screen)
		}
	}
	if diff, err := stacktest.SameContent(onTTY, capture); err != nil || diff != "" {
		t.Errorf("restore on a terminal differs from the disk at backup time: %s %v", diff, err)
	}
}

// statusRestore checks that `starter status` lists the running restore
// wid of backupID to path with its phase and live bytes, and that a
// status of another VM does not.
func statusRestore(ctx context.Context, t *testing.T, rs *remote, wid, backupID, path string) {
	t.Helper()
	var entries []struct {
		Kind       string                     `json:"kind"`
		WorkflowID string                     `json:"workflow_id"`
		BackupID   string                     `json:"backup_id"`
		VM         string                     `json:"vm"`
		Restore    *workflows.RestoreProgress `json:"restore"`
	}
	var r result
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(300 * time.Millisecond) {
		r = rs.run(ctx, t, "status", vm, "--json")
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &entries) != nil {
			t.Fatalf("status --json: %s", r)
		}
		if len(entries) == 1 && entries[0].Restore != nil && entries[0].Restore.Live && entries[0].Restore.Done > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status --json never listed the held restore with its bytes: %s", r)
		}
	}
	if en := entries[0]; en.Kind != "restore" || en.WorkflowID != wid || en.BackupID != backupID || en.VM != vm ||
		en.Restore.Phase != workflows.RestoreWriting || en.Restore.To != path {
		t.Errorf("status --json: %+v (restore %+v)", en, en.Restore)
	}
	r = rs.run(ctx, t, "status")
	for _, want := range []string{"RESTORE", wid, backupID, path, "writing", " of ", "%)", "no backup is running"} {
		if r.code != 0 || !strings.Contains(r.stdout, want) {
			t.Errorf("status: want %q in %s", want, r)
		}
	}
	if r = rs.run(ctx, t, "status", "DC0_H0_VM0"); r.code != 0 || strings.Contains(r.stdout, wid) {
		t.Errorf("status of another VM lists the restore: %s", r)
	}
}
