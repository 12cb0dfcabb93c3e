package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// verifyTimeout bounds a verification whose worker was killed: the dead
// VerifyPoint is noticed within its 30 s heartbeat timeout and retried
// after 5 s.
const verifyTimeout = 6 * time.Minute

// verifications counts the catalog's verifications of a restore point
// and how many of them found it sound.
func (e *env) verifications(ctx context.Context, backupID string) (rows, sound int, err error) {
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		return 0, 0, err
	}
	defer conn.Close(ctx)
	err = conn.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE ok) FROM verifications WHERE backup_id = $1`, backupID).Scan(&rows, &sound)
	return rows, sound, err
}

// verifyKilled verifies the newest restore point of vm (`starter verify
// BACKUP_ID --json`) while the worker is killed with SIGKILL half way
// through a VerifyPoint's re-read of the blocks (MidVerify), then started
// again: the Verify resumes (the killed disk is verified again by a new
// attempt) and completes with the right outcome, sound; the catalog gains
// exactly one verification per disk of the point, none lost to the kill
// and none twice; no qemu-nbd is left.
func (e *env) verifyKilled(tl *Tally, vm string) {
	t := e.t
	t.Helper()
	r := e.newest[vm]
	if r == nil || !r.completed {
		e.problem(tl, "no restore point of %s to verify", vm)
		return
	}
	id := r.out.BackupID
	rowsBefore, soundBefore, err := e.verifications(e.ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	f := e.killAt(tl, faultpoint.MidVerify, "VerifyPoint")
	if err := f.arm(); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	vctx, cancel := context.WithTimeout(e.ctx, verifyTimeout)
	defer cancel()
	run, err := e.s.StartStarter("verify", id, "--json")
	if err != nil {
		t.Fatal(err)
	}
	actErr := f.act(vctx)
	res, err := run.Wait(vctx)
	f.settle()
	if actErr != nil {
		e.problem(tl, "verify %s: the fault was not injected as planned: %v", id, actErr)
	}
	if err != nil {
		e.problem(tl, "verify %s: no final state within %s: %v", id, verifyTimeout, err)
		return
	}
	var out workflows.VerifyResult
	if res.ExitCode != 0 || json.Unmarshal([]byte(res.Stdout), &out) != nil || !out.OK || len(out.Points) != len(r.out.Disks) {
		e.problem(tl, "verify %s after the kill: want exit 0 and every one of its %d disks sound, got %s", id, len(r.out.Disks), res)
	}
	for _, p := range out.Points {
		if p.BackupID != id || !p.OK || !p.BlocksRead || p.CheckedBytes == 0 {
			e.problem(tl, "verify %s after the kill: disk %d: %+v, want its blocks re-read and sound", id, p.Key, p)
		}
	}
	runs := stacktest.ListWorkflows(e.ctx, t, e.s, fmt.Sprintf("WorkflowType = 'Verify' AND CbtflowBackupID = '%s'", id))
	if len(runs) != 1 {
		e.problem(tl, "verify %s: %d Verify workflows, want 1", id, len(runs))
	} else if n, _, err := e.attempts(runs[0].GetExecution().GetWorkflowId(), "VerifyPoint"); err != nil || n < 2 {
		e.problem(tl, "verify %s: VerifyPoint ran %d attempt(s) (%v): the kill did not hit it", id, n, err)
	}
	rows, sound, err := e.verifications(e.ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if rows-rowsBefore != len(r.out.Disks) || sound-soundBefore != len(r.out.Disks) {
		e.problem(tl, "verify %s: the catalog gained %d verifications (%d sound), want one per disk, %d, all sound",
			id, rows-rowsBefore, sound-soundBefore, len(r.out.Disks))
	}
	e.settleProcesses(tl, "after the verification")
	t.Logf("%-28s %-16s verify %s: ok %v in %s", "verify (worker SIGKILL at "+faultpoint.MidVerify+")", vm, id, out.OK,
		time.Since(began).Round(100*time.Millisecond))
}
