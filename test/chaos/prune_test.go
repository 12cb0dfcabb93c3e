package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// pruneTimeout bounds one prune: a worker killed in a merge is noticed
// after the prune activities' 30 s heartbeat timeout, and a database
// that comes back is retried within 30 s.
const pruneTimeout = 10 * time.Minute

// mergeTemp marks a prune's merged image beside the one it replaces
// (activities.tempSuffix).
const mergeTemp = ".merging"

// prunedVM is a VM the prune group backs up and prunes, and what the
// harness expects of its retention policy.
type prunedVM struct {
	name   string
	policy []string // the flags of `starter retention set`
	// keeps returns, of the VM's restore points (oldest first), those
	// the policy keeps.
	keeps  func(points []*keptPoint) []*keptPoint
	seed   uint64
	points []*keptPoint // the restore points in the catalog, oldest first
}

// keptPoint is a restore point and the captures of its disks, kept for as
// long as the point is.
type keptPoint struct {
	id   string
	caps map[int32]string
}

// plan splits the VM's restore points into kept and removed.
func (v *prunedVM) plan() (kept, removed []*keptPoint) {
	kept = v.keeps(v.points)
	for _, p := range v.points {
		if !slices.Contains(kept, p) {
			removed = append(removed, p)
		}
	}
	return kept, removed
}

// pruneFaults interrupts prunes at every step of a merge and of its
// commit: the worker killed with SIGKILL before the merge, while the
// merge's qemu-img runs, after the merged image is written, before the
// catalog transaction (and a restore of every point while the merges are
// pending) and after it; the Temporal server restarted while a prune
// holds; the database cut during a prune. After each prune: the catalog
// lists exactly the points the policy keeps, each restores byte for byte
// as its disks were at backup time, no merged image or file of a removed
// point is left, no merge is pending, no process is left.
//
// Two VMs, one backup between prunes: the lab's two-disk VM keeps its 2
// newest points (a prune merges the removed full into the older kept
// point: a full image, by convert or rebase); DC0_H0_VM1 keeps its newest
// point and the newest of each of 2 years, with its first full dated a
// year back (a prune merges the removed middle point into the newest,
// onto that full: rebase).
func pruneFaults(t *testing.T, ctx context.Context) []*Tally {
	stop := newImgStop(t) // before the stack: the worker inherits PATH
	e := newEnv(t, ctx, envConfig{name: "prune"})
	setup := tallied(t, "prune: backups between the prunes")
	two := &prunedVM{name: vms[0], policy: []string{"--keep-last", "2"}, seed: 900,
		keeps: func(ps []*keptPoint) []*keptPoint { return ps[max(0, len(ps)-2):] }}
	old := &prunedVM{name: "DC0_H0_VM1", policy: []string{"--keep-last", "1", "--keep-yearly", "2"}, seed: 950,
		keeps: func(ps []*keptPoint) []*keptPoint {
			if len(ps) < 2 {
				return ps
			}
			return []*keptPoint{ps[0], ps[len(ps)-1]}
		}}
	for i := range 3 {
		e.addPoint(setup, two, fmt.Sprintf("prune-2-%d", i+1))
	}
	for i := range 3 {
		e.addPoint(setup, old, fmt.Sprintf("prune-y-%d", i+1))
		if i == 0 {
			e.backdate(old.points[0].id, 400*24*time.Hour)
		}
	}
	for _, v := range []*prunedVM{two, old} {
		res, err := e.s.Starter(ctx, append([]string{"retention", "set", v.name}, v.policy...)...)
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("retention set %s: %v %s", v.name, err, res)
		}
	}

	n := 0
	next := func(v *prunedVM) string {
		n++
		if n > 2 { // the first prune of each VM has the initial backups
			e.addPoint(setup, v, fmt.Sprintf("prune-%d", n))
		}
		return fmt.Sprintf("prune-%d", n)
	}
	kill := map[string]*Tally{}
	killTally := func(name string) *Tally {
		if kill[name] == nil {
			kill[name] = tallied(t, "prune: worker SIGKILL "+name)
		}
		return kill[name]
	}
	before, during, after := killTally("at "+faultpoint.BeforeMerge), killTally("during the merge's qemu-img"), killTally("at "+faultpoint.AfterMerge)
	beforeCommit, afterCommit := killTally("at "+faultpoint.BeforePruneCommit+", restore meanwhile"), killTally("at "+faultpoint.AfterPruneCommit)
	temporal := tallied(t, "prune: Temporal server restart")
	db := tallied(t, "prune: database cut")

	e.prune(before, next(two), two, e.killAt(before, faultpoint.BeforeMerge, "MergeImage"))
	e.prune(during, next(old), old, e.killInQemuImg(during, stop))
	e.prune(after, next(two), two, e.killAt(after, faultpoint.AfterMerge, "MergeImage"))
	e.prune(beforeCommit, next(old), old, e.killRestoreAt(beforeCommit, old))
	e.prune(afterCommit, next(two), two, e.killAt(afterCommit, faultpoint.AfterPruneCommit, "ApplyPrune"))
	e.prune(during, next(two), two, e.killInQemuImg(during, stop))
	e.prune(temporal, next(old), old, e.restartTemporalAt(faultpoint.AfterMerge, true, false))
	e.prune(temporal, next(two), two, e.restartTemporalAt(faultpoint.BeforePruneCommit, false, false))
	e.prune(db, next(old), old, e.cutDatabaseAt(faultpoint.BeforePruneCommit, "ApplyPrune", 5*time.Second))
	e.prune(db, next(two), two, e.cutDatabaseAt(faultpoint.AfterMerge, "MergeImage", 20*time.Second))
	return []*Tally{setup, before, during, after, beforeCommit, afterCommit, temporal, db}
}

