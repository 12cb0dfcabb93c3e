// Package nbdtest starts real NBD servers (nbdkit, qemu-nbd) on unix sockets
// for the tests of packages nbd and copier. It is imported only from
// _test.go files. A missing program fails the test: these tests exist to
// exercise the real servers.
package nbdtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

// Server is a running NBD server process serving one unix socket.
type Server struct {
	Socket string // path of the unix socket
	URI    string // nbd+unix URI of the export

	cmd     *exec.Cmd
	waitErr error
	exited  chan struct{}
	stderr  *strings.Builder
	once    sync.Once
}

// StartNbdkit starts `nbdkit -f --exit-with-parent -U SOCK args...` with the
// socket in dir and stops it when the test ends.
func StartNbdkit(t testing.TB, dir string, args ...string) *Server {
	t.Helper()
	sock := filepath.Join(dir, fmt.Sprintf("nbdkit-%d.sock", time.Now().UnixNano()))
	argv := append([]string{"-f", "--exit-with-parent", "-U", sock}, args...)
	return start(t, sock, "nbdkit", argv...)
}

// StartQemuNBD starts `qemu-nbd -t -k SOCK args...` in the foreground with
// the socket in dir, killed with the test binary (Pdeathsig), and stops it
// when the test ends. args holds the format, cache options and image.
func StartQemuNBD(t testing.TB, dir string, args ...string) *Server {
	t.Helper()
	sock := filepath.Join(dir, fmt.Sprintf("qemu-nbd-%d.sock", time.Now().UnixNano()))
	argv := append([]string{"-t", "-k", sock}, args...)
	return start(t, sock, "qemu-nbd", argv...)
}

func start(t testing.TB, sock, prog string, argv ...string) *Server {
	t.Helper()
	path, err := exec.LookPath(prog)
	if err != nil {
		t.Fatalf("%s is required for this test: %v", prog, err)
	}
	s := &Server{Socket: sock, URI: "nbd+unix:///?socket=" + sock, exited: make(chan struct{}), stderr: &strings.Builder{}}
	s.cmd = exec.Command(path, argv...)
	s.cmd.Stderr = &lockedWriter{b: s.stderr}
	// The server must die with the test binary even when it is killed.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", prog, err)
	}
	go func() {
		s.waitErr = s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(s.Stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-s.exited:
			t.Fatalf("%s %s exited before serving: %v: %s", prog, strings.Join(argv, " "), s.waitErr, s.Stderr())
		default:
		}
		// Its greeting, not an accepting socket: qemu-nbd binds it before
		// it has opened its image.
		if qemu.Greets("unix", sock) {
			return s
		}
		if time.Now().After(deadline) {
			s.Stop()
			t.Fatalf("%s did not serve %s within 10s: %s", prog, sock, s.Stderr())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type lockedWriter struct {
	mu sync.Mutex
	b  *strings.Builder
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// Stderr returns what the server wrote to its standard error so far.
func (s *Server) Stderr() string {
	w := s.cmd.Stderr.(*lockedWriter)
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// Pid returns the server's process id.
func (s *Server) Pid() int { return s.cmd.Process.Pid }

// Kill kills the server with SIGKILL, as a crash would, and waits for it.
// Unflushed data of a qemu-nbd is lost.
func (s *Server) Kill() {
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.exited
	_ = os.Remove(s.Socket)
}

// Stop ends the server (SIGTERM, then SIGKILL after 5s), waits for it and
// removes its socket. It is idempotent.
func (s *Server) Stop() {
	s.once.Do(func() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(5 * time.Second):
			_ = s.cmd.Process.Signal(syscall.SIGKILL)
			<-s.exited
		}
		// nbdkit leaves its socket behind.
		_ = os.Remove(s.Socket)
	})
}
