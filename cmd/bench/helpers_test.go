package main

import (
	"slices"
	"strings"
	"testing"

	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	failurepb "go.temporal.io/api/failure/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/converter"
)

func TestStatusKiB(t *testing.T) {
	status := "Name:\tworker\nVmPeak:\t 1854712 kB\nVmHWM:\t  158000 kB\nVmRSS:\t  120312 kB\nThreads:\t12\nSigQ:\t0/95360\n"
	got := statusKiB(status)
	if got["VmHWM"] != 158000 || got["VmRSS"] != 120312 || got["VmPeak"] != 1854712 {
		t.Errorf("statusKiB = %v", got)
	}
	if _, ok := got["Threads"]; ok {
		t.Errorf("a field without kB is read: %v", got)
	}
}

func TestLimitOf(t *testing.T) {
	limits := "Limit                     Soft Limit           Hard Limit           Units     \n" +
		"Max processes             95360                95360                processes \n" +
		"Max open files            20000                1048576              files     \n"
	if got := limitOf(limits, "Max open files"); got != "20000" {
		t.Errorf("open files = %q", got)
	}
	if got := limitOf(limits, "Max locked memory"); got != "?" {
		t.Errorf("missing line = %q", got)
	}
}

func TestGauges(t *testing.T) {
	text := `# HELP cbtflow_temporal_worker_task_slots_available cbtflow_temporal_worker_task_slots_available gauge
# TYPE cbtflow_temporal_worker_task_slots_available gauge
cbtflow_temporal_worker_task_slots_available{namespace="default",task_queue="cbtflow",worker_type="ActivityWorker"} 996
cbtflow_temporal_worker_task_slots_available{namespace="default",task_queue="cbtflow",worker_type="WorkflowWorker"} 1000
cbtflow_temporal_worker_task_slots_available_total{worker_type="ActivityWorker"} 5
temporal_worker_task_slots_used{worker_type="ActivityWorker"} 4
temporal_worker_task_slots_used 7
`
	avail := gauges(text, slotsAvailable, "worker_type")
	if len(avail) != 2 || avail["ActivityWorker"] != 996 || avail["WorkflowWorker"] != 1000 {
		t.Errorf("available = %v", avail)
	}
	used := gauges(text, slotsUsed, "worker_type")
	if used["ActivityWorker"] != 4 || used[""] != 7 {
		t.Errorf("used = %v", used)
	}
}

func TestLogSetting(t *testing.T) {
	log := `time=1 level=INFO msg="worker starting" version=dev metrics=127.0.0.1:1 max_transfers=4
time=2 level=INFO msg="worker started"
time=3 level=INFO msg="worker starting" max_transfers=8 other=1
`
	if got := logSetting(log, "worker starting", "max_transfers"); got != "8" {
		t.Errorf("max_transfers = %q, want the last start's", got)
	}
	if got := logSetting(log, "worker starting", "max_things"); got != "?" {
		t.Errorf("missing key = %q", got)
	}
}

