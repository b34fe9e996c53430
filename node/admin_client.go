package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// maxResponseBody bounds what a client reads back; a cluster status of a
// few dozen nodes is a few KiB.
const maxResponseBody = 4 << 20

// AdminClient talks to one node's admin API: the local node over its unix
// socket (vbladectl) or a peer over its mux port (node to node).
type AdminClient struct {
	hc   *http.Client
	base string
	// where and hint describe the endpoint in error messages.
	where string
	hint  string
}

// NewAdminClient returns a client for the node listening on the unix
// socket path.
func NewAdminClient(socket string) *AdminClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}
	return &AdminClient{
		hc:    &http.Client{Transport: tr},
		base:  "http://vblade-node",
		where: "the vblade node at admin socket " + socket,
		hint:  "is `vblade node` running, and is --socket its admin_socket?",
	}
}

// newPeerClient returns a client for the node whose mux port is addr.
func newPeerClient(dial Dialer, addr string, id string) *AdminClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			// Reaching the node must fail fast even when the call itself
			// (a join streaming nothing yet, a verify) may take minutes.
			dctx, cancel := context.WithTimeout(ctx, peerDialTimeout)
			defer cancel()
			return DialAdmin(dctx, dial, addr)
		},
		// One connection per call: admin traffic is rare, and an idle
		// pooled connection would hold a mux goroutine on the peer.
		DisableKeepAlives: true,
	}
	where := "node at " + addr
	if id != "" {
		where = "node " + id + " at " + addr
	}
	return &AdminClient{
		hc:    &http.Client{Transport: tr},
		base:  "http://" + addr,
		where: where,
		hint:  "is `vblade node` running there, and is " + addr + " its raft_addr?",
	}
}

// unreachableError is returned when the node could not be reached at all
// (as opposed to answering with an error).
type unreachableError struct {
	msg string
	err error
}

func (e *unreachableError) Error() string { return e.msg }
func (e *unreachableError) Unwrap() error { return e.err }

// IsUnreachable reports whether err means the node did not answer.
func IsUnreachable(err error) bool {
	var u *unreachableError
	return errors.As(err, &u)
}

// do sends one request and decodes the JSON answer into out (nil: ignore).
// A non-2xx answer becomes an *APIError.
func (c *AdminClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode %s request: %w", path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("build %s request: %w", path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return &unreachableError{msg: fmt.Sprintf("%s did not answer %s in time (%v): %s", c.where, path, ctx.Err(), c.hint), err: err}
		}
		return &unreachableError{msg: fmt.Sprintf("%s unreachable: %v: %s", c.where, unwrapURL(err), c.hint), err: err}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody))
	if err != nil {
		return fmt.Errorf("read answer of %s to %s: %w", c.where, path, err)
	}
	if resp.StatusCode/100 != 2 {
		ae := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(data, ae) != nil || ae.Message == "" {
			ae.Message = fmt.Sprintf("%s answered %s to %s: %.200q", c.where, resp.Status, path, data)
		}
		return ae
	}
	if out == nil {
		return nil
	}
	// Answers are decoded leniently: a newer node may add fields.
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decode answer of %s to %s: %w", c.where, path, err)
	}
	return nil
}

// unwrapURL drops net/http's "Get \"http://...\":" prefix, which names a
// made-up URL, keeping the cause (connection refused, no such file...).
func unwrapURL(err error) error {
	var ue interface{ Unwrap() error }
	if errors.As(err, &ue) {
		if inner := ue.Unwrap(); inner != nil {
			return inner
		}
	}
	return err
}

