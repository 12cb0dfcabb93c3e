package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cbtflow/cbtflow/internal/child"
)

// Names of the files an export keeps in its directory.
const (
	socketName  = "nbd.sock"
	pidFileName = "nbd.pid"
)

// maxSocketPath is the longest unix socket path Linux accepts (sun_path
// holds 108 bytes including the terminating NUL).
const maxSocketPath = 107

// Export is a running NBD server on a unix socket.
type Export struct {
	program string
	cmd     *exec.Cmd
	dir     string
	ownDir  bool // the directory was made by Start and is removed by Close
	socket  string
	tcp     string // host:port when the server listens on TCP (QemuNBDOptions.Listen)
	pidFile string
	// sockInfo is the socket as the server made it (once it was ready):
	// Close removes the socket at that path only while it is still this
	// one.
	sockInfo os.FileInfo
	stderr   *tailBuffer
	done     chan struct{} // closed when the process has been reaped
	waitErr  error

	closeOnce sync.Once
	closeErr  error
}

// URI is the NBD URI of the export, for libnbd and qemu-img: on its TCP
// address (as given: a wildcard address is the caller's to name) or its
// unix socket.
func (e *Export) URI() string {
	if e.tcp != "" {
		return "nbd://" + e.tcp
	}
	return "nbd+unix:///?socket=" + e.socket
}

// Socket is the path of the export's unix socket.
func (e *Export) Socket() string { return e.socket }

// Pid is the process ID of the server.
func (e *Export) Pid() int { return e.cmd.Process.Pid }

// Done is closed when the server process has exited.
func (e *Export) Done() <-chan struct{} { return e.done }

// Stderr returns the last few KiB the server wrote to its stderr.
func (e *Export) Stderr() string { return e.stderr.String() }

// Close stops the server (SIGTERM, then SIGKILL after a grace period),
// waits for it, and removes its socket, pid file and — when Start made it —
// its directory; a socket and a pid file that a later start in the same
// directory made stay (see stop). It is safe to call more than once.
func (e *Export) Close() error {
	e.closeOnce.Do(func() { e.closeErr = e.stop(syscall.SIGTERM, 10*time.Second) })
	return e.closeErr
}

// Kill stops the server at once with SIGKILL, as a crash would, and cleans
// up like Close. Data the server acknowledged but did not flush is lost,
// which is what tests of resumption want.
func (e *Export) Kill() error {
	e.closeOnce.Do(func() { e.closeErr = e.stop(syscall.SIGKILL, 0) })
	return e.closeErr
}