// TestRetriesOf: an activity whose completing attempt is not its first,
// one that failed for good, and workflow tasks that failed or timed out
// are each listed once, with why; first attempts are not; nor are local
// activities that completed at once or were canceled.
func TestRetriesOf(t *testing.T) {
	ev := func(id int64, typ enumspb.EventType, set func(*historypb.HistoryEvent)) *historypb.HistoryEvent {
		e := &historypb.HistoryEvent{EventId: id, EventType: typ}
		set(e)
		return e
	}
	scheduled := func(id int64, name string) *historypb.HistoryEvent {
		return ev(id, enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, func(e *historypb.HistoryEvent) {
			e.Attributes = &historypb.HistoryEvent_ActivityTaskScheduledEventAttributes{ActivityTaskScheduledEventAttributes: &historypb.ActivityTaskScheduledEventAttributes{
				ActivityType: &commonpb.ActivityType{Name: name}}}
		})
	}
	started := func(id, sched int64, attempt int32, last string) *historypb.HistoryEvent {
		return ev(id, enumspb.EVENT_TYPE_ACTIVITY_TASK_STARTED, func(e *historypb.HistoryEvent) {
			a := &historypb.ActivityTaskStartedEventAttributes{ScheduledEventId: sched, Attempt: attempt}
			if last != "" {
				a.LastFailure = &failurepb.Failure{Message: last}
			}
			e.Attributes = &historypb.HistoryEvent_ActivityTaskStartedEventAttributes{ActivityTaskStartedEventAttributes: a}
		})
	}
	local := func(id int64, name string, attempt int32, failure *failurepb.Failure) *historypb.HistoryEvent {
		return ev(id, enumspb.EVENT_TYPE_MARKER_RECORDED, func(e *historypb.HistoryEvent) {
			p, err := converter.GetDefaultDataConverter().ToPayloads(struct {
				ActivityType string
				Attempt      int32
			}{name, attempt})
			if err != nil {
				t.Fatal(err)
			}
			e.Attributes = &historypb.HistoryEvent_MarkerRecordedEventAttributes{MarkerRecordedEventAttributes: &historypb.MarkerRecordedEventAttributes{
				MarkerName: "LocalActivity", Details: map[string]*commonpb.Payloads{"data": p}, Failure: failure}}
		})
	}
	events := []*historypb.HistoryEvent{
		local(1, "BeginBackup", 1, nil), local(2, "CheckSpace", 2, nil),
		local(3, "ChangedAreas", 1, &failurepb.Failure{Message: "refused"}),
		local(4, "ChangedAreas", 1, &failurepb.Failure{Message: "canceled", FailureInfo: &failurepb.Failure_CanceledFailureInfo{CanceledFailureInfo: &failurepb.CanceledFailureInfo{}}}),
		scheduled(5, "PrepareVM"), started(6, 5, 1, ""),
		scheduled(10, "TransferDisk"), started(11, 10, 3, "activity Heartbeat\n timeout"),
		scheduled(20, "CommitRestorePoint"), started(21, 20, 1, ""),
		ev(22, enumspb.EVENT_TYPE_ACTIVITY_TASK_FAILED, func(e *historypb.HistoryEvent) {
			e.Attributes = &historypb.HistoryEvent_ActivityTaskFailedEventAttributes{ActivityTaskFailedEventAttributes: &historypb.ActivityTaskFailedEventAttributes{
				ScheduledEventId: 20, Failure: &failurepb.Failure{Message: "database gone"}}}
		}),
		ev(30, enumspb.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT, func(e *historypb.HistoryEvent) {
			e.Attributes = &historypb.HistoryEvent_WorkflowTaskTimedOutEventAttributes{WorkflowTaskTimedOutEventAttributes: &historypb.WorkflowTaskTimedOutEventAttributes{
				TimeoutType: enumspb.TIMEOUT_TYPE_START_TO_CLOSE}}
		}),
	}
	got := retriesOf(events)
	want := []retry{
		{what: "CheckSpace attempt 2"},
		{what: "ChangedAreas failed", failure: "refused"},
		{what: "TransferDisk attempt 3", failure: "activity Heartbeat timeout"},
		{what: "CommitRestorePoint failed", failure: "database gone"},
		{what: "workflow task timed out", failure: "StartToClose"},
	}
	if !slices.Equal(got, want) {
		t.Errorf("retriesOf =\n%v\nwant\n%v", got, want)
	}
	counts := retryCounts(append(got, got[0]))
	if len(counts) != 5 || !strings.HasPrefix(counts[0], "2× CheckSpace attempt 2") {
		t.Errorf("retryCounts = %q", counts)
	}
}

// TestScaleOffset: offsets keep their proportion, rounded down to the
// unit; distinct unit-aligned ranges stay distinct and in order, and a
// range that ends within the small disk ends within the large one.
func TestScaleOffset(t *testing.T) {
	const mib, gib, tib = int64(1) << 20, int64(1) << 30, int64(1) << 40
	if got := scaleOffset(5*gib, mib, 10*gib, 2*tib); got != 1*tib {
		t.Errorf("the middle = %d, want %d", got, tib)
	}
	if got := scaleOffset(3*mib, mib, 10*gib, 2*tib); got != 614*mib { // 3 × 204.8 = 614.4
		t.Errorf("3 MiB = %d MiB, want 614", got/mib)
	}
	if got := scaleOffset(7*mib, mib, 4*gib, 4*gib); got != 7*mib {
		t.Errorf("same size = %d, want unchanged", got)
	}
	for _, c := range []struct{ unit, from, to int64 }{{mib, 10 * gib, 2 * tib}, {64 << 10, 10 * gib, 2 * tib}, {mib, 10 * gib, 15 * gib}} {
		last := -c.unit
		for off := int64(0); off+c.unit <= c.from; off += c.unit * 997 {
			got := scaleOffset(off, c.unit, c.from, c.to)
			if got%c.unit != 0 || got < last+c.unit || got+c.unit > c.to {
				t.Fatalf("%+v: %d → %d after %d", c, off, got, last)
			}
			last = got
		}
		if end := scaleOffset(c.from-c.unit, c.unit, c.from, c.to) + c.unit; end > c.to {
			t.Errorf("%+v: the last unit ends at %d, past %d", c, end, c.to)
		}
	}
}

func TestParseCases(t *testing.T) {
	got, err := parseCases("large, basic")
	if err != nil || !slices.Equal(got, []string{"basic", "large"}) {
		t.Errorf("parseCases = %v, %v; want the cases in their own order", got, err)
	}
	if _, err := parseCases("basic,huge"); err == nil {
		t.Error("an unknown case is accepted")
	}
}

// TestTargets: a verdict is on the figure as printed, and the summary
// counts each.
func TestTargets(t *testing.T) {
	if rounded(0.7996, 2) < 0.8 || rounded(0.794, 2) >= 0.8 {
		t.Error("rounded does not round to the printed figure")
	}
	var ts targets
	ts.add("a", "ratio", "0.80×", "≥ 0.80×", true, "")
	ts.add("b", "time", "1.000s", "≤ 0.300s", false, "sizes differ")
	var b strings.Builder
	ts.summary(&b)
	out := b.String()
	for _, want := range []string{" a:\n", " b:\n", "PASS", "FAIL (sizes differ)", "1 PASS, 1 FAIL"} {
		if !strings.Contains(out, want) {
			t.Errorf("summary lacks %q:\n%s", want, out)
		}
	}
}
