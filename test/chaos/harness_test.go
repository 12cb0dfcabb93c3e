package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/converter"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
	"github.com/cbtflow/cbtflow/workflows"
)

const (
	MiB = int64(1) << 20
	GiB = int64(1) << 30
)

// The lab's VMs: the first has two disks, the others one.
var vms = []string{lab.SecondDiskVM, "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"}

// envConfig shapes the stack of one group of scenarios.
type envConfig struct {
	name string
	// eioRate, when set, puts nbdkit's error filter in front of the lab
	// source: that share of reads fail with EIO while the file Env.eioGate
	// exists (EIOOn/EIOOff).
	eioRate string
	// repoSize, when set, puts the repository on a tmpfs of that size.
	repoSize int64
}

// env is one stack and what the harness knows of its backups. A test
// owns it; its checks add to Tallies.
type env struct {
	t       *testing.T
	ctx     context.Context
	cfg     envConfig
	s       *stack.Stack
	l       *lab.Lab
	proxy   *Proxy
	dbURL   string // direct, for the harness's own checks
	root    string
	data    string
	eioGate string
	runs    []*run
	// newest is each VM's newest completed run: its captures are kept to
	// verify the chain again after a failure.
	newest map[string]*run
	// damaged holds "backup/disk" of the restore points the harness
	// damaged on purpose (or that build on one): the catalog must mark
	// exactly these damaged, and their images are not checked as whole.
	damaged map[string]bool
}

// run is one backup.
type run struct {
	label     string
	vm        string
	out       stacktest.BackupJSON // what `starter backup --wait --json` printed
	res       stack.StarterResult
	completed bool
	wantFail  bool
	caps      map[int32]string // disk key → capture of the disk right before the backup
	verified  bool
}

// newEnv starts a stack for cfg: its own state folder, database (behind a
// cuttable proxy), fault points, and the optional EIO filter and tmpfs
// repository. Everything is stopped, unmounted and removed when t ends.
func newEnv(t *testing.T, ctx context.Context, cfg envConfig) *env {
	t.Helper()
	root, err := os.MkdirTemp("", "cbtflow-chaos-"+cfg.name+"-")
	if err != nil {
		t.Fatal(err)
	}
	// Cleanups run last-registered first: the folder goes after the
	// tmpfs is unmounted, which happens after the stack is closed.
	t.Cleanup(func() {
		if t.Failed() && os.Getenv("CBTFLOW_CHAOS_KEEP") != "" {
			t.Logf("kept %s", root)
			return
		}
		if err := os.RemoveAll(root); err != nil {
			t.Error(err)
		}
	})
	e := &env{t: t, ctx: ctx, cfg: cfg, root: root, data: filepath.Join(root, "data"), newest: map[string]*run{}, damaged: map[string]bool{}}
	if err := os.MkdirAll(e.data, 0o700); err != nil {
		t.Fatal(err)
	}
	e.dbURL = testutil.Database(t)
	proxyURL, network, addr, err := proxyTarget(e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	if e.proxy, err = NewProxy(network, addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.proxy.Close() })
	proxyURL.Host = e.proxy.Addr()

	opts := stack.Options{Dir: filepath.Join(root, "state"), DatabaseURL: proxyURL.String(), FaultPoints: true}
	if cfg.eioRate != "" {
		e.eioGate = filepath.Join(root, "eio-on")
		opts.LabSourceFilters = []labapi.Filter{{Filter: "error",
			Params: []string{"error=EIO", "error-pread-rate=" + cfg.eioRate, "error-pread-file=" + e.eioGate}}}
	}
	if cfg.repoSize > 0 {
		repo := filepath.Join(opts.Dir, "repository")
		if err := MountTmpfs(repo, cfg.repoSize); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := Unmount(repo); err != nil {
				t.Error(err)
			}
		})
	}
	// stack.Start, not stacktest.New: groups of scenarios run side by
	// side, so the check that no child process outlives a test is made
	// once for all of them (TestChaos); Close checks this stack's own.
	opts.Binaries = stacktest.Binaries(t)
	sctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	s, err := stack.Start(sctx, opts)
	if err != nil {
		logTails(t, opts.Dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			logTails(t, s.Dir())
		}
	})
	e.s, e.l = s, s.Lab()
	return e
}

