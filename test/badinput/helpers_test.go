package badinput

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/digest"
	enumspb "go.temporal.io/api/enums/v1"
	failurepb "go.temporal.io/api/failure/v1"
	historypb "go.temporal.io/api/history/v1"
	"golang.org/x/sys/unix"
)

const (
	MiB = 1 << 20
	GiB = 1 << 30
)

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// repoFiles lists every entry of the repository that is not a folder,
// relative to it.
func repoFiles(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			// An image's digest file (internal/digest) goes with its
			// image; one without its image is listed.
			if img, ok := strings.CutSuffix(p, digest.Suffix); ok {
				if _, err := os.Stat(img); err == nil {
					return nil
				}
			}
			rel, _ := filepath.Rel(root, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// readOnlyBind makes dir read-only for everyone, root included, with a
// read-only bind mount of dir onto itself, undone when t ends. (Root
// ignores permission bits; EROFS stops it.)
func readOnlyBind(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind mount %s: %v (the test needs root and mount rights)", dir, err)
	}
	undo := func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		undo()
		t.Fatalf("remount %s read-only: %v", dir, err)
	}
	t.Cleanup(undo)
	if err := os.WriteFile(filepath.Join(dir, ".probe"), nil, 0o600); !errors.Is(err, unix.EROFS) {
		t.Fatalf("%s is still writable after the read-only bind mount: %v", dir, err)
	}
}

// activityRuns summarizes the activities of one history.
type activityRuns struct {
	scheduled map[string]int                                    // activity type → times scheduled
	attempts  map[string][]int32                                // activity type → attempt of each started event
	failures  map[string][]*failurepb.Failure                   // activity type → failures
	canceled  map[string]int                                    // activity type → cancellations
	closed    *historypb.WorkflowExecutionFailedEventAttributes // nil unless the workflow failed
	status    enumspb.EventType                                 // the last event's type
}

func summarize(events []*historypb.HistoryEvent) activityRuns {
	r := activityRuns{scheduled: map[string]int{}, attempts: map[string][]int32{}, failures: map[string][]*failurepb.Failure{}, canceled: map[string]int{}}
	names := map[int64]string{}
	for _, ev := range events {
		switch ev.GetEventType() {
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
			name := ev.GetActivityTaskScheduledEventAttributes().GetActivityType().GetName()
			names[ev.GetEventId()] = name
			r.scheduled[name]++
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_STARTED:
			a := ev.GetActivityTaskStartedEventAttributes()
			r.attempts[names[a.GetScheduledEventId()]] = append(r.attempts[names[a.GetScheduledEventId()]], a.GetAttempt())
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_FAILED:
			a := ev.GetActivityTaskFailedEventAttributes()
			r.failures[names[a.GetScheduledEventId()]] = append(r.failures[names[a.GetScheduledEventId()]], a.GetFailure())
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
			r.canceled[names[ev.GetActivityTaskCanceledEventAttributes().GetScheduledEventId()]]++
		case enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
			r.closed = ev.GetWorkflowExecutionFailedEventAttributes()
		}
	}
	if len(events) > 0 {
		r.status = events[len(events)-1].GetEventType()
	}
	return r
}
