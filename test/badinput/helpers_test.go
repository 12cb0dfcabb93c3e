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
	"github.com/cbtflow/cbtflow/testkit/stacktest"
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

// activityRuns summarizes the activities of one history: its activities
// and local activities (stacktest.Steps).
type activityRuns struct {
	scheduled map[string]int                                    // activity type → times scheduled (run, of a local activity)
	attempts  map[string][]int32                                // activity type → the last attempt of each started one
	failures  map[string][]*failurepb.Failure                   // activity type → failures
	canceled  map[string]int                                    // activity type → cancellations
	closed    *historypb.WorkflowExecutionFailedEventAttributes // nil unless the workflow failed
	status    enumspb.EventType                                 // the last event's type
}

func summarize(t testing.TB, events []*historypb.HistoryEvent) activityRuns {
	t.Helper()
	r := activityRuns{scheduled: map[string]int{}, attempts: map[string][]int32{}, failures: map[string][]*failurepb.Failure{}, canceled: map[string]int{}}
	for _, s := range stacktest.Steps(t, events) {
		r.scheduled[s.Type]++
		if s.Attempt > 0 {
			r.attempts[s.Type] = append(r.attempts[s.Type], int32(s.Attempt))
		}
		if s.Failure != nil {
			r.failures[s.Type] = append(r.failures[s.Type], s.Failure)
		}
		if s.Canceled {
			r.canceled[s.Type]++
		}
	}
	for _, ev := range events {
		if a := ev.GetWorkflowExecutionFailedEventAttributes(); a != nil {
			r.closed = a
		}
	}
	if len(events) > 0 {
		r.status = events[len(events)-1].GetEventType()
	}
	return r
}
