package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/workflows"
)

// vmCheckTimeout bounds the wait for the look-up of a VM: the workflow
// gives up after workflows.LookupTimeout; longer means no worker took it.
const vmCheckTimeout = workflows.LookupTimeout + 30*time.Second

// checkVMExists makes sure vm names a VM before a schedule backs it up.
// The worker resolves it (the LookupVM workflow: ResolveVM, as a backup
// does, by name, inventory path or moref, under profile or the worker's
// default): the vCenter profiles and their passwords are the worker's,
// and the starter may run anywhere.
func checkVMExists(ctx context.Context, e *env, c client.Client, vm, profile string) error {
	lctx, cancel := context.WithTimeout(ctx, vmCheckTimeout)
	defer cancel()
	id := "lookup-vm/" + randomID()
	run, err := c.ExecuteWorkflow(lctx, client.StartWorkflowOptions{ID: id, TaskQueue: workflows.TaskQueue,
		WorkflowExecutionTimeout: vmCheckTimeout + time.Minute}, workflows.LookupVM, activities.ResolveVMInput{Profile: profile, VM: vm})
	if err != nil {
		return fmt.Errorf("cannot check VM %q: %w", vm, err)
	}
	var res activities.ResolveVMResult
	err = run.Get(lctx, &res)
	if lctx.Err() != nil {
		// Given up (or interrupted): the look-up must not linger.
		_ = c.TerminateWorkflow(context.WithoutCancel(ctx), id, run.GetRunID(), "the starter stopped waiting")
	}
	var app *temporal.ApplicationError
	switch {
	case err == nil:
		e.log.Info("VM found", "vm", vm, "name", res.VMName, "uuid", res.VMUUID, "profile", res.Profile)
		return nil
	case errors.As(err, &app) && app.Type() == activities.ErrTypeVMNotFound:
		return fmt.Errorf("VM %q not found%s: %s", vm, underProfile(profile), app.Message())
	case lctx.Err() != nil && ctx.Err() == nil:
		return fmt.Errorf("cannot check VM %q: no worker answered within %s (is one running on task queue %s?); give --no-check to create the schedule unchecked",
			vm, vmCheckTimeout, workflows.TaskQueue)
	default:
		return fmt.Errorf("cannot check VM %q: %s; give --no-check to create the schedule unchecked", vm, failureMessage(err))
	}
}

func underProfile(p string) string {
	if p == "" {
		return ""
	}
	return " under profile " + p
}
