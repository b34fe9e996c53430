package node

// Peer authentication: mutual TLS on the node port.
//
// Threat model. AoE itself is unauthenticated layer 2: whoever is on the
// storage LAN can send frames to a target, and mask lists and reservations
// are the only controls there. The node port (raft_addr) is different: it
// carries Raft (votes, log entries that become disk writes, snapshots that
// replace whole images) and the node-to-node admin API (join, remove,
// transfer). Anyone who can speak it can rewrite every disk of the cluster.
// So by default every connection to it is TLS 1.3 with a client certificate
// that must chain to the cluster CA (tls_ca); the handshake happens before
// the mux reads its protocol byte, so a peer without such a certificate
// never reaches Raft or the admin API. Joining additionally needs the join
// token (join_token_file), so a stolen-but-valid certificate alone does not
// let a new machine into the cluster's membership.
//
// Server name. Raft dials peers by their raft_advertise address and knows
// nothing else, so the name a dialer verifies is the host part of that
// address: every node certificate must carry its node's raft_advertise host
// as an IP or DNS SAN (`vbladectl cluster certs --hosts` does that). The
// certificate also carries the node id as its common name and a DNS SAN, for
// logs and for operators.
//
// Rotation. The certificate, key and CA files are re-read on a handshake
// whenever their size, mtime or inode changed, so replacing them (cert and
// key, or a CA bundle that holds the old and the new CA during a CA change)
// takes effect for the next connection without a restart; connections
// already open keep working. A half-replaced pair (new cert, old key) is
// refused and the last good one kept until both are in place.

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// TLSFiles names a node's TLS material.
type TLSFiles struct {
	Cert string // PEM certificate (chain), leaf first
	Key  string // PEM private key of the leaf
	CA   string // PEM bundle of CA certificates peers must chain to
}

// fileStamp identifies one version of a file without reading it.
type fileStamp struct {
	size  int64
	mtime time.Time
	ino   uint64
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	s := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino = st.Ino
	}
	return s, nil
}

// tlsMaterial is one loaded version of the files.
type tlsMaterial struct {
	cert *tls.Certificate
	pool *x509.CertPool
}

// TLSReloader serves a node's certificate and CA pool, re-reading the files
// when they change (see the rotation note above).
type TLSReloader struct {
	files TLSFiles
	log   *slog.Logger

	mu     sync.Mutex
	stamps [3]fileStamp
	cur    *tlsMaterial
	// lastErr is the last reload failure reported, so a half-rotated pair
	// is logged once and not on every handshake.
	lastErr string
}

// NewTLSReloader loads the files once; an error here says which file is
// wrong and how to make a good one.
func NewTLSReloader(files TLSFiles, log *slog.Logger) (*TLSReloader, error) {
	if log == nil {
		log = slog.Default()
	}
	r := &TLSReloader{files: files, log: log}
	if _, err := r.material(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *TLSReloader) load() (*tlsMaterial, error) {
	pair, err := tls.LoadX509KeyPair(r.files.Cert, r.files.Key)
	if err != nil {
		return nil, fmt.Errorf("tls_cert %s / tls_key %s: %w (create them with `vbladectl cluster certs`, or check that the key belongs to the certificate)", r.files.Cert, r.files.Key, err)
	}
	if pair.Leaf == nil {
		if pair.Leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return nil, fmt.Errorf("tls_cert %s: %w", r.files.Cert, err)
		}
	}
	caPEM, err := os.ReadFile(r.files.CA)
	if err != nil {
		return nil, fmt.Errorf("tls_ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("tls_ca %s holds no PEM certificate (it should be the cluster CA, ca.crt from `vbladectl cluster certs`)", r.files.CA)
	}
	// A leaf that does not chain to the CA would be refused by every peer;
	// say so now rather than as handshake errors on the other nodes.
	inter := x509.NewCertPool()
	for _, der := range pair.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := pair.Leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, fmt.Errorf("tls_cert %s is not valid under tls_ca %s: %w (peers would refuse it: issue it from the cluster CA, for both server and client auth)", r.files.Cert, r.files.CA, err)
	}
	return &tlsMaterial{cert: &pair, pool: pool}, nil
}

