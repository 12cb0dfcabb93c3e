package chaos

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

var (
	full   = flag.Bool("full", false, "run every scenario (make chaos); without it, the reduced form that make test runs")
	report = flag.String("report", "", "also write the results table to this file")
	only   = flag.String("group", "", "with -full: run only the groups whose name matches this regular expression (to work on one)")
)

func TestMain(m *testing.M) { stacktest.Main(m) }

// Time limits of one backup: a worker killed where no heartbeat runs is
// noticed only after the activity's start-to-close or heartbeat timeout
// (up to a minute); a persistent read error fails after the transfer's 20
// attempts with back-off up to a minute each.
const (
	backupTimeout     = 6 * time.Minute
	persistentTimeout = 30 * time.Minute
)

// TestChaos runs the fault scenarios and prints the results table. It
// fails when any promise is broken: a backup that did not end, a lost
// change ID, a restore point that does not restore, a snapshot or a
// process left behind.
func TestChaos(t *testing.T) {
	testutil.CheckNoChildren(t)
	if stale, err := UnmountStale(os.TempDir()); err != nil {
		t.Fatal(err)
	} else if len(stale) > 0 {
		t.Logf("unmounted tmpfs left by an earlier run: %v", stale)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 58*time.Minute)
	defer cancel()
	began := time.Now()

	type group struct {
		name     string
		parallel bool // runs next to the sequential groups (it mostly waits)
		run      func(t *testing.T, ctx context.Context) []*Tally
	}
	groups := []group{{"reduced", false, reduced}}
	if *full {
		groups = []group{
			{"kill-worker", false, killWorker},
			{"temporal-restart", false, temporalRestart},
			{"database-cut", false, databaseCut},
			{"source-eio", false, sourceEIO},
			{"repository-full", false, repositoryFull},
			{"snapshot-moref", false, snapshotMoref},
			{"chain-damage", false, chainDamage},
			{"prune", false, pruneFaults},
			{"restore-vm", false, restoreVMKill},
			{"source-eio-persistent", true, persistentEIO},
		}
	}
	if *only != "" {
		re, err := regexp.Compile(*only)
		if err != nil {
			t.Fatalf("-group: %v", err)
		}
		groups = slices.DeleteFunc(groups, func(g group) bool { return !re.MatchString(g.name) })
		if len(groups) == 0 {
			t.Fatalf("-group %q matches no group", *only)
		}
	}
	results := make([][]*Tally, len(groups))
	var mu sync.Mutex
	runGroup := func(t *testing.T, i int) {
		tallies := groups[i].run(t, ctx)
		mu.Lock()
		results[i] = tallies
		mu.Unlock()
	}
	t.Run("scenarios", func(t *testing.T) {
		for i, g := range groups {
			if g.parallel {
				t.Run(g.name, func(t *testing.T) { t.Parallel(); runGroup(t, i) })
			}
		}
		t.Run("sequential", func(t *testing.T) {
			if len(groups) > 1 {
				t.Parallel()
			}
			for i, g := range groups {
				if !g.parallel {
					t.Run(g.name, func(t *testing.T) { runGroup(t, i) })
				}
			}
		})
	})

	var all []*Tally
	for _, ts := range results {
		all = append(all, ts...)
	}
	var buf bytes.Buffer
	if err := WriteTable(&buf, all); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&buf, "chaos: %d scenarios in %s\n", len(all), time.Since(began).Round(time.Second))
	fmt.Print("\n" + buf.String())
	t.Log("\n" + buf.String())
	if *report != "" {
		if err := os.WriteFile(*report, buf.Bytes(), 0o644); err != nil {
			t.Error(err)
		}
	}
	runs := 0
	for _, tl := range all {
		runs += tl.Runs
		if !tl.OK() {
			t.Errorf("scenario %q broke a promise (see the table)", tl.Scenario)
		}
	}
	if *full && *only == "" && runs < 20 {
		t.Errorf("%d backups ran, want at least 20", runs)
	}
}

