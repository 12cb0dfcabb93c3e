package activities

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Pause points: step boundaries where a fault test can stop the worker
// deterministically (see PauseDir).
const (
	PauseAfterSnapshot        = "after-snapshot" // snapshot taken, activity not yet completed
	PauseMidTransfer          = "mid-transfer"   // about half of a disk's bytes copied
	PauseBeforeCheck          = "before-check"   // a disk's image copied and closed, qemu-img check not yet run
	PauseBeforeCommit         = "before-commit"  // every transfer done, nothing committed
	PauseAfterCommit          = "after-commit"   // committed, activity not yet completed
	PauseBeforeRemoveSnapshot = "before-remove-snapshot"
)

// Pauser stops an activity at a named point. Production workers have none.
type Pauser interface {
	Pause(ctx context.Context, point string)
}

// PauseDir is a Pauser for fault tests, enabled in the worker only by
// CBTFLOW_TEST_PAUSE_DIR. When the file DIR/<point> exists, an activity
// reaching the point writes DIR/<point>.reached (holding the worker's
// PID) and waits until DIR/<point> is removed or its context ends — so a
// test can kill the worker exactly there, then remove the file to let the
// retry pass.
type PauseDir string

// Pause implements Pauser.
func (d PauseDir) Pause(ctx context.Context, point string) {
	gate := filepath.Join(string(d), point)
	if _, err := os.Stat(gate); err != nil {
		return
	}
	_ = os.WriteFile(gate+".reached", []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o644)
	for {
		if _, err := os.Stat(gate); errors.Is(err, os.ErrNotExist) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func pause(p Pauser, ctx context.Context, point string) {
	if p != nil {
		p.Pause(ctx, point)
	}
}