// logTails logs the last lines of the stack's logs.
func logTails(t *testing.T, dir string) {
	for _, name := range []string{"worker.log", "temporal.log", "lab.log"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || len(b) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		t.Logf("last lines of %s:\n%s", name, strings.Join(lines[max(0, len(lines)-30):], "\n"))
	}
}

// proxyTarget returns the database URL rewritten for a loopback TCP proxy
// (host to be filled in) and the server the proxy forwards to: the unix
// socket of host=/dir, or the URL's TCP host.
func proxyTarget(dbURL string) (u *url.URL, network, addr string, err error) {
	u, err = url.Parse(dbURL)
	if err != nil {
		return nil, "", "", err
	}
	q := u.Query()
	port := u.Port()
	if p := q.Get("port"); p != "" {
		port = p
	}
	if port == "" {
		port = "5432"
	}
	if dir := q.Get("host"); strings.HasPrefix(dir, "/") {
		network, addr = "unix", filepath.Join(dir, ".s.PGSQL."+port)
	} else if dir := u.Hostname(); strings.HasPrefix(dir, "/") || dir == "" {
		if dir == "" {
			dir = "/var/run/postgresql"
		}
		network, addr = "unix", filepath.Join(dir, ".s.PGSQL."+port)
	} else {
		network, addr = "tcp", u.Host
	}
	q.Del("host")
	q.Del("port")
	q.Set("sslmode", "disable")
	u.RawQuery = q.Encode()
	return u, network, addr, nil
}

// fault is what the harness does to one backup: arm before it starts, act
// while it runs (ictx ends when the backup ends), settle after it ended.
// Every step puts back what it took away, whatever happens.
type fault struct {
	name   string
	arm    func() error
	act    func(ictx context.Context) error
	settle func()
	// retried is the activity the fault must have made run a second
	// attempt (proof that it hit); empty when none is expected.
	retried string
}

// backup writes guest data (bytes per disk, seed), captures every disk of
// vm, runs one backup through the starter with the fault, and records the
// run. It checks what can be checked at once: the outcome, that the fault
// hit, that it ended within timeout.
func (e *env) backup(tl *Tally, label, vm string, seed uint64, bytes int64, f *fault, wantFail bool, timeout time.Duration) *run {
	t := e.t
	t.Helper()
	r := &run{label: label, vm: vm, wantFail: wantFail, caps: map[int32]string{}}
	e.runs = append(e.runs, r)
	tl.Runs++
	if bytes > 0 {
		e.writeGuest(vm, seed, bytes)
	}
	disks, err := e.l.Disks(vm)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		p := filepath.Join(e.data, fmt.Sprintf("%s-%s-%d.raw", label, vm, d.Key))
		stacktest.Capture(t, e.l, vm, d.Key, p)
		r.caps[d.Key] = p
	}
	if f != nil && f.arm != nil {
		if err := f.arm(); err != nil {
			t.Fatal(err)
		}
	}
	began := time.Now()
	bctx, cancel := context.WithTimeout(e.ctx, timeout)
	defer cancel()
	type result struct {
		res stack.StarterResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := e.s.Starter(bctx, "backup", vm, "--wait", "--json")
		done <- result{res, err}
	}()
	ictx, icancel := context.WithCancel(bctx)
	var wg sync.WaitGroup
	var actErr error
	if f != nil && f.act != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			actErr = f.act(ictx)
		}()
	}
	res := <-done
	icancel()
	wg.Wait()
	if f != nil && f.settle != nil {
		f.settle()
	}
	r.res = res.res
	name := label
	if f != nil {
		name = label + " (" + f.name + ")"
	}
	if actErr != nil {
		e.problem(tl, "%s: the fault was not injected as planned: %v", name, actErr)
	}
	if res.err != nil {
		e.problem(tl, "%s: no final state within %s: %v", name, timeout, res.err)
		return r
	}
	if err := json.Unmarshal([]byte(res.res.Stdout), &r.out); err != nil {
		e.problem(tl, "%s: backup output: %v\n%s", name, err, res.res)
		return r
	}
	r.completed = res.res.ExitCode == 0 && r.out.Status == "completed"
	switch {
	case r.completed && !wantFail:
		tl.Completed++
		e.newest[vm] = r
	case !r.completed && wantFail && r.out.Status == "failed":
		tl.ExpectedFailures++
	case r.completed:
		tl.Completed++
		e.newest[vm] = r
		e.problem(tl, "%s: backup %s completed, want a failure", name, r.out.BackupID)
	default:
		e.problem(tl, "%s: backup %s %s: %s", name, r.out.BackupID, r.out.Status, r.out.Error)
	}
	if f != nil && f.retried != "" && r.out.WorkflowID != "" {
		n, _, err := e.attempts(r.out.WorkflowID, f.retried)
		if err != nil {
			e.problem(tl, "%s: history: %v", name, err)
		} else if n < 2 {
			e.problem(tl, "%s: %s ran %d attempt(s): the fault did not hit it", name, f.retried, n)
		}
	}
	t.Logf("%-28s %-16s %s backup %s %s in %s", name, vm, modes(r), r.out.BackupID, r.out.Status, time.Since(began).Round(100*time.Millisecond))
	return r
}

