package stack

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/operatorservice/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	tlog "go.temporal.io/sdk/log"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
	"github.com/cbtflow/cbtflow/workflows"
)

// Profile is the name of the lab's vCenter profile in the profiles file.
const Profile = "lab"

// Namespace is the Temporal namespace the stack uses (the dev server's).
const Namespace = "default"

// TemporalDynamicConfig is the dynamic configuration cbtflow's Temporal
// servers run with, here and wherever one is started (scripts/dev for
// make dev and the demo, deploy/temporal/dynamicconfig.yaml for docker
// compose; a test checks they agree): activity eager execution, off by
// default in the server, hands an activity that a workflow task schedules
// on the worker's own task queue back to that worker in the answer to the
// task's completion (the SDK asks for it when the worker has a free
// slot), instead of through the task queue: each step of a backup starts
// one round trip through the server sooner.
var TemporalDynamicConfig = map[string]string{
	"system.enableActivityEagerExecution": "true",
}

// TemporalDynamicConfigArgs are TemporalDynamicConfig as arguments of
// `temporal server start-dev`.
func TemporalDynamicConfigArgs() []string {
	var args []string
	for _, k := range slices.Sorted(maps.Keys(TemporalDynamicConfig)) {
		args = append(args, "--dynamic-config-value", k+"="+TemporalDynamicConfig[k])
	}
	return args
}

// Options configure Start.
type Options struct {
	// Dir is the state folder: Temporal's database (temporal.db; while
	// the stack runs a symbolic link to it in TemporalDBTmpfs, see
	// TemporalDBOnDisk), the lab's disks, the repository, the profiles
	// file, every log. Required; it is kept after Close (for
	// post-mortems), Temporal's database in it, and may be reused by a
	// later stack.
	Dir string
	// DatabaseURL is the catalog's PostgreSQL database, typically a fresh
	// one from CreateDatabase. Required.
	DatabaseURL string
	// Binaries to run; Temporal, Worker and Starter are required (see
	// BuildBinaries).
	Binaries Binaries
	// WebUI serves the Temporal Web UI on a free port (UIAddr); headless
	// otherwise.
	WebUI bool
	// LabMaxExtentsPerPage caps the extents per QueryChangedDiskAreas answer
	// (lab.Options.MaxExtentsPerPage).
	LabMaxExtentsPerPage int
	// NoWorker leaves the worker stopped after Start (StartWorker starts it).
	NoWorker bool
	// FaultPoints gives the worker fault points (internal/faultpoint) in
	// the folder STATE/faultpoints, which FaultPoints drives. The worker
	// must be built with the tag faultpoint.Tag, as BuildBinaries builds
	// it; Start refuses one built without.
	FaultPoints bool
	// LabSourceFilters are the lab's source filters (nbdkit filters the
	// worker's lab source puts in front of every snapshot image, e.g. EIO
	// on some reads; lab.Options.SourceFilters). They are the lab's, not
	// the profile's: production profiles have no fault settings.
	LabSourceFilters []labapi.Filter
	// LabAliases are more profile names for the lab: the lab profile again
	// under each name (same URL, user, password file), as when one vCenter
	// is configured twice (two users, two URLs).
	LabAliases []string
	// StartTimeout bounds each component's start; 2 minutes when zero.
	StartTimeout time.Duration
	// TemporalDBOnDisk keeps the Temporal dev server's database in the
	// state folder while the stack runs. By default it is in a folder of
	// the stack's own in TemporalDBTmpfs (in memory), where its fsyncs
	// do not wait behind the writeback of the backups on the state
	// folder's disk; Close copies it into the state folder and removes
	// that folder. Without a writable TemporalDBTmpfs it stays on disk
	// all the same (stack.log says so).
	TemporalDBOnDisk bool
}

// Stack is a running cbtflow stack. Its methods are safe for concurrent
// use.
type Stack struct {
	opts        Options
	dir         string
	tmpDir      string // the worker's TMPDIR: short, for unix socket paths
	lab         *lab.Lab
	labLog      *os.File
	clientLog   *os.File
	log         *slog.Logger // STATE/stack.log: what the stack did, when
	stackLog    *os.File
	client      client.Client
	grpcPort    int
	uiPort      int
	metricsAddr string
	vcenters    string
	repository  string
	// temporalDBDir is the stack's folder in TemporalDBTmpfs that holds
	// Temporal's database, "" when it is in the state folder.
	temporalDBDir string

	mu       sync.Mutex
	temporal *proc
	worker   *proc
	closed   bool
	started  []*proc // every process the stack started
}

