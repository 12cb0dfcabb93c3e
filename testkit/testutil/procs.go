// Package testutil holds helpers shared by cbtflow's tests: checks that a
// test leaves no child process and no socket behind. It is imported only
// from _test.go files.
package testutil

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Proc is a process seen in /proc.
type Proc struct {
	Pid  int
	PPid int
	Cmd  string // argv joined by spaces
}

// Children lists the live (non-zombie) descendants of pid.
func Children(pid int) []Proc {
	all := listProcs()
	byParent := map[int][]Proc{}
	for _, p := range all {
		byParent[p.PPid] = append(byParent[p.PPid], p)
	}
	var out []Proc
	queue := []int{pid}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		for _, c := range byParent[cur] {
			out = append(out, c)
			queue = append(queue, c.Pid)
		}
	}
	return out
}

func listProcs() []Proc {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []Proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the command name, which is in parentheses and may hold spaces.
		s := string(stat)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(s[i+1:])
		if len(fields) < 2 || fields[0] == "Z" || fields[0] == "X" {
			continue
		}
		ppid, _ := strconv.Atoi(fields[1])
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		cmd := strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " "))
		out = append(out, Proc{Pid: pid, PPid: ppid, Cmd: cmd})
	}
	return out
}

// CheckNoChildren registers a cleanup that fails the test when any process
// started by this test binary is still alive when the test ends. Call it
// first in a test, so it runs after the test's other cleanups. Processes
// that are still exiting get a few seconds.
func CheckNoChildren(t testing.TB) {
	t.Helper()
	before := map[int]bool{}
	for _, p := range Children(os.Getpid()) {
		before[p.Pid] = true
	}
	t.Cleanup(func() {
		var left []Proc
		deadline := time.Now().Add(10 * time.Second)
		for {
			left = left[:0]
			for _, p := range Children(os.Getpid()) {
				if !before[p.Pid] {
					left = append(left, p)
				}
			}
			if len(left) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		for _, p := range left {
			t.Errorf("process left behind: pid %d: %s", p.Pid, p.Cmd)
		}
	})
}

// CheckNoSockets registers a cleanup that fails the test when any unix
// socket remains below dir.
func CheckNoSockets(t testing.TB, dir string) {
	t.Helper()
	t.Cleanup(func() {
		for _, s := range Sockets(dir) {
			t.Errorf("socket left behind: %s", s)
		}
	})
}

// Sockets lists the unix sockets below dir.
func Sockets(dir string) []string {
	var out []string
	_ = filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.Type()&os.ModeSocket != 0 {
			out = append(out, path)
		}
		return nil
	})
	return out
}

// Describe formats processes for an error message.
func Describe(ps []Proc) string {
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintf(&b, "%d %s\n", p.Pid, p.Cmd)
	}
	return b.String()
}
