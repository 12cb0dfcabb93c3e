package activities_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/log"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
)

// Profiles every fixture configures: the lab with its password, and the
// same lab with a password file that holds a wrong password.
const (
	profileLab     = "lab"
	profileBadPass = "lab-badpass"
	wrongPassword  = "not-the-lab-password-0123456789"
)

// syncBuffer collects logs written from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// fixture is a lab vCenter on a loopback port, sessions that know it, a
// repository in a temporary folder, and the activities wired to them as
// the worker wires them.
type fixture struct {
	lab      *lab.Lab
	dir      string
	runDir   string // Transfer.RuntimeDir: NBD sockets
	profile  vsphere.Profile
	sessions *vsphere.Sessions
	repo     *repository.Repository
	vs       *activities.VSphere
	tr       *activities.Transfer
	logs     *syncBuffer
	log      *slog.Logger
}

// newFixture starts a lab (opts.Dir and opts.Logger are filled in). At
// cleanup it checks that neither the lab's password nor the wrong one
// reached any log.
func newFixture(t *testing.T, opts lab.Options) *fixture {
	t.Helper()
	dir := t.TempDir()
	f := &fixture{dir: dir, logs: &syncBuffer{}}
	f.log = slog.New(slog.NewTextHandler(io.MultiWriter(f.logs, t.Output()), &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts.Dir = filepath.Join(dir, "lab")
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	l, err := lab.Start(context.Background(), opts)
	if err != nil {
		t.Fatalf("lab.Start: %v", err)
	}
	f.lab = l
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab close: %v", err)
		}
	})

	pwFile := filepath.Join(dir, "password")
	badFile := filepath.Join(dir, "wrong-password")
	if err := os.WriteFile(pwFile, []byte(l.Password()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(badFile, []byte(wrongPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f.profile = vsphere.Profile{Name: profileLab, URL: l.URL().String(), User: l.User(), PasswordFile: pwFile,
		Thumbprint: l.Thumbprint(), Source: vsphere.SourceLab}
	bad := f.profile
	bad.Name, bad.PasswordFile = profileBadPass, badFile
	f.sessions = vsphere.NewSessions(map[string]vsphere.Profile{profileLab: f.profile, profileBadPass: bad}, f.log)
	t.Cleanup(func() {
		if err := f.sessions.Close(context.Background()); err != nil {
			t.Errorf("sessions close: %v", err)
		}
		logs := f.logs.String()
		if strings.Contains(logs, l.Password()) || strings.Contains(logs, wrongPassword) {
			t.Errorf("a password appears in the logs")
		}
	})

	if f.repo, err = repository.Open(filepath.Join(dir, "repo")); err != nil {
		t.Fatal(err)
	}
	// Socket paths are limited to 107 bytes: t.TempDir() names can be long.
	if f.runDir, err = os.MkdirTemp("", "cbtf-act-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(f.runDir) })
	f.vs = &activities.VSphere{Sessions: f.sessions, Repo: f.repo}
	f.tr = &activities.Transfer{Sessions: f.sessions, Repo: f.repo, RuntimeDir: f.runDir}
	return f
}

// newEnv returns a fresh activity environment (no heartbeat details) with
// the fixture's activities registered and the SDK's logs in the test log.
func (f *fixture) newEnv(t *testing.T) *testsuite.TestActivityEnvironment {
	t.Helper()
	return newActivityEnv(t, f.log, f.vs, f.tr)
}

func newActivityEnv(t *testing.T, logger *slog.Logger, acts ...any) *testsuite.TestActivityEnvironment {
	t.Helper()
	var s testsuite.WorkflowTestSuite
	s.SetLogger(log.NewStructuredLogger(logger))
	env := s.NewTestActivityEnvironment()
	env.SetTestTimeout(2 * time.Minute)
	for _, a := range acts {
		env.RegisterActivity(a)
	}
	return env
}

// execute runs an activity method in env and decodes its result into a
// new R.
func execute[R any](t *testing.T, env *testsuite.TestActivityEnvironment, fn any, in any) (*R, error) {
	t.Helper()
	v, err := env.ExecuteActivity(fn, in)
	if err != nil {
		return nil, err
	}
	var r R
	if err := v.Get(&r); err != nil {
		t.Fatalf("decode the result: %v", err)
	}
	return &r, nil
}

// mustExecute is execute that fails the test on an error.
func mustExecute[R any](t *testing.T, env *testsuite.TestActivityEnvironment, fn any, in any) *R {
	t.Helper()
	r, err := execute[R](t, env, fn, in)
	if err != nil {
		t.Fatalf("activity failed: %v", err)
	}
	return r
}

// wantAppError checks that err carries a non-retryable ApplicationError of
// type typ whose message holds every one of contains.
func wantAppError(t *testing.T, err error, typ string, contains ...string) *temporal.ApplicationError {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want a non-retryable %s", typ)
	}
	var app *temporal.ApplicationError
	if !errors.As(err, &app) {
		t.Fatalf("error %v (%T) is not an ApplicationError, want type %s", err, err, typ)
	}
	if app.Type() != typ {
		t.Errorf("error type %q (%v), want %q", app.Type(), err, typ)
	}
	if !app.NonRetryable() {
		t.Errorf("error %v is retryable, want non-retryable", err)
	}
	for _, s := range contains {
		if !strings.Contains(app.Error(), s) {
			t.Errorf("error message %q does not mention %q", app.Error(), s)
		}
	}
	return app
}

// vmInfo is the lab VM with two disks, resolved and prepared by the
// activities.
type vmInfo struct {
	ref, uuid, name string
	disks           []activities.VMDisk
}

func (f *fixture) prepareVM(t *testing.T, env *testsuite.TestActivityEnvironment) vmInfo {
	t.Helper()
	r := mustExecute[activities.ResolveVMResult](t, env, f.vs.ResolveVM, activities.ResolveVMInput{Profile: profileLab, VM: lab.SecondDiskVM})
	p := mustExecute[activities.PrepareVMResult](t, env, f.vs.PrepareVM, activities.PrepareVMInput{Profile: profileLab, VMUUID: r.VMUUID})
	if len(p.Disks) != 2 {
		t.Fatalf("PrepareVM found %d disks, want 2", len(p.Disks))
	}
	return vmInfo{ref: r.VMRef, uuid: r.VMUUID, name: r.VMName, disks: p.Disks}
}

// snapshot runs CreateSnapshot for backupID and removes the snapshot at
// cleanup.
func (f *fixture) snapshot(t *testing.T, env *testsuite.TestActivityEnvironment, vm vmInfo, backupID string) *activities.CreateSnapshotResult {
	t.Helper()
	s := mustExecute[activities.CreateSnapshotResult](t, env, f.vs.CreateSnapshot,
		activities.CreateSnapshotInput{Profile: profileLab, VMRef: vm.ref, VMUUID: vm.uuid, BackupID: backupID})
	t.Cleanup(func() {
		c, err := f.sessions.Client(context.Background(), profileLab)
		if err == nil {
			err = c.RemoveSnapshot(context.Background(), vm.ref, s.SnapshotRef)
		}
		if err != nil {
			t.Errorf("remove snapshot %s: %v", s.SnapshotRef, err)
		}
	})
	return s
}

// snapDisk returns disk key of a snapshot.
func snapDisk(t *testing.T, s *activities.CreateSnapshotResult, key int32) activities.SnapshotDisk {
	t.Helper()
	for _, d := range s.Disks {
		if d.Key == key {
			return d
		}
	}
	t.Fatalf("snapshot %s has no disk %d: %+v", s.SnapshotRef, key, s.Disks)
	return activities.SnapshotDisk{}
}

// blocks returns the lab's CBT answer for guest writes to ranges: every
// 64 KiB block a range touches, sorted, touching blocks merged.
func blocks(ranges ...copier.Extent) []copier.Extent {
	marked := map[int64]bool{}
	for _, r := range ranges {
		for b := r.Offset / lab.BlockSize; b*lab.BlockSize < r.End(); b++ {
			marked[b] = true
		}
	}
	var out []copier.Extent
	for _, b := range slices.Sorted(maps.Keys(marked)) {
		off := b * lab.BlockSize
		if n := len(out); n > 0 && out[n-1].End() == off {
			out[n-1].Length += lab.BlockSize
			continue
		}
		out = append(out, copier.Extent{Offset: off, Length: lab.BlockSize})
	}
	return out
}

func sumLengths(exts []copier.Extent) int64 {
	var n int64
	for _, e := range exts {
		n += e.Length
	}
	return n
}

// readExtentsFile reads an extents file written by ChangedAreas.
func readExtentsFile(t *testing.T, path string) []copier.Extent {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("extents file: %v", err)
	}
	var out []copier.Extent
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("extents file %s: %v", path, err)
	}
	return out
}

// fileSum returns a file's size and hex SHA-256.
func fileSum(t *testing.T, path string) (int64, string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	return n, hex.EncodeToString(h.Sum(nil))
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
