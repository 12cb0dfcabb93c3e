package workflows_test

import (
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	tlog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/workflows"
)

// recordedCases are the cases of the recorded histories in testdata, each
// in files <case>_v<N>.json, one per version of the case's commands. Every
// case must have at least one file.
var recordedCases = []string{
	"backup",               // a Backup (ResolveVM, the BackupVM child), detached as the starter starts it
	"backup_waiting",       // a Backup that waits for its BackupVM's result (the Web UI's, a schedule's)
	"backup_skipped",       // a Backup with skip_if_running while a backup of its VM runs: nothing started
	"backupvm_full",        // a full BackupVM of a VM with two disks
	"backupvm_incremental", // an incremental one
	"backupvm_cbt_reset",   // an incremental whose stored change IDs were refused: full with a warning
	"backupvm_failed",      // a BackupVM that failed (its snapshot moref named another snapshot)
	"backupvm_canceled",    // a BackupVM canceled in the middle of a transfer
	"sweep",                // a Sweep that removed a terminated backup's snapshot and failed its backup
	"prune",                // a Prune of one VM (PlanPrune, the PruneVM child)
	"prunevm",              // a PruneVM that merged two removed points into the kept one and removed them
	"restore",              // a Restore of one disk into a file where the worker runs
	"verify",               // a Verify of a restore point's two disks, both sound
	"verify_failed",        // a Verify of a restore point the catalog does not have: PlanVerify fails
	"export",               // an Export of one disk served over NBD, then stopped (canceled)
	"restorevm",            // a RestoreVM of a one-disk VM's backup into the powered-off VM
}

// recordCommand records the histories (new versions only; see
// test/histories).
const recordCommand = "go test -tags cbtflow_faultpoints ./test/histories -update"

var versioned = regexp.MustCompile(`^(.+)_v([1-9][0-9]*)\.json$`)

// TestReplayRecordedHistories replays every history recorded in testdata
// (by test/histories: go test -tags cbtflow_faultpoints ./test/histories
// -update) on the current workflows, registered as the worker registers
// them: a change to a workflow that would not replay one of them — a
// different sequence of commands without workflow.GetVersion — fails here
// before it breaks running backups. Files are never overwritten: a case
// gains a file <case>_v<N+1>.json when its commands change, and the old
// versions must keep replaying as long as a run of them can exist.
//
// backup_v1.json is a Backup recorded before the per-VM workflow ID named
// the vCenter by its instance UUID (its child runs as
// backup/<profile>/<vm uuid>); backup_v2.json one recorded after
// (backup/<vcenter uuid>/<vm uuid>, behind GetVersion
// "vcenter-workflow-id").
func TestReplayRecordedHistories(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	versions := map[string][]int{}
	for _, f := range files {
		m := versioned.FindStringSubmatch(filepath.Base(f))
		if m == nil || !slices.Contains(recordedCases, m[1]) {
			t.Errorf("%s: not a recorded history <case>_v<N>.json of a known case %v", f, recordedCases)
			continue
		}
		n, _ := strconv.Atoi(m[2])
		versions[m[1]] = append(versions[m[1]], n)
	}
	for _, c := range recordedCases {
		if len(versions[c]) == 0 {
			t.Errorf("no recorded history of case %q in testdata (want %s_v1.json): record it with %s", c, c, recordCommand)
		}
	}

	logger := tlog.NewStructuredLogger(slog.New(slog.DiscardHandler))
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			r := worker.NewWorkflowReplayer()
			workflows.Register(r)
			if err := r.ReplayWorkflowHistoryFromJSONFile(logger, f); err != nil {
				t.Fatalf("%s no longer replays: %v", f, err)
			}
		})
	}

	// The first two Backup histories are the two versions of the child's
	// ID.
	uuid := `[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`
	for file, want := range map[string]*regexp.Regexp{
		"backup_v1.json": regexp.MustCompile(`^backup/lab/` + uuid + `$`),
		"backup_v2.json": regexp.MustCompile(`^backup/` + uuid + `/` + uuid + `$`),
	} {
		fh, err := os.Open(filepath.Join("testdata", file))
		if err != nil {
			t.Fatal(err)
		}
		h, err := client.HistoryFromJSON(fh, client.HistoryJSONOptions{})
		fh.Close()
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		var children []string
		for _, ev := range h.GetEvents() {
			if ev.GetEventType() == enumspb.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED {
				children = append(children, ev.GetStartChildWorkflowExecutionInitiatedEventAttributes().GetWorkflowId())
			}
		}
		if len(children) != 1 || !want.MatchString(children[0]) {
			t.Errorf("%s starts children %v, want one matching %s", file, children, want)
		}
	}
}

// The replay above can fail: a Sweep that no longer removes the
// snapshots it finds (one activity fewer, no GetVersion) does not replay
// the recorded sweep.
func TestReplayFailsOnChangedCommands(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "sweep_v*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no recorded sweep (%v): record it with %s", err, recordCommand)
	}
	changed := func(ctx workflow.Context, in workflows.SweepInput) (*workflows.SweepResult, error) {
		ctx = workflow.WithActivityOptions(ctx, workflow.ActivityOptions{StartToCloseTimeout: time.Minute})
		var orphans activities.FindOrphansResult
		if err := workflow.ExecuteActivity(ctx, "FindOrphans", activities.FindOrphansInput{}).Get(ctx, &orphans); err != nil {
			return nil, err
		}
		return &workflows.SweepResult{}, nil
	}
	for _, f := range files {
		r := worker.NewWorkflowReplayer()
		r.RegisterWorkflowWithOptions(changed, workflow.RegisterOptions{Name: "Sweep"})
		err := r.ReplayWorkflowHistoryFromJSONFile(tlog.NewStructuredLogger(slog.New(slog.DiscardHandler)), f)
		if err == nil {
			t.Errorf("%s replays on a Sweep with one activity fewer", f)
		} else {
			t.Logf("%s on a changed Sweep: %v", filepath.Base(f), err)
		}
	}
}
