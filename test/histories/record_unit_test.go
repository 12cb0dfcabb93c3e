package histories

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/client"
)

func load(t *testing.T, path string) []*historypb.HistoryEvent {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := client.HistoryFromJSON(f, client.HistoryJSONOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return h.GetEvents()
}

// The recorder writes a new version only when the commands differ from
// every recorded version, and never touches an existing file.
func TestRecordWritesOnlyNewVersions(t *testing.T) {
	testdata := filepath.Join("..", "..", "workflows", "testdata")
	// The two recorded Backups differ by GetVersion's marker.
	v1, v2 := commandsOf(load(t, filepath.Join(testdata, "backup_v1.json"))), commandsOf(load(t, filepath.Join(testdata, "backup_v2.json")))
	if slices.Equal(v1, v2) || !slices.Contains(v2, "MarkerRecorded Version vcenter-workflow-id=1") || slices.Contains(v1, "MarkerRecorded Version vcenter-workflow-id=1") {
		t.Errorf("commands of backup_v1 %q and backup_v2 %q: want v2's GetVersion marker to tell them apart", v1, v2)
	}

	dir := t.TempDir()
	orig, err := os.ReadFile(filepath.Join(testdata, "backupvm_full_v1.json"))
	if err != nil {
		t.Fatal(err)
	}
	first := filepath.Join(dir, "case_v1.json")
	if err := os.WriteFile(first, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	events := load(t, first)

	// Same commands: nothing written.
	if path, why, err := record(dir, "case", events); err != nil || path != "" || !strings.Contains(why, "case_v1.json") {
		t.Fatalf("record of the same history: %q %q %v, want nothing written, because of case_v1.json", path, why, err)
	}
	// Other values, same commands (another activity input): nothing written.
	changed := load(t, first)
	for _, ev := range changed {
		if a := ev.GetActivityTaskScheduledEventAttributes(); a != nil {
			a.Input = &commonpb.Payloads{Payloads: []*commonpb.Payload{{Data: []byte(`"other"`)}}}
		}
	}
	if path, _, err := record(dir, "case", changed); err != nil || path != "" {
		t.Fatalf("record of a history with other values: %q %v, want nothing written", path, err)
	}
	// One more activity: v2.
	extra := append(load(t, first), &historypb.HistoryEvent{
		EventId:   int64(len(events) + 1),
		EventType: enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
		Attributes: &historypb.HistoryEvent_ActivityTaskScheduledEventAttributes{ActivityTaskScheduledEventAttributes: &historypb.ActivityTaskScheduledEventAttributes{
			ActivityType: &commonpb.ActivityType{Name: "NewStep"},
		}},
	})
	path, why, err := record(dir, "case", extra)
	if err != nil || path != filepath.Join(dir, "case_v2.json") || !strings.Contains(why, "+1 ActivityTaskScheduled NewStep") {
		t.Fatalf("record of a history with a new command: %q %q %v, want case_v2.json naming the new command", path, why, err)
	}
	if got := commandsOf(load(t, path)); !slices.Equal(got, commandsOf(extra)) {
		t.Errorf("case_v2.json holds commands %q, want %q", got, commandsOf(extra))
	}
	if b, err := os.ReadFile(first); err != nil || !bytes.Equal(b, orig) {
		t.Errorf("case_v1.json changed (%v)", err)
	}
	// Both versions known: neither is recorded again.
	for _, h := range [][]*historypb.HistoryEvent{events, extra} {
		if path, _, err := record(dir, "case", h); err != nil || path != "" {
			t.Errorf("record of a known version: %q %v, want nothing written", path, err)
		}
	}
	// Another case's files are not this case's versions.
	if path, _, err := record(dir, "cas", events); err != nil || path != filepath.Join(dir, "cas_v1.json") {
		t.Errorf("record of case cas: %q %v, want cas_v1.json", path, err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 3 {
		t.Errorf("files %v, want case_v1, case_v2 and cas_v1", entries)
	}
}
