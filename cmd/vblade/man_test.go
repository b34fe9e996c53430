package main

import (
	"bytes"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// manText returns a man page with roff escapes for '-' and font changes
// removed, so "\fB\-\-check\fR" reads "--check".
func manText(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.ReplaceAll(string(b), `\-`, "-")
	return regexp.MustCompile(`\\f[BIRP]`).ReplaceAllString(s, "")
}

// subcommandFlags runs `vblade SUB -h` and reads the flag package's usage
// output ("  -c string") for the flags the subcommand accepts.
func subcommandFlags(t *testing.T, sub string) []string {
	t.Helper()
	var out, errb bytes.Buffer
	if sub == "compat" {
		// Called directly: the test does not depend on main.go's dispatch.
		compatMain([]string{"-h"}, &out, &errb)
	} else {
		run([]string{sub, "-h"}, &out, &errb)
	}
	var flags []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z][a-z-]*)`).FindAllStringSubmatch(errb.String(), -1) {
		flags = append(flags, m[1])
	}
	if len(flags) == 0 {
		t.Fatalf("vblade %s -h listed no flags:\n%s", sub, errb.String())
	}
	return flags
}

// classicLetters probes parseClassic with every letter: those that are not
// "invalid option" are the classic short options.
func classicLetters() []string {
	var got []string
	for c := 'A'; c <= 'z'; c++ {
		if c > 'Z' && c < 'a' {
			continue
		}
		var errb bytes.Buffer
		parseClassic([]string{"-" + string(c), "1", "1", "2", "aoe0", "f"}, &errb)
		if !strings.Contains(errb.String(), "invalid option") {
			got = append(got, string(c))
		}
	}
	return got
}

// classicLongOptions reads the long options parseClassic accepts from its
// source: the case labels of its switch on the option name.
func classicLongOptions(t *testing.T) []string {
	src, err := os.ReadFile("main.go")
	if err != nil {
		t.Fatal(err)
	}
	s := string(src)
	i := strings.Index(s, "func parseClassic(")
	j := strings.Index(s[i:], "\n}\n")
	body := s[i : i+j]
	k := strings.Index(body, "switch name {")
	if k < 0 {
		t.Fatal("parseClassic has no `switch name {`: update this test")
	}
	end := strings.Index(body[k:], "default:")
	var out []string
	for _, m := range regexp.MustCompile(`"([a-z][a-z-]*)"`).FindAllStringSubmatch(body[k:k+end], -1) {
		out = append(out, m[1])
	}
	return out
}

// TestManPageMatchesFlags: every option vblade accepts is in vblade(8), and
// every option vblade(8) names is accepted.
func TestManPageMatchesFlags(t *testing.T) {
	page := manText(t, "../../ops/man/man8/vblade.8")
	accepted := map[string]bool{}
	for _, c := range classicLetters() {
		accepted["-"+c] = true
	}
	for _, l := range classicLongOptions(t) {
		accepted["--"+l] = true
	}
	for _, sub := range []string{"serve", "node", "compat"} {
		for _, f := range subcommandFlags(t, sub) {
			// The flag package accepts -f and --f alike; single letters
			// are documented with one dash, words with two.
			if len(f) == 1 {
				accepted["-"+f] = true
			} else {
				accepted["--"+f] = true
			}
		}
		if !regexp.MustCompile(`(?m)^\.B vblade ` + sub + `\b|^\.B ` + sub + `$`).MatchString(page) {
			t.Errorf("vblade(8) does not describe the %s subcommand", sub)
		}
	}
	accepted["-b"] = true // vblade echo -b, parsed by hand
	var missing []string
	for f := range accepted {
		if !regexp.MustCompile(`(^|[^a-z-])` + regexp.QuoteMeta(f) + `([^a-z-]|$)`).MatchString(page) {
			missing = append(missing, f)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("vblade(8) does not document %v", missing)
	}
	for _, m := range regexp.MustCompile(`(?:^|[\s\[(])(--?[a-z][a-z-]*)`).FindAllStringSubmatch(page, -1) {
		f := m[1]
		if strings.HasPrefix(f, "--") || len(f) == 2 {
			if !accepted[f] {
				t.Errorf("vblade(8) documents %s, which vblade does not accept", f)
			}
		}
	}
}
