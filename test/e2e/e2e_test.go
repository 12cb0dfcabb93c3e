package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	historypb "go.temporal.io/api/history/v1"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

// VM under test: the lab's VM with two disks.
const vm = lab.SecondDiskVM

var keys = []int32{204, 205}

const (
	MiB = 1 << 20
	GiB = 1 << 30
)

// TestEndToEnd is the acceptance test: full, incremental and empty
// incremental backups through the starter CLI, every restore point of
// every disk restored and compared byte for byte with the guest data at
// backup time, change IDs against the lab's log, snapshots removed, the
// JSON contract, a chain damaged after commit refused, an unknown VM
// failing fast and once, a second backup of a running VM refused whatever
// the VM is called, and the worker's metrics.
func TestEndToEnd(t *testing.T) {
	began := time.Now()
	s := stacktest.New(t, stack.Options{})
	l := s.Lab()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	data := t.TempDir()
	phase := time.Now()
	lap := func(what string) {
		t.Logf("%-28s %6.1fs", what, time.Since(phase).Seconds())
		phase = time.Now()
	}
	lap("stack up")

	disks, err := l.Disks(vm)
	if err != nil {
		t.Fatal(err)
	}
	if len(disks) != 2 || disks[0].Key != 204 || disks[1].Key != 205 {
		t.Fatalf("lab VM %s: want disks 204 and 205, got %+v", vm, disks)
	}
	vmRef := disks[0].VMRef

	// backup runs one backup of vm through the CLI, after capturing every
	// disk's content, and checks what every backup must satisfy.
	backup := func(name string, wantMode string) (stacktest.BackupJSON, map[int32]string) {
		t.Helper()
		caps := map[int32]string{}
		for _, k := range keys {
			caps[k] = filepath.Join(data, fmt.Sprintf("%s-%d.raw", name, k))
			stacktest.Capture(t, l, vm, k, caps[k])
		}
		res, err := s.Starter(ctx, "backup", vm, "--wait", "--json")
		if err != nil {
			t.Fatal(err)
		}
		b := checkBackupContract(t, res, s.Repository())
		if b.VM != vm || len(b.Disks) != len(keys) {
			t.Fatalf("%s: backup of %q with %d disks, want %s with %d", name, b.VM, len(b.Disks), vm, len(keys))
		}
		stamps := l.ChangeIDLog()
		for _, k := range keys {
			d := b.Disk(t, k)
			if d.Mode != wantMode {
				t.Errorf("%s: disk %d mode %q, want %q", name, k, d.Mode, wantMode)
			}
			var logged []string
			for _, st := range stamps {
				if st.SnapshotName == activities.SnapshotPrefix+b.BackupID && st.DiskKey == k {
					logged = append(logged, st.ChangeID)
				}
			}
			if len(logged) != 1 || logged[0] != d.ChangeID {
				t.Errorf("%s: disk %d: change ID %q, the lab stamped %v for snapshot %s%s", name, k, d.ChangeID, logged, activities.SnapshotPrefix, b.BackupID)
			}
		}
		left, err := stacktest.Snapshots(ctx, l, vmRef)
		if err != nil {
			t.Fatal(err)
		}
		if len(left) > 0 {
			t.Errorf("%s: snapshots left on %s: %v", name, vm, left)
		}
		return b, caps
	}

	// 1. Full backup of guest data on both disks, including the very end.
	stacktest.WriteDisk(t, l, vm, 204, 0, stacktest.Pattern(1, 4*MiB))
	stacktest.WriteDisk(t, l, vm, 204, 5*GiB, stacktest.Pattern(2, MiB))
	stacktest.WriteDisk(t, l, vm, 205, GiB, stacktest.Pattern(3, 2*MiB))
	stacktest.WriteDisk(t, l, vm, 205, 10*GiB-1000, stacktest.Pattern(4, 1000))
	b1, caps1 := backup("b1", workflows.ModeFull)
	for _, k := range keys {
		if d := b1.Disk(t, k); d.ChangedBytes == 0 || d.WrittenBytes == 0 {
			t.Errorf("b1 disk %d: changed %d, written %d: want data", k, d.ChangedBytes, d.WrittenBytes)
		}
	}
	lap("full backup")

	// 2. Guest writes: an earlier region overwritten with zeros, another
	// discarded (a hole on the source), new and overwritten data, an
	// unaligned write, on both disks.
	stacktest.WriteDisk(t, l, vm, 204, MiB, make([]byte, MiB))
	stacktest.WriteDisk(t, l, vm, 204, 3*GiB, stacktest.Pattern(5, 3*MiB))
	stacktest.WriteDisk(t, l, vm, 204, 5*GiB+4096+17, stacktest.Pattern(6, 5000))
	stacktest.WriteDisk(t, l, vm, 205, GiB+512<<10, stacktest.Pattern(7, 256<<10))
	if err := l.PunchHole(vm, 205, GiB+MiB, 512<<10); err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, l, vm, 205, 7*GiB+12345, stacktest.Pattern(8, 100000))
	b2, caps2 := backup("b2", workflows.ModeIncremental)
	for _, k := range keys {
		if d := b2.Disk(t, k); d.ChangedBytes == 0 || d.ChangedBytes >= b1.Disk(t, k).ChangedBytes+8*MiB {
			t.Errorf("b2 disk %d: changed %d bytes: want the few areas written since b1", k, d.ChangedBytes)
		}
	}
	lap("incremental backup")

	// 3. No guest writes: an empty incremental.
	b3, caps3 := backup("b3", workflows.ModeIncremental)
	for _, k := range keys {
		if d := b3.Disk(t, k); d.ChangedBytes != 0 || d.WrittenBytes != 0 {
			t.Errorf("b3 disk %d: changed %d, written %d bytes, want 0", k, d.ChangedBytes, d.WrittenBytes)
		}
	}
	lap("empty incremental")

	// The catalog agrees with the backups' output.
	res, err := s.Starter(ctx, "list", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("list: %v %s", err, res)
	}
	var list []stacktest.ListJSON
	if err := stacktest.DecodeOne(res.Stdout, &list); err != nil {
		t.Fatal(err)
	}
	backups := []stacktest.BackupJSON{b1, b2, b3}
	if len(list) != len(backups) {
		t.Fatalf("list: %d entries, want %d:\n%s", len(list), len(backups), res.Stdout)
	}
	for _, b := range backups {
		found := false
		for _, e := range list {
			if e.BackupID != b.BackupID {
				continue
			}
			found = true
			if e.Status != "committed" || len(e.Disks) != len(keys) {
				t.Errorf("list: %s is %s with %d disks", e.BackupID, e.Status, len(e.Disks))
			}
			for _, d := range e.Disks {
				if want := b.Disk(t, d.Key); d.ChangeID != want.ChangeID || d.Path != want.Path || d.Mode != want.Mode {
					t.Errorf("list: %s disk %d: %s %s %s, the backup said %s %s %s", e.BackupID, d.Key, d.Mode, d.ChangeID, d.Path, want.Mode, want.ChangeID, want.Path)
				}
			}
		}
		if !found {
			t.Errorf("list: backup %s missing", b.BackupID)
		}
	}

	// 4. Every restore point of every disk, byte for byte.
	for i, b := range backups {
		caps := []map[int32]string{caps1, caps2, caps3}[i]
		for _, k := range keys {
			out := filepath.Join(data, fmt.Sprintf("restore-%d-%d.raw", i+1, k))
			res, err := s.Starter(ctx, "restore", b.BackupID, "--disk", fmt.Sprint(k), "--to", out)
			if err != nil || res.ExitCode != 0 {
				t.Fatalf("restore %s disk %d: %v %s", b.BackupID, k, err, res)
			}
			diff, err := stacktest.SameContent(caps[k], out)
			if err != nil {
				t.Fatal(err)
			}
			if diff != "" {
				t.Errorf("restore of b%d disk %d differs from the disk at backup time: %s", i+1, k, diff)
			}
			_ = os.Remove(out)
		}
	}
	// The comparison itself can fail: b1 and b2 differ.
	if diff, err := stacktest.SameContent(caps1[204], caps2[204]); err != nil || diff == "" {
		t.Errorf("the captures of b1 and b2 should differ (%v)", err)
	}
	lap("6 restores compared")

	// A chain whose middle image was altered after commit is refused, by
	// file name; then the image is put back.
	middle := b2.Disk(t, 204).Path
	stacktest.FlipByte(t, middle)
	res, err = s.Starter(ctx, "restore", b3.BackupID, "--disk", "204", "--to", filepath.Join(data, "damaged.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode == 0 || !strings.Contains(res.Stderr, middle) {
		t.Errorf("restore through a damaged image: want a non-zero exit naming %s, got %s", middle, res)
	}
	if _, err := os.Stat(filepath.Join(data, "damaged.raw")); err == nil {
		t.Error("a refused restore left its output file")
	}
	stacktest.FlipByte(t, middle)
	lap("damaged chain refused")

	unknownVM(ctx, t, s)
	lap("unknown VM")

	alreadyRunning(ctx, t, s)
	lap("already running")

	// The worker's metrics endpoint serves the SDK's metrics.
	resp, err := http.Get(s.MetricsURL())
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"temporal_workflow_completed", "temporal_activity_execution_latency"} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("metrics at %s lack %s", s.MetricsURL(), want)
		}
	}
	ownMetrics(t, s.MetricsURL())

	if left := s.Leftovers(); len(left) > 0 {
		t.Errorf("processes of the stack still running after the backups: %v", left)
	}
	t.Logf("end to end in %s (the stack's close is checked next)", time.Since(began).Round(time.Second))
}

