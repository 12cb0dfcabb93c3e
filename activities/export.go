package activities

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/qemu"
)

// The stages of a ServeExport, in its heartbeat details.
const (
	ExportStageChecking = "checking" // the lease is being taken and the chain's images checked
	ExportStageWaiting  = "waiting"  // a prune's merge of an image of the chain is pending (Note says which)
	ExportStageServing  = "serving"  // qemu-nbd serves the chain at URI
)

// ErrTypeExportRunning: a prune would remove or rewrite an image a
// running export reads (it started after the prune planned); the message
// names the export. Nothing was changed; the next prune tries again.
const ErrTypeExportRunning = "ExportRunning"

// exportLeaseTTL is how long an export's lease in the catalog lives
// unless renewed; ServeExport renews it every exportRenewEvery. A worker
// that dies takes its qemu-nbd with it, and its lease expires within
// this time, after which a prune may remove the point again.
const (
	exportLeaseTTL   = time.Minute
	exportRenewEvery = 10 * time.Second
	// exportRenewMargin: a lease that could not be renewed is given up
	// (qemu-nbd stopped) this long before it would expire, so no image is
	// ever served without a live lease protecting it.
	exportRenewMargin = 15 * time.Second
)

// exportClients is how many NBD clients may read an export at once
// (qemu-nbd --shared).
const exportClients = 16

// ServeExportInput is one export of a restore point's disk over NBD.
type ServeExportInput struct {
	// ExportID names the export's lease in the catalog: the Export
	// workflow's ID.
	ExportID string `json:"export_id"`
	BackupID string `json:"backup_id"`
	DiskKey  int32  `json:"disk_key"`
	// Listen is host:port on the worker's machine; "" is 127.0.0.1 on a
	// free port, and port 0 a free port on host.
	Listen string `json:"listen,omitempty"`
}

// ServeExportResult is what an export served; ServeExport returns only
// when canceled or failed, so the workflow sees it in no history.
type ServeExportResult struct {
	URI string `json:"uri"`
}

// ExportProgress is the heartbeat detail of ServeExport: the stage, and
// while serving the NBD URI, the address qemu-nbd listens on, the chain's
// images (top first, paths on the worker's machine) and when it began
// serving. The worker adds it to the Export workflow's progress query.
type ExportProgress struct {
	Stage   string    `json:"stage"`
	URI     string    `json:"uri,omitempty"`
	Address string    `json:"address,omitempty"`
	Images  []string  `json:"images,omitempty"`
	Since   time.Time `json:"since,omitzero"`
	Note    string    `json:"note,omitempty"`
	// Port is the port an earlier attempt chose (listen port 0) and this
	// one listens on again, carried from attempt to attempt.
	Port string `json:"port,omitempty"`
}

