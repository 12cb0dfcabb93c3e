package main

import (
	"math"
	"reflect"
	"testing"
	"time"

	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	failurepb "go.temporal.io/api/failure/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/converter"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cbtflow/cbtflow/activities"
)

// TestPhasesOf: activities of the same kind that overlap (disks in
// parallel) count once, TransferDisk's wall time is split in proportion
// to its steps, and what no activity covers is the workflows' overhead
// or the starter's.
func TestPhasesOf(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	spans := []span{
		{activity: "ResolveVM", scheduled: at(50), start: at(100), end: at(200)},
		{activity: "ChangedAreas", scheduled: at(280), start: at(300), end: at(400)},
		{activity: "ChangedAreas", scheduled: at(280), start: at(350), end: at(450)},
		// Two disks, 1 s of wall time, 1.5 s summed: 0.6 s copy, 0.3 s
		// hash summed become 0.4 s and 0.2 s.
		{activity: "TransferDisk", scheduled: at(500), start: at(500), end: at(1500), transfer: &activities.TransferDiskResult{CopySeconds: 0.4, HashSeconds: 0.2}},
		{activity: "TransferDisk", scheduled: at(500), start: at(500), end: at(1000), transfer: &activities.TransferDiskResult{CopySeconds: 0.2, HashSeconds: 0.1}},
		{activity: "SomethingNew", scheduled: at(1600), start: at(1600), end: at(1700)},
	}
	got := phasesOf(spans, at(0), at(2000), 2500*time.Millisecond)
	want := map[string]float64{
		rowResolve: 0.1, rowQuery: 0.15, rowCopy: 0.4, rowHash: 0.2, rowXferRest: 0.4, rowOther: 0.1,
		rowOverhead: 2 - 0.1 - 0.15 - 1 - 0.1, rowQueued: 0.05 + 0.02, rowStarter: 0.5, rowTotal: 2.5,
	}
	for row, w := range want {
		if math.Abs(got[row]-w) > 1e-9 {
			t.Errorf("%s = %.4f, want %.4f", row, got[row], w)
		}
	}
	if got[rowSetup] != 0 || got[rowCheck] != 0 || got[rowCommit] != 0 {
		t.Errorf("rows of nothing are not zero: %v", got)
	}
}

// TestSpansOfLocalActivities: a local activity's span runs from the
// start of its workflow task, or the end of the local activity recorded
// before it in that task, to its marker's ReplayTime; a failed one counts
// for nothing but moves the next one's start.
func TestSpansOfLocalActivities(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	dc := converter.GetDefaultDataConverter()
	var events []*historypb.HistoryEvent
	add := func(typ enumspb.EventType, ms int, attrs *historypb.MarkerRecordedEventAttributes) {
		ev := &historypb.HistoryEvent{EventId: int64(len(events) + 1), EventType: typ, EventTime: timestamppb.New(at(ms))}
		if attrs != nil {
			ev.Attributes = &historypb.HistoryEvent_MarkerRecordedEventAttributes{MarkerRecordedEventAttributes: attrs}
		}
		events = append(events, ev)
	}
	marker := func(activity string, end int, failed bool) *historypb.MarkerRecordedEventAttributes {
		p, err := dc.ToPayloads(struct {
			ActivityType string
			ReplayTime   time.Time
		}{activity, at(end)})
		if err != nil {
			t.Fatal(err)
		}
		a := &historypb.MarkerRecordedEventAttributes{MarkerName: "LocalActivity", Details: map[string]*commonpb.Payloads{"data": p}}
		if failed {
			a.Failure = &failurepb.Failure{Message: "refused"}
		}
		return a
	}
	add(enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, 0, nil)
	add(enumspb.EVENT_TYPE_WORKFLOW_TASK_STARTED, 100, nil)
	add(enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 400, nil)
	add(enumspb.EVENT_TYPE_MARKER_RECORDED, 400, marker("PrepareVM", 150, false))
	add(enumspb.EVENT_TYPE_MARKER_RECORDED, 400, marker("ChangedAreas", 200, true))
	add(enumspb.EVENT_TYPE_MARKER_RECORDED, 400, marker("ChangedAreas", 350, false))
	add(enumspb.EVENT_TYPE_WORKFLOW_TASK_STARTED, 500, nil)
	add(enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 700, nil)
	add(enumspb.EVENT_TYPE_MARKER_RECORDED, 700, marker("CommitRestorePoint", 600, false))
	add(enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, 700, nil)
	spans, opened, closed, err := spansOf(events)
	if err != nil {
		t.Fatal(err)
	}
	want := []span{
		{activity: "PrepareVM", scheduled: at(100), start: at(100), end: at(150)},
		{activity: "ChangedAreas", scheduled: at(200), start: at(200), end: at(350)},
		{activity: "CommitRestorePoint", scheduled: at(500), start: at(500), end: at(600)},
	}
	if !reflect.DeepEqual(spans, want) || !opened.Equal(at(0)) || !closed.Equal(at(700)) {
		t.Errorf("spans %+v from %v to %v, want %+v from 0 to 700 ms", spans, opened, closed, want)
	}
}

