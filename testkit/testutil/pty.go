package testutil

import (
	"bytes"
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// PTY is a pseudo-terminal for a child's stdout: Slave goes to the child
// (close the parent's copy once it started: CloseSlave), Output is what
// the child wrote, read from the master side.
type PTY struct {
	master, Slave *os.File
	mu            sync.Mutex
	out           bytes.Buffer
	done          chan struct{}
}

// OpenPTY opens a pseudo-terminal of rows × cols and starts reading its
// output.
func OpenPTY(rows, cols uint16) (*PTY, error) {
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	fd := int(m.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		return nil, fmt.Errorf("unlock the pty: %w", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("pty number: %w", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("open the pty's slave: %w", err)
	}
	if err := unix.IoctlSetWinsize(int(s.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols}); err != nil {
		m.Close()
		s.Close()
		return nil, fmt.Errorf("pty size: %w", err)
	}
	p := &PTY{master: m, Slave: s, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		buf := make([]byte, 32<<10)
		for {
			k, err := m.Read(buf)
			p.mu.Lock()
			p.out.Write(buf[:k])
			p.mu.Unlock()
			if err != nil { // EIO once every slave is closed
				return
			}
		}
	}()
	return p, nil
}

// CloseSlave closes the parent's copy of the slave, once the child has
// its own.
func (p *PTY) CloseSlave() { _ = p.Slave.Close() }

// Output is what was written to the terminal so far.
func (p *PTY) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// Drain waits until every copy of the slave is closed (the children
// exited) and all their output is read.
func (p *PTY) Drain() {
	p.CloseSlave()
	<-p.done
}

// Close closes both sides; the reader stops.
func (p *PTY) Close() {
	p.CloseSlave()
	_ = p.master.Close()
	<-p.done
}