// ownMetrics checks cbtflow's own metrics in a scrape taken after the
// backups above (a full, an incremental, an empty incremental; an unknown
// VM failing in ResolveVM): each with a help text, with sensible values.
// The catalog's metrics are read at most every 10 s: a reading from
// before the backups may still be served, so it scrapes until the VM's
// newest restore point shows, for at most 30 s.
func ownMetrics(t *testing.T, url string) {
	t.Helper()
	var samples map[string]float64
	var help map[string]string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Second) {
		samples, help = scrapeMetrics(t, url)
		if _, ok := help["cbtflow_newest_restore_point_timestamp_seconds"]; ok || time.Now().After(deadline) {
			break
		}
	}
	ownMetricsIn(t, samples, help)
}

// scrapeMetrics GETs a /metrics URL and returns its samples by series (as
// the text format writes them) and its help texts by metric.
func scrapeMetrics(t *testing.T, url string) (map[string]float64, map[string]string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	samples := map[string]float64{}
	help := map[string]string{}
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, "# HELP "); ok {
			name, text, _ := strings.Cut(rest, " ")
			help[name] = text
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Errorf("metrics: sample %q: %v", line, err)
			continue
		}
		samples[line[:i]] = v
	}
	return samples, help
}

func ownMetricsIn(t *testing.T, samples map[string]float64, help map[string]string) {
	t.Helper()
	for _, name := range []string{"cbtflow_transfer_read_bytes_total", "cbtflow_transfer_written_bytes_total",
		"cbtflow_transfer_zeroed_bytes_total", "cbtflow_transfer_duration_seconds", "cbtflow_backup_duration_seconds",
		"cbtflow_backup_changed_bytes", "cbtflow_snapshot_age_seconds", "cbtflow_activity_failures_total",
		"cbtflow_newest_restore_point_timestamp_seconds"} {
		if h := help[name]; len(h) < 20 || strings.Contains(h, name) {
			t.Errorf("metrics: %s has help text %q", name, h)
		}
	}
	atLeast := func(series string, want float64) {
		t.Helper()
		if v, ok := samples[series]; !ok || v < want {
			t.Errorf("metrics: %s = %v (present %v), want at least %v", series, v, ok, want)
		}
	}
	t.Logf("metrics: written full %v, incremental %v; backups %v in %v s; snapshots removed %v",
		samples[`cbtflow_transfer_written_bytes_total{mode="full"}`], samples[`cbtflow_transfer_written_bytes_total{mode="incremental"}`],
		samples["cbtflow_backup_duration_seconds_count"], samples["cbtflow_backup_duration_seconds_sum"], samples["cbtflow_snapshot_age_seconds_count"])
	atLeast(`cbtflow_transfer_written_bytes_total{mode="full"}`, 1)
	atLeast(`cbtflow_transfer_read_bytes_total{mode="full"}`, 1)
	atLeast(`cbtflow_transfer_written_bytes_total{mode="incremental"}`, 1)
	atLeast(`cbtflow_transfer_duration_seconds_count{mode="full"}`, float64(len(keys)))
	atLeast(`cbtflow_transfer_duration_seconds_count{mode="incremental"}`, float64(len(keys)))
	atLeast("cbtflow_backup_duration_seconds_count", 3)
	atLeast("cbtflow_backup_duration_seconds_sum", 0.001)
	atLeast("cbtflow_backup_changed_bytes_count", 3)
	atLeast("cbtflow_backup_changed_bytes_sum", 1)
	atLeast("cbtflow_snapshot_age_seconds_count", 3)
	failed := false
	for series, v := range samples {
		if strings.HasPrefix(series, `cbtflow_activity_failures_total{activity="ResolveVM",`) &&
			strings.Contains(series, `type="`+activities.ErrTypeVMNotFound+`"`) && v >= 1 {
			failed = true
		}
	}
	if !failed {
		t.Errorf("metrics: no cbtflow_activity_failures_total of ResolveVM with type %s (the unknown VM)", activities.ErrTypeVMNotFound)
	}
	newest := false
	for series, v := range samples {
		if strings.HasPrefix(series, "cbtflow_newest_restore_point_timestamp_seconds{") && strings.Contains(series, `vm="`+vm+`"`) {
			newest = true
			if age := time.Since(time.UnixMilli(int64(v * 1000))); age < -time.Minute || age > time.Hour {
				t.Errorf("metrics: %s = %v: %s ago, want within the last hour", series, v, age.Round(time.Second))
			}
		}
	}
	if !newest {
		t.Errorf("metrics: no cbtflow_newest_restore_point_timestamp_seconds of VM %s", vm)
	}
}