// ServeExport serves one disk of a restore point read-only over NBD, the
// chain as it is in the repository (no copy): qemu-nbd --read-only on the
// top image over TCP. It takes a lease in the catalog first, so that no
// prune removes or rewrites an image of the chain while it serves, and
// waits (stage waiting) while a prune's merge of one of them is pending.
// It heartbeats every second (ExportProgress) and renews the lease; it
// returns only when canceled (qemu-nbd stopped, the lease deleted) or
// when it cannot go on: qemu-nbd exited, or the lease could not be
// renewed in time (retryable: the retry serves again, on the same
// address when the port was chosen here).
func (a *Restorer) ServeExport(ctx context.Context, in ServeExportInput) (*ServeExportResult, error) {
	if in.ExportID == "" || strings.TrimSpace(in.BackupID) == "" {
		return nil, invalidInput("export: no export ID or backup ID given")
	}
	host, port, err := exportListen(in.Listen)
	if err != nil {
		return nil, invalidInput(err.Error())
	}
	// A retry keeps the port an earlier attempt chose, so the URI the
	// operator was given stays good; every heartbeat of this attempt
	// carries it on (Port), also when it fails before it serves.
	kept, pick := "", port == "0"
	if pick && activity.HasHeartbeatDetails(ctx) {
		var prev ExportProgress
		if activity.GetHeartbeatDetails(ctx, &prev) == nil {
			if h, p, err := net.SplitHostPort(prev.Address); err == nil && h == host && p != "0" {
				kept = p
			} else if prev.Port != "" {
				kept = prev.Port
			}
		}
		if kept != "" {
			port = kept
		}
	}

	var mu sync.Mutex
	latest := ExportProgress{Stage: ExportStageChecking, Port: kept}
	set := func(p ExportProgress) {
		mu.Lock()
		latest = p
		mu.Unlock()
		activity.RecordHeartbeat(ctx, p)
	}
	stopBeat := heartbeatEvery(ctx, time.Second, func() any {
		mu.Lock()
		defer mu.Unlock()
		return latest
	})
	defer stopBeat()
	set(latest)

	// The lease first, then the chain as the catalog has it under the
	// lease: no prune removes or rewrites any of it from here on.
	// This attempt holds the lease: a retry that takes it over is not
	// undone by this one's renewals or its end.
	info := activity.GetInfo(ctx)
	holder := fmt.Sprintf("%s#%d", info.WorkflowExecution.RunID, info.Attempt)
	lease := catalog.ExportLease{ID: in.ExportID, BackupID: in.BackupID, DiskKey: in.DiskKey,
		Address: net.JoinHostPort(host, port), Holder: holder}
	for {
		_, err = a.Catalog.TakeExport(ctx, lease, exportLeaseTTL)
		if !errors.Is(err, catalog.ErrMergePending) {
			break
		}
		set(ExportProgress{Stage: ExportStageWaiting, Note: err.Error(), Port: kept})
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
	if err != nil {
		return nil, exportError(in, err)
	}
	defer func() {
		ectx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := a.Catalog.EndExport(ectx, in.ExportID, holder); err != nil {
			activity.GetLogger(ctx).Warn("export: the lease could not be deleted; it expires by itself", "export", in.ExportID, "error", err)
		}
	}()
	set(ExportProgress{Stage: ExportStageChecking, Port: kept})
	chain, err := a.Catalog.Chain(ctx, in.BackupID, in.DiskKey)
	if err != nil {
		return nil, exportError(in, err)
	}
	images, err := a.checkExportChain(in, chain)
	if err != nil {
		return nil, err
	}

	exp, err := startExport(ctx, images[0], host, port)
	if err != nil {
		return nil, err
	}
	defer exp.Close()
	addr := exp.tcpAddr
	// The lease lives ttl from the database's now, which is no earlier
	// than this instant.
	renewed := time.Now()
	lease.Address = addr
	if _, err := a.Catalog.TakeExport(ctx, lease, exportLeaseTTL); err != nil {
		return nil, exportError(in, err)
	}
	if pick {
		kept = exp.port
	}
	uri := exportURI(host, exp.port)
	since := time.Now().UTC()
	set(ExportProgress{Stage: ExportStageServing, URI: uri, Address: addr, Images: images, Since: since, Port: kept})
	activity.GetLogger(ctx).Info("export serving", "export", in.ExportID, "backup", in.BackupID, "disk", in.DiskKey,
		"uri", uri, "images", len(images))

	tick := time.NewTicker(exportRenewEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			_ = exp.Close()
			activity.GetLogger(ctx).Info("export stopped", "export", in.ExportID, "uri", uri, "seconds", time.Since(since).Seconds())
			return nil, ctx.Err()
		case <-exp.Done():
			return nil, fmt.Errorf("export: qemu-nbd serving %s exited: %s", images[0], strings.TrimSpace(exp.Stderr()))
		case <-tick.C:
			var stop bool
			renewed, stop, err = renewLease(ctx, renewed, exportLeaseTTL-exportRenewMargin, func(ctx context.Context) error {
				_, err := a.Catalog.RenewExport(ctx, in.ExportID, holder, exportLeaseTTL)
				return err
			})
			if err != nil && !stop {
				activity.GetLogger(ctx).Warn("export: the lease could not be renewed; trying again", "export", in.ExportID, "error", err)
			}
			if stop {
				// Nothing protects the images any more (or soon): stop
				// serving them; the retry takes the lease again.
				_ = exp.Close()
				return nil, fmt.Errorf("export: the lease of %s could not be renewed, so the export stopped: %w", in.ExportID, err)
			}
		}
	}
}

// renewLease renews a lease last renewed at renewed (an instant no later
// than the database's now of that renewal), whose holder must stop
// serving limit after it unless renewed again. The call is bounded by
// what is left of limit: a database that does not answer (a lost
// connection, a network partition) must not keep the export serving
// past its lease's expiry. It returns the instant of the renewal (the
// one before when it failed), and stop when the export must stop: the
// lease is gone (catalog.ErrNotFound), or limit passed without a renewal.
func renewLease(ctx context.Context, renewed time.Time, limit time.Duration, renew func(context.Context) error) (time.Time, bool, error) {
	left := limit - time.Since(renewed)
	if left <= 0 {
		return renewed, true, fmt.Errorf("not renewed for %s", time.Since(renewed).Round(time.Millisecond))
	}
	start := time.Now()
	rctx, cancel := context.WithTimeout(ctx, left)
	err := renew(rctx)
	cancel()
	switch {
	case err == nil:
		return start, false, nil
	case errors.Is(err, catalog.ErrNotFound):
		return renewed, true, err
	case time.Since(renewed) >= limit:
		return renewed, true, fmt.Errorf("not renewed for %s: %w", time.Since(renewed).Round(time.Millisecond), err)
	}
	return renewed, false, err // tried again at the next tick, while limit allows
}

// invalidInput is a non-retryable InvalidInput error with msg.
func invalidInput(msg string) error {
	return temporal.NewNonRetryableApplicationError(msg, ErrTypeInvalidInput, nil)
}

