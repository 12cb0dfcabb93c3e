package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// The worker's command line, on the real binary: help and the version on
// stdout with exit 0, a bad command line exits 2, the startup log names
// what the worker serves and never a password.

// buildWorker builds this package's binary into a folder of the test's
// (as a release build: no tags).
func buildWorker(t *testing.T) string {
	t.Helper()
	gobin, err := exec.LookPath("go") // go test puts GOROOT/bin on the PATH
	if err != nil {
		t.Fatalf("the go command is needed: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "worker")
	if out, err := exec.Command(gobin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestWorkerCommandLine runs the worker binary: help, version, usage
// errors, the startup log.
func TestWorkerCommandLine(t *testing.T) {
	bin := buildWorker(t)
	t.Run("help", func(t *testing.T) { testWorkerHelp(t, bin) })
	t.Run("version", func(t *testing.T) { testWorkerVersion(t, bin) })
	t.Run("usage-errors", func(t *testing.T) { testWorkerUsageErrors(t, bin) })
	t.Run("startup-log", func(t *testing.T) { testWorkerStartupLog(t, bin) })
}

type cliResult struct {
	code           int
	stdout, stderr string
}

// runWorker runs the worker binary bin with args and the environment plus
// env, in dir (the test's own folder when empty).
func runWorker(t *testing.T, bin, dir string, env []string, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(bin, args...)
	if dir == "" {
		dir = t.TempDir()
	}
	cmd.Dir = dir
	// The worker's settings come from the environment: the test's must
	// not leak in.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CBTFLOW_") && !strings.HasPrefix(kv, "TEMPORAL_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("worker %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return cliResult{code, stdout.String(), stderr.String()}
}

func testWorkerHelp(t *testing.T, bin string) {
	for _, arg := range []string{"--help", "-h", "-help"} {
		r := runWorker(t, bin, "", []string{"CBTFLOW_DATABASE_URL=postgres://cbtflow:s3cr3t-pw@db.example.com:5432/cbtflow"}, arg)
		if r.code != 0 {
			t.Errorf("worker %s: exit %d, want 0; stderr: %s", arg, r.code, r.stderr)
		}
		for _, want := range []string{"Usage:", "--metrics-addr", "--max-transfers", "--profile", "--database-url", "CBTFLOW_METRICS_ADDR", "--version"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("worker %s: stdout lacks %q:\n%s", arg, want, r.stdout)
			}
		}
		if r.stderr != "" {
			t.Errorf("worker %s wrote on stderr: %s", arg, r.stderr)
		}
		// The help shows defaults, from the environment: never a password.
		if strings.Contains(r.stdout, "s3cr3t-pw") {
			t.Errorf("worker %s shows the database password:\n%s", arg, r.stdout)
		}
		if !strings.Contains(r.stdout, "db.example.com") {
			t.Errorf("worker %s: the --database-url default from CBTFLOW_DATABASE_URL is not shown (redacted):\n%s", arg, r.stdout)
		}
	}
}

func testWorkerVersion(t *testing.T, bin string) {
	r := runWorker(t, bin, "", nil, "--version")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "worker ") || !strings.Contains(r.stdout, runtime.Version()) || !strings.Contains(r.stdout, "commit ") {
		t.Errorf("worker --version: exit %d, stdout %q, stderr %q; want exit 0 and \"worker VERSION (commit ...) %s ...\"", r.code, r.stdout, r.stderr, runtime.Version())
	}
}

// A bad command line exits 2, says what is wrong and where help is, and
// starts nothing.
func testWorkerUsageErrors(t *testing.T, bin string) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--no-such-flag"}, "unknown flag: --no-such-flag"},
		{[]string{"--max-transfers", "many"}, "--max-transfers"},
		{[]string{"--max-transfers", "0"}, "--max-transfers 0: at least 1"},
		// One dash, as the flag package took them before cobra.
		{[]string{"-max-transfers=0"}, "--max-transfers 0: at least 1"},
		{[]string{"-max-transfers", "0"}, "--max-transfers 0: at least 1"},
		{[]string{"-no-such-flag"}, "unknown shorthand flag"},
		{[]string{"serve"}, `unexpected argument "serve"`},
		{[]string{"--metrics-addr"}, "flag needs an argument"},
	} {
		r := runWorker(t, bin, "", nil, tc.args...)
		if r.code != 2 || !strings.Contains(r.stderr, tc.want) || !strings.Contains(r.stderr, "worker --help") || r.stdout != "" {
			t.Errorf("worker %v: exit %d, stdout %q, stderr %q; want exit 2 and %q with a pointer to --help on stderr", tc.args, r.code, r.stdout, r.stderr, tc.want)
		}
		if strings.Contains(r.stderr, "worker starting") {
			t.Errorf("worker %v started: %s", tc.args, r.stderr)
		}
	}
}

// The startup log says which Temporal, database, repository, profiles and
// metrics address the worker uses, and never the database's password;
// a catalog that cannot be reached stops it with exit 1.
func testWorkerStartupLog(t *testing.T, bin string) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "vcenters.json"), []byte(`{"profiles": {
		"prod": {"url": "https://vc1.example.com/sdk", "user": "backup@vsphere.local", "password_file": "pw", "insecure": true},
		"lab": {"url": "https://127.0.0.1:18989/sdk", "user": "u", "password_file": "pw", "insecure": true}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	// A port nothing listens on: the catalog cannot be reached.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	dbURL := "postgres://cbtflow:s3cr3t-pw@127.0.0.1:" + strconv.Itoa(port) + "/catalogdb?sslmode=disable&connect_timeout=5"
	r := runWorker(t, bin, dir, []string{
		"CBTFLOW_DATABASE_URL=" + dbURL,
		"TEMPORAL_ADDRESS=temporal.example.com:7233",
		"TEMPORAL_NAMESPACE=backups",
		"CBTFLOW_METRICS_ADDR=127.0.0.1:0",
	}, "--vcenters", "vcenters.json", "--repository", "repo", "--profile", "prod")
	if r.code != 1 {
		t.Errorf("worker with an unreachable catalog: exit %d, want 1; stderr:\n%s", r.code, r.stderr)
	}
	start, _, _ := strings.Cut(r.stderr, "\n")
	for _, want := range []string{
		`msg="worker starting"`,
		"temporal.address=temporal.example.com:7233", "temporal.namespace=backups", "temporal.task_queue=cbtflow",
		"database.host=127.0.0.1", "database.port=" + strconv.Itoa(port), "database.name=catalogdb", "database.user=cbtflow",
		"repository=" + filepath.Join(dir, "repo"),
		`profiles="lab=127.0.0.1:18989, prod=vc1.example.com"`,
		"metrics=127.0.0.1:0",
	} {
		if !strings.Contains(start, want) {
			t.Errorf("startup log lacks %s:\n%s", want, start)
		}
	}
	if strings.Contains(r.stderr, "s3cr3t-pw") {
		t.Errorf("the worker logged the database password:\n%s", r.stderr)
	}
}
