package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// Metrics are read at scrape time from the atomic counters the engine keeps
// anyway (aoe.TargetStats, aoe.ServerStats) and from Raft's accessors: the
// frame path pays nothing for them. Only latency histograms need a call per
// command, and only when the engine is given an observer (LatencyObserver).

const metricsNamespace = "vblade"

// The "kind" label takes the values of aoe.CommandKind, which match the
// counters of aoe.TargetStats (Reads, Writes, Flushes, Other).

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(metricsNamespace+"_"+name, help, labels, nil)
}

var (
	tl = []string{"target", "netif"}

	descCommands    = desc("target_commands_total", "ATA commands answered, by kind (read, write, flush, other).", "target", "netif", "kind")
	descBytes       = desc("target_bytes_total", "Bytes moved by ATA reads and writes.", "target", "netif", "direction")
	descATAErrors   = desc("target_ata_errors_total", "ATA error answers (ABRT, IDNF): out-of-range LBAs, writes to read-only targets, disk errors.", tl...)
	descAoEErrors   = desc("target_aoe_errors_total", "AoE error answers (bad argument, unrecognised command, ...).", tl...)
	descDropped     = desc("target_dropped_total", "Commands left unanswered: target closed (not the leader), masked initiator, or a write that did not commit.", tl...)
	descServing     = desc("target_serving", "1 while the target answers (always 1 standalone; in a cluster, 1 on the leader only).", tl...)
	descSize        = desc("target_size_bytes", "Size of the exported disk.", tl...)
	descReceived    = desc("interface_frames_received_total", "AoE frames read from the interface's socket (after the kernel filter).", "netif")
	descSent        = desc("interface_frames_sent_total", "Responses and announcements sent.", "netif")
	descMalformed   = desc("interface_frames_malformed_total", "Frames dropped as too short to carry an AoE header.", "netif")
	descNoTarget    = desc("interface_frames_no_target_total", "Frames dropped as addressed to a shelf.slot not served here.", "netif")
	descSendErrors  = desc("interface_send_errors_total", "Responses the socket refused to send.", "netif")
	descBroadcast   = desc("interface_broadcast_copies_total", "Broadcast requests copied to answer for more than one target.", "netif")
	descKernelDrops = desc("interface_kernel_drops_total", "Frames the kernel dropped because the socket's receive buffer was full (raise bufcnt or the workers).", "netif")

	descRaftState     = desc("raft_state", "Raft role of this node: 1 for the current state, 0 for the others.", "state")
	descRaftTerm      = desc("raft_term", "Current Raft term.")
	descRaftLastIndex = desc("raft_last_log_index", "Index of the last entry in this node's Raft log.")
	descRaftCommit    = desc("raft_commit_index", "Highest log index this node knows to be committed.")
	descRaftApplied   = desc("raft_applied_index", "Highest log index applied to this node's disk images.")
	descRaftLag       = desc("raft_apply_lag_entries", "Committed entries not yet applied here (commit index minus applied index). On a follower this is how far its images trail the leader's.")
	descRaftContact   = desc("raft_last_contact_seconds", "Seconds since this follower last heard from the leader (0 on the leader).")
	descRaftChanges   = desc("raft_leadership_changes_total", "Times this node gained or lost leadership.")
	descDupWrites     = desc("replicated_duplicate_writes_total", "Retransmitted writes the log carried twice and this node applied once.")
	descWriteProps    = desc("replicated_write_proposals_total", "Log entries this node proposed for writes while leading (group commit: one entry carries every write that arrived while the previous one was in flight).")
	descWritesProp    = desc("replicated_writes_proposed_total", "Writes carried by those entries; divided by replicated_write_proposals_total, the mean group size.")
	descRaftServers   = desc("raft_servers", "Servers in the cluster configuration, this one included.")
	descReady         = desc("node_ready", "1 when the node is a member of a cluster with a leader and has applied the committed log (systemd READY=1).")
	descXferBytes     = desc("image_transfer_bytes", "Bytes moved by the current or last full-image transfer.", "direction")
	descXferTotal     = desc("image_transfer_size_bytes", "Size of the current or last full-image transfer.", "direction")
	descXferActive    = desc("image_transfer_active", "1 while a full-image transfer runs.", "direction")
	descXferIndex     = desc("image_transfer_snapshot_index", "Snapshot index the transferred image is replayed from.", "direction")
	descXferFailed    = desc("image_transfer_failed", "1 if the last full-image transfer failed.", "direction")
	descBuildInfo     = desc("build_info", "vblade-ha version; always 1.", "version")
)

