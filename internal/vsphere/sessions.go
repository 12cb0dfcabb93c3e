package vsphere

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// DefaultKeepAlive is how often an idle session is touched. vCenter drops
// sessions idle for 30 minutes by default.
const DefaultKeepAlive = 5 * time.Minute

// Bounds of a connect, so that a vCenter that does not answer fails as
// ErrUnreachable within seconds rather than after the minutes a
// black-holed address takes (TCP's own retries, a handshake nobody
// answers). The first contact of a backup retries a connect 6 times, so
// these set how long an operator waits for VCenterUnreachable: about a
// minute at most (6 × 5 s plus about 30 s of backoff) when nothing
// answers, about 30 s when the connection is refused.
const (
	// DefaultDialTimeout bounds the TCP connect and the TLS handshake,
	// which take milliseconds on any network a vCenter is managed over.
	DefaultDialTimeout = 5 * time.Second
	// DefaultConnectTimeout bounds the whole connect: dial, handshake,
	// the service content and the login, which a busy vCenter may take a
	// few seconds to answer.
	DefaultConnectTimeout = 15 * time.Second
)

// SessionOptions tune Sessions. The zero value gives the defaults.
type SessionOptions struct {
	// KeepAlive is the interval of the keep-alive call that also notices a
	// session vCenter dropped and logs in again before the next real call
	// needs it; DefaultKeepAlive when zero.
	KeepAlive time.Duration
	// DialTimeout bounds the TCP connect and TLS handshake;
	// DefaultDialTimeout when zero.
	DialTimeout time.Duration
	// ConnectTimeout bounds a connect from the dial to the end of the
	// login; DefaultConnectTimeout when zero. Calls after the connect are
	// bounded by their callers' contexts only: some (a snapshot task)
	// legitimately take long.
	ConnectTimeout time.Duration
	// DefaultProfile names the profile used when a caller names none (the
	// worker's CBTFLOW_PROFILE). When empty, the only configured profile
	// is the default, and with several there is none (see
	// Sessions.DefaultProfile).
	DefaultProfile string
	// OnCall, when set, is told of every call made to a vCenter (its
	// profile and the method, e.g. "RetrievePropertiesEx"), logins and
	// keep-alives included, before the call: the worker counts them
	// (cbtflow_vcenter_calls_total).
	OnCall func(profile, method string)
}

// Sessions keeps one logged-in session per vCenter profile, created on
// first use, kept alive, and re-established when vCenter drops it (a call
// answered NotAuthenticated logs in again once and is retried), so that
// activities never log in per call. Safe for concurrent use.
type Sessions struct {
	log      *slog.Logger
	profiles map[string]Profile
	opts     SessionOptions

	mu      sync.Mutex
	entries map[string]*entry
	closed  bool
}

// entry holds the client of one profile; sem (capacity 1) serializes the
// first login while letting waiters give up with their context.
type entry struct {
	sem    chan struct{}
	client *Client
}

// NewSessions returns sessions for the given profiles (from LoadProfiles),
// with default options. No connection is made before the first Client call.
func NewSessions(profiles map[string]Profile, log *slog.Logger) *Sessions {
	return NewSessionsWithOptions(profiles, log, SessionOptions{})
}

// NewSessionsWithOptions is NewSessions with options.
func NewSessionsWithOptions(profiles map[string]Profile, log *slog.Logger, opts SessionOptions) *Sessions {
	if log == nil {
		log = slog.Default()
	}
	if opts.KeepAlive <= 0 {
		opts.KeepAlive = DefaultKeepAlive
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = DefaultDialTimeout
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = DefaultConnectTimeout
	}
	ps := make(map[string]Profile, len(profiles))
	for name, p := range profiles {
		p.Name = name // the key names the profile everywhere
		ps[name] = p
	}
	return &Sessions{log: log, profiles: ps, opts: opts, entries: map[string]*entry{}}
}

// Profile returns the named profile, or an error wrapping ErrProfileNotFound
// that lists the configured names.
func (s *Sessions) Profile(name string) (Profile, error) {
	p, ok := s.profiles[name]
	if !ok {
		return Profile{}, fmt.Errorf("vsphere: %w: %q (configured: %s)", ErrProfileNotFound, name, strings.Join(s.Names(), ", "))
	}
	return p, nil
}

