// Package badinput tests what cbtflow does with bad input and where its
// secrets go, through the starter CLI against a whole stack (package
// stack): a real Temporal dev server, the lab vCenter, PostgreSQL and a
// worker process.
//
// Every bad input must give a clear message naming what was wrong, a
// non-zero exit, a non-retryable failure where retrying cannot help (the
// failing activity ran once, with the expected activities.ErrType…), and
// lose nothing: the committed restore points of a baseline VM stay as they
// were and restore byte for byte, no snapshot is left, and no partial file
// stays in the repository. The secrets test runs backups with the lab's
// password and looks for it in every workflow history, the logs, the CLI's
// output and the argv and environment of the worker's children while a
// transfer is held at the mid-transfer fault point.
//
// The package has test files only; make test runs it.
package badinput

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/api/temporalproto"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

// Extra vCenter profiles of the test's profiles file.
const (
	profileWrongPassword = "wrongpw" // the lab, with a wrong password
	profileDown          = "down"    // a closed loopback port
)

// unreachableBound is how long a backup whose vCenter cannot be reached
// may take to fail: the documented bound of the first vCenter contact
// (about half a minute) with room for a loaded machine.
const unreachableBound = 90 * time.Second

// baseVM is the VM whose committed restore points every case must leave
// intact.
const baseVM = "badinput-base"

// fixture is the state shared by the subtests: one stack for all.
type fixture struct {
	s       *stack.Stack
	l       *lab.Lab
	ctx     context.Context
	data    string // captures and restores
	wrongPW string // the wrongpw profile's (wrong) password
	downURL string

	mu      sync.Mutex
	outputs []stack.StarterResult // every starter run, for the secret scan

	// The baseline: two committed restore points of baseVM.
	baseRef  string
	baseUUID string
	keys     []int32
	points   []stacktest.BackupJSON // b1 (full), b2 (incremental)
	caps     []map[int32]string     // disk content at each point
	list     []stacktest.ListJSON   // `list baseVM --json` after b2
	sums     map[string]string      // image path → SHA-256 after b2
	known    map[string]bool        // files the repository may hold
	otherVMs map[string]string      // other VMs the cases used: name → moref
}

// TestBadInput runs every bad-input case and the secrets test on one
// stack.
func TestBadInput(t *testing.T) {
	began := time.Now()
	s := stacktest.New(t, stack.Options{NoWorker: true, FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	f := &fixture{s: s, l: s.Lab(), ctx: ctx, data: t.TempDir(), otherVMs: map[string]string{}}
	f.writeProfiles(t)
	if err := s.StartWorker(ctx); err != nil {
		t.Fatal(err)
	}
	lap := time.Now()
	step := func(what string) {
		t.Logf("%-24s %5.1fs", what, time.Since(lap).Seconds())
		lap = time.Now()
	}

	// The unreachable vCenter takes the longest (about 30 s of bounded
	// retries): it runs alongside the other cases.
	unreachable := f.startUnreachable(t)

	if !t.Run("Baseline", f.baseline) {
		t.Fatal("no baseline: the other cases cannot check that nothing was lost")
	}
	step("baseline")
	for _, c := range []struct {
		name string
		fn   func(*testing.T)
	}{
		{"UnknownVM", f.unknownVM},
		{"UnknownProfile", f.unknownProfile},
		{"WrongPassword", f.wrongPassword},
		{"InvalidMode", f.invalidMode},
		{"VMWithoutDisks", f.noDisks},
		{"IncrementalWithoutRestorePoint", f.incrementalFirst},
		{"VMNames", f.vmNames},
		{"ReadOnlyRepository", f.readOnlyRepository},
		{"ReadOnlyDiskFolder", f.readOnlyDiskFolder},
		{"RestoreUnknownBackup", f.restoreUnknown},
		{"RestoreCorruptChain", f.restoreCorrupt},
		{"RestoreDeletedImage", f.restoreDeleted},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.fn(t)
			f.intact(t)
		})
		step(c.name)
	}
	t.Run("UnreachableVCenter", func(t *testing.T) {
		unreachable(t)
		f.intact(t)
	})
	step("unreachable vCenter")
	t.Run("RestorePointsByteIdentical", f.restoresIdentical)
	step("restores compared")
	t.Run("Secrets", f.secretsNowhere)
	step("secrets")
	t.Logf("bad input in %s (the stack's close is checked next)", time.Since(began).Round(time.Second))
}