func modes(r *run) string {
	var m []string
	for _, d := range r.out.Disks {
		m = append(m, d.Mode)
	}
	if len(m) == 0 {
		return "-"
	}
	return strings.Join(m, ",")
}

func (e *env) problem(tl *Tally, format string, args ...any) {
	e.t.Helper()
	msg := fmt.Sprintf(format, args...)
	tl.Problems = append(tl.Problems, msg)
	e.t.Error(msg)
}

// writeGuest writes bytes of pseudo-random data to every disk of vm in 4
// MiB pieces at random places of its first 4 GiB, then an unaligned small
// write, a MiB of zeros over earlier data, and a discarded (hole) range:
// what a guest does, the awkward cases included.
func (e *env) writeGuest(vm string, seed uint64, bytes int64) {
	t := e.t
	t.Helper()
	disks, err := e.l.Disks(vm)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		rng := rand.New(rand.NewPCG(seed, uint64(d.Key)))
		span := min(d.Capacity, 4*GiB)
		chunk := 4 * MiB
		for n := int64(0); n < bytes; n += chunk {
			off := rng.Int64N(span/MiB-4) * MiB
			e.write(vm, d.Key, off, stacktest.Pattern(rng.Uint64(), int(chunk)))
		}
		e.write(vm, d.Key, rng.Int64N(span-MiB)+17, stacktest.Pattern(rng.Uint64(), 5000))
		e.write(vm, d.Key, rng.Int64N(span/MiB-1)*MiB, make([]byte, MiB))
		if err := e.l.PunchHole(vm, d.Key, rng.Int64N(span/MiB-1)*MiB, 512<<10); err != nil {
			t.Fatal(err)
		}
	}
}

func (e *env) write(vm string, key int32, off int64, b []byte) {
	e.t.Helper()
	stacktest.WriteDisk(e.t, e.l, vm, key, off, b)
}

// snapshots lists the cbtflow-* snapshots of a lab VM through the vSphere
// API, as an operator would see them.
func (e *env) snapshots(ctx context.Context, vmName string) ([]string, error) {
	disks, err := e.l.Disks(vmName)
	if err != nil || len(disks) == 0 {
		return nil, fmt.Errorf("lab VM %s: %v", vmName, err)
	}
	return stacktest.Snapshots(ctx, e.l, disks[0].VMRef)
}

