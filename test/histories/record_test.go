package histories

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	enumspb "go.temporal.io/api/enums/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/api/temporalproto"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	tlog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/worker"
	"google.golang.org/protobuf/proto"

	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// commandsOf is what identifies a version of a case: the commands the
// workflow gave, one string per event a command generated (an activity
// scheduled or its cancel requested, with the activity's type; a child
// started, with its type; a marker, with GetVersion's change ID and
// version, or a local activity's type; a search attribute upsert, with
// its keys; a timer; the workflow's end), sorted. Events that are no command (activity and
// workflow task results, signals, cancel requests from outside) are left
// out, and so are values (IDs, inputs, times): they differ from run to
// run. The order is left out too: the disks of a backup are copied in
// parallel, and whichever finishes first gets its next activity
// scheduled first. A change that only reorders commands is still no
// safe change without workflow.GetVersion, whose marker is a command.
func commandsOf(events []*historypb.HistoryEvent) []string {
	scheduled := map[int64]string{}
	var out []string
	for _, ev := range events {
		typ := ev.GetEventType().String()
		switch ev.GetEventType() {
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
			name := ev.GetActivityTaskScheduledEventAttributes().GetActivityType().GetName()
			scheduled[ev.GetEventId()] = name
			out = append(out, typ+" "+name)
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED:
			out = append(out, typ+" "+scheduled[ev.GetActivityTaskCancelRequestedEventAttributes().GetScheduledEventId()])
		case enumspb.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
			out = append(out, typ+" "+ev.GetStartChildWorkflowExecutionInitiatedEventAttributes().GetWorkflowType().GetName())
		case enumspb.EVENT_TYPE_MARKER_RECORDED:
			a := ev.GetMarkerRecordedEventAttributes()
			s := typ + " " + a.GetMarkerName()
			if a.GetMarkerName() == "LocalActivity" {
				var data struct{ ActivityType string }
				_ = converter.GetDefaultDataConverter().FromPayloads(a.GetDetails()["data"], &data)
				s += " " + data.ActivityType
			}
			if a.GetMarkerName() == "Version" {
				var id string
				var v int
				dc := converter.GetDefaultDataConverter()
				_ = dc.FromPayloads(a.GetDetails()["change-id"], &id)
				_ = dc.FromPayloads(a.GetDetails()["version"], &v)
				s += fmt.Sprintf(" %s=%d", id, v)
			}
			out = append(out, s)
		case enumspb.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
			var keys []string
			for k := range ev.GetUpsertWorkflowSearchAttributesEventAttributes().GetSearchAttributes().GetIndexedFields() {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			out = append(out, typ+" "+strings.Join(keys, ","))
		case enumspb.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED:
			out = append(out, typ+" "+ev.GetSignalExternalWorkflowExecutionInitiatedEventAttributes().GetSignalName())
		case enumspb.EVENT_TYPE_TIMER_STARTED,
			enumspb.EVENT_TYPE_TIMER_CANCELED,
			enumspb.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
			enumspb.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED,
			enumspb.EVENT_TYPE_NEXUS_OPERATION_SCHEDULED,
			enumspb.EVENT_TYPE_NEXUS_OPERATION_CANCEL_REQUESTED,
			enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
			enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
			enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
			enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
			out = append(out, typ)
		}
	}
	slices.Sort(out)
	return out
}

// checkNoSecret fails t when any field of any event of the history holds
// the lab's password, or its JSON form does.
func checkNoSecret(t *testing.T, name string, events []*historypb.HistoryEvent, secret string) {
	t.Helper()
	if secret == "" {
		t.Fatal("no lab password to look for")
	}
	for _, ev := range events {
		if stacktest.ProtoContains(ev.ProtoReflect(), []byte(secret)) {
			t.Errorf("%s: event %d (%s) holds the lab password", name, ev.GetEventId(), ev.GetEventType())
		}
	}
	b, err := marshal(events)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte(secret)) {
		t.Errorf("%s: the history's JSON holds the lab password", name)
	}
}

