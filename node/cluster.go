package node

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/replication"
	"github.com/vblade-ha/vblade-ha/storage"
)

// logCacheSize is the number of newest Raft log entries kept in memory. With
// group commit an entry carries up to 32 KiB of writes (replication's
// DefaultMaxBatch, plus a jumbo write's worth), so 512 entries hold at most
// ~20 MiB, and still the last several thousand writes a follower may ask for.
const logCacheSize = 512

// Node is one member of a vblade-ha cluster: the local images, the Raft
// instance that replicates them, and the AoE targets that answer only while
// this node leads.
type Node struct {
	cfg *Config
	log *slog.Logger

	disks   map[replication.TargetID]*storage.File
	fsm     *replication.FSM
	snaps   *replication.SnapshotStore
	bolt    *raftboltdb.BoltStore
	trans   *raft.NetworkTransport
	mux     *Mux
	raft    *raft.Raft
	repl    *replication.Replicator
	gate    *leaderGate
	notify  chan bool
	servers map[string]*aoe.Server
	// targetsMu orders target registration against state changes from the
	// FSM: Raft may restore a snapshot or apply entries before the targets
	// exist (NewRaft restores at once), so a target starts from the FSM's
	// state and every later change reaches it.
	targetsMu sync.Mutex
	targets   map[aoe.TargetAddr]*aoe.Target
	vmacs     map[aoe.TargetAddr]aoe.MAC // virtual MACs (mac_mode = "virtual")
	metrics   *Collector
	// tls is nil when insecure = true.
	tls *TLSReloader

	transfer atomic.Pointer[replication.TransferProgress]
	changes  atomic.Uint64 // leadership changes seen
	fatal    atomic.Pointer[error]

	stopOnce sync.Once
}

