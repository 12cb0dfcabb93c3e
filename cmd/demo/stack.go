package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// stack is the demo's own local stack, run by scripts/dev with a state
// folder, ports and database of its own, so that it never touches a
// `make dev` stack.
type stack struct {
	top          string // the checkout
	state        string // absolute state folder
	db           string
	temporalPort int
	uiPort       int
	labPort      int
	metricsPort  int
	env          []string // environment of bin/starter, from dev.env
}

// scrubbed is the process environment without the settings of cbtflow
// and Temporal clients: a shell that sourced .cbtflow/dev.env of the dev
// stack must not point the demo at that stack.
func scrubbed() []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "CBTFLOW_TEMPORAL_BIN" || (!strings.HasPrefix(k, "CBTFLOW_") && !strings.HasPrefix(k, "TEMPORAL_")) {
			out = append(out, kv)
		}
	}
	return out
}

// devEnv is the environment of scripts/dev for this stack.
func (s *stack) devEnv() []string {
	return append(scrubbed(),
		"CBTFLOW_STATE="+s.state,
		"CBTFLOW_DB="+s.db,
		"CBTFLOW_TEMPORAL_PORT="+strconv.Itoa(s.temporalPort),
		"CBTFLOW_UI_PORT="+strconv.Itoa(s.uiPort),
		"CBTFLOW_LAB_PORT="+strconv.Itoa(s.labPort),
		"CBTFLOW_METRICS_PORT="+strconv.Itoa(s.metricsPort),
	)
}

// dev runs `scripts/dev VERB` for this stack. Its output is kept and
// returned with the error only: the stack's logs live in the state folder.
func (s *stack) dev(ctx context.Context, verb string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(s.top, "scripts", "dev"), verb)
	cmd.Dir = s.top
	cmd.Env = s.devEnv()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	terminateOnCancel(cmd)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("scripts/dev %s: %w\n%s", verb, err, strings.TrimSpace(out.String()))
	}
	return nil
}

// up wipes any earlier demo stack (its processes, state folder and
// database), starts a fresh one and loads its dev.env.
func (s *stack) up(ctx context.Context) error {
	if err := s.dev(ctx, "clean"); err != nil {
		return err
	}
	if err := s.dev(ctx, "up"); err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(s.state, "dev.env"))
	if err != nil {
		return err
	}
	vars, err := parseEnv(b)
	if err != nil {
		return fmt.Errorf("%s: %w", filepath.Join(s.state, "dev.env"), err)
	}
	s.env = scrubbed()
	for _, kv := range vars {
		s.env = append(s.env, kv[0]+"="+kv[1])
	}
	return nil
}

// down stops the stack and keeps its state (logs, repository) for a look
// afterwards. It gets its own context: it runs after Ctrl-C too.
func (s *stack) down() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return s.dev(ctx, "down")
}

// parseEnv reads the `export K=V` lines of a dev.env file. V may be in
// single quotes (no escapes inside, as the shell reads them) or plain.
func parseEnv(b []byte) ([][2]string, error) {
	var out [][2]string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		rest, ok := strings.CutPrefix(line, "export ")
		if !ok {
			return nil, fmt.Errorf("line %d: not an `export K=V` line: %q", n, line)
		}
		k, v, ok := strings.Cut(strings.TrimSpace(rest), "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t'\"") {
			return nil, fmt.Errorf("line %d: not an `export K=V` line: %q", n, line)
		}
		if strings.HasPrefix(v, "'") {
			if len(v) < 2 || !strings.HasSuffix(v, "'") || strings.Count(v, "'") != 2 {
				return nil, fmt.Errorf("line %d: unbalanced quotes in %q", n, line)
			}
			v = v[1 : len(v)-1]
		} else if strings.ContainsAny(v, " \t\"'$`\\") {
			return nil, fmt.Errorf("line %d: value needs shell quoting the demo does not parse: %q", n, line)
		}
		out = append(out, [2]string{k, v})
	}
	return out, sc.Err()
}

// starter runs bin/starter with the stack's environment and returns its
// stdout. Its log (stderr) is returned with the error only.
func (s *stack) starter(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(s.top, "bin", "starter"), args...)
	cmd.Dir = s.top
	cmd.Env = s.env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	terminateOnCancel(cmd)
	err := cmd.Run()
	if err != nil {
		err = &starterError{args: args, err: err, stderr: strings.TrimSpace(stderr.String())}
	}
	return stdout.Bytes(), err
}

// starterError is a failed bin/starter call with its log.
type starterError struct {
	args   []string
	err    error
	stderr string
}

func (e *starterError) Error() string {
	msg := fmt.Sprintf("bin/starter %s: %v", strings.Join(e.args, " "), e.err)
	if e.stderr != "" {
		msg += "\n" + e.stderr
	}
	return msg
}

func (e *starterError) Unwrap() error { return e.err }

// terminateOnCancel makes a canceled command get SIGTERM (a chance to
// clean up, e.g. bin/starter removing a partial restore) and SIGKILL
// only if it is still there 10 s later.
func terminateOnCancel(cmd *exec.Cmd) {
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
}
