package sweep

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
	"github.com/cbtflow/cbtflow/workflows"
)

// The catalog database is dropped while two backups run: one waits to
// commit, the other is mid-transfer and then terminated by an operator.
// The first fails within a minute, naming the catalog, and its failure
// path removes its images and its snapshot although no catalog can say
// which backup they were; the next backup fails at once, before any
// snapshot; the sweeper removes what the terminated one left. Nothing
// retries for long, and no partial image stays in the repository.
func TestCatalogDroppedMidBackup(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	const vmCommit, vmKilled = "DC0_H0_VM0", "DC0_C0_RP0_VM0"
	l := s.Lab()
	// Enough data that a copy outlasts the copier's progress interval, so
	// the mid-transfer fault point is reached.
	for i, name := range []string{vmCommit, vmKilled} {
		disks, err := l.Disks(name)
		if err != nil || len(disks) == 0 {
			t.Fatalf("lab VM %s: %v %v", name, disks, err)
		}
		for off := int64(0); off < 320<<20; off += 32 << 20 {
			stacktest.WriteDisk(t, l, name, disks[0].Key, off, stacktest.Pattern(uint64(50+i)+uint64(off), 32<<20))
		}
	}
	gates := s.FaultPoints()
	start := func(name, point string) (backupID, workflowID string) {
		t.Helper()
		if err := gates.Arm(point); err != nil {
			t.Fatal(err)
		}
		r := starter(ctx, t, s, "backup", name, "--json")
		var started struct {
			BackupID   string `json:"backup_id"`
			WorkflowID string `json:"workflow_id"`
		}
		if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &started) != nil || started.BackupID == "" {
			t.Fatalf("starting the backup of %s: %s", name, r)
		}
		wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
		defer wcancel()
		if _, err := gates.Wait(wctx, point); err != nil {
			t.Fatal(err)
		}
		return started.BackupID, started.WorkflowID
	}
	idCommit, widCommit := start(vmCommit, faultpoint.BeforeCommit)
	idKilled, widKilled := start(vmKilled, faultpoint.MidTransfer)
	if len(stacktest.FilesOf(t, s.Repository(), idCommit)) == 0 || len(stacktest.FilesOf(t, s.Repository(), idKilled)) == 0 {
		t.Fatalf("the held backups have no images yet")
	}

	// The operator's bad day: the backup of vmKilled is terminated (no
	// cleanup code runs), and the catalog database is dropped.
	if err := s.Client().TerminateWorkflow(ctx, widKilled, "", "test: terminated by an operator"); err != nil {
		t.Fatal(err)
	}
	dropDatabase(ctx, t, s.DatabaseURL())
	if err := gates.Release(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the terminated transfer to stop its NBD servers", func() bool {
		for _, p := range stack.Descendants(s.WorkerPID()) {
			if strings.Contains(p.Cmd, idKilled) {
				return false
			}
		}
		return true
	})

	// The held commit fails at once, naming the catalog; its cleanup runs.
	released := time.Now()
	if err := gates.Release(faultpoint.BeforeCommit); err != nil {
		t.Fatal(err)
	}
	err := s.Client().GetWorkflow(ctx, widCommit, "").Get(ctx, nil)
	took := time.Since(released)
	var app *temporal.ApplicationError
	if !errors.As(err, &app) || app.Type() != activities.ErrTypeCatalogUnusable || !strings.Contains(err.Error(), "catalog database") {
		t.Errorf("the backup waiting to commit ended with %v, want a CatalogUnusable failure naming the catalog", err)
	}
	if took > time.Minute {
		t.Errorf("the backup took %s to fail after its commit began, want under a minute", took)
	}
	t.Logf("commit into a dropped catalog failed after %s", took.Round(time.Millisecond))
	if files := stacktest.FilesOf(t, s.Repository(), idCommit); len(files) != 0 {
		t.Errorf("the failed backup left files in the repository: %v", files)
	}
	for _, sn := range snapshots(ctx, t, s) {
		if sn == activities.SnapshotPrefix+idCommit {
			t.Errorf("the failed backup left its snapshot %s", sn)
		}
	}

	// The next backup fails fast, before it takes a snapshot.
	began := time.Now()
	r := starter(ctx, t, s, "backup", vmCommit, "--wait", "--json")
	var b stacktest.BackupJSON
	if r.ExitCode != 1 || stacktest.DecodeOne(r.Stdout, &b) != nil || !strings.Contains(b.Error, "catalog database") {
		t.Errorf("a backup with the catalog gone: %s; want exit 1 naming the catalog", r)
	}
	if d := time.Since(began); d > time.Minute {
		t.Errorf("a backup with the catalog gone took %s to fail, want under a minute", d)
	}
	for _, sn := range snapshots(ctx, t, s) {
		if !strings.HasSuffix(sn, idKilled) {
			t.Errorf("a backup with the catalog gone left snapshot %s", sn)
		}
	}

	// The sweeper removes what the terminated backup left: its snapshot
	// and its partial image (its working folder proves it uncommitted).
	if files := stacktest.FilesOf(t, s.Repository(), idKilled); len(files) == 0 {
		t.Fatalf("before the sweep: the terminated backup left nothing to sweep")
	}
	r = starter(ctx, t, s, "sweep", "--min-age", "0")
	var res workflows.SweepResult
	if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &res) != nil {
		t.Fatalf("starter sweep --min-age 0: %s", r)
	}
	if files := stacktest.FilesOf(t, s.Repository(), idKilled); len(files) != 0 {
		t.Errorf("after the sweep: files of the terminated backup remain: %v (sweep %+v)", files, res)
	}
	if got := snapshots(ctx, t, s); len(got) != 0 {
		t.Errorf("after the sweep: snapshots %v remain", got)
	}
	if left := s.Leftovers(); len(left) > 0 {
		t.Errorf("processes left: %v", left)
	}
}

// dropDatabase drops the stack's catalog database under the running
// worker (closing its connections), as an operator's mistake would.
func dropDatabase(ctx context.Context, t *testing.T, url string) {
	t.Helper()
	conn, err := pgx.Connect(ctx, testutil.AdminDatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "DROP DATABASE "+pgx.Identifier{cfg.Database}.Sanitize()+" WITH (FORCE)"); err != nil {
		t.Fatal(err)
	}
}
