package workflows_test

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	tlog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/workflows"
)

// A Backup started with no profile before the default came from the
// worker's configuration asked ResolveVM with "lab" (the old built-in
// default) and got it back; now the workflow asks with no profile and
// keeps the one ResolveVM answers with. Replay does not compare an
// activity's input, so such a run must replay on the new code, to the
// same child under the same profile: here the recorded Backup with the
// profile removed from its start input, as the Web UI's {"vm": ...}
// would have started it.
func TestReplayBackupStartedWithoutProfile(t *testing.T) {
	f, err := os.Open(filepath.Join("testdata", "backup_v2.json"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := client.HistoryFromJSON(f, client.HistoryJSONOptions{})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	started := h.GetEvents()[0]
	if started.GetEventType() != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED {
		t.Fatalf("first event is %v", started.GetEventType())
	}
	p := started.GetWorkflowExecutionStartedEventAttributes().GetInput().GetPayloads()[0]
	var in map[string]any
	if err := json.Unmarshal(p.GetData(), &in); err != nil {
		t.Fatal(err)
	}
	if in["profile"] != "lab" {
		t.Fatalf("recorded input %v, want profile lab", in)
	}
	delete(in, "profile")
	if p.Data, err = json.Marshal(in); err != nil {
		t.Fatal(err)
	}
	r := worker.NewWorkflowReplayer()
	r.RegisterWorkflow(workflows.Backup)
	r.RegisterWorkflow(workflows.BackupVM)
	if err := r.ReplayWorkflowHistory(tlog.NewStructuredLogger(slog.New(slog.DiscardHandler)), h); err != nil {
		t.Fatalf("a Backup started without a profile no longer replays: %v", err)
	}
}
