package main

import (
	"fmt"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"slices"
	"strings"

	enumspb "go.temporal.io/api/enums/v1"
	historypb "go.temporal.io/api/history/v1"
)

// retry is something a workflow history shows was done more than once or
// failed: an activity whose completing attempt was not its first, an
// activity that failed or timed out for good, a workflow task that failed
// or timed out (the server schedules it again).
type retry struct {
	what    string // "ActivityName attempt 3", "workflow task"
	failure string // the failure before the retry, as the history gives it
}

// retriesOf lists the retries of one workflow history. A retried
// activity's ActivityTaskStarted event is written when the activity
// closes, with the attempt that closed it and the failure of the attempt
// before (LastFailure): one event however many attempts. A local activity
// (a backup's short steps) has its marker, with the attempt that ended it
// and, when it failed, its failure (a canceled one is no retry).
func retriesOf(events []*historypb.HistoryEvent) []retry {
	names := map[int64]string{}
	var out []retry
	for _, ev := range events {
		switch ev.GetEventType() {
		case enumspb.EVENT_TYPE_MARKER_RECORDED:
			a := ev.GetMarkerRecordedEventAttributes()
			data, ok, err := stack.LocalActivityOf(ev)
			if !ok || err != nil {
				continue
			}
			if data.Attempt > 1 {
				out = append(out, retry{what: fmt.Sprintf("%s attempt %d", data.ActivityType, data.Attempt)})
			}
			if f := a.GetFailure(); f != nil && f.GetCanceledFailureInfo() == nil {
				out = append(out, retry{what: data.ActivityType + " failed", failure: oneLine(f.GetMessage())})
			}
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
			names[ev.GetEventId()] = ev.GetActivityTaskScheduledEventAttributes().GetActivityType().GetName()
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_STARTED:
			a := ev.GetActivityTaskStartedEventAttributes()
			if a.GetAttempt() > 1 {
				out = append(out, retry{what: fmt.Sprintf("%s attempt %d", names[a.GetScheduledEventId()], a.GetAttempt()),
					failure: oneLine(a.GetLastFailure().GetMessage())})
			}
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_FAILED:
			a := ev.GetActivityTaskFailedEventAttributes()
			out = append(out, retry{what: names[a.GetScheduledEventId()] + " failed", failure: oneLine(a.GetFailure().GetMessage())})
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
			a := ev.GetActivityTaskTimedOutEventAttributes()
			out = append(out, retry{what: names[a.GetScheduledEventId()] + " timed out", failure: oneLine(a.GetFailure().GetMessage())})
		case enumspb.EVENT_TYPE_WORKFLOW_TASK_FAILED:
			a := ev.GetWorkflowTaskFailedEventAttributes()
			out = append(out, retry{what: "workflow task failed", failure: oneLine(a.GetCause().String() + ": " + a.GetFailure().GetMessage())})
		case enumspb.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
			a := ev.GetWorkflowTaskTimedOutEventAttributes()
			out = append(out, retry{what: "workflow task timed out", failure: a.GetTimeoutType().String()})
		}
	}
	return out
}

// retryCounts groups retries by what was retried and why, most frequent
// first, as "3× TransferDisk attempt 2: <message>".
func retryCounts(rs []retry) []string {
	n := map[retry]int{}
	for _, r := range rs {
		n[r]++
	}
	keys := make([]retry, 0, len(n))
	for r := range n {
		keys = append(keys, r)
	}
	slices.SortFunc(keys, func(a, b retry) int {
		if n[a] != n[b] {
			return n[b] - n[a]
		}
		return strings.Compare(a.what+a.failure, b.what+b.failure)
	})
	out := make([]string, 0, len(keys))
	for _, r := range keys {
		out = append(out, fmt.Sprintf("%d× %s: %s", n[r], r.what, r.failure))
	}
	return out
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}
