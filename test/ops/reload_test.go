package ops

import (
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/internal/clustertest"
)

// TestSIGHUPReload edits the configuration of a running cluster's leader and
// of a follower and sends them SIGHUP: the leader applies the log level and
// commits the new mask list through Raft, the follower leaves the mask list
// to the leader, both name what takes a restart, and both keep running.
func TestSIGHUPReload(t *testing.T) {
	c := newCluster(t, 3, 212, 32<<20, "")
	leader := c.form()
	var follower *clustertest.Node
	for _, v := range c.Nodes {
		if v != leader {
			follower = v
			break
		}
	}
	edit := func(v *clustertest.Node) {
		b, err := os.ReadFile(v.CfgPath)
		if err != nil {
			t.Fatal(err)
		}
		s := strings.Replace(string(b), `log_level = "info"`, `log_level = "debug"`, 1)
		s = strings.Replace(s, "[[export]]\n", "[[export]]\nmask = [\"02:00:00:00:00:42\"]\nbufcnt = 32\n", 1)
		if err := os.WriteFile(v.CfgPath, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// waitLog polls v's log for re (the reload runs asynchronously).
	waitLog := func(v *clustertest.Node, re string) {
		t.Helper()
		rx := regexp.MustCompile(re)
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, se := c.LAN.Output(v.Cmd())
			if rx.MatchString(se) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: log lacks %q after SIGHUP", v.ID, re)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	for _, v := range []*clustertest.Node{leader, follower} {
		edit(v)
		if err := v.Cmd().Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	waitLog(leader, `reload: log level changed.*level=debug`)
	waitLog(leader, `reload: mask list committed to the cluster.*target=e1\.0.*02:00:00:00:00:42`)
	waitLog(leader, `reload: not applied, takes a restart.*export e1\.0: bufcnt 16 -> 32`)
	waitLog(follower, `reload: log level changed.*level=debug`)
	waitLog(follower, `reload: mask list changed in the file, but only the leader commits it`)
	waitLog(follower, `reload: not applied, takes a restart.*bufcnt`)
	// A second SIGHUP with no further edit: the leader has nothing left to
	// apply, but the restart-only change is still reported.
	if err := leader.Cmd().Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, se := c.LAN.Output(leader.Cmd())
		if strings.Count(se, "takes a restart") >= 2 {
			if strings.Count(se, "mask list committed") != 1 {
				t.Errorf("the second reload committed the mask list again")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("second SIGHUP: no restart notice again")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, v := range []*clustertest.Node{leader, follower} {
		if ex, err := c.LAN.Exited(v.Cmd()); ex {
			t.Errorf("%s exited after SIGHUP: %v", v.ID, err)
		}
	}
}
