package node

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"unicode"
)

// Admin API wire types. The API is HTTP+JSON, served on the node's unix
// socket (vbladectl) and on the mux port (node-to-node). Paths:
//
//	unix socket and peers:
//	  GET  /v1/status             this node (NodeStatus)
//	unix socket only (operator actions):
//	  GET  /v1/cluster            the cluster as the leader sees it (ClusterStatus)
//	  POST /v1/cluster/init       bootstrap a one-node cluster with this node
//	  POST /v1/cluster/join       JoinRequest: ask the member at Address to add this node
//	  POST /v1/cluster/leave      ask the leader to remove this node
//	  POST /v1/cluster/transfer   TransferRequest: hand leadership over
//	  POST /v1/cluster/verify     compare every node's image checksums (VerifyResult)
//	peers only (mux port):
//	  GET  /v1/peer/cluster       ClusterStatus computed by the receiving leader
//	  POST /v1/peer/join          PeerJoinRequest (add or promote a member)
//	  POST /v1/peer/remove        PeerRemoveRequest
//	  POST /v1/peer/transfer      TransferRequest
//	  POST /v1/peer/verify        VerifyResult computed by the receiving leader
//	  POST /v1/peer/checksum      ChecksumRequest -> ChecksumResponse
//
// Operator actions are not reachable over TCP: whoever can reach the raft
// port can already speak Raft to the node, but should not be able to make it
// leave or bootstrap.
//
// Errors are {"error": "...", "leader_id": "...", "leader_address": "..."}
// with a 4xx/5xx status; the leader fields are set when the receiver is not
// the leader and knows who is, so that the caller can retry there.

// maxRequestBody bounds every request body; the largest legitimate one is a
// join with a few hundred exports.
const maxRequestBody = 64 << 10

// maxExports bounds the export list of a join request.
const maxExports = 1024

// APIError is the JSON error body.
type APIError struct {
	Status        int    `json:"-"`
	Message       string `json:"error"`
	LeaderID      string `json:"leader_id,omitempty"`
	LeaderAddress string `json:"leader_address,omitempty"`
}

func (e *APIError) Error() string { return e.Message }

// NodeStatus is one node's own view (GET /v1/status).
type NodeStatus struct {
	ID      string `json:"id"`
	Address string `json:"address"`
	// InCluster is false until the node is bootstrapped or added: its Raft
	// configuration is empty.
	InCluster bool `json:"in_cluster"`
	// State is leader, follower, candidate or shutdown; Suffrage voter or
	// nonvoter (a joining node is a nonvoter until it has caught up).
	State    string `json:"state"`
	Suffrage string `json:"suffrage,omitempty"`
	Term     uint64 `json:"term"`
	// CommitIndex, AppliedIndex (handed to the FSM) and LastLogIndex are
	// Raft's; FSMAppliedIndex is the last entry whose effect is in the
	// images (it does not count barrier and no-op entries).
	CommitIndex     uint64          `json:"commit_index"`
	AppliedIndex    uint64          `json:"applied_index"`
	FSMAppliedIndex uint64          `json:"fsm_applied_index"`
	LastLogIndex    uint64          `json:"last_log_index"`
	LeaderID        string          `json:"leader_id"`
	LeaderAddress   string          `json:"leader_address"`
	GateOpen        bool            `json:"gate_open"`
	Targets         []TargetStatus  `json:"targets"`
	Transfer        *TransferStatus `json:"transfer,omitempty"`
	FatalError      string          `json:"fatal_error,omitempty"`
	Members         []ClusterMember `json:"members,omitempty"`
	Exports         []ExportInfo    `json:"exports,omitempty"`
}

// ClusterMember is one server of the Raft configuration.
type ClusterMember struct {
	ID       string `json:"id"`
	Address  string `json:"address"`
	Suffrage string `json:"suffrage"`
}

// ExportInfo is one exported image as a join request states it.
type ExportInfo struct {
	Shelf uint16 `json:"shelf"`
	Slot  uint8  `json:"slot"`
	Size  int64  `json:"size"`
}

// Name is the export's eSHELF.SLOT.
func (e ExportInfo) Name() string { return fmt.Sprintf("e%d.%d", e.Shelf, e.Slot) }

// TargetStatus is one target as this node serves it.
type TargetStatus struct {
	Target string `json:"target"` // eSHELF.SLOT
	Size   int64  `json:"size"`
	Netif  string `json:"netif"`
	// MAC is the source address answers come from: the target's virtual
	// MAC (MACKind "virtual") or the interface's own ("interface").
	MAC     string `json:"mac"`
	MACKind string `json:"mac_kind"`
	// Serving is true while this node answers for the target (it leads and
	// its gate is open).
	Serving bool `json:"serving"`
	// Replicated is true once the target is in the cluster's replicated set.
	Replicated bool `json:"replicated"`
}

