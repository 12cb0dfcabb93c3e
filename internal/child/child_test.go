package child

import (
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// TestChildSurvivesItsCallersThread: a child started from a goroutine that
// locked its thread and then ended (its thread retired) is still running:
// the death signal follows the spawner's thread, not the caller's.
func TestChildSurvivesItsCallersThread(t *testing.T) {
	started := make(chan *exec.Cmd, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		cmd := exec.Command("sleep", "30")
		if err := Start(cmd); err != nil {
			t.Error(err)
			close(started)
			return
		}
		started <- cmd
	}()
	cmd, ok := <-started
	if !ok {
		return
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	if cmd.SysProcAttr == nil || cmd.SysProcAttr.Pdeathsig != syscall.SIGKILL {
		t.Fatalf("SysProcAttr = %+v, want Pdeathsig SIGKILL", cmd.SysProcAttr)
	}
	// Give a retired thread's death signal time to arrive, then look.
	time.Sleep(300 * time.Millisecond)
	if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("the child died with its caller's thread: %v", err)
	}
	var ws syscall.WaitStatus
	if pid, err := syscall.Wait4(cmd.Process.Pid, &ws, syscall.WNOHANG, nil); err != nil || pid != 0 {
		t.Fatalf("the child ended (pid %d, %v, status %v)", pid, err, ws)
	}
}
