package ops

import (
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/node"
)

// TestSIGTERMHandsLeadershipOver stops the leader of a three-node cluster
// with SIGTERM while an initiator runs a verifying workload. A planned stop
// must hand leadership over before the process exits (Node.Shutdown(true)),
// so the initiator sees no error, no mismatch, and a stall well under the
// election timeout: the stall a crash costs (see the demo) is the election
// timeout plus the election.
func TestSIGTERMHandsLeadershipOver(t *testing.T) {
	c := newCluster(t, 3, 211, 32<<20, "")
	leader := c.form()
	ls, err := c.Status(leader)
	if err != nil {
		t.Fatal(err)
	}
	base := ls.CommitIndex
	t.Logf("cluster formed: leader %s, term %d", leader.ID, ls.Term)

	// The workload: mixed reads and writes, every read checked against the
	// last acknowledged write, bounded in time so the test is too.
	const workload = 8 * time.Second
	bench := c.LAN.Start(c.ini.NS, c.Bins.Vbladectl, "bench", "-i", c.ini.If, "-t", "1.0",
		"-mode", "mixed", "-verify", "-follow", "-window", "8", "-span", "2097152",
		"-duration", workload.String(), "-json")

	// Under way once writes go through Raft.
	deadline := time.Now().Add(15 * time.Second)
	for {
		if s, err := c.Status(leader); err == nil && s.CommitIndex > base+50 {
			break
		}
		if ex, _ := c.LAN.Exited(bench); ex {
			_, se := c.LAN.Output(bench)
			t.Fatalf("bench exited before the workload got going:\n%s", se)
		}
		if time.Now().After(deadline) {
			t.Fatal("the workload did not reach the leader within 15 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Some healthy load first, so a stall at the hand-off stands out.
	time.Sleep(time.Second)

	sent := time.Now()
	if err := leader.Cmd().Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	next := c.WaitLeader(leader, 10*time.Second)
	handoff := time.Since(sent)
	exited, werr := c.LAN.Wait(leader.Cmd(), 30*time.Second)
	exitAfter := time.Since(sent)
	if !exited {
		t.Fatalf("%s still running 30 s after SIGTERM", leader.ID)
	}
	if werr != nil {
		t.Errorf("%s exited with %v after SIGTERM, want status 0", leader.ID, werr)
	}
	_, stderr := c.LAN.Output(leader.Cmd())
	if strings.Contains(stderr, "leadership transfer before shutdown failed") {
		t.Errorf("%s did not hand leadership over:\n%s", leader.ID, stderr)
	}

	if ex, _ := c.LAN.Wait(bench, workload+30*time.Second); !ex {
		t.Fatal("bench did not finish")
	}
	out, se := c.LAN.Output(bench)
	var r benchResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("bench output is not JSON (%v):\nstdout %s\nstderr %s", err, out, se)
	}
	stall := time.Duration(r.StallMs * float64(time.Millisecond))
	t.Logf("RESULT sigterm-handoff %s -> %s: SIGTERM at %s, new leader serving %v later, old process exited after %v; "+
		"workload ops=%d reads=%d writes=%d verified=%d errors=%d mismatches=%d retransmits=%d longest-stall=%v (%s .. %s)",
		leader.ID, next.ID, sent.UTC().Format(time.RFC3339Nano), handoff.Round(time.Millisecond), exitAfter.Round(time.Millisecond),
		r.Ops, r.Reads, r.Writes, r.Verified, r.Errors, r.Mismatches, r.Retransmits, stall.Round(time.Millisecond),
		r.StallStart, r.StallEnd)
	if r.Errors != 0 || r.Mismatches != 0 {
		t.Errorf("workload saw %d errors %v and %d mismatches %v across the planned hand-off, want none",
			r.Errors, r.FirstErrors, r.Mismatches, r.FirstMismatches)
	}
	if r.Ops == 0 || r.Verified == 0 {
		t.Errorf("workload did too little to judge: %d ops, %d verified reads", r.Ops, r.Verified)
	}
	// "Well under the election timeout": a hand-off that waited for an
	// election would cost at least that.
	if limit := node.DefaultElectionTimeout; stall >= limit {
		t.Errorf("longest stall %v across the planned hand-off; want well under the election timeout %v", stall, limit)
	}
}
