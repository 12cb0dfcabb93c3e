package activities_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// StartWorkflow on a real Temporal dev server (no worker: the started
// workflows wait): a start again with the same request ID finds the run it
// started, running or closed, and starts nothing; one with another request
// ID is refused while that run runs, naming it, and starts a new run once
// it is closed; the run carries the search attributes and the memo asked
// for.
func TestStartWorkflow(t *testing.T) {
	s := stacktest.New(t, stack.Options{NoWorker: true})
	c := s.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := &activities.Launcher{Service: c.WorkflowService(), Namespace: stack.Namespace, Identity: "launch-test"}
	in := func(request string) activities.StartWorkflowInput {
		return activities.StartWorkflowInput{
			WorkflowID: "launch-test/vm", WorkflowType: "BackupVM", TaskQueue: "launch-test",
			Arg:       json.RawMessage(`{"profile":"lab","vm_uuid":"u-1","backup_id":"` + request + `"}`),
			Keywords:  map[string]string{workflows.SearchBackupID.GetName(): request, workflows.SearchVM.GetName(): "vm one"},
			Memo:      map[string]string{"started_by": "backup-" + request},
			RequestID: request,
		}
	}
	first, err := l.StartWorkflow(ctx, in("b1"))
	if err != nil || first == nil || first.RunID == "" {
		t.Fatalf("the first start: %+v, %v", first, err)
	}
	if again, err := l.StartWorkflow(ctx, in("b1")); err != nil || again == nil || again.Running || again.RunID != first.RunID {
		t.Fatalf("the same request again while its run runs: %+v, %v, want run %s", again, err, first.RunID)
	}
	if other, err := l.StartWorkflow(ctx, in("b2")); err != nil || other == nil || !other.Running || other.RunID != first.RunID {
		t.Fatalf("another request while the run runs: %+v, %v, want it running, run %s", other, err, first.RunID)
	}

	desc, err := c.DescribeWorkflow(ctx, "launch-test/vm", first.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if id, _ := desc.TypedSearchAttributes.GetKeyword(workflows.SearchBackupID); id != "b1" {
		t.Errorf("the run's CbtflowBackupID: %q, want b1", id)
	}
	if vm, _ := desc.TypedSearchAttributes.GetKeyword(workflows.SearchVM); vm != "vm one" {
		t.Errorf("the run's CbtflowVM: %q, want vm one", vm)
	}
	var by string
	if f := desc.RawResponse.GetWorkflowExecutionInfo().GetMemo().GetFields()["started_by"]; f == nil || json.Unmarshal(f.GetData(), &by) != nil || by != "backup-b1" {
		t.Errorf("the run's memo started_by: %q, want backup-b1", by)
	}
	var arg map[string]string
	hist := c.GetWorkflowHistory(ctx, "launch-test/vm", first.RunID, false, 0)
	ev, err := hist.Next()
	if err != nil {
		t.Fatal(err)
	}
	a := ev.GetWorkflowExecutionStartedEventAttributes()
	if err := json.Unmarshal(a.GetInput().GetPayloads()[0].GetData(), &arg); err != nil || arg["backup_id"] != "b1" || a.GetWorkflowType().GetName() != "BackupVM" {
		t.Errorf("the run's start: type %s, argument %s (%v), want BackupVM with backup_id b1", a.GetWorkflowType().GetName(), a.GetInput().GetPayloads()[0].GetData(), err)
	}

	// Closed: the same request still finds it; another starts anew.
	if err := c.TerminateWorkflow(ctx, "launch-test/vm", first.RunID, "test"); err != nil {
		t.Fatal(err)
	}
	if again, err := l.StartWorkflow(ctx, in("b1")); err != nil || again == nil || again.Running || again.RunID != first.RunID {
		t.Fatalf("the same request again after its run closed: %+v, %v, want run %s and no new one", again, err, first.RunID)
	}
	second, err := l.StartWorkflow(ctx, in("b2"))
	if err != nil || second == nil || second.Running || second.RunID == "" || second.RunID == first.RunID {
		t.Fatalf("another request after the run closed: %+v, %v, want a new run", second, err)
	}
	// The dedup's limit: once another request's run is the ID's latest,
	// the first request no longer finds its own (see workflows'
	// startDetached).
	if again, err := l.StartWorkflow(ctx, in("b1")); err != nil || again == nil || !again.Running || again.RunID != second.RunID {
		t.Fatalf("the first request again while another's run runs: %+v, %v, want that run, %s, running", again, err, second.RunID)
	}
	if err := c.TerminateWorkflow(ctx, "launch-test/vm", second.RunID, "test"); err != nil {
		t.Fatal(err)
	}

	var app *temporal.ApplicationError
	if _, err := l.StartWorkflow(ctx, activities.StartWorkflowInput{WorkflowID: "launch-test/vm", WorkflowType: "BackupVM", TaskQueue: "launch-test"}); !errors.As(err, &app) || app.Type() != activities.ErrTypeInvalidInput || !app.NonRetryable() {
		t.Errorf("a start without a request ID: %v, want %s", err, activities.ErrTypeInvalidInput)
	}
	bad := in("b3")
	bad.Keywords = map[string]string{"NotACbtflowAttribute": "x"}
	if _, err := l.StartWorkflow(ctx, bad); !errors.As(err, &app) || app.Type() != activities.ErrTypeInvalidInput || !app.NonRetryable() {
		t.Errorf("a start with an unknown search attribute: %v, want %s", err, activities.ErrTypeInvalidInput)
	}
}