// replay replays the history on the current workflows, registered as the
// worker registers them. It replays a copy: the SDK merges each upsert of
// search attributes into the map of the start event's, in place, and a
// history recorded after that would start with the attributes the run
// ended with (BackupVM reads those it started with: see upsertKeywords
// in workflows).
func replay(events []*historypb.HistoryEvent) error {
	h := &historypb.History{Events: events}
	r := worker.NewWorkflowReplayer()
	workflows.Register(r)
	return r.ReplayWorkflowHistory(tlog.NewStructuredLogger(slog.New(slog.DiscardHandler)), proto.Clone(h).(*historypb.History))
}

func marshal(events []*historypb.HistoryEvent) ([]byte, error) {
	b, err := temporalproto.CustomJSONMarshalOptions{Indent: "  "}.Marshal(&historypb.History{Events: events})
	return append(b, '\n'), err
}

// version is one recorded history of a case: dir/<case>_v<n>.json.
type version struct {
	n    int
	path string
}

// versions lists the recorded versions of a case in dir, oldest first.
func versions(dir, name string) ([]version, error) {
	re := regexp.MustCompile(`^` + regexp.QuoteMeta(name) + `_v([1-9][0-9]*)\.json$`)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []version
	for _, e := range entries {
		if m := re.FindStringSubmatch(e.Name()); m != nil {
			n, err := strconv.Atoi(m[1])
			if err != nil {
				return nil, err
			}
			out = append(out, version{n, filepath.Join(dir, e.Name())})
		}
	}
	slices.SortFunc(out, func(a, b version) int { return a.n - b.n })
	return out, nil
}

func commandsOfFile(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, err := client.HistoryFromJSON(f, client.HistoryJSONOptions{})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return commandsOf(h.GetEvents()), nil
}

// record saves the history of a case as dir/<case>_v<N+1>.json, N the
// newest recorded version, unless a recorded version has the same
// commands (commandsOf). It returns the file written ("" when none) and
// why. It never overwrites a file: the new one is created exclusively.
func record(dir, name string, events []*historypb.HistoryEvent) (written, why string, err error) {
	have, err := versions(dir, name)
	if err != nil {
		return "", "", err
	}
	cmds := commandsOf(events)
	for i := len(have) - 1; i >= 0; i-- {
		old, err := commandsOfFile(have[i].path)
		if err != nil {
			return "", "", err
		}
		if slices.Equal(old, cmds) {
			return "", fmt.Sprintf("same %d commands as %s", len(cmds), filepath.Base(have[i].path)), nil
		}
	}
	next := 1
	why = fmt.Sprintf("the first recorded history of %s (%d commands)", name, len(cmds))
	if len(have) > 0 {
		newest := have[len(have)-1]
		next = newest.n + 1
		old, err := commandsOfFile(newest.path)
		if err != nil {
			return "", "", err
		}
		why = fmt.Sprintf("its %d commands differ from %s's %d: %s", len(cmds), filepath.Base(newest.path), len(old), diff(old, cmds))
	}
	b, err := marshal(events)
	if err != nil {
		return "", "", err
	}
	path := filepath.Join(dir, fmt.Sprintf("%s_v%d.json", name, next))
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return "", "", fmt.Errorf("%s exists: not overwritten", path)
		}
		return "", "", err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return "", "", err
	}
	if err := f.Close(); err != nil {
		return "", "", err
	}
	return path, why, nil
}

// diff says which commands only a or only b has (both sorted).
func diff(a, b []string) string {
	count := map[string]int{}
	for _, c := range a {
		count[c]--
	}
	for _, c := range b {
		count[c]++
	}
	var parts []string
	for c, n := range count {
		switch {
		case n > 0:
			parts = append(parts, fmt.Sprintf("+%d %s", n, c))
		case n < 0:
			parts = append(parts, fmt.Sprintf("-%d %s", -n, c))
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, "; ")
}
