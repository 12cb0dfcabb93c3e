package lab

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab/labapi"
)

// DefaultUser is the login of a lab started without Options.User.
const DefaultUser = "administrator@vsphere.local"

// BlockSize is the granularity of the lab's change tracking: changed areas
// are reported in whole, aligned blocks of this size.
const BlockSize = 64 << 10

// Options configure Start. The zero value is usable.
type Options struct {
	// Listen is the loopback address to listen on, "127.0.0.1:0" when
	// empty (port 0 picks a free port). Non-loopback addresses are refused:
	// the lab endpoints need no login.
	Listen string
	// Dir holds the lab's files (see the package comment). When empty, a
	// temporary directory is used and removed by Close.
	Dir string
	// User and Password are the only accepted login. User defaults to
	// DefaultUser; an empty Password gets a random one (see Lab.Password).
	User, Password string
	// MaxExtentsPerPage, when positive, caps the extents in one answer of
	// QueryChangedDiskAreas, forcing callers to page. Zero means no cap.
	MaxExtentsPerPage int
	// SourceFilters are nbdkit filters (labapi.FaultFilters only) that the
	// frozen-image endpoint tells a reader to put in front of every
	// snapshot image, e.g. EIO on some reads: fault tests set them here,
	// in the lab they run, because cbtflow's configuration has no fault
	// settings. SetSourceFilters changes them later.
	SourceFilters []labapi.Filter
	// Logger receives the lab's logs; slog.Default() when nil.
	Logger *slog.Logger
}

// Lab is a running simulated vCenter with CBT. Its methods are safe for
// concurrent use.
type Lab struct {
	opts     Options
	log      *slog.Logger
	dir      string
	ownDir   bool // dir was created by Start and is removed by Close
	model    *simulator.Model
	server   *simulator.Server
	sdkURL   *url.URL
	thumb    string
	password string

	mu       sync.Mutex
	disks    map[diskID]*disk
	snaps    map[string]*snapRec     // by snapshot moref value
	gone     map[string]goneSnapshot // removed snapshots, by moref value: why a moref names nothing now
	pending  map[string]string       // VM moref value -> name of the snapshot being created
	stamps   []Stamp
	filters  []labapi.Filter                  // Options.SourceFilters, then SetSourceFilters
	sessions map[*simulator.Registry]struct{} // session registries holding a cbtVM
	closed   bool

	ready atomic.Bool // the default inventory is set up: follow device changes
	cfgMu sync.Mutex  // serialises the Go API's configuration changes

	closeOnce sync.Once
	closeErr  error
}

// Start creates the simulator inventory, gives every VM tracked disks and
// serves the vSphere API and the lab endpoints over HTTPS until Close. ctx
// bounds the start-up only.
func Start(ctx context.Context, opts Options) (l *Lab, err error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.User == "" {
		opts.User = DefaultUser
	}
	if opts.Listen == "" {
		opts.Listen = "127.0.0.1:0"
	}
	if err := checkLoopback(opts.Listen); err != nil {
		return nil, err
	}
	if err := labapi.CheckFilters(opts.SourceFilters); err != nil {
		return nil, fmt.Errorf("lab: source filters: %w", err)
	}
	l = &Lab{
		opts:     opts,
		log:      opts.Logger,
		password: opts.Password,
		disks:    map[diskID]*disk{},
		snaps:    map[string]*snapRec{},
		gone:     map[string]goneSnapshot{},
		pending:  map[string]string{},
		sessions: map[*simulator.Registry]struct{}{},
		filters:  slices.Clone(opts.SourceFilters),
	}
	if l.password == "" {
		if l.password, err = RandomPassword(); err != nil {
			return nil, err
		}
	}
	if opts.Dir == "" {
		if l.dir, err = os.MkdirTemp("", "cbtflow-lab-"); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
		l.ownDir = true
	} else {
		if l.dir, err = filepath.Abs(opts.Dir); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
		if err := os.MkdirAll(l.dir, 0o700); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
	}
	defer func() {
		if err != nil {
			_ = l.Close()
			l = nil
		}
	}()
	// Leftovers of a lab that died: snapshots and the simulator's folders
	// never outlive a lab process.
	for _, sub := range []string{"snapshots", "vcsim"} {
		if err := os.RemoveAll(filepath.Join(l.dir, sub)); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
	}
	for _, sub := range []string{"disks", "snapshots"} {
		if err := os.MkdirAll(filepath.Join(l.dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
	}
	cert, err := l.certificate()
	if err != nil {
		return nil, err
	}

	m := simulator.VPX()
	if err := m.Create(); err != nil {
		return nil, fmt.Errorf("lab: create simulator inventory: %w", err)
	}
	l.model = m
	if err := l.relocateDatastores(); err != nil {
		return nil, err
	}

	reg := m.Service.Context.Map
	reg.Handler = l.handler
	reg.AddHandler(&hooks{lab: l})

	m.Service.Listen = &url.URL{Host: opts.Listen, User: url.UserPassword(opts.User, l.password)}
	m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if err := l.newServer(); err != nil {
		return nil, err
	}
	l.thumb = soap.ThumbprintSHA1(l.server.Certificate())
	l.sdkURL = &url.URL{Scheme: "https", Host: l.server.URL.Host, Path: l.server.URL.Path}

	if err := l.setupInventory(ctx); err != nil {
		return nil, err
	}
	l.ready.Store(true)
	if err := l.removeStaleImages(); err != nil {
		return nil, err
	}
	l.log.Info("lab started", "url", l.sdkURL.String(), "dir", l.dir, "thumbprint", l.thumb)
	return l, nil
}

// newServer starts the HTTPS server. The simulator panics when it cannot
// listen; that becomes an error here.
func (l *Lab) newServer() (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("lab: listen on %s: %v", l.opts.Listen, r)
		}
	}()
	svc := l.model.Service
	svc.ServeMux = http.NewServeMux()
	svc.ServeMux.Handle(endpointPrefix, l.endpoints())
	l.server = svc.NewServer()
	return nil
}

