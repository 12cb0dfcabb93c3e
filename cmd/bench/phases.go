package main

import (
	"fmt"
	"slices"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/converter"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/testkit/stack"
)

// The rows of the end-to-end table, in the order a backup runs them.
const (
	rowResolve  = "resolve (ResolveVM)"
	rowStart    = "start of BackupVM (StartWorkflow)"
	rowPrepare  = "prepare (PrepareVM)"
	rowBegin    = "begin (BeginBackup)"
	rowAlloc    = "allocation (AllocatedBytes)"
	rowSpace    = "space check (CheckSpace)"
	rowSnapshot = "snapshot (CreateSnapshot)"
	rowQuery    = "CBT query (ChangedAreas)"
	rowSetup    = "transfer: setup"
	rowCopy     = "transfer: copy"
	rowCheck    = "transfer: image check"
	rowHash     = "transfer: checksum"
	rowXferRest = "transfer: rest"
	rowCommit   = "commit (CommitRestorePoint)"
	rowRemove   = "snapshot removal (RemoveSnapshot)"
	rowOther    = "other activities"
	rowOverhead = "workflow overhead between activities"
	rowQueued   = "  of which activity tasks queued"
	// rowTasksQueued is not a row of the one-at-a-time table: the scale
	// rounds print it (workflowTasksQueued).
	rowTasksQueued = "workflow tasks queued, summed"
	rowStarter     = "starter outside the workflows"
	rowTotal       = "end to end (starter backup --wait)"
)

// Sizes of what a backup wrote, in bytes, beside its phases in a sample
// (not rows of the phase table): its QCOW2 images and their digest files.
const (
	rowImageBytes     = "QCOW2 images, bytes"
	rowImageAllocated = "QCOW2 images, bytes allocated"
	rowDigestBytes    = "digest files, bytes"
)

var phaseRows = []string{rowResolve, rowStart, rowPrepare, rowBegin, rowAlloc, rowSpace, rowSnapshot, rowQuery,
	rowSetup, rowCopy, rowCheck, rowHash, rowXferRest, rowCommit, rowRemove, rowOther,
	rowOverhead, rowQueued, rowStarter, rowTotal}

// activityRows names the row of each activity the backup workflows run;
// TransferDisk is split by its result (transferRows).
var activityRows = map[string]string{
	"ResolveVM": rowResolve, "StartWorkflow": rowStart, "PrepareVM": rowPrepare, "BeginBackup": rowBegin, "AllocatedBytes": rowAlloc, "CheckSpace": rowSpace,
	"CreateSnapshot": rowSnapshot, "ChangedAreas": rowQuery, "CommitRestorePoint": rowCommit,
	"RemoveSnapshot": rowRemove,
}

// transferActivity is TransferDisk; transfersActivity TransferDisks, whose
// disks count as a TransferDisk each.
const (
	transferActivity  = "TransferDisk"
	transfersActivity = "TransferDisks"
)

// span is one activity's execution as the workflow history records it:
// from the task's start (the attempt that completed) to its completion,
// and when it was scheduled. A local activity (a backup's short steps)
// has only its end in the history (its marker's ReplayTime): it starts
// when the workflow task that ran it started, or when the local activity
// recorded before it in that task ended, and it is scheduled then.
type span struct {
	activity   string
	scheduled  time.Time
	start, end time.Time
	transfer   *activities.TransferDiskResult // TransferDisk's result
}

// spansOf lists the completed activities of one workflow history, and
// the times the workflow started and closed.
func spansOf(events []*historypb.HistoryEvent) (spans []span, opened, closed time.Time, err error) {
	names := map[int64]string{}
	scheduled := map[int64]time.Time{}
	started := map[int64]time.Time{}
	// localFrom is where the next local activity's span starts.
	var localFrom time.Time
	dc := converter.GetDefaultDataConverter()
	for _, ev := range events {
		t := ev.GetEventTime().AsTime()
		switch ev.GetEventType() {
		case enumspb.EVENT_TYPE_WORKFLOW_TASK_STARTED:
			localFrom = t
		case enumspb.EVENT_TYPE_MARKER_RECORDED:
			data, ok, err := stack.LocalActivityOf(ev)
			if err != nil {
				return nil, opened, closed, err
			}
			if !ok {
				continue
			}
			from := localFrom
			localFrom = data.ReplayTime
			if ev.GetMarkerRecordedEventAttributes().GetFailure() != nil || data.ReplayTime.Before(from) {
				continue
			}
			spans = append(spans, span{activity: data.ActivityType, scheduled: from, start: from, end: data.ReplayTime})
		case enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
			opened = t
		case enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
			closed = t
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
			names[ev.GetEventId()] = ev.GetActivityTaskScheduledEventAttributes().GetActivityType().GetName()
			scheduled[ev.GetEventId()] = t
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_STARTED:
			started[ev.GetActivityTaskStartedEventAttributes().GetScheduledEventId()] = t
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
			a := ev.GetActivityTaskCompletedEventAttributes()
			id := a.GetScheduledEventId()
			sp := span{activity: names[id], scheduled: scheduled[id], start: started[id], end: t}
			if sp.activity == "" || sp.start.IsZero() {
				return nil, opened, closed, fmt.Errorf("history event %d: completion of an activity whose schedule or start is not in the history", ev.GetEventId())
			}
			switch sp.activity {
			case transferActivity:
				var tr activities.TransferDiskResult
				if err := dc.FromPayloads(a.GetResult(), &tr); err != nil {
					return nil, opened, closed, fmt.Errorf("history event %d: TransferDisk result: %w", ev.GetEventId(), err)
				}
				sp.transfer = &tr
			case transfersActivity:
				// A span per disk, as a TransferDisk each: the rows and
				// the sums count disks.
				var tr activities.TransferDisksResult
				if err := dc.FromPayloads(a.GetResult(), &tr); err != nil {
					return nil, opened, closed, fmt.Errorf("history event %d: TransferDisks result: %w", ev.GetEventId(), err)
				}
				for i := range tr.Disks {
					d := sp
					d.activity, d.transfer = transferActivity, &tr.Disks[i]
					spans = append(spans, d)
				}
				continue
			}
			spans = append(spans, sp)
		}
	}
	if opened.IsZero() || closed.IsZero() {
		return nil, opened, closed, fmt.Errorf("the history holds no start and completion of the workflow (%d events)", len(events))
	}
	return spans, opened, closed, nil
}

