package activities

import "context"

// TakeForTest takes a free slot of s, as a transfer does, for tests
// outside the package that need a transfer to wait; it returns its
// release. It panics when no slot is free.
func (s *TransferSlots) TakeForTest() (release func()) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // acquire succeeds on an ended context only with a free slot
	release, err := s.acquire(ctx, 0, func() {})
	if err != nil {
		panic("activities: TakeForTest: no free slot")
	}
	return release
}
