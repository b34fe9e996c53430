package aoe

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// testLAN is a veth pair built for one test: Host is the end left in the
// root namespace (where the test process opens its socket), Peer is the end
// moved into the namespace NS, where a target process runs. Nothing else is
// on this wire, so broadcasts reach only what the test started.
type testLAN struct {
	NS, Host, Peer string
	MTU            int
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// requireNetAdmin skips the test loudly when it cannot build a LAN.
func requireNetAdmin(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root to create network namespaces and veth pairs (run as root)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("SKIP: iproute2 'ip' command not found")
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		t.Skip("SKIP: kernel without network namespace support")
	}
}

func ipCmd(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// newTestLAN creates the namespace and the veth pair and removes them when
// the test ends.
func newTestLAN(t testing.TB, mtu int) *testLAN {
	t.Helper()
	requireNetAdmin(t)
	id := randHex(3)
	l := &testLAN{NS: "vbc-" + id, Host: "vbch" + id, Peer: "vbcp" + id, MTU: mtu}
	if out, err := exec.Command("ip", "netns", "add", l.NS).CombinedOutput(); err != nil {
		t.Skipf("SKIP: cannot create a network namespace here: %v: %s", err, out)
	}
	t.Cleanup(func() {
		// Deleting the namespace destroys the peer and with it the pair.
		exec.Command("ip", "link", "del", l.Host).Run()
		exec.Command("ip", "netns", "del", l.NS).Run()
	})
	ipCmd(t, "link", "add", l.Host, "type", "veth", "peer", "name", l.Peer, "netns", l.NS)
	ipCmd(t, "link", "set", l.Host, "mtu", strconv.Itoa(mtu), "up")
	ipCmd(t, "-n", l.NS, "link", "set", l.Peer, "mtu", strconv.Itoa(mtu), "up")
	ipCmd(t, "-n", l.NS, "link", "set", "lo", "up")
	// No IPv6 chatter on a wire that carries only AoE.
	os.WriteFile("/proc/sys/net/ipv6/conf/"+l.Host+"/disable_ipv6", []byte("1"), 0)
	return l
}

// PeerMAC is the hardware address of the namespace end.
func (l *testLAN) PeerMAC(t testing.TB) MAC {
	t.Helper()
	out, err := exec.Command("ip", "-n", l.NS, "-o", "link", "show", l.Peer).Output()
	if err != nil {
		t.Fatalf("ip link show %s: %v", l.Peer, err)
	}
	f := strings.Fields(string(out))
	for i := range f {
		if f[i] == "link/ether" && i+1 < len(f) {
			m, err := ParseMAC(f[i+1])
			if err != nil {
				t.Fatal(err)
			}
			return m
		}
	}
	t.Fatalf("no MAC in %q", out)
	return MAC{}
}

// startInNS runs a command inside the LAN's namespace and kills it (by PID)
// when the test ends.
func (l *testLAN) startInNS(t testing.TB, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.NS, name}, args...)...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s in %s: %v", name, l.NS, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("%s (pid %d) did not exit", name, cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	return cmd
}
