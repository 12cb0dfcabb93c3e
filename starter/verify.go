package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/spf13/cobra"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/units"
	"github.com/cbtflow/cbtflow/workflows"
)

func newVerifyCmd(e *env) *cobra.Command {
	var cfg config.Config
	var all, asJSON bool
	var profile *string
	cmd := &cobra.Command{
		Use:   "verify (BACKUP_ID | VM | --all)",
		Short: "verify restore points against the catalog and the block digests recorded at backup time",
		Long: `Verify a restore point (by its backup ID), the newest restore point of a VM
(by its name or instance UUID), or with --all the newest of every VM. The
worker (the Verify workflow) checks every image of the point's chain
(qemu-img check, size and SHA-256 against the catalog, the backing link,
the digest file) and re-reads the point's blocks through the chain,
comparing each with the digest recorded when it was written. A damaged
point names the first bad image and the offset.

Exit codes: 0 every point verified, 1 a point is damaged (or the
verification could not run), 2 bad usage, 4 interrupted (the verification
goes on in the worker).`,
		Args: func(cmd *cobra.Command, args []string) error {
			if all && len(args) != 0 || !all && len(args) != 1 {
				return usageError{errors.New("verify: give a backup ID or a VM, or --all")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			in := workflows.VerifyInput{All: all, Profile: *profile}
			if !all {
				in.BackupID, in.VM = args[0], args[0]
			}
			return verifyRun(cmd.Context(), e, &cfg, in, asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	profile = profileFlag(cmd.Flags())
	cmd.Flags().BoolVar(&all, "all", false, "verify the newest restore point of every VM")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as one JSON object")
	return cmd
}

func verifyRun(ctx context.Context, e *env, cfg *config.Config, in workflows.VerifyInput, asJSON bool) error {
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	// One argument names a backup ID or a VM: a backup ID has its own
	// shape (20261203T170115Z-4c1d2e3f4a5b); anything else is a VM.
	if !in.All {
		if looksLikeBackupID(in.BackupID) {
			in.VM = ""
		} else {
			in.BackupID = ""
		}
	}
	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: "verify/" + randomID(), TaskQueue: workflows.TaskQueue}, workflows.Verify, in)
	if err != nil {
		return fmt.Errorf("verify: start: %w", err)
	}
	var res workflows.VerifyResult
	err = run.Get(ctx, &res)
	if err != nil && ctx.Err() != nil {
		return exitError{code: exitDetached, err: fmt.Errorf("interrupted: the verification goes on in the worker (workflow %s)", run.GetID())}
	}
	if err != nil {
		return exitError{code: 1, err: fmt.Errorf("verify: %s", failureMessage(err))}
	}
	return printVerify(e, res, asJSON)
}

// printVerify prints a Verify's result (as JSON, or a line per disk and
// its problems) and says, by its exit code, whether every point is sound.
func printVerify(e *env, res workflows.VerifyResult, asJSON bool) error {
	if asJSON {
		if err := json.NewEncoder(e.stdout).Encode(res); err != nil {
			return err
		}
	} else {
		for _, p := range res.Points {
			if p.OK {
				extra := ""
				if len(p.Undigested) > 0 {
					extra = fmt.Sprintf("; images without digests (checked as files): %v", p.Undigested)
				}
				fmt.Fprintf(e.stdout, "restore point %s disk %d: verified (%s re-read in %d blocks%s)\n",
					p.BackupID, p.Key, units.Bytes(p.CheckedBytes), p.CheckedRecords, extra)
				continue
			}
			fmt.Fprintf(e.stdout, "restore point %s disk %d: DAMAGED\n", p.BackupID, p.Key)
			for _, pr := range p.Problems {
				where := ""
				if pr.Offset >= 0 {
					where = fmt.Sprintf(" at offset %d", pr.Offset)
				}
				fmt.Fprintf(e.stdout, "  %s%s: %s\n", pr.File, where, pr.Reason)
			}
		}
	}
	if !res.OK {
		return exitError{code: 1, err: errors.New("verify: a restore point is damaged"), quiet: asJSON}
	}
	return nil
}

// looksLikeBackupID reports whether s has the shape of a backup ID:
// a UTC timestamp, a dash and 12 hex digits.
func looksLikeBackupID(s string) bool {
	if len(s) != len("20261203T170115Z-4c1d2e3f4a5b") || s[8] != 'T' || s[15] != 'Z' || s[16] != '-' {
		return false
	}
	for i, r := range s {
		switch {
		case i == 8 || i == 15 || i == 16:
		case i < 16 && r >= '0' && r <= '9':
		case i > 16 && (r >= '0' && r <= '9' || r >= 'a' && r <= 'f'):
		default:
			return false
		}
	}
	return true
}
