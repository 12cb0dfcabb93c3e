package stack

import (
	"fmt"
	"time"

	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/converter"
)

// localActivityMarker is the name of the marker that records a local
// activity's end in a workflow history (the SDK's).
const localActivityMarker = "LocalActivity"

// LocalActivity is what a local activity's marker records of it (the
// SDK's marker data, the fields the tests and the bench read): a local
// activity has no events of its own, only this marker, written when the
// workflow task that ran it completes.
type LocalActivity struct {
	ActivityType string
	// Attempt is the attempt that ended it; Backoff, when positive, says
	// the workflow task ended before the next attempt (after that long).
	Attempt int32
	Backoff time.Duration
	// ReplayTime is when it ended.
	ReplayTime time.Time
}

// LocalActivityOf decodes ev when it is a local activity's marker; ok is
// false for any other event.
func LocalActivityOf(ev *historypb.HistoryEvent) (la LocalActivity, ok bool, err error) {
	a := ev.GetMarkerRecordedEventAttributes()
	if a == nil || a.GetMarkerName() != localActivityMarker {
		return la, false, nil
	}
	if err := converter.GetDefaultDataConverter().FromPayloads(a.GetDetails()["data"], &la); err != nil {
		return la, true, fmt.Errorf("history event %d: local activity marker: %w", ev.GetEventId(), err)
	}
	return la, true, nil
}
