// Package source opens a disk of a vSphere snapshot as a read-only NBD
// export for the copier.
//
// Two kinds exist, chosen by the vCenter profile's Source:
//
//   - "vddk" (the default, production): nbdkit's vddk plugin reads the
//     snapshot's disk through VMware's VDDK (nbdssl/nbd/hotadd transports).
//     VDDK and an nbdkit with the vddk plugin are installed by the operator;
//     the password reaches nbdkit as password=+FILE, never on its command
//     line.
//   - "lab": nbdkit's file plugin serves the frozen image the lab
//     (lab) made of the snapshot's disk, found through the lab's
//     own endpoint (lab/labapi, which does not link the
//     simulator). It needs the worker and the lab to share a file system
//     (demo, tests). The endpoint also names the nbdkit filters to put in
//     front of the image: a lab started for fault tests asks for EIO on
//     some reads; cbtflow's own configuration has no such setting.
//
// The package only starts and describes the NBD server; reading from it is
// the copier's business, and finding the snapshot is internal/vsphere's.
package source

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab/labapi"
)

// Request names the snapshot disk to open.
type Request struct {
	Profile     vsphere.Profile
	VMRef       string       // VM moref value, e.g. "vm-62"
	SnapshotRef string       // snapshot moref value, e.g. "snapshot-123"
	Disk        vsphere.Disk // from the snapshot's config (its FileName is the frozen backing)
	// Dir is a private (0700) directory for the server's socket and pid
	// file. A retried attempt passes the same Dir, so that a server an
	// earlier, killed attempt left behind is stopped first. Empty: a fresh
	// temporary directory, removed by Close.
	Dir string
}

// Opener opens a snapshot disk as a read-only NBD export. The caller
// closes the export.
//
// Errors: ErrBadRequest (wrapped) is permanent — the request or the profile
// cannot work as given. Any other error (the server did not start, the lab
// did not answer) may be transient.
type Opener interface {
	Open(ctx context.Context, req Request) (*qemu.Export, error)
}

// ErrBadRequest marks a request that cannot succeed as given: fields
// missing, or a profile that lacks what the source needs.
var ErrBadRequest = errors.New("bad source request")

// New returns the opener for the profile's source: vsphere.SourceVDDK
// (also when empty) or vsphere.SourceLab.
func New(p vsphere.Profile) (Opener, error) {
	return sourceOf(p)
}

// sourceOf is the profile's source, which both reads (Opener) and writes
// (WriteOpener).
func sourceOf(p vsphere.Profile) (interface {
	Opener
	WriteOpener
}, error) {
	switch p.Source {
	case "", vsphere.SourceVDDK:
		return vddkOpener{}, nil
	case vsphere.SourceLab:
		return labOpener{}, nil
	}
	return nil, fmt.Errorf("source: profile %q: unknown source %q (want %q or %q)", p.Name, p.Source, vsphere.SourceVDDK, vsphere.SourceLab)
}

func (r Request) check() error {
	var missing []string
	if r.VMRef == "" {
		missing = append(missing, "VM moref")
	}
	if r.SnapshotRef == "" {
		missing = append(missing, "snapshot moref")
	}
	if r.Disk.FileName == "" {
		missing = append(missing, "disk file name")
	}
	if r.Disk.Capacity <= 0 {
		missing = append(missing, "disk capacity")
	}
	if len(missing) > 0 {
		return fmt.Errorf("source: %w: disk %d of snapshot %q of %q: missing %v", ErrBadRequest, r.Disk.Key, r.SnapshotRef, r.VMRef, missing)
	}
	return nil
}

// labOpener serves the lab's frozen snapshot image with nbdkit's file
// plugin.
type labOpener struct{}

// labClients are the lab API clients of the lab openers, one per lab (its
// URL and thumbprint, as a profile names them), kept with their idle
// connections. Every transfer from a lab asks it for its image: a client
// per ask, closed after it, paid a TLS handshake on both ends each time,
// 40 in a round of 20 two-disk VMs backed up at once.
var labClients struct {
	mu sync.Mutex
	m  map[labKey]*labapi.Client
}

type labKey struct{ url, thumbprint string }

// labClient returns the lab API client of profile p's lab.
func labClient(p vsphere.Profile) *labapi.Client {
	k := labKey{p.URL, p.Thumbprint}
	labClients.mu.Lock()
	defer labClients.mu.Unlock()
	if c := labClients.m[k]; c != nil {
		return c
	}
	if labClients.m == nil {
		labClients.m = map[labKey]*labapi.Client{}
	}
	c := &labapi.Client{BaseURL: p.URL, Thumbprint: p.Thumbprint}
	labClients.m[k] = c
	return c
}

