package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Programs run by this package; tests may point them elsewhere.
var (
	QemuNBD = "qemu-nbd"
	Nbdkit  = "nbdkit"
)

// QemuNBDOptions describes a qemu-nbd export of one image.
type QemuNBDOptions struct {
	Image    string
	Format   string // "qcow2" or "raw"
	ReadOnly bool
	// Shared is how many clients may connect at once (-e); default 4.
	Shared int
	// Cache is qemu's cache mode (--cache). Empty means "none" (O_DIRECT)
	// for a writable export and qemu's writeback for a read-only one; a
	// writable export falls back to writeback when the image's file system
	// refuses O_DIRECT (StartQemuNBD checks).
	//
	// Why "none": a backup target is written once and read rarely. Through
	// the page cache, qemu-nbd's copy into cache pages was the bottleneck
	// of a full backup (measured: its CPU doubled, and the copy with it,
	// when the image sat next to a large sparse file), the cache filled
	// with backup data, and the final FLUSH wrote it all out. With O_DIRECT
	// qemu-nbd hands its buffer to the disk; a FLUSH is still needed for
	// the disk's own cache, so the copier's resume point rules are
	// unchanged.
	Cache string
	// Discard is the discard mode (--discard); default "unmap" for writable
	// exports, so NBD trims and zeroes can free clusters.
	Discard string
	// Dir is the private directory for the socket and pid file; empty makes
	// a fresh one. A retry that passes the same Dir stops a server a killed
	// predecessor left there.
	Dir string
	// Timeout bounds the wait for readiness; default 30s.
	Timeout time.Duration
	// Listen, when set (host:port), serves over TCP on that address
	// instead of the unix socket: an export for NBD clients elsewhere
	// (instant access). The socket's directory still holds the pid file.
	Listen string
}

// Args returns qemu-nbd's argv (without the program name) for a server on
// socket. The server stays in the foreground and keeps running across
// clients (-t); it is never daemonized (--fork), since a forked server
// would outlive a killed parent.
func (o QemuNBDOptions) Args(socket string) []string {
	shared := o.Shared
	if shared <= 0 {
		shared = 4
	}
	args := []string{"-t", "-k", socket}
	if host, port, err := net.SplitHostPort(o.Listen); err == nil {
		args = []string{"-t", "-b", host, "-p", port}
	}
	opts := o.Format == "qcow2" && !o.ReadOnly
	if !opts {
		// The options name the format (qemu-nbd refuses both).
		args = append(args, "-f", o.Format)
	}
	args = append(args, "-e", strconv.Itoa(shared))
	if o.ReadOnly {
		args = append(args, "-r")
	} else {
		discard := o.Discard
		if discard == "" {
			discard = "unmap"
		}
		args = append(args, "--discard="+discard)
	}
	cache := o.Cache
	if cache == "" && !o.ReadOnly {
		cache = "none"
	}
	if cache != "" {
		args = append(args, "--cache="+cache)
	}
	if opts {
		return append(args, "--image-opts", writableQcow2Opts(o.Image))
	}
	return append(args, o.Image)
}

// writableQcow2Opts are the block options of a QCOW2 image qemu-nbd serves
// writable: the image named on its file node (a comma in its path written
// twice), and l2-cache-entry-size=4096. qemu writes its metadata in whole
// cache entries: by default (an entry is a cluster) every flush writes
// each L2 table it touched whole again, 2 MiB with the images' 2 MiB
// clusters (ImageOptions); in 4 KiB slices (256 entries, 512 MiB of the
// disk each) a flush writes the slices that changed. The transfer's
// images come with the L2 tables their copy needs (internal/qcow2.Create),
// so qemu allocates none (a table it allocates, it writes whole, zeros and
// all, and syncs twice). The discard mode (--discard) and the cache mode
// (--cache) reach the file node as with -f.
//
// Measured with the copier writing 160 scattered 64 KiB pieces (10 MiB)
// into an overlay of a 2 TiB disk (8 tables), 3 runs each: qemu's defaults
// on an image without tables wrote 72 MiB to the disk; with the tables
// made and 4 KiB slices, 12.9 MiB, and the copy took 0.10 s instead of
// 0.18-0.20 s. (Punching the zeros qemu writes, file.detect-zeroes=unmap,
// saved nothing more with the tables made, and can leave a cluster qemu
// allocated past the file's end, which qemu-img check counts as a
// corruption.)
func writableQcow2Opts(image string) string {
	return "driver=qcow2,l2-cache-entry-size=4096,file.driver=file,file.filename=" + strings.ReplaceAll(image, ",", ",,")
}

