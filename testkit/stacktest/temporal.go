package stacktest

import (
	"bytes"
	"context"
	"strings"
	"testing"

	enumspb "go.temporal.io/api/enums/v1"
	failurepb "go.temporal.io/api/failure/v1"
	historypb "go.temporal.io/api/history/v1"
	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/api/workflowservice/v1"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/cbtflow/cbtflow/testkit/stack"
)

// ListWorkflows lists the workflows of the stack's namespace that match a
// visibility query, all pages, failing t on an error.
func ListWorkflows(ctx context.Context, t testing.TB, s *stack.Stack, query string) []*workflowpb.WorkflowExecutionInfo {
	t.Helper()
	var out []*workflowpb.WorkflowExecutionInfo
	var token []byte
	for {
		resp, err := s.Client().ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Namespace: stack.Namespace, Query: query, NextPageToken: token})
		if err != nil {
			t.Fatalf("list workflows %q: %v", query, err)
		}
		out = append(out, resp.GetExecutions()...)
		if token = resp.GetNextPageToken(); len(token) == 0 {
			return out
		}
	}
}

// History returns every event of run of workflow id (run "" is the newest
// run), failing t on an error.
func History(ctx context.Context, t testing.TB, s *stack.Stack, id, run string) []*historypb.HistoryEvent {
	t.Helper()
	var events []*historypb.HistoryEvent
	it := s.Client().GetWorkflowHistory(ctx, id, run, false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	for it.HasNext() {
		ev, err := it.Next()
		if err != nil {
			t.Fatalf("history of %s: %v", id, err)
		}
		events = append(events, ev)
	}
	return events
}

// ProtoContains reports whether any string or bytes field of m, at any
// depth (payload data included, which JSON shows in base64), contains
// needle. Map keys are searched too.
func ProtoContains(m protoreflect.Message, needle []byte) bool {
	found := false
	value := func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch fd.Kind() {
		case protoreflect.StringKind:
			return strings.Contains(v.String(), string(needle))
		case protoreflect.BytesKind:
			return bytes.Contains(v.Bytes(), needle)
		case protoreflect.MessageKind, protoreflect.GroupKind:
			return ProtoContains(v.Message(), needle)
		}
		return false
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len() && !found; i++ {
				found = value(fd, l.Get(i))
			}
		case fd.IsMap():
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				found = strings.Contains(k.String(), string(needle)) || value(fd.MapValue(), mv)
				return !found
			})
		default:
			found = value(fd, v)
		}
		return !found
	})
	return found
}

// Step is one activity a workflow ran, as its history records it: an
// activity (its ActivityTaskScheduled event and what followed) or a local
// activity (its LocalActivity marker, written when the workflow task that
// ran it completed: a backup's short steps run so; see workflows.step).
type Step struct {
	Type  string
	Local bool
	// Attempt is the last attempt the history records: an activity's
	// started attempt, a local activity's attempt (counted again from 1
	// by a worker that took over a workflow task whose worker died: its
	// attempts are in no history, see Reruns). 0: an activity not
	// started.
	Attempt int
	// Reruns are, of a local activity, the workflow tasks that ran it
	// and were lost (they timed out, their worker dead, or failed): each
	// ran it again from its first attempt.
	Reruns int
	// Failure is what its last attempt failed with, nil when it completed
	// (or runs).
	Failure *failurepb.Failure
	// Canceled: the activity's cancel completed (an activity's
	// ActivityTaskCanceled; a local activity's marker of a cancel).
	Canceled bool
}

// Steps lists the activities of a history, in the order they were
// scheduled (a local activity where its marker is). A local activity
// retried after a back-off longer than a workflow task's timeout has a
// marker per try: it is one step, with its last try's attempt and
// failure (told apart from another of its type by the order alone). A
// marker that does not decode fails t.
func Steps(t testing.TB, events []*historypb.HistoryEvent) []Step {
	t.Helper()
	var out []Step
	scheduled := map[int64]int{} // scheduled event ID → index in out
	retrying := map[string]int{} // local activity type → index of a step whose try is to follow
	// lost counts the workflow tasks lost since the last one completed;
	// lostBefore those before the one whose markers follow.
	lost, lostBefore := 0, 0
	for _, ev := range events {
		switch ev.GetEventType() {
		case enumspb.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
			// Not a task that waited for a worker (schedule to start):
			// one that a worker took and never finished.
			if ev.GetWorkflowTaskTimedOutEventAttributes().GetTimeoutType() == enumspb.TIMEOUT_TYPE_START_TO_CLOSE {
				lost++
			}
		case enumspb.EVENT_TYPE_WORKFLOW_TASK_FAILED:
			lost++
		case enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
			lostBefore, lost = lost, 0
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
			scheduled[ev.GetEventId()] = len(out)
			out = append(out, Step{Type: ev.GetActivityTaskScheduledEventAttributes().GetActivityType().GetName()})
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_STARTED:
			a := ev.GetActivityTaskStartedEventAttributes()
			if i, ok := scheduled[a.GetScheduledEventId()]; ok {
				out[i].Attempt = int(a.GetAttempt())
			}
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_FAILED:
			a := ev.GetActivityTaskFailedEventAttributes()
			if i, ok := scheduled[a.GetScheduledEventId()]; ok {
				out[i].Failure = a.GetFailure()
			}
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
			a := ev.GetActivityTaskTimedOutEventAttributes()
			if i, ok := scheduled[a.GetScheduledEventId()]; ok {
				out[i].Failure = a.GetFailure()
			}
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
			if i, ok := scheduled[ev.GetActivityTaskCanceledEventAttributes().GetScheduledEventId()]; ok {
				out[i].Canceled = true
			}
		case enumspb.EVENT_TYPE_MARKER_RECORDED:
			data, ok, err := stack.LocalActivityOf(ev)
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				continue
			}
			s := Step{Type: data.ActivityType, Local: true, Attempt: int(data.Attempt), Reruns: lostBefore,
				Failure: ev.GetMarkerRecordedEventAttributes().GetFailure()}
			if s.Failure.GetCanceledFailureInfo() != nil {
				// Canceled (another disk failed, the workflow was
				// canceled), as an activity's ActivityTaskCanceled.
				s.Failure, s.Canceled = nil, true
			}
			i, again := retrying[s.Type]
			if again {
				s.Reruns += out[i].Reruns
				out[i] = s
			} else {
				i = len(out)
				out = append(out, s)
			}
			delete(retrying, s.Type)
			if data.Backoff > 0 {
				retrying[s.Type] = i
			}
		}
	}
	return out
}