// NewNode opens the node's disks and Raft state. It does not serve until
// Run; it does not form a cluster until Bootstrap or Join (a node that has
// Raft state from an earlier run rejoins its cluster by itself).
func NewNode(cfg *Config, log *slog.Logger) (*Node, error) {
	cfg.ApplyClusterDefaults()
	if err := cfg.ValidateCluster(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	n := &Node{
		cfg:     cfg,
		log:     log.With("node", cfg.NodeID),
		disks:   map[replication.TargetID]*storage.File{},
		gate:    newLeaderGate(),
		notify:  make(chan bool, 64),
		servers: map[string]*aoe.Server{},
		targets: map[aoe.TargetAddr]*aoe.Target{},
		vmacs:   map[aoe.TargetAddr]aoe.MAC{},
		metrics: NewCollector(),
	}
	ok := false
	defer func() {
		if !ok {
			n.closeAll()
		}
	}()
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data_dir: %w", err)
	}
	disks := map[replication.TargetID]aoe.Disk{}
	for i := range cfg.Exports {
		e := &cfg.Exports[i]
		f, err := e.OpenDisk()
		if err != nil {
			return nil, fmt.Errorf("export %s: %w", e.Addr(), err)
		}
		id := replication.TargetID{Shelf: uint16(e.Shelf), Slot: uint8(e.Slot)}
		n.disks[id] = f
		disks[id] = f
		n.log.Info("export image opened", "target", e.Addr().String(), "path", e.Path,
			"bytes", f.Size(), "io", f.IOPath())
	}
	n.fsm = replication.NewFSM(replication.FSMOptions{Disks: disks, Sink: n, OnFatal: n.onFatal})
	var err error
	n.bolt, err = openRaftLog(filepath.Join(cfg.DataDir, "raft.db"))
	if err != nil {
		return nil, fmt.Errorf("open raft log %s: %w (is another vblade node using this data_dir?)", filepath.Join(cfg.DataDir, "raft.db"), err)
	}
	hlog := newHCLogger(n.log)
	n.snaps, err = replication.NewFileSnapshotStore(filepath.Join(cfg.DataDir, "snapshots"), 2, hlogWriter{n.log}, n.fsm,
		replication.SnapshotStoreOptions{Progress: n.onProgress})
	if err != nil {
		return nil, err
	}
	// Peer authentication first: a node whose own certificate peers would
	// refuse must not start and look healthy.
	var dial Dialer
	var serverTLS *tls.Config
	if !cfg.Insecure {
		n.tls, err = NewTLSReloader(TLSFiles{Cert: cfg.TLSCert, Key: cfg.TLSKey, CA: cfg.TLSCA}, n.log)
		if err != nil {
			return nil, err
		}
		leaf, _ := n.tls.Leaf()
		host, _, _ := net.SplitHostPort(cfg.RaftAdvertise)
		if err := checkCertNamesHost(leaf, host); err != nil {
			return nil, err
		}
		if _, err := readJoinToken(cfg.JoinTokenFile); err != nil {
			return nil, err
		}
		dial, serverTLS = n.tls.Dialer(), n.tls.ServerConfig()
	} else {
		n.log.Warn("insecure = true: the node port is plain TCP without authentication; anyone who reaches it can join the cluster and rewrite every disk")
	}
	ln, err := net.Listen("tcp", cfg.RaftAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on raft_addr %s: %w", cfg.RaftAddr, err)
	}
	if serverTLS != nil {
		ln = tls.NewListener(ln, serverTLS)
	}
	n.mux = NewMux(ln, dial, n.log)
	adv, err := net.ResolveTCPAddr("tcp", cfg.RaftAdvertise)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("raft_advertise %s: %w", cfg.RaftAdvertise, err)
	}
	n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  n.mux.RaftLayer(adv),
		MaxPool: 4,
		Timeout: 10 * time.Second,
		Logger:  hlog,
	})
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.Logger = hlog
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout.Duration
	rc.ElectionTimeout = cfg.ElectionTimeout.Duration
	// Raft's own lease only decides when an unreachable leader steps down
	// (and starts an election); the gate's lease (leader_lease, shorter)
	// is what keeps a deposed leader from answering. Keeping Raft's at the
	// heartbeat timeout spares a loaded leader needless elections.
	rc.LeaderLeaseTimeout = cfg.HeartbeatTimeout.Duration
	rc.NotifyCh = n.notify
	if cfg.SnapshotInterval.Duration > 0 {
		rc.SnapshotInterval = cfg.SnapshotInterval.Duration
	}
	if cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = cfg.SnapshotThreshold
	}
	if cfg.TrailingLogs > 0 {
		rc.TrailingLogs = cfg.TrailingLogs
	}
	replication.TuneConfig(rc)
	if err := raft.ValidateConfig(rc); err != nil {
		return nil, fmt.Errorf("raft settings: %w", err)
	}
	// The leader sends each entry to every follower soon after writing it:
	// an in-memory cache of the newest entries spares a bolt read
	// transaction per AppendEntries (as rqlite does).
	logs, err := raft.NewLogCache(logCacheSize, n.bolt)
	if err != nil {
		return nil, fmt.Errorf("raft log cache: %w", err)
	}
	n.raft, err = raft.NewRaft(rc, n.fsm, logs, n.bolt, n.snaps, n.trans)
	if err != nil {
		return nil, fmt.Errorf("start raft: %w", err)
	}
	n.repl = replication.NewReplicator(n.raft, n.fsm, replication.ReplicatorOptions{})
	for i := range cfg.Exports {
		if err := n.addTarget(&cfg.Exports[i]); err != nil {
			return nil, err
		}
	}
	ok = true
	return n, nil
}

// virtualMAC derives a target's virtual MAC from the cluster name and
// shelf.slot: locally administered, unicast, the same on every node.
func virtualMAC(cluster string, a aoe.TargetAddr) aoe.MAC {
	h := sha256.Sum256([]byte(fmt.Sprintf("vblade-ha/%s/%d.%d", cluster, a.Shelf, a.Slot)))
	var m aoe.MAC
	copy(m[:], h[:6])
	m[0] = m[0]&0xfc | 0x02
	return m
}

