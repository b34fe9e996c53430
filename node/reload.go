package node

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/raft"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/replication"
)

// SIGHUP reload. A running process keeps the configuration it started with
// (plus what earlier reloads applied) and, on SIGHUP, compares it with the
// file as it is now. Only two things change without a restart:
//
//   - log_level: the logger's level is a slog.LevelVar;
//   - an export's mask list: target state, so in cluster mode it goes
//     through Raft (the leader commits it; followers get it from the log),
//     and in standalone mode through the state directory.
//
// Everything else names sockets, files, Raft identity or timing that is
// opened or fixed at start; a change is reported as needing a restart rather
// than half-applied. The diff walks the structs' toml fields by reflection so
// that a field added later is reported too instead of silently ignored.

// MaskChange is a new mask list for an export.
type MaskChange struct {
	Target   aoe.TargetAddr
	Old, New []aoe.MAC
}

// ReloadPlan is what a new configuration changes.
type ReloadPlan struct {
	// LogLevel is the new log level ("debug", "info", ...), "" when the
	// level did not change.
	LogLevel string
	// Masks lists exports whose mask list changed.
	Masks []MaskChange
	// Restart lists, one phrase each, the changes that take a restart
	// (e.g. `raft_addr "10.0.0.1:7000" -> "10.0.0.1:7001"`).
	Restart []string
}

// Empty reports whether the file changed nothing.
func (p *ReloadPlan) Empty() bool {
	return p.LogLevel == "" && len(p.Masks) == 0 && len(p.Restart) == 0
}

// reloadableKeys are the top-level keys DiffConfig handles itself; every
// other key needs a restart.
var reloadableKeys = map[string]bool{"log_level": true, "export": true}

// DiffConfig compares the running configuration with a newly read one. Both
// must have had the same defaults and command-line overrides applied, or the
// overrides show up as changes. Exports are matched by shelf.slot.
func DiffConfig(running, next *Config) ReloadPlan {
	var p ReloadPlan
	if lv := levelName(next.LogLevel); lv != levelName(running.LogLevel) {
		p.LogLevel = lv
	}
	p.Restart = append(p.Restart, diffFields("", reflect.ValueOf(*running), reflect.ValueOf(*next), reloadableKeys)...)

	old := map[aoe.TargetAddr]*Export{}
	for i := range running.Exports {
		old[running.Exports[i].Addr()] = &running.Exports[i]
	}
	seen := map[aoe.TargetAddr]bool{}
	for i := range next.Exports {
		e := &next.Exports[i]
		a := e.Addr()
		seen[a] = true
		o := old[a]
		if o == nil {
			p.Restart = append(p.Restart, fmt.Sprintf("export %s added", a))
			continue
		}
		p.Restart = append(p.Restart, diffFields("export "+a.String()+": ", reflect.ValueOf(*o), reflect.ValueOf(*e), map[string]bool{"mask": true})...)
		om, err1 := o.ParseMasks()
		nm, err2 := e.ParseMasks()
		if err1 != nil || err2 != nil {
			// LoadConfig validated both; keep the running list.
			continue
		}
		if !slices.Equal(om, nm) {
			p.Masks = append(p.Masks, MaskChange{Target: a, Old: om, New: nm})
		}
	}
	for i := range running.Exports {
		if a := running.Exports[i].Addr(); !seen[a] {
			p.Restart = append(p.Restart, fmt.Sprintf("export %s removed", a))
		}
	}
	return p
}

// diffFields lists the toml fields of two structs of the same type that
// differ, skipping the keys in skip.
func diffFields(prefix string, a, b reflect.Value, skip map[string]bool) []string {
	var out []string
	t := a.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		key, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if key == "" || key == "-" || skip[key] {
			continue
		}
		av, bv := a.Field(i).Interface(), b.Field(i).Interface()
		if !reflect.DeepEqual(av, bv) {
			out = append(out, fmt.Sprintf("%s%s %s -> %s", prefix, key, showValue(av), showValue(bv)))
		}
	}
	return out
}

func showValue(v any) string {
	switch x := v.(type) {
	case string:
		return fmt.Sprintf("%q", x)
	case Duration:
		return x.String()
	default:
		return fmt.Sprint(x)
	}
}

// levelName is the effective level of a log_level value ("" is info).
func levelName(s string) string {
	if s == "" {
		return "info"
	}
	return strings.ToLower(s)
}

