package node

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/internal/netlab"
	"github.com/vblade-ha/vblade-ha/replication"
)

// The admin tests run real Nodes in-process. A Node opens AF_PACKET
// sockets on its export's interface, so every node gets a root-namespace
// veth of a private netlab bridge (never eth0); Raft and the admin API run
// on 127.0.0.1.

const (
	testShelf = 7
	testSlot  = 0
)

type testNode struct {
	n       *Node
	c       *AdminClient
	logPath string
}

// freeAddr returns a 127.0.0.1 port nobody listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// startTestNode starts a node with one export of size bytes on netif
// (random content when random is set, zeros otherwise) and serves its admin
// API; cleanup stops it.
func startTestNode(t *testing.T, netif, id string, size int64, random bool) *testNode {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	data := make([]byte, size)
	if random {
		rand.Read(data)
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatalf("%s: write image: %v", id, err)
	}
	cfg := &Config{
		NodeID:      id,
		DataDir:     filepath.Join(dir, "data"),
		RaftAddr:    freeAddr(t),
		AdminSocket: filepath.Join(dir, "run", "admin.sock"),
		Exports:     []Export{{Shelf: testShelf, Slot: testSlot, Netif: netif, Path: img, BufCount: 16}},
		// Raft on loopback inside the test: TLS is covered by tls_test.go.
		Insecure: true,
	}
	logPath := filepath.Join(dir, "node.log")
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(lf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	n, err := NewNode(cfg, log)
	if err != nil {
		lf.Close()
		t.Fatalf("%s: NewNode: %v", id, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan error, 1)
	adminDone := make(chan error, 1)
	go func() { runDone <- n.Run(ctx) }()
	go func() { adminDone <- n.ServeAdmin(ctx) }()
	tn := &testNode{n: n, c: NewAdminClient(cfg.AdminSocket), logPath: logPath}
	t.Cleanup(func() {
		cancel()
		if err := <-adminDone; err != nil {
			t.Errorf("%s: ServeAdmin: %v", id, err)
		}
		<-runDone
		n.Shutdown(false)
		lf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			t.Logf("%s: last log lines:\n%s", id, strings.Join(lines[max(0, len(lines)-30):], "\n"))
		}
	})
	// The socket exists once ServeAdmin listens.
	waitFor(t, 10*time.Second, id+" admin socket answers", func() (bool, string) {
		_, err := tn.c.Status(context.Background())
		return err == nil, fmt.Sprint(err)
	})
	return tn
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	var last string
	for {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s (last: %s)", d, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// writeThroughCluster writes random blocks through the leader's replicated
// store, so the log holds entries after the image snapshot.
func writeThroughCluster(t *testing.T, leader *testNode, blocks int) {
	t.Helper()
	st, err := leader.n.repl.Store(replication.TargetID{Shelf: testShelf, Slot: testSlot})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for i := 0; i < blocks; i++ {
		rand.Read(buf)
		off := int64(i*7919%((int(st.Size())-len(buf))/512)) * 512
		if err := st.WriteAt(ctxT(t, 10*time.Second), buf, off); err != nil {
			t.Fatalf("replicated write %d at %d: %v", i, off, err)
		}
	}
}

func joinAndWait(t *testing.T, tn *testNode, addr string) {
	t.Helper()
	ctx := ctxT(t, 2*time.Minute)
	res, err := tn.c.Join(ctx, addr)
	if err != nil {
		t.Fatalf("%s: join via %s: %v", tn.n.ID(), addr, err)
	}
	s, err := tn.c.WaitCaughtUp(ctx, res.CommitIndex, 50*time.Millisecond, nil)
	if err != nil {
		t.Fatalf("%s: catch up after join: %v", tn.n.ID(), err)
	}
	if s.Transfer == nil || s.Transfer.Direction != "receiving" || !s.Transfer.Done || s.Transfer.Error != "" {
		t.Errorf("%s: expected a completed full-image transfer after join, got %+v", tn.n.ID(), s.Transfer)
	}
}

func clusterView(t *testing.T, tn *testNode) *ClusterStatus {
	t.Helper()
	cs, err := tn.c.Cluster(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatalf("cluster status via %s: %v", tn.n.ID(), err)
	}
	return cs
}

func TestAdminClusterLifecycle(t *testing.T) {
	lan := netlab.New(t, netlab.Options{RootPorts: 5})
	const size = 4 << 20
	n1 := startTestNode(t, lan.Root[0].Name, "n1", size, true)
	n2 := startTestNode(t, lan.Root[1].Name, "n2", size, false)
	n3 := startTestNode(t, lan.Root[2].Name, "n3", size, false)

	// Before init: not in a cluster, said plainly.
	if cs := clusterView(t, n1); cs.InCluster || !strings.Contains(cs.Message, "not in a cluster") {
		t.Fatalf("status before init: %+v", cs)
	}
	if err := n1.c.Init(ctxT(t, 10*time.Second)); err != nil {
		t.Fatalf("init: %v", err)
	}
	if err := n1.c.Init(ctxT(t, 10*time.Second)); err == nil || !strings.Contains(err.Error(), "already belongs") {
		t.Fatalf("second init: want 'already belongs' error, got %v", err)
	}
	waitFor(t, 15*time.Second, "n1 leads and serves", func() (bool, string) {
		s, err := n1.c.Status(context.Background())
		if err != nil {
			return false, err.Error()
		}
		return s.State == "leader" && len(s.Targets) == 1 && s.Targets[0].Serving, fmt.Sprintf("%+v", s)
	})
	writeThroughCluster(t, n1, 20)

	joinAndWait(t, n2, n1.n.Advertise())
	writeThroughCluster(t, n1, 20)
	// n3 joins through a follower, which forwards to the leader.
	joinAndWait(t, n3, n2.n.Advertise())

	waitFor(t, 15*time.Second, "3 reachable nodes, one leader, no lag", func() (bool, string) {
		cs := clusterView(t, n3)
		leaders := 0
		for _, m := range cs.Nodes {
			if m.Role == "leader" {
				leaders++
			}
			if !m.Reachable || m.Lag != 0 {
				return false, fmt.Sprintf("%+v", cs)
			}
		}
		ok := cs.InCluster && len(cs.Nodes) == 3 && leaders == 1 && cs.Leader == "n1" &&
			len(cs.Targets) == 1 && cs.Targets[0].Node == "n1" && cs.Targets[0].MAC != ""
		return ok, fmt.Sprintf("%+v", cs)
	})
	vmac := clusterView(t, n1).Targets[0].MAC

	verifyOK(t, n2)

	// Planned switchover to n2.
	res, err := n3.c.Transfer(ctxT(t, 20*time.Second), "n2")
	if err != nil {
		t.Fatalf("transfer to n2: %v", err)
	}
	if res.LeaderID != "n2" {
		t.Fatalf("transfer to n2: new leader %q", res.LeaderID)
	}
	waitFor(t, 15*time.Second, "n2 serves the target at the same virtual MAC", func() (bool, string) {
		cs := clusterView(t, n1)
		return cs.Leader == "n2" && len(cs.Targets) == 1 && cs.Targets[0].Node == "n2" && cs.Targets[0].MAC == vmac, fmt.Sprintf("%+v", cs)
	})
	if _, err := n2.c.Transfer(ctxT(t, 10*time.Second), "nope"); err == nil || !strings.Contains(err.Error(), `no member with id "nope"`) {
		t.Fatalf("transfer to unknown id: %v", err)
	}
	writeThroughCluster(t, n2, 20)

	// n3 leaves.
	if err := n3.c.Leave(ctxT(t, 30*time.Second)); err != nil {
		t.Fatalf("n3 leave: %v", err)
	}
	waitFor(t, 15*time.Second, "2 nodes after n3 left", func() (bool, string) {
		cs := clusterView(t, n1)
		return len(cs.Nodes) == 2 && cs.Leader == "n2", fmt.Sprintf("%+v", cs)
	})
	verifyOK(t, n1)

	// Bad joins: each fails with a message naming the problem.
	wrong := startTestNode(t, lan.Root[3].Name, "n4", size+512*8, false)
	_, err = wrong.c.Join(ctxT(t, 30*time.Second), n1.n.Advertise())
	wantErr(t, "mismatched export size", err, fmt.Sprintf("e%d.%d", testShelf, testSlot), fmt.Sprint(size+512*8), fmt.Sprint(size))

	dup := startTestNode(t, lan.Root[4].Name, "n1", size, false)
	_, err = dup.c.Join(ctxT(t, 30*time.Second), n2.n.Advertise())
	wantErr(t, "duplicate node id", err, `node id "n1" is already used`, n1.n.Advertise())

	start := time.Now()
	_, err = wrong.c.Join(ctxT(t, 30*time.Second), freeAddr(t))
	wantErr(t, "unreachable join address", err, "unreachable", "is `vblade node` running there")
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("join to an unreachable address took %v; want a fast failure", d)
	}
	// Nothing of the above changed the cluster.
	if cs := clusterView(t, n2); len(cs.Nodes) != 2 {
		t.Fatalf("cluster changed by failed joins: %+v", cs)
	}
}

func verifyOK(t *testing.T, via *testNode) {
	t.Helper()
	v, err := via.c.Verify(ctxT(t, time.Minute))
	if err != nil {
		t.Fatalf("verify via %s: %v", via.n.ID(), err)
	}
	if !v.OK {
		t.Fatalf("verify via %s: not OK: %+v", via.n.ID(), v)
	}
	for _, nd := range v.Nodes {
		if nd.Error != "" || len(nd.Targets) != 1 || !nd.Targets[0].Match {
			t.Fatalf("verify: node %s: %+v", nd.ID, nd)
		}
	}
}

func wantErr(t *testing.T, what string, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: want an error, got none", what)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("%s: error %q does not mention %q", what, err, p)
		}
	}
	var ae *APIError
	if errors.As(err, &ae) && ae.Status < 400 {
		t.Fatalf("%s: status %d", what, ae.Status)
	}
}