// interval is [start, end).
type interval struct{ start, end time.Time }

// covered is the time covered by the union of intervals.
func covered(ivs []interval) time.Duration {
	ivs = slices.Clone(ivs)
	slices.SortFunc(ivs, func(a, b interval) int { return a.start.Compare(b.start) })
	var total time.Duration
	var cur interval
	for i, iv := range ivs {
		switch {
		case i == 0:
			cur = iv
		case !iv.start.After(cur.end):
			if iv.end.After(cur.end) {
				cur.end = iv.end
			}
		default:
			total += cur.end.Sub(cur.start)
			cur = iv
		}
	}
	if len(ivs) > 0 {
		total += cur.end.Sub(cur.start)
	}
	return total
}

// phasesOf splits one backup's time, in seconds per row: each activity's
// row is the wall time its executions cover (disks run in parallel count
// once); TransferDisk's wall time is split among its steps in proportion
// to their seconds summed over disks (exact with one disk). The workflow
// overhead is the time between opened and closed (the first workflow's
// start, the last one's close) that no activity covers: workflow tasks,
// the child workflow's start, and activity tasks waiting from their
// scheduling to their start (shown apart). The starter's part is the rest of its wall time (its
// process, the start request, the result's delivery).
func phasesOf(spans []span, opened, closed time.Time, wall time.Duration) map[string]float64 {
	out := map[string]float64{}
	byRow := map[string][]interval{}
	var all, queued, transfers []interval
	var sumTransfer, setup, cp, check, hash, verify float64
	for _, sp := range spans {
		iv := interval{sp.start, sp.end}
		all = append(all, iv)
		queued = append(queued, interval{sp.scheduled, sp.end})
		if sp.activity == transferActivity {
			transfers = append(transfers, iv)
			// The disk's own time: a TransferDisks' disks share its span.
			if tr := sp.transfer; tr != nil && tr.Seconds > 0 {
				sumTransfer += tr.Seconds
			} else {
				sumTransfer += sp.end.Sub(sp.start).Seconds()
			}
			if tr := sp.transfer; tr != nil {
				setup, cp, check, hash = setup+tr.SetupSeconds, cp+tr.CopySeconds, check+tr.CheckSeconds, hash+tr.HashSeconds
				// The check and the seal run at once (since issue 12).
				verify += max(tr.CheckSeconds, tr.HashSeconds)
			}
			continue
		}
		row, ok := activityRows[sp.activity]
		if !ok {
			row = rowOther
		}
		byRow[row] = append(byRow[row], iv)
	}
	for row, ivs := range byRow {
		out[row] = covered(ivs).Seconds()
	}
	if wallT := covered(transfers).Seconds(); wallT > 0 && sumTransfer > 0 {
		scale := wallT / sumTransfer
		out[rowSetup], out[rowCopy], out[rowCheck], out[rowHash] = setup*scale, cp*scale, check*scale, hash*scale
		out[rowXferRest] = max(0, wallT-(setup+cp+verify)*scale)
	}
	span := closed.Sub(opened)
	out[rowOverhead] = max(0, (span - covered(all)).Seconds())
	out[rowQueued] = max(0, (covered(queued) - covered(all)).Seconds())
	out[rowStarter] = max(0, (wall - span).Seconds())
	out[rowTotal] = wall.Seconds()
	return out
}

// workflowTasksQueued is how long a workflow's tasks waited in the task
// queue, summed: from each WorkflowTaskScheduled to the
// WorkflowTaskStarted that follows it (part of the workflow overhead
// between activities, rowOverhead, where no activity runs meanwhile).
func workflowTasksQueued(events []*historypb.HistoryEvent) time.Duration {
	var total time.Duration
	var scheduled time.Time
	for _, ev := range events {
		switch ev.GetEventType() {
		case enumspb.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
			scheduled = ev.GetEventTime().AsTime()
		case enumspb.EVENT_TYPE_WORKFLOW_TASK_STARTED:
			if !scheduled.IsZero() {
				total += ev.GetEventTime().AsTime().Sub(scheduled)
				scheduled = time.Time{}
			}
		}
	}
	return total
}
