package workflows_test

import (
	"log/slog"
	"path/filepath"
	"testing"

	tlog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/workflows"
)

// TestReplayRecordedHistories replays histories of completed runs recorded
// by the end-to-end test (go test ./internal/e2e -run TestEndToEnd
// -update): a change to the workflows that would not replay them — a
// different sequence of commands without workflow.GetVersion — fails here
// before it breaks running backups.
func TestReplayRecordedHistories(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 3 {
		t.Fatalf("want the recorded histories of BackupVM (full, incremental) and Backup in testdata, found %v", files)
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
}