// writeProfiles adds the wrongpw and down profiles to the stack's profiles
// file, before the worker reads it.
func (f *fixture) writeProfiles(t *testing.T) {
	t.Helper()
	profiles, err := vsphere.LoadProfiles(f.s.VCentersFile())
	if err != nil {
		t.Fatal(err)
	}
	labp := profiles[stack.Profile]
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	f.wrongPW = "wrong-" + hex.EncodeToString(b)
	pwFile := filepath.Join(f.s.Dir(), "wrongpw.password")
	if err := os.WriteFile(pwFile, []byte(f.wrongPW+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.downURL = "https://" + ln.Addr().String() + "/sdk"
	ln.Close() // nothing listens there any more
	out := map[string]map[string]vsphere.Profile{"profiles": {}}
	for name, p := range profiles {
		out["profiles"][name] = p
	}
	wrong := labp
	wrong.PasswordFile = pwFile
	out["profiles"][profileWrongPassword] = wrong
	down := labp
	down.URL = f.downURL
	out["profiles"][profileDown] = down
	js, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.s.VCentersFile(), append(js, '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := vsphere.LoadProfiles(f.s.VCentersFile()); err != nil || len(got) != 3 {
		t.Fatalf("profiles file with the extra profiles: %v (%d profiles)", err, len(got))
	}
}

// starter runs the CLI and keeps its output for the secret scan.
func (f *fixture) starter(t *testing.T, args ...string) stack.StarterResult {
	t.Helper()
	// Every case ends in seconds: a hang (a failure retried for good) fails
	// the case instead of the whole run.
	ctx, cancel := context.WithTimeout(f.ctx, 2*time.Minute)
	defer cancel()
	return f.starterCtx(t, ctx, args...)
}

func (f *fixture) starterCtx(t *testing.T, ctx context.Context, args ...string) stack.StarterResult {
	t.Helper()
	res, err := f.s.Starter(ctx, args...)
	f.mu.Lock()
	f.outputs = append(f.outputs, res)
	f.mu.Unlock()
	if err != nil {
		t.Fatalf("starter %v did not end in time (a failure retried for good?): %v\n%s", args, err, res)
	}
	return res
}

// backup runs `backup VM --wait --json [extra]` and decodes its output.
func (f *fixture) backup(t *testing.T, vm string, extra ...string) (stacktest.BackupJSON, stack.StarterResult) {
	t.Helper()
	// "--" ends the flags: a VM may be named "-rf".
	args := append(append([]string{"backup", "--wait", "--json"}, extra...), "--", vm)
	res := f.starter(t, args...)
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &b); err != nil {
		t.Fatalf("backup %s: %v\n%s", vm, err, res)
	}
	return b, res
}

// baseline makes baseVM with two disks and two committed restore points;
// the first backup is held at the mid-transfer fault point to look at the
// worker's children.
func (f *fixture) baseline(t *testing.T) {
	ref, err := f.l.CreateVM(baseVM, GiB, 64*MiB)
	if err != nil {
		t.Fatal(err)
	}
	f.baseRef = ref
	disks, err := f.l.Disks(ref)
	if err != nil || len(disks) != 2 {
		t.Fatalf("disks of %s: %+v %v", baseVM, disks, err)
	}
	for _, d := range disks {
		f.keys = append(f.keys, d.Key)
	}
	a, b := f.keys[0], f.keys[1]

	// b1: enough data on disk a that its transfer is caught half way.
	stacktest.WriteDisk(t, f.l, ref, a, 0, stacktest.Pattern(1, 384*MiB))
	stacktest.WriteDisk(t, f.l, ref, b, 60*MiB, stacktest.Pattern(2, 4*MiB))
	f.captureAll(t)
	gates := f.s.FaultPoints()
	if err := gates.Arm(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	type result struct {
		b   stacktest.BackupJSON
		res stack.StarterResult
	}
	done := make(chan result, 1)
	go func() {
		res, err := f.s.Starter(f.ctx, "backup", baseVM, "--wait", "--json")
		f.mu.Lock()
		f.outputs = append(f.outputs, res)
		f.mu.Unlock()
		var out stacktest.BackupJSON
		if err == nil {
			err = stacktest.DecodeOne(res.Stdout, &out)
		}
		if err != nil {
			out.Status, out.Error = "starter", err.Error()
		}
		done <- result{out, res}
	}()
	// The pause holds the transfer at most until the activity's heartbeat
	// timeout: look quickly.
	wctx, wcancel := context.WithTimeout(f.ctx, 2*time.Minute)
	reached := make(chan error, 1)
	go func() { _, err := gates.Wait(wctx, faultpoint.MidTransfer); reached <- err }()
	select {
	case err := <-reached:
		if err != nil {
			t.Errorf("the full backup did not reach the %s fault point: %v", faultpoint.MidTransfer, err)
		} else {
			f.duringTransfer(t)
		}
	case r := <-done:
		t.Errorf("the full backup ended before reaching the %s fault point (too fast to be caught?): %s", faultpoint.MidTransfer, r.res)
		done <- r
	}
	wcancel()
	if err := gates.Release(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	r := <-done
	f.checkCompleted(t, r.b, r.res, workflows.ModeFull)
	f.points = append(f.points, r.b)

	// b2: an incremental over it.
	stacktest.WriteDisk(t, f.l, ref, a, 100*MiB, stacktest.Pattern(3, 8*MiB))
	stacktest.WriteDisk(t, f.l, ref, b, 0, stacktest.Pattern(4, MiB))
	f.captureAll(t)
	b2, res := f.backup(t, baseVM)
	f.checkCompleted(t, b2, res, workflows.ModeIncremental)
	f.points = append(f.points, b2)
	f.baseUUID = b2.VMUUID

	f.list = f.listVM(t, f.baseUUID)
	if len(f.list) != 2 {
		t.Fatalf("catalog of %s after the baseline: %+v", baseVM, f.list)
	}
	f.sums = map[string]string{}
	f.known = map[string]bool{}
	for _, p := range f.points {
		for _, d := range p.Disks {
			f.sums[d.Path] = sha256File(t, d.Path)
		}
	}
	for _, rel := range repoFiles(t, f.s.Repository()) {
		f.known[rel] = true
	}
	if len(f.known) != len(f.sums) {
		t.Fatalf("repository after the baseline holds %v, want exactly the %d images", repoFiles(t, f.s.Repository()), len(f.sums))
	}
}

// duringTransfer looks at the worker's children while the transfer is
// paused: no secret in any argv or environment, every NBD socket in a
// private (0700) folder.
func (f *fixture) duringTransfer(t *testing.T) {
	t.Helper()
	pid := f.s.WorkerPID()
	if pid == 0 {
		t.Fatal("no worker")
	}
	secrets := f.secrets()
	var progs []string
	var sockets []string
	for _, p := range append([]stack.Proc{{Pid: pid, Cmd: "worker"}}, stack.Descendants(pid)...) {
		progs = append(progs, p.Cmd)
		raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(p.Pid), "cmdline"))
		if err != nil {
			continue // exited meanwhile
		}
		environ, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(p.Pid), "environ"))
		for name, secret := range secrets {
			if strings.Contains(string(raw), secret) {
				t.Errorf("the %s is in the argv of pid %d: %s", name, p.Pid, p.Cmd)
			}
			if strings.Contains(string(environ), secret) {
				t.Errorf("the %s is in the environment of pid %d (%s)", name, p.Pid, p.Cmd)
			}
		}
		argv := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		for i := 0; i+1 < len(argv); i++ {
			if argv[i] == "-k" || argv[i] == "--unix" || argv[i] == "-U" || argv[i] == "--socket" {
				sockets = append(sockets, argv[i+1])
			}
		}
	}
	var hasQemu, hasNbdkit bool
	for _, c := range progs[1:] {
		hasQemu = hasQemu || strings.Contains(c, "qemu-nbd")
		hasNbdkit = hasNbdkit || strings.Contains(c, "nbdkit")
	}
	// The source's nbdkit; the image the worker writes itself (no
	// qemu-nbd: internal/qcow2.Writer).
	if hasQemu || !hasNbdkit {
		t.Errorf("while a transfer is paused, the worker's children are %q: want an nbdkit (the source) and no qemu-nbd (the worker writes the image)", progs)
	}
	if len(sockets) < 1 {
		t.Errorf("NBD sockets named on the children's command lines: %v, want the source's", sockets)
	}
	for _, sock := range sockets {
		fi, err := os.Lstat(sock)
		if err != nil {
			t.Errorf("NBD socket %s: %v", sock, err)
			continue
		}
		if fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("%s is not a socket (%v)", sock, fi.Mode())
		}
		for dir, i := filepath.Dir(sock), 0; i < 2; dir, i = filepath.Dir(dir), i+1 {
			di, err := os.Stat(dir)
			if err != nil {
				t.Errorf("folder of NBD socket %s: %v", sock, err)
				continue
			}
			if perm := di.Mode().Perm(); perm != 0o700 {
				t.Errorf("NBD socket %s: folder %s has mode %#o, want 0700", sock, dir, perm)
			}
			if st, ok := di.Sys().(*syscall.Stat_t); ok && st.Uid != uint32(os.Getuid()) {
				t.Errorf("NBD socket %s: folder %s belongs to uid %d, not the worker's %d", sock, dir, st.Uid, os.Getuid())
			}
		}
	}
	t.Logf("paused mid-transfer: %d children, sockets %v", len(progs)-1, sockets)
}

