package activities

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestPauseDir(t *testing.T) {
	dir := t.TempDir()
	p := PauseDir(dir)
	// No gate: no pause.
	done := make(chan struct{})
	go func() { p.Pause(context.Background(), PauseBeforeCommit); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("paused without a gate file")
	}

	gate := filepath.Join(dir, PauseMidTransfer)
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	done = make(chan struct{})
	go func() { p.Pause(context.Background(), PauseMidTransfer); close(done) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(gate + ".reached"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pause point was not reported as reached")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-done:
		t.Fatal("did not wait while the gate file exists")
	case <-time.After(100 * time.Millisecond):
	}
	os.Remove(gate)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("still paused after the gate file was removed")
	}

	// A canceled context ends the pause too.
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done = make(chan struct{})
	go func() { p.Pause(ctx, PauseMidTransfer); close(done) }()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a canceled pause did not return")
	}
}
