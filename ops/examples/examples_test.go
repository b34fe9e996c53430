// Package examples holds the shipped example configurations; this test keeps
// them, docs/CONFIG.md and node.Config in step.
package examples

import (
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/vblade-ha/vblade-ha/node"
)

func TestNodeExampleIsValid(t *testing.T) {
	cfg, err := node.LoadConfig("node.toml")
	if err != nil {
		t.Fatal(err)
	}
	cfg.ApplyClusterDefaults()
	if err := cfg.ValidateCluster(); err != nil {
		t.Fatalf("node.toml: %v", err)
	}
	if len(cfg.Exports) == 0 {
		t.Fatal("node.toml has no exports")
	}
}

func TestServeExampleIsValid(t *testing.T) {
	cfg, err := node.LoadConfig("serve.toml")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Exports) == 0 {
		t.Fatal("serve.toml has no exports")
	}
}

// tomlKeys lists the toml tags of a struct type.
func tomlKeys(typ reflect.Type) []string {
	var keys []string
	for i := 0; i < typ.NumField(); i++ {
		tag := typ.Field(i).Tag.Get("toml")
		name, _, _ := strings.Cut(tag, ",")
		if name != "" && name != "-" {
			keys = append(keys, name)
		}
	}
	return keys
}

// TestEveryKeyDocumented fails when a key is added to node.Config or
// node.Export without a row in docs/CONFIG.md and a line in the example, or
// when the documentation names a key that does not exist.
func TestEveryKeyDocumented(t *testing.T) {
	doc, err := os.ReadFile("../../docs/CONFIG.md")
	if err != nil {
		t.Fatal(err)
	}
	example, err := os.ReadFile("node.toml")
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, typ := range []reflect.Type{reflect.TypeOf(node.Config{}), reflect.TypeOf(node.Export{})} {
		for _, k := range tomlKeys(typ) {
			known[k] = true
			if k == "export" {
				if !strings.Contains(string(doc), "[[export]]") || !strings.Contains(string(example), "[[export]]") {
					t.Error("[[export]] tables not documented or not in the example")
				}
				continue
			}
			if !strings.Contains(string(doc), "| `"+k+"` |") {
				t.Errorf("docs/CONFIG.md has no table row for %q", k)
			}
			if !regexp.MustCompile(`(?m)^#?` + regexp.QuoteMeta(k) + ` = `).Match(example) {
				t.Errorf("ops/examples/node.toml does not show %q", k)
			}
		}
	}
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z_]+)` \\|").FindAllSubmatch(doc, -1) {
		if !known[string(m[1])] {
			t.Errorf("docs/CONFIG.md documents %q, which node.Config does not have", m[1])
		}
	}
}

// TestNodeExampleDefaultsValid uncomments every commented-out key of the
// example: the values it shows as defaults must be accepted too.
func TestNodeExampleDefaultsValid(t *testing.T) {
	b, err := os.ReadFile("node.toml")
	if err != nil {
		t.Fatal(err)
	}
	text := regexp.MustCompile(`(?m)^#([a-z_]+ = )`).ReplaceAll(b, []byte("$1"))
	cfg, err := node.ParseConfig("node.toml (uncommented)", text)
	if err != nil {
		t.Fatal(err)
	}
	cfg.ApplyClusterDefaults()
	if err := cfg.ValidateCluster(); err != nil {
		t.Fatalf("node.toml (uncommented): %v", err)
	}
}