func (f *fixture) captureAll(t *testing.T) {
	t.Helper()
	caps := map[int32]string{}
	for _, k := range f.keys {
		caps[k] = filepath.Join(f.data, fmt.Sprintf("b%d-%d.raw", len(f.caps)+1, k))
		stacktest.Capture(t, f.l, f.baseRef, k, caps[k])
	}
	f.caps = append(f.caps, caps)
}

// checkCompleted checks a backup that must have worked: every disk in the
// wanted mode, its image at <repository>/lab/<instance uuid>/<key>/<backup
// id>.qcow2 — the layout never uses the VM's name.
func (f *fixture) checkCompleted(t *testing.T, b stacktest.BackupJSON, res stack.StarterResult, mode string) {
	t.Helper()
	if res.ExitCode != 0 || b.Status != "completed" {
		t.Fatalf("backup: want completed with exit 0, got %s", res)
	}
	if b.VMUUID == "" || b.BackupID == "" || len(b.Disks) == 0 {
		t.Fatalf("backup JSON lacks the VM UUID, backup ID or disks: %s", res.Stdout)
	}
	for _, d := range b.Disks {
		want := filepath.Join(f.s.Repository(), stack.Profile, b.VMUUID, strconv.Itoa(int(d.Key)), b.BackupID+".qcow2")
		if d.Path != want {
			t.Errorf("disk %d: image at %s, want %s", d.Key, d.Path, want)
		}
		if mode != "" && d.Mode != mode {
			t.Errorf("disk %d: mode %s, want %s", d.Key, d.Mode, mode)
		}
		if _, err := os.Stat(d.Path); err != nil {
			t.Error(err)
		}
	}
}

func (f *fixture) listVM(t *testing.T, vm string) []stacktest.ListJSON {
	t.Helper()
	res := f.starter(t, "list", vm, "--json")
	if res.ExitCode != 0 {
		t.Fatalf("list: %s", res)
	}
	var l []stacktest.ListJSON
	if err := stacktest.DecodeOne(res.Stdout, &l); err != nil {
		t.Fatal(err)
	}
	return l
}

// intact checks that nothing was lost: baseVM's committed restore points
// are as after the baseline (catalog and files), no VM the test used has a
// cbtflow snapshot, the repository holds only committed images, and no
// qemu-nbd or nbdkit is left.
func (f *fixture) intact(t *testing.T) {
	t.Helper()
	if f.list == nil {
		return
	}
	var committed []stacktest.ListJSON
	for _, e := range f.listVM(t, f.baseUUID) {
		if e.Status == "committed" {
			committed = append(committed, e)
		} else if e.Status != "failed" {
			t.Errorf("catalog of %s: backup %s is %s, want committed or failed", baseVM, e.BackupID, e.Status)
		}
	}
	if fmt.Sprint(committed) != fmt.Sprint(f.list) {
		t.Errorf("committed restore points of %s changed:\nnow    %+v\nbefore %+v", baseVM, committed, f.list)
	}
	for p, sum := range f.sums {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("committed image: %v", err)
		} else if got := sha256File(t, p); got != sum {
			t.Errorf("committed image %s changed: SHA-256 %s, was %s", p, got, sum)
		}
	}
	vms := map[string]string{baseVM: f.baseRef}
	f.mu.Lock()
	for n, r := range f.otherVMs {
		vms[n] = r
	}
	f.mu.Unlock()
	for name, ref := range vms {
		snaps, err := stacktest.Snapshots(f.ctx, f.l, ref)
		if err != nil {
			t.Errorf("snapshots of %s: %v", name, err)
		} else if len(snaps) > 0 {
			t.Errorf("snapshots left on %s: %v", name, snaps)
		}
	}
	for _, rel := range repoFiles(t, f.s.Repository()) {
		if !f.known[rel] {
			t.Errorf("repository holds %s, which no committed restore point owns (a partial file?)", rel)
		}
	}
	if left := f.s.Leftovers(); len(left) > 0 {
		t.Errorf("processes left: %v", left)
	}
}