// material returns the current material, reloading it if a file changed.
// A failed reload keeps the previous material (and logs once); it is an
// error only when nothing was ever loaded.
func (r *TLSReloader) material() (*tlsMaterial, error) {
	var stamps [3]fileStamp
	var statErr error
	for i, p := range []string{r.files.Cert, r.files.Key, r.files.CA} {
		s, err := stampOf(p)
		if err != nil && statErr == nil {
			statErr = err
		}
		stamps[i] = s
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cur != nil && statErr == nil && stamps == r.stamps {
		return r.cur, nil
	}
	var m *tlsMaterial
	err := statErr
	if err == nil {
		m, err = r.load()
	}
	if err != nil {
		if r.cur == nil {
			return nil, err
		}
		if msg := err.Error(); msg != r.lastErr {
			r.lastErr = msg
			r.log.Warn("TLS files changed but cannot be loaded; keeping the previous certificate until they are fixed", "err", err)
		}
		return r.cur, nil
	}
	if r.cur != nil {
		r.log.Info("TLS certificate reloaded", "cert", r.files.Cert, "subject", m.cert.Leaf.Subject.CommonName,
			"serial", m.cert.Leaf.SerialNumber.Text(16), "not_after", m.cert.Leaf.NotAfter)
	}
	r.cur, r.stamps, r.lastErr = m, stamps, ""
	return m, nil
}

// Leaf is the node certificate in use now.
func (r *TLSReloader) Leaf() (*x509.Certificate, error) {
	m, err := r.material()
	if err != nil {
		return nil, err
	}
	return m.cert.Leaf, nil
}

// ServerConfig is the listener's configuration: TLS 1.3 only, a client
// certificate chaining to the current CA required. GetConfigForClient
// builds it per connection so a new CA or certificate applies at once.
func (r *TLSReloader) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m, err := r.material()
			if err != nil {
				return nil, err
			}
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{*m.cert},
				ClientAuth:   tls.RequireAndVerifyClientCert,
				ClientCAs:    m.pool,
			}, nil
		},
	}
}

// clientConfig is a dialer's configuration for one connection to host.
func (r *TLSReloader) clientConfig(host string) (*tls.Config, error) {
	m, err := r.material()
	if err != nil {
		return nil, err
	}
	cert := m.cert
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: host,
		RootCAs:    m.pool,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert, nil
		},
	}, nil
}

// Dialer returns a Dialer that opens mutually authenticated TLS connections,
// verifying that the peer's certificate chains to tls_ca and names the host
// of the address dialled.
func (r *TLSReloader) Dialer() Dialer {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("peer address %q: %w", addr, err)
		}
		cfg, err := r.clientConfig(host)
		if err != nil {
			return nil, err
		}
		var d net.Dialer
		raw, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		c := tls.Client(raw, cfg)
		if err := c.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, fmt.Errorf("TLS handshake with peer %s failed: %w (its certificate must chain to this node's tls_ca and name %q; this node's must chain to the peer's)", addr, err, host)
		}
		return c, nil
	}
}

// certNames lists the names a certificate is valid for: SANs and CN.
func certNames(c *x509.Certificate) []string {
	names := append([]string{}, c.DNSNames...)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	if c.Subject.CommonName != "" {
		names = append(names, c.Subject.CommonName)
	}
	return names
}

// checkCertNamesHost fails when peers dialling host would refuse the
// certificate, so a wrong certificate stops the node at start with a
// message instead of as handshake errors in the other nodes' logs.
func checkCertNamesHost(c *x509.Certificate, host string) error {
	if err := c.VerifyHostname(host); err != nil {
		return fmt.Errorf("tls_cert does not name this node's raft_advertise host %q (it names %s), so peers would refuse it: reissue it with `vbladectl cluster certs --nodes ID --hosts %s`, or set raft_advertise to a name it carries",
			host, strings.Join(certNames(c), ", "), host)
	}
	return nil
}

// handshakeTimeout bounds a peer's TLS handshake on the node port (the
// mux's first-byte deadline covers it too; this names the failure).
const handshakeTimeout = 5 * time.Second

// readJoinToken reads a token file: one line, surrounding space ignored.
// It is read on every use so that a changed token applies without restart.
func readJoinToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("join_token_file: %w (it holds the cluster's join token, join-token from `vbladectl cluster certs`)", err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < 16 {
		return "", fmt.Errorf("join_token_file %s holds a token of %d characters; use at least 16 random characters (`vbladectl cluster certs` makes one)", path, len(tok))
	}
	return tok, nil
}

// errJoinToken is the answer to a join with a wrong or missing token. It does
// not say which (or what the token looks like).
var errJoinToken = errors.New("join refused: the join token does not match this cluster's: copy the cluster's join token file (join-token from `vbladectl cluster certs`) to the joining node's join_token_file and join again")

// tokenEqual compares in constant time. Hashing first hides the length of
// the expected token as well.
func tokenEqual(got, want string) bool {
	g := sha256.Sum256([]byte(got))
	w := sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(g[:], w[:]) == 1 && got != "" && want != ""
}

// joinToken is the token this node sends when it joins: empty when no
// join_token_file is configured (insecure clusters may go without).
func (n *Node) joinToken() (string, error) {
	if n.cfg.JoinTokenFile == "" {
		return "", nil
	}
	return readJoinToken(n.cfg.JoinTokenFile)
}

// checkJoinToken runs on the leader for every join and promote request. A
// node with no join_token_file accepts any (only possible with insecure =
// true); otherwise the token must match, compared in constant time.
func (n *Node) checkJoinToken(got string) error {
	if n.cfg.JoinTokenFile == "" {
		return nil
	}
	want, err := readJoinToken(n.cfg.JoinTokenFile)
	if err != nil {
		return unavailable("leader %s cannot check join tokens: %v", n.cfg.NodeID, err)
	}
	if !tokenEqual(got, want) {
		n.log.Warn("join refused: wrong or missing join token")
		return &APIError{Status: http.StatusForbidden, Message: errJoinToken.Error()}
	}
	return nil
}
