package main

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/workflows"
)

// deps are what the activities need, built by run from the configuration.
type deps struct {
	sessions  *vsphere.Sessions
	repo      *repository.Repository
	catalog   *catalog.Catalog
	namespace string
	// activityContext is what every activity's context derives from
	// (nil: context.Background); fault tests put their faultpoint.Holder
	// in it.
	activityContext context.Context
	// metrics receives what the activities measure of backups, and
	// every failed activity attempt (nil: none).
	metrics activities.Metrics
	// log is the worker's (nil: slog's default).
	log *slog.Logger
}

// transferHeartbeatQuiet is how long a transfer's first attempt runs
// before its first heartbeat (activities.Transfer.HeartbeatQuiet): most
// incrementals end within it and send none. Of 20 VMs' incrementals at
// once (bench, scale case), those heartbeats were about one request in
// nine the worker made of Temporal, each a write of the workflow's state
// there. A cancel reaches a transfer that much later, or, while it waits
// for a slot, at its next wait beat (within 4 s).
const transferHeartbeatQuiet = 2 * time.Second

// newWorker returns the worker of cbtflow's task queue with every workflow
// and activity registered; tests build theirs here too, so what they
// check is what the worker runs.
func newWorker(c client.Client, d deps, maxTransfers int) worker.Worker {
	// Temporal bounds only all of a worker's activities together, so the
	// transfers are bounded by their own slots, and the worker's limit
	// stays the SDK's default (1000): a transfer waiting for a slot holds
	// an activity slot, and snapshot, catalog and cleanup steps must still
	// find one. Each backup transfers at most two disks at a time. A
	// backup's short steps run as local activities (the SDK's default
	// limits: 1000 at once), and its snapshot and transfers are asked for
	// eagerly (the SDK's default: DisableEagerActivities unset, and no
	// TaskQueueActivitiesPerSecond, which would turn eager activities off),
	// which the Temporal servers cbtflow starts grant (see
	// testkit/stack.TemporalDynamicConfig).
	//
	// Workflow tasks are fetched by a fixed number of pollers
	// (workflowTaskPollers); activity tasks, which mostly come eagerly in
	// the answer to a workflow task anyway, by pollers that scale with the
	// task queue's load (pollerBehavior).
	opts := worker.Options{
		WorkflowTaskPollerBehavior: worker.NewPollerBehaviorSimpleMaximum(worker.PollerBehaviorSimpleMaximumOptions{MaximumNumberOfPollers: workflowTaskPollers}),
		ActivityTaskPollerBehavior: pollerBehavior(),
		BackgroundActivityContext:  d.activityContext,
		// A running transfer's progress is its latest heartbeat, which the
		// server keeps (liveProgress): sent every second, the progress
		// query and the starter's bars stay current. (The SDK's default
		// sends one at most every 0.8 × HeartbeatTimeout.)
		MaxHeartbeatThrottleInterval: time.Second,
		Interceptors:                 []interceptor.WorkerInterceptor{newLiveProgress(c, cmp.Or(d.log, slog.Default()))},
	}
	if d.metrics != nil {
		opts.Interceptors = append(opts.Interceptors, activities.FailureInterceptor(d.metrics))
	}
	w := worker.New(c, workflows.TaskQueue, opts)
	workflows.Register(w)
	w.RegisterActivity(&activities.VSphere{Sessions: d.sessions, Repo: d.repo, Metrics: d.metrics})
	w.RegisterActivity(&activities.Transfer{Sessions: d.sessions, Repo: d.repo, Digests: true,
		Slots: activities.NewTransferSlots(maxTransfers), Metrics: d.metrics, HeartbeatQuiet: transferHeartbeatQuiet})
	w.RegisterActivity(&activities.Catalog{Catalog: d.catalog, Repo: d.repo, Metrics: d.metrics})
	w.RegisterActivity(&activities.Launcher{Service: c.WorkflowService(), Namespace: d.namespace, Identity: launcherIdentity()})
	w.RegisterActivity(&activities.Pruner{Catalog: d.catalog, Repo: d.repo})
	w.RegisterActivity(&activities.Restorer{Catalog: d.catalog, Repo: d.repo})
	w.RegisterActivity(&activities.VMRestorer{Sessions: d.sessions, Catalog: d.catalog, Repo: d.repo})
	w.RegisterActivity(&activities.Sweeper{Sessions: d.sessions, Catalog: d.catalog, Repo: d.repo, Workflows: c, Namespace: d.namespace})
	return w
}

// launcherIdentity names the worker in the histories of the workflows it
// starts (activities.Launcher), as the SDK names a client: PID@host.
func launcherIdentity() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%d@%s", os.Getpid(), host)
}

// workflowTaskPollers is how many long polls for workflow tasks the
// worker holds open, split by the SDK between its sticky queue and the
// task queue: enough that the workflow tasks of 20 backups started at once
// find a poller waiting and are handed over at once. Scaled by the SDK's
// autoscaler (1 to 100, 5 at first), the pollers fell to 1 while the
// worker was idle, and of 20 backups started then one waited 2.2–2.6 s in
// the queue for a workflow task, in 3 of 6 runs of the bench's scale case;
// with 16 fixed, none waited more than 0.43 s, and each backup's tasks
// waited 0.20–0.26 s in the queue, summed, against 0.30–0.54 s.
const workflowTaskPollers = 16

// pollerBehavior is how a worker's pollers of one kind of task scale:
// between 1 and 100 (the SDK's bounds), starting with 5, up while polls
// return tasks and the server asks for more, down while they come back
// empty. Each poller is one long poll held open on the server.
func pollerBehavior() worker.PollerBehavior {
	return worker.NewPollerBehaviorAutoscaling(worker.PollerBehaviorAutoscalingOptions{
		InitialNumberOfPollers: 5,
		MinimumNumberOfPollers: 1,
		MaximumNumberOfPollers: 100,
	})
}
