package main

import (
	"context"

	commonpb "go.temporal.io/api/common/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/converter"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/workflows"
)

// writeVMActivity is WriteVMDisk's activity type (its method name).
const writeVMActivity = "WriteVMDisk"

// completeRestoreVM returns a RestoreVM's p with its running
// WriteVMDisk's latest heartbeat added (stage, mode, bytes, rate), read
// with one DescribeWorkflowExecution as for a backup's transfers; p as
// it is when the server does not answer.
func (l *liveProgress) completeRestoreVM(ctx context.Context, namespace, workflowID, runID string, p workflows.RestoreVMProgress) workflows.RestoreVMProgress {
	if !p.Writing() {
		return p
	}
	desc, err := l.c.WorkflowService().DescribeWorkflowExecution(ctx, &workflowservice.DescribeWorkflowExecutionRequest{
		Namespace: namespace, Execution: &commonpb.WorkflowExecution{WorkflowId: workflowID, RunId: runID}})
	if err != nil {
		l.warn("progress: describe failed; answering without the restore's figures", "workflow", workflowID, "error", err)
		return p
	}
	dc := converter.GetDefaultDataConverter()
	for _, a := range desc.GetPendingActivities() {
		if a.GetActivityType().GetName() != writeVMActivity || a.GetHeartbeatDetails() == nil {
			continue
		}
		var b activities.VMRestoreProgress
		if err := dc.FromPayloads(a.GetHeartbeatDetails(), &b); err != nil || b.Stage == "" {
			continue
		}
		p.ApplyVMRestore(b)
	}
	return p
}
