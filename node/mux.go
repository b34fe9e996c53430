package node

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// One TCP port per node carries Raft and the node-to-node admin API. The
// first byte a client sends says which: it keeps firewalls and the
// configuration to one address per node.
const (
	muxRaft  byte = 'R'
	muxAdmin byte = 'A'
)

// Dialer opens a TCP (or TLS) connection to a peer's mux port.
type Dialer func(ctx context.Context, addr string) (net.Conn, error)

// plainDialer dials TCP.
func plainDialer(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// Mux accepts connections on the node's port and hands each to Raft or the
// admin server by its first byte.
type Mux struct {
	ln     net.Listener
	log    *slog.Logger
	raftL  *muxListener
	adminL *muxListener
	dial   Dialer
	wg     sync.WaitGroup
}

// NewMux wraps ln. Call Serve to start accepting.
func NewMux(ln net.Listener, dial Dialer, log *slog.Logger) *Mux {
	if dial == nil {
		dial = plainDialer
	}
	return &Mux{
		ln:     ln,
		log:    log,
		dial:   dial,
		raftL:  newMuxListener(ln.Addr()),
		adminL: newMuxListener(ln.Addr()),
	}
}

// Serve accepts until the listener closes.
func (m *Mux) Serve() {
	for {
		c, err := m.ln.Accept()
		if err != nil {
			m.raftL.close()
			m.adminL.close()
			return
		}
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.route(c)
		}()
	}
}

func (m *Mux) route(c net.Conn) {
	// A peer that connects and sends nothing must not hold a goroutine.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	// With TLS the handshake comes first: a peer without a certificate from
	// the cluster CA is dropped here, before Raft or the admin API sees a
	// byte. Done explicitly (rather than inside the first Read) so that the
	// refusal is logged with its reason.
	if tc, ok := c.(*tls.Conn); ok {
		ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
		err := tc.HandshakeContext(ctx)
		cancel()
		if err != nil {
			m.log.Warn("peer refused: TLS handshake failed (a node needs a certificate from this cluster's CA)", "remote", c.RemoteAddr().String(), "err", err)
			c.Close()
			return
		}
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return
	}
	c.SetReadDeadline(time.Time{})
	switch b[0] {
	case muxRaft:
		m.raftL.deliver(c)
	case muxAdmin:
		m.adminL.deliver(c)
	default:
		m.log.Debug("connection with an unknown protocol byte closed", "remote", c.RemoteAddr(), "byte", b[0])
		c.Close()
	}
}

// Close stops accepting.
func (m *Mux) Close() error {
	err := m.ln.Close()
	m.raftL.close()
	m.adminL.close()
	return err
}

// RaftLayer is the raft.StreamLayer over the mux.
func (m *Mux) RaftLayer(advertise net.Addr) raft.StreamLayer {
	return &raftLayer{muxListener: m.raftL, advertise: advertise, dial: m.dial}
}

// AdminListener yields the admin API's connections from peers.
func (m *Mux) AdminListener() net.Listener { return m.adminL }

// DialAdmin opens an admin connection to a peer's mux port.
func DialAdmin(ctx context.Context, dial Dialer, addr string) (net.Conn, error) {
	if dial == nil {
		dial = plainDialer
	}
	c, err := dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	if _, err := c.Write([]byte{muxAdmin}); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

type muxListener struct {
	addr   net.Addr
	conns  chan net.Conn
	done   chan struct{}
	closer sync.Once
}

func newMuxListener(addr net.Addr) *muxListener {
	return &muxListener{addr: addr, conns: make(chan net.Conn, 16), done: make(chan struct{})}
}

func (l *muxListener) deliver(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *muxListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *muxListener) close() { l.closer.Do(func() { close(l.done) }) }

func (l *muxListener) Close() error { l.close(); return nil }

func (l *muxListener) Addr() net.Addr { return l.addr }

type raftLayer struct {
	*muxListener
	advertise net.Addr
	dial      Dialer
}

func (r *raftLayer) Addr() net.Addr {
	if r.advertise != nil {
		return r.advertise
	}
	return r.muxListener.Addr()
}

func (r *raftLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := r.dial(ctx, string(addr))
	if err != nil {
		return nil, err
	}
	if _, err := c.Write([]byte{muxRaft}); err != nil {
		c.Close()
		return nil, fmt.Errorf("raft dial %s: %w", addr, err)
	}
	return c, nil
}
