package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// adminServer serves the admin API for one node. It lives as long as
// ServeAdmin; background work it starts (a joining node promoting itself)
// ends with it.
type adminServer struct {
	n   *Node
	ctx context.Context
	// memberMu serialises membership changes this node leads: Raft applies
	// one configuration change at a time anyway, and the join checks must
	// see the configuration the change is made against.
	memberMu sync.Mutex
	// joinMu keeps one outgoing join (and its promotion) at a time.
	joinMu sync.Mutex
	wg     sync.WaitGroup
}

// Timeouts of node-to-node admin calls.
const (
	peerStatusTimeout = 1500 * time.Millisecond // one member's status in a cluster view
	peerDialTimeout   = 3 * time.Second         // reaching a join address at all
	peerCallTimeout   = 30 * time.Second        // a forwarded operation
	joinTimeout       = 10 * time.Minute        // image snapshot + membership change
)

// ServeAdmin serves the admin API on the node's unix socket (cfg.AdminSocket,
// mode 0600, for vbladectl) and on the mux port (for peers) until ctx ends.
// Run must be running for the peer side to receive connections.
func (n *Node) ServeAdmin(ctx context.Context) error {
	a := &adminServer{n: n, ctx: ctx}
	ln, err := listenUnixSocket(n.cfg.AdminSocket, n.cfg.AdminGroup)
	if err != nil {
		return err
	}
	local := &http.Server{
		Handler:           a.localHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	peer := &http.Server{
		Handler:           a.peerHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	errc := make(chan error, 2)
	go func() { errc <- serveUntilClosed(local, ln) }()
	go func() { errc <- serveUntilClosed(peer, n.mux.AdminListener()) }()
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	// Shutdown waits for requests in flight; a long verify or join is cut
	// off by ctx (their BaseContext) anyway.
	_ = local.Shutdown(sctx)
	_ = peer.Shutdown(sctx)
	a.wg.Wait()
	if err := os.Remove(n.cfg.AdminSocket); err != nil && !errors.Is(err, os.ErrNotExist) {
		n.log.Warn("could not remove the admin socket", "path", n.cfg.AdminSocket, "err", err)
	}
	if serveErr != nil {
		return fmt.Errorf("admin API: %w", serveErr)
	}
	return nil
}

func serveUntilClosed(s *http.Server, ln net.Listener) error {
	err := s.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// listenUnixSocket creates the admin socket: parent directory (0750), a
// stale socket from a crashed node removed, mode 0600 so only the node's
// user (root under the shipped unit) may administer it. With group set, the
// socket is 0660 and belongs to that group, and so does the directory if
// this call created it (members must be able to reach the socket).
func listenUnixSocket(path, group string) (net.Listener, error) {
	gid := -1
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			return nil, fmt.Errorf("admin_group %q: %w (create the group or fix the name)", group, err)
		}
		if gid, err = strconv.Atoi(g.Gid); err != nil {
			return nil, fmt.Errorf("admin_group %q: gid %q is not numeric", group, g.Gid)
		}
	}
	dir := filepath.Dir(path)
	_, statErr := os.Stat(dir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("admin socket: create directory: %w", err)
	}
	if gid >= 0 && errors.Is(statErr, os.ErrNotExist) {
		if err := os.Chown(dir, -1, gid); err != nil {
			return nil, fmt.Errorf("admin socket: give directory %s to admin_group %s: %w", dir, group, err)
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("admin socket %s exists and is not a socket: remove it or set admin_socket elsewhere", path)
		}
		// A socket someone answers on belongs to a live node; one nobody
		// answers on is left over from a crash.
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("admin socket %s is in use by another running node: stop it or give this node its own admin_socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("admin socket: remove stale %s: %w", path, err)
		}
	}
	// Between bind and chmod the socket has the umask's mode; the 0750
	// directory keeps others out meanwhile. (Setting the umask instead
	// would race with every other file this process creates.)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: listen on %s: %w", path, err)
	}
	mode := os.FileMode(0o600)
	if gid >= 0 {
		mode = 0o660
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("admin socket: give %s to admin_group %s: %w", path, group, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: chmod %s: %w", path, err)
	}
	return ln, nil
}

func (a *adminServer) localHandler() http.Handler {
	m := http.NewServeMux()
	m.HandleFunc("GET /v1/status", a.handleStatus)
	m.HandleFunc("GET /v1/cluster", a.handleCluster)
	m.HandleFunc("POST /v1/cluster/init", a.handleInit)
	m.HandleFunc("POST /v1/cluster/join", a.handleJoin)
	m.HandleFunc("POST /v1/cluster/leave", a.handleLeave)
	m.HandleFunc("POST /v1/cluster/transfer", a.handleTransfer)
	m.HandleFunc("POST /v1/cluster/verify", a.handleVerify)
	// Go's profiler, for the operator only (the socket is root's, or
	// admin_group's): the one way to see where a node's CPU goes under load
	// without restarting it. Never on the peer port.
	m.HandleFunc("GET /debug/pprof/", pprof.Index)
	m.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	m.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	m.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	return withBodyLimit(m)
}

func (a *adminServer) peerHandler() http.Handler {
	m := http.NewServeMux()
	m.HandleFunc("GET /v1/status", a.handleStatus)
	m.HandleFunc("GET /v1/peer/cluster", a.handlePeerCluster)
	m.HandleFunc("POST /v1/peer/join", a.handlePeerJoin)
	m.HandleFunc("POST /v1/peer/remove", a.handlePeerRemove)
	m.HandleFunc("POST /v1/peer/transfer", a.handlePeerTransfer)
	m.HandleFunc("POST /v1/peer/verify", a.handlePeerVerify)
	m.HandleFunc("POST /v1/peer/checksum", a.handlePeerChecksum)
	return withBodyLimit(m)
}

// withBodyLimit caps every request body (decodeStrict caps it again, so
// the decoders are safe on their own too) and turns unknown paths into
// JSON errors.
func withBodyLimit(h *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, maxRequestBody)
		if _, pattern := h.Handler(r); pattern == "" {
			writeError(w, &APIError{Status: http.StatusNotFound,
				Message: fmt.Sprintf("no admin endpoint %s %s (is vbladectl newer than this node?)", r.Method, r.URL.Path)})
			return
		}
		h.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// writeError answers err as {"error": ...}: an *APIError keeps its status
// and leader hint, anything else is a 500.
func writeError(w http.ResponseWriter, err error) {
	var ae *APIError
	if !errors.As(err, &ae) {
		ae = &APIError{Status: http.StatusInternalServerError, Message: err.Error()}
	}
	status := ae.Status
	if status == 0 {
		status = http.StatusInternalServerError
	}
	writeJSON(w, status, ae)
}

func badRequest(err error) error {
	return &APIError{Status: http.StatusBadRequest, Message: err.Error()}
}

func conflict(format string, args ...any) error {
	return &APIError{Status: http.StatusConflict, Message: fmt.Sprintf(format, args...)}
}

func unavailable(format string, args ...any) error {
	return &APIError{Status: http.StatusServiceUnavailable, Message: fmt.Sprintf(format, args...)}
}

// respond writes v, or the error.
func respond(w http.ResponseWriter, v any, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	if v == nil {
		v = struct {
			OK bool `json:"ok"`
		}{true}
	}
	writeJSON(w, http.StatusOK, v)
}

// decodeBody runs one of the small decoders on the request body and
// answers 400 on failure.
func decodeBody[T any](w http.ResponseWriter, r *http.Request, dec func(io.Reader) (T, error)) (T, bool) {
	v, err := dec(r.Body)
	if err != nil {
		writeError(w, badRequest(err))
		return v, false
	}
	return v, true
}

func emptyBody(w http.ResponseWriter, r *http.Request) bool {
	if err := decodeEmpty(r.Body); err != nil {
		writeError(w, badRequest(err))
		return false
	}
	return true
}

func (a *adminServer) handleStatus(w http.ResponseWriter, r *http.Request) {
	respond(w, a.n.AdminStatus(), nil)
}

func (a *adminServer) handleCluster(w http.ResponseWriter, r *http.Request) {
	s, err := a.clusterStatus(r.Context(), true)
	respond(w, s, err)
}

func (a *adminServer) handlePeerCluster(w http.ResponseWriter, r *http.Request) {
	s, err := a.clusterStatus(r.Context(), false)
	respond(w, s, err)
}

func (a *adminServer) handleInit(w http.ResponseWriter, r *http.Request) {
	if !emptyBody(w, r) {
		return
	}
	err := a.n.Bootstrap()
	if err != nil {
		err = conflict("%v", err)
	}
	respond(w, nil, err)
}

func (a *adminServer) handleJoin(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeBody(w, r, decodeJoinRequest)
	if !ok {
		return
	}
	res, err := a.join(r.Context(), req.Address)
	respond(w, res, err)
}

func (a *adminServer) handlePeerJoin(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeBody(w, r, decodePeerJoinRequest)
	if !ok {
		return
	}
	res, err := a.peerJoin(r.Context(), req)
	respond(w, res, err)
}

func (a *adminServer) handleLeave(w http.ResponseWriter, r *http.Request) {
	if !emptyBody(w, r) {
		return
	}
	respond(w, nil, a.leave(r.Context()))
}

func (a *adminServer) handlePeerRemove(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeBody(w, r, decodePeerRemoveRequest)
	if !ok {
		return
	}
	respond(w, nil, a.peerRemove(r.Context(), req))
}

func (a *adminServer) handleTransfer(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeBody(w, r, decodeTransferRequest)
	if !ok {
		return
	}
	res, err := a.transfer(r.Context(), req, true)
	respond(w, res, err)
}

func (a *adminServer) handlePeerTransfer(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeBody(w, r, decodeTransferRequest)
	if !ok {
		return
	}
	res, err := a.transfer(r.Context(), req, false)
	respond(w, res, err)
}

func (a *adminServer) handleVerify(w http.ResponseWriter, r *http.Request) {
	if !emptyBody(w, r) {
		return
	}
	res, err := a.verify(r.Context(), true)
	respond(w, res, err)
}

func (a *adminServer) handlePeerVerify(w http.ResponseWriter, r *http.Request) {
	if !emptyBody(w, r) {
		return
	}
	res, err := a.verify(r.Context(), false)
	respond(w, res, err)
}

func (a *adminServer) handlePeerChecksum(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeBody(w, r, decodeChecksumRequest)
	if !ok {
		return
	}
	res, err := a.n.localChecksums(r.Context(), req.Index)
	respond(w, res, err)
}