func (o QemuNBDOptions) validate() error {
	if o.Image == "" {
		return errors.New("qemu-nbd: no image")
	}
	switch o.Format {
	case "qcow2", "raw":
	default:
		return fmt.Errorf("qemu-nbd: format %q is not qcow2 or raw", o.Format)
	}
	return nil
}

// StartQemuNBD serves one image with qemu-nbd and returns once the socket
// accepts connections. ctx bounds only the start; the server runs until
// Close or Kill.
func StartQemuNBD(ctx context.Context, o QemuNBDOptions) (*Export, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	if o.Cache == "" && !o.ReadOnly && !directIO(o.Image) {
		o.Cache = "writeback"
	}
	if o.Listen != "" {
		if _, _, err := net.SplitHostPort(o.Listen); err != nil {
			return nil, fmt.Errorf("qemu-nbd: listen address %q: %w", o.Listen, err)
		}
	}
	return start(ctx, spec{program: QemuNBD, args: o.Args, dir: o.Dir, timeout: o.Timeout, tcp: o.Listen})
}

// directIO reports whether path can be opened with O_DIRECT (tmpfs before
// Linux 6.6 and some FUSE file systems refuse it). A missing file counts
// as yes: qemu-nbd then reports the real error.
func directIO(path string) bool {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_DIRECT|syscall.O_CLOEXEC, 0)
	if err != nil {
		return !errors.Is(err, syscall.EINVAL)
	}
	syscall.Close(fd)
	return true
}

// NbdkitOptions describes an nbdkit export.
type NbdkitOptions struct {
	// Plugin is the plugin name or path, e.g. "file" or "vddk".
	Plugin string
	// Filters are applied in order; the first is outermost.
	Filters []string
	// Params are the KEY=VALUE parameters of the plugin and filters. A
	// password must be given as password=+FILE (read from a file), never
	// inline: argv is visible to every user of the machine.
	Params   []string
	ReadOnly bool
	// Threads is nbdkit's thread count (-t); 0 keeps its default.
	Threads int
	// Dir is the private directory for the socket and pid file, as in
	// QemuNBDOptions.
	Dir string
	// Verbose enables nbdkit's debug messages on stderr.
	Verbose bool
	// Timeout bounds the wait for readiness; default 30s.
	Timeout time.Duration
}

// Args returns nbdkit's argv (without the program name) for a server on
// socket: in the foreground, exiting with its parent.
func (o NbdkitOptions) Args(socket string) []string {
	args := []string{"--foreground", "--exit-with-parent", "--unix", socket}
	if o.ReadOnly {
		args = append(args, "--readonly")
	}
	if o.Threads > 0 {
		args = append(args, "--threads", strconv.Itoa(o.Threads))
	}
	if o.Verbose {
		args = append(args, "--verbose")
	}
	for _, f := range o.Filters {
		args = append(args, "--filter="+f)
	}
	args = append(args, o.Plugin)
	return append(args, o.Params...)
}

func (o NbdkitOptions) validate() error {
	if o.Plugin == "" {
		return errors.New("nbdkit: no plugin")
	}
	for _, p := range o.Params {
		key, value, ok := strings.Cut(p, "=")
		if !ok {
			return fmt.Errorf("nbdkit: parameter %q is not KEY=VALUE", p)
		}
		if strings.EqualFold(key, "password") && !strings.HasPrefix(value, "+") && value != "-" {
			return errors.New("nbdkit: a password must be passed as password=+FILE, never on the command line")
		}
	}
	return nil
}

// NbdkitFile returns options that serve a file with nbdkit's file plugin.
func NbdkitFile(path string, readOnly bool) NbdkitOptions {
	return NbdkitOptions{Plugin: "file", Params: []string{"file=" + path}, ReadOnly: readOnly}
}

// StartNbdkit starts nbdkit and returns once the socket accepts
// connections. ctx bounds only the start.
func StartNbdkit(ctx context.Context, o NbdkitOptions) (*Export, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	return start(ctx, spec{program: Nbdkit, args: o.Args, dir: o.Dir, timeout: o.Timeout})
}
