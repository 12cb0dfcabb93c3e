package activities_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// ResolveVM and PrepareVM heartbeat while a vCenter call takes long (here
// the connect to a vCenter that takes the connection and never answers,
// bounded by vsphere.DefaultConnectTimeout, longer than the 10 s between
// heartbeats), so that the heartbeat timeout the workflow gives them
// tells a slow vCenter from a dead worker. They then fail with
// VCenterUnreachable.
func TestFirstContactActivitiesHeartbeat(t *testing.T) {
	done := make(chan struct{})
	srv := httptest.NewTLSServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-done }))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(done) })
	pw := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pw, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Sessions of their own each: one session's connect would make the
	// other wait for it.
	newVS := func() *activities.VSphere {
		sessions := vsphere.NewSessions(map[string]vsphere.Profile{"silent": {URL: srv.URL + "/sdk", User: "u", PasswordFile: pw, Insecure: true}}, nil)
		t.Cleanup(func() { _ = sessions.Close(context.Background()) })
		return &activities.VSphere{Sessions: sessions}
	}
	resolve, prepare := newVS(), newVS()

	for _, c := range []struct {
		name string
		vs   *activities.VSphere
		fn   any
		in   any
	}{
		{"ResolveVM", resolve, resolve.ResolveVM, activities.ResolveVMInput{Profile: "silent", VM: "DC0_H0_VM0"}},
		{"PrepareVM", prepare, prepare.PrepareVM, activities.PrepareVMInput{Profile: "silent", VMUUID: "4211e0b2-6c1a-7d3e-9f00-0123456789ab"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var s testsuite.WorkflowTestSuite
			env := s.NewTestWorkflowEnvironment()
			env.SetTestTimeout(time.Minute) // the connect takes its real time
			env.RegisterActivity(c.vs)
			var mu sync.Mutex
			beats := 0
			env.SetOnActivityHeartbeatListener(func(info *activity.Info, _ converter.EncodedValues) {
				mu.Lock()
				defer mu.Unlock()
				if info.ActivityType.Name == c.name {
					beats++
				}
			})
			once := func(ctx workflow.Context) error {
				ctx = workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
					StartToCloseTimeout: time.Minute, HeartbeatTimeout: time.Minute,
					RetryPolicy: &temporal.RetryPolicy{MaximumAttempts: 1}})
				return workflow.ExecuteActivity(ctx, c.fn, c.in).Get(ctx, nil)
			}
			env.RegisterWorkflow(once)
			env.ExecuteWorkflow(once)
			var app *temporal.ApplicationError
			if err := env.GetWorkflowError(); !errors.As(err, &app) || app.Type() != activities.ErrTypeUnreachable {
				t.Errorf("%s = %v, want %s", c.name, err, activities.ErrTypeUnreachable)
			}
			mu.Lock()
			defer mu.Unlock()
			if beats == 0 {
				t.Errorf("%s did not heartbeat during a %v connect", c.name, vsphere.DefaultConnectTimeout)
			}
		})
	}
}