// DefaultProfile is the profile to use when a caller names none: the one
// SessionOptions.DefaultProfile names, which must be configured (else an
// error wrapping ErrProfileNotFound), or else the only profile configured.
// With several and none named the default, the error wraps
// ErrNoDefaultProfile and lists them: picking one would back up under a
// profile nobody chose.
func (s *Sessions) DefaultProfile() (string, error) {
	if name := s.opts.DefaultProfile; name != "" {
		if _, err := s.Profile(name); err != nil {
			return "", fmt.Errorf("%w (the default profile, CBTFLOW_PROFILE)", err)
		}
		return name, nil
	}
	names := s.Names()
	if len(names) == 1 {
		return names[0], nil
	}
	return "", fmt.Errorf("vsphere: %w: no profile named and %d configured (%s): name one, or set the worker's CBTFLOW_PROFILE",
		ErrNoDefaultProfile, len(names), strings.Join(names, ", "))
}

// Names lists the configured profiles, sorted.
func (s *Sessions) Names() []string {
	names := make([]string, 0, len(s.profiles))
	for n := range s.profiles {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Client returns the logged-in client of a profile, logging in on first
// use. Errors wrap ErrProfileNotFound, ErrLogin (wrong user or password, or
// an unreadable password file), ErrUnreachable (dial, TLS or HTTP errors)
// or ErrCertificate (thumbprint mismatch, untrusted certificate).
func (s *Sessions) Client(ctx context.Context, profile string) (*Client, error) {
	p, err := s.Profile(profile)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("vsphere: profile %q: sessions are closed", profile)
	}
	e := s.entries[profile]
	if e == nil {
		e = &entry{sem: make(chan struct{}, 1)}
		s.entries[profile] = e
	}
	s.mu.Unlock()

	select {
	case e.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("vsphere: profile %q: waiting for login: %w", profile, ctx.Err())
	}
	defer func() { <-e.sem }()
	if e.client != nil {
		return e.client, nil
	}
	c, err := connect(ctx, p, s.log, s.opts)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		c.close(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("vsphere: profile %q: sessions are closed", profile)
	}
	e.client = c
	return c, nil
}

// Close logs out every session and stops their keep-alives. Clients
// handed out before stop working; later Client calls fail.
func (s *Sessions) Close(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	entries := s.entries
	s.entries = map[string]*entry{}
	s.mu.Unlock()
	var errs []error
	for name, e := range entries {
		e.sem <- struct{}{}
		c := e.client
		e.client = nil
		<-e.sem
		if c == nil {
			continue
		}
		if err := c.close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("vsphere: profile %q: logout: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// Client is a logged-in vSphere API client of one profile, shared by all
// callers of Sessions.Client. Safe for concurrent use.
type Client struct {
	profile Profile
	log     *slog.Logger
	vim     *vim25.Client
	sc      *soap.Client
	auth    *reauth

	stop     chan struct{}
	done     chan struct{}
	stopOnce sync.Once
}

// Vim returns the underlying govmomi client. Calls through it share the
// session and its automatic re-login.
func (c *Client) Vim() *vim25.Client { return c.vim }

// Profile returns the client's profile.
func (c *Client) Profile() Profile { return c.profile }

// InstanceUUID is the vCenter's own identity (ServiceContent.About.InstanceUuid),
// the same whatever profile, user or URL reached it: what tells that two
// profiles name one vCenter. It is empty when the server has none (a
// standalone ESXi host).
func (c *Client) InstanceUUID() string { return c.vim.ServiceContent.About.InstanceUuid }

// idleConnsPerVCenter is how many idle connections to one vCenter a
// session keeps for its next calls.
const idleConnsPerVCenter = 32

// connect opens the SOAP connection, logs in and starts the keep-alive.
func connect(ctx context.Context, p Profile, log *slog.Logger, opts SessionOptions) (*Client, error) {
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("vsphere: %w", err)
	}
	u, err := url.Parse(p.URL)
	if err != nil {
		return nil, fmt.Errorf("vsphere: profile %q: url: %w", p.Name, err)
	}
	sc := soap.NewClient(u, p.Insecure)
	cfg := tlsConfig(p, u.Hostname())
	tr := sc.DefaultTransport()
	tr.TLSClientConfig = cfg
	// Our own dialer: govmomi's ignores the context and has no timeout,
	// and trusts a CA-signed certificate before looking at the thumbprint.
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: opts.DialTimeout, KeepAlive: 30 * time.Second}, Config: cfg}
	tr.DialTLSContext = d.DialContext
	tr.TLSHandshakeTimeout = opts.DialTimeout
	// Every activity of every backup at once calls through this one
	// session: with net/http's default of 2 idle connections a host, all
	// but two were closed after each call and the next call paid a new
	// TLS handshake (20 VMs backed up at once: about 70 handshakes, 6% of
	// the worker's CPU).
	tr.MaxIdleConnsPerHost = idleConnsPerVCenter

	// The connect has a deadline of its own, so that a server that takes
	// the connection and never answers is unreachable, not a hang until
	// the caller gives up; ctx still tells the caller's own end from it.
	cctx, cancel := context.WithTimeout(ctx, opts.ConnectTimeout)
	defer cancel()
	noAnswer := func(err error) error {
		if ctx.Err() == nil && cctx.Err() != nil {
			return fmt.Errorf("vsphere: profile %q: %w: %s: no answer within %s", p.Name, ErrUnreachable, p.URL, opts.ConnectTimeout)
		}
		return err
	}
	vc, err := vim25.NewClient(cctx, sc)
	if err != nil {
		sc.CloseIdleConnections()
		return nil, noAnswer(connError(ctx, p, err))
	}
	c := &Client{profile: p, log: log.With("vcenter", p.Name), vim: vc, sc: sc,
		stop: make(chan struct{}), done: make(chan struct{})}
	c.auth = &reauth{sc: sc, sm: *vc.ServiceContent.SessionManager, profile: p, log: c.log, onCall: opts.OnCall}
	vc.RoundTripper = c.auth
	if err := c.auth.login(cctx, "connect"); err != nil {
		sc.CloseIdleConnections()
		return nil, noAnswer(err)
	}
	go c.keepAlive(opts.KeepAlive)
	return c, nil
}

// tlsConfig verifies the server by the profile's thumbprint (pinning: a
// CA-signed certificate with another thumbprint is refused too), skips
// verification only when Insecure is set, and uses the system roots
// otherwise.
func tlsConfig(p Profile, host string) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host}
	switch {
	case p.Thumbprint != "":
		want := p.Thumbprint
		cfg.InsecureSkipVerify = true // replaced by the pin below
		cfg.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return &certError{msg: "the server sent no certificate"}
			}
			cert, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return &certError{msg: "the server certificate cannot be parsed: " + err.Error()}
			}
			if got := soap.ThumbprintSHA1(cert); !strings.EqualFold(got, want) {
				return &certError{msg: fmt.Sprintf("the server certificate has thumbprint %s, the profile pins %s", got, want)}
			}
			return nil
		}
	case p.Insecure:
		cfg.InsecureSkipVerify = true
	}
	return cfg
}

