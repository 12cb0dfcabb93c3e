package vsphere

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A vCenter address that takes the TCP connection but never answers (a
// black hole: here a socket that listens and never accepts, so the
// kernel completes the handshake and nobody speaks TLS) fails a connect
// with ErrUnreachable within DefaultDialTimeout, with the default
// options, not after the minutes an unbounded dial would take: the first
// contact's retries (ResolveVM, PrepareVM) then end in about a minute.
func TestConnectBlackHoleBounded(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	url := "https://" + ln.Addr().String() + "/sdk"
	elapsed, err := connectOnce(t, Profile{URL: url, Insecure: true})
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), `"silent"`) || !strings.Contains(err.Error(), url) {
		t.Fatalf("Client = %v, want ErrUnreachable naming profile \"silent\" and %s", err, url)
	}
	if elapsed > DefaultDialTimeout+5*time.Second {
		t.Errorf("gave up after %v, want about DefaultDialTimeout (%v)", elapsed, DefaultDialTimeout)
	}
}

// A server that completes the TLS handshake but never answers a request
// fails the connect (service content, login) with ErrUnreachable within
// DefaultConnectTimeout.
func TestConnectSilentServerBounded(t *testing.T) {
	t.Parallel()
	done := make(chan struct{})
	srv := httptest.NewTLSServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-done }))
	defer srv.Close()
	defer close(done)
	url := srv.URL + "/sdk"
	elapsed, err := connectOnce(t, Profile{URL: url, Insecure: true})
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), url) || !strings.Contains(err.Error(), "no answer within") {
		t.Fatalf("Client = %v, want ErrUnreachable naming %s and the time waited", err, url)
	}
	if elapsed > DefaultConnectTimeout+5*time.Second {
		t.Errorf("gave up after %v, want about DefaultConnectTimeout (%v)", elapsed, DefaultConnectTimeout)
	}
}

// connectOnce asks default Sessions for the client of profile p (named
// "silent") and says how long the answer took. The caller's context
// allows far longer than any bound of the package.
func connectOnce(t *testing.T, p Profile) (time.Duration, error) {
	t.Helper()
	pw := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pw, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	p.User, p.PasswordFile = "backup@vsphere.local", pw
	s := NewSessions(map[string]Profile{"silent": p}, nil)
	defer s.Close(context.Background())
	ctx, cancel := context.WithTimeout(context.Background(), 75*time.Second)
	defer cancel()
	start := time.Now()
	_, err := s.Client(ctx, "silent")
	return time.Since(start), err
}
