package vsphere

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
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

// fixture is a running lab with a profile and sessions for it.
type fixture struct {
	lab      *lab.Lab
	profile  Profile
	sessions *Sessions
	logs     *syncBuffer
}

// startLab starts a lab on a loopback port and returns a fixture whose
// sessions know the lab as profile "lab". Logs of this package are checked
// for the password at cleanup.
func startLab(t *testing.T, opts lab.Options) *fixture {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	opts.Dir = filepath.Join(dir, "lab")
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	l, err := lab.Start(ctx, opts)
	if err != nil {
		t.Fatalf("lab.Start: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab close: %v", err)
		}
	})
	pwFile := filepath.Join(dir, "password")
	if err := os.WriteFile(pwFile, []byte(l.Password()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f := &fixture{lab: l, logs: &syncBuffer{}}
	f.profile = Profile{Name: "lab", URL: l.URL().String(), User: l.User(), PasswordFile: pwFile,
		Thumbprint: l.Thumbprint(), Source: SourceLab}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(f.logs, t.Output()), &slog.HandlerOptions{Level: slog.LevelDebug}))
	f.sessions = NewSessions(map[string]Profile{"lab": f.profile}, log)
	t.Cleanup(func() {
		if err := f.sessions.Close(context.Background()); err != nil {
			t.Errorf("sessions close: %v", err)
		}
		if strings.Contains(f.logs.String(), l.Password()) {
			t.Errorf("the password appears in the logs")
		}
	})
	return f
}

func (f *fixture) client(t *testing.T) *Client {
	t.Helper()
	c, err := f.sessions.Client(context.Background(), "lab")
	if err != nil {
		t.Fatalf("Client: %v", err)
	}
	return c
}

// adminSession logs in to the lab with a govmomi client of its own, as an
// administrator would.
func (f *fixture) adminSession(t *testing.T) (*vim25.Client, *session.Manager) {
	t.Helper()
	ctx := context.Background()
	sc := soap.NewClient(f.lab.URL(), true) // test-only admin client of a loopback lab
	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		t.Fatal(err)
	}
	sm := session.NewManager(vc)
	if err := sm.Login(ctx, url.UserPassword(f.lab.User(), f.lab.Password())); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = sm.Logout(context.Background())
		sc.CloseIdleConnections()
	})
	return vc, sm
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}