// Open implements Opener.
func (labOpener) Open(ctx context.Context, req Request) (*qemu.Export, error) {
	if err := req.check(); err != nil {
		return nil, err
	}
	img, err := labClient(req.Profile).SnapshotImage(ctx, req.SnapshotRef, req.Disk.Key)
	if err != nil {
		if errors.Is(err, labapi.ErrUnknownSnapshot) || errors.Is(err, labapi.ErrUnknownDisk) {
			return nil, fmt.Errorf("source: lab image of disk %d of snapshot %s: %w: %w", req.Disk.Key, req.SnapshotRef, vsphere.ErrSnapshotNotFound, err)
		}
		return nil, fmt.Errorf("source: lab image of disk %d of snapshot %s: %w", req.Disk.Key, req.SnapshotRef, err)
	}
	if img.Capacity != req.Disk.Capacity {
		return nil, fmt.Errorf("source: %w: lab image of disk %d of snapshot %s has %d bytes, the snapshot's config says %d",
			ErrBadRequest, req.Disk.Key, req.SnapshotRef, img.Capacity, req.Disk.Capacity)
	}
	opts, err := LabOptions(img, req.Dir)
	if err != nil {
		return nil, fmt.Errorf("source: lab image of disk %d of snapshot %s: %w", req.Disk.Key, req.SnapshotRef, err)
	}
	e, err := qemu.StartNbdkit(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("source: serve lab image of disk %d of snapshot %s: %w", req.Disk.Key, req.SnapshotRef, err)
	}
	return e, nil
}

