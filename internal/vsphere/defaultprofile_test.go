package vsphere

import (
	"errors"
	"testing"
)

// The default profile comes from the configuration only: the one named
// (which must exist), else the only one; never a built-in name.
func TestSessionsDefaultProfile(t *testing.T) {
	one := map[string]Profile{"vc": {}}
	two := map[string]Profile{"vc": {}, "lab": {}}
	for _, c := range []struct {
		name     string
		profiles map[string]Profile
		named    string
		want     string
		err      error
	}{
		{"the only one", one, "", "vc", nil},
		{"named", two, "vc", "vc", nil},
		{"named, the only one", one, "vc", "vc", nil},
		{"several, none named", two, "", "", ErrNoDefaultProfile},
		{"named, not configured", one, "lab", "", ErrProfileNotFound},
		{"none configured", map[string]Profile{}, "", "", ErrNoDefaultProfile},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := NewSessionsWithOptions(c.profiles, nil, SessionOptions{DefaultProfile: c.named})
			got, err := s.DefaultProfile()
			if got != c.want || !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
				t.Errorf("DefaultProfile() = %q, %v; want %q, %v", got, err, c.want, c.err)
			}
		})
	}
}
