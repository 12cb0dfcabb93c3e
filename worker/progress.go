package main

import (
	"context"
	"log/slog"
	"sync"
	"time"

	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/workflows"
)

// progressTimeout bounds the describe of one progress query. Queries run
// while the worker holds the workflow (those that come with a workflow
// task are answered before it completes): a slow server must not make
// them, or the task, wait.
const progressTimeout = time.Second

// describeMaxAge is how long a describe serves the queries of one run:
// the heartbeats it reads are sent every second anyway, and several
// watchers of one backup cost the server one describe per second.
const describeMaxAge = time.Second

// warnEvery bounds the warnings of failed describes (a server that is
// down would otherwise log one per query).
const warnEvery = time.Minute

// transferActivity is TransferDisk's activity type (its method name),
// restoreActivity RestoreDisk's.
const (
	transferActivity  = "TransferDisk"
	transfersActivity = "TransferDisks"
	restoreActivity   = "RestoreDisk"
	verifyActivity    = "VerifyPoint"
	exportActivity    = "ServeExport"
)

// liveProgress completes the answers of the workflows' progress query
// with what only the server knows: the latest heartbeat details of the
// running transfers (bytes done, rate, stage), which the server keeps
// for a pending activity. Workflow code cannot read them (it does no
// I/O), and progress sent as signals would grow the workflow's history
// with the size of the disk; this costs one DescribeWorkflowExecution
// per query. (A Backup's answer names its BackupVM, whose query clients
// ask next: a query that queried another workflow would hold a workflow
// task of this worker while it waits for another, and could wait for
// itself.) A Restore's answer gets its running RestoreDisk's heartbeat
// the same way, and a Verify's its running VerifyPoint's.
type liveProgress struct {
	interceptor.WorkerInterceptorBase
	c   client.Client
	log *slog.Logger

	mu       sync.Mutex
	beats    map[string]describedBeats // by run ID
	lastWarn time.Time
}

// describedBeats are the transfers' heartbeats a describe found (and a
// restore's), and when.
type describedBeats struct {
	at      time.Time
	beats   []activities.TransferProgress
	restore *activities.RestoreProgress
	verify  *activities.VerifyProgress
	// export is a running ServeExport's heartbeat (nil while its
	// attempt is not running: between retries the URI serves nothing).
	export *activities.ExportProgress
}

func newLiveProgress(c client.Client, log *slog.Logger) *liveProgress {
	return &liveProgress{c: c, log: log, beats: map[string]describedBeats{}}
}

func (l *liveProgress) InterceptWorkflow(ctx workflow.Context, next interceptor.WorkflowInboundInterceptor) interceptor.WorkflowInboundInterceptor {
	return &liveProgressInbound{WorkflowInboundInterceptorBase: interceptor.WorkflowInboundInterceptorBase{Next: next}, l: l}
}

type liveProgressInbound struct {
	interceptor.WorkflowInboundInterceptorBase
	l *liveProgress
}

func (i *liveProgressInbound) HandleQuery(ctx workflow.Context, in *interceptor.HandleQueryInput) (any, error) {
	res, err := i.Next.HandleQuery(ctx, in)
	if err != nil || in.QueryType != workflows.QueryProgress {
		return res, err
	}
	info := workflow.GetInfo(ctx)
	switch p := res.(type) {
	case workflows.Progress:
		qctx, cancel := context.WithTimeout(context.Background(), progressTimeout)
		defer cancel()
		return i.l.complete(qctx, info.Namespace, info.WorkflowExecution.ID, info.WorkflowExecution.RunID, p), nil
	case workflows.RestoreVMProgress:
		qctx, cancel := context.WithTimeout(context.Background(), progressTimeout)
		defer cancel()
		return i.l.completeRestoreVM(qctx, info.Namespace, info.WorkflowExecution.ID, info.WorkflowExecution.RunID, p), nil
	case workflows.RestoreProgress:
		qctx, cancel := context.WithTimeout(context.Background(), progressTimeout)
		defer cancel()
		return i.l.completeRestore(qctx, info.Namespace, info.WorkflowExecution.ID, info.WorkflowExecution.RunID, p), nil
	case workflows.VerifyProgress:
		qctx, cancel := context.WithTimeout(context.Background(), progressTimeout)
		defer cancel()
		return i.l.completeVerify(qctx, info.Namespace, info.WorkflowExecution.ID, info.WorkflowExecution.RunID, p), nil
	case workflows.ExportProgress:
		qctx, cancel := context.WithTimeout(context.Background(), progressTimeout)
		defer cancel()
		return i.l.completeExport(qctx, info.Namespace, info.WorkflowExecution.ID, info.WorkflowExecution.RunID, p), nil
	}
	return res, nil
}

// completeRestore returns a Restore's p with its RestoreDisk's latest
// heartbeat added; p as it is when the server does not answer.
func (l *liveProgress) completeRestore(ctx context.Context, namespace, workflowID, runID string, p workflows.RestoreProgress) workflows.RestoreProgress {
	if !p.Running() {
		return p
	}
	d, err := l.describe(ctx, namespace, workflowID, runID)
	if err != nil {
		l.warn("progress: describe failed; answering without the restore's figures", "workflow", workflowID, "error", err)
		return p
	}
	if d.restore != nil {
		p.ApplyRestore(*d.restore)
	}
	return p
}