// tallied returns a tally that records a failure of t it did not see (a
// t.Fatal in the middle of a scenario), so the table never says ok for a
// scenario that did not run to its end.
func tallied(t *testing.T, scenario string) *Tally {
	tl := &Tally{Scenario: scenario}
	t.Cleanup(func() {
		if t.Failed() && len(tl.Problems) == 0 {
			tl.Problems = append(tl.Problems, "the test failed (see its log)")
		}
	})
	return tl
}

// reduced is the form make test runs: a worker killed mid-transfer, the
// database cut during the commit, and a few percent of source reads
// failing, on one VM (full, then two incrementals); then a third
// incremental whose verification is interrupted by a worker kill.
func reduced(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "reduced", eioRate: "5%"})
	const vm = "DC0_H0_VM1"
	kill := tallied(t, "worker SIGKILL at mid-transfer")
	db := tallied(t, "database cut during the commit")
	eio := tallied(t, "source EIO on 5% of reads")
	out := []*Tally{kill, db, eio}

	r := e.backup(kill, "full", vm, 1, 320*MiB, e.killAt(kill, faultpoint.MidTransfer, "TransferDisk"), false, backupTimeout)
	e.check(kill, r)
	r = e.backup(db, "incr-1", vm, 2, 32*MiB, e.cutDatabaseAt(faultpoint.BeforeCommit, "CommitRestorePoint", 3*time.Second), false, backupTimeout)
	e.check(db, r)
	r = e.backup(eio, "incr-2", vm, 3, 256*MiB, e.eio(), false, backupTimeout)
	e.checkRetriedReads(eio, r)
	e.check(eio, r)
	vk := tallied(t, "worker SIGKILL during a verify")
	out = append(out, vk)
	r = e.backup(vk, "incr-3", vm, 4, 32*MiB, nil, false, backupTimeout)
	e.check(vk, r)
	e.verifyKilled(vk, vm)
	return out
}

// killWorker kills the worker at every step boundary, on full and
// incremental backups of every VM.
func killWorker(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "kill"})
	steps := []struct {
		point, activity, vm string
		bytes               int64
	}{
		{faultpoint.MidTransfer, "TransferDisk", vms[0], 256 * MiB},
		// The Backup's StartWorkflow is in the Backup's history, not the
		// BackupVM's: detachedStartOnce checks its rerun.
		{faultpoint.AfterStartWorkflow, "", vms[3], 32 * MiB},
		{faultpoint.AfterSnapshot, "CreateSnapshot", vms[1], 32 * MiB},
		{faultpoint.BeforeCommit, "CommitRestorePoint", vms[2], 32 * MiB},
		{faultpoint.AfterCommit, "CommitRestorePoint", vms[3], 32 * MiB},
		{faultpoint.BeforeRemoveSnapshot, "RemoveSnapshot", vms[0], 32 * MiB},
		{faultpoint.MidTransfer, "TransferDisk", vms[1], 256 * MiB},
		{faultpoint.BeforeCommit, "CommitRestorePoint", vms[0], 32 * MiB},
		{faultpoint.AfterCommit, "CommitRestorePoint", vms[2], 32 * MiB},
	}
	byPoint := map[string]*Tally{}
	var out []*Tally
	for i, s := range steps {
		tl := byPoint[s.point]
		if tl == nil {
			tl = tallied(t, "worker SIGKILL at "+s.point)
			byPoint[s.point] = tl
			out = append(out, tl)
		}
		since := time.Now()
		r := e.backup(tl, fmt.Sprintf("kill-%d", i+1), s.vm, uint64(100+i), s.bytes, e.killAt(tl, s.point, s.activity), false, backupTimeout)
		if s.point == faultpoint.AfterStartWorkflow {
			e.detachedStartOnce(tl, r, since)
		}
		e.check(tl, r)
	}
	// A verification of the two-disk VM's newest point, killed half way.
	tl := tallied(t, "worker SIGKILL during a verify")
	r := e.backup(tl, "kill-verify", vms[0], 120, 32*MiB, nil, false, backupTimeout)
	e.check(tl, r)
	e.verifyKilled(tl, vms[0])
	return append(out, tl)
}