// Collector is a prometheus.Collector over a set of AoE servers and targets
// and, in cluster mode, a Node. It is safe to add to while being scraped.
type Collector struct {
	mu      sync.Mutex
	servers []*aoe.Server
	targets []collTarget
	node    *Node
	latency *prometheus.HistogramVec
}

type collTarget struct {
	netif string
	t     *aoe.Target
}

// NewCollector returns an empty collector; add servers and targets to it.
func NewCollector() *Collector {
	return &Collector{
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace,
			Name:      "target_command_duration_seconds",
			Help:      "Time from a command's frame arriving to its answer being sent, by kind. Writes in a cluster include the Raft round trip.",
			Buckets:   latencyBuckets,
		}, []string{"target", "netif", "kind"}),
	}
}

// AddServer exports an interface's frame counters.
func (c *Collector) AddServer(s *aoe.Server) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, have := range c.servers {
		if have == s {
			return
		}
	}
	c.servers = append(c.servers, s)
}

// AddTarget exports a target's command counters; netif labels it.
func (c *Collector) AddTarget(netif string, t *aoe.Target) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, have := range c.targets {
		if have.t == t {
			return
		}
	}
	c.targets = append(c.targets, collTarget{netif, t})
}

// MetricsCollector returns the collector over the node's interfaces,
// targets (with their latency histograms) and Raft state.
func (n *Node) MetricsCollector() *Collector {
	n.metrics.mu.Lock()
	n.metrics.node = n
	n.metrics.mu.Unlock()
	return n.metrics
}

// latencyBuckets span a RAM-backed read (tens of µs) to a replicated write
// across a slow LAN or a stalled disk (seconds).
var latencyBuckets = prometheus.ExponentialBuckets(25e-6, 2, 18) // 25µs .. ~3.3s

