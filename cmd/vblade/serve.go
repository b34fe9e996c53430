package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/node"
	"github.com/vblade-ha/vblade-ha/storage"
)

// serveMain runs `vblade serve -c FILE [--check]`: every export of the file
// in one process, standalone (no cluster).
func serveMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vblade serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("c", "/etc/vblade/serve.toml", "configuration file")
	check := fs.Bool("check", false, "validate the configuration and exit")
	stateDir := fs.String("state-dir", "", "override state_dir")
	logLevel := fs.String("log-level", "", "override log_level")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg, err := node.LoadConfig(*path)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	if *stateDir != "" {
		cfg.StateDir = *stateDir
	}
	if *logLevel != "" {
		cfg.LogLevel = *logLevel
	}
	if len(cfg.Exports) == 0 {
		fmt.Fprintf(stderr, "vblade: %s: no [[export]] tables\n", *path)
		return 1
	}
	if *check {
		fmt.Fprintf(stdout, "%s: ok (%d exports)\n", *path, len(cfg.Exports))
		return 0
	}
	log, level, err := configLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	// SIGHUP is caught from here on, before anything serves.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// The targets, as they start, for mask list reloads.
	var targetsMu sync.Mutex
	targets := map[aoe.TargetAddr]*aoe.Target{}
	started := printStarted(stdout)
	s := &node.Standalone{StateDir: cfg.StateDir, Exports: cfg.Exports, Logger: log, Started: func(e *node.Export, t *aoe.Target) {
		targetsMu.Lock()
		targets[t.Addr()] = t
		targetsMu.Unlock()
		started(e, t)
	}}
	rl := &reloader{path: *path, running: cfg, level: level, log: log,
		prepare: func(c *node.Config) {
			if *stateDir != "" {
				c.StateDir = *stateDir
			}
			if *logLevel != "" {
				c.LogLevel = *logLevel
			}
		},
		masks: func(ctx context.Context, ch []node.MaskChange) ([]aoe.TargetAddr, error) {
			if len(ch) == 0 {
				return nil, nil
			}
			var store aoe.StateStore
			if cfg.StateDir != "" {
				sd, err := storage.OpenStateDir(cfg.StateDir)
				if err != nil {
					return nil, err
				}
				store = sd
			}
			targetsMu.Lock()
			defer targetsMu.Unlock()
			return node.ApplyStandaloneMasks(ctx, targets, store, ch, log)
		}}
	run := func(ctx context.Context) error {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		go rl.watch(ctx, hup)
		return s.Run(ctx)
	}
	if cfg.MetricsAddr != "" {
		s.Metrics = node.NewCollector()
		reg, err := node.NewMetricsRegistry(s.Metrics)
		if err != nil {
			fmt.Fprintln(stderr, "vblade:", err)
			return 1
		}
		serve := run
		run = func(ctx context.Context) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			errc := make(chan error, 1)
			go func() { errc <- node.ServeMetrics(ctx, cfg.MetricsAddr, reg) }()
			err := serve(ctx)
			cancel()
			if merr := <-errc; err == nil && merr != nil && !errors.Is(merr, context.Canceled) {
				err = merr
			}
			return err
		}
	}
	return runUntilSignal(run, stderr)
}

// configLogger builds the logger of `vblade serve` and `vblade node`. Its
// level is the returned LevelVar, so that SIGHUP can change it in place.
func configLogger(cfg *node.Config, w io.Writer) (*slog.Logger, *slog.LevelVar, error) {
	level := cfg.LogLevel
	if level == "" {
		level = "info"
	}
	lv := new(slog.LevelVar)
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, nil, err
	}
	opts := &slog.HandlerOptions{Level: lv}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), lv, nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), lv, nil
}

// reloader re-reads the configuration file on SIGHUP and applies what can
// change without a restart (see node/reload.go).
type reloader struct {
	path    string
	prepare func(*node.Config) // the command-line overrides and defaults
	running *node.Config
	level   *slog.LevelVar
	log     *slog.Logger
	// masks commits new mask lists and returns the targets it applied.
	masks func(context.Context, []node.MaskChange) ([]aoe.TargetAddr, error)
}

// watch reloads on every SIGHUP until ctx ends. The caller registered hup
// with signal.Notify before it started serving: an unhandled SIGHUP would
// kill the process.
func (r *reloader) watch(ctx context.Context, hup <-chan os.Signal) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			r.reload(ctx)
		}
	}
}

func (r *reloader) reload(ctx context.Context) {
	next, err := node.LoadConfig(r.path)
	if err != nil {
		// A broken file changes nothing: the process keeps running as it is.
		r.log.Error("reload: configuration not loaded; nothing changed", "err", err)
		return
	}
	r.prepare(next)
	plan := node.DiffConfig(r.running, next)
	if plan.Empty() {
		r.log.Info("reload: configuration unchanged", "file", r.path)
		return
	}
	if err := plan.SetLogLevel(r.level); err != nil {
		r.log.Error("reload: log level not changed", "err", err)
		plan.LogLevel = ""
	} else if plan.LogLevel != "" {
		r.log.Info("reload: log level changed", "level", plan.LogLevel)
	}
	applied, err := r.masks(ctx, plan.Masks)
	if err != nil {
		r.log.Error("reload: mask lists", "err", err)
	}
	plan.LogRestart(r.log)
	r.running = plan.Merge(r.running, next, applied)
}