// temporalRestart restarts the Temporal server in the middle of backups:
// gracefully while a transfer copies, with SIGKILL while the commit waits,
// and with SIGKILL while a transfer copies.
func temporalRestart(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "temporal"})
	tl := tallied(t, "Temporal server restart")
	r := e.backup(tl, "temporal-1", vms[0], 200, 256*MiB, e.restartTemporalAt(faultpoint.MidTransfer, false, true), false, backupTimeout)
	e.check(tl, r)
	r = e.backup(tl, "temporal-2", vms[0], 201, 32*MiB, e.restartTemporalAt(faultpoint.BeforeCommit, true, false), false, backupTimeout)
	e.check(tl, r)
	r = e.backup(tl, "temporal-3", vms[2], 202, 256*MiB, e.restartTemporalAt(faultpoint.MidTransfer, true, true), false, backupTimeout)
	e.check(tl, r)
	return []*Tally{tl}
}

// databaseCut takes PostgreSQL away from the worker: when the backup
// begins, and during the commit (short and long).
func databaseCut(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "database"})
	tl := tallied(t, "database cut (start, commit)")
	r := e.backup(tl, "db-1", vms[1], 300, 64*MiB, e.cutDatabaseAtStart(5*time.Second), false, backupTimeout)
	e.check(tl, r)
	r = e.backup(tl, "db-2", vms[1], 301, 32*MiB, e.cutDatabaseAt(faultpoint.BeforeCommit, "CommitRestorePoint", 5*time.Second), false, backupTimeout)
	e.check(tl, r)
	r = e.backup(tl, "db-3", vms[0], 302, 32*MiB, e.cutDatabaseAt(faultpoint.BeforeCommit, "CommitRestorePoint", 20*time.Second), false, backupTimeout)
	e.check(tl, r)
	return []*Tally{tl}
}

// sourceEIO fails 5% of the source's reads with EIO during a full and an
// incremental backup: the copier's retries absorb them.
func sourceEIO(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "eio", eioRate: "5%"})
	tl := tallied(t, "source EIO on 5% of reads")
	for i := range 2 {
		r := e.backup(tl, fmt.Sprintf("eio-%d", i+1), vms[2], uint64(400+i), 256*MiB, e.eio(), false, backupTimeout)
		e.checkRetriedReads(tl, r)
		e.check(tl, r)
	}
	return []*Tally{tl}
}

// persistentEIO fails every source read: the backup must fail cleanly
// (after the transfer's retries), leave the chain restorable, and the
// next backup, with the source healthy again, succeed.
func persistentEIO(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "eio-persistent", eioRate: "100%"})
	tl := tallied(t, "source EIO on every read")
	const vm = "DC0_C0_RP0_VM1"
	r := e.backup(tl, "eiop-1", vm, 500, 16*MiB, nil, false, backupTimeout)
	e.check(tl, r)
	r = e.backup(tl, "eiop-2", vm, 501, 16*MiB, e.eio(), true, persistentTimeout)
	if !strings.Contains(r.out.Error, "Input/output error") {
		e.problem(tl, "%s: failure %q does not name the read error", r.label, r.out.Error)
	}
	if n, _, err := e.attempts(r.out.WorkflowID, "TransferDisk"); err != nil || n < 2 {
		e.problem(tl, "%s: TransferDisk ran %d attempts (%v), want retries before giving up", r.label, n, err)
	} else {
		t.Logf("%s: TransferDisk gave up after %d attempts", r.label, n)
	}
	e.check(tl, r)
	e.reverify(tl, vm)
	r = e.backup(tl, "eiop-3", vm, 502, 16*MiB, nil, false, backupTimeout)
	e.check(tl, r)
	return []*Tally{tl}
}