func (n *Node) addTarget(e *Export) error {
	id := replication.TargetID{Shelf: uint16(e.Shelf), Slot: uint8(e.Slot)}
	store, err := n.repl.Store(id)
	if err != nil {
		return err
	}
	var mac aoe.MAC
	switch {
	case e.MAC != "":
		mac, _ = aoe.ParseMAC(e.MAC)
	case n.cfg.MACMode == "virtual":
		mac = virtualMAC(n.cfg.ClusterName, e.Addr())
	}
	if mac != (aoe.MAC{}) {
		n.vmacs[e.Addr()] = mac
	}
	t, err := aoe.NewTarget(aoe.TargetConfig{
		Shelf:       uint16(e.Shelf),
		Slot:        uint8(e.Slot),
		Disk:        store,
		ReadOnly:    e.ReadOnly,
		BufferCount: e.BufCount,
		State:       n.repl,
		Gate:        n.gate,
		MAC:         mac,
		Serial:      fmt.Sprintf("%d.%d:%s", e.Shelf, e.Slot, n.cfg.ClusterName),
		Observe:     n.metrics.LatencyObserver(e.Netif, e.Addr()),
		Logger:      n.log,
	})
	if err != nil {
		return err
	}
	srv := n.servers[e.Netif]
	if srv == nil {
		srv, err = aoe.NewServer(aoe.ServerConfig{Interface: e.Netif, BufferCount: e.BufCount, Logger: n.log})
		if err != nil {
			return err
		}
		n.servers[e.Netif] = srv
		n.metrics.AddServer(srv)
	}
	if err := srv.AddTarget(t); err != nil {
		return err
	}
	n.metrics.AddTarget(e.Netif, t)
	n.targetsMu.Lock()
	defer n.targetsMu.Unlock()
	if info, ok := n.fsm.Target(id); ok {
		if err := t.SetState(info.State); err != nil {
			return fmt.Errorf("export %s: replicated state: %w", e.Addr(), err)
		}
	}
	n.targets[e.Addr()] = t
	return nil
}

// SetState implements replication.StateSink: a state change from the log
// reaches this node's target.
func (n *Node) SetState(shelf uint16, slot uint8, s aoe.TargetState) {
	n.targetsMu.Lock()
	defer n.targetsMu.Unlock()
	if t := n.targets[aoe.TargetAddr{Shelf: shelf, Slot: slot}]; t != nil {
		if err := t.SetState(s); err != nil {
			n.log.Error("replicated target state rejected", "target", t.Addr().String(), "err", err)
		}
	}
}

// onFatal runs when this node cannot apply the log any further (a full or
// failing disk, a wrong-size image). Its image now has a hole, so it must
// neither serve nor lead nor vote: Raft stops here (after handing leadership
// over if it had it); the rest of the cluster carries on, and a restart after
// the operator fixed the cause replays the log over the image.
func (n *Node) onFatal(err error) {
	n.fatal.Store(&err)
	n.gate.setOpen(false)
	n.log.Error("node stopped applying the replicated log: it no longer serves and leaves the cluster's quorum until restarted", "err", err)
	if n.raft == nil {
		return
	}
	if n.raft.State() == raft.Leader {
		n.raft.LeadershipTransfer().Error()
	}
	if serr := n.raft.Shutdown().Error(); serr != nil {
		n.log.Error("raft shutdown after the fatal error failed", "err", serr)
	}
}

func (n *Node) onProgress(p replication.TransferProgress) {
	cp := p
	n.transfer.Store(&cp)
	if p.Done {
		if p.Err != nil {
			n.log.Warn("image transfer failed", "direction", p.Direction.String(), "err", p.Err)
		} else {
			n.log.Info("image transfer done", "direction", p.Direction.String(), "bytes", p.Bytes, "index", p.Index)
		}
	}
}

// Raft exposes the Raft instance (for the admin API and tests).
func (n *Node) Raft() *raft.Raft { return n.raft }

// ID is the node's id.
func (n *Node) ID() string { return n.cfg.NodeID }

// Advertise is the node's Raft and peer address.
func (n *Node) Advertise() string { return n.cfg.RaftAdvertise }

// Run serves until ctx ends: AoE on every interface (answering only while
// this node leads), the peer side of the admin API, and the leadership loop.
func (n *Node) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go n.mux.Serve()
	var wg sync.WaitGroup
	errc := make(chan error, len(n.servers)+1)
	for _, srv := range n.servers {
		wg.Add(1)
		go func(srv *aoe.Server) {
			defer wg.Done()
			if err := srv.Serve(ctx); err != nil {
				errc <- err
				cancel()
			}
		}(srv)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		n.leadershipLoop(ctx)
	}()
	<-ctx.Done()
	wg.Wait()
	close(errc)
	return <-errc
}