// addPoint backs v up once (new guest data), checks the backup as every
// scenario does, and keeps the captures of its disks for as long as the
// point is kept.
func (e *env) addPoint(setup *Tally, v *prunedVM, label string) {
	t := e.t
	t.Helper()
	v.seed++
	r := e.backup(setup, label, v.name, v.seed, 16*MiB, nil, false, backupTimeout)
	p := &keptPoint{id: r.out.BackupID, caps: map[int32]string{}}
	// check drops the captures of all but a VM's newest run: the prune
	// checks need them as long as the point is kept.
	for key, c := range r.caps {
		p.caps[key] = c + ".kept"
		if err := os.Link(c, p.caps[key]); err != nil {
			t.Fatal(err)
		}
	}
	e.check(setup, r)
	if !r.completed {
		t.Fatalf("%s: the backup before a prune did not complete", label)
	}
	v.points = append(v.points, p)
}

// backdate moves a restore point's time back by d, as if it had been
// taken then (for the calendar rules of a policy).
func (e *env) backdate(id string, d time.Duration) {
	conn, err := pgx.Connect(e.ctx, e.dbURL)
	if err != nil {
		e.t.Fatal(err)
	}
	defer conn.Close(e.ctx)
	tag, err := conn.Exec(e.ctx, `UPDATE backups SET started_at = started_at - $2::interval WHERE id = $1`, id, fmt.Sprintf("%d seconds", int64(d.Seconds())))
	if err != nil || tag.RowsAffected() != 1 {
		e.t.Fatalf("backdate %s: %v (%d rows)", id, err, tag.RowsAffected())
	}
}