// certError is a certificate the profile does not accept.
type certError struct{ msg string }

func (e *certError) Error() string { return e.msg }

// connError classifies a failure to talk to vCenter before any login.
func connError(ctx context.Context, p Profile, err error) error {
	var ce *certError
	var uae x509.UnknownAuthorityError
	var hne x509.HostnameError
	var cie x509.CertificateInvalidError
	var cve *tls.CertificateVerificationError
	switch {
	case errors.As(err, &ce):
		return fmt.Errorf("vsphere: profile %q: %w: %s: %s", p.Name, ErrCertificate, p.URL, ce.msg)
	case errors.As(err, &uae), errors.As(err, &hne), errors.As(err, &cie), errors.As(err, &cve):
		return fmt.Errorf("vsphere: profile %q: %w: %s: %v (pin the certificate with thumbprint)", p.Name, ErrCertificate, p.URL, err)
	case ctx.Err() != nil:
		return fmt.Errorf("vsphere: profile %q: connect to %s: %w", p.Name, p.URL, ctx.Err())
	case vimFault(err) != nil:
		return fmt.Errorf("vsphere: profile %q: %s: %w", p.Name, p.URL, err)
	}
	return fmt.Errorf("vsphere: profile %q: %w: %s: %v", p.Name, ErrUnreachable, p.URL, err)
}

// readPassword reads the profile's password file; a trailing newline is
// not part of the password. Errors name the file, never its content.
func readPassword(p Profile) (string, error) {
	b, err := os.ReadFile(p.PasswordFile)
	if err != nil {
		return "", fmt.Errorf("vsphere: profile %q: %w: password file: %w", p.Name, ErrLogin, err)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return "", fmt.Errorf("vsphere: profile %q: %w: password file %s is empty", p.Name, ErrLogin, p.PasswordFile)
	}
	return pw, nil
}

// reauth is the client's RoundTripper: a call answered NotAuthenticated
// (vCenter dropped the session: idle timeout, restart, an administrator
// terminated it) logs in again, once for all concurrent callers, and is
// retried once. NotAuthenticated means the call was refused before it ran,
// so the retry cannot run anything twice.
type reauth struct {
	sc      *soap.Client
	sm      types.ManagedObjectReference
	profile Profile
	log     *slog.Logger

	mu     sync.Mutex // serializes logins
	gen    uint64     // bumped by every successful login
	logins atomic.Int64
	onCall func(profile, method string) // SessionOptions.OnCall
}

