package stacktest

import (
	"reflect"
	"testing"
	"time"

	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	failurepb "go.temporal.io/api/failure/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/converter"
)

// TestSteps: an activity's attempt and failure; a local activity's
// marker, a try retried after a long back-off (one step), one canceled,
// and the workflow tasks lost before the task that recorded it.
func TestSteps(t *testing.T) {
	var events []*historypb.HistoryEvent
	add := func(ev *historypb.HistoryEvent) int64 {
		ev.EventId = int64(len(events) + 1)
		events = append(events, ev)
		return ev.EventId
	}
	refused := &failurepb.Failure{Message: "refused", FailureInfo: &failurepb.Failure_ApplicationFailureInfo{
		ApplicationFailureInfo: &failurepb.ApplicationFailureInfo{Type: "CBTReset", NonRetryable: true}}}
	canceled := &failurepb.Failure{Message: "canceled", FailureInfo: &failurepb.Failure_CanceledFailureInfo{CanceledFailureInfo: &failurepb.CanceledFailureInfo{}}}
	marker := func(activity string, attempt int, backoff time.Duration, f *failurepb.Failure) {
		p, err := converter.GetDefaultDataConverter().ToPayloads(struct {
			ActivityType string
			Attempt      int
			Backoff      time.Duration
		}{activity, attempt, backoff})
		if err != nil {
			t.Fatal(err)
		}
		add(&historypb.HistoryEvent{EventType: enumspb.EVENT_TYPE_MARKER_RECORDED, Attributes: &historypb.HistoryEvent_MarkerRecordedEventAttributes{
			MarkerRecordedEventAttributes: &historypb.MarkerRecordedEventAttributes{MarkerName: "LocalActivity", Details: map[string]*commonpb.Payloads{"data": p}, Failure: f}}})
	}
	task := func(typ enumspb.EventType) { add(&historypb.HistoryEvent{EventType: typ}) }
	lost := func() {
		add(&historypb.HistoryEvent{EventType: enumspb.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT, Attributes: &historypb.HistoryEvent_WorkflowTaskTimedOutEventAttributes{
			WorkflowTaskTimedOutEventAttributes: &historypb.WorkflowTaskTimedOutEventAttributes{TimeoutType: enumspb.TIMEOUT_TYPE_START_TO_CLOSE}}})
	}

	task(enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
	marker("PrepareVM", 1, 0, nil)
	sched := add(&historypb.HistoryEvent{EventType: enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, Attributes: &historypb.HistoryEvent_ActivityTaskScheduledEventAttributes{
		ActivityTaskScheduledEventAttributes: &historypb.ActivityTaskScheduledEventAttributes{ActivityType: &commonpb.ActivityType{Name: "CreateSnapshot"}}}})
	add(&historypb.HistoryEvent{EventType: enumspb.EVENT_TYPE_ACTIVITY_TASK_STARTED, Attributes: &historypb.HistoryEvent_ActivityTaskStartedEventAttributes{
		ActivityTaskStartedEventAttributes: &historypb.ActivityTaskStartedEventAttributes{ScheduledEventId: sched, Attempt: 3}}})
	add(&historypb.HistoryEvent{EventType: enumspb.EVENT_TYPE_ACTIVITY_TASK_FAILED, Attributes: &historypb.HistoryEvent_ActivityTaskFailedEventAttributes{
		ActivityTaskFailedEventAttributes: &historypb.ActivityTaskFailedEventAttributes{ScheduledEventId: sched, Failure: refused}}})
	// A query refused after 5 attempts and a long back-off, tried once
	// more; the other disk's query canceled.
	task(enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
	marker("ChangedAreas", 5, 16*time.Second, refused)
	task(enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
	marker("ChangedAreas", 6, 0, refused)
	marker("ChangedAreas", 1, 0, canceled)
	// Two workflow tasks lost with their workers: the commit ran three
	// times.
	lost()
	lost()
	task(enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
	marker("CommitRestorePoint", 1, 0, nil)

	want := []Step{
		{Type: "PrepareVM", Local: true, Attempt: 1},
		{Type: "CreateSnapshot", Attempt: 3, Failure: refused},
		{Type: "ChangedAreas", Local: true, Attempt: 6, Failure: refused},
		{Type: "ChangedAreas", Local: true, Attempt: 1, Canceled: true},
		{Type: "CommitRestorePoint", Local: true, Attempt: 1, Reruns: 2},
	}
	if got := Steps(t, events); !reflect.DeepEqual(got, want) {
		t.Errorf("Steps:\n got %+v\nwant %+v", got, want)
	}
}