// attempts reads the history of the newest run of workflow wid and returns
// the highest attempt of activity, and the last failure's type. A local
// activity (a backup's short steps) counts its attempts in each workflow
// task that ran it: a task lost with its worker ran it once more
// (stacktest.Step's Reruns).
func (e *env) attempts(wid, activity string) (attempt int, failureType string, err error) {
	ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
	defer cancel()
	var events []*historypb.HistoryEvent
	it := e.s.Client().GetWorkflowHistory(ctx, wid, "", false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	for it.HasNext() {
		ev, err := it.Next()
		if err != nil {
			return 0, "", err
		}
		events = append(events, ev)
	}
	for _, s := range stacktest.Steps(e.t, events) {
		// "TransferDisk" names a backup's transfer: since the change
		// one-transfer, every disk's in one TransferDisks.
		if s.Type != activity && (activity != "TransferDisk" || s.Type != "TransferDisks") {
			continue
		}
		attempt = max(attempt, s.Attempt+s.Reruns)
		if s.Failure != nil {
			failureType = s.Failure.GetApplicationFailureInfo().GetType()
		}
	}
	return attempt, failureType, nil
}

// detachedStartOnce checks a backup whose worker was killed once its
// Backup had started the BackupVM, before the Backup's workflow task
// completed: the next worker ran the Backup's steps again, and its
// StartWorkflow found the BackupVM the first one started (the same request
// ID) instead of starting a second, which BeginBackup would have refused.
func (e *env) detachedStartOnce(tl *Tally, r *run, since time.Time) {
	if r.out.WorkflowID == "" {
		return // the backup's own problem is reported
	}
	ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
	defer cancel()
	q := fmt.Sprintf("WorkflowId = '%s' AND StartTime >= '%s'", r.out.WorkflowID, since.UTC().Format(time.RFC3339Nano))
	resp, err := e.s.Client().ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Query: q})
	if err != nil {
		e.problem(tl, "%s: listing its BackupVM runs: %v", r.label, err)
		return
	}
	if n := len(resp.GetExecutions()); n != 1 {
		e.problem(tl, "%s: %d BackupVM runs of %s since the backup began, want 1", r.label, n, r.out.WorkflowID)
		return
	}
	var backup string
	if f := resp.GetExecutions()[0].GetMemo().GetFields()[workflows.MemoStartedByWorkflowID]; f != nil {
		_ = converter.GetDefaultDataConverter().FromPayload(f, &backup)
	}
	if backup == "" {
		e.problem(tl, "%s: the BackupVM run names no Backup in its memo", r.label)
		return
	}
	n, _, err := e.attempts(backup, "StartWorkflow")
	if err != nil {
		e.problem(tl, "%s: the Backup's history: %v", r.label, err)
	} else if n < 2 {
		e.problem(tl, "%s: the Backup's StartWorkflow ran %d time(s): the kill did not hit it", r.label, n)
	} else {
		e.t.Logf("%s: one BackupVM run of %s since the backup began; its Backup %s ran StartWorkflow %d times", r.label, r.out.WorkflowID, backup, n)
	}
}

