package netlab

import (
	"bytes"
	"fmt"
	"net"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// udpReach sends one UDP datagram of size bytes, with fragmentation
// forbidden, from host a to host b and waits for it (the image has no ping,
// and a DF datagram also proves the path carries that MTU). Both sockets are
// opened inside the namespaces; the I/O then works from any thread.
func udpReach(a, b *Host, size int) error {
	var rc *net.UDPConn
	if err := InNS(b.NS, func() (err error) {
		rc, err = net.ListenUDP("udp4", &net.UDPAddr{IP: b.IP().AsSlice()})
		return err
	}); err != nil {
		return err
	}
	defer rc.Close()
	var sc *net.UDPConn
	if err := InNS(a.NS, func() (err error) {
		sc, err = net.DialUDP("udp4", nil, rc.LocalAddr().(*net.UDPAddr))
		return err
	}); err != nil {
		return err
	}
	defer sc.Close()
	raw, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	_ = raw.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
	})
	msg := bytes.Repeat([]byte{0xa5}, size)
	buf := make([]byte, size+1)
	for try := 0; try < 3; try++ { // the first datagram may wait for ARP
		if _, err := sc.Write(msg); err != nil {
			return fmt.Errorf("send %d B %s -> %s: %w", size, a.IP(), b.IP(), err)
		}
		_ = rc.SetReadDeadline(time.Now().Add(time.Second))
		n, _, err := rc.ReadFromUDP(buf)
		if err == nil && n == size {
			return nil
		}
	}
	return fmt.Errorf("no %d B datagram %s -> %s within 3 s", size, a.IP(), b.IP())
}

// TestLANLifecycle builds a LAN, checks addressing, IP reachability between
// namespaces, MTU changes, link down/up and process handling, then tears it
// down and checks that nothing is left behind.
func TestLANLifecycle(t *testing.T) {
	var id string
	var rootName string
	t.Run("lan", func(t *testing.T) {
		l := New(t, Options{
			HostOpts:  []HostOptions{{MAC: "02:aa:bb:cc:dd:01"}, {}, {NoIP: true}},
			RootPorts: 1,
			Subnet:    42,
		})
		id, rootName = l.ID, l.Root[0].Name

		h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
		if got := h1.MAC.String(); got != "02:aa:bb:cc:dd:01" {
			t.Errorf("host 1 MAC = %s, want the configured 02:aa:bb:cc:dd:01", got)
		}
		if got := h2.IP().String(); got != "10.99.42.2" {
			t.Errorf("host 2 address = %s, want 10.99.42.2", got)
		}
		if h3.Addr.IsValid() {
			t.Errorf("host 3 has address %s despite NoIP", h3.Addr)
		}
		// The interface really has the configured MAC inside the namespace.
		out := l.MustExec(h1.NS, "cat", "/sys/class/net/aoe0/address")
		if strings.TrimSpace(string(out)) != "02:aa:bb:cc:dd:01" {
			t.Errorf("aoe0 in %s has MAC %q", h1.NS, out)
		}
		// The root port exists in the root namespace.
		if _, err := net.InterfaceByName(rootName); err != nil {
			t.Fatalf("root port %s missing: %v", rootName, err)
		}

		ping := func(from *Host, to *Host) error { return udpReach(from, to, 1000) }
		if err := ping(h1, h2); err != nil {
			t.Fatalf("ping %s -> %s failed: %v", h1.NS, h2.IP(), err)
		}
		// The host namespace must not reach the outside world: it has no
		// route but the LAN's subnet.
		if out, err := l.Exec(h1.NS, "ip", "route", "get", "1.1.1.1"); err == nil {
			t.Errorf("host namespace has a route out of the LAN: %s", out)
		}

		// Jumbo frames cross the LAN after SetMTU (DF set, 8972 B payload).
		l.SetMTU(9000)
		if err := udpReach(h1, h2, 8972); err != nil {
			t.Errorf("jumbo datagram after SetMTU(9000) failed: %v", err)
		}
		if ifi, _ := net.InterfaceByName(rootName); ifi == nil || ifi.MTU != 9000 {
			t.Errorf("root port MTU not changed to 9000: %+v", ifi)
		}

		// LinkDown partitions host 2; LinkUp heals it.
		l.LinkDown(h2.NS)
		if err := ping(h1, h2); err == nil {
			t.Errorf("ping to host 2 succeeded with its link down")
		}
		l.LinkUp(h2.NS)
		ok := false
		for i := 0; i < 20 && !ok; i++ { // carrier comes back asynchronously
			ok = ping(h1, h2) == nil
		}
		if !ok {
			t.Errorf("ping to host 2 fails after LinkUp")
		}

		// Start/Output/Stop: a process runs in the namespace, its output is
		// captured, and Stop ends it by PID.
		cmd := l.Start(h2.NS, "sh", "-c", "cat /sys/class/net/aoe0/address; exec sleep 60")
		if out, ok := l.WaitOutput(cmd, regexp.MustCompile(h2.MAC.String()), 5*time.Second); !ok {
			t.Errorf("started process did not run in %s: stdout %q", h2.NS, out)
		}
		l.Stop(cmd, syscall.SIGTERM)
		if done, _ := l.Exited(cmd); !done {
			t.Errorf("Stop did not end pid %d", cmd.Process.Pid)
		}

		// InNS: a socket opened in fn lives in the namespace (its
		// interfaces are visible, the root port is not).
		err := InNS(h1.NS, func() error {
			if _, err := net.InterfaceByName("aoe0"); err != nil {
				return err
			}
			if _, err := net.InterfaceByName(rootName); err == nil {
				t.Errorf("root port visible inside %s", h1.NS)
			}
			return nil
		})
		if err != nil {
			t.Errorf("InNS: %v", err)
		}

		// A second process is left running on purpose: teardown must end it.
		l.Start(h3.NS, "sleep", "60")
	})
	left, err := Leftovers(id)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("teardown left %v", left)
	}
	if _, err := net.InterfaceByName(rootName); err == nil {
		t.Errorf("root port %s still exists after teardown", rootName)
	}
}

// TestTeardownOnFailure checks that a LAN is removed when the test using it
// fails half-way (t.Cleanup runs on FailNow too).
func TestTeardownOnFailure(t *testing.T) {
	RequireRoot(t)
	var id string
	ft := &fakeT{TB: t}
	func() {
		defer func() { recover() }() // FailNow panics in the fake
		defer ft.runCleanups()
		l := New(ft, Options{Hosts: 1, RootPorts: 1})
		id = l.ID
		l.Start(l.Host(1).NS, "sleep", "60")
		ft.FailNow()
	}()
	left, err := Leftovers(id)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("teardown after failure left %v", left)
	}
}

// fakeT collects cleanups and turns FailNow into a panic, so a test can
// observe what a failing test leaves behind.
type fakeT struct {
	testing.TB
	cleanups []func()
}

func (f *fakeT) Cleanup(fn func()) { f.cleanups = append(f.cleanups, fn) }
func (f *fakeT) FailNow()          { panic("FailNow") }
func (f *fakeT) Fatalf(format string, args ...any) {
	f.TB.Logf(format, args...)
	panic("Fatalf")
}
func (f *fakeT) runCleanups() {
	for i := len(f.cleanups) - 1; i >= 0; i-- {
		f.cleanups[i]()
	}
}