// addKnown records the images of a backup that worked.
func (f *fixture) addKnown(t *testing.T, b stacktest.BackupJSON) {
	t.Helper()
	for _, d := range b.Disks {
		rel, err := filepath.Rel(f.s.Repository(), d.Path)
		if err != nil || strings.HasPrefix(rel, "..") {
			t.Errorf("image %s is outside the repository %s", d.Path, f.s.Repository())
			continue
		}
		f.known[rel] = true
	}
}

// failedOnce checks the history of a failed workflow: activity ran once
// (every attempt number 1), failed at least once and only with a
// non-retryable error of type errType, and the workflow failed.
func (f *fixture) failedOnce(t *testing.T, workflowID, activity, errType string) activityRuns {
	t.Helper()
	r := summarize(t, stacktest.History(f.ctx, t, f.s, workflowID, ""))
	if r.status != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED {
		t.Errorf("workflow %s ended with %v, want failed", workflowID, r.status)
	}
	if len(r.failures[activity]) == 0 {
		t.Errorf("workflow %s: %s did not fail (failures: %v)", workflowID, activity, r.failures)
	}
	for _, a := range r.attempts[activity] {
		if a != 1 {
			t.Errorf("workflow %s: %s ran %d attempts, want 1 (retrying cannot help)", workflowID, activity, a)
		}
	}
	for name, fs := range r.failures {
		for _, fl := range fs {
			info := fl.GetApplicationFailureInfo()
			if name != activity {
				t.Errorf("workflow %s: %s failed too: %s", workflowID, name, fl.GetMessage())
				continue
			}
			if !info.GetNonRetryable() || info.GetType() != errType {
				t.Errorf("workflow %s: %s failed with type %q, non-retryable %v: want non-retryable %s (%s)",
					workflowID, activity, info.GetType(), info.GetNonRetryable(), errType, fl.GetMessage())
			}
		}
	}
	return r
}

// workflowFailedWith checks that a workflow failed by its own
// non-retryable error of type errType, with no activity failing.
func (f *fixture) workflowFailedWith(t *testing.T, workflowID, errType string) activityRuns {
	t.Helper()
	r := summarize(t, stacktest.History(f.ctx, t, f.s, workflowID, ""))
	if r.closed == nil {
		t.Fatalf("workflow %s ended with %v, want failed", workflowID, r.status)
	}
	info := r.closed.GetFailure().GetApplicationFailureInfo()
	if info.GetType() != errType || !info.GetNonRetryable() {
		t.Errorf("workflow %s failed with type %q, non-retryable %v (%s): want non-retryable %s",
			workflowID, info.GetType(), info.GetNonRetryable(), r.closed.GetFailure().GetMessage(), errType)
	}
	for name, fs := range r.failures {
		t.Errorf("workflow %s: activity %s failed %d times", workflowID, name, len(fs))
	}
	for name, as := range r.attempts {
		for _, a := range as {
			if a != 1 {
				t.Errorf("workflow %s: %s ran %d attempts", workflowID, name, a)
			}
		}
	}
	return r
}

// startFailed checks a backup that failed before any per-VM backup
// started: exit 1, the JSON and stderr name every string of want, and the
// start workflow's activity ran once and failed non-retryably.
func (f *fixture) startFailed(t *testing.T, vm string, args []string, activity, errType string, want ...string) stacktest.BackupJSON {
	t.Helper()
	b, res := f.backup(t, vm, args...)
	if res.ExitCode != 1 || b.Status != "failed" {
		t.Errorf("want exit 1 and status failed, got %s", res)
	}
	for _, w := range want {
		if !strings.Contains(b.Error, w) {
			t.Errorf("error %q does not name %q", b.Error, w)
		}
		if !strings.Contains(res.Stderr, w) {
			t.Errorf("stderr does not name %q:\n%s", w, res.Stderr)
		}
	}
	if !strings.HasPrefix(b.WorkflowID, "start-backup/") {
		t.Fatalf("workflow ID %q: want the start workflow's", b.WorkflowID)
	}
	r := f.failedOnce(t, b.WorkflowID, activity, errType)
	if n := len(r.scheduled); n != 1 {
		t.Errorf("activities scheduled: %v, want only %s", r.scheduled, activity)
	}
	return b
}

func (f *fixture) unknownVM(t *testing.T) {
	const name = "no-such-vm-badinput"
	f.startFailed(t, name, nil, "ResolveVM", activities.ErrTypeVMNotFound, name)
}

func (f *fixture) unknownProfile(t *testing.T) {
	b := f.startFailed(t, baseVM, []string{"--profile", "nope"}, "ResolveVM", activities.ErrTypeProfileNotFound, `"nope"`)
	// It says which profiles there are.
	if !strings.Contains(b.Error, stack.Profile) {
		t.Errorf("error %q does not list the configured profiles", b.Error)
	}
}

