// Package ops tests the operator-facing behaviour of whole processes: the
// `make demo` script, and a planned stop (SIGTERM) of a leading `vblade node`
// with an initiator running.
//
// Network rule: every AoE socket these tests open (vblade nodes and the
// vbladectl initiator) is on an interface netlab or the demo script created
// in its own namespaces; Raft runs on those namespaces' addresses.
package ops

import (
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/internal/clustertest"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

type cluster struct {
	*clustertest.Cluster
	ini *netlab.Host // the initiator's namespace
}

// newCluster builds a LAN of n node hosts plus one initiator host and writes
// each node's configuration (one export, e1.0, over a sparse image; extra
// goes before [[export]]). Insecure: the node port is on a private bridge
// that lives as long as the test; TLS is not what is under test here.
func newCluster(t *testing.T, n int, subnet int, imgSize int64, extra string) *cluster {
	c := clustertest.New(t, clustertest.Options{
		Nodes: n, ExtraHosts: 1, Subnet: subnet, ImageSize: imgSize,
		LeaderPoll: 10 * time.Millisecond, DumpLines: 40,
		Config: clustertest.Config{ClusterName: "vbha-ops", LogLevel: "info", Extra: extra, Shelf: 1, Slot: 0},
	})
	return &cluster{Cluster: c, ini: c.LAN.Host(n + 1)}
}

// form starts every node, initialises the cluster on the first and joins
// the others, and returns the leader.
func (c *cluster) form() *clustertest.Node {
	c.T.Helper()
	c.Form()
	return c.WaitLeader(nil, 15*time.Second)
}

// benchResult is the part of `vbladectl bench --json` the tests read.
type benchResult struct {
	Ops             int64    `json:"ops"`
	Reads           int64    `json:"reads"`
	Writes          int64    `json:"writes"`
	Errors          int64    `json:"errors"`
	FirstErrors     []string `json:"first_errors"`
	Verified        int64    `json:"verified"`
	Mismatches      int64    `json:"mismatches"`
	FirstMismatches []string `json:"first_mismatches"`
	Retransmits     uint64   `json:"retransmits"`
	StallMs         float64  `json:"longest_stall_ms"`
	StallStart      string   `json:"longest_stall_start"`
	StallEnd        string   `json:"longest_stall_end"`
}
