package node

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/storage"
)

const reloadBase = `
node_id = "n1"
data_dir = "/var/lib/vblade"
raft_addr = "10.0.0.1:7000"
log_level = "info"
insecure = true

[[export]]
shelf = 1
slot = 0
netif = "aoe0"
path = "/srv/a.img"
mask = ["02:00:00:00:00:01"]

[[export]]
shelf = 1
slot = 1
netif = "aoe0"
path = "/srv/b.img"
`

func parseReload(t *testing.T, text string) *Config {
	t.Helper()
	c, err := ParseConfig("test.toml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	c.ApplyClusterDefaults()
	return c
}

func TestDiffConfig(t *testing.T) {
	mac := func(s string) aoe.MAC {
		m, err := aoe.ParseMAC(s)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	for _, tc := range []struct {
		name      string
		edit      func(string) string
		level     string
		masks     map[string][]aoe.MAC // target -> new list
		restart   []string             // substrings, one per expected entry
		wantEmpty bool
	}{
		{name: "unchanged", edit: func(s string) string { return s }, wantEmpty: true},
		{name: "comment only", edit: func(s string) string { return "# edited\n" + s }, wantEmpty: true},
		{name: "log level", edit: func(s string) string {
			return strings.Replace(s, `log_level = "info"`, `log_level = "debug"`, 1)
		}, level: "debug"},
		{name: "log level removed is info", edit: func(s string) string {
			return strings.Replace(s, `log_level = "info"`, ``, 1)
		}, wantEmpty: true},
		{name: "mask added", edit: func(s string) string {
			return strings.Replace(s, `mask = ["02:00:00:00:00:01"]`, `mask = ["02:00:00:00:00:01", "02:00:00:00:00:02"]`, 1)
		}, masks: map[string][]aoe.MAC{"e1.0": {mac("02:00:00:00:00:01"), mac("02:00:00:00:00:02")}}},
		{name: "mask list cleared", edit: func(s string) string {
			return strings.Replace(s, `mask = ["02:00:00:00:00:01"]`, ``, 1)
		}, masks: map[string][]aoe.MAC{"e1.0": nil}},
		{name: "netif and path need restart", edit: func(s string) string {
			s = strings.Replace(s, `path = "/srv/b.img"`, `path = "/srv/c.img"`, 1)
			return strings.Replace(s, `netif = "aoe0"`, `netif = "aoe1"`, 1)
		}, restart: []string{`export e1.0: netif "aoe0" -> "aoe1"`, `export e1.1: path "/srv/b.img" -> "/srv/c.img"`}},
		{name: "raft_addr and timing need restart", edit: func(s string) string {
			s = strings.Replace(s, `10.0.0.1:7000`, `10.0.0.1:7001`, 1)
			return s + "\n" // keep exports last
		}, restart: []string{`raft_addr "10.0.0.1:7000" -> "10.0.0.1:7001"`, `raft_advertise "10.0.0.1:7000" -> "10.0.0.1:7001"`}},
		{name: "export removed and added", edit: func(s string) string {
			return strings.Replace(s, "slot = 1", "slot = 2", 1)
		}, restart: []string{"export e1.2 added", "export e1.1 removed"}},
		{name: "level and mask and restart together", edit: func(s string) string {
			s = strings.Replace(s, `log_level = "info"`, `log_level = "warn"`, 1)
			s = strings.Replace(s, `mask = ["02:00:00:00:00:01"]`, `mask = ["02:00:00:00:00:03"]`, 1)
			return strings.Replace(s, `data_dir = "/var/lib/vblade"`, `data_dir = "/var/lib/other"`, 1)
		}, level: "warn", masks: map[string][]aoe.MAC{"e1.0": {mac("02:00:00:00:00:03")}},
			restart: []string{`data_dir "/var/lib/vblade" -> "/var/lib/other"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			running := parseReload(t, reloadBase)
			next := parseReload(t, tc.edit(reloadBase))
			p := DiffConfig(running, next)
			if tc.wantEmpty {
				if !p.Empty() {
					t.Fatalf("plan %+v, want empty", p)
				}
				return
			}
			if p.LogLevel != tc.level {
				t.Errorf("log level %q, want %q", p.LogLevel, tc.level)
			}
			if len(p.Masks) != len(tc.masks) {
				t.Errorf("mask changes %+v, want %v", p.Masks, tc.masks)
			}
			for _, m := range p.Masks {
				want, ok := tc.masks[m.Target.String()]
				if !ok || len(want) != len(m.New) {
					t.Errorf("mask change %+v, want %v", m, tc.masks)
					continue
				}
				for i := range want {
					if want[i] != m.New[i] {
						t.Errorf("%s: mask %d is %v, want %v", m.Target, i, m.New[i], want[i])
					}
				}
			}
			if len(p.Restart) != len(tc.restart) {
				t.Errorf("restart %q, want %q", p.Restart, tc.restart)
			}
			for _, want := range tc.restart {
				found := false
				for _, r := range p.Restart {
					found = found || strings.Contains(r, want)
				}
				if !found {
					t.Errorf("restart %q lacks %q", p.Restart, want)
				}
			}
		})
	}
}

// TestReloadMerge: what was applied becomes the running configuration;
// what needs a restart does not, so the next reload reports it again.
func TestReloadMerge(t *testing.T) {
	running := parseReload(t, reloadBase)
	text := strings.Replace(reloadBase, `log_level = "info"`, `log_level = "debug"`, 1)
	text = strings.Replace(text, `mask = ["02:00:00:00:00:01"]`, `mask = ["02:00:00:00:00:09"]`, 1)
	text = strings.Replace(text, `netif = "aoe0"`, `netif = "aoe1"`, 1)
	next := parseReload(t, text)
	p := DiffConfig(running, next)
	merged := p.Merge(running, next, []aoe.TargetAddr{{Shelf: 1, Slot: 0}})
	if running.LogLevel != "info" || running.Exports[0].Masks[0] != "02:00:00:00:00:01" {
		t.Fatal("Merge modified the running configuration in place")
	}
	again := DiffConfig(merged, next)
	if again.LogLevel != "" || len(again.Masks) != 0 {
		t.Errorf("after merge, plan still has level %q masks %+v", again.LogLevel, again.Masks)
	}
	if len(again.Restart) != 1 || !strings.Contains(again.Restart[0], "netif") {
		t.Errorf("after merge, restart %q, want the netif change again", again.Restart)
	}
	// A mask list that was not applied (a follower) stays pending.
	notApplied := p.Merge(running, next, nil)
	if len(DiffConfig(notApplied, next).Masks) != 1 {
		t.Error("a mask change that was not applied disappeared from the next plan")
	}
}

func TestReloadLogLevel(t *testing.T) {
	lv := new(slog.LevelVar)
	p := ReloadPlan{LogLevel: "debug"}
	if err := p.SetLogLevel(lv); err != nil || lv.Level() != slog.LevelDebug {
		t.Fatalf("level %v err %v, want debug", lv.Level(), err)
	}
	p = ReloadPlan{LogLevel: "loud"}
	if err := p.SetLogLevel(lv); err == nil || lv.Level() != slog.LevelDebug {
		t.Fatalf("bad level: err %v, level %v (want an error and no change)", err, lv.Level())
	}
}

// memStore records commits, standing in for the state directory.
type memStore struct{ commits []aoe.TargetState }

func (m *memStore) Commit(_ context.Context, _ uint16, _ uint8, s aoe.TargetState) error {
	m.commits = append(m.commits, s.Clone())
	return nil
}

func TestApplyStandaloneMasks(t *testing.T) {
	addr := aoe.TargetAddr{Shelf: 1, Slot: 0}
	tg, err := aoe.NewTarget(aoe.TargetConfig{Shelf: 1, Slot: 0, Disk: storage.NewMem(1 << 20),
		Initial: aoe.TargetState{Config: []byte("cfg")}})
	if err != nil {
		t.Fatal(err)
	}
	m, _ := aoe.ParseMAC("02:00:00:00:00:07")
	store := &memStore{}
	ch := []MaskChange{{Target: addr, New: []aoe.MAC{m}}, {Target: aoe.TargetAddr{Shelf: 9, Slot: 9}}}
	applied, err := ApplyStandaloneMasks(context.Background(), map[aoe.TargetAddr]*aoe.Target{addr: tg}, store, ch, slog.Default())
	if err == nil || !strings.Contains(err.Error(), "e9.9") {
		t.Errorf("err %v, want one naming e9.9 (not serving)", err)
	}
	if len(applied) != 1 || applied[0] != addr {
		t.Fatalf("applied %v, want [%v]", applied, addr)
	}
	st := tg.State()
	if len(st.Masks) != 1 || st.Masks[0] != m || string(st.Config) != "cfg" {
		t.Errorf("target state %+v: want the new mask and the config string kept", st)
	}
	if len(store.commits) != 1 || len(store.commits[0].Masks) != 1 {
		t.Errorf("state store got %+v, want one commit with the new mask", store.commits)
	}
}