// TransferStatus is the last full-image transfer seen by this node.
type TransferStatus struct {
	Direction string `json:"direction"` // sending or receiving
	Index     uint64 `json:"index"`
	Bytes     int64  `json:"bytes"`
	Total     int64  `json:"total"`
	Done      bool   `json:"done"`
	Error     string `json:"error,omitempty"`
}

// ClusterStatus is GET /v1/cluster.
type ClusterStatus struct {
	InCluster bool `json:"in_cluster"`
	// Leader is the leader's node id, empty when there is none.
	Leader        string          `json:"leader"`
	LeaderAddress string          `json:"leader_address"`
	Term          uint64          `json:"term"`
	CommitIndex   uint64          `json:"commit_index"`
	Nodes         []MemberStatus  `json:"nodes"`
	Targets       []ServingTarget `json:"targets"`
	// Message explains a partial view (no leader, leader unreachable, not
	// in a cluster).
	Message string `json:"message,omitempty"`
}

// MemberStatus is one node in ClusterStatus.
type MemberStatus struct {
	ID       string `json:"id"`
	Address  string `json:"address"`
	Role     string `json:"role"` // leader, follower, candidate, nonvoter, unreachable
	Suffrage string `json:"suffrage"`
	// Reachable is false when the node did not answer its admin port.
	Reachable    bool            `json:"reachable"`
	Term         uint64          `json:"term"`
	CommitIndex  uint64          `json:"commit_index"`
	AppliedIndex uint64          `json:"applied_index"`
	Lag          uint64          `json:"lag"` // leader's commit - node's applied
	Transfer     *TransferStatus `json:"transfer,omitempty"`
	Error        string          `json:"error,omitempty"`
	FatalError   string          `json:"fatal_error,omitempty"`
}

// ServingTarget says which node answers a target, at which MAC.
type ServingTarget struct {
	Target  string `json:"target"`
	Size    int64  `json:"size"`
	Node    string `json:"node"` // empty: nobody serves it right now
	Address string `json:"address,omitempty"`
	Netif   string `json:"netif,omitempty"`
	MAC     string `json:"mac,omitempty"`
}

// JoinRequest is POST /v1/cluster/join.
type JoinRequest struct {
	// Address is any member's raft_addr.
	Address string `json:"address"`
}

// JoinResult answers a join: the joining node has been added (as a
// nonvoter first) and is caught up once its applied index reaches
// CommitIndex; it promotes itself to voter by then.
type JoinResult struct {
	LeaderID      string `json:"leader_id"`
	LeaderAddress string `json:"leader_address"`
	CommitIndex   uint64 `json:"commit_index"`
	// AlreadyMember is set when the node was a member already.
	AlreadyMember bool `json:"already_member,omitempty"`
}

// PeerJoinRequest is POST /v1/peer/join.
type PeerJoinRequest struct {
	ID      string       `json:"id"`
	Address string       `json:"address"`
	Exports []ExportInfo `json:"exports"`
	// Promote asks to make an existing nonvoter a voter (the joining node
	// sends it once it has caught up).
	Promote bool `json:"promote,omitempty"`
	// Forwarded is set by a member passing the request to the leader, so
	// the leader does not forward it again.
	Forwarded bool `json:"forwarded,omitempty"`
	// Token is the cluster's join token (join_token_file); the leader
	// refuses joins and promotions without the right one.
	Token string `json:"token,omitempty"`
}

// PeerRemoveRequest is POST /v1/peer/remove.
type PeerRemoveRequest struct {
	ID        string `json:"id"`
	Address   string `json:"address"`
	Forwarded bool   `json:"forwarded,omitempty"`
}

// TransferRequest is POST /v1/cluster/transfer and /v1/peer/transfer.
type TransferRequest struct {
	// To is the node id to hand leadership to; empty lets Raft pick the
	// most up-to-date follower.
	To string `json:"to,omitempty"`
}

// TransferResult names the new leader.
type TransferResult struct {
	LeaderID      string `json:"leader_id"`
	LeaderAddress string `json:"leader_address"`
}

// ChecksumRequest is POST /v1/peer/checksum: hash the local images once
// the applied index has reached Index.
type ChecksumRequest struct {
	Index uint64 `json:"index"`
}

// ChecksumResponse carries one node's image checksums and its applied index
// just before and just after hashing (equal: no write landed meanwhile).
type ChecksumResponse struct {
	AppliedBefore uint64           `json:"applied_before"`
	AppliedAfter  uint64           `json:"applied_after"`
	Targets       []TargetChecksum `json:"targets"`
}

// TargetChecksum is the SHA-256 of one local image.
type TargetChecksum struct {
	Target string `json:"target"`
	SHA256 string `json:"sha256"`
}

// VerifyResult is POST /v1/cluster/verify.
type VerifyResult struct {
	OK bool `json:"ok"`
	// Inconclusive is set when checksums differed while writes were moving
	// the applied index on some node (so the images were hashed at
	// different points): retry when the write load is lower.
	Inconclusive bool         `json:"inconclusive,omitempty"`
	Attempts     int          `json:"attempts"`
	Index        uint64       `json:"index"` // the leader's applied index after its barrier
	Leader       string       `json:"leader"`
	Nodes        []VerifyNode `json:"nodes"`
	Message      string       `json:"message,omitempty"`
}

