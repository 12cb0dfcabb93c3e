package stacktest

import (
	"bytes"
	"context"
	"strings"
	"testing"

	enumspb "go.temporal.io/api/enums/v1"
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