func (f *fixture) wrongPassword(t *testing.T) {
	// Names the profile, the vCenter and the user; never the password.
	f.startFailed(t, baseVM, []string{"--profile", profileWrongPassword}, "ResolveVM", activities.ErrTypeLogin,
		`"`+profileWrongPassword+`"`, f.l.URL().Host, f.l.User())
}

// startUnreachable starts a backup through a profile whose vCenter URL is
// a closed port, and returns the check to run once the other cases are
// done. Retrying can help here in general (a vCenter restarting), so the
// failure is retryable — but bounded: the first vCenter contact of a
// backup gives up after workflows.FirstContactAttempts attempts (about 30
// s), so the operator gets the error within unreachableBound, naming the
// profile and the URL, with the type activities.ErrTypeUnreachable.
func (f *fixture) startUnreachable(t *testing.T) func(*testing.T) {
	type result struct {
		res stack.StarterResult
		err error
	}
	done := make(chan result, 1)
	ctx, cancel := context.WithTimeout(f.ctx, unreachableBound)
	go func() {
		res, err := f.s.Starter(ctx, "backup", baseVM, "--profile", profileDown, "--wait", "--json")
		f.mu.Lock()
		f.outputs = append(f.outputs, res)
		f.mu.Unlock()
		done <- result{res, err}
	}()
	return func(t *testing.T) {
		defer cancel()
		r := <-done
		if r.err != nil {
			// Still retrying: say how, then stop it.
			for _, ex := range stacktest.ListWorkflows(f.ctx, t, f.s, "WorkflowType = 'Backup' AND ExecutionStatus = 'Running'") {
				id := ex.GetExecution().GetWorkflowId()
				if !strings.HasPrefix(id, "start-backup/"+profileDown+"/") {
					continue
				}
				if d, err := f.s.Client().DescribeWorkflow(f.ctx, id, ""); err == nil {
					for _, pa := range d.RawResponse.GetPendingActivities() {
						t.Logf("%s: %s attempt %d, last failure: %s", id, pa.GetActivityType().GetName(), pa.GetAttempt(), pa.GetLastFailure().GetMessage())
					}
				}
				_ = f.s.Client().TerminateWorkflow(f.ctx, id, "", "badinput: unreachable vCenter not given up in time")
			}
			t.Fatalf("a backup through an unreachable vCenter had not failed after %s: %v", unreachableBound, r.err)
		}
		var b stacktest.BackupJSON
		if err := stacktest.DecodeOne(r.res.Stdout, &b); err != nil {
			t.Fatal(err)
		}
		if r.res.ExitCode != 1 || b.Status != "failed" {
			t.Errorf("want exit 1 and status failed, got %s", r.res)
		}
		u := strings.TrimPrefix(f.downURL, "https://")
		for _, w := range []string{`"` + profileDown + `"`, u, "unreachable"} {
			if !strings.Contains(b.Error, w) {
				t.Errorf("error %q does not name %q", b.Error, w)
			}
		}
		h := stacktest.History(f.ctx, t, f.s, b.WorkflowID, "")
		r2 := summarize(t, h)
		if r2.status != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED || r2.scheduled["ResolveVM"] != 1 || len(r2.scheduled) != 1 {
			t.Errorf("start workflow %s: %v, activities %v: want failed after ResolveVM alone", b.WorkflowID, r2.status, r2.scheduled)
		}
		fails := r2.failures["ResolveVM"]
		if len(fails) != 1 {
			t.Fatalf("ResolveVM failures: %v", fails)
		}
		info := fails[0].GetApplicationFailureInfo()
		if info.GetType() != activities.ErrTypeUnreachable || info.GetNonRetryable() {
			t.Errorf("ResolveVM failed with type %q, non-retryable %v: want the retryable %s", info.GetType(), info.GetNonRetryable(), activities.ErrTypeUnreachable)
		}
		if a := r2.attempts["ResolveVM"]; len(a) != 1 || a[0] != workflows.FirstContactAttempts {
			t.Errorf("ResolveVM attempts %v: want it retried (a vCenter may come back), then given up after %d", a, workflows.FirstContactAttempts)
		}
		t.Logf("unreachable vCenter: failed after %s, %v attempts: %s", r.res.Duration.Round(time.Millisecond), r2.attempts["ResolveVM"], b.Error)
	}
}

func (f *fixture) invalidMode(t *testing.T) {
	before := len(stacktest.ListWorkflows(f.ctx, t, f.s, "WorkflowType = 'Backup'"))
	res := f.starter(t, "backup", baseVM, "--mode", "sometimes", "--wait", "--json")
	if res.ExitCode != 2 || !strings.Contains(res.Stderr, `"sometimes"`) || !strings.Contains(res.Stderr, "--mode") {
		t.Errorf("--mode sometimes: want exit 2 and a message naming --mode \"sometimes\", got %s", res)
	}
	// A Web UI or API start with the same mode fails in the workflow,
	// before any activity.
	run, err := f.s.Client().ExecuteWorkflow(f.ctx, client.StartWorkflowOptions{ID: "badinput-invalid-mode", TaskQueue: workflows.TaskQueue},
		workflows.Backup, workflows.BackupInput{VM: baseVM, Mode: "sometimes"})
	if err != nil {
		t.Fatal(err)
	}
	err = run.Get(f.ctx, nil)
	var app *temporal.ApplicationError
	if !errors.As(err, &app) || app.Type() != activities.ErrTypeInvalidInput || !app.NonRetryable() || !strings.Contains(app.Message(), `"sometimes"`) {
		t.Errorf("Backup with mode \"sometimes\": %v, want a non-retryable %s naming the mode", err, activities.ErrTypeInvalidInput)
	}
	r := f.workflowFailedWith(t, run.GetID(), activities.ErrTypeInvalidInput)
	if len(r.scheduled) != 0 {
		t.Errorf("activities ran for an invalid mode: %v", r.scheduled)
	}
	// The CLI started nothing: only the API start is new.
	time.Sleep(time.Second) // visibility is eventually consistent
	if after := len(stacktest.ListWorkflows(f.ctx, t, f.s, "WorkflowType = 'Backup'")); after != before+1 {
		t.Errorf("%d Backup workflows before, %d after: want only the API start's", before, after)
	}
}