// leadershipLoop opens the gates while this node leads and closes them the
// moment it stops.
func (n *Node) leadershipLoop(ctx context.Context) {
	var termCancel context.CancelFunc = func() {}
	defer func() { termCancel() }()
	for {
		select {
		case <-ctx.Done():
			n.gate.setOpen(false)
			return
		case leader := <-n.notify:
			n.changes.Add(1)
			termCancel()
			if !leader {
				n.gate.setOpen(false)
				n.setVirtualMACs(false)
				n.log.Info("leadership lost: targets closed", "term", n.raft.Stats()["term"])
				continue
			}
			tctx, c := context.WithCancel(ctx)
			termCancel = c
			go n.leaderTerm(tctx)
		}
	}
}

// leaderTerm runs while this node leads: catch up, register the exports,
// take the lease, open the gates, announce, keep the lease.
func (n *Node) leaderTerm(ctx context.Context) {
	start := time.Now()
	bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := n.repl.Barrier(bctx)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			n.log.Warn("leader could not apply the committed log; not serving", "err", err)
		}
		return
	}
	if err := n.registerExports(ctx); err != nil {
		if ctx.Err() == nil {
			n.log.Error("exports not registered with the cluster; not serving", "err", err)
		}
		return
	}
	if !n.renewLease() {
		return
	}
	if n.fatal.Load() != nil {
		return
	}
	n.setVirtualMACs(true)
	n.gate.setOpen(true)
	n.log.Info("leadership gained: targets open", "term", n.raft.Stats()["term"], "took", time.Since(start).Round(time.Millisecond))
	n.announceAll()
	lease := n.cfg.LeaderLease.Duration
	renew := time.NewTicker(max(lease/4, 10*time.Millisecond))
	defer renew.Stop()
	// Announce repeatedly over the first second (a lost broadcast must not
	// cost an initiator its retransmit timeout), then now and then.
	announce := time.NewTicker(200 * time.Millisecond)
	defer announce.Stop()
	announced := 1
	for {
		select {
		case <-ctx.Done():
			return
		case <-renew.C:
			n.renewLease()
		case <-announce.C:
			announced++
			n.announceAll()
			if announced == 5 {
				announce.Reset(10 * time.Second)
			}
		}
	}
}

// renewLease confirms leadership with a quorum and extends the lease from
// the moment the confirmation started.
func (n *Node) renewLease() bool {
	start := time.Now()
	if err := n.raft.VerifyLeader().Error(); err != nil {
		return false
	}
	n.gate.renew(start, n.cfg.LeaderLease.Duration)
	return true
}

// registerExports adds this node's exports to the replicated set (a no-op for
// those already there with the same size).
func (n *Node) registerExports(ctx context.Context) error {
	for id, f := range n.disks {
		if info, ok := n.fsm.Target(id); ok {
			if info.Size != f.Size() {
				return fmt.Errorf("export %v: local image is %d bytes but the cluster's is %d: every node must export the same size", id, f.Size(), info.Size)
			}
			continue
		}
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := n.repl.AddTarget(actx, id, f.Size())
		if err == nil {
			err = n.commitConfiguredMasks(actx, id)
		}
		cancel()
		if err != nil {
			return fmt.Errorf("add target %v: %w", id, err)
		}
	}
	return nil
}

// commitConfiguredMasks gives a target that has just entered the replicated
// set the mask list of its [[export]] table. Later the mask list is target
// state like any other (changed through AoE or a SIGHUP on the leader): a
// restart must not overwrite what an initiator set.
func (n *Node) commitConfiguredMasks(ctx context.Context, id replication.TargetID) error {
	for i := range n.cfg.Exports {
		e := &n.cfg.Exports[i]
		if e.Addr() != (aoe.TargetAddr{Shelf: id.Shelf, Slot: id.Slot}) || len(e.Masks) == 0 {
			continue
		}
		masks, err := e.ParseMasks()
		if err != nil {
			return err
		}
		return n.repl.Commit(ctx, id.Shelf, id.Slot, aoe.TargetState{Masks: masks})
	}
	return nil
}

func (n *Node) announceAll() {
	for _, srv := range n.servers {
		for _, t := range srv.Targets() {
			if err := srv.Announce(t); err != nil {
				n.log.Warn("announcement failed", "target", t.Addr().String(), "err", err)
			}
		}
	}
}