// prune runs `starter prune VM --wait --json` with the fault, then checks
// what every prune scenario ends with.
func (e *env) prune(tl *Tally, label string, v *prunedVM, f *fault) {
	t := e.t
	t.Helper()
	kept, removed := v.plan()
	tl.Runs++
	if f.arm != nil {
		if err := f.arm(); err != nil {
			t.Fatal(err)
		}
	}
	began := time.Now()
	pctx, cancel := context.WithTimeout(e.ctx, pruneTimeout)
	defer cancel()
	type result struct {
		res stack.StarterResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := e.s.Starter(pctx, "prune", v.name, "--wait", "--json")
		done <- result{res, err}
	}()
	ictx, icancel := context.WithCancel(pctx)
	var wg sync.WaitGroup
	var actErr error
	if f.act != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			actErr = f.act(ictx)
		}()
	}
	res := <-done
	icancel()
	wg.Wait()
	if f.settle != nil {
		f.settle()
	}
	name := label + " (" + f.name + ")"
	if actErr != nil {
		e.problem(tl, "%s: the fault was not injected as planned: %v", name, actErr)
	}
	if res.err != nil {
		e.problem(tl, "%s: the prune did not end within %s: %v", name, pruneTimeout, res.err)
		return
	}
	var out workflows.PruneResult
	if err := json.Unmarshal([]byte(res.res.Stdout), &out); err != nil || res.res.ExitCode != 0 || len(out.Errors) > 0 || len(out.VMs) != 1 {
		e.problem(tl, "%s: prune of %s failed: %v %s", name, v.name, err, res.res)
	} else {
		tl.Completed++
		vm := out.VMs[0]
		var gotKept, gotRemoved, wantKept, wantRemoved []string
		for _, k := range vm.Kept {
			gotKept = append(gotKept, k.BackupID)
		}
		for _, r := range vm.Removed {
			gotRemoved = append(gotRemoved, r.BackupID)
		}
		for _, p := range kept {
			wantKept = append(wantKept, p.id)
		}
		for _, p := range removed {
			wantRemoved = append(wantRemoved, p.id)
		}
		slices.Sort(gotKept)
		slices.Sort(gotRemoved)
		slices.Sort(wantKept)
		slices.Sort(wantRemoved)
		if !slices.Equal(gotKept, wantKept) || !slices.Equal(gotRemoved, wantRemoved) {
			e.problem(tl, "%s: the prune kept %v and removed %v; the policy keeps %v and removes %v", name, gotKept, gotRemoved, wantKept, wantRemoved)
		}
		if len(vm.Merged) != len(kept[0].caps) {
			e.problem(tl, "%s: %d images merged, want one per disk (%d): %+v", name, len(vm.Merged), len(kept[0].caps), vm.Merged)
		}
		var methods []string
		for _, m := range vm.Merged {
			methods = append(methods, fmt.Sprintf("%s disk %d %s", m.BackupID, m.Key, m.Method))
		}
		if f.retried != "" {
			n, _, err := e.attempts(vm.LockID, f.retried)
			if err != nil {
				e.problem(tl, "%s: history of %s: %v", name, vm.LockID, err)
			} else if n < 2 {
				e.problem(tl, "%s: %s ran %d attempt(s): the fault did not hit it", name, f.retried, n)
			}
		}
		t.Logf("%-40s %-16s prune removed %d, merged [%s], freed %d bytes in %s", name, v.name, len(vm.Removed),
			strings.Join(methods, ", "), out.BytesFreed, time.Since(began).Round(100*time.Millisecond))
	}
	e.checkPrune(tl, name, v, kept, removed)
	v.points = kept
	for _, p := range removed {
		for _, c := range p.caps {
			_ = os.Remove(c)
		}
	}
}

// checkPrune checks what every prune scenario ends with: the catalog
// lists exactly the kept points (a kept point missing is a lost kept
// point), each restores byte for byte as it was backed up, no merged
// image nor file of a removed point is left in the repository, no merge
// is pending; then the checks of every scenario (images as recorded, no
// snapshot, no process left).
func (e *env) checkPrune(tl *Tally, name string, v *prunedVM, kept, removed []*keptPoint) {
	t := e.t
	t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Minute)
	defer cancel()

	res, err := e.s.Starter(ctx, "list", v.name, "--json")
	var list []stacktest.ListJSON
	if err == nil && res.ExitCode == 0 {
		err = stacktest.DecodeOne(res.Stdout, &list)
	}
	if err != nil || res.ExitCode != 0 {
		e.problem(tl, "%s: list: %v %s", name, err, res)
	}
	listed := map[string]bool{}
	for _, b := range list {
		listed[b.BackupID] = true
		if !slices.ContainsFunc(kept, func(p *keptPoint) bool { return p.id == b.BackupID }) {
			e.problem(tl, "%s: %s %s is listed; the policy does not keep it", name, b.Status, b.BackupID)
		}
	}
	for _, p := range kept {
		if !listed[p.id] {
			tl.LostKeptPoints++
			e.problem(tl, "%s: restore point %s, which the policy keeps, is gone", name, p.id)
		}
		for _, key := range sortedKeys(p.caps) {
			tl.Committed++
			if err := e.restoresAs(ctx, p.id, key, p.caps[key], false); err != nil {
				e.problem(tl, "%s: kept point %s disk %d: %v", name, p.id, key, err)
			} else {
				tl.Verified++
			}
		}
	}

	_ = filepath.WalkDir(e.s.Repository(), func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(d.Name(), mergeTemp) {
			tl.LeftoverTempImages++
			e.problem(tl, "%s: merged image left: %s", name, path)
		}
		return nil
	})
	for _, p := range removed {
		if files := stacktest.FilesOf(t, e.s.Repository(), p.id); len(files) > 0 {
			e.problem(tl, "%s: files of the removed point %s left: %v", name, p.id, files)
		}
	}
	if n, err := e.pendingMerges(ctx); err != nil || n > 0 {
		e.problem(tl, "%s: %d merges pending after the prune (%v)", name, n, err)
	}
	e.check(tl)
}

