package stack_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/testkit/stack"
)

// Every Temporal server cbtflow starts runs with the same dynamic
// configuration: the stack's (Go tests, make bench), make dev's and the
// demo's (scripts/dev), and docker compose's (deploy/temporal).
func TestDynamicConfigEverywhere(t *testing.T) {
	root := filepath.Join("..", "..")
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(root, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	dev, file, compose := read("scripts/dev"), read("deploy/temporal/dynamicconfig.yaml"), read("docker-compose.yml")
	if len(stack.TemporalDynamicConfig) == 0 {
		t.Fatal("no dynamic configuration")
	}
	args := strings.Join(stack.TemporalDynamicConfigArgs(), " ")
	for k, v := range stack.TemporalDynamicConfig {
		if !strings.Contains(args, "--dynamic-config-value "+k+"="+v) {
			t.Errorf("the stack's arguments %q lack %s=%s", args, k, v)
		}
		if !strings.Contains(dev, "--dynamic-config-value "+k+"="+v) {
			t.Errorf("scripts/dev starts the dev server without --dynamic-config-value %s=%s", k, v)
		}
		if !strings.Contains(file, "\n"+k+":\n  - value: "+v+"\n") {
			t.Errorf("deploy/temporal/dynamicconfig.yaml does not set %s to %s", k, v)
		}
	}
	if !strings.Contains(compose, "./deploy/temporal/dynamicconfig.yaml:/etc/temporal/config/dynamicconfig/cbtflow.yaml:ro") ||
		!strings.Contains(compose, "DYNAMIC_CONFIG_FILE_PATH: /etc/temporal/config/dynamicconfig/cbtflow.yaml") {
		t.Error("docker-compose.yml does not give the temporal service deploy/temporal/dynamicconfig.yaml")
	}
}