// check runs the checks every scenario ends with, for its runs, and adds
// what it finds to tl.
func (e *env) check(tl *Tally, runs ...*run) {
	t := e.t
	t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Minute)
	defer cancel()

	// Every backup reached a final state: nothing runs any more.
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := e.s.Client().ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
			Namespace: stack.Namespace, Query: "WorkflowType = 'BackupVM' AND ExecutionStatus = 'Running'"})
		if err == nil && len(resp.GetExecutions()) == 0 {
			break
		}
		if time.Now().After(deadline) {
			e.problem(tl, "backups still running after the scenario: %v %v", resp.GetExecutions(), err)
			break
		}
		time.Sleep(500 * time.Millisecond)
	}

	// The catalog against the lab's own log of change IDs.
	cat, err := catalog.Open(ctx, e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	all, err := cat.List(ctx, catalog.ListFilter{})
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]*catalog.Backup{}
	for i := range all {
		byID[all[i].ID] = &all[i]
	}
	stamps := e.l.ChangeIDLog()
	for _, r := range runs {
		id := r.out.BackupID
		b := byID[id]
		if !r.completed {
			if b != nil && b.Status == "committed" {
				e.problem(tl, "%s: backup %s did not complete but is committed", r.label, id)
			}
			if id != "" {
				e.noFilesOf(tl, r)
			}
			continue
		}
		tl.Committed += len(r.caps)
		if b == nil || b.Status != "committed" {
			tl.LostChangeIDs += len(r.caps)
			e.problem(tl, "%s: backup %s completed but its restore point is not committed (%v)", r.label, id, b)
			continue
		}
		for key := range r.caps {
			var d *catalog.Disk
			for i := range b.Disks {
				if b.Disks[i].Key == key {
					d = &b.Disks[i]
				}
			}
			var stamped []string
			for _, s := range stamps {
				if s.SnapshotName == activities.SnapshotPrefix+id && s.DiskKey == key {
					stamped = append(stamped, s.ChangeID)
				}
			}
			switch {
			case d == nil:
				tl.LostChangeIDs++
				e.problem(tl, "%s: backup %s disk %d: no restore point in the catalog", r.label, id, key)
			case len(stamped) != 1 || stamped[0] != d.ChangeID:
				tl.LostChangeIDs++
				e.problem(tl, "%s: backup %s disk %d: catalog change ID %q, the lab stamped %v on %s%s", r.label, id, key, d.ChangeID, stamped, activities.SnapshotPrefix, id)
			}
		}
		for _, d := range r.out.Disks {
			for _, cd := range b.Disks {
				if cd.Key == d.Key && (cd.ChangeID != d.ChangeID || e.repoPath(cd.Path) != d.Path) {
					e.problem(tl, "%s: backup %s disk %d: the workflow reported %s %s, the catalog holds %s %s", r.label, id, d.Key, d.ChangeID, d.Path, cd.ChangeID, cd.Path)
				}
			}
		}
	}
	// Every committed backup is one the harness saw complete, and every
	// image the catalog names is whole.
	completed := map[string]bool{}
	for _, r := range e.runs {
		if r.completed {
			completed[r.out.BackupID] = true
		}
	}
	for _, b := range all {
		if b.Status != "committed" {
			continue
		}
		if !completed[b.ID] {
			e.problem(tl, "backup %s is committed, but no backup the harness ran completed as it", b.ID)
		}
		for _, d := range b.Disks {
			key := fmt.Sprintf("%s/%d", b.ID, d.Key)
			if d.Damaged != "" || e.damaged[key] {
				if d.Damaged == "" {
					e.problem(tl, "backup %s disk %d was damaged by the harness, but the catalog does not say so", b.ID, d.Key)
				} else if !e.damaged[key] {
					e.problem(tl, "backup %s disk %d is marked damaged (%s), but the harness did not damage it", b.ID, d.Key, d.Damaged)
				}
				continue
			}
			if err := checkImage(e.repoPath(d.Path), d.SizeBytes, d.SHA256); err != nil {
				e.problem(tl, "backup %s disk %d: %v", b.ID, d.Key, err)
			}
		}
	}

	// Every new restore point restores as the disk was at backup time.
	for _, r := range runs {
		if r.completed && !r.verified {
			e.verify(ctx, tl, r)
		}
	}
	e.pruneCaptures()

	// No snapshot and no process left.
	for _, vm := range vms {
		names, err := e.snapshots(ctx, vm)
		if err != nil {
			e.problem(tl, "snapshots of %s: %v", vm, err)
			continue
		}
		if len(names) > 0 {
			tl.LeftoverSnapshots += len(names)
			e.problem(tl, "snapshots left on %s: %v", vm, names)
		}
	}
	e.settleProcesses(tl, "after the scenario")
}

// repoPath is a catalog path as a file path: the catalog records images
// relative to the repository's root (so that a moved repository keeps
// working), the workflow reports them absolute.
func (e *env) repoPath(p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(e.s.Repository(), p)
}