// restoresAs restores disk key of restore point id and compares it with
// the capture want: through the worker (a Restore workflow), or with
// local in the starter's own process (restore --local), which needs no
// worker — the one the harness killed is not back yet.
func (e *env) restoresAs(ctx context.Context, id string, key int32, want string, local bool) error {
	out := filepath.Join(e.data, "prune-restore.raw")
	_ = os.Remove(out)
	defer os.Remove(out)
	args := []string{"restore", id, "--disk", strconv.Itoa(int(key)), "--to", out}
	if local {
		args = append(args, "--local")
	}
	res, err := e.s.Starter(ctx, args...)
	if err != nil || res.ExitCode != 0 {
		return fmt.Errorf("restore: %v %s", err, res)
	}
	diff, err := stacktest.SameContent(want, out)
	if err != nil {
		return err
	}
	if diff != "" {
		return fmt.Errorf("the restore differs from the disk at backup time: %s", diff)
	}
	return nil
}

// pendingMerges counts the catalog's pending merges.
func (e *env) pendingMerges(ctx context.Context) (int, error) {
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	var n int
	err = conn.QueryRow(ctx, `SELECT count(*) FROM pending_merges`).Scan(&n)
	return n, err
}

// renamedPending counts the pending merges whose kept image's path holds
// the merged image already (its size; the catalog still records the old
// image): a restore must follow the merge.
func (e *env) renamedPending(ctx context.Context) (int, error) {
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT d.path, d.size_bytes, p.new_size_bytes FROM pending_merges p
		JOIN backup_disks d ON d.backup_id = p.backup_id AND d.disk_key = p.disk_key`)
	if err != nil {
		return 0, err
	}
	n := 0
	for rows.Next() {
		var path string
		var old, merged int64
		if err := rows.Scan(&path, &old, &merged); err != nil {
			return 0, err
		}
		if fi, err := os.Stat(e.repoPath(path)); err == nil && fi.Size() == merged && merged != old {
			n++
		}
	}
	return n, rows.Err()
}

func sortedKeys(m map[int32]string) []int32 {
	var keys []int32
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// killRestoreAt kills the worker while ApplyPrune holds before its
// catalog transaction (the merged images recorded pending and renamed
// over the kept images, the catalog not changed yet) and, before the
// prune resumes, restores every restore point of v the catalog lists:
// each must restore byte for byte (a kept point's file is already the
// merged image, which the restore follows through the pending merge).
func (e *env) killRestoreAt(tl *Tally, v *prunedVM) *fault {
	g := e.s.FaultPoints()
	point := faultpoint.BeforePruneCommit
	return &fault{
		name:    "worker SIGKILL at " + point + ", restores before the prune resumes",
		retried: "ApplyPrune",
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
			if n, err := e.renamedPending(ictx); err != nil || n == 0 {
				e.problem(tl, "killed at %s: %d pending merges whose image path holds the merged image (%v), want the prune's", point, n, err)
			}
			restored := 0
			for _, p := range v.points { // the removed ones are still in the catalog
				for _, key := range sortedKeys(p.caps) {
					if err := e.restoresAs(ictx, p.id, key, p.caps[key], true); err != nil {
						e.problem(tl, "killed at %s, merges pending: restore point %s disk %d: %v", point, p.id, key, err)
					} else {
						restored++
					}
				}
			}
			e.t.Logf("killed at %s: %d disks of %d restore points restored identical while the merges were pending", point, restored, len(v.points))
			if err := g.Release(point); err != nil {
				return err
			}
			return e.s.StartWorker(e.ctx)
		},
		settle: func() { _ = g.Release(point) },
	}
}

// killInQemuImg kills the worker while the qemu-img of a merge (the
// rebase or convert that writes the .merging image) runs: the harness's
// qemu-img stops itself as it starts (imgStop), the harness checks that it
// is the worker's child, kills the worker, checks that the qemu-img died
// with it (its parent-death signal), and starts a new worker.
func (e *env) killInQemuImg(tl *Tally, s *imgStop) *fault {
	return &fault{
		name:    "worker SIGKILL during qemu-img",
		retried: "MergeImage",
		arm:     s.arm,
		act: func(ictx context.Context) error {
			defer s.disarm()
			pid, step, err := s.wait(ictx)
			if err != nil {
				return err
			}
			if ppid := parentOf(pid); ppid != e.s.WorkerPID() {
				return fmt.Errorf("qemu-img %s (pid %d) is a child of pid %d, the worker is %d", step, pid, ppid, e.s.WorkerPID())
			}
			temps := 0
			_ = filepath.WalkDir(e.s.Repository(), func(_ string, d fs.DirEntry, err error) error {
				if err == nil && strings.HasSuffix(d.Name(), mergeTemp) {
					temps++
				}
				return nil
			})
			e.t.Logf("the merge's qemu-img %s (pid %d) runs, %d merged images being written: killing the worker", step, pid, temps)
			if err := e.s.KillWorker(); err != nil {
				return err
			}
			deadline := time.Now().Add(15 * time.Second)
			for alive(pid) {
				if time.Now().After(deadline) {
					tl.LeftoverProcesses++
					e.problem(tl, "qemu-img %s (pid %d) outlived the killed worker", step, pid)
					_ = syscall.Kill(pid, syscall.SIGKILL)
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			e.settleProcesses(tl, "after the worker was killed during qemu-img "+step)
			s.disarm()
			return e.s.StartWorker(e.ctx)
		},
		settle: s.disarm,
	}
}

// imgStop puts a qemu-img of the harness's first in the PATH of the
// processes the test starts (the worker among them): it runs the real
// one, except that, while armed, the first rebase or convert of a merged
// image (.merging) writes its pid and stops itself (SIGSTOP) before it
// runs the real program in its place. The worker has then started the
// merge's qemu-img step, and the harness acts while it holds there:
// deterministic, however fast the merge would be.
type imgStop struct {
	dir string
}

func (s *imgStop) gate() string    { return filepath.Join(s.dir, "armed") }
func (s *imgStop) pidFile() string { return filepath.Join(s.dir, "stopped") }

// newImgStop writes the qemu-img and prepends its folder to PATH until t
// ends. Only the groups' sequential scenarios run meanwhile (and the
// parallel group's worker started earlier); any other qemu-img call goes
// through unchanged.
func newImgStop(t *testing.T) *imgStop {
	t.Helper()
	real, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "cbtflow-chaos-qemu-img-")
	if err != nil {
		t.Fatal(err)
	}
	s := &imgStop{dir: dir}
	q := func(p string) string { return "'" + strings.ReplaceAll(p, "'", `'\''`) + "'" }
	script := `#!/bin/sh
# The chaos harness's qemu-img (test/chaos/prune_test.go): while armed, the
# first rebase or convert of a merged image stops itself before it runs.
case "$1" in
rebase|convert)
	case "$*" in
	*` + mergeTemp + `*)
		if rm ` + q(s.gate()) + ` 2>/dev/null; then
			echo "$$ $1" >` + q(s.pidFile()+".tmp") + ` && mv ` + q(s.pidFile()+".tmp") + ` ` + q(s.pidFile()) + `
			kill -STOP $$
		fi
		;;
	esac
	;;
