package catalog

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Every exported method of Catalog is called by cbtflow's own code outside
// this package (tests do not count). A method nothing calls is dead code
// whose comment still promises what it was for, as SetSnapshot did ("so a
// sweeper can find" a dead backup's snapshot: the sweeper finds it on
// vCenter by name and never asked the catalog). The check is by method
// name, so a same-named method elsewhere can hide an unused one; it cannot
// flag a used one.
func TestEveryExportedMethodIsUsed(t *testing.T) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root not found from the catalog package: %v", err)
	}
	self, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}

	fset := token.NewFileSet()
	methods := map[string]bool{} // exported methods of Catalog
	called := map[string]bool{}  // selector names used outside this package
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		if filepath.Dir(path) == self {
			for _, decl := range f.Decls {
				if fn, ok := decl.(*ast.FuncDecl); ok && fn.Recv != nil && fn.Name.IsExported() && receiverIs(fn, "Catalog") {
					methods[fn.Name.Name] = true
				}
			}
			return nil
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if sel, ok := n.(*ast.SelectorExpr); ok {
				called[sel.Sel.Name] = true
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(methods) == 0 {
		t.Fatal("found no exported method of Catalog: the test no longer reads the package")
	}
	for _, m := range slices.Sorted(maps.Keys(methods)) {
		if !called[m] {
			t.Errorf("Catalog.%s is called by no code outside internal/catalog: remove it, or use it", m)
		}
	}
}

// receiverIs reports whether fn is a method of T or *T.
func receiverIs(fn *ast.FuncDecl, typ string) bool {
	r := fn.Recv.List[0].Type
	if star, ok := r.(*ast.StarExpr); ok {
		r = star.X
	}
	id, ok := r.(*ast.Ident)
	return ok && id.Name == typ
}
