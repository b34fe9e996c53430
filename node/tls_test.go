package node

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
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
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/internal/netlab"
	"github.com/vblade-ha/vblade-ha/replication"
)

// testPKI is a cluster's TLS material in a temporary directory.
type testPKI struct {
	t     *testing.T
	dir   string
	ca    *CA
	token string
}

func newTestPKI(t *testing.T, name string) *testPKI {
	t.Helper()
	ca, err := NewCA(name, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := NewJoinToken()
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{t: t, dir: t.TempDir(), ca: ca, token: tok}
}

// files issues a certificate for id naming 127.0.0.1 and writes the node's
// four files (fresh paths per node, so rotation can replace them).
func (p *testPKI) files(id string) (cert, key, ca, token string) {
	p.t.Helper()
	d := filepath.Join(p.dir, id)
	if err := os.MkdirAll(d, 0o700); err != nil {
		p.t.Fatal(err)
	}
	cert, key, ca, token = filepath.Join(d, "node.crt"), filepath.Join(d, "node.key"), filepath.Join(d, "ca.crt"), filepath.Join(d, "token")
	p.issue(p.ca, id, cert, key)
	writeFile(p.t, ca, p.ca.PEM)
	writeFile(p.t, token, []byte(p.token+"\n"))
	return
}

func (p *testPKI) issue(ca *CA, id, cert, key string) {
	p.t.Helper()
	cp, kp, err := ca.IssueNode(id, []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		p.t.Fatal(err)
	}
	// Key first, each file replaced atomically, as an operator's tooling
	// (or `vbladectl cluster certs --force`) does.
	if err := writeNew(key, kp, 0o600, true); err != nil {
		p.t.Fatal(err)
	}
	if err := writeNew(cert, cp, 0o644, true); err != nil {
		p.t.Fatal(err)
	}
}

// apply configures cfg for mutual TLS with this PKI.
func (p *testPKI) apply(cfg *Config) {
	cfg.TLSCert, cfg.TLSKey, cfg.TLSCA, cfg.JoinTokenFile = p.files(cfg.NodeID)
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := writeNew(path, data, 0o600, true); err != nil {
		t.Fatal(err)
	}
}

// startNode is startTestNode with a configuration hook (TLS, tokens).
func startNode(t *testing.T, netif, id string, size int64, mutate func(*Config)) *testNode {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := &Config{
		NodeID:      id,
		DataDir:     filepath.Join(dir, "data"),
		RaftAddr:    freeAddr(t),
		AdminSocket: filepath.Join(dir, "run", "admin.sock"),
		Exports:     []Export{{Shelf: testShelf, Slot: testSlot, Netif: netif, Path: img, BufCount: 16}},
	}
	mutate(cfg)
	logPath := filepath.Join(dir, "node.log")
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	n, err := NewNode(cfg, slog.New(slog.NewTextHandler(lf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		lf.Close()
		t.Fatalf("%s: NewNode: %v", id, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runDone, adminDone := make(chan error, 1), make(chan error, 1)
	go func() { runDone <- n.Run(ctx) }()
	go func() { adminDone <- n.ServeAdmin(ctx) }()
	tn := &testNode{n: n, c: NewAdminClient(cfg.AdminSocket), logPath: logPath}
	t.Cleanup(func() {
		cancel()
		<-adminDone
		<-runDone
		n.Shutdown(false)
		lf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			t.Logf("%s: last log lines:\n%s", id, strings.Join(lines[max(0, len(lines)-25):], "\n"))
		}
	})
	waitFor(t, 10*time.Second, id+" admin socket answers", func() (bool, string) {
		_, err := tn.c.Status(context.Background())
		return err == nil, fmt.Sprint(err)
	})
	return tn
}

func initLeader(t *testing.T, tn *testNode) {
	t.Helper()
	if err := tn.c.Init(ctxT(t, 10*time.Second)); err != nil {
		t.Fatalf("init: %v", err)
	}
	waitFor(t, 15*time.Second, tn.n.ID()+" leads and serves", func() (bool, string) {
		s, err := tn.c.Status(context.Background())
		if err != nil {
			return false, err.Error()
		}
		return s.State == "leader" && len(s.Targets) == 1 && s.Targets[0].Serving, fmt.Sprintf("%+v", s)
	})
}

func logContains(t *testing.T, tn *testNode, s string) bool {
	b, _ := os.ReadFile(tn.logPath)
	return bytes.Contains(b, []byte(s))
}

// clientTLS builds a client configuration from PEM material, for raw dials.
func clientTLS(t *testing.T, certPEM, keyPEM []byte, roots *CA) *tls.Config {
	t.Helper()
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(roots.Cert)
	// GetClientCertificate, not Certificates: Go's client would otherwise
	// withhold a certificate the server's CA list does not cover, and the
	// test wants the server to see (and refuse) it, as a node's dialer does.
	return &tls.Config{MinVersion: tls.VersionTLS13, ServerName: "127.0.0.1", RootCAs: pool,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &pair, nil }}
}

// probeTLS dials addr with cfg, sends the admin protocol byte and a status
// request, and returns the server's leaf certificate and the answer.
func probeTLS(addr string, cfg *tls.Config) (*x509.Certificate, []byte, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return nil, nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	leaf := c.ConnectionState().PeerCertificates[0]
	if _, err := c.Write([]byte("AGET /v1/status HTTP/1.0\r\nHost: x\r\n\r\n")); err != nil {
		return leaf, nil, err
	}
	b, err := io.ReadAll(c)
	if len(b) > 0 {
		err = nil
	}
	return leaf, b, err
}

func TestConfigRequiresTLS(t *testing.T) {
	base := func() *Config {
		return &Config{NodeID: "n1", DataDir: "/tmp/x", RaftAddr: "127.0.0.1:7000",
			Exports: []Export{{Shelf: 1, Netif: "x", Path: "/x", BufCount: 16}}}
	}
	c := base()
	c.ApplyClusterDefaults()
	err := c.ValidateCluster()
	if err == nil || !strings.Contains(err.Error(), "vbladectl cluster certs") || !strings.Contains(err.Error(), "insecure = true") {
		t.Fatalf("no TLS: want an error naming the fix, got %v", err)
	}
	c.Insecure = true
	if err := c.ValidateCluster(); err != nil {
		t.Fatalf("insecure: %v", err)
	}
	c.TLSCert = "/x.crt"
	if err := c.ValidateCluster(); err == nil {
		t.Fatal("insecure with tls_cert accepted")
	}
	c = base()
	c.TLSCert, c.TLSKey, c.TLSCA, c.JoinTokenFile = "a", "b", "c", "d"
	c.ApplyClusterDefaults()
	if err := c.ValidateCluster(); err != nil {
		t.Fatalf("TLS keys set: %v", err)
	}
}

// A certificate that does not name raft_advertise stops the node at start
// with a message saying how to fix it.
func TestTLSCertMustNameAdvertiseHost(t *testing.T) {
	p := newTestPKI(t, "a")
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "n.crt"), filepath.Join(dir, "n.key")
	cp, kp, err := p.ca.IssueNode("n1", []string{"10.9.9.9"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, cert, cp)
	writeFile(t, key, kp)
	r, err := NewTLSReloader(TLSFiles{Cert: cert, Key: key, CA: writeTemp(t, p.ca.PEM)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := r.Leaf()
	if err := checkCertNamesHost(leaf, "127.0.0.1"); err == nil || !strings.Contains(err.Error(), "--hosts 127.0.0.1") {
		t.Fatalf("want a reissue hint, got %v", err)
	}
	// A certificate from another CA than tls_ca is refused at load.
	other := newTestPKI(t, "b")
	if _, err := NewTLSReloader(TLSFiles{Cert: cert, Key: key, CA: writeTemp(t, other.ca.PEM)}, nil); err == nil || !strings.Contains(err.Error(), "not valid under tls_ca") {
		t.Fatalf("cert from another CA: got %v", err)
	}
}

func writeTemp(t *testing.T, data []byte) string {
	p := filepath.Join(t.TempDir(), "f")
	writeFile(t, p, data)
	return p
}

// TestTLSForeignCARefused: a node whose certificate comes from another CA
// cannot join, and its connections end in the TLS handshake.
func TestTLSForeignCARefused(t *testing.T) {
	lan := netlab.New(t, netlab.Options{RootPorts: 2})
	const size = 1 << 20
	good, evil := newTestPKI(t, "good"), newTestPKI(t, "evil")
	n1 := startNode(t, lan.Root[0].Name, "n1", size, good.apply)
	initLeader(t, n1)

	// The intruder even knows the join token and trusts the cluster's CA:
	// only its own certificate is wrong.
	n2 := startNode(t, lan.Root[1].Name, "n2", size, func(c *Config) {
		evil.token = good.token
		evil.apply(c)
		writeFile(t, c.TLSCA, append(append([]byte{}, evil.ca.PEM...), good.ca.PEM...))
	})
	_, err := n2.c.Join(ctxT(t, 20*time.Second), n1.n.Advertise())
	if err == nil {
		t.Fatal("node with a foreign certificate joined")
	}
	t.Logf("join error: %v", err)
	if !strings.Contains(err.Error(), "TLS handshake") && !strings.Contains(err.Error(), "certificate") {
		t.Errorf("join error does not point at TLS: %v", err)
	}

	// A raw client with a foreign certificate that trusts the good CA: the
	// server refuses it; not a byte of the admin API or Raft comes back.
	cp, kp, err := evil.ca.IssueNode("n2", []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	_, answer, err := probeTLS(n1.n.Advertise(), clientTLS(t, cp, kp, good.ca))
	if err == nil || len(answer) > 0 {
		t.Fatalf("foreign client certificate: err=%v answer=%q", err, answer)
	}
	t.Logf("foreign client refused: %v", err)
	// A good certificate gets the answer (the probe itself works).
	cp, kp, _ = good.ca.IssueNode("probe", nil, time.Hour)
	if _, answer, err := probeTLS(n1.n.Advertise(), clientTLS(t, cp, kp, good.ca)); err != nil || !bytes.Contains(answer, []byte(`"id": "n1"`)) {
		t.Fatalf("good client: err=%v answer=%.200q", err, answer)
	}
	waitFor(t, 5*time.Second, "n1 logs the refused handshake", func() (bool, string) {
		return logContains(t, n1, "TLS handshake failed"), ""
	})
	if cs := clusterView(t, n1); len(cs.Nodes) != 1 {
		t.Fatalf("cluster changed: %+v", cs)
	}
}

// TestJoinTokenRefused: a valid certificate with a wrong token is refused
// with a clear error; with the right token (the file fixed, no restart) the
// same node joins.
func TestJoinTokenRefused(t *testing.T) {
	lan := netlab.New(t, netlab.Options{RootPorts: 2})
	const size = 1 << 20
	p := newTestPKI(t, "c")
	n1 := startNode(t, lan.Root[0].Name, "n1", size, p.apply)
	initLeader(t, n1)
	var tokPath string
	n2 := startNode(t, lan.Root[1].Name, "n2", size, func(c *Config) {
		p.apply(c)
		tokPath = c.JoinTokenFile
		writeFile(t, tokPath, []byte("wrong-token-0123456789\n"))
	})
	_, err := n2.c.Join(ctxT(t, 20*time.Second), n1.n.Advertise())
	wantErr(t, "wrong join token", err, "join token does not match", "join_token_file")
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != 403 {
		t.Errorf("wrong token: want status 403, got %v", err)
	}
	if cs := clusterView(t, n1); len(cs.Nodes) != 1 {
		t.Fatalf("cluster changed by a refused join: %+v", cs)
	}
	writeFile(t, tokPath, []byte(p.token+"\n"))
	joinAndWait(t, n2, n1.n.Advertise())
	waitFor(t, 20*time.Second, "n2 promoted to voter", func() (bool, string) {
		cs := clusterView(t, n1)
		for _, m := range cs.Nodes {
			if m.ID == "n2" {
				return m.Suffrage == "voter", fmt.Sprintf("%+v", m)
			}
		}
		return false, "n2 not a member"
	})
}

// TestPlainTCPGetsNothing: a client that speaks the mux protocol without
// TLS is closed without an answer, for Raft and for the admin API.
func TestPlainTCPGetsNothing(t *testing.T) {
	lan := netlab.New(t, netlab.Options{RootPorts: 1})
	p := newTestPKI(t, "d")
	n1 := startNode(t, lan.Root[0].Name, "n1", 1<<20, p.apply)
	initLeader(t, n1)
	probes := map[string][]byte{
		// 'R', then rpcType 0 (AppendEntries) and a msgpack map: what a
		// plain Raft transport would send first.
		"raft":  append([]byte{'R', 0, 0x85}, bytes.Repeat([]byte{0xa4, 'T', 'e', 'r', 'm', 0x01}, 5)...),
		"admin": []byte("AGET /v1/status HTTP/1.0\r\n\r\n"),
		"vote":  append([]byte{'R', 1, 0x82}, bytes.Repeat([]byte{0xa4, 'T', 'e', 'r', 'm', 0x01}, 2)...),
	}
	for name, msg := range probes {
		c, err := net.DialTimeout("tcp", n1.n.Advertise(), 3*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(8 * time.Second))
		c.Write(msg)
		b, err := io.ReadAll(c)
		c.Close()
		if len(b) > 0 {
			t.Errorf("%s over plain TCP: got %d bytes back (%.40q); want the connection closed with nothing", name, len(b), b)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			// The server's own handshake deadline is 5 s; 8 s means it
			// kept the connection.
			t.Errorf("%s over plain TCP: connection held open until the deadline; want it closed", name)
		}
	}
	if st := n1.n.raft.State().String(); st != "Leader" {
		t.Errorf("n1 is %s after the probes", st)
	}
}

// TestTLSRotation replaces node certificates and then the CA while the
// cluster serves writes: no leadership change, no failed write, and new
// connections (a node joining afterwards) use the new material.
func TestTLSRotation(t *testing.T) {
	lan := netlab.New(t, netlab.Options{RootPorts: 3})
	const size = 2 << 20
	p := newTestPKI(t, "rot")
	paths := map[string][4]string{}
	var mu sync.Mutex
	mk := func(c *Config) {
		p.apply(c)
		mu.Lock()
		paths[c.NodeID] = [4]string{c.TLSCert, c.TLSKey, c.TLSCA, c.JoinTokenFile}
		mu.Unlock()
	}
	n1 := startNode(t, lan.Root[0].Name, "n1", size, mk)
	n2 := startNode(t, lan.Root[1].Name, "n2", size, mk)
	initLeader(t, n1)
	joinAndWait(t, n2, n1.n.Advertise())

	// Workload: replicated writes through the leader for the whole test.
	st, err := n1.n.repl.Store(replication.TargetID{Shelf: testShelf, Slot: testSlot})
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var writes, failures atomic.Int64
	var firstErr atomic.Pointer[error]
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			buf[0] = byte(i)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := st.WriteAt(ctx, buf, int64(i%256)*4096)
			cancel()
			if err != nil {
				failures.Add(1)
				firstErr.CompareAndSwap(nil, &err)
			} else {
				writes.Add(1)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	changes0 := n1.n.changes.Load()
	serverSerial := func(client *tls.Config) string {
		t.Helper()
		leaf, _, err := probeTLS(n1.n.Advertise(), client)
		if err != nil {
			t.Fatalf("probe: %v", err)
		}
		return leaf.SerialNumber.Text(16)
	}
	probeCert := func(ca *CA, roots *CA) *tls.Config {
		cp, kp, err := ca.IssueNode("probe", nil, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return clientTLS(t, cp, kp, roots)
	}
	before := serverSerial(probeCert(p.ca, p.ca))

	// Step 1: new node certificates from the same CA.
	for _, id := range []string{"n1", "n2"} {
		p.issue(p.ca, id, paths[id][0], paths[id][1])
	}
	time.Sleep(300 * time.Millisecond)
	if after := serverSerial(probeCert(p.ca, p.ca)); after == before {
		t.Fatalf("n1 still presents certificate %s after its file was replaced", before)
	}

	// Step 2: CA rotation. Trust old and new, move the nodes to the new
	// CA, then drop the old one.
	ca2, err := NewCA("rot2", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	bundle := append(append([]byte{}, p.ca.PEM...), ca2.PEM...)
	for _, id := range []string{"n1", "n2"} {
		writeFile(t, paths[id][2], bundle)
	}
	time.Sleep(200 * time.Millisecond)
	for _, id := range []string{"n1", "n2"} {
		p.issue(ca2, id, paths[id][0], paths[id][1])
	}
	time.Sleep(200 * time.Millisecond)
	for _, id := range []string{"n1", "n2"} {
		writeFile(t, paths[id][2], ca2.PEM)
	}
	oldCA := p.ca
	p.ca = ca2 // n3 gets its certificate from the new CA
	time.Sleep(300 * time.Millisecond)
	if _, _, err := probeTLS(n1.n.Advertise(), probeCert(oldCA, ca2)); err == nil {
		t.Error("a client certificate from the removed CA is still accepted")
	}
	if _, answer, err := probeTLS(n1.n.Advertise(), probeCert(ca2, ca2)); err != nil || len(answer) == 0 {
		t.Errorf("new CA client refused: %v", err)
	}

	// New connections both ways with the new material: n3 joins.
	n3 := startNode(t, lan.Root[2].Name, "n3", size, mk)
	joinAndWait(t, n3, n2.n.Advertise())
	time.Sleep(500 * time.Millisecond)
	close(stop)
	<-done
	if f := failures.Load(); f > 0 {
		t.Errorf("%d of %d writes failed during rotation (first: %v)", f, f+writes.Load(), *firstErr.Load())
	}
	if writes.Load() < 50 {
		t.Errorf("only %d writes completed during rotation", writes.Load())
	}
	if c := n1.n.changes.Load(); c != changes0 || n1.n.raft.State().String() != "Leader" {
		t.Errorf("leadership changed during rotation (%d changes, n1 is %s)", c-changes0, n1.n.raft.State())
	}
	if !logContains(t, n1, "TLS certificate reloaded") {
		t.Error("n1 did not log the reload")
	}
	t.Logf("rotation: %d writes, 0 failures, n1 kept leadership", writes.Load())
	verifyOK(t, n3)
}

// A half-replaced pair (new certificate, old key) keeps the previous
// material instead of failing handshakes.
func TestTLSReloaderKeepsLastGood(t *testing.T) {
	p := newTestPKI(t, "h")
	cert, key, ca, _ := p.files("n1")
	r, err := NewTLSReloader(TLSFiles{Cert: cert, Key: key, CA: ca}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	leaf0, _ := r.Leaf()
	cp, _, err := p.ca.IssueNode("n1", []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, cert, cp)
	leaf1, err := r.Leaf()
	if err != nil || leaf1.SerialNumber.Cmp(leaf0.SerialNumber) != 0 {
		t.Fatalf("half-rotated pair: err=%v, serial changed=%v", err, leaf1 != nil && leaf1.SerialNumber.Cmp(leaf0.SerialNumber) != 0)
	}
	p.issue(p.ca, "n1", cert, key)
	leaf2, _ := r.Leaf()
	if leaf2.SerialNumber.Cmp(leaf0.SerialNumber) == 0 {
		t.Fatal("complete new pair not picked up")
	}
}

func TestGenerateCerts(t *testing.T) {
	dir := t.TempDir()
	res, err := GenerateCerts(CertsOptions{Dir: dir, Nodes: []string{"n1", "n2"}, Hosts: []string{"10.0.0.1", "10.0.0.2+n2.example"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Written) != 7 {
		t.Fatalf("wrote %v", res.Written)
	}
	for _, f := range []string{CAKeyFile, JoinTokenFile, "n1.key"} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v mode %v, want 0600", f, err, fi.Mode().Perm())
		}
	}
	r, err := NewTLSReloader(TLSFiles{Cert: filepath.Join(dir, "n2.crt"), Key: filepath.Join(dir, "n2.key"), CA: filepath.Join(dir, CAFile)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := r.Leaf()
	for _, h := range []string{"10.0.0.2", "n2.example", "n2"} {
		if err := checkCertNamesHost(leaf, h); err != nil {
			t.Error(err)
		}
	}
	// Adding a node reuses the CA and token; an existing node needs --force.
	res, err = GenerateCerts(CertsOptions{Dir: dir, Nodes: []string{"n3"}})
	if err != nil || !res.ReusedCA || !res.ReusedTok {
		t.Fatalf("add n3: %+v %v", res, err)
	}
	if _, err := GenerateCerts(CertsOptions{Dir: dir, Nodes: []string{"n1"}}); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("reissue without force: %v", err)
	}
	if _, err := GenerateCerts(CertsOptions{Dir: dir, Nodes: []string{"n1"}, Force: true}); err != nil {
		t.Fatal(err)
	}
	if !tokenEqual("abc", "abc") || tokenEqual("abc", "abd") || tokenEqual("", "") {
		t.Error("tokenEqual")
	}
}