// unknownVM: a backup of a VM that does not exist fails in seconds, names
// the VM, and was not retried.
func unknownVM(ctx context.Context, t *testing.T, s *stack.Stack) {
	t.Helper()
	const name = "no-such-vm-e2e"
	res, err := s.Starter(ctx, "backup", name, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode == 0 || res.ExitCode == 3 || res.Duration > 30*time.Second {
		t.Errorf("backup of an unknown VM: want a failure (exit 1) within 30 s, got %s", res)
	}
	var out stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &out); err != nil {
		t.Error(err)
	} else if out.Status != "failed" || !strings.Contains(out.Error, name) {
		t.Errorf("backup of an unknown VM: JSON %+v, want status failed and an error naming %s", out, name)
	}
	if !strings.Contains(res.Stderr, name) {
		t.Errorf("backup of an unknown VM: stderr does not name %s:\n%s", name, res.Stderr)
	}

	// The Backup workflow that ran: ResolveVM attempted once, failed
	// non-retryable with the VM-not-found type.
	var hist []*historypb.HistoryEvent
	deadline := time.Now().Add(20 * time.Second)
	for hist == nil && time.Now().Before(deadline) {
		for _, ex := range stacktest.ListWorkflows(ctx, t, s, "WorkflowType = 'Backup' AND ExecutionStatus = 'Failed'") {
			h := stacktest.History(ctx, t, s, ex.GetExecution().GetWorkflowId(), ex.GetExecution().GetRunId())
			if in := h[0].GetWorkflowExecutionStartedEventAttributes().GetInput(); in != nil && bytes.Contains(in.Payloads[0].GetData(), []byte(name)) {
				hist = h
			}
		}
		if hist == nil {
			time.Sleep(200 * time.Millisecond)
		}
	}
	if hist == nil {
		t.Fatalf("no failed Backup workflow for %s", name)
	}
	steps := stacktest.Steps(t, hist)
	if len(steps) != 1 || steps[0].Type != "ResolveVM" || steps[0].Attempt != 1 {
		t.Errorf("unknown VM: activities %+v, want one ResolveVM, attempted once", steps)
	}
	for _, st := range steps {
		if info := st.Failure.GetApplicationFailureInfo(); !info.GetNonRetryable() || info.GetType() != activities.ErrTypeVMNotFound {
			t.Errorf("unknown VM: %s failed with %+v, want non-retryable %s", st.Type, info, activities.ErrTypeVMNotFound)
		}
	}
}