// newVM creates a lab VM for one case and remembers it for the snapshot
// check.
func (f *fixture) newVM(t *testing.T, name string, capacities ...int64) string {
	t.Helper()
	ref, err := f.l.CreateVM(name, capacities...)
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.otherVMs[name] = ref
	f.mu.Unlock()
	return ref
}

func (f *fixture) noDisks(t *testing.T) {
	f.newVM(t, "nodisks")
	b, res := f.backup(t, "nodisks")
	if res.ExitCode != 1 || b.Status != "failed" || !strings.Contains(b.Error, "nodisks") || !strings.Contains(b.Error, "no disks") {
		t.Errorf("backup of a VM without disks: want exit 1 and an error naming the VM and its lack of disks, got %s", res)
	}
	r := f.workflowFailedWith(t, b.WorkflowID, activities.ErrTypeNoDisks)
	if r.scheduled["PrepareVM"] != 1 || r.scheduled["CreateSnapshot"] != 0 || r.scheduled["BeginBackup"] != 0 {
		t.Errorf("activities %v: want PrepareVM once, no snapshot, nothing in the catalog", r.scheduled)
	}
}

func (f *fixture) incrementalFirst(t *testing.T) {
	ref := f.newVM(t, "fresh-incremental", 64*MiB)
	disks, err := f.l.Disks(ref)
	if err != nil || len(disks) != 1 {
		t.Fatalf("%+v %v", disks, err)
	}
	stacktest.WriteDisk(t, f.l, ref, disks[0].Key, 0, stacktest.Pattern(5, MiB))
	b, res := f.backup(t, "fresh-incremental", "--mode", "incremental")
	for _, w := range []string{fmt.Sprintf("disk %d", disks[0].Key), "incremental", "no previous restore point"} {
		if !strings.Contains(b.Error, w) {
			t.Errorf("error %q does not name %q", b.Error, w)
		}
	}
	if b.VM != "fresh-incremental" {
		t.Errorf("the failed backup names VM %q", b.VM)
	}
	if res.ExitCode != 1 || b.Status != "failed" {
		t.Errorf("want exit 1 and status failed, got %s", res)
	}
	r := f.workflowFailedWith(t, b.WorkflowID, activities.ErrTypeNoRestorePoint)
	if r.scheduled["CreateSnapshot"] != 0 || r.scheduled["TransferDisk"] != 0 || r.scheduled["TransferDisks"] != 0 || r.scheduled["FailBackup"] != 1 {
		t.Errorf("activities %v: want no snapshot, no transfer, the backup marked failed", r.scheduled)
	}
	// It failed, it did not vanish: the catalog says so.
	l := f.listVM(t, b.VMUUID)
	if len(l) != 1 || l[0].Status != "failed" {
		t.Errorf("catalog of fresh-incremental: %+v, want one failed backup", l)
	}
}

// vmNames backs up VMs whose names hold '/', '..', blanks, non-ASCII
// letters or start with '-'. vCenter stores '/' as %2f (lab.EscapeName);
// each backup works by the name as given, and every file lands at
// <repository>/lab/<instance uuid>/…: no name reaches a path.
func (f *fixture) vmNames(t *testing.T) {
	stateBefore := dirNames(t, f.s.Dir())
	outsideBefore := dirNames(t, filepath.Dir(f.s.Dir()))
	names := []string{"web/01", "../../etc", "a..b", "my backup vm", "Überwachung-δ-数据", "-rf"}
	for i, name := range names {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			ref := f.newVM(t, name, 64*MiB)
			disks, err := f.l.Disks(ref)
			if err != nil || len(disks) != 1 {
				t.Fatalf("%+v %v", disks, err)
			}
			key := disks[0].Key
			stacktest.WriteDisk(t, f.l, ref, key, MiB, stacktest.Pattern(uint64(10+i), 2*MiB))
			capPath := filepath.Join(f.data, fmt.Sprintf("name-%d.raw", i))
			stacktest.Capture(t, f.l, ref, key, capPath)

			stored := lab.EscapeName(name)
			if strings.HasPrefix(name, "-") {
				// Without "--" the name is a flag: a usage error that
				// names it.
				res := f.starter(t, "backup", name, "--wait")
				if res.ExitCode != 2 || !strings.Contains(res.Stderr, name) {
					t.Errorf("backup %s: want exit 2 naming it, got %s", name, res)
				}
			}
			// By the name as given (as the vSphere Client shows it).
			b, res := f.backup(t, name)
			f.checkCompleted(t, b, res, workflows.ModeFull)
			if t.Failed() {
				return
			}
			if b.VM != stored {
				t.Errorf("backup JSON names VM %q, want %q", b.VM, stored)
			}
			f.addKnown(t, b)
			// By the name as stored: the same VM, so an incremental.
			b2, res := f.backup(t, stored)
			f.checkCompleted(t, b2, res, workflows.ModeIncremental)
			if b2.VMUUID != b.VMUUID {
				t.Errorf("VM %q is %s by its given name, %s by its stored name", name, b.VMUUID, b2.VMUUID)
			}
			f.addKnown(t, b2)
			for _, d := range append(b.Disks, b2.Disks...) {
				rel, _ := filepath.Rel(f.s.Repository(), d.Path)
				for _, part := range strings.Split(rel, string(filepath.Separator)) {
					if part == ".." || strings.Contains(part, name) || strings.Contains(part, stored) {
						t.Errorf("image path %s holds the VM's name or climbs out", d.Path)
					}
				}
			}
			out := filepath.Join(f.data, fmt.Sprintf("name-%d.restored", i))
			if res := f.starter(t, "restore", b.BackupID, "--disk", strconv.Itoa(int(key)), "--to", out); res.ExitCode != 0 {
				t.Fatalf("restore: %s", res)
			}
			if diff, err := stacktest.SameContent(capPath, out); err != nil || diff != "" {
				t.Errorf("restore of VM %q differs from the disk: %s %v", name, diff, err)
			}
			os.Remove(out)
			os.Remove(capPath)
		})
	}
	// Nothing was made next to the repository, or next to the state folder.
	if after := dirNames(t, f.s.Dir()); !slices.Equal(after, stateBefore) {
		t.Errorf("the state folder changed: %v, was %v", after, stateBefore)
	}
	if after := dirNames(t, filepath.Dir(f.s.Dir())); !slices.Equal(after, outsideBefore) {
		t.Errorf("the state folder's parent changed: %v, was %v", after, outsideBefore)
	}
	for _, rel := range repoFiles(t, f.s.Repository()) {
		for _, name := range names {
			if strings.Contains(rel, name) || strings.Contains(rel, lab.EscapeName(name)) {
				t.Errorf("repository file %s holds the VM name %q", rel, name)
			}
		}
	}
}

