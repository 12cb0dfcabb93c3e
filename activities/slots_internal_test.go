package activities

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// noBeat is a beat for acquires that are not expected to wait.
func noBeat() {}

// mustAcquireNow takes a slot that must be free: with a context that has
// already ended, acquire succeeds only on a free slot.
func mustAcquireNow(t *testing.T, s *TransferSlots) func() {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	release, err := s.acquire(ctx, time.Hour, noBeat)
	if err != nil {
		t.Fatalf("no free slot: %v", err)
	}
	return release
}

// TestTransferSlotsWait: a transfer beyond the bound waits, heartbeating;
// its context ending ends the wait at once without taking a slot; slots
// go to the waiters first come first served.
func TestTransferSlotsWait(t *testing.T) {
	s := NewTransferSlots(2)
	r1, r2 := mustAcquireNow(t, s), mustAcquireNow(t, s)

	// A waiter heartbeats, and leaves when its context ends.
	ctx, cancel := context.WithCancel(context.Background())
	var beats atomic.Int32
	done := make(chan error, 1)
	go func() {
		_, err := s.acquire(ctx, 5*time.Millisecond, func() { beats.Add(1) })
		done <- err
	}()
	deadline := time.Now().Add(time.Minute)
	for beats.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("acquire returned with both slots taken: %v", err)
	default:
	}
	if beats.Load() < 3 {
		t.Fatalf("a waiting acquire heartbeated %d times in a minute", beats.Load())
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("canceled waiter: %v, want context.Canceled", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("a canceled waiter still waits")
	}

	// First come first served.
	var mu sync.Mutex
	var order []int
	var wg sync.WaitGroup
	for i := range 3 {
		queued := make(chan struct{})
		wg.Go(func() {
			once := sync.OnceFunc(func() { close(queued) })
			release, err := s.acquire(context.Background(), time.Millisecond, once)
			once()
			if err != nil {
				t.Errorf("waiter %d: %v", i, err)
				return
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
			release()
		})
		<-queued // its first beat: it is in the queue
	}
	r1()
	wg.Wait()
	if len(order) != 3 || order[0] != 0 || order[1] != 1 || order[2] != 2 {
		t.Errorf("waiters got their slots in the order %v, want [0 1 2]", order)
	}
	r2()
	// Nothing leaked: both slots are free again, and only two.
	mustAcquireNow(t, s)
	mustAcquireNow(t, s)
	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	if _, err := s.acquire(ctx, time.Hour, noBeat); err == nil {
		t.Error("a third slot of two")
	}
}

// TestTransferSlotsBound: many transfers, some canceled while they wait
// (also as a slot is handed to them): never more than the bound hold a
// slot at once, and no slot is lost.
func TestTransferSlotsBound(t *testing.T) {
	const n = 3
	s := NewTransferSlots(n)
	var holding, peak atomic.Int32
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Go(func() {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if i%3 == 0 {
				time.AfterFunc(time.Duration(rand.IntN(2000))*time.Microsecond, cancel)
			}
			release, err := s.acquire(ctx, time.Millisecond, noBeat)
			if err != nil {
				return
			}
			h := holding.Add(1)
			for p := peak.Load(); h > p && !peak.CompareAndSwap(p, h); p = peak.Load() {
			}
			time.Sleep(time.Duration(rand.IntN(200)) * time.Microsecond)
			holding.Add(-1)
			release()
		})
	}
	wg.Wait()
	if p := peak.Load(); p > n || p < 2 {
		t.Errorf("%d transfers held a slot at once, want at most %d (and more than one)", p, n)
	}
	for range n {
		mustAcquireNow(t, s)
	}
}
