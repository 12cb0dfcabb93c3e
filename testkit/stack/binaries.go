package stack

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
)

// Environment variables that name prebuilt programs.
const (
	EnvTemporalBin = "CBTFLOW_TEMPORAL_BIN"
	EnvWorkerBin   = "CBTFLOW_WORKER_BIN"
	EnvStarterBin  = "CBTFLOW_STARTER_BIN"
)

// Binaries are the programs a stack runs.
type Binaries struct {
	Temporal string // the Temporal CLI (v1.5.1)
	Worker   string // cbtflow's worker
	Starter  string // cbtflow's CLI
}

// TemporalBinary finds the Temporal CLI: $CBTFLOW_TEMPORAL_BIN, else
// $(go env GOPATH)/bin/temporal, else temporal on the PATH. It never
// downloads: a missing CLI is an error that says how to install it.
func TemporalBinary(ctx context.Context) (string, error) {
	if p := os.Getenv(EnvTemporalBin); p != "" {
		if err := executable(p); err != nil {
			return "", fmt.Errorf("stack: %s=%s: %w", EnvTemporalBin, p, err)
		}
		return p, nil
	}
	var tried []string
	if goBin, err := goTool(); err == nil {
		if out, err := exec.CommandContext(ctx, goBin, "env", "GOPATH").Output(); err == nil {
			for _, dir := range filepath.SplitList(strings.TrimSpace(string(out))) {
				p := filepath.Join(dir, "bin", "temporal")
				tried = append(tried, p)
				if executable(p) == nil {
					return p, nil
				}
			}
		}
	}
	if p, err := exec.LookPath("temporal"); err == nil {
		return p, nil
	}
	tried = append(tried, "temporal on the PATH")
	return "", fmt.Errorf("stack: the Temporal CLI is missing (tried %s): run make deps, "+
		"or go install github.com/temporalio/cli/cmd/temporal@v1.5.1, or set %s", strings.Join(tried, ", "), EnvTemporalBin)
}

func executable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return errors.New("not an executable file")
	}
	return nil
}

// goTool finds the go command (go test puts GOROOT/bin first on the PATH).
func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	if root := os.Getenv("GOROOT"); root != "" {
		p := filepath.Join(root, "bin", "go")
		if executable(p) == nil {
			return p, nil
		}
	}
	return "", errors.New("stack: the go command is not on the PATH")
}

// BuildBinaries finds the Temporal CLI and provides the worker and the
// starter: $CBTFLOW_WORKER_BIN and $CBTFLOW_STARTER_BIN when set, else
// built with `go build -tags faultpoint.Tag` into dir from the module
// that contains the current directory (tests run in their package's
// folder). The tag gives the worker its fault points (Options.FaultPoints);
// release builds (make build) never have them. A prebuilt worker needs the
// tag only for a stack with fault points (make chaos builds one so).
func BuildBinaries(ctx context.Context, dir string) (Binaries, error) {
	var b Binaries
	var err error
	if b.Temporal, err = TemporalBinary(ctx); err != nil {
		return b, err
	}
	b.Worker, b.Starter = os.Getenv(EnvWorkerBin), os.Getenv(EnvStarterBin)
	var pkgs []string
	if b.Worker == "" {
		pkgs = append(pkgs, "github.com/cbtflow/cbtflow/worker")
		b.Worker = filepath.Join(dir, "worker")
	} else if err := executable(b.Worker); err != nil {
		return b, fmt.Errorf("stack: %s=%s: %w", EnvWorkerBin, b.Worker, err)
	}
	if b.Starter == "" {
		pkgs = append(pkgs, "github.com/cbtflow/cbtflow/starter")
		b.Starter = filepath.Join(dir, "starter")
	} else if err := executable(b.Starter); err != nil {
		return b, fmt.Errorf("stack: %s=%s: %w", EnvStarterBin, b.Starter, err)
	}
	if len(pkgs) == 0 {
		return b, nil
	}
	goBin, err := goTool()
	if err != nil {
		return b, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return b, fmt.Errorf("stack: %w", err)
	}
	cmd := exec.CommandContext(ctx, goBin, append([]string{"build", "-tags", faultpoint.Tag, "-o", dir + string(filepath.Separator)}, pkgs...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return b, fmt.Errorf("stack: go build %s: %w\n%s", strings.Join(pkgs, " "), err, out)
	}
	return b, nil
}
