package stack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"time"
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
	cmd := exec.CommandContext(ctx, s.opts.Binaries.Starter, args...)
	cmd.Env = childEnv(append(s.Env(), "TMPDIR="+s.tmpDir)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	if err := spawn(cmd); err != nil {
		return StarterResult{}, fmt.Errorf("stack: run starter: %w", err)
	}
	err := cmd.Wait()
	res := StarterResult{Stdout: stdout.String(), Stderr: stderr.String(), Duration: time.Since(start), ExitCode: cmd.ProcessState.ExitCode()}
	if ctx.Err() != nil {
		return res, fmt.Errorf("stack: starter %v: %w", args, ctx.Err())
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		return res, fmt.Errorf("stack: starter %v: %w", args, err)
	}
	if res.ExitCode < 0 {
		return res, fmt.Errorf("stack: starter %v: %s", args, cmd.ProcessState)
	}
	return res, nil
}
