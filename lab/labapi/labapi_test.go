package labapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestCheckFilters: fault filters with their own parameters pass; another
// filter, a parameter of another filter or one that is not KEY=VALUE
// without spaces is refused, named.
func TestCheckFilters(t *testing.T) {
	good := []Filter{
		{Filter: "error", Params: []string{"error=EIO", "error-pread-rate=5%", "error-file=/tmp/eio-on"}},
		{Filter: "delay", Params: []string{"delay-read=10ms"}},
		{Filter: "error"},
	}
	if err := CheckFilters(good); err != nil {
		t.Errorf("CheckFilters(%+v) = %v", good, err)
	}
	if err := CheckFilters(nil); err != nil {
		t.Errorf("CheckFilters(nil) = %v", err)
	}
	for _, tc := range []struct {
		name string
		f    Filter
		want string
	}{
		{"other filter", Filter{Filter: "log", Params: []string{"logfile=/etc/passwd"}}, `"log" is not one of`},
		{"foreign param", Filter{Filter: "error", Params: []string{"delay-read=1s"}}, `"delay-read=1s"`},
		{"prefix only", Filter{Filter: "error", Params: []string{"errors=EIO"}}, `"errors=EIO"`},
		{"not key=value", Filter{Filter: "error", Params: []string{"error"}}, `"error"`},
		{"empty value", Filter{Filter: "error", Params: []string{"error-rate="}}, `"error-rate="`},
		{"space", Filter{Filter: "error", Params: []string{"error-file=/tmp/eio on"}}, `"error-file=/tmp/eio on"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := CheckFilters([]Filter{tc.f}); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error naming %s", err, tc.want)
			}
		})
	}
}

// TestErrorsRoundTrip: what the lab answers a sentinel with, the client
// turns back into the same sentinel, message kept; an unknown code is an
// error that matches none.
func TestErrorsRoundTrip(t *testing.T) {
	all := []error{ErrUnknownVM, ErrUnknownDisk, ErrUnknownSnapshot, ErrOutOfRange, ErrImage,
		ErrHasSnapshots, ErrBadCapacity, ErrBadName, ErrVMExists}
	var answer error
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		code, status := Classify(answer)
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(ErrorBody{Error: answer.Error(), Code: code})
	}))
	defer srv.Close()
	c := &Client{BaseURL: srv.URL}
	defer c.CloseIdleConnections()
	for _, sent := range all {
		answer = fmt.Errorf("lab: %w %q", sent, "x")
		_, err := c.SnapshotImage(context.Background(), "snapshot-1", 204)
		if !errors.Is(err, sent) || err.Error() != answer.Error() {
			t.Errorf("sent %v: got %v", answer, err)
		}
		for _, other := range all {
			if other != sent && errors.Is(err, other) {
				t.Errorf("sent %v: got %v, which also matches %v", answer, err, other)
			}
		}
	}
	answer = errors.New("disk full")
	if code, status := Classify(answer); code != CodeInternal || status != http.StatusInternalServerError {
		t.Errorf("Classify(plain error) = %s, %d", code, status)
	}
	_, err := c.SnapshotImage(context.Background(), "snapshot-1", 204)
	if err == nil || err.Error() != "disk full" {
		t.Errorf("internal error: got %v", err)
	}
	for _, s := range all {
		if errors.Is(err, s) {
			t.Errorf("internal error %v matches %v", err, s)
		}
	}
}