func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("lab: listen address %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("lab: listen address %q is not a loopback address: the lab endpoints need no login", addr)
	}
	return nil
}

// RandomPassword returns a random password (32 hex characters).
func RandomPassword() (string, error) {
	b := make([]byte, 16)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		return "", fmt.Errorf("lab: random password: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// URL returns the vSphere SDK URL (https://127.0.0.1:PORT/sdk), without
// credentials.
func (l *Lab) URL() *url.URL {
	u := *l.sdkURL
	return &u
}

// Thumbprint returns the SHA-1 thumbprint of the lab's TLS certificate,
// colon-separated upper-case hex as vSphere shows it.
func (l *Lab) Thumbprint() string { return l.thumb }

// User returns the login user.
func (l *Lab) User() string { return l.opts.User }

// Password returns the login password (generated when Options.Password was
// empty). Never log it.
func (l *Lab) Password() string { return l.password }

// Dir returns the directory holding the lab's files.
func (l *Lab) Dir() string { return l.dir }

// Close stops the server, waits for requests in flight, and removes the
// frozen snapshot images and the simulator's folders; live disk images and
// the certificate are kept when Options.Dir was given, everything is removed
// otherwise. Close is idempotent.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		if l.server != nil {
			l.server.Close()
		}
		l.mu.Lock()
		l.closed = true
		disks := l.disks
		l.disks = map[diskID]*disk{}
		l.snaps = map[string]*snapRec{}
		l.mu.Unlock()
		var errs []error
		for _, d := range disks {
			d.mu.Lock()
			if d.f != nil {
				errs = append(errs, d.f.Close())
				d.f = nil
			}
			d.mu.Unlock()
		}
		if l.model != nil {
			l.model.Remove()
		}
		if l.ownDir {
			errs = append(errs, os.RemoveAll(l.dir))
		} else if l.dir != "" {
			errs = append(errs, os.RemoveAll(filepath.Join(l.dir, "snapshots")), os.RemoveAll(filepath.Join(l.dir, "vcsim")))
		}
		l.closeErr = errors.Join(errs...)
		if l.closeErr != nil {
			l.closeErr = fmt.Errorf("lab: close: %w", l.closeErr)
		}
		l.log.Info("lab stopped", "dir", l.dir)
	})
	return l.closeErr
}

// relocateDatastores moves the simulator's datastore folders, which
// Model.Create puts under $TMPDIR, into the lab's dir, so that everything the
// lab creates lives in one place and goes away with it.
func (l *Lab) relocateDatastores() error {
	reg := l.model.Service.Context.Map
	om := reg.OptionManager()
	var home *types.OptionValue
	for _, s := range om.Setting {
		if o := s.GetOptionValue(); o.Key == "vcsim.home" {
			home = o
		}
	}
	if home == nil {
		return errors.New("lab: simulator has no vcsim.home setting")
	}
	oldHome, _ := home.Value.(string)
	if oldHome == "" {
		return errors.New("lab: simulator has an empty vcsim.home")
	}
	newHome := filepath.Join(l.dir, "vcsim")
	if err := moveTree(oldHome, newHome); err != nil {
		return fmt.Errorf("lab: move simulator datastores into %s: %w", l.dir, err)
	}
	rewrite := func(p string) string {
		if p == oldHome || strings.HasPrefix(p, oldHome+"/") {
			return newHome + strings.TrimPrefix(p, oldHome)
		}
		return p
	}
	for _, e := range reg.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if !ok {
			continue
		}
		info := ds.Info.GetDatastoreInfo()
		info.Url = rewrite(info.Url)
		if local, ok := ds.Info.(*types.LocalDatastoreInfo); ok {
			local.Path = rewrite(local.Path)
		}
		ds.Summary.Url = rewrite(ds.Summary.Url)
	}
	home.Value = newHome
	return nil
}

// moveTree renames src to dst, copying when they are on different file
// systems.
func moveTree(src, dst string) error {
	err := os.Rename(src, dst)
	if err == nil {
		return nil
	}
	var le *os.LinkError
	if !errors.As(err, &le) {
		return err
	}
	err = filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o700)
		}
		in, err := os.Open(p)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
		return out.Close()
	})
	if err != nil {
		return err
	}
	return os.RemoveAll(src)
}

// certificate returns the lab's TLS certificate: kept in Dir when the
// caller gave one (a restarted lab shows the same thumbprint), fresh
// otherwise.
func (l *Lab) certificate() (tls.Certificate, error) {
	certFile, keyFile := filepath.Join(l.dir, "tls.crt"), filepath.Join(l.dir, "tls.key")
	if !l.ownDir {
		if c, err := tls.LoadX509KeyPair(certFile, keyFile); err == nil {
			return c, nil
		}
	}
	certPEM, keyPEM, err := selfSignedCert()
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("lab: certificate: %w", err)
	}
	if !l.ownDir {
		if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
			return tls.Certificate{}, fmt.Errorf("lab: %w", err)
		}
		if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
			return tls.Certificate{}, fmt.Errorf("lab: %w", err)
		}
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("lab: certificate: %w", err)
	}
	return c, nil
}

// Certificate returns the lab's TLS certificate.
func (l *Lab) Certificate() *x509.Certificate { return l.server.Certificate() }
