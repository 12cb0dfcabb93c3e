package vsphere

import (
	"context"
	"io"
	"log/slog"
	"regexp"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/lab"
)

var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// Two profiles of one vCenter — another name, another spelling of its URL
// — see the same instance UUID: it is what keeps one VM from being backed
// up twice at once under two profiles.
func TestInstanceUUIDSameAcrossProfiles(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	alias := f.profile
	alias.Name = "alias"
	// localhost instead of 127.0.0.1: the thumbprint pins the server, not
	// the host name.
	alias.URL = strings.Replace(f.profile.URL, "127.0.0.1", "localhost", 1)
	if alias.URL == f.profile.URL {
		t.Fatalf("the lab's URL %s is not on 127.0.0.1", f.profile.URL)
	}
	s := NewSessions(map[string]Profile{"lab": f.profile, "alias": alias}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer func() {
		if err := s.Close(context.Background()); err != nil {
			t.Error(err)
		}
	}()
	uuids := map[string]string{}
	for _, name := range []string{"lab", "alias"} {
		c, err := s.Client(ctx, name)
		if err != nil {
			t.Fatalf("profile %s: %v", name, err)
		}
		uuids[name] = c.InstanceUUID()
	}
	if !uuidRE.MatchString(uuids["lab"]) {
		t.Fatalf("the lab's instance UUID is %q, want a UUID", uuids["lab"])
	}
	if uuids["alias"] != uuids["lab"] {
		t.Errorf("instance UUID through profile alias (%s) %q, through lab %q: want the same vCenter", alias.URL, uuids["alias"], uuids["lab"])
	}
	t.Logf("the lab's vCenter instance UUID: %s", uuids["lab"])
	// What vCenter itself answers, asked by an administrator's session.
	vc, _ := f.adminSession(t)
	if got := vc.ServiceContent.About.InstanceUuid; got != uuids["lab"] {
		t.Errorf("InstanceUUID() = %q, the lab's ServiceContent says %q", uuids["lab"], got)
	}
}
