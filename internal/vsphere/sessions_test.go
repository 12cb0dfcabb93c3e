package vsphere

import (
	"errors"
	"net"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/vmware/govmomi/session"
)

func TestLoadProfiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	const tp = "ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01"
	good := write("good.json", `{"profiles": {
		"prod": {"url": "https://vc.example.com/sdk", "user": "backup@vsphere.local", "password_file": "prod.pw",
		         "thumbprint": "`+tp+`", "vddk_libdir": "/opt/vddk", "vddk_transports": "nbdssl:nbd"},
		"lab": {"url": "https://127.0.0.1:8989/sdk", "user": "admin", "password_file": "/run/lab.pw", "insecure": true, "source": "lab"}}}`)
	ps, err := LoadProfiles(good)
	if err != nil {
		t.Fatalf("LoadProfiles: %v", err)
	}
	if len(ps) != 2 {
		t.Fatalf("got %d profiles, want 2", len(ps))
	}
	prod := ps["prod"]
	want := Profile{Name: "prod", URL: "https://vc.example.com/sdk", User: "backup@vsphere.local",
		PasswordFile: filepath.Join(dir, "prod.pw"), Thumbprint: strings.ToUpper(tp), VDDKLibDir: "/opt/vddk", Transports: "nbdssl:nbd"}
	if !reflect.DeepEqual(prod, want) {
		t.Errorf("prod = %+v\nwant %+v", prod, want)
	}
	if l := ps["lab"]; l.Name != "lab" || !l.Insecure || l.Source != SourceLab || l.PasswordFile != "/run/lab.pw" {
		t.Errorf("lab = %+v", l)
	}

	profile := func(fields string) string { return `{"profiles": {"p1": {` + fields + `}}}` }
	base := `"url": "https://vc/sdk", "user": "u", "password_file": "pw"`
	for _, tc := range []struct {
		name, content string
		want          []string // substrings of the error
	}{
		{"no url", profile(`"user": "u", "password_file": "pw", "insecure": true`), []string{`"p1"`, "url", "missing"}},
		{"http url", profile(`"url": "http://vc/sdk", "user": "u", "password_file": "pw", "insecure": true`), []string{`"p1"`, "url", "https"}},
		{"no user", profile(`"url": "https://vc/sdk", "password_file": "pw", "insecure": true`), []string{`"p1"`, "user"}},
		{"no password file", profile(`"url": "https://vc/sdk", "user": "u", "insecure": true`), []string{`"p1"`, "password_file"}},
		{"no thumbprint", profile(base), []string{`"p1"`, "thumbprint", "insecure"}},
		{"bad thumbprint", profile(base + `, "thumbprint": "AB:CD"`), []string{`"p1"`, "thumbprint", "SHA-1"}},
		{"thumbprint and insecure", profile(base + `, "thumbprint": "` + tp + `", "insecure": true`), []string{`"p1"`, "not both"}},
		{"unknown source", profile(base + `, "insecure": true, "source": "nfs"`), []string{`"p1"`, "source", "nfs"}},
		{"unknown field", profile(base + `, "insecure": true, "pasword": "x"`), []string{"pasword"}},
		{"password inline", profile(base + `, "insecure": true, "password": "secret"`), []string{`unknown field "password"`}},
		{"bad name", `{"profiles": {"a b": {` + base + `, "insecure": true}}}`, []string{`"a b"`, "name"}},
		{"no profiles", `{"profiles": {}}`, []string{"no profiles"}},
		{"not json", `profiles: {}`, []string{"invalid character"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := write(strings.ReplaceAll(tc.name, " ", "_")+".json", tc.content)
			_, err := LoadProfiles(p)
			if err == nil {
				t.Fatalf("LoadProfiles accepted %s", tc.content)
			}
			for _, w := range append(tc.want, p) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("error %q holds the password", err)
			}
		})
	}
	if _, err := LoadProfiles(filepath.Join(dir, "missing.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

func TestLogin(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	if _, err := c.FindVM(ctx, "DC0_H0_VM1"); err != nil {
		t.Fatalf("FindVM after login: %v", err)
	}
	if c.Vim() == nil {
		t.Fatal("Vim() is nil")
	}

	dir := t.TempDir()
	wrongPw := filepath.Join(dir, "wrong")
	if err := os.WriteFile(wrongPw, []byte("not-the-password\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedURL := "https://" + ln.Addr().String() + "/sdk"
	ln.Close()

	withPw := f.profile
	withPw.PasswordFile = wrongPw
	unreachable := f.profile
	unreachable.URL = closedURL
	wrongTP := f.profile
	wrongTP.Thumbprint = "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33"
	noPwFile := f.profile
	noPwFile.PasswordFile = filepath.Join(dir, "absent")
	insecure := f.profile
	insecure.Thumbprint, insecure.Insecure = "", true

	s := NewSessions(map[string]Profile{"wrongpw": withPw, "down": unreachable, "wrongtp": wrongTP, "nopw": noPwFile, "insecure": insecure}, nil)
	defer s.Close(ctx)

	for _, tc := range []struct {
		profile string
		want    error
		msg     []string
	}{
		{"wrongpw", ErrLogin, []string{`"wrongpw"`, f.lab.User()}},
		{"down", ErrUnreachable, []string{`"down"`, closedURL}},
		{"wrongtp", ErrCertificate, []string{`"wrongtp"`, "thumbprint", f.lab.Thumbprint(), wrongTP.Thumbprint}},
		{"nopw", ErrLogin, []string{`"nopw"`, "password file", "absent"}},
		{"nosuch", ErrProfileNotFound, []string{`"nosuch"`, "wrongpw"}},
	} {
		t.Run(tc.profile, func(t *testing.T) {
			start := time.Now()
			_, err := s.Client(ctx, tc.profile)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Client(%s) = %v, want %v", tc.profile, err, tc.want)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %q", err, m)
				}
			}
			if strings.Contains(err.Error(), f.lab.Password()) || strings.Contains(err.Error(), "not-the-password") {
				t.Errorf("error %q holds a password", err)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("took %v", d)
			}
		})
	}
	ic, err := s.Client(ctx, "insecure")
	if err != nil {
		t.Fatalf("insecure profile: %v", err)
	}
	if _, err := ic.FindVM(ctx, "DC0_H0_VM1"); err != nil {
		t.Fatalf("FindVM on the insecure profile: %v", err)
	}
}

func TestSessionReuseAndRelogin(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	for range 3 {
		if again := f.client(t); again != c {
			t.Fatal("Client returned a new client for the same profile")
		}
	}
	if n := c.auth.logins.Load(); n != 1 {
		t.Fatalf("%d logins, want 1", n)
	}

	vm, err := c.FindVM(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	us, err := session.NewManager(c.Vim()).UserSession(ctx)
	if err != nil || us == nil {
		t.Fatalf("UserSession: %v, %v", us, err)
	}
	_, admin := f.adminSession(t)
	if err := admin.TerminateSession(ctx, []string{us.Key}); err != nil {
		t.Fatalf("TerminateSession: %v", err)
	}

	// Calls that need a session: the first one logs in again, the others
	// reuse the new session.
	for i := range 3 {
		if _, err := c.FindVM(ctx, "DC0_H0_VM1"); err != nil {
			t.Fatalf("FindVM %d after the session was terminated: %v", i, err)
		}
		s, err := c.CreateSnapshot(ctx, vm, "relogin")
		if err != nil {
			t.Fatalf("CreateSnapshot %d after the session was terminated: %v", i, err)
		}
		if err := c.RemoveSnapshot(ctx, vm.Ref, s.Ref); err != nil {
			t.Fatal(err)
		}
	}
	if n := c.auth.logins.Load(); n != 2 {
		t.Fatalf("%d logins after the session was terminated, want 2", n)
	}
	us2, err := session.NewManager(c.Vim()).UserSession(ctx)
	if err != nil || us2 == nil || us2.Key == us.Key {
		t.Fatalf("UserSession after re-login: %v, %v", us2, err)
	}
}

func TestKeepAliveRelogin(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	s := NewSessionsWithOptions(map[string]Profile{"lab": f.profile}, nil, SessionOptions{KeepAlive: 50 * time.Millisecond})
	defer s.Close(ctx)
	c, err := s.Client(ctx, "lab")
	if err != nil {
		t.Fatal(err)
	}
	us, err := session.NewManager(c.Vim()).UserSession(ctx)
	if err != nil || us == nil {
		t.Fatalf("UserSession: %v, %v", us, err)
	}
	// Keep-alive calls alone do not log in again.
	time.Sleep(300 * time.Millisecond)
	if n := c.auth.logins.Load(); n != 1 {
		t.Fatalf("%d logins while the session is alive, want 1", n)
	}
	_, admin := f.adminSession(t)
	if err := admin.TerminateSession(ctx, []string{us.Key}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.auth.logins.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if n := c.auth.logins.Load(); n != 2 {
		t.Fatalf("%d logins after the session was terminated and no call was made, want 2 (by the keep-alive)", n)
	}
}

func TestSessionsClose(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	us, err := session.NewManager(c.Vim()).UserSession(ctx)
	if err != nil || us == nil {
		t.Fatalf("UserSession: %v, %v", us, err)
	}
	if err := f.sessions.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := f.sessions.Client(ctx, "lab"); err == nil {
		t.Fatal("Client after Close succeeded")
	}
	// The session is gone on the server.
	_, admin := f.adminSession(t)
	active, err := admin.SessionIsActive(ctx)
	if err != nil || !active {
		t.Fatalf("admin session: %v %v", active, err)
	}
	if err := admin.TerminateSession(ctx, []string{us.Key}); err == nil {
		t.Fatal("the closed session could still be terminated: it was not logged out")
	}
}

// TestConcurrentRelogin: many callers at once, first on a fresh Sessions,
// then after the session was terminated, make one login each time.
func TestConcurrentRelogin(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	const n = 8
	clients := make([]*Client, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			c, err := f.sessions.Client(ctx, "lab")
			if err != nil {
				t.Error(err)
			}
			clients[i] = c
		})
	}
	wg.Wait()
	c := clients[0]
	for _, o := range clients {
		if o != c {
			t.Fatal("concurrent Client calls returned different clients")
		}
	}
	us, err := session.NewManager(c.Vim()).UserSession(ctx)
	if err != nil || us == nil {
		t.Fatalf("UserSession: %v, %v", us, err)
	}
	_, admin := f.adminSession(t)
	if err := admin.TerminateSession(ctx, []string{us.Key}); err != nil {
		t.Fatal(err)
	}
	for range n {
		wg.Go(func() {
			if _, err := c.FindVM(ctx, "/DC0/vm/DC0_H0_VM1"); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got := c.auth.logins.Load(); got != 2 {
		t.Fatalf("%d logins, want 2 (one at start, one after the termination)", got)
	}
}

// TestUnreachableAfterLogin: vCenter going away after the login gives
// ErrUnreachable on the next call.
func TestUnreachableAfterLogin(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	if err := f.lab.Close(); err != nil {
		t.Fatal(err)
	}
	c.sc.CloseIdleConnections()
	if _, err := c.FindVM(ctx, "DC0_H0_VM1"); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("FindVM with vCenter gone = %v, want ErrUnreachable", err)
	}
	if err := f.sessions.Close(ctx); err == nil || !strings.Contains(err.Error(), "logout") {
		t.Fatalf("Close with vCenter gone = %v, want the logout error", err)
	}
}

// TestConcurrentCallsReuseConnections: calls made at once through one
// session, as the activities of many backups make them, go out on
// connections kept from earlier calls, not on new ones (each a TLS
// handshake).
func TestConcurrentCallsReuseConnections(t *testing.T) {
	f := startLab(t, lab.Options{})
	c := f.client(t)
	var mu sync.Mutex
	got, dialed := 0, 0
	ctx := httptrace.WithClientTrace(ctxT(t), &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		mu.Lock()
		defer mu.Unlock()
		got++
		if !info.Reused {
			dialed++
		}
	}})
	const callers = 12
	burst := func() {
		var wg sync.WaitGroup
		for range callers {
			wg.Go(func() {
				if _, err := c.FindVM(ctx, "DC0_H0_VM1"); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
	}
	burst()
	mu.Lock()
	first := dialed
	mu.Unlock()
	for range 3 {
		burst()
	}
	mu.Lock()
	defer mu.Unlock()
	// Every call takes a connection; on a busy machine the first burst may
	// find the login's connection free each time and dial none.
	if got < callers {
		t.Fatalf("%d connections traced for %d calls: the trace does not see the session's calls", got, callers)
	}
	// The first burst opens what it needs; the next ones find them idle.
	if more := dialed - first; more > 2 {
		t.Errorf("%d new connections for 3 more bursts of %d calls at once (%d for the first): idle connections were closed", more, callers, first)
	}
}
