package stack_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/stack"
)

// TestPauseGates drives the worker's pause points (activities.PauseDir,
// in-process here) through PauseGates: armed, reached with this process's
// pid, held, released; a released point no longer stops anything.
func TestPauseGates(t *testing.T) {
	g := stack.PauseGates{Dir: t.TempDir()}
	p := activities.PauseDir(g.Dir)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := g.Arm(activities.PauseBeforeCommit); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { p.Pause(ctx, activities.PauseBeforeCommit); close(done) }()
	pid, err := g.Wait(ctx, activities.PauseBeforeCommit)
	if err != nil {
		t.Fatal(err)
	}
	if pid != os.Getpid() || !g.Reached(activities.PauseBeforeCommit) {
		t.Errorf("reached by pid %d (reached %v), want %d", pid, g.Reached(activities.PauseBeforeCommit), os.Getpid())
	}
	select {
	case <-done:
		t.Fatal("the activity went on while the point was armed")
	case <-time.After(100 * time.Millisecond):
	}
	if err := g.Release(activities.PauseBeforeCommit); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("still paused after Release")
	}
	if g.Reached(activities.PauseBeforeCommit) {
		t.Error("Release left the reached marker")
	}
	pass := make(chan struct{})
	go func() { p.Pause(ctx, activities.PauseBeforeCommit); close(pass) }()
	select {
	case <-pass:
	case <-time.After(5 * time.Second):
		t.Fatal("a released point still stops activities")
	}
	short, cancel2 := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel2()
	if _, err := g.Wait(short, activities.PauseAfterCommit); err == nil || !strings.Contains(err.Error(), activities.PauseAfterCommit) {
		t.Errorf("Wait on a point nobody reaches: %v", err)
	}
	for _, bad := range []string{"", "../x", ".hidden"} {
		if err := g.Arm(bad); err == nil {
			t.Errorf("Arm(%q) accepted", bad)
		}
	}
}