// verify restores every disk of r's restore point and compares it with the
// capture taken right before the backup.
func (e *env) verify(ctx context.Context, tl *Tally, r *run) {
	ok := true
	for key, want := range r.caps {
		out := filepath.Join(e.data, "restore.raw")
		_ = os.Remove(out)
		res, err := e.s.Starter(ctx, "restore", r.out.BackupID, "--disk", strconv.Itoa(int(key)), "--to", out)
		if err != nil || res.ExitCode != 0 {
			ok = false
			e.problem(tl, "%s: restore of %s disk %d: %v %s", r.label, r.out.BackupID, key, err, res)
			continue
		}
		diff, err := stacktest.SameContent(want, out)
		_ = os.Remove(out)
		switch {
		case err != nil:
			ok = false
			e.problem(tl, "%s: compare %s disk %d: %v", r.label, r.out.BackupID, key, err)
		case diff != "":
			ok = false
			e.problem(tl, "%s: restore of %s disk %d differs from the disk at backup time: %s", r.label, r.out.BackupID, key, diff)
		default:
			if !r.verified {
				tl.Verified++
			}
		}
	}
	if ok {
		r.verified = true
	}
}

// reverify restores the newest restore point of vm again: after a failed
// backup, the previous chain must still restore.
func (e *env) reverify(tl *Tally, vm string) {
	r := e.newest[vm]
	if r == nil {
		e.problem(tl, "no earlier restore point of %s to verify", vm)
		return
	}
	saved := r.verified
	r.verified = true // counted once, when first verified
	e.verify(e.ctx, tl, r)
	r.verified = saved && r.verified
}

// pruneCaptures removes the captures no later check needs: those of
// verified runs other than each VM's newest.
func (e *env) pruneCaptures() {
	for _, r := range e.runs {
		if r.verified && e.newest[r.vm] != r {
			for k, p := range r.caps {
				_ = os.Remove(p)
				delete(r.caps, k)
			}
		}
	}
}

// noFilesOf checks that a failed backup left no image in the repository.
func (e *env) noFilesOf(tl *Tally, r *run) {
	_ = filepath.WalkDir(e.s.Repository(), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.Contains(d.Name(), r.out.BackupID) {
			e.problem(tl, "%s: the failed backup %s left %s", r.label, r.out.BackupID, p)
		}
		return nil
	})
}