// The decoders are what the network reaches first; they must refuse
// unknown fields, trailing data and oversized bodies.
func TestAdminDecodeStrict(t *testing.T) {
	cases := []struct {
		name, body string
		ok         bool
	}{
		{"join ok", `{"address":"10.0.0.1:7000"}`, true},
		{"join unknown field", `{"address":"10.0.0.1:7000","x":1}`, false},
		{"join trailing", `{"address":"10.0.0.1:7000"} {}`, false},
		{"join no port", `{"address":"10.0.0.1"}`, false},
		{"join empty", ``, false},
		{"join huge", `{"address":"` + strings.Repeat("a", maxRequestBody) + `"}`, false},
	}
	for _, c := range cases {
		_, err := decodeJoinRequest(strings.NewReader(c.body))
		if (err == nil) != c.ok {
			t.Errorf("%s: err=%v, want ok=%v", c.name, err, c.ok)
		}
	}
	peer := []struct {
		name, body string
		ok         bool
	}{
		{"ok", `{"id":"n2","address":"h:1","exports":[{"shelf":1,"slot":0,"size":1024}]}`, true},
		{"bad size", `{"id":"n2","address":"h:1","exports":[{"shelf":1,"slot":0,"size":1000}]}`, false},
		{"dup export", `{"id":"n2","address":"h:1","exports":[{"shelf":1,"slot":0,"size":512},{"shelf":1,"slot":0,"size":512}]}`, false},
		{"space in id", `{"id":"n 2","address":"h:1"}`, false},
		{"broadcast", `{"id":"n2","address":"h:1","exports":[{"shelf":65535,"slot":0,"size":512}]}`, false},
	}
	for _, c := range peer {
		_, err := decodePeerJoinRequest(strings.NewReader(c.body))
		if (err == nil) != c.ok {
			t.Errorf("peer join %s: err=%v, want ok=%v", c.name, err, c.ok)
		}
	}
	if err := decodeEmpty(strings.NewReader(`{"a":1}`)); err == nil {
		t.Error("empty request with a field accepted")
	}
}