// Start starts Temporal, the lab and (unless NoWorker) the worker. On
// failure everything started is stopped again.
func Start(ctx context.Context, opts Options) (s *Stack, err error) {
	if opts.Dir == "" || opts.DatabaseURL == "" {
		return nil, errors.New("stack: Options.Dir and Options.DatabaseURL are required")
	}
	if opts.Binaries.Temporal == "" || opts.Binaries.Worker == "" || opts.Binaries.Starter == "" {
		return nil, errors.New("stack: Options.Binaries must name the temporal, worker and starter programs (see BuildBinaries)")
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 2 * time.Minute
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("stack: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("stack: %w", err)
	}
	s = &Stack{log: slog.New(slog.DiscardHandler), opts: opts, dir: dir, repository: filepath.Join(dir, "repository"), vcenters: filepath.Join(dir, "vcenters.json")}
	defer func() {
		if err != nil {
			err = errors.Join(err, s.Close())
			s = nil
		}
	}()
	if s.stackLog, err = os.OpenFile(filepath.Join(dir, "stack.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
		return s, fmt.Errorf("stack: %w", err)
	}
	s.log = slog.New(slog.NewTextHandler(s.stackLog, nil))
	if s.tmpDir, err = os.MkdirTemp("", "cbtstack-"); err != nil {
		return s, fmt.Errorf("stack: %w", err)
	}
	if err := s.setupTemporalDB(); err != nil {
		return s, err
	}
	if err := os.MkdirAll(s.repository, 0o700); err != nil {
		return s, fmt.Errorf("stack: %w", err)
	}
	if opts.FaultPoints {
		if err := checkFaultPoints(opts.Binaries.Worker); err != nil {
			return s, err
		}
		if err := os.MkdirAll(s.FaultPoints().Dir, 0o700); err != nil {
			return s, fmt.Errorf("stack: %w", err)
		}
	}
	if s.grpcPort, err = freePort(); err != nil {
		return s, err
	}
	if opts.WebUI {
		if s.uiPort, err = freePort(); err != nil {
			return s, err
		}
	}

	if err := s.startTemporalRetrying(ctx, true); err != nil {
		return s, err
	}
	if err := s.startLab(ctx); err != nil {
		return s, err
	}
	if !opts.NoWorker {
		if err := s.StartWorker(ctx); err != nil {
			return s, err
		}
	}
	return s, nil
}

func (s *Stack) startLab(ctx context.Context) error {
	var err error
	if s.labLog, err = os.OpenFile(filepath.Join(s.dir, "lab.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
		return fmt.Errorf("stack: %w", err)
	}
	s.lab, err = lab.Start(ctx, lab.Options{
		Dir:               filepath.Join(s.dir, "lab"),
		MaxExtentsPerPage: s.opts.LabMaxExtentsPerPage,
		SourceFilters:     s.opts.LabSourceFilters,
		Logger:            slog.New(slog.NewTextHandler(s.labLog, nil)),
	})
	if err != nil {
		return fmt.Errorf("stack: start the lab: %w", err)
	}
	pwFile := filepath.Join(s.dir, "lab.password")
	if err := os.WriteFile(pwFile, []byte(s.lab.Password()+"\n"), 0o600); err != nil {
		return fmt.Errorf("stack: %w", err)
	}
	labp := vsphere.Profile{
		URL: s.lab.URL().String(), User: s.lab.User(), PasswordFile: pwFile,
		Thumbprint: s.lab.Thumbprint(), Source: vsphere.SourceLab,
	}
	prof := map[string]map[string]vsphere.Profile{"profiles": {Profile: labp}}
	for _, name := range s.opts.LabAliases {
		if _, dup := prof["profiles"][name]; dup {
			return fmt.Errorf("stack: lab alias %q is taken", name)
		}
		prof["profiles"][name] = labp
	}
	b, err := json.MarshalIndent(prof, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(s.vcenters, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("stack: %w", err)
	}
	if _, err := vsphere.LoadProfiles(s.vcenters); err != nil {
		return fmt.Errorf("stack: the profiles file it wrote is refused: %w", err)
	}
	return nil
}

// Dir is the state folder.
func (s *Stack) Dir() string { return s.dir }

// Lab is the lab vCenter.
func (s *Stack) Lab() *lab.Lab { return s.lab }

// Client is a Temporal client of the stack's server; it reconnects by
// itself after RestartTemporal. Close closes it.
func (s *Stack) Client() client.Client { return s.client }

// TemporalAddress is the Temporal frontend's host:port.
func (s *Stack) TemporalAddress() string { return "127.0.0.1:" + strconv.Itoa(s.grpcPort) }

// UIAddr is the Web UI's host:port, empty when headless.
func (s *Stack) UIAddr() string {
	if s.uiPort == 0 {
		return ""
	}
	return "127.0.0.1:" + strconv.Itoa(s.uiPort)
}

// MetricsURL is the worker's Prometheus endpoint; it keeps its address
// across worker restarts, unless a start found its port taken (StartWorker).
func (s *Stack) MetricsURL() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return "http://" + s.metricsAddr + "/metrics"
}

// Repository is the folder of restore points.
func (s *Stack) Repository() string { return s.repository }

// VCentersFile is the vCenter profiles file: Profile, and the same lab
// under each of Options.LabAliases.
func (s *Stack) VCentersFile() string { return s.vcenters }

// DatabaseURL is the catalog database.
func (s *Stack) DatabaseURL() string { return s.opts.DatabaseURL }

// Binaries are the programs the stack runs.
func (s *Stack) Binaries() Binaries { return s.opts.Binaries }

// WorkerLog and TemporalLog are the log files of those processes (every
// start appends).
func (s *Stack) WorkerLog() string   { return filepath.Join(s.dir, "worker.log") }
func (s *Stack) TemporalLog() string { return filepath.Join(s.dir, "temporal.log") }

// LabLog is the lab's log file.
func (s *Stack) LabLog() string { return filepath.Join(s.dir, "lab.log") }

// Env returns the environment variables that point cbtflow's CLI at this
// stack (NAME=value), as `. .cbtflow/dev.env` does for the dev stack.
func (s *Stack) Env() []string {
	return []string{
		"TEMPORAL_ADDRESS=" + s.TemporalAddress(),
		"TEMPORAL_NAMESPACE=" + Namespace,
		"CBTFLOW_DATABASE_URL=" + s.opts.DatabaseURL,
		"CBTFLOW_REPOSITORY=" + s.repository,
		"CBTFLOW_VCENTERS=" + s.vcenters,
		"CBTFLOW_PROFILE=" + Profile,
		"CBTFLOW_LAB_URL=" + s.lab.URL().String(),
		"CBTFLOW_LAB_THUMBPRINT=" + s.lab.Thumbprint(),
	}
}

// childEnv is the process environment with the stack's settings replacing
// any inherited cbtflow or Temporal setting.
func childEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "CBTFLOW_") || strings.HasPrefix(name, "TEMPORAL_") || name == "TMPDIR" {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// StartTemporal starts the Temporal dev server on the stack's port and
// database (STATE/temporal.db, see TemporalDB: the state survives a
// restart) and waits until it serves the namespace with cbtflow's search
// attributes.
//
// The dev server picks free ports of its own (its HTTP API, its metrics,
// its internal services), and another process may bind one between its
// pick and its bind: a start that ends so ("address already in use") is
// tried again, up to startAttempts times.
func (s *Stack) StartTemporal(ctx context.Context) error {
	return s.startTemporalRetrying(ctx, false)
}

// startTemporalRetrying is StartTemporal; newPort: a start whose port was
// taken is tried again on another gRPC port, and Web UI port, too (the
// stack's first start, before anything knows them).
func (s *Stack) startTemporalRetrying(ctx context.Context, newPort bool) error {
	return s.startRetrying(s.TemporalLog(), func() *proc { return s.temporal }, func() error { return s.startTemporal(ctx) }, func() error {
		if !newPort {
			return nil
		}
		// Which of its ports was taken, the log does not say plainly:
		// the gRPC port and the Web UI's are picked again.
		port, err := freePort()
		if err != nil {
			return err
		}
		s.grpcPort = port
		if s.uiPort != 0 {
			if s.uiPort, err = freePort(); err != nil {
				return err
			}
		}
		if s.client != nil {
			s.client.Close()
			s.client = nil
		}
		return nil
	})
}

// startRetrying runs start, the start of a process whose log is log and
// which started returns (read under s.mu), until it succeeds, fails
// otherwise than on a port taken meanwhile (portTaken), or has failed
// startAttempts times; before each new start, repick picks other ports.
// The error is the last start's.
func (s *Stack) startRetrying(log string, started func() *proc, start, repick func() error) error {
	for attempt := 1; ; attempt++ {
		from, _ := fileSize(log)
		err := start()
		s.mu.Lock()
		p := started()
		s.mu.Unlock()
		if err == nil || attempt == startAttempts || !portTaken(p, log, from) {
			return err
		}
		if rerr := repick(); rerr != nil {
			return err
		}
	}
}

// startAttempts bounds the starts of Temporal, and of the worker, that
// fail on a port taken meanwhile.
const startAttempts = 3

// portTaken reports whether process p has exited and its log, from offset
// from on, says a port it was to bind was taken.
func portTaken(p *proc, log string, from int64) bool {
	if p == nil || !p.exited() {
		return false
	}
	b, err := os.ReadFile(log)
	if err != nil || int64(len(b)) < from {
		return false
	}
	return bytes.Contains(b[from:], []byte("address already in use"))
}

func fileSize(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (s *Stack) startTemporal(ctx context.Context) error {
	s.mu.Lock()
	if s.temporal != nil && !s.temporal.exited() {
		s.mu.Unlock()
		return errors.New("stack: Temporal is running already")
	}
	args := []string{"server", "start-dev", "--ip", "127.0.0.1", "--port", strconv.Itoa(s.grpcPort),
		"--db-filename", filepath.Join(s.dir, temporalDBName), "--log-level", "warn"}
	if s.uiPort != 0 {
		args = append(args, "--ui-port", strconv.Itoa(s.uiPort))
	} else {
		args = append(args, "--headless")
	}
	for _, a := range workflows.SearchAttributeNames {
		args = append(args, "--search-attribute", a+"=Keyword")
	}
	args = append(args, TemporalDynamicConfigArgs()...)
	// The CLI reads no config file or profile of the user's.
	env := childEnv("HOME=" + s.tmpDir)
	p, err := startProc("temporal", s.opts.Binaries.Temporal, args, env, s.TemporalLog())
	if err != nil {
		s.mu.Unlock()
		return err
	}
	s.temporal = p
	s.started = append(s.started, p)
	s.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, s.opts.StartTimeout)
	defer cancel()
	if err := s.waitTemporal(ctx, p); err != nil {
		return fmt.Errorf("stack: Temporal did not start (see %s): %w", s.TemporalLog(), err)
	}
	return nil
}

func (s *Stack) waitTemporal(ctx context.Context, p *proc) error {
	for !portAnswers(s.TemporalAddress()) {
		if p.exited() {
			return fmt.Errorf("exited: %v", p.err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	if s.client == nil {
		if s.clientLog == nil {
			f, err := os.OpenFile(filepath.Join(s.dir, "client.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
			if err != nil {
				return err
			}
			s.clientLog = f
		}
		logger := tlog.NewStructuredLogger(slog.New(slog.NewTextHandler(s.clientLog, &slog.HandlerOptions{Level: slog.LevelWarn})))
		for {
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			c, err := client.DialContext(dctx, client.Options{HostPort: s.TemporalAddress(), Namespace: Namespace, Logger: logger})
			cancel()
			if err == nil {
				s.client = c
				break
			}
			if p.exited() {
				return fmt.Errorf("exited: %v", p.err)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	// Ready: the namespace answers and knows the search attributes.
	var last error
	for {
		if p.exited() {
			return fmt.Errorf("exited: %v", p.err)
		}
		last = s.checkTemporal(ctx)
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (s *Stack) checkTemporal(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := s.client.WorkflowService().DescribeNamespace(cctx, &workflowservice.DescribeNamespaceRequest{Namespace: Namespace}); err != nil {
		return err
	}
	sa, err := s.client.OperatorService().ListSearchAttributes(cctx, &operatorservice.ListSearchAttributesRequest{Namespace: Namespace})
	if err != nil {
		return err
	}
	for _, name := range workflows.SearchAttributeNames {
		if t, ok := sa.CustomAttributes[name]; !ok || t != enumspb.INDEXED_VALUE_TYPE_KEYWORD {
			return fmt.Errorf("search attribute %s is not registered as a keyword", name)
		}
	}
	return nil
}

// StopTemporal stops the Temporal server: SIGTERM (then SIGKILL after 20
// s), or SIGKILL at once when kill is set.
func (s *Stack) StopTemporal(kill bool) error {
	s.mu.Lock()
	p := s.temporal
	s.mu.Unlock()
	if p == nil {
		return nil
	}
	if kill {
		return p.stop(syscall.SIGKILL, 0)
	}
	return p.stop(syscall.SIGTERM, 20*time.Second)
}

// RestartTemporal stops the Temporal server gracefully and starts it again
// on the same port and database: workflows, schedules and search attributes
// survive; Client reconnects.
func (s *Stack) RestartTemporal(ctx context.Context) error {
	if err := s.StopTemporal(false); err != nil {
		return err
	}
	return s.StartTemporal(ctx)
}

// StartWorker starts the worker process and waits until it polls the task
// queue. Its metrics port is picked at its first start, after Temporal's
// (whose own picks of free ports could otherwise take it); a start that
// fails because the port was taken meanwhile ("address already in use") is
// tried again on another, up to startAttempts times. MetricsURL follows.
func (s *Stack) StartWorker(ctx context.Context) error {
	return s.startRetrying(s.WorkerLog(), func() *proc { return s.worker }, func() error { return s.startWorker(ctx) }, func() error {
		s.mu.Lock()
		s.metricsAddr = ""
		s.mu.Unlock()
		return nil
	})
}

func (s *Stack) startWorker(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("stack: closed")
	}
	if s.worker != nil && !s.worker.exited() {
		s.mu.Unlock()
		return errors.New("stack: the worker is running already")
	}
	if s.metricsAddr == "" {
		port, err := freePort()
		if err != nil {
			s.mu.Unlock()
			return err
		}
		s.metricsAddr = "127.0.0.1:" + strconv.Itoa(port)
	}
	extra := append(s.Env(), "CBTFLOW_METRICS_ADDR="+s.metricsAddr, "TMPDIR="+s.tmpDir)
	if s.opts.FaultPoints {
		extra = append(extra, faultpoint.EnvDir+"="+s.FaultPoints().Dir)
	}
	env := childEnv(extra...)
	p, err := startProc("worker", s.opts.Binaries.Worker, nil, env, s.WorkerLog())
	if err != nil {
		s.mu.Unlock()
		return err
	}
	s.worker = p
	s.started = append(s.started, p)
	s.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, s.opts.StartTimeout)
	defer cancel()
	if err := s.waitWorker(ctx, p); err != nil {
		return fmt.Errorf("stack: the worker did not start (see %s): %w", s.WorkerLog(), err)
	}
	return nil
}

// waitWorker waits for the metrics endpoint and for this process among the
// pollers of both task queue types (the SDK's identity starts "PID@").
func (s *Stack) waitWorker(ctx context.Context, p *proc) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	id := strconv.Itoa(p.pid()) + "@"
	var last error
	for {
		if p.exited() {
			return fmt.Errorf("exited: %v", p.err)
		}
		last = func() error {
			resp, err := hc.Get(s.MetricsURL())
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("metrics: %s", resp.Status)
			}
			for _, tq := range []enumspb.TaskQueueType{enumspb.TASK_QUEUE_TYPE_WORKFLOW, enumspb.TASK_QUEUE_TYPE_ACTIVITY} {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				d, err := s.client.DescribeTaskQueue(cctx, workflows.TaskQueue, tq)
				cancel()
				if err != nil {
					return err
				}
				found := false
				for _, pi := range d.GetPollers() {
					if strings.HasPrefix(pi.GetIdentity(), id) {
						found = true
					}
				}
				if !found {
					return fmt.Errorf("no %s poller with identity %s*", tq, id)
				}
			}
			return nil
		}()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// MoveRepository stops the worker, moves the repository folder to dir (a
// path that must not exist yet) and starts the worker on it: what an
// operator does when a repository moves to another disk or mount point.
// Nothing else may use the stack meanwhile.
func (s *Stack) MoveRepository(ctx context.Context, dir string) error {
	if err := s.StopWorker(30 * time.Second); err != nil {
		return err
	}
	s.mu.Lock()
	err := os.Rename(s.repository, dir)
	if err == nil {
		s.repository = dir
	}
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("stack: move repository: %w", err)
	}
	return s.StartWorker(ctx)
}

// WorkerPID is the pid of the running worker, 0 when none runs.
func (s *Stack) WorkerPID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.worker == nil || s.worker.exited() {
		return 0
	}
	return s.worker.pid()
}

// TemporalPID is the pid of the running Temporal dev server, 0 when none
// runs.
func (s *Stack) TemporalPID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.temporal == nil || s.temporal.exited() {
		return 0
	}
	return s.temporal.pid()
}

// KillWorker kills the worker with SIGKILL, as a crash would, and waits
// for it to exit. Its qemu-nbd and nbdkit die by their parent-death
// signal, not by any cleanup of the worker.
func (s *Stack) KillWorker() error {
	s.mu.Lock()
	p := s.worker
	s.mu.Unlock()
	if p == nil || p.exited() {
		return fmt.Errorf("stack: worker: %w", errNotRunning)
	}
	return p.stop(syscall.SIGKILL, 0)
}

// StopWorker stops the worker with SIGTERM (SIGKILL after grace).
func (s *Stack) StopWorker(grace time.Duration) error {
	s.mu.Lock()
	p := s.worker
	s.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.stop(syscall.SIGTERM, grace)
}

// Leftovers lists processes that belong to the stack's folders (a worker's
// qemu-nbd or nbdkit, a server) other than the running worker and Temporal.
func (s *Stack) Leftovers() []Proc {
	s.mu.Lock()
	own := map[int]bool{}
	for _, p := range []*proc{s.worker, s.temporal} {
		if p != nil && !p.exited() {
			own[p.pid()] = true
		}
	}
	s.mu.Unlock()
	var out []Proc
	for _, p := range ProcsMentioning(s.needles()...) {
		if !own[p.Pid] {
			out = append(out, p)
		}
	}
	return out
}

// needles are what the command line of a process of this stack contains.
func (s *Stack) needles() []string {
	n := []string{s.dir + string(filepath.Separator)}
	if s.tmpDir != "" {
		n = append(n, s.tmpDir+string(filepath.Separator))
	}
	return n
}

// Close stops the worker, the Temporal server and the lab, then checks
// that no process of the stack is left: one that is gets killed (by pid)
// and reported in the error. The state folder is kept, Temporal's
// database copied into it from TemporalDBTmpfs, whose folder of the
// stack's is removed, as is the worker's TMPDIR.
func (s *Stack) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	var errs []error
	s.log.Info("closing")
	if err := s.StopWorker(30 * time.Second); err != nil {
		errs = append(errs, err)
	}
	s.log.Info("worker stopped")
	if s.client != nil {
		s.client.Close()
	}
	if err := s.StopTemporal(false); err != nil {
		errs = append(errs, err)
	}
	s.log.Info("temporal stopped")
	if s.lab != nil {
		if err := s.lab.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	s.log.Info("lab stopped")
	if s.labLog != nil {
		s.labLog.Close()
	}
	if left := WaitGone(15*time.Second, s.needles()...); len(left) > 0 {
		errs = append(errs, fmt.Errorf("stack: processes left behind: %s", describe(left)))
		for _, p := range left {
			_ = syscall.Kill(p.Pid, syscall.SIGKILL)
		}
	}
	s.mu.Lock()
	for _, p := range s.started {
		if !p.exited() {
			errs = append(errs, fmt.Errorf("stack: %s (pid %d) is still alive", p.name, p.pid()))
		}
	}
	s.mu.Unlock()
	if s.clientLog != nil {
		s.clientLog.Close()
	}
	if err := s.closeTemporalDB(); err != nil {
		errs = append(errs, err)
	}
	s.log.Info("closed", "errors", len(errs))
	if s.stackLog != nil {
		s.stackLog.Close()
	}
	if s.tmpDir != "" {
		if err := os.RemoveAll(s.tmpDir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
