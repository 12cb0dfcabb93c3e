package stack

import (
	"errors"
	"fmt"
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

// proc is a long-running child process whose output goes to a log file.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
	err  error // set when done is closed
}

// startProc starts bin with args and env, appending its stdout and stderr
// to logPath.
func startProc(name, bin string, args, env []string, logPath string) (*proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("stack: %s log: %w", name, err)
	}
	fmt.Fprintf(logf, "=== %s: starting %s at %s\n", name, filepath.Base(bin), time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := child.Start(cmd); err != nil {
		logf.Close()
		return nil, fmt.Errorf("stack: start %s (%s): %w", name, bin, err)
	}
	p := &proc{name: name, cmd: cmd, log: logf, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		fmt.Fprintf(logf, "=== %s: exited (%v) at %s\n", name, p.err, time.Now().Format(time.RFC3339Nano))
		logf.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends sig, waits up to grace for the exit, then kills. It returns
// an error only when the process could not be made to exit.
func (p *proc) stop(sig syscall.Signal, grace time.Duration) error {
	if p.exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("stack: %s (pid %d) does not exit after SIGKILL", p.name, p.pid())
	}
}

// handedOut holds the ports freePort returned in this process: the kernel
// may give a port that was just closed to the next bind of port 0, so a
// stack once got the same port for Temporal and the worker's metrics.
var handedOut = struct {
	sync.Mutex
	ports map[int]bool
	next  []int // a test's ports for the next calls (export_test.go)
}{ports: map[int]bool{}}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago and
// that no earlier call in this process returned.
func freePort() (int, error) {
	handedOut.Lock()
	defer handedOut.Unlock()
	if len(handedOut.next) > 0 {
		p := handedOut.next[0]
		handedOut.next = handedOut.next[1:]
		return p, nil
	}
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("stack: free port: %w", err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if !handedOut.ports[port] {
			handedOut.ports[port] = true
			return port, nil
		}
	}
	return 0, fmt.Errorf("stack: free port: 100 ports in a row were handed out before")
}

func portAnswers(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// Proc is a process found in /proc.
type Proc struct {
	Pid int
	Cmd string // argv joined by spaces
}

// ProcsMentioning lists the live processes (zombies excluded) whose command
// line contains any of the given strings, such as a stack's folders: the
// worker's qemu-nbd and nbdkit name sockets and images below them. The
// calling process is never listed.
func ProcsMentioning(needles ...string) []Proc {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var out []Proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue
		}
		cmd := strings.TrimSpace(strings.ReplaceAll(string(raw), "\x00", " "))
		hit := false
		for _, n := range needles {
			if n != "" && strings.Contains(cmd, n) {
				hit = true
			}
		}
		if !hit || zombie(pid) {
			continue
		}
		out = append(out, Proc{Pid: pid, Cmd: cmd})
	}
	return out
}

func zombie(pid int) bool {
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return true
	}
	f := StatFields(string(stat))
	return len(f) > 0 && (f[0] == "Z" || f[0] == "X")
}

// StatFields returns the fields of a /proc/<pid>/stat text from the third
// on (the state first), past the command in parentheses, which may hold
// spaces and parentheses itself; nil for a text without one.
func StatFields(stat string) []string {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(stat[i+1:])
}

// Descendants lists the live descendants of pid.
func Descendants(pid int) []Proc {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]int{}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		f := StatFields(string(stat))
		if len(f) < 2 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		pp, _ := strconv.Atoi(f[1])
		children[pp] = append(children[pp], p)
	}
	var out []Proc
	queue := []int{pid}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		for _, c := range children[cur] {
			raw, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(c), "cmdline"))
			out = append(out, Proc{Pid: c, Cmd: strings.TrimSpace(strings.ReplaceAll(string(raw), "\x00", " "))})
			queue = append(queue, c)
		}
	}
	return out
}

// WaitGone waits until no process mentions any of needles, and returns
// those left after timeout. A child killed with its parent (Pdeathsig)
// dies soon after the parent, not at once: a check right after a kill
// waits for it.
func WaitGone(timeout time.Duration, needles ...string) []Proc {
	deadline := time.Now().Add(timeout)
	for {
		left := ProcsMentioning(needles...)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func describe(ps []Proc) string {
	parts := make([]string, 0, len(ps))
	for _, p := range ps {
		parts = append(parts, fmt.Sprintf("pid %d: %s", p.Pid, p.Cmd))
	}
	return strings.Join(parts, "; ")
}

var errNotRunning = errors.New("not running")
