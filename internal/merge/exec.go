package merge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/cbtflow/cbtflow/internal/child"
	"github.com/cbtflow/cbtflow/internal/qemu"
)

// started, when set (by tests), is called with the step's name and the
// pid of its qemu-img once that is started.
var started func(step string, pid int)

// runImg runs qemu-img with args; the child is killed (SIGKILL) when ctx
// ends and when the worker dies. okExit lists exit codes other than 0 that
// still count as success (their output is returned with the code).
func runImg(ctx context.Context, step string, args []string, okExit ...int) ([]byte, int, error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, fmt.Errorf("merge: %s: %w", step, err)
	}
	cmd := exec.CommandContext(ctx, qemu.QemuImg, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = childEnv(os.Environ())
	cmd.WaitDelay = 10 * time.Second
	if err := child.Start(cmd); err != nil {
		return nil, 0, fmt.Errorf("merge: %s: start qemu-img: %w", step, err)
	}
	if started != nil {
		started(step, cmd.Process.Pid)
	}
	err := cmd.Wait()
	if ctx.Err() != nil {
		return nil, 0, fmt.Errorf("merge: %s: qemu-img killed: %w", step, ctx.Err())
	}
	if err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			for _, c := range okExit {
				if exit.ExitCode() == c {
					return stdout.Bytes(), c, nil
				}
			}
		}
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(stdout.String())
		}
		return nil, 0, fmt.Errorf("merge: %s: qemu-img %s: %w: %s", step, strings.Join(args, " "), err, msg)
	}
	return stdout.Bytes(), 0, nil
}

// childEnv drops variables that may hold secrets: qemu-img never needs
// them, and a child's environment is readable by its user.
func childEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		up := strings.ToUpper(name)
		if strings.Contains(up, "PASSWORD") || strings.Contains(up, "SECRET") || strings.Contains(up, "TOKEN") {
			continue
		}
		out = append(out, kv)
	}
	return out
}
