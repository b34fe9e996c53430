package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/vblade-ha/vblade-ha/node"
)

// nodeMain runs `vblade node -c FILE`: one member of a cluster.
func nodeMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vblade node", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("c", "/etc/vblade/node.toml", "configuration file")
	check := fs.Bool("check", false, "validate the configuration and exit")
	nodeID := fs.String("node-id", "", "override node_id")
	dataDir := fs.String("data-dir", "", "override data_dir")
	raftAddr := fs.String("raft-addr", "", "override raft_addr")
	adminSocket := fs.String("admin-socket", "", "override admin_socket")
	logLevel := fs.String("log-level", "", "override log_level")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg, err := node.LoadConfig(*path)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	// The overrides and defaults, applied alike to the file a SIGHUP
	// re-reads, so that they do not show up as changes.
	prepare := func(c *node.Config) {
		for flagVal, field := range map[*string]*string{nodeID: &c.NodeID, dataDir: &c.DataDir, raftAddr: &c.RaftAddr,
			adminSocket: &c.AdminSocket, logLevel: &c.LogLevel} {
			if *flagVal != "" {
				*field = *flagVal
			}
		}
		c.ApplyClusterDefaults()
	}
	prepare(cfg)
	if err := cfg.ValidateCluster(); err != nil {
		fmt.Fprintf(stderr, "vblade: %s: %v\n", *path, err)
		return 1
	}
	if *check {
		fmt.Fprintf(stdout, "%s: ok (node %s, %d exports)\n", *path, cfg.NodeID, len(cfg.Exports))
		return 0
	}
	log, level, err := configLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	// SIGHUP is caught before the node exists: until then it would kill the
	// process, and systemd's ExecReload may send it at any time. A reload
	// during start-up waits in the channel until the node runs.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// NewNode keeps cfg; the reloader works on its own copy.
	running := *cfg
	n, err := node.NewNode(cfg, log)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		node.NotifyStopping()
		cancel()
	}()
	go n.NotifyWhenReady(ctx)
	rl := &reloader{path: *path, prepare: prepare, running: &running, level: level, log: log, masks: n.ApplyMasks}
	go rl.watch(ctx, hup)
	metricsErr := make(chan error, 1)
	if cfg.MetricsAddr != "" {
		reg, err := node.NewMetricsRegistry(n.MetricsCollector())
		if err != nil {
			fmt.Fprintln(stderr, "vblade:", err)
			return 1
		}
		go func() {
			if err := node.ServeMetrics(ctx, cfg.MetricsAddr, reg); err != nil {
				metricsErr <- err
				cancel()
			}
		}()
	}
	// The admin API (vbladectl on the unix socket, peers on the mux port)
	// runs beside the node; if it cannot start (socket in use), the node
	// stops rather than run unmanageable.
	adminErr := make(chan error, 1)
	go func() {
		err := n.ServeAdmin(ctx)
		if err != nil {
			cancel()
		}
		adminErr <- err
	}()
	runErr := n.Run(ctx)
	cancel()
	if err := <-adminErr; err != nil && runErr == nil {
		runErr = err
	}
	select {
	case err := <-metricsErr:
		if runErr == nil {
			runErr = err
		}
	default:
	}
	// A planned stop hands leadership over before Raft stops, so the
	// initiator sees no election timeout.
	shutErr := n.Shutdown(true)
	if runErr != nil {
		fmt.Fprintln(stderr, "vblade:", runErr)
		return 1
	}
	if shutErr != nil {
		fmt.Fprintln(stderr, "vblade: shutdown:", shutErr)
	}
	return 0
}