// repositoryFull puts the repository on a small tmpfs. A backup that
// cannot fit fails before its snapshot (CheckSpace: RepositoryFull, no
// snapshot, nothing written); a repository that fills up during a
// transfer anyway (another writer took the space after the check) fails
// the transfer at once (NoSpace, no retry), its partial image goes, the
// chain stays restorable, and once space is freed the next backup
// succeeds.
func repositoryFull(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "enospc", repoSize: 256 * MiB})
	tl := tallied(t, "repository full (ENOSPC)")
	const vm = "DC0_C0_RP0_VM1"
	r := e.backup(tl, "enospc-1", vm, 600, 32*MiB, nil, false, backupTimeout)
	e.check(tl, r)

	filler := filepath.Join(e.s.Repository(), "filler")
	// Too little space before the backup: refused before the snapshot.
	e.fill(filler, 24*MiB)
	r = e.backup(tl, "enospc-2", vm, 601, 96*MiB, nil, true, backupTimeout)
	if n, typ, err := e.attempts(r.out.WorkflowID, "CheckSpace"); err != nil || n != 1 || typ != activities.ErrTypeRepositoryFull {
		e.problem(tl, "%s: CheckSpace ran %d attempts and failed with type %q (%v), want one attempt failing %s", r.label, n, typ, err, activities.ErrTypeRepositoryFull)
	}
	if n, _, err := e.attempts(r.out.WorkflowID, "CreateSnapshot"); err != nil || n != 0 {
		e.problem(tl, "%s: CreateSnapshot ran %d attempts (%v), want none: the space check comes first", r.label, n, err)
	}
	e.check(tl, r)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}

	// The space taken by another writer in the middle of the transfer.
	g := e.s.FaultPoints()
	fillMid := &fault{
		name: "repository filled mid-transfer",
		arm:  func() error { return g.Arm(faultpoint.MidTransfer) },
		act: func(ictx context.Context) error {
			defer func() { _ = g.Release(faultpoint.MidTransfer) }()
			if _, err := g.Wait(ictx, faultpoint.MidTransfer); err != nil {
				return err
			}
			e.fill(filler, 24*MiB)
			return g.Release(faultpoint.MidTransfer)
		},
		settle: func() { _ = g.Release(faultpoint.MidTransfer) },
	}
	// No new guest data: enospc-2's 96 MiB, never backed up, are what
	// this incremental copies (enough to pass the check, and to hit the
	// full repository half way).
	r = e.backup(tl, "enospc-3", vm, 602, 0, fillMid, true, backupTimeout)
	n, typ, err := e.attempts(r.out.WorkflowID, "TransferDisk")
	if err != nil || n != 1 || typ != activities.ErrTypeNoSpace {
		e.problem(tl, "%s: TransferDisk ran %d attempts and failed with type %q (%v), want one attempt failing %s", r.label, n, typ, err, activities.ErrTypeNoSpace)
	}
	e.check(tl, r)
	e.reverify(tl, vm)

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	r = e.backup(tl, "enospc-4", vm, 603, 0, nil, false, backupTimeout)
	e.check(tl, r)
	return []*Tally{tl}
}

// fill takes all but leave bytes of the repository's free space with one
// file at path.
func (e *env) fill(path string, leave int64) {
	t := e.t
	var st unix.Statfs_t
	if err := unix.Statfs(e.s.Repository(), &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * st.Bsize
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if free <= leave {
		t.Fatalf("the repository has %d bytes free, fewer than the %d to leave", free, leave)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, free-leave); err != nil {
		t.Fatal(err)
	}
}

// checkRetriedReads checks that the EIO filter really failed reads of r
// (the copier retried some).
func (e *env) checkRetriedReads(tl *Tally, r *run) {
	if !r.completed {
		return
	}
	n, err := e.retriedReads(r.out.BackupID)
	switch {
	case err != nil:
		e.problem(tl, "%s: %v", r.label, err)
	case n == 0:
		e.problem(tl, "%s: the copier retried no read: no EIO was injected", r.label)
	default:
		e.t.Logf("%s: the copier retried %d requests", r.label, n)
	}
}
