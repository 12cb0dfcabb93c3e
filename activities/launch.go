package activities

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	taskqueuepb "go.temporal.io/api/taskqueue/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
)

// Launcher starts a workflow for a workflow, as a local activity: a
// Backup that need not wait for its BackupVM starts it so and ends in its
// first workflow task, where a child's start takes a second one (and a
// transfer task of the server's) to learn that the child started.
type Launcher struct {
	// Service is the Temporal client's WorkflowService
	// (client.Client.WorkflowService()): the start names its request ID,
	// which the SDK's ExecuteWorkflow does not let a caller choose.
	Service workflowservice.WorkflowServiceClient
	// Namespace is the worker's.
	Namespace string
	// Identity names the starter in the started workflow's history.
	Identity string
}

// StartWorkflowInput is one workflow to start.
type StartWorkflowInput struct {
	WorkflowID   string `json:"workflow_id"`
	WorkflowType string `json:"workflow_type"`
	TaskQueue    string `json:"task_queue"`
	// Arg is the workflow's one argument, as JSON.
	Arg json.RawMessage `json:"arg"`
	// Keywords are its search attributes, each of type Keyword.
	Keywords map[string]string `json:"keywords,omitempty"`
	// Memo is its memo (shown by the Web UI and `temporal workflow
	// describe`).
	Memo map[string]string `json:"memo,omitempty"`
	// RequestID makes the start idempotent: another start with the same
	// ID, while the workflow ID's latest run is the one it started
	// (running or closed), starts nothing and returns that run. It is what
	// a start whose result was lost (its workflow task lost with the
	// worker that ran it, so run again) finds. Required.
	RequestID string `json:"request_id"`
}

// StartWorkflowResult is the run started (or found started by the same
// request), or the run of the workflow ID that runs already.
type StartWorkflowResult struct {
	RunID string `json:"run_id"`
	// Running: nothing was started; RunID is the run that another request
	// started and that runs. (A result, not an error: a VM whose backup
	// runs is no failure of the worker's, and its metrics and alerts
	// count failed activities.)
	Running bool `json:"running,omitempty"`
}

// StartWorkflow starts in.WorkflowType under in.WorkflowID when no run of
// that ID runs (a closed one's ID is reused), and returns the new run's
// ID, or, when the ID's latest run was started by the same request, that
// run's. A run of the ID started otherwise that runs is returned as
// Running.
func (l *Launcher) StartWorkflow(ctx context.Context, in StartWorkflowInput) (*StartWorkflowResult, error) {
	if in.WorkflowID == "" || in.WorkflowType == "" || in.TaskQueue == "" || in.RequestID == "" {
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("StartWorkflow needs a workflow ID, type, task queue and request ID (got %q, %q, %q, %q)",
				in.WorkflowID, in.WorkflowType, in.TaskQueue, in.RequestID), ErrTypeInvalidInput, nil)
	}
	dc := converter.GetDefaultDataConverter()
	arg, err := dc.ToPayloads(in.Arg)
	if err != nil {
		return nil, temporal.NewNonRetryableApplicationError("StartWorkflow: its argument: "+err.Error(), ErrTypeInvalidInput, err)
	}
	req := &workflowservice.StartWorkflowExecutionRequest{
		Namespace:             l.Namespace,
		WorkflowId:            in.WorkflowID,
		WorkflowType:          &commonpb.WorkflowType{Name: in.WorkflowType},
		TaskQueue:             &taskqueuepb.TaskQueue{Name: in.TaskQueue, Kind: enumspb.TASK_QUEUE_KIND_NORMAL},
		Input:                 arg,
		Identity:              l.Identity,
		RequestId:             in.RequestID,
		WorkflowIdReusePolicy: enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		// A running one is refused, never joined nor terminated.
		WorkflowIdConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_FAIL,
	}
	keywords, err := stringPayloads(in.Keywords, "search attribute", "Keyword")
	if err != nil {
		return nil, err
	}
	if keywords != nil {
		req.SearchAttributes = &commonpb.SearchAttributes{IndexedFields: keywords}
	}
	memo, err := stringPayloads(in.Memo, "memo", "")
	if err != nil {
		return nil, err
	}
	if memo != nil {
		req.Memo = &commonpb.Memo{Fields: memo}
	}
	resp, err := l.Service.StartWorkflowExecution(ctx, req)
	if err == nil {
		faultpoint.Hold(ctx, faultpoint.AfterStartWorkflow)
		return &StartWorkflowResult{RunID: resp.GetRunId()}, nil
	}
	var running *serviceerror.WorkflowExecutionAlreadyStarted
	var invalid *serviceerror.InvalidArgument
	var noNamespace *serviceerror.NamespaceNotFound
	var denied *serviceerror.PermissionDenied
	switch {
	case errors.As(err, &running):
		return &StartWorkflowResult{RunID: running.RunId, Running: true}, nil
	case errors.As(err, &invalid), errors.As(err, &noNamespace), errors.As(err, &denied):
		// A namespace without cbtflow's search attributes, say: no retry
		// changes that.
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("Temporal refuses to start workflow %s: %v", in.WorkflowID, err), ErrTypeInvalidInput, err)
	}
	return nil, err
}

// stringPayloads encodes the strings of m as payloads (nil for none),
// each marked with its search attribute type when saType is set, as the
// SDK's typed search attributes mark theirs; what names m in an error.
func stringPayloads(m map[string]string, what, saType string) (map[string]*commonpb.Payload, error) {
	if len(m) == 0 {
		return nil, nil
	}
	out := make(map[string]*commonpb.Payload, len(m))
	for k, v := range m {
		p, err := converter.GetDefaultDataConverter().ToPayload(v)
		if err != nil {
			return nil, temporal.NewNonRetryableApplicationError("StartWorkflow: "+what+" "+k+": "+err.Error(), ErrTypeInvalidInput, err)
		}
		if saType != "" {
			p.Metadata["type"] = []byte(saType)
		}
		out[k] = p
	}
	return out, nil
}
