package workflows

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// The search attributes are registered by scripts that cannot import Go:
// their lists must be the one SearchAttributeNames holds, and that list
// the keys the workflows set.
func TestSearchAttributeNamesAgree(t *testing.T) {
	keys := []string{SearchVM.GetName(), SearchMode.GetName(), SearchVCenter.GetName(), SearchBackupID.GetName()}
	if !sameSet(keys, SearchAttributeNames) {
		t.Errorf("SearchAttributeNames %v, the keys set by the workflows %v", SearchAttributeNames, keys)
	}
	list := regexp.MustCompile(`for \w+ in ((?:Cbtflow\w+ ?)+);`)
	for _, file := range []string{"../scripts/dev", "../deploy/temporal/setup.sh"} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		m := list.FindAllSubmatch(b, -1)
		if len(m) != 1 {
			t.Errorf("%s: %d lists of Cbtflow search attributes, want 1", file, len(m))
			continue
		}
		if got := strings.Fields(string(m[0][1])); !sameSet(got, SearchAttributeNames) {
			t.Errorf("%s registers %v, the workflows use %v", file, got, SearchAttributeNames)
		}
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}
