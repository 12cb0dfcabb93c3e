package stack

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// PauseGates drives the worker's test-only pause points (the folder of
// CBTFLOW_TEST_PAUSE_DIR, see activities.PauseDir): Arm a point, Wait
// until an activity stands at it, act (kill the worker, cut the database),
// then Release it.
type PauseGates struct {
	Dir string
}

// Pauses returns the stack's pause gates; the worker honours them only
// when the stack was started with Options.PausePoints.
func (s *Stack) Pauses() PauseGates { return PauseGates{Dir: filepath.Join(s.dir, "pause")} }

// Arm makes the next activity that reaches point stop there.
func (g PauseGates) Arm(point string) error {
	if err := g.check(point); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(g.Dir, point+".reached"))
	if err := os.WriteFile(filepath.Join(g.Dir, point), nil, 0o600); err != nil {
		return fmt.Errorf("stack: arm pause point: %w", err)
	}
	return nil
}

// Wait waits until an activity stands at point, and returns the pid of the
// worker that holds it.
func (g PauseGates) Wait(ctx context.Context, point string) (pid int, err error) {
	if err := g.check(point); err != nil {
		return 0, err
	}
	reached := filepath.Join(g.Dir, point+".reached")
	for {
		if b, err := os.ReadFile(reached); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				return pid, nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("stack: pause point %s not reached: %w", point, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Reached reports whether an activity reached point since it was armed.
func (g PauseGates) Reached(point string) bool {
	_, err := os.Stat(filepath.Join(g.Dir, point+".reached"))
	return err == nil
}

// Release lets the activity at point (if any) go on, and disarms point:
// later attempts pass it.
func (g PauseGates) Release(point string) error {
	if err := g.check(point); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(g.Dir, point)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stack: release pause point: %w", err)
	}
	_ = os.Remove(filepath.Join(g.Dir, point+".reached"))
	return nil
}

func (g PauseGates) check(point string) error {
	if g.Dir == "" || point == "" || strings.ContainsAny(point, `/\`) || strings.HasPrefix(point, ".") {
		return fmt.Errorf("stack: pause point %q in %q", point, g.Dir)
	}
	return nil
}