// alreadyRunning: while a backup of a VM runs, starting another one by the
// VM's inventory path or moref starts nothing and exits 3 naming the
// running backup; in the end one backup ran.
//
// The running backup is held deterministically: once its transfer serves
// the snapshot's disk with nbdkit (a child of the worker), that nbdkit is
// stopped with SIGSTOP until the second starts are refused, then continued.
// A few hundred MiB of guest data keep the transfer, hence the nbdkit,
// alive long enough to be caught (seconds; it is polled every 2 ms).
func alreadyRunning(ctx context.Context, t *testing.T, s *stack.Stack) {
	t.Helper()
	const other = "DC0_H0_VM1"
	l := s.Lab()
	d, err := l.Disks(other)
	if err != nil || len(d) == 0 {
		t.Fatalf("lab VM %s: %v %v", other, d, err)
	}
	moref, key := d[0].VMRef, d[0].Key
	chunk := stacktest.Pattern(9, 64*MiB)
	for off := int64(0); off < 384*MiB; off += int64(len(chunk)) {
		stacktest.WriteDisk(t, l, other, key, off, chunk)
	}

	type result struct {
		res stack.StarterResult
		err error
	}
	first := make(chan result, 1)
	go func() {
		r, err := s.Starter(ctx, "backup", other, "--wait", "--json")
		first <- result{r, err}
	}()

	// Catch the nbdkit that serves the snapshot of this VM's disk.
	var nbdkit int
	needle := filepath.Join("snapshots", moref+"-")
	deadline := time.Now().Add(2 * time.Minute)
	for nbdkit == 0 && time.Now().Before(deadline) {
		select {
		case r := <-first:
			t.Fatalf("the first backup ended before its transfer could be caught: %v %s", r.err, r.res)
		default:
		}
		if pid := s.WorkerPID(); pid != 0 {
			for _, p := range stack.Descendants(pid) {
				if strings.Contains(p.Cmd, "nbdkit") && strings.Contains(p.Cmd, needle) {
					if err := syscall.Kill(p.Pid, syscall.SIGSTOP); err == nil {
						nbdkit = p.Pid
					}
				}
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	if nbdkit == 0 {
		t.Fatal("no nbdkit of the first backup's transfer seen in 2 minutes")
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = syscall.Kill(nbdkit, syscall.SIGCONT)
		}
	}
	defer resume()

	running := stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'BackupVM' AND ExecutionStatus = 'Running' AND CbtflowVM = '%s'", other))
	if len(running) != 1 {
		t.Fatalf("%d running BackupVM workflows for %s, want 1", len(running), other)
	}
	wid := running[0].GetExecution().GetWorkflowId()
	desc, err := s.Client().DescribeWorkflow(ctx, wid, "")
	if err != nil {
		t.Fatal(err)
	}
	runningID, _ := desc.TypedSearchAttributes.GetKeyword(workflows.SearchBackupID)
	// The progress query answers while the transfer is held.
	qv, err := s.Client().QueryWorkflow(ctx, wid, "", workflows.QueryProgress)
	if err != nil {
		t.Fatalf("progress query: %v", err)
	}
	var prog workflows.Progress
	if err := qv.Get(&prog); err != nil {
		t.Fatal(err)
	}
	if prog.BackupID != runningID || prog.Phase != "transferring" || len(prog.Disks) != 1 ||
		prog.Disks[0].Key != key || prog.Disks[0].Phase != "transferring" || prog.Disks[0].Total < 384*MiB {
		t.Errorf("progress during the transfer: %+v", prog)
	}
	// The check for leftover snapshots sees the one of a running backup.
	snaps, err := stacktest.Snapshots(ctx, l, moref)
	if err != nil || len(snaps) != 1 || snaps[0] != activities.SnapshotPrefix+runningID {
		t.Errorf("snapshots of %s during its backup %s: %v (%v), want exactly its own", other, runningID, snaps, err)
	}
	for _, name := range []string{"/DC0/vm/" + other, moref} {
		r, err := s.Starter(ctx, "backup", name, "--wait", "--json")
		if err != nil {
			t.Fatal(err)
		}
		if r.ExitCode != 3 || !strings.Contains(r.Stderr, "already running") || !strings.Contains(r.Stderr, runningID) || !strings.Contains(r.Stderr, wid) {
			t.Errorf("second backup as %q: want exit 3 naming backup %s (workflow %s), got %s", name, runningID, wid, r)
		}
		// --json: one object naming the running backup.
		var out struct {
			Status     string `json:"status"`
			BackupID   string `json:"backup_id"`
			WorkflowID string `json:"workflow_id"`
		}
		dec := json.NewDecoder(strings.NewReader(r.Stdout))
		if err := dec.Decode(&out); err != nil || dec.More() {
			t.Errorf("second backup as %q: stdout is not one JSON object: %q (%v)", name, r.Stdout, err)
		} else if out.Status != "already_running" || out.BackupID != runningID || out.WorkflowID != wid {
			t.Errorf("second backup as %q: JSON %+v, want status already_running, backup %s, workflow %s", name, out, runningID, wid)
		}
	}
	resume()

	r := <-first
	if r.err != nil {
		t.Fatal(r.err)
	}
	b := checkBackupContract(t, r.res, s.Repository())
	if b.BackupID != runningID || b.Disk(t, key).Mode != workflows.ModeFull || b.Disk(t, key).ChangedBytes < 384*MiB {
		t.Errorf("the first backup: %+v, want the full backup %s of 384 MiB", b, runningID)
	}

	// One backup ran, in the catalog and in Temporal.
	res, err := s.Starter(ctx, "list", other, "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("list: %v %s", err, res)
	}
	var list []stacktest.ListJSON
	if err := stacktest.DecodeOne(res.Stdout, &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].BackupID != runningID {
		t.Errorf("catalog of %s: %d backups, want only %s:\n%s", other, len(list), runningID, res.Stdout)
	}
	all := stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'BackupVM' AND CbtflowVM = '%s'", other))
	if len(all) != 1 {
		t.Errorf("%d BackupVM workflows for %s, want 1", len(all), other)
	}
}