// LatencyObserver returns a function the AoE engine calls once per answered
// ATA command with its kind (KindRead, ...) and how long it took from frame
// receipt to answer. It is meant for an observer hook in aoe.TargetConfig;
// the returned function does not allocate or lock.
func (c *Collector) LatencyObserver(netif string, a aoe.TargetAddr) func(kind aoe.CommandKind, d time.Duration) {
	// Resolve the label values once: Observe on the children is lock-free.
	var h [aoe.KindOther + 1]prometheus.Observer
	for k := range h {
		h[k] = c.latency.WithLabelValues(a.String(), netif, aoe.CommandKind(k).String())
	}
	return func(kind aoe.CommandKind, d time.Duration) {
		h[min(int(kind), len(h)-1)].Observe(d.Seconds())
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCommands, descBytes, descATAErrors, descAoEErrors, descDropped,
		descServing, descSize, descReceived, descSent, descMalformed, descNoTarget, descSendErrors, descBroadcast,
		descKernelDrops, descRaftState, descRaftTerm, descRaftLastIndex, descRaftCommit, descRaftApplied, descRaftLag,
		descRaftContact, descRaftChanges, descDupWrites, descWriteProps, descWritesProp, descRaftServers, descReady, descXferBytes, descXferTotal, descXferActive,
		descXferIndex, descXferFailed, descBuildInfo} {
		ch <- d
	}
	c.latency.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descBuildInfo, prometheus.GaugeValue, 1, Version)
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, ct := range c.targets {
		t, id, netif := ct.t, ct.t.Addr().String(), ct.netif
		st := &t.Stats
		counter(descCommands, st.Reads.Load(), id, netif, aoe.KindRead.String())
		counter(descCommands, st.Writes.Load(), id, netif, aoe.KindWrite.String())
		counter(descCommands, st.Flushes.Load(), id, netif, aoe.KindFlush.String())
		counter(descCommands, st.Other.Load(), id, netif, aoe.KindOther.String())
		counter(descBytes, st.ReadBytes.Load(), id, netif, "read")
		counter(descBytes, st.WriteBytes.Load(), id, netif, "write")
		counter(descATAErrors, st.ATAErrors.Load(), id, netif)
		counter(descAoEErrors, st.AoEErrors.Load(), id, netif)
		counter(descDropped, st.Dropped.Load(), id, netif)
		gauge(descServing, b2f(t.Serving()), id, netif)
		gauge(descSize, float64(t.Sectors()*aoe.SectorSize), id, netif)
	}
	for _, s := range c.servers {
		netif, st := s.Interface(), &s.Stats
		counter(descReceived, st.Received.Load(), netif)
		counter(descSent, st.Sent.Load(), netif)
		counter(descMalformed, st.Malformed.Load(), netif)
		counter(descNoTarget, st.NoTarget.Load(), netif)
		counter(descSendErrors, st.SendErrors.Load(), netif)
		counter(descBroadcast, st.BroadcastCopies.Load(), netif)
		counter(descKernelDrops, s.KernelDrops(), netif)
	}
	c.latency.Collect(ch)
	if c.node != nil {
		c.node.collect(gauge, counter)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// collect reports the node's Raft and transfer state.
func (n *Node) collect(gauge func(*prometheus.Desc, float64, ...string), counter func(*prometheus.Desc, uint64, ...string)) {
	r := n.raft
	if r == nil {
		return
	}
	state := r.State()
	for _, s := range []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown} {
		gauge(descRaftState, b2f(s == state), stateLabel(s))
	}
	gauge(descRaftTerm, float64(r.CurrentTerm()))
	gauge(descRaftLastIndex, float64(r.LastIndex()))
	commit, applied := r.CommitIndex(), n.fsm.AppliedIndex()
	gauge(descRaftCommit, float64(commit))
	gauge(descRaftApplied, float64(applied))
	lag := 0.0
	if commit > applied {
		lag = float64(commit - applied)
	}
	gauge(descRaftLag, lag)
	switch {
	case state == raft.Leader:
		gauge(descRaftContact, 0)
	case !r.LastContact().IsZero():
		gauge(descRaftContact, time.Since(r.LastContact()).Seconds())
	}
	counter(descRaftChanges, n.changes.Load())
	counter(descDupWrites, n.fsm.DuplicateWrites())
	props, writes := n.repl.WriteStats()
	counter(descWriteProps, props)
	counter(descWritesProp, writes)
	if f := r.GetConfiguration(); f.Error() == nil {
		gauge(descRaftServers, float64(len(f.Configuration().Servers)))
	}
	ready, _ := n.Ready()
	gauge(descReady, b2f(ready))
	if p := n.transfer.Load(); p != nil {
		dir := p.Direction.String()
		gauge(descXferBytes, float64(p.Bytes), dir)
		gauge(descXferTotal, float64(p.Total), dir)
		gauge(descXferActive, b2f(!p.Done), dir)
		gauge(descXferIndex, float64(p.Index), dir)
		gauge(descXferFailed, b2f(p.Done && p.Err != nil), dir)
	}
}

func stateLabel(s raft.RaftState) string {
	switch s {
	case raft.Follower:
		return "follower"
	case raft.Candidate:
		return "candidate"
	case raft.Leader:
		return "leader"
	default:
		return "shutdown"
	}
}

// NewMetricsRegistry returns a registry with the given collectors and the
// standard Go runtime and process collectors (memory, goroutines, open
// files), which are what one looks at first when a daemon misbehaves.
func NewMetricsRegistry(cs ...prometheus.Collector) (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	all := append([]prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	}, cs...)
	for _, c := range all {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	return reg, nil
}

// ServeMetrics serves reg on http://addr/metrics until ctx ends. It returns
// once the listener is closed; a failure to bind is returned at once so the
// daemon can refuse to start with a metrics_addr it cannot honour.
func ServeMetrics(ctx context.Context, addr string, reg *prometheus.Registry) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics_addr %s: %w (is another process using the port?)", addr, err)
	}
	return serveMetrics(ctx, ln, reg)
}

func serveMetrics(ctx context.Context, ln net.Listener, reg *prometheus.Registry) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		// A collector error must not hide the other figures.
		ErrorHandling: promhttp.ContinueOnError,
		Registry:      reg,
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "vblade-ha metrics: see /metrics")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	})
	defer stop()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics server: %w", err)
	}
	return nil
}