esac
exec ` + q(real) + ` "$@"
`
	if err := os.WriteFile(filepath.Join(dir, "qemu-img"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	path := os.Getenv("PATH")
	if err := os.Setenv("PATH", dir+string(os.PathListSeparator)+path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = os.Setenv("PATH", path)
		_ = os.RemoveAll(dir)
	})
	return s
}

func (s *imgStop) arm() error {
	_ = os.Remove(s.pidFile())
	return os.WriteFile(s.gate(), nil, 0o600)
}

func (s *imgStop) disarm() {
	_ = os.Remove(s.gate())
	_ = os.Remove(s.pidFile())
}

// wait waits until a merge's qemu-img has stopped itself, and returns its
// pid and step (rebase or convert).
func (s *imgStop) wait(ctx context.Context) (int, string, error) {
	for {
		if b, err := os.ReadFile(s.pidFile()); err == nil {
			f := strings.Fields(string(b))
			if len(f) == 2 {
				pid, err := strconv.Atoi(f[0])
				if err == nil && state(pid) == 'T' {
					return pid, f[1], nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return 0, "", errors.New("no merge's qemu-img started")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stat returns the fields of /proc/PID/stat after the command name.
func stat(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:]))
}

// state is a process's state letter (R, S, T, Z...), 0 when it is gone.
func state(pid int) byte {
	if f := stat(pid); len(f) > 0 && f[0] != "" {
		return f[0][0]
	}
	return 0
}

// alive reports whether pid runs (neither gone nor a zombie).
func alive(pid int) bool {
	s := state(pid)
	return s != 0 && s != 'Z' && s != 'X'
}

// parentOf is a process's parent pid, 0 when it is gone.
func parentOf(pid int) int {
	if f := stat(pid); len(f) > 1 {
		n, _ := strconv.Atoi(f[1])
		return n
	}
	return 0
}