func (r *reauth) generation() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gen
}

// RoundTrip implements soap.RoundTripper.
func (r *reauth) RoundTrip(ctx context.Context, req, res soap.HasFault) error {
	if r.onCall != nil {
		r.onCall(r.profile.Name, methodName(req))
	}
	switch req.(type) {
	case *methods.LoginBody, *methods.LogoutBody:
		return r.sc.RoundTrip(ctx, req, res)
	}
	gen := r.generation()
	err := r.sc.RoundTrip(ctx, req, res)
	if !isFault(err, &types.NotAuthenticated{}) {
		return r.transportError(ctx, err)
	}
	if lerr := r.relogin(ctx, gen, "session not authenticated"); lerr != nil {
		return lerr
	}
	// The decoder fills the body in place: clear the first answer's fault.
	if v := reflect.ValueOf(res); v.Kind() == reflect.Pointer && !v.IsNil() {
		v.Elem().SetZero()
	}
	return r.transportError(ctx, r.sc.RoundTrip(ctx, req, res))
}

// methodName is the vSphere method a request body calls:
// *methods.RetrievePropertiesExBody is "RetrievePropertiesEx".
func methodName(req soap.HasFault) string {
	t := reflect.TypeOf(req)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return strings.TrimSuffix(t.Name(), "Body")
}

// transportError marks an error that is neither a vSphere fault nor the
// caller's cancellation (vCenter down, connection reset, certificate
// changed) with ErrUnreachable or ErrCertificate; the original error stays
// in the chain. Faults pass unchanged, as govmomi inspects them.
func (r *reauth) transportError(ctx context.Context, err error) error {
	if err == nil || vimFault(err) != nil || ctx.Err() != nil {
		return err
	}
	return connError(ctx, r.profile, err)
}

// relogin logs in again unless another caller already did since gen.
func (r *reauth) relogin(ctx context.Context, gen uint64, reason string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.gen != gen {
		return nil
	}
	return r.loginLocked(ctx, reason)
}

func (r *reauth) login(ctx context.Context, reason string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.loginLocked(ctx, reason)
}

func (r *reauth) loginLocked(ctx context.Context, reason string) error {
	pw, err := readPassword(r.profile)
	if err != nil {
		return err
	}
	req := types.Login{This: r.sm, UserName: r.profile.User, Password: pw}
	if r.onCall != nil {
		r.onCall(r.profile.Name, "Login")
	}
	if _, err := methods.Login(ctx, r.sc, &req); err != nil {
		if isFault(err, &types.InvalidLogin{}) {
			return fmt.Errorf("vsphere: profile %q: %w: %s refused user %q (wrong user name or password in %s)",
				r.profile.Name, ErrLogin, r.profile.URL, r.profile.User, r.profile.PasswordFile)
		}
		return connError(ctx, r.profile, err)
	}
	r.gen++
	n := r.logins.Add(1)
	r.log.Info("vcenter login", "url", r.profile.URL, "user", r.profile.User, "reason", reason, "logins", n)
	return nil
}

// keepAlive touches the session every interval, which keeps vCenter from
// dropping it while idle and logs in again when it was dropped anyway.
func (c *Client) keepAlive(interval time.Duration) {
	defer close(c.done)
	// base ends with the client, so that close never waits for a slow ping.
	base, stop := context.WithCancel(context.Background())
	defer stop()
	go func() {
		select {
		case <-c.stop:
			stop()
		case <-base.Done():
		}
	}()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(base, time.Minute)
		if err := c.ping(ctx); err != nil && base.Err() == nil {
			c.log.Warn("vcenter keep-alive failed", "url", c.profile.URL, "err", err)
		}
		cancel()
	}
}

// ping checks the session; a session vCenter no longer knows is
// re-established. Real vCenters answer NotAuthenticated (handled by
// reauth); some servers answer with an empty currentSession instead.
func (c *Client) ping(ctx context.Context) error {
	gen := c.auth.generation()
	us, err := session.NewManager(c.vim).UserSession(ctx)
	if err != nil {
		return err
	}
	if us == nil {
		return c.auth.relogin(ctx, gen, "keep-alive found no session")
	}
	return nil
}

// close stops the keep-alive and logs out.
func (c *Client) close(ctx context.Context) error {
	c.stopOnce.Do(func() { close(c.stop) })
	<-c.done
	defer c.sc.CloseIdleConnections()
	_, err := methods.Logout(ctx, c.sc, &types.Logout{This: *c.vim.ServiceContent.SessionManager})
	if err != nil && !isFault(err, &types.NotAuthenticated{}) {
		return err
	}
	return nil
}
