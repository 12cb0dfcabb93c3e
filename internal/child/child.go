// Package child starts child processes that do not outlive this one.
//
// A child gets Pdeathsig SIGKILL. Linux sends that signal when the OS
// thread that forked the child exits, not only when the process does, and
// the Go runtime retires a thread when a goroutine that locked it ends
// (cgo and libnbd callers lock threads). So every child is forked from one
// goroutine that locks its thread and never ends: the death signal then
// means "this process died", and a qemu-nbd, nbdkit or qemu-img never
// outlives a worker killed with SIGKILL (it would hold an image's write
// lock, or keep writing a file nobody owns).
package child

import (
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

var (
	once sync.Once
	reqs chan req
)

type req struct {
	cmd  *exec.Cmd
	done chan error
}

// Start starts cmd like cmd.Start, with Pdeathsig SIGKILL set on it and
// forked from a thread that lives as long as the process.
func Start(cmd *exec.Cmd) error {
	once.Do(func() {
		reqs = make(chan req)
		go func() {
			runtime.LockOSThread() // never unlocked: this thread lives as long as the process
			for r := range reqs {
				r.done <- r.cmd.Start()
			}
		}()
	})
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	done := make(chan error, 1)
	reqs <- req{cmd: cmd, done: done}
	return <-done
}