// Merge returns running with the changes of p that were applied (the log
// level and the mask lists in applied) taken from next. What needs a
// restart stays as it runs, so the next reload reports it again.
func (p *ReloadPlan) Merge(running, next *Config, applied []aoe.TargetAddr) *Config {
	c := *running
	c.Exports = slices.Clone(running.Exports)
	if p.LogLevel != "" {
		c.LogLevel = next.LogLevel
	}
	for _, a := range applied {
		for i := range c.Exports {
			if c.Exports[i].Addr() != a {
				continue
			}
			for j := range next.Exports {
				if next.Exports[j].Addr() == a {
					c.Exports[i].Masks = slices.Clone(next.Exports[j].Masks)
				}
			}
		}
	}
	return &c
}

// SetLogLevel applies the plan's log level to lv.
func (p *ReloadPlan) SetLogLevel(lv *slog.LevelVar) error {
	if p.LogLevel == "" || lv == nil {
		return nil
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(p.LogLevel)); err != nil {
		return fmt.Errorf("log_level %q: %w", p.LogLevel, err)
	}
	lv.Set(l)
	return nil
}

// LogRestart logs, once per change, what the reload could not apply.
func (p *ReloadPlan) LogRestart(log *slog.Logger) {
	for _, r := range p.Restart {
		log.Warn("reload: not applied, takes a restart", "change", r)
	}
}

// reloadTimeout bounds one mask-list commit through Raft.
const reloadTimeout = 10 * time.Second

// ApplyMasks commits the plan's mask lists through the cluster. Only the
// leader can commit; a follower logs that the leader must be reloaded (its
// own file is still the one it will use once it leads and is reloaded). The
// new list replaces the target's list and keeps its config string and
// reservations. It returns the targets whose new list is committed.
func (n *Node) ApplyMasks(ctx context.Context, changes []MaskChange) ([]aoe.TargetAddr, error) {
	if len(changes) == 0 {
		return nil, nil
	}
	if n.raft.State() != raft.Leader {
		_, id := n.raft.LeaderWithID()
		for _, c := range changes {
			n.log.Warn("reload: mask list changed in the file, but only the leader commits it to the cluster; reload the leader (after updating its file too)",
				"target", c.Target.String(), "leader", string(id))
		}
		return nil, nil
	}
	var applied []aoe.TargetAddr
	var errs []string
	for _, c := range changes {
		id := replication.TargetID{Shelf: c.Target.Shelf, Slot: c.Target.Slot}
		var st aoe.TargetState
		if info, ok := n.fsm.Target(id); ok {
			st = info.State.Clone()
		}
		// Read-modify-write of the whole state: a mask edit arriving from
		// the wire between the read and the commit would be overwritten,
		// which is the same outcome as the reload arriving just after it.
		st.Masks = slices.Clone(c.New)
		cctx, cancel := context.WithTimeout(ctx, reloadTimeout)
		err := n.repl.Commit(cctx, c.Target.Shelf, c.Target.Slot, st)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", c.Target, err))
			continue
		}
		n.log.Info("reload: mask list committed to the cluster", "target", c.Target.String(), "masks", macList(c.New))
		applied = append(applied, c.Target)
	}
	if len(errs) > 0 {
		return applied, fmt.Errorf("reload: mask list not committed (%s); send SIGHUP again once the cluster has a stable leader", strings.Join(errs, "; "))
	}
	return applied, nil
}

// ApplyStandaloneMasks replaces the mask lists of standalone targets: saved
// first through store (the state directory; nil keeps them in memory, as
// the targets do), then published.
func ApplyStandaloneMasks(ctx context.Context, targets map[aoe.TargetAddr]*aoe.Target, store aoe.StateStore, changes []MaskChange, log *slog.Logger) ([]aoe.TargetAddr, error) {
	var applied []aoe.TargetAddr
	var errs []string
	for _, c := range changes {
		t := targets[c.Target]
		if t == nil {
			errs = append(errs, fmt.Sprintf("%s: not serving", c.Target))
			continue
		}
		st := t.State().Clone()
		st.Masks = slices.Clone(c.New)
		if store != nil {
			if err := store.Commit(ctx, c.Target.Shelf, c.Target.Slot, st); err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", c.Target, err))
				continue
			}
		}
		if err := t.SetState(st); err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", c.Target, err))
			continue
		}
		log.Info("reload: mask list applied", "target", c.Target.String(), "masks", macList(c.New))
		applied = append(applied, c.Target)
	}
	if len(errs) > 0 {
		return applied, fmt.Errorf("reload: mask list not applied: %s", strings.Join(errs, "; "))
	}
	return applied, nil
}

func macList(ms []aoe.MAC) string {
	if len(ms) == 0 {
		return "(none: every initiator)"
	}
	s := make([]string, len(ms))
	for i, m := range ms {
		s[i] = m.String()
	}
	return strings.Join(s, ",")
}
