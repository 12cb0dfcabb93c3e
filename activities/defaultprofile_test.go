package activities_test

import (
	"context"
	"testing"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
)

// A backup that names no profile ({"vm": ...} from the Web UI) gets the
// worker's default, which ResolveVM picks and returns, so the workflow
// uses it from then on: the only profile of the worker's profiles file
// (here "prod", not "lab": no name is built in).
func TestResolveVMDefaultProfileOnlyOne(t *testing.T) {
	f := newFixture(t, lab.Options{})
	prod := f.profile
	prod.Name = "prod"
	sessions := vsphere.NewSessions(map[string]vsphere.Profile{prod.Name: prod}, f.log)
	t.Cleanup(func() { _ = sessions.Close(context.Background()) })
	vs := &activities.VSphere{Sessions: sessions, Repo: f.repo}
	r, err := execute[activities.ResolveVMResult](t, newActivityEnv(t, f.log, vs), vs.ResolveVM,
		activities.ResolveVMInput{VM: lab.SecondDiskVM})
	if err != nil {
		t.Fatalf("ResolveVM without a profile, one configured: %v", err)
	}
	if r.Profile != "prod" || r.VMName != lab.SecondDiskVM || r.VMUUID == "" {
		t.Errorf("ResolveVM = %+v, want %s under profile prod", r, lab.SecondDiskVM)
	}
}

// With several profiles, the default is the one the worker's
// configuration names (CBTFLOW_PROFILE); without one named, a backup that
// names no profile fails at once, saying which profiles there are and how
// to choose, rather than picking one nobody chose.
func TestResolveVMDefaultProfileOfSeveral(t *testing.T) {
	f := newFixture(t, lab.Options{})
	prod, other := f.profile, f.profile
	prod.Name, other.Name = "prod", "other"
	profiles := map[string]vsphere.Profile{prod.Name: prod, other.Name: other}
	resolve := func(opts vsphere.SessionOptions) (*activities.ResolveVMResult, error) {
		sessions := vsphere.NewSessionsWithOptions(profiles, f.log, opts)
		t.Cleanup(func() { _ = sessions.Close(context.Background()) })
		vs := &activities.VSphere{Sessions: sessions, Repo: f.repo}
		return execute[activities.ResolveVMResult](t, newActivityEnv(t, f.log, vs), vs.ResolveVM,
			activities.ResolveVMInput{VM: lab.SecondDiskVM})
	}

	r, err := resolve(vsphere.SessionOptions{DefaultProfile: "prod"})
	if err != nil || r.Profile != "prod" || r.VMName != lab.SecondDiskVM {
		t.Errorf("ResolveVM with default prod = %+v, %v; want %s under prod", r, err, lab.SecondDiskVM)
	}
	_, err = resolve(vsphere.SessionOptions{})
	wantAppError(t, err, activities.ErrTypeProfileNotFound, "other, prod", "CBTFLOW_PROFILE")
	_, err = resolve(vsphere.SessionOptions{DefaultProfile: "lab"})
	wantAppError(t, err, activities.ErrTypeProfileNotFound, `"lab"`, "other, prod", "CBTFLOW_PROFILE")
}
