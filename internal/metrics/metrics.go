// Package metrics builds the tally scope that cbtflow's worker reports to,
// shared with the Temporal SDK, and serves it to Prometheus on /metrics,
// with the collectors registered on the server (Register) on the same
// endpoint.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/uber-go/tally/v4"
	"github.com/uber-go/tally/v4/prometheus"
)

// Server is a running /metrics endpoint with its scope.
type Server struct {
	Scope tally.Scope
	// Backup is cbtflow's own metrics of backups, served on the endpoint
	// with their help texts.
	Backup   *Backup
	registry *prom.Registry
	closer   interface{ Close() error }
	srv      *http.Server
	ln       net.Listener
}

// Start serves a Prometheus endpoint on addr (host:port; port 0 picks one)
// and returns the scope to report to. The endpoint serves a registry of
// its own (not the process-wide default): the scope's metrics, the Go
// runtime's and the process's, the backups' (Backup), and what Register
// adds.
func Start(addr string) (*Server, error) {
	registry := prom.NewRegistry()
	backup := NewBackup()
	registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), backup)
	reporter := prometheus.NewReporter(prometheus.Options{Registerer: registry})
	scope, closer := tally.NewRootScope(tally.ScopeOptions{
		Prefix:          "cbtflow",
		CachedReporter:  reporter,
		Separator:       prometheus.DefaultSeparator,
		SanitizeOptions: &prometheus.DefaultSanitizerOpts,
	}, time.Second)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		closer.Close()
		return nil, fmt.Errorf("metrics: listen on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", reporter.HTTPHandler())
	s := &Server{Scope: scope, Backup: backup, registry: registry, closer: closer, ln: ln, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			_ = err // the worker keeps running without metrics
		}
	}()
	return s, nil
}

// Register adds a collector to what the endpoint serves, beside the
// scope's metrics; its metric names must not clash with theirs.
func (s *Server) Register(c prom.Collector) error { return s.registry.Register(c) }

// Addr is the address the endpoint listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops the endpoint and flushes the scope.
func (s *Server) Close(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	return errors.Join(err, s.closer.Close())
}
