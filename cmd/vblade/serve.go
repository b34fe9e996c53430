package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/vblade-ha/vblade-ha/node"
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
	log, err := configLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	s := &node.Standalone{StateDir: cfg.StateDir, Exports: cfg.Exports, Logger: log, Started: printStarted(stdout)}
	run := s.Run
	if cfg.MetricsAddr != "" {
		s.Metrics = node.NewCollector()
		reg, err := node.NewMetricsRegistry(s.Metrics)
		if err != nil {
			fmt.Fprintln(stderr, "vblade:", err)
			return 1
		}
		run = func(ctx context.Context) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			errc := make(chan error, 1)
			go func() { errc <- node.ServeMetrics(ctx, cfg.MetricsAddr, reg) }()
			err := s.Run(ctx)
			cancel()
			if merr := <-errc; err == nil && merr != nil && !errors.Is(merr, context.Canceled) {
				err = merr
			}
			return err
		}
	}
	return runUntilSignal(run, stderr)
}

func configLogger(cfg *node.Config, w io.Writer) (*slog.Logger, error) {
	level := cfg.LogLevel
	if level == "" {
		level = "info"
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: l}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), nil
}