// completeVerify returns a Verify's p with its running VerifyPoint's
// latest heartbeat added (stage, bytes, rate); p as it is when the
// server does not answer.
func (l *liveProgress) completeVerify(ctx context.Context, namespace, workflowID, runID string, p workflows.VerifyProgress) workflows.VerifyProgress {
	if !p.Running() {
		return p
	}
	d, err := l.describe(ctx, namespace, workflowID, runID)
	if err != nil {
		l.warn("progress: describe failed; answering without the verification's figures", "workflow", workflowID, "error", err)
		return p
	}
	if d.verify != nil {
		p.ApplyVerify(*d.verify)
	}
	return p
}

// completeExport returns an Export's p with its ServeExport's latest
// heartbeat added (the URI); p as it is when the server does not answer.
func (l *liveProgress) completeExport(ctx context.Context, namespace, workflowID, runID string, p workflows.ExportProgress) workflows.ExportProgress {
	if !p.Running() {
		return p
	}
	d, err := l.describe(ctx, namespace, workflowID, runID)
	if err != nil {
		l.warn("progress: describe failed; answering without the export's URI", "workflow", workflowID, "error", err)
		return p
	}
	if d.export != nil {
		p.ApplyExport(*d.export)
	}
	return p
}

// complete returns p with the live figures added; p as it is when the
// server does not answer (progress is informative: the query still
// answers what the workflow knows).
func (l *liveProgress) complete(ctx context.Context, namespace, workflowID, runID string, p workflows.Progress) workflows.Progress {
	if p.Phase.Final() {
		return p
	}
	transferring := false
	for _, d := range p.Disks {
		transferring = transferring || d.Phase == workflows.DiskTransferring || d.Phase == workflows.DiskVerifying
	}
	if !transferring {
		return p
	}
	d, err := l.describe(ctx, namespace, workflowID, runID)
	if err != nil {
		l.warn("progress: describe failed; answering without the transfers' figures", "workflow", workflowID, "error", err)
		return p
	}
	p.ApplyTransfers(d.beats)
	return p
}

// describe returns the latest heartbeats of the run's pending transfers
// (and of its pending restore), from a describe at most describeMaxAge
// old.
func (l *liveProgress) describe(ctx context.Context, namespace, workflowID, runID string) (describedBeats, error) {
	now := time.Now()
	l.mu.Lock()
	if d, ok := l.beats[runID]; ok && now.Sub(d.at) < describeMaxAge {
		l.mu.Unlock()
		return d, nil
	}
	for id, d := range l.beats {
		if now.Sub(d.at) > time.Minute {
			delete(l.beats, id)
		}
	}
	l.mu.Unlock()
	desc, err := l.c.WorkflowService().DescribeWorkflowExecution(ctx, &workflowservice.DescribeWorkflowExecutionRequest{
		Namespace: namespace, Execution: &commonpb.WorkflowExecution{WorkflowId: workflowID, RunId: runID}})
	if err != nil {
		return describedBeats{}, err
	}
	dc := converter.GetDefaultDataConverter()
	d := describedBeats{at: now}
	for _, a := range desc.GetPendingActivities() {
		if a.GetHeartbeatDetails() == nil {
			continue
		}
		switch a.GetActivityType().GetName() {
		case transferActivity:
			var tp activities.TransferProgress
			if err := dc.FromPayloads(a.GetHeartbeatDetails(), &tp); err != nil || tp.Key == 0 && tp.Stage == "" {
				continue
			}
			d.beats = append(d.beats, tp)
		case transfersActivity:
			var tp activities.TransferDisksProgress
			if err := dc.FromPayloads(a.GetHeartbeatDetails(), &tp); err != nil {
				continue
			}
			for _, b := range tp.Disks {
				if b.Key != 0 || b.Stage != "" {
					d.beats = append(d.beats, b)
				}
			}
			for _, done := range tp.Done {
				d.beats = append(d.beats, activities.TransferProgress{Key: done.Key, Stage: activities.TransferStageDone})
			}
		case restoreActivity:
			var rp activities.RestoreProgress
			if err := dc.FromPayloads(a.GetHeartbeatDetails(), &rp); err != nil || rp.Stage == "" {
				continue
			}
			d.restore = &rp
		case verifyActivity:
			var vp activities.VerifyProgress
			if err := dc.FromPayloads(a.GetHeartbeatDetails(), &vp); err != nil || vp.Stage == "" {
				continue
			}
			d.verify = &vp
		case exportActivity:
			var ep activities.ExportProgress
			if a.GetState() != enumspb.PENDING_ACTIVITY_STATE_STARTED {
				continue // waiting for a retry: the last attempt's URI serves nothing
			}
			if err := dc.FromPayloads(a.GetHeartbeatDetails(), &ep); err != nil || ep.Stage == "" {
				continue
			}
			d.export = &ep
		}
	}
	l.mu.Lock()
	l.beats[runID] = d
	l.mu.Unlock()
	return d, nil
}

// warn logs at most one warning per warnEvery.
func (l *liveProgress) warn(msg string, args ...any) {
	l.mu.Lock()
	due := time.Since(l.lastWarn) >= warnEvery
	if due {
		l.lastWarn = time.Now()
	}
	l.mu.Unlock()
	if due {
		l.log.Warn(msg, args...)
	}
}
