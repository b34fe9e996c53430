package main

import (
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/vblade-ha/vblade-ha/node"
)

// TestParseClassic checks the command line parses as glibc getopt parses
// vblade's "b:dsrm:o:l:".
func TestParseClassic(t *testing.T) {
	base := node.Export{Shelf: 1, Slot: 2, Netif: "aoe0", Path: "/img", BufCount: 16}
	with := func(f func(e *node.Export)) node.Export { e := base; f(&e); return e }
	cases := []struct {
		args string
		want node.Export
		dir  string
	}{
		{"1 2 aoe0 /img", base, ""},
		{"-b 64 1 2 aoe0 /img", with(func(e *node.Export) { e.BufCount = 64 }), ""},
		{"-b64 -dsr 1 2 aoe0 /img", with(func(e *node.Export) { e.BufCount = 64; e.Direct, e.Sync, e.ReadOnly = true, true, true }), ""},
		{"1 2 aoe0 /img -r", with(func(e *node.Export) { e.ReadOnly = true }), ""},
		{"-o 8 -l 0x10 1 2 aoe0 /img", with(func(e *node.Export) { e.Offset, e.Length = 8, 16 }), ""},
		{"-m 02:00:00:00:00:01,020000000002 1 2 aoe0 /img", with(func(e *node.Export) { e.Masks = []string{"02:00:00:00:00:01", "020000000002"} }), ""},
		{"-m zz:zz,02:00:00:00:00:01 1 2 aoe0 /img", with(func(e *node.Export) { e.Masks = []string{"02:00:00:00:00:01"} }), ""},
		{"--state-dir /s 1 2 aoe0 /img", base, "/s"},
		{"--state-dir=/s -- 1 2 aoe0 /img", base, "/s"},
	}
	for _, c := range cases {
		o, err := parseClassic(strings.Fields(c.args), io.Discard)
		if err != nil {
			t.Errorf("%q: %v", c.args, err)
			continue
		}
		if !reflect.DeepEqual(o.export, c.want) || o.stateDir != c.dir {
			t.Errorf("%q:\n got %+v dir %q\nwant %+v dir %q", c.args, o.export, o.stateDir, c.want, c.dir)
		}
	}
	for _, bad := range []string{"", "1 2 aoe0", "1 2 aoe0 /img extra", "-b 0 1 2 aoe0 /img", "-b", "-x 1 2 aoe0 /img",
		"-o -1 1 2 aoe0 /img", "-l 0 1 2 aoe0 /img", "-l junk 1 2 aoe0 /img", "--nope 1 2 aoe0 /img"} {
		if _, err := parseClassic(strings.Fields(bad), io.Discard); err == nil || !strings.Contains(err.Error(), "usage:") {
			t.Errorf("%q: got %v, want the usage line", bad, err)
		}
	}
}
