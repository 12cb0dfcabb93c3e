package stack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"time"

	"github.com/cbtflow/cbtflow/internal/child"
)

// StarterResult is what one run of the starter CLI did.
type StarterResult struct {
	Stdout, Stderr string
	ExitCode       int
	Duration       time.Duration
}

func (r StarterResult) String() string {
	return fmt.Sprintf("exit %d after %s\nstdout: %s\nstderr: %s", r.ExitCode, r.Duration.Round(time.Millisecond), r.Stdout, r.Stderr)
}

// Starter runs the starter CLI with args against this stack (Env) and
// returns its output and exit code. The error is only for a starter that
// could not run or was stopped by ctx, not for a non-zero exit.
func (s *Stack) Starter(ctx context.Context, args ...string) (StarterResult, error) {
	r, err := s.StartStarter(args...)
	if err != nil {
		return StarterResult{}, err
	}
	return r.Wait(ctx)
}

// RunningStarter is a starter CLI started by StartStarter and not yet
// waited for.
type RunningStarter struct {
	cmd            *exec.Cmd
	args           []string
	stdout, stderr lockedBuffer
	start          time.Time
}

// lockedBuffer is written by exec's copying goroutine while a test reads
// it (RunningStarter.Stderr).
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// StartStarter starts the starter CLI with args against this stack and
// returns at once, for tests that act on it while it runs (signal a
// waiting backup). Call Wait to collect it.
func (s *Stack) StartStarter(args ...string) (*RunningStarter, error) {
	return s.startStarter(nil, args)
}

// StartStarterOn is StartStarter with the starter's stdout on tty (the
// slave of a pseudo-terminal, for what the starter shows only on a
// terminal).
func (s *Stack) StartStarterOn(tty *os.File, args ...string) (*RunningStarter, error) {
	return s.startStarter(tty, args)
}

func (s *Stack) startStarter(tty *os.File, args []string) (*RunningStarter, error) {
	r := &RunningStarter{args: args}
	r.cmd = exec.Command(s.opts.Binaries.Starter, args...)
	env := append(s.Env(), "TMPDIR="+s.tmpDir)
	r.cmd.Stdout, r.cmd.Stderr = &r.stdout, &r.stderr
	if tty != nil {
		r.cmd.Stdout = tty
		env = append(env, "TERM=xterm")
	}
	r.cmd.Env = childEnv(env...)
	r.start = time.Now()
	if err := child.Start(r.cmd); err != nil {
		return nil, fmt.Errorf("stack: run starter: %w", err)
	}
	return r, nil
}

// PID is the starter's process ID.
func (r *RunningStarter) PID() int { return r.cmd.Process.Pid }

// Stderr is what the starter wrote to stderr so far (its log), e.g. to
// wait until it logged that a backup started.
func (r *RunningStarter) Stderr() string { return r.stderr.String() }

// Stdout is what the starter wrote to stdout so far (not on a terminal).
func (r *RunningStarter) Stdout() string { return r.stdout.String() }

// Signal sends sig to the starter.
func (r *RunningStarter) Signal(sig os.Signal) error {
	if err := r.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("stack: signal starter %v: %w", r.args, err)
	}
	return nil
}

// Wait waits for the starter to exit and returns its output and exit
// code; when ctx ends first, it kills the starter. The error is only for
// a starter that could not be waited for, was killed (by ctx or a signal
// it did not handle), not for a non-zero exit.
func (r *RunningStarter) Wait(ctx context.Context) (StarterResult, error) {
	done := make(chan error, 1)
	go func() { done <- r.cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = r.cmd.Process.Kill()
		err = <-done
	}
	res := StarterResult{Stdout: r.stdout.String(), Stderr: r.stderr.String(), Duration: time.Since(r.start), ExitCode: r.cmd.ProcessState.ExitCode()}
	if ctx.Err() != nil {
		return res, fmt.Errorf("stack: starter %v: %w", r.args, ctx.Err())
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		return res, fmt.Errorf("stack: starter %v: %w", r.args, err)
	}
	if res.ExitCode < 0 {
		return res, fmt.Errorf("stack: starter %v: %s", r.args, r.cmd.ProcessState)
	}
	return res, nil
}