// exportListen splits an export's listen address: "" is 127.0.0.1 on a
// free port (port "0").
func exportListen(listen string) (host, port string, err error) {
	if listen == "" {
		return "127.0.0.1", "0", nil
	}
	host, port, err = net.SplitHostPort(listen)
	if err != nil {
		return "", "", fmt.Errorf("export: listen address %q is not HOST:PORT: %v", listen, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return "", "", fmt.Errorf("export: listen address %q: port %q is not a number from 0 to 65535", listen, port)
	}
	if host == "" {
		host = "0.0.0.0"
	}
	return host, port, nil
}

// exportURI is the NBD URI clients use: a wildcard address is named by
// the worker's host name (the clients are elsewhere).
func exportURI(host, port string) string {
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		if name, err := os.Hostname(); err == nil && name != "" {
			host = name
		}
	}
	return "nbd://" + net.JoinHostPort(host, port)
}

// runningExport is qemu-nbd serving an export and the port it got.
type runningExport struct {
	*qemu.Export
	port    string
	tcpAddr string
}

// startExport starts qemu-nbd read-only on the top image. Port "0" picks
// a free port: one the kernel just gave out, tried a few times in case
// another process takes it between the pick and qemu-nbd's bind.
func startExport(ctx context.Context, top, host, port string) (*runningExport, error) {
	var last error
	for range 5 {
		p := port
		if p == "0" {
			l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
			if err != nil {
				return nil, invalidInput(fmt.Sprintf("export: cannot listen on %s: %v", host, err))
			}
			_, p, _ = net.SplitHostPort(l.Addr().String())
			l.Close()
		}
		addr := net.JoinHostPort(host, p)
		exp, err := qemu.StartQemuNBD(ctx, qemu.QemuNBDOptions{Image: top, Format: "qcow2", ReadOnly: true,
			Shared: exportClients, Listen: addr})
		if err == nil {
			return &runningExport{Export: exp, port: p, tcpAddr: addr}, nil
		}
		last = err
		if port != "0" || ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("export: %w", last)
}

// checkExportChain proves, cheaply, that the chain's images are the ones
// the catalog records: each exists, is a regular file of the recorded
// size, and its QCOW2 header names the next image as its backing file.
// Not the full SHA-256 read a restore does first: instant access must be
// instant, and a multi-TiB chain takes hours to hash (starter verify, and
// the weekly schedule, do that). It returns the images' paths, top first.
// The lease was taken first, so the chain has no pending merge.
func (a *Restorer) checkExportChain(in ServeExportInput, chain []catalog.ChainLink) ([]string, error) {
	paths := make([]string, len(chain))
	for i, link := range chain {
		if link.Damaged != "" {
			return nil, damagedExport(in, fmt.Sprintf("restore point %s disk %d is marked damaged: %s", link.BackupID, in.DiskKey, link.Damaged))
		}
		paths[i] = a.Repo.Resolve(link.Path)
	}
	for i, link := range chain {
		fi, err := os.Stat(paths[i])
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				if _, derr := os.Stat(filepath.Dir(paths[i])); derr != nil {
					return nil, fmt.Errorf("export: %w (is the repository mounted?)", derr)
				}
				return nil, damagedExport(in, fmt.Sprintf("image %s is missing", paths[i]))
			}
			return nil, fmt.Errorf("export: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return nil, damagedExport(in, fmt.Sprintf("image %s is not a regular file", paths[i]))
		}
		if fi.Size() != link.SizeBytes {
			return nil, damagedExport(in, fmt.Sprintf("image %s is %d bytes, %d were recorded at commit", paths[i], fi.Size(), link.SizeBytes))
		}
		backing, err := integrity.BackingFile(paths[i])
		if err != nil {
			var d *integrity.Damage
			if errors.As(err, &d) {
				return nil, damagedExport(in, d.Error())
			}
			return nil, fmt.Errorf("export: %w", err)
		}
		want := ""
		if i+1 < len(chain) {
			want = paths[i+1]
		}
		got := backing
		if got != "" && !filepath.IsAbs(got) {
			got = filepath.Join(filepath.Dir(paths[i]), got)
		}
		if filepath.Clean(got) != filepath.Clean(want) && !(got == "" && want == "") {
			return nil, damagedExport(in, fmt.Sprintf("image %s has backing file %q, the catalog records %q", paths[i], backing, want))
		}
	}
	return paths, nil
}

func damagedExport(in ServeExportInput, why string) error {
	msg := fmt.Sprintf("export: restore point %s disk %d cannot be served: %s", in.BackupID, in.DiskKey, why)
	return temporal.NewNonRetryableApplicationError(msg, ErrTypeRestorePointDamaged, nil)
}

// exportError types the catalog's answers that no retry changes.
func exportError(in ServeExportInput, err error) error {
	switch {
	case errors.Is(err, catalog.ErrNotFound):
		msg := fmt.Sprintf("export: backup %s has no restore point of disk %d (%v)", in.BackupID, in.DiskKey, err)
		return temporal.NewNonRetryableApplicationError(msg, ErrTypeNoRestorePoint, nil)
	case errors.Is(err, catalog.ErrBrokenChain):
		return damagedExport(in, err.Error())
	}
	return permanent(err)
}