// dirNames lists dir's entries but SQLite's transient files (the dev
// server's temporal.db-journal comes and goes with its transactions).
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		if n := e.Name(); strings.HasSuffix(n, "-journal") || strings.HasSuffix(n, "-wal") || strings.HasSuffix(n, "-shm") {
			continue
		}
		out = append(out, e.Name())
	}
	return out
}

// readOnlyRepository: the repository's root is read-only. The backup fails
// at its first write, non-retryably, naming the path.
func (f *fixture) readOnlyRepository(t *testing.T) {
	t.Run("mounted", func(t *testing.T) {
		readOnlyBind(t, f.s.Repository())
		b, res := f.backup(t, baseVM)
		if res.ExitCode != 1 || b.Status != "failed" {
			t.Errorf("want exit 1 and status failed, got %s", res)
		}
		if !strings.Contains(b.Error, f.s.Repository()) || !strings.Contains(strings.ToLower(b.Error), "read-only") {
			t.Errorf("error %q does not name the read-only repository %s", b.Error, f.s.Repository())
		}
		f.failedOnce(t, b.WorkflowID, "ChangedAreas", activities.ErrTypeReadOnly)
	})
}

// readOnlyDiskFolder: one disk's folder is read-only: that transfer fails
// non-retryably naming the image; the other disk's image goes too.
func (f *fixture) readOnlyDiskFolder(t *testing.T) {
	if len(f.points) == 0 {
		t.Fatal("no baseline restore point: the baseline backups failed earlier")
	}
	dir := filepath.Dir(f.points[0].Disks[0].Path)
	t.Run("mounted", func(t *testing.T) {
		readOnlyBind(t, dir)
		b, res := f.backup(t, baseVM)
		if res.ExitCode != 1 || b.Status != "failed" {
			t.Errorf("want exit 1 and status failed, got %s", res)
		}
		if !strings.Contains(b.Error, dir+"/") || !strings.Contains(strings.ToLower(b.Error), "read-only") {
			t.Errorf("error %q does not name the read-only folder %s", b.Error, dir)
		}
		f.failedOnce(t, b.WorkflowID, "TransferDisks", activities.ErrTypeReadOnly)
	})
}

func (f *fixture) restoreUnknown(t *testing.T) {
	for _, id := range []string{"20990101T000000Z-000000000000", "../../etc/passwd"} {
		out := filepath.Join(f.data, "unknown.raw")
		res := f.starter(t, "restore", id, "--disk", strconv.Itoa(int(f.keys[0])), "--to", out)
		if res.ExitCode == 0 || !strings.Contains(res.Stderr, id) || !strings.Contains(res.Stderr, "does not exist") {
			t.Errorf("restore of backup %q: want a non-zero exit saying it does not exist, got %s", id, res)
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("restore of an unknown backup wrote %s", out)
		}
	}
	// A disk the restore point does not have.
	out := filepath.Join(f.data, "nodisk.raw")
	res := f.starter(t, "restore", f.points[1].BackupID, "--disk", "99", "--to", out)
	if res.ExitCode == 0 || !strings.Contains(res.Stderr, "disk 99") {
		t.Errorf("restore of disk 99: want a non-zero exit naming the disk, got %s", res)
	}
	if _, err := os.Stat(out); err == nil {
		t.Errorf("restore of an unknown disk wrote %s", out)
	}
}

// refusedRestore restores b2's first disk, which must be refused naming
// path and writing nothing.
func (f *fixture) refusedRestore(t *testing.T, path string) {
	t.Helper()
	outDir := filepath.Join(f.data, "refused")
	if err := os.MkdirAll(outDir, 0o700); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(outDir, "disk.raw")
	res := f.starter(t, "restore", f.points[1].BackupID, "--disk", strconv.Itoa(int(f.keys[0])), "--to", out)
	if res.ExitCode == 0 || !strings.Contains(res.Stderr, path) {
		t.Errorf("restore through a damaged chain: want a non-zero exit naming %s, got %s", path, res)
	}
	if left := dirNames(t, outDir); len(left) > 0 {
		t.Errorf("a refused restore left %v in %s", left, outDir)
	}
}

