package stacktest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	commonpb "go.temporal.io/api/common/v1"
	historypb "go.temporal.io/api/history/v1"
)

// TestSameContent checks the sparse-aware comparison the end-to-end,
// bad-input, edge-case and chaos tests rely on: a difference in data, in a
// hole of one file only, or in size is found; equal content with
// different allocation is equal.
func TestSameContent(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string, size int64, writes map[int64][]byte) string {
		p := filepath.Join(dir, name)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		for off, b := range writes {
			if _, err := f.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
		}
		return p
	}
	const size = 1 << 30
	data := Pattern(1, 1<<20)
	base := mk("base", size, map[int64][]byte{0: data, 512 << 20: data})
	for _, c := range []struct {
		name   string
		writes map[int64][]byte
		size   int64
		diff   string
	}{
		{"same", map[int64][]byte{0: data, 512 << 20: data}, size, ""},
		{"explicit zeros where base has a hole", map[int64][]byte{0: data, 512 << 20: data, 100 << 20: make([]byte, 1<<20)}, size, ""},
		{"data where base has a hole", map[int64][]byte{0: data, 512 << 20: data, size - 1: {1}}, size, "at byte 1073741823"},
		{"hole where base has data", map[int64][]byte{0: data}, size, "at byte 536870912"},
		{"one byte changed", map[int64][]byte{0: data, 512 << 20: append(append([]byte{}, data[:7]...), append([]byte{data[7] ^ 1}, data[8:]...)...)}, size, "at byte 536870919"},
		{"size", map[int64][]byte{0: data, 512 << 20: data}, size + 512, "sizes differ"},
	} {
		other := mk(strings.ReplaceAll(c.name, " ", "-"), c.size, c.writes)
		diff, err := SameContent(base, other)
		if err != nil {
			t.Fatal(err)
		}
		if (c.diff == "") != (diff == "") || !strings.Contains(diff, c.diff) {
			t.Errorf("%s: got %q, want %q", c.name, diff, c.diff)
		}
	}
}

// TestProtoContains checks the secret scan of recorded histories: a
// secret inside a payload's bytes is found.
func TestProtoContains(t *testing.T) {
	ev := &historypb.HistoryEvent{EventId: 1, Attributes: &historypb.HistoryEvent_WorkflowExecutionStartedEventAttributes{
		WorkflowExecutionStartedEventAttributes: &historypb.WorkflowExecutionStartedEventAttributes{
			Input: &commonpb.Payloads{Payloads: []*commonpb.Payload{{Data: []byte(`{"vm":"x","pw":"s3cret"}`)}}},
		}}}
	if !ProtoContains(ev.ProtoReflect(), []byte("s3cret")) {
		t.Error("a secret in a payload was not found")
	}
	if ProtoContains(ev.ProtoReflect(), []byte("other")) {
		t.Error("found a secret that is not there")
	}
}
