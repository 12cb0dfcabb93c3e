package stack_test

import (
	"context"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

func TestTemporalBinaryMissing(t *testing.T) {
	t.Setenv(stack.EnvTemporalBin, "/nonexistent/temporal")
	_, err := stack.TemporalBinary(context.Background())
	if err == nil || !strings.Contains(err.Error(), stack.EnvTemporalBin) {
		t.Fatalf("want an error naming %s, got %v", stack.EnvTemporalBin, err)
	}
}

// TestStackLifecycle starts a stack, kills and restarts the worker,
// restarts Temporal on the same db file, and (through stacktest) checks
// that Close leaves no process behind.
func TestStackLifecycle(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	env := strings.Join(s.Env(), "\n")
	for _, want := range []string{"TEMPORAL_ADDRESS=" + s.TemporalAddress(), "CBTFLOW_DATABASE_URL=", "CBTFLOW_VCENTERS=" + s.VCentersFile()} {
		if !strings.Contains(env, want) {
			t.Errorf("Env lacks %q:\n%s", want, env)
		}
	}
	if strings.Contains(env, s.Lab().Password()) {
		t.Error("Env holds the lab password")
	}
	b, err := os.ReadFile(s.VCentersFile())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), s.Lab().Password()) {
		t.Error("the profiles file holds the password itself")
	}

	// A workflow nobody serves stays running: it must survive a restart of
	// the server.
	run, err := s.Client().ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: "stack-test", TaskQueue: "stack-test-nobody"}, "NoSuchWorkflow")
	if err != nil {
		t.Fatal(err)
	}

	pid := s.WorkerPID()
	if pid == 0 {
		t.Fatal("no worker running")
	}
	step := time.Now()
	lap := func(what string) { t.Logf("%s: %s", what, time.Since(step).Round(time.Millisecond)); step = time.Now() }
	if err := s.KillWorker(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Fatalf("worker %d still alive after KillWorker", pid)
	}
	if err := s.StartWorker(ctx); err != nil {
		t.Fatal(err)
	}
	lap("worker killed and restarted")
	if s.WorkerPID() == pid || s.WorkerPID() == 0 {
		t.Fatalf("worker pid %d after restart (was %d)", s.WorkerPID(), pid)
	}

	if err := s.RestartTemporal(ctx); err != nil {
		t.Fatal(err)
	}
	lap("Temporal restarted")
	desc, err := s.Client().DescribeWorkflow(ctx, "stack-test", run.GetRunID())
	if err != nil {
		t.Fatalf("workflow lost across a Temporal restart: %v", err)
	}
	if st := desc.RawResponse.GetWorkflowExecutionInfo().GetStatus(); st != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
		t.Fatalf("workflow status %v after restart", st)
	}
	if err := s.Client().TerminateWorkflow(ctx, "stack-test", run.GetRunID(), "test over"); err != nil {
		t.Fatal(err)
	}

	// The worker reconnects by itself and still serves metrics.
	resp, err := http.Get(s.MetricsURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("metrics: %s", resp.Status)
	}
	res, err := s.Starter(ctx, "list", "--json")
	if err != nil || res.ExitCode != 0 || strings.TrimSpace(res.Stdout) != "[]" {
		t.Fatalf("starter list on a fresh stack: %v\n%s", err, res)
	}
	if left := s.Leftovers(); len(left) > 0 {
		t.Fatalf("leftover processes: %v", left)
	}
}

// A stack whose first pick of Temporal's port is taken by another process
// (as the dev server's own picks of free ports can be, on a busy machine)
// still comes up: the start that fails on it is tried again on another
// port.
func TestTemporalStartRetriesATakenPort(t *testing.T) {
	taken, takenPort := holdPort(t)
	stack.HandOutNext(takenPort)
	s := stacktest.New(t, stack.Options{NoWorker: true})
	if s.TemporalAddress() == taken {
		t.Fatalf("Temporal is said to serve on %s, the port the test holds", taken)
	}
	wantStartedTwice(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := s.Client().CheckHealth(ctx, &client.CheckHealthRequest{}); err != nil {
		t.Errorf("Temporal on %s: %v", s.TemporalAddress(), err)
	}
}

// holdPort listens on a free port of 127.0.0.1 until the test ends, as
// another process would that took it: its address and port.
func holdPort(t *testing.T) (string, int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String(), ln.Addr().(*net.TCPAddr).Port
}

// closedPort returns a port of 127.0.0.1 that was free a moment ago.
func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// wantStartedTwice checks that Temporal's log shows two starts, the first
// refused a port it was given.
func wantStartedTwice(t *testing.T, s *stack.Stack) {
	t.Helper()
	wantLogStartedTwice(t, "temporal", s.TemporalLog())
}

// wantLogStartedTwice checks that the log of process name shows two
// starts, the first refused a port it was given.
func wantLogStartedTwice(t *testing.T, name, path string) {
	t.Helper()
	log, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(log), "=== "+name+": starting"); n != 2 || !strings.Contains(string(log), "address already in use") {
		t.Errorf("the %s's log shows %d starts, want 2, the first refused its port:\n%s", name, n, log)
	}
}

// The same for the worker's metrics port: a worker whose first port for
// its metrics is taken is started again with another, and MetricsURL
// follows it. (A stack once failed so in CI: the port picked for the
// metrics was free, then taken before the worker bound it.)
func TestWorkerStartRetriesATakenMetricsPort(t *testing.T) {
	taken, takenPort := holdPort(t)
	grpcPort := closedPort(t)
	// Temporal's gRPC port first (free), then the metrics port (held here).
	stack.HandOutNext(grpcPort, takenPort)
	s := stacktest.New(t, stack.Options{})
	if strings.Contains(s.MetricsURL(), taken) {
		t.Fatalf("the worker's metrics are said to be at %s, the port the test holds", s.MetricsURL())
	}
	wantLogStartedTwice(t, "worker", s.WorkerLog())
	resp, err := http.Get(s.MetricsURL())
	if err != nil {
		t.Fatalf("the worker's metrics: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the worker's metrics at %s: %s", s.MetricsURL(), resp.Status)
	}
}

// The same for the Web UI's port: a stack with the Web UI whose first
// port for it is taken starts Temporal again with another.
func TestTemporalStartRetriesATakenUIPort(t *testing.T) {
	taken, takenPort := holdPort(t)
	grpcPort := closedPort(t)
	// The gRPC port first (free), then the Web UI's (held here).
	stack.HandOutNext(grpcPort, takenPort)
	s := stacktest.New(t, stack.Options{NoWorker: true, WebUI: true})
	if s.UIAddr() == taken {
		t.Fatalf("the Web UI is said to serve on %s, the port the test holds", taken)
	}
	wantStartedTwice(t, s)
	c, err := net.DialTimeout("tcp", s.UIAddr(), 10*time.Second)
	if err != nil {
		t.Fatalf("the Web UI on %s: %v", s.UIAddr(), err)
	}
	c.Close()
}