func (e *Export) stop(sig syscall.Signal, grace time.Duration) error {
	select {
	case <-e.done:
	default:
		_ = e.cmd.Process.Signal(sig)
		select {
		case <-e.done:
		case <-time.After(grace):
			_ = e.cmd.Process.Kill()
			<-e.done
		}
	}
	// A later start in the same folder (a retry of the same transfer,
	// which stopped this server as stale) owns the socket and the pid file
	// at these paths now: they are removed only while they are this
	// server's. The pid file is while it names this server (a later start
	// removes it, then writes its own); the socket is while it is the file
	// this server made (an inode is soon reused: its time is compared
	// too), or, made before the server was ready, while the pid file is.
	// A folder Start made for this server alone is all its own.
	var errs []error
	ours := e.ownDir || e.pidFileNamesUs()
	sockOurs := ours
	if e.sockInfo != nil {
		fi, err := os.Lstat(e.socket)
		sockOurs = e.ownDir || err == nil && os.SameFile(fi, e.sockInfo) && fi.ModTime().Equal(e.sockInfo.ModTime())
	}
	for _, f := range []struct {
		path string
		ours bool
	}{{e.socket, sockOurs}, {e.pidFile, ours}} {
		if !f.ours {
			continue
		}
		if err := os.Remove(f.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if e.ownDir {
		if err := os.Remove(e.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// pidFileNamesUs reports whether the pid file names this server's
// process.
func (e *Export) pidFileNamesUs() bool {
	b, err := os.ReadFile(e.pidFile)
	return err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(e.cmd.Process.Pid)
}

// spec is what Start needs to run one server.
type spec struct {
	program string
	args    func(socket string) []string
	dir     string // empty: a fresh private directory under os.TempDir()
	timeout time.Duration
	tcp     string // host:port the server listens on instead of the socket
}

// start runs a server in the foreground and waits until its socket accepts
// connections. When dir is given, a server that an earlier, killed attempt
// left there (recorded in the pid file) is stopped first.
//
// A given dir that vanished while the server started (an earlier attempt
// of the same transfer removing its folder, empty as it was, as it ended)
// is made again, and the server started once more: that attempt removes
// its folder once.
func start(ctx context.Context, s spec) (*Export, error) {
	e, err := startIn(ctx, s)
	if err != nil && s.dir != "" {
		if _, serr := os.Stat(s.dir); errors.Is(serr, os.ErrNotExist) {
			return startIn(ctx, s)
		}
	}
	return e, err
}

// testHookStarting, when set, runs once the folder is ready, before the
// server's process starts.
var testHookStarting func(dir string)

func startIn(ctx context.Context, s spec) (*Export, error) {
	dir, ownDir, err := exportDir(s.dir)
	if err != nil {
		return nil, err
	}
	e := &Export{
		program: s.program,
		dir:     dir,
		ownDir:  ownDir,
		socket:  filepath.Join(dir, socketName),
		tcp:     s.tcp,
		pidFile: filepath.Join(dir, pidFileName),
		stderr:  &tailBuffer{max: 8 << 10},
		done:    make(chan struct{}),
	}
	cleanupDir := func() {
		if ownDir {
			_ = os.RemoveAll(dir)
		}
	}
	if len(e.socket) > maxSocketPath {
		cleanupDir()
		return nil, fmt.Errorf("qemu: socket path %s is longer than %d bytes", e.socket, maxSocketPath)
	}
	if err := stopStale(e.pidFile, s.program, e.socket); err != nil {
		cleanupDir()
		return nil, err
	}
	if err := os.Remove(e.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		cleanupDir()
		return nil, fmt.Errorf("qemu: remove stale socket: %w", err)
	}

	if testHookStarting != nil {
		testHookStarting(dir)
	}
	args := s.args(e.socket)
	e.cmd = exec.Command(s.program, args...)
	e.cmd.Stderr = e.stderr
	e.cmd.Stdout = e.stderr
	e.cmd.Env = childEnv(os.Environ())
	// The server must not outlive a worker killed with SIGKILL: it would keep
	// the image's write lock (see internal/child).
	if err := child.Start(e.cmd); err != nil {
		cleanupDir()
		return nil, fmt.Errorf("qemu: start %s: %w", s.program, err)
	}
	go func() {
		e.waitErr = e.cmd.Wait()
		close(e.done)
	}()
	if err := os.WriteFile(e.pidFile, []byte(strconv.Itoa(e.cmd.Process.Pid)+"\n"), 0o600); err != nil {
		_ = e.Kill()
		return nil, fmt.Errorf("qemu: write pid file: %w", err)
	}

	timeout := s.timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	if err := e.waitReady(ctx, timeout); err != nil {
		_ = e.Kill()
		return nil, err
	}
	if e.tcp == "" {
		e.sockInfo, _ = os.Lstat(e.socket)
	}
	return e, nil
}

// waitReady polls the socket until the server accepts a connection, the
// server exits, or the time is up.
func (e *Export) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if e.tcp != "" && Greets("tcp", e.tcp) {
			return nil
		}
		if _, err := os.Stat(e.socket); e.tcp == "" && err == nil && Greets("unix", e.socket) {
			return nil
		}
		select {
		case <-e.done:
			return fmt.Errorf("qemu: %s exited before it was ready (%v): %s", e.program, e.waitErr, strings.TrimSpace(e.Stderr()))
		case <-ctx.Done():
			return fmt.Errorf("qemu: waiting for %s: %w", e.program, ctx.Err())
		case <-deadline.C:
			return fmt.Errorf("qemu: %s not ready after %s: %s", e.program, timeout, strings.TrimSpace(e.Stderr()))
		case <-tick.C:
		}
	}
}

// Greets reports whether an NBD server at addr ("unix" or "tcp") answers
// a connection with its greeting. A listening socket alone is not enough:
// qemu-nbd binds it before it opens the image, and may still fail.
func Greets(network, addr string) bool {
	c, err := net.DialTimeout(network, addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	magic := make([]byte, 8)
	if _, err := io.ReadFull(c, magic); err != nil {
		return false
	}
	return string(magic) == "NBDMAGIC"
}

// exportDir returns the directory for an export's socket: dir itself (made
// 0700 when missing), or a fresh private directory.
func exportDir(dir string) (string, bool, error) {
	if dir == "" {
		d, err := os.MkdirTemp("", "cbtflow-nbd-")
		if err != nil {
			return "", false, fmt.Errorf("qemu: socket directory: %w", err)
		}
		return d, true, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", false, fmt.Errorf("qemu: socket directory: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return "", false, fmt.Errorf("qemu: socket directory: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return "", false, fmt.Errorf("qemu: socket directory %s: %w", dir, err)
		}
	}
	return dir, false, nil
}

// stopStale kills the server recorded in pidFile when it is still running
// and really is program serving socket (pids are reused), and waits until
// it is gone, so the image's lock is free again.
func stopStale(pidFile, program, socket string) error {
	b, err := os.ReadFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("qemu: read pid file: %w", err)
	}
	// The stale server's own Close may remove its pid file meanwhile (its
	// owner sees it exit): gone is as good as removed.
	remove := func() error {
		if err := os.Remove(pidFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return remove()
	}
	if !isServer(pid, program, socket) {
		return remove()
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for i := 0; i < 500 && isServer(pid, program, socket); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if isServer(pid, program, socket) {
		return fmt.Errorf("qemu: stale %s (pid %d) on %s does not exit", program, pid, socket)
	}
	return remove()
}

// isServer reports whether pid is a live process running program with
// socket on its command line.
func isServer(pid int, program, socket string) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 {
		if f := strings.Fields(string(stat[i+1:])); len(f) > 0 && f[0] == "Z" {
			return false
		}
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	argv := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if len(argv) == 0 || filepath.Base(argv[0]) != filepath.Base(program) {
		return false
	}
	for _, a := range argv[1:] {
		if a == socket {
			return true
		}
	}
	return false
}

// childEnv drops variables that may hold secrets: the servers never need
// them, and a child's environment is readable by its user.
func childEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		up := strings.ToUpper(name)
		if strings.Contains(up, "PASSWORD") || strings.Contains(up, "SECRET") || strings.Contains(up, "TOKEN") {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}