// LabOptions returns the nbdkit options that serve a lab snapshot image,
// read-only, behind the filters the lab named for it (fault tests only),
// with its socket and pid file in dir:
//
//	nbdkit --readonly [--filter=error ...] file file=IMAGE [error-pread-rate=5% ...]
//
// Filters outside labapi.FaultFilters are refused (ErrBadRequest): the
// lab is trusted only to inject faults, never to make the worker run
// another nbdkit filter.
func LabOptions(img labapi.ImageInfo, dir string) (qemu.NbdkitOptions, error) {
	if err := labapi.CheckFilters(img.Filters); err != nil {
		return qemu.NbdkitOptions{}, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	opts := qemu.NbdkitFile(img.Path, true)
	opts.Dir = dir
	opts.Threads = LabReadThreads
	for _, f := range img.Filters {
		opts.Filters = append(opts.Filters, f.Filter)
		opts.Params = append(opts.Params, f.Params...)
	}
	return opts, nil
}

// ReadThreads is nbdkit's thread count per connection (--threads) where
// a backup reads a snapshot's disk through vddk: as many
// as the copier ever keeps requests in flight (internal/copier's
// DefaultInFlight, 8, over all its connections), so no request waits for
// a thread, where nbdkit starts 16 per connection. Each thread costs
// nbdkit its start and its buffers: measured with the copier's 3
// connections, 8 threads used a quarter less of nbdkit's CPU than 16, for
// a 1 GiB copy (0.46 s against 0.60 s) and for 64 reads of 64 KiB with
// nbdkit's start (3.3 ms against 4.1 ms).
const ReadThreads = 8

// LabReadThreads is nbdkit's thread count per connection where a backup
// reads a lab image (the file plugin): the file plugin offers multi-conn,
// so the copier reads over its DefaultSourceConnections (3), each read on
// the connection with the fewest in flight, and no connection ever has
// more than ceil(8/3) = 3 reads in flight (a copy of less than 32 MiB
// reads over one connection, where its reads beyond 3 wait for a thread:
// for such a copy that costs no time). More threads only cost nbdkit
// their start and their malloc arenas: for an 8 MiB read over 3
// connections nbdkit used 26–27 ms of CPU with 8 threads, 16–20 ms with 4
// and 13–15 ms with 2 (20 runs each, on the paravirtualized machine of 6
// December), which a round of 40 small incrementals pays 40 times.
const LabReadThreads = (copier.DefaultInFlight + copier.DefaultSourceConnections - 1) / copier.DefaultSourceConnections

// vddkOpener reads the snapshot's disk through nbdkit's vddk plugin.
type vddkOpener struct{}

// Open implements Opener.
func (vddkOpener) Open(ctx context.Context, req Request) (*qemu.Export, error) {
	opts, err := VDDKOptions(req)
	if err != nil {
		return nil, err
	}
	e, err := qemu.StartNbdkit(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("source: vddk export of disk %d (%s) of snapshot %s of %s: %w",
			req.Disk.Key, req.Disk.FileName, req.SnapshotRef, req.VMRef, err)
	}
	return e, nil
}

// Retry filter settings: up to 3 reopens, 1 s then 2 s then 4 s apart.
// Short enough that a dead connection surfaces to the copier (which has its
// own retries and resume points) within seconds; long enough to ride out
// a dropped NFC connection.
const (
	vddkRetries    = "3"
	vddkRetryDelay = "1"
)

// VDDKOptions returns the nbdkit options that serve the request's disk
// with the vddk plugin, read-only:
//
//	nbdkit --readonly --filter=retry --filter=cacheextents vddk
//	  server=HOST [port=PORT] user=USER password=+FILE thumbprint=TP
//	  vm=moref=VM snapshot=SNAPSHOT file=[ds] vm/disk.vmdk
//	  [libdir=DIR] [transports=nbdssl:nbd] retries=3 retry-delay=1
//
// Filters: retry reopens the VDDK connection after an error (NFC sessions
// drop on network hiccups and host load; a read-only reopen is safe), so
// a long transfer survives them; cacheextents caches VDDK's allocation
// answers, which are slow (QueryAllocatedBlocks per request) and which the
// copier asks for per chunk. The password is never on argv: the plugin
// reads it from the profile's password file.
func VDDKOptions(req Request) (qemu.NbdkitOptions, error) {
	if err := req.check(); err != nil {
		return qemu.NbdkitOptions{}, err
	}
	p := req.Profile
	u, err := url.Parse(p.URL)
	if err != nil || u.Hostname() == "" {
		return qemu.NbdkitOptions{}, fmt.Errorf("source: %w: profile %q: url %q has no host", ErrBadRequest, p.Name, p.URL)
	}
	var missing []string
	if p.User == "" {
		missing = append(missing, "user")
	}
	if p.PasswordFile == "" {
		missing = append(missing, "password_file")
	}
	if p.Thumbprint == "" {
		// VDDK verifies vCenter and the ESXi hosts by thumbprint only.
		missing = append(missing, "thumbprint (VDDK needs it; insecure is not enough)")
	}
	if len(missing) > 0 {
		return qemu.NbdkitOptions{}, fmt.Errorf("source: %w: profile %q lacks %v for the vddk source", ErrBadRequest, p.Name, missing)
	}
	params := []string{"server=" + u.Hostname()}
	if port := u.Port(); port != "" {
		params = append(params, "port="+port)
	}
	params = append(params,
		"user="+p.User,
		"password=+"+p.PasswordFile,
		"thumbprint="+strings.ToUpper(p.Thumbprint),
		"vm=moref="+req.VMRef,
		"snapshot="+req.SnapshotRef,
		"file="+req.Disk.FileName,
	)
	if p.VDDKLibDir != "" {
		params = append(params, "libdir="+p.VDDKLibDir)
	}
	if p.Transports != "" {
		params = append(params, "transports="+p.Transports)
	}
	params = append(params, "retries="+vddkRetries, "retry-delay="+vddkRetryDelay)
	return qemu.NbdkitOptions{
		Plugin:   "vddk",
		Filters:  []string{"retry", "cacheextents"},
		Params:   params,
		ReadOnly: true,
		Threads:  ReadThreads,
		Dir:      req.Dir,
	}, nil
}

// WriteRequest names a VM's disk to open for writing (a restore into the
// VM): its live disk, as the VM's current config describes it, not a
// snapshot's.
type WriteRequest struct {
	Profile vsphere.Profile
	VMRef   string       // VM moref value, e.g. "vm-62"
	Disk    vsphere.Disk // from the VM's current config: FileName is the disk it writes now (a snapshot's delta when it has one)
	// Dir is a private (0700) directory for the server's socket and pid
	// file, as in Request.
	Dir string
}

// WriteOpener opens a VM's disk as a writable NBD export. The VM must be
// powered off; the caller closes the export after a FLUSH.
//
// Errors: ErrBadRequest as for Opener; ErrPoweredOn (wrapped) when the
// VM is not powered off. Any other error may be transient.
type WriteOpener interface {
	OpenWrite(ctx context.Context, req WriteRequest) (*qemu.Export, error)
}

// ErrPoweredOn marks a VM whose disks may not be written because it is
// not powered off.
var ErrPoweredOn = errors.New("VM is not powered off")

// NewWriter returns the write opener for the profile's source, as New
// does for reading.
func NewWriter(p vsphere.Profile) (WriteOpener, error) {
	return sourceOf(p)
}

func (r WriteRequest) check() error {
	var missing []string
	if r.VMRef == "" {
		missing = append(missing, "VM moref")
	}
	if r.Disk.FileName == "" {
		missing = append(missing, "disk file name")
	}
	if r.Disk.Capacity <= 0 {
		missing = append(missing, "disk capacity")
	}
	if len(missing) > 0 {
		return fmt.Errorf("source: %w: disk %d of %q for writing: missing %v", ErrBadRequest, r.Disk.Key, r.VMRef, missing)
	}
	return nil
}

// OpenWrite serves the live image of the VM's disk read-write with
// nbdkit's file plugin: the lab's equivalent of the vddk plugin's write
// mode. The lab refuses unless the VM is powered off, and ends the
// disk's change-ID series, since it cannot see what is written here.
func (labOpener) OpenWrite(ctx context.Context, req WriteRequest) (*qemu.Export, error) {
	if err := req.check(); err != nil {
		return nil, err
	}
	img, err := labClient(req.Profile).LiveImage(ctx, req.VMRef, req.Disk.Key)
	if err != nil {
		if errors.Is(err, labapi.ErrPoweredOn) {
			return nil, fmt.Errorf("source: disk %d of %s: %w: %w", req.Disk.Key, req.VMRef, ErrPoweredOn, err)
		}
		if errors.Is(err, labapi.ErrUnknownVM) || errors.Is(err, labapi.ErrUnknownDisk) {
			return nil, fmt.Errorf("source: %w: live image of disk %d of %s: %w", ErrBadRequest, req.Disk.Key, req.VMRef, err)
		}
		return nil, fmt.Errorf("source: live image of disk %d of %s: %w", req.Disk.Key, req.VMRef, err)
	}
	if img.Capacity != req.Disk.Capacity {
		return nil, fmt.Errorf("source: %w: live image of disk %d of %s has %d bytes, the VM's config says %d",
			ErrBadRequest, req.Disk.Key, req.VMRef, img.Capacity, req.Disk.Capacity)
	}
	opts := qemu.NbdkitFile(img.Path, false)
	opts.Dir = req.Dir
	e, err := qemu.StartNbdkit(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("source: serve the live image of disk %d of %s: %w", req.Disk.Key, req.VMRef, err)
	}
	return e, nil
}

// OpenWrite serves the VM's disk read-write through nbdkit's vddk
// plugin (VDDKWriteOptions). VDDK itself refuses to open the disk of a
// running VM for writing; the restore checks the power state first.
func (vddkOpener) OpenWrite(ctx context.Context, req WriteRequest) (*qemu.Export, error) {
	opts, err := VDDKWriteOptions(req)
	if err != nil {
		return nil, err
	}
	e, err := qemu.StartNbdkit(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("source: vddk write export of disk %d (%s) of %s: %w", req.Disk.Key, req.Disk.FileName, req.VMRef, err)
	}
	return e, nil
}

// VDDKWriteOptions returns the nbdkit options that serve a VM's disk
// with the vddk plugin for writing (a restore):
//
//	nbdkit --filter=retry vddk
//	  server=HOST [port=PORT] user=USER password=+FILE thumbprint=TP
//	  vm=moref=VM file=[ds] vm/disk-000001.vmdk
//	  [libdir=DIR] [transports=nbdssl:nbd] retries=3 retry-delay=1
//
// It is VDDKOptions without --readonly and without snapshot=: VDDK then
// opens the disk the VM runs on, the delta of the restore's snapshot, so
// reverting to that snapshot undoes the writes. The retry filter reopens
// a dropped NFC connection and repeats the request, which is safe for the
// restore's writes (the same data at the same offset); cacheextents is
// left out: nothing reads the target's allocation. The password is read
// from the profile's password file, never put on argv.
func VDDKWriteOptions(req WriteRequest) (qemu.NbdkitOptions, error) {
	if err := req.check(); err != nil {
		return qemu.NbdkitOptions{}, err
	}
	// The read options' checks and parameters, with a snapshot moref
	// that is then left out.
	ro, err := VDDKOptions(Request{Profile: req.Profile, VMRef: req.VMRef, SnapshotRef: "-", Disk: req.Disk, Dir: req.Dir})
	if err != nil {
		return qemu.NbdkitOptions{}, err
	}
	params := make([]string, 0, len(ro.Params))
	for _, p := range ro.Params {
		if !strings.HasPrefix(p, "snapshot=") {
			params = append(params, p)
		}
	}
	return qemu.NbdkitOptions{
		Plugin:  "vddk",
		Filters: []string{"retry"},
		Params:  params,
		Dir:     req.Dir,
	}, nil
}