// setVirtualMACs makes the interfaces accept (or stop accepting) frames to
// the targets' virtual MACs.
func (n *Node) setVirtualMACs(on bool) {
	for _, srv := range n.servers {
		for _, t := range srv.Targets() {
			mac := n.vmacs[t.Addr()]
			if mac == (aoe.MAC{}) {
				continue
			}
			if err := srv.Conn().AddUnicast(mac, on); err != nil && on {
				n.log.Warn("unicast filter refused the virtual MAC; falling back to promiscuous mode", "mac", mac.String(), "err", err)
				if perr := srv.Conn().SetPromiscuous(true); perr != nil {
					n.log.Error("promiscuous mode refused too: frames to the virtual MAC will not arrive", "err", perr)
				}
			}
		}
	}
}

// Bootstrap forms a new single-node cluster with this node (vbladectl
// cluster init). It fails if the node already has Raft state.
func (n *Node) Bootstrap() error {
	f := n.raft.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{
		Suffrage: raft.Voter,
		ID:       raft.ServerID(n.cfg.NodeID),
		Address:  raft.ServerAddress(n.cfg.RaftAdvertise),
	}}})
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrCantBootstrap) {
			return fmt.Errorf("this node already belongs to a cluster (Raft state in %s); remove it to start over", n.cfg.DataDir)
		}
		return fmt.Errorf("bootstrap: %w", err)
	}
	return nil
}

// Shutdown stops Raft and closes everything. On a leader it hands
// leadership over first so the initiator sees no stall.
func (n *Node) Shutdown(transfer bool) error {
	var err error
	n.stopOnce.Do(func() {
		if transfer && n.raft != nil && n.raft.State() == raft.Leader && n.peerCount() > 0 {
			n.gate.setOpen(false)
			if terr := n.raft.LeadershipTransfer().Error(); terr != nil {
				n.log.Warn("leadership transfer before shutdown failed", "err", terr)
			}
		}
		err = n.closeAll()
	})
	return err
}

func (n *Node) peerCount() int {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return 0
	}
	return len(f.Configuration().Servers) - 1
}

func (n *Node) closeAll() error {
	n.gate.setOpen(false)
	var errs error
	if n.raft != nil {
		errs = errors.Join(errs, n.raft.Shutdown().Error())
	}
	if n.mux != nil {
		n.mux.Close()
	}
	if n.trans != nil {
		n.trans.Close()
	}
	for _, s := range n.servers {
		s.Close()
	}
	if n.bolt != nil {
		errs = errors.Join(errs, n.bolt.Close())
	}
	for _, f := range n.disks {
		errs = errors.Join(errs, f.Close())
	}
	return errs
}

// newHCLogger routes hashicorp/raft's logging into slog.
func newHCLogger(log *slog.Logger) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       "raft",
		Output:     hlogWriter{log},
		Level:      hclog.Info,
		JSONFormat: false,
		// slog adds its own time and level.
		DisableTime: true,
	})
}

// hlogWriter turns each line hclog writes into one slog record.
type hlogWriter struct{ log *slog.Logger }

func (w hlogWriter) Write(p []byte) (int, error) {
	line := string(p)
	for len(line) > 0 && (line[len(line)-1] == '\n' || line[len(line)-1] == ' ') {
		line = line[:len(line)-1]
	}
	level := slog.LevelInfo
	switch {
	case strings.Contains(line, "[ERROR]"):
		level = slog.LevelError
	case strings.Contains(line, "[WARN]"):
		level = slog.LevelWarn
	case strings.Contains(line, "[DEBUG]"), strings.Contains(line, "[TRACE]"):
		level = slog.LevelDebug
	}
	w.log.Log(context.Background(), level, line, "component", "raft")
	return len(p), nil
}

var _ io.Writer = hlogWriter{}

// openRaftLog opens (or creates) the bolt file that holds a node's Raft log
// and stable state.
func openRaftLog(path string) (*raftboltdb.BoltStore, error) {
	return raftboltdb.New(raftboltdb.Options{Path: path, BoltOptions: &bbolt.Options{
		// bolt locks the file; without a timeout a second node on the
		// same data_dir would hang instead of failing with the hint below.
		Timeout: 2 * time.Second,
		// The free-page list is rebuilt by a scan at open instead of
		// being written at every commit: once the log has been compacted
		// it spans many pages, and each commit (one per Raft round, on
		// the leader and on every follower) would rewrite them all (etcd
		// and Consul run bolt the same way).
		NoFreelistSync: true,
		FreelistType:   bbolt.FreelistMapType,
	}})
}
