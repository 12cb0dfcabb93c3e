package workflows_test

import (
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	tlog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/workflows"
)

// TestReplayRecordedHistories replays histories of completed runs recorded
// by the end-to-end test (go test ./test/e2e -run TestEndToEnd
// -update): a change to the workflows that would not replay them — a
// different sequence of commands without workflow.GetVersion — fails here
// before it breaks running backups.
//
// backup.json is a Backup recorded before the per-VM workflow ID named
// the vCenter by its instance UUID (its child runs as
// backup/<profile>/<vm uuid>); backup_vcenter_id.json one recorded after
// (backup/<vcenter uuid>/<vm uuid>). Both must replay; -update rewrites
// only the second.
func TestReplayRecordedHistories(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 4 {
		t.Fatalf("want the recorded histories of BackupVM (full, incremental) and Backup (before and after the vCenter workflow ID) in testdata, found %v", files)
	}
	logger := tlog.NewStructuredLogger(slog.New(slog.DiscardHandler))
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			r := worker.NewWorkflowReplayer()
			r.RegisterWorkflow(workflows.Backup)
			r.RegisterWorkflow(workflows.BackupVM)
			if err := r.ReplayWorkflowHistoryFromJSONFile(logger, f); err != nil {
				t.Fatalf("%s no longer replays: %v", f, err)
			}
		})
	}

	// The two Backup histories are the two versions of the child's ID.
	uuid := `[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`
	for file, want := range map[string]*regexp.Regexp{
		"backup.json":            regexp.MustCompile(`^backup/lab/` + uuid + `$`),
		"backup_vcenter_id.json": regexp.MustCompile(`^backup/` + uuid + `/` + uuid + `$`),
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