func (f *fixture) diskPath(point int, key int32) string {
	for _, d := range f.points[point].Disks {
		if d.Key == key {
			return d.Path
		}
	}
	return ""
}

func (f *fixture) restoreCorrupt(t *testing.T) {
	for _, point := range []int{0, 1} { // the backing image, the top
		p := f.diskPath(point, f.keys[0])
		stacktest.FlipByte(t, p)
		f.refusedRestore(t, p)
		stacktest.FlipByte(t, p)
	}
}

func (f *fixture) restoreDeleted(t *testing.T) {
	for _, point := range []int{0, 1} {
		p := f.diskPath(point, f.keys[0])
		moved := filepath.Join(f.data, "moved.qcow2")
		if err := os.Rename(p, moved); err != nil {
			t.Fatal(err)
		}
		f.refusedRestore(t, p)
		if err := os.Rename(moved, p); err != nil {
			t.Fatal(err)
		}
	}
}

// restoresIdentical restores every disk of both baseline restore points
// and compares them with the disks at backup time.
func (f *fixture) restoresIdentical(t *testing.T) {
	for i, p := range f.points {
		for _, k := range f.keys {
			out := filepath.Join(f.data, fmt.Sprintf("restore-%d-%d.raw", i+1, k))
			res := f.starter(t, "restore", p.BackupID, "--disk", strconv.Itoa(int(k)), "--to", out)
			if res.ExitCode != 0 {
				t.Errorf("restore %s disk %d: %s", p.BackupID, k, res)
				continue
			}
			diff, err := stacktest.SameContent(f.caps[i][k], out)
			if err != nil {
				t.Fatal(err)
			}
			if diff != "" {
				t.Errorf("restore of b%d disk %d differs from the disk at backup time: %s", i+1, k, diff)
			}
			os.Remove(out)
		}
	}
	// The comparison can fail: b1 and b2 differ.
	if diff, err := stacktest.SameContent(f.caps[0][f.keys[0]], f.caps[1][f.keys[0]]); err != nil || diff == "" {
		t.Errorf("the captures of b1 and b2 should differ (%v)", err)
	}
}

// secrets are the passwords that must appear nowhere: the lab's (used by
// every backup) and the wrong one of the wrongpw profile.
func (f *fixture) secrets() map[string]string {
	return map[string]string{"lab vCenter password": f.l.Password(), "wrong password": f.wrongPW}
}

// secretsNowhere scans every workflow of the run (histories, payloads
// included, as proto fields and as JSON), the worker's and Temporal's
// logs, and every output of the CLI.
func (f *fixture) secretsNowhere(t *testing.T) {
	pw, err := os.ReadFile(filepath.Join(f.s.Dir(), "lab.password"))
	if err != nil || strings.TrimSpace(string(pw)) != f.l.Password() || len(f.l.Password()) < 16 {
		t.Fatalf("the lab's password file does not hold a distinctive lab password (%v)", err)
	}
	secrets := f.secrets()
	// A control: the scan finds what is there (the base VM's UUID, in
	// payloads).
	control := false
	all := stacktest.ListWorkflows(f.ctx, t, f.s, "")
	types := map[string]int{}
	for _, ex := range all {
		types[ex.GetType().GetName()]++
		id, run := ex.GetExecution().GetWorkflowId(), ex.GetExecution().GetRunId()
		events := stacktest.History(f.ctx, t, f.s, id, run)
		js, err := temporalproto.CustomJSONMarshalOptions{}.Marshal(&historypb.History{Events: events})
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range events {
			control = control || (stacktest.ProtoContains(ev.ProtoReflect(), []byte(f.baseUUID)) && strings.Contains(string(js), f.baseUUID))
		}
		for name, secret := range secrets {
			for _, ev := range events {
				if stacktest.ProtoContains(ev.ProtoReflect(), []byte(secret)) {
					t.Errorf("event %d (%v) of workflow %s holds the %s", ev.GetEventId(), ev.GetEventType(), id, name)
				}
			}
			if strings.Contains(string(js), secret) {
				t.Errorf("the JSON history of workflow %s holds the %s", id, name)
			}
		}
		d, err := f.s.Client().DescribeWorkflow(f.ctx, id, run)
		if err != nil {
			t.Fatal(err)
		}
		for name, secret := range secrets {
			if stacktest.ProtoContains(d.RawResponse.ProtoReflect(), []byte(secret)) {
				t.Errorf("the description (search attributes, memo) of workflow %s holds the %s", id, name)
			}
		}
	}
	if f.baseUUID == "" || !control {
		t.Errorf("the scan of the histories does not find the base VM's UUID %q: it cannot find a secret either", f.baseUUID)
	}
	// The scan saw the run: backups that worked and failed, through both
	// workflows, the failed logins included.
	if types["Backup"] < 10 || types["BackupVM"] < 5 {
		t.Errorf("workflows scanned: %v, want every Backup and BackupVM of the run", types)
	}
	for _, log := range []string{f.s.WorkerLog(), f.s.TemporalLog()} {
		b, err := os.ReadFile(log)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) == 0 {
			t.Errorf("%s is empty: nothing was scanned", log)
		}
		for name, secret := range secrets {
			if strings.Contains(string(b), secret) {
				t.Errorf("%s holds the %s", log, name)
			}
		}
	}
	f.mu.Lock()
	outputs := slices.Clone(f.outputs)
	f.mu.Unlock()
	for _, res := range outputs {
		for name, secret := range secrets {
			if strings.Contains(res.Stdout, secret) || strings.Contains(res.Stderr, secret) {
				t.Errorf("a starter run printed the %s:\n%s", name, res)
			}
		}
	}
	t.Logf("no secret in %d workflows (%v), 2 logs, %d starter runs", len(all), types, len(outputs))
}