// VerifyNode is one node's verify outcome.
type VerifyNode struct {
	ID            string         `json:"id"`
	Address       string         `json:"address"`
	Error         string         `json:"error,omitempty"`
	AppliedBefore uint64         `json:"applied_before"`
	AppliedAfter  uint64         `json:"applied_after"`
	Targets       []VerifyTarget `json:"targets"`
}

// VerifyTarget compares one image with the leader's.
type VerifyTarget struct {
	Target string `json:"target"`
	SHA256 string `json:"sha256"`
	Match  bool   `json:"match"`
}

// decodeStrict decodes exactly one JSON value from r into v: unknown fields,
// trailing data and bodies over maxRequestBody are errors.
func decodeStrict(r io.Reader, v any) error {
	data, err := io.ReadAll(io.LimitReader(r, maxRequestBody+1))
	if err != nil {
		return fmt.Errorf("read request body: %w", err)
	}
	if len(data) > maxRequestBody {
		return fmt.Errorf("request body larger than %d bytes", maxRequestBody)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		// An empty body is an empty request: every field is optional or
		// checked by the caller's validation.
		data = []byte("{}")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad request body: %w", err)
	}
	if dec.More() {
		return errors.New("bad request body: data after the JSON value")
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("bad request body: data after the JSON value")
	}
	return nil
}

// validNodeID accepts what node_id can sensibly be: printable, no spaces,
// bounded.
func validNodeID(id string) error {
	if id == "" {
		return errors.New("node id is empty")
	}
	if len(id) > 128 {
		return fmt.Errorf("node id of %d bytes (max 128)", len(id))
	}
	for _, r := range id {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return fmt.Errorf("node id %q contains a space or an unprintable character", id)
		}
	}
	return nil
}

// validAddress accepts a host:port a peer could dial.
func validAddress(addr string) error {
	if len(addr) > 512 {
		return fmt.Errorf("address of %d bytes (max 512)", len(addr))
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: want host:port (a member's raft_addr): %v", addr, err)
	}
	if host == "" || port == "" || strings.ContainsAny(host, "/ ") {
		return fmt.Errorf("address %q: want host:port (a member's raft_addr)", addr)
	}
	return nil
}

func decodeJoinRequest(r io.Reader) (JoinRequest, error) {
	var req JoinRequest
	if err := decodeStrict(r, &req); err != nil {
		return req, err
	}
	if req.Address == "" {
		return req, errors.New("join: no address given: pass any member's raft_addr")
	}
	return req, validAddress(req.Address)
}

func decodePeerJoinRequest(r io.Reader) (PeerJoinRequest, error) {
	var req PeerJoinRequest
	if err := decodeStrict(r, &req); err != nil {
		return req, err
	}
	if err := validNodeID(req.ID); err != nil {
		return req, err
	}
	if err := validAddress(req.Address); err != nil {
		return req, err
	}
	if len(req.Exports) > maxExports {
		return req, fmt.Errorf("%d exports (max %d)", len(req.Exports), maxExports)
	}
	seen := make(map[ExportInfo]bool, len(req.Exports))
	for _, e := range req.Exports {
		if e.Shelf == 0xffff || e.Slot == 0xff {
			return req, fmt.Errorf("export %s: broadcast shelf or slot", e.Name())
		}
		if e.Size <= 0 || e.Size%512 != 0 {
			return req, fmt.Errorf("export %s: size %d is not a positive multiple of 512", e.Name(), e.Size)
		}
		k := ExportInfo{Shelf: e.Shelf, Slot: e.Slot}
		if seen[k] {
			return req, fmt.Errorf("export %s listed twice", e.Name())
		}
		seen[k] = true
	}
	return req, nil
}

func decodePeerRemoveRequest(r io.Reader) (PeerRemoveRequest, error) {
	var req PeerRemoveRequest
	if err := decodeStrict(r, &req); err != nil {
		return req, err
	}
	if err := validNodeID(req.ID); err != nil {
		return req, err
	}
	return req, validAddress(req.Address)
}

func decodeTransferRequest(r io.Reader) (TransferRequest, error) {
	var req TransferRequest
	if err := decodeStrict(r, &req); err != nil {
		return req, err
	}
	if req.To != "" {
		if err := validNodeID(req.To); err != nil {
			return req, err
		}
	}
	return req, nil
}

func decodeChecksumRequest(r io.Reader) (ChecksumRequest, error) {
	var req ChecksumRequest
	err := decodeStrict(r, &req)
	return req, err
}

// decodeEmpty accepts an empty body or {}.
func decodeEmpty(r io.Reader) error {
	var req struct{}
	return decodeStrict(r, &req)
}