// Status returns the node's own status.
func (c *AdminClient) Status(ctx context.Context) (*NodeStatus, error) {
	var s NodeStatus
	if err := c.do(ctx, http.MethodGet, "/v1/status", nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// Cluster returns the cluster status as the leader sees it.
func (c *AdminClient) Cluster(ctx context.Context) (*ClusterStatus, error) {
	var s ClusterStatus
	if err := c.do(ctx, http.MethodGet, "/v1/cluster", nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// Init bootstraps a one-node cluster with the node.
func (c *AdminClient) Init(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/cluster/init", struct{}{}, nil)
}

// Join asks the member at addr to add the node. It returns once the node
// is a member (a nonvoter); the image and log then stream to it, and it
// promotes itself to voter once caught up (see WaitCaughtUp).
//
// While the cluster has no leader (an election is under way) the member
// answers 503; Join retries then, until ctx ends, because an operator or a
// script joining during a failover wants the join, not the race.
func (c *AdminClient) Join(ctx context.Context, addr string) (*JoinResult, error) {
	for wait := 200 * time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
		var r JoinResult
		err := c.do(ctx, http.MethodPost, "/v1/cluster/join", JoinRequest{Address: addr}, &r)
		var ae *APIError
		if err == nil {
			return &r, nil
		}
		if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(wait):
		}
	}
}

// Leave asks the leader to remove the node from the cluster.
func (c *AdminClient) Leave(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/cluster/leave", struct{}{}, nil)
}

// Transfer hands leadership to the node with id to (empty: any).
func (c *AdminClient) Transfer(ctx context.Context, to string) (*TransferResult, error) {
	var r TransferResult
	if err := c.do(ctx, http.MethodPost, "/v1/cluster/transfer", TransferRequest{To: to}, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Verify compares every node's image checksums with the leader's.
func (c *AdminClient) Verify(ctx context.Context) (*VerifyResult, error) {
	var r VerifyResult
	if err := c.do(ctx, http.MethodPost, "/v1/cluster/verify", struct{}{}, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// WaitCaughtUp polls the node's status until it has applied index and is a
// voter, calling progress (if set) with each status. It fails when the node
// reports a fatal error or a failed image transfer it does not recover from.
func (c *AdminClient) WaitCaughtUp(ctx context.Context, index uint64, every time.Duration, progress func(*NodeStatus)) (*NodeStatus, error) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s, err := c.Status(ctx)
		if err != nil {
			return nil, err
		}
		if progress != nil {
			progress(s)
		}
		if s.FatalError != "" {
			return s, fmt.Errorf("node %s stopped applying the log: %s", s.ID, s.FatalError)
		}
		if s.AppliedIndex >= index && s.Suffrage == "voter" {
			return s, nil
		}
		select {
		case <-ctx.Done():
			return s, fmt.Errorf("node %s not caught up (applied %d of %d, %s): %w", s.ID, s.AppliedIndex, index, s.Suffrage, ctx.Err())
		case <-t.C:
		}
	}
}

// peer-side calls used between nodes.

func (c *AdminClient) peerJoin(ctx context.Context, req PeerJoinRequest) (*JoinResult, error) {
	var r JoinResult
	if err := c.do(ctx, http.MethodPost, "/v1/peer/join", req, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

func (c *AdminClient) peerRemove(ctx context.Context, req PeerRemoveRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/peer/remove", req, nil)
}

func (c *AdminClient) peerTransfer(ctx context.Context, req TransferRequest) (*TransferResult, error) {
	var r TransferResult
	if err := c.do(ctx, http.MethodPost, "/v1/peer/transfer", req, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

func (c *AdminClient) peerCluster(ctx context.Context) (*ClusterStatus, error) {
	var s ClusterStatus
	if err := c.do(ctx, http.MethodGet, "/v1/peer/cluster", nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

func (c *AdminClient) peerVerify(ctx context.Context) (*VerifyResult, error) {
	var r VerifyResult
	if err := c.do(ctx, http.MethodPost, "/v1/peer/verify", struct{}{}, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

func (c *AdminClient) peerChecksum(ctx context.Context, index uint64) (*ChecksumResponse, error) {
	var r ChecksumResponse
	if err := c.do(ctx, http.MethodPost, "/v1/peer/checksum", ChecksumRequest{Index: index}, &r); err != nil {
		return nil, err
	}
	return &r, nil
}