// TestWorkflowTasksQueued: each task's wait from its scheduling to its
// start, summed; a task scheduled again after a timeout waits from its
// last scheduling; one never started adds nothing.
func TestWorkflowTasksQueued(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ev := func(typ enumspb.EventType, ms int) *historypb.HistoryEvent {
		return &historypb.HistoryEvent{EventType: typ, EventTime: timestamppb.New(t0.Add(time.Duration(ms) * time.Millisecond))}
	}
	events := []*historypb.HistoryEvent{
		ev(enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, 0),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 0),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_STARTED, 30),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 50),
		ev(enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, 50),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 100),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT, 200),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 300),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_STARTED, 310),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 320),
		ev(enumspb.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 400),
	}
	if got, want := workflowTasksQueued(events), 40*time.Millisecond; got != want {
		t.Errorf("workflowTasksQueued = %v, want %v", got, want)
	}
}

// TestSpansOfTransferDisks: one TransferDisks of two disks is two
// transfers, each with the activity's times and its disk's result.
func TestSpansOfTransferDisks(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(ms int) *timestamppb.Timestamp {
		return timestamppb.New(t0.Add(time.Duration(ms) * time.Millisecond))
	}
	res := activities.TransferDisksResult{Disks: []activities.TransferDiskResult{{Path: "a", CopySeconds: 0.1}, {Path: "b", CopySeconds: 0.2}}}
	p, err := converter.GetDefaultDataConverter().ToPayloads(res)
	if err != nil {
		t.Fatal(err)
	}
	events := []*historypb.HistoryEvent{
		{EventId: 1, EventType: enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, EventTime: at(0)},
		{EventId: 2, EventType: enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, EventTime: at(100), Attributes: &historypb.HistoryEvent_ActivityTaskScheduledEventAttributes{
			ActivityTaskScheduledEventAttributes: &historypb.ActivityTaskScheduledEventAttributes{ActivityType: &commonpb.ActivityType{Name: "TransferDisks"}}}},
		{EventId: 3, EventType: enumspb.EVENT_TYPE_ACTIVITY_TASK_STARTED, EventTime: at(110), Attributes: &historypb.HistoryEvent_ActivityTaskStartedEventAttributes{
			ActivityTaskStartedEventAttributes: &historypb.ActivityTaskStartedEventAttributes{ScheduledEventId: 2}}},
		{EventId: 4, EventType: enumspb.EVENT_TYPE_ACTIVITY_TASK_COMPLETED, EventTime: at(500), Attributes: &historypb.HistoryEvent_ActivityTaskCompletedEventAttributes{
			ActivityTaskCompletedEventAttributes: &historypb.ActivityTaskCompletedEventAttributes{ScheduledEventId: 2, Result: p}}},
		{EventId: 5, EventType: enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, EventTime: at(600)},
	}
	spans, _, _, err := spansOf(events)
	if err != nil {
		t.Fatal(err)
	}
	if len(spans) != 2 {
		t.Fatalf("spans %+v, want 2", spans)
	}
	for i, sp := range spans {
		if sp.activity != "TransferDisk" || !sp.scheduled.Equal(at(100).AsTime()) || !sp.start.Equal(at(110).AsTime()) || !sp.end.Equal(at(500).AsTime()) ||
			sp.transfer == nil || *sp.transfer != res.Disks[i] {
			t.Errorf("span %d: %+v, want TransferDisk from 110 to 500 ms with %+v", i, sp, res.Disks[i])
		}
	}
}
