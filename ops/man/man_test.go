// Package man holds the hand-written manual pages; this test checks
// vbladectl(8) against the flags the built vbladectl accepts and
// vblade-config(5) against node.Config. (vblade(8) is checked in
// cmd/vblade/man_test.go, where the flag definitions live.)
package man

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/vblade-ha/vblade-ha/node"
)

func manText(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.ReplaceAll(string(b), `\-`, "-")
	return regexp.MustCompile(`\\f[BIRP]`).ReplaceAllString(s, "")
}

var cmdLine = regexp.MustCompile(`^   ([a-z][a-z-]*)(, [a-z]+)?\s{2,}`)

// walk runs `vbladectl PATH... --help` and recurses into the subcommands it
// lists, collecting each command path's flags.
func walk(t *testing.T, bin string, path []string, out map[string][]string) {
	t.Helper()
	b, _ := exec.Command(bin, append(append([]string{}, path...), "--help")...).CombinedOutput()
	section := ""
	for _, l := range strings.Split(string(b), "\n") {
		switch {
		case strings.HasSuffix(l, ":") && !strings.HasPrefix(l, " "):
			section = l
		case section == "COMMANDS:":
			if m := cmdLine.FindStringSubmatch(l); m != nil && m[1] != "help" {
				walk(t, bin, append(append([]string{}, path...), m[1]), out)
			}
		case strings.HasSuffix(section, "OPTIONS:"):
			// "   -i value, --interface value  description"
			head, _, _ := strings.Cut(strings.TrimSpace(l), "  ")
			for _, f := range strings.Split(head, ", ") {
				if w := strings.Fields(f); len(w) > 0 && strings.HasPrefix(w[0], "-") {
					out[strings.Join(path, " ")] = append(out[strings.Join(path, " ")], w[0])
				}
			}
		}
	}
}

func TestVbladectlManPage(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "vbladectl")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/vbladectl").CombinedOutput(); err != nil {
		t.Fatalf("build vbladectl: %v\n%s", err, out)
	}
	cmds := map[string][]string{}
	walk(t, bin, nil, cmds)
	if len(cmds) < 2 {
		t.Fatalf("found no vbladectl commands in its --help: %v", cmds)
	}
	t.Logf("vbladectl commands and flags: %v", cmds)
	page := manText(t, "man8/vbladectl.8")
	accepted := map[string]bool{}
	for path, flags := range cmds {
		if path != "" && !strings.Contains(page, ".SS "+path) {
			t.Errorf("vbladectl(8) has no section for %q", path)
		}
		for _, f := range flags {
			accepted[f] = true
		}
	}
	var missing []string
	for f := range accepted {
		if !regexp.MustCompile(`(^|[^a-z-])` + regexp.QuoteMeta(f) + `([^a-z-]|$)`).MatchString(page) {
			missing = append(missing, f)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("vbladectl(8) does not document %v", missing)
	}
	for _, m := range regexp.MustCompile(`(?:^|[\s\[(])(--?[a-z][a-z-]*)`).FindAllStringSubmatch(page, -1) {
		if f := m[1]; (strings.HasPrefix(f, "--") || len(f) == 2) && !accepted[f] {
			t.Errorf("vbladectl(8) documents %s, which vbladectl does not accept", f)
		}
	}
}

// TestConfigManPage: every key of node.Config and node.Export has an entry
// in vblade-config(5).
func TestConfigManPage(t *testing.T) {
	page := manText(t, "man5/vblade-config.5")
	for _, typ := range []reflect.Type{reflect.TypeOf(node.Config{}), reflect.TypeOf(node.Export{})} {
		for i := 0; i < typ.NumField(); i++ {
			k, _, _ := strings.Cut(typ.Field(i).Tag.Get("toml"), ",")
			if k == "" || k == "-" {
				continue
			}
			if k == "export" {
				k = "[[export]]"
			}
			if !strings.Contains(page, "\n.B "+k+"\n") {
				t.Errorf("vblade-config(5) has no entry for %q", k)
			}
		}
	}
}