// settleProcesses waits until no process of the stack other than the
// worker and Temporal runs, and no qemu-nbd or nbdkit is a child of the
// worker; what is left after 15 s counts as leftover.
func (e *env) settleProcesses(tl *Tally, when string) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		left := e.s.Leftovers()
		if pid := e.s.WorkerPID(); pid != 0 {
			for _, p := range stack.Descendants(pid) {
				if strings.Contains(p.Cmd, "qemu-nbd") || strings.Contains(p.Cmd, "nbdkit") {
					left = append(left, p)
				}
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			tl.LeftoverProcesses += len(left)
			e.problem(tl, "processes left %s: %v", when, left)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkImage checks a file's size and proof (its seal or its SHA-256,
// internal/integrity) against the catalog's.
func checkImage(path string, size int64, sum string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Size() != size {
		return fmt.Errorf("%s is %d bytes, the catalog says %d", path, fi.Size(), size)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := integrity.Verify(ctx, path, sum, nil); err != nil {
		return fmt.Errorf("%s does not match the catalog's proof %s: %w", path, sum, err)
	}
	return nil
}

// Faults.

// killAt kills the worker (SIGKILL) while an activity stands at point,
// checks that its qemu-nbd and nbdkit died with it, and starts a new
// worker; the activity's retry must finish the backup.
func (e *env) killAt(tl *Tally, point, activity string) *fault {
	g := e.s.FaultPoints()
	return &fault{
		name:    "worker SIGKILL at " + point,
		retried: activity,
		arm:     func() error { return g.Arm(point) },
		act: func(ictx context.Context) error {
			defer func() { _ = g.Release(point) }()
			pid, err := g.Wait(ictx, point)
			if err != nil {
				return err
			}
			if pid != e.s.WorkerPID() {
				return fmt.Errorf("fault point %s reached by pid %d, the worker is %d", point, pid, e.s.WorkerPID())
			}
			if err := e.s.KillWorker(); err != nil {
				return err
			}
			e.settleProcesses(tl, "after the worker was killed at "+point)
			if err := g.Release(point); err != nil {
				return err
			}
			return e.s.StartWorker(e.ctx)
		},
		settle: func() { _ = g.Release(point) },
	}
}

// restartTemporalAt restarts the Temporal server (gracefully, or SIGKILL
// then start) while an activity stands at point, releasing it first when
// running is set so that the activity works on while the server is away.
func (e *env) restartTemporalAt(point string, kill, running bool) *fault {
	g := e.s.FaultPoints()
	how := "graceful restart"
	if kill {
		how = "SIGKILL and start"
	}
	return &fault{
		name: "Temporal " + how + " at " + point,
		arm:  func() error { return g.Arm(point) },
		act: func(ictx context.Context) error {
			defer func() { _ = g.Release(point) }()
			if _, err := g.Wait(ictx, point); err != nil {
				return err
			}
			if running {
				if err := g.Release(point); err != nil {
					return err
				}
			}
			if err := e.s.StopTemporal(kill); err != nil {
				return err
			}
			time.Sleep(2 * time.Second) // the worker and the starter see it gone
			return e.s.StartTemporal(e.ctx)
		},
		settle: func() { _ = g.Release(point) },
	}
}

// cutDatabaseAt cuts the worker from PostgreSQL while the commit stands at
// before-commit, lets the commit go on, and gives the database back after
// outage.
func (e *env) cutDatabaseAt(point, activity string, outage time.Duration) *fault {
	g := e.s.FaultPoints()
	return &fault{
		name:    fmt.Sprintf("database cut %s at %s", outage, point),
		retried: activity,
		arm:     func() error { return g.Arm(point) },
		act: func(ictx context.Context) error {
			defer e.proxy.Restore()
			defer func() { _ = g.Release(point) }()
			if _, err := g.Wait(ictx, point); err != nil {
				return err
			}
			e.proxy.Cut()
			if err := g.Release(point); err != nil {
				return err
			}
			time.Sleep(outage)
			e.proxy.Restore()
			return nil
		},
		settle: e.proxy.Restore,
	}
}

// cutDatabaseAtStart starts the backup with the database away for outage.
func (e *env) cutDatabaseAtStart(outage time.Duration) *fault {
	return &fault{
		name:    fmt.Sprintf("database cut %s at the start", outage),
		retried: "BeginBackup",
		arm:     func() error { e.proxy.Cut(); return nil },
		act: func(ictx context.Context) error {
			defer e.proxy.Restore()
			select {
			case <-time.After(outage):
			case <-ictx.Done():
				return errors.New("the backup ended while the database was away")
			}
			return nil
		},
		settle: e.proxy.Restore,
	}
}

// eio switches the source's EIO filter on for one backup.
func (e *env) eio() *fault {
	return &fault{
		name:   "source EIO " + e.cfg.eioRate + " of reads",
		arm:    func() error { return os.WriteFile(e.eioGate, nil, 0o600) },
		settle: func() { _ = os.Remove(e.eioGate) },
	}
}

// retriedReads returns the copier's retried requests of a backup, from the
// worker's "disk transferred" log lines.
func (e *env) retriedReads(backupID string) (int, error) {
	b, err := os.ReadFile(e.s.WorkerLog())
	if err != nil {
		return 0, err
	}
	total := 0
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, "disk transferred") || !strings.Contains(line, backupID) {
			continue
		}
		i := strings.Index(line, "retried=")
		if i < 0 {
			return 0, fmt.Errorf("no retried= in %q", line)
		}
		f := strings.FieldsFunc(line[i+len("retried="):], func(r rune) bool { return r == ' ' || r == '"' || r == ',' })
		if len(f) > 0 {
			n, _ := strconv.Atoi(f[0])
			total += n
		}
	}
	return total, nil
}
