// Package netlab builds a private Ethernet LAN out of network namespaces for
// tests that put real frames on a wire: AoE targets and initiators, and later
// Raft nodes talking to each other over IP.
//
// AoE is unauthenticated layer-2 broadcast, so a test must never open an AoE
// socket on an interface it did not create (eth0 would carry our broadcasts to
// whatever else shares its segment). A LAN therefore consists only of objects
// it creates itself:
//
//	ns <prefix>-br : bridge br0, one bridge port per host ("p1", "p2", ...)
//	                 and per root port ("r1", ...)
//	ns <prefix>-h1 : veth "aoe0" (MAC and optional IPv4 10.99.X.1/24) <-> p1
//	...
//	root namespace : veth with a unique name (RootPort) <-> r1, so an
//	                 in-process client can open a raw socket without setns
//
// Every name carries the test process's PID and a per-process counter, so
// concurrent test binaries never collide. Teardown (registered with
// t.Cleanup, so it also runs when the test fails) kills the processes the LAN
// started, by PID, and deletes the namespaces and the root-namespace veths.
// New also removes leftovers of earlier test processes that died without
// cleaning up (their PID no longer exists).
package netlab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// NSPrefix starts the name of every namespace netlab creates. The shared
// linux-initiator harness uses "aoelx-" and ops/e2e uses "vbha-e2e-", so the
// three never touch each other's namespaces.
const NSPrefix = "vbnl-"

// rootIfPrefix starts the name of every root-namespace veth netlab creates.
const rootIfPrefix = "vbnl"

// execTimeout bounds every helper command (ip, sysctl, ...), so a wedged
// command fails the test instead of hanging it.
const execTimeout = 30 * time.Second

var lanSeq atomic.Uint32

// HostOptions configures one host namespace.
type HostOptions struct {
	// MAC of the host's interface; empty: 02:00:00:<lan>:<idx>:01, unique
	// within the LAN (locally administered).
	MAC string
	// MTU of the host's interface; 0: the LAN's MTU.
	MTU int
	// NoIP leaves the interface without an IPv4 address (by default host i
	// gets 10.99.<Subnet>.<i>/24).
	NoIP bool
}

// Options configures a LAN.
type Options struct {
	// Hosts is the number of host namespaces when HostOpts is empty.
	Hosts int
	// HostOpts configures each host; it overrides Hosts.
	HostOpts []HostOptions
	// RootPorts is the number of veth ends to leave in the root namespace.
	RootPorts int
	// MTU of the bridge and every link; 0: 1500.
	MTU int
	// Subnet is X in 10.99.X.0/24; 0: 1. Only the namespaces carry these
	// addresses, so LANs of concurrent tests do not conflict.
	Subnet int
	// IfName is the name of the interface in each host namespace; "": aoe0.
	IfName string
}

// Host is one namespace on the LAN.
type Host struct {
	Index int    // 1-based
	NS    string // namespace name, for `ip netns exec`
	If    string // interface name inside NS
	MAC   net.HardwareAddr
	Addr  netip.Prefix // zero when the host has no address
	port  string       // bridge-side peer in the bridge namespace
}

// IP is the host's IPv4 address (zero Addr if it has none).
func (h *Host) IP() netip.Addr { return h.Addr.Addr() }

// RootPort is a veth end in the root namespace attached to the bridge.
type RootPort struct {
	Name string // interface name in the root namespace
	MAC  net.HardwareAddr
	port string
}

// LAN is a bridge in its own namespace with hosts and root ports on it.
type LAN struct {
	tb       testing.TB
	ID       string // unique: <pid>-<seq>
	BridgeNS string
	Hosts    []*Host
	Root     []*RootPort
	mtu      int
	dir      string // log directory

	mu    sync.Mutex
	procs []*proc
	down  bool
}

type proc struct {
	cmd    *exec.Cmd
	done   chan struct{}
	err    error
	stdout *os.File
	stderr *os.File
}

// RequireRoot skips the test, loudly, when network namespaces cannot be used:
// not root, no `ip` command, or `ip netns add` fails. CI runs as root, so a
// skip there is a configuration error worth reading in the log.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("SKIP (needs root): netlab builds network namespaces and veth pairs; run the tests as root (CI does)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		tb.Skip("SKIP: the `ip` command (iproute2) is not installed; netlab needs it")
	}
	probe := fmt.Sprintf("%sprobe-%d-%d", NSPrefix, os.Getpid(), lanSeq.Add(1))
	if out, err := run(context.Background(), "ip", "netns", "add", probe); err != nil {
		tb.Skipf("SKIP: `ip netns add` fails here (%v: %s); network namespace tests cannot run", err, out)
	}
	_, _ = run(context.Background(), "ip", "netns", "del", probe)
}

// New builds a LAN and registers its teardown with tb.Cleanup. It fails the
// test when any step fails (after undoing the steps already done).
func New(tb testing.TB, opts Options) *LAN {
	tb.Helper()
	RequireRoot(tb)
	sweepStale(tb)

	hosts := opts.HostOpts
	if len(hosts) == 0 {
		hosts = make([]HostOptions, opts.Hosts)
	}
	if len(hosts) > 250 || opts.RootPorts > 9 {
		tb.Fatalf("netlab: at most 250 hosts and 9 root ports (asked %d, %d)", len(hosts), opts.RootPorts)
	}
	mtu := opts.MTU
	if mtu == 0 {
		mtu = 1500
	}
	subnet := opts.Subnet
	if subnet == 0 {
		subnet = 1
	}
	ifname := opts.IfName
	if ifname == "" {
		ifname = "aoe0"
	}
	seq := lanSeq.Add(1)
	l := &LAN{
		tb:       tb,
		ID:       fmt.Sprintf("%d-%d", os.Getpid(), seq),
		mtu:      mtu,
		dir:      tb.TempDir(),
		BridgeNS: "",
	}
	l.BridgeNS = NSPrefix + l.ID + "-br"
	// Register teardown before creating anything: a failure half-way must
	// still remove what exists.
	tb.Cleanup(l.Close)

	must := func(args ...string) {
		tb.Helper()
		if out, err := run(context.Background(), args...); err != nil {
			tb.Fatalf("netlab: %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	br := l.BridgeNS
	must("ip", "netns", "add", br)
	must("ip", "-n", br, "link", "set", "lo", "up")
	// No STP and no forwarding delay: the LAN forwards from the first frame.
	// No multicast snooping: AoE is broadcast and must reach every port.
	must("ip", "-n", br, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0", "mcast_snooping", "0")
	must("ip", "-n", br, "link", "set", "br0", "mtu", strconv.Itoa(mtu), "up")
	_, _ = run(context.Background(), "ip", "netns", "exec", br, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")

	for i, ho := range hosts {
		idx := i + 1
		h := &Host{Index: idx, NS: fmt.Sprintf("%s%s-h%d", NSPrefix, l.ID, idx), If: ifname, port: fmt.Sprintf("p%d", idx)}
		mac := ho.MAC
		if mac == "" {
			mac = fmt.Sprintf("02:00:%02x:%02x:%02x:01", byte(seq>>8), byte(seq), idx)
		}
		hw, err := net.ParseMAC(mac)
		if err != nil || len(hw) != 6 {
			tb.Fatalf("netlab: host %d: bad MAC %q", idx, mac)
		}
		h.MAC = hw
		hmtu := ho.MTU
		if hmtu == 0 {
			hmtu = mtu
		}
		must("ip", "netns", "add", h.NS)
		l.Hosts = append(l.Hosts, h)
		must("ip", "-n", h.NS, "link", "set", "lo", "up")
		must("ip", "-n", br, "link", "add", h.port, "mtu", strconv.Itoa(max(hmtu, mtu)), "type", "veth", "peer", "name", ifname, "netns", h.NS)
		must("ip", "-n", br, "link", "set", h.port, "master", "br0", "up")
		// IPv6 autoconfiguration would put router solicitations and DAD
		// frames on the LAN; tests that count frames must not see them.
		_, _ = run(context.Background(), "ip", "netns", "exec", h.NS, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
		must("ip", "-n", h.NS, "link", "set", ifname, "address", hw.String(), "mtu", strconv.Itoa(hmtu), "up")
		if !ho.NoIP {
			h.Addr = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, byte(subnet), byte(idx)}), 24)
			must("ip", "-n", h.NS, "addr", "add", h.Addr.String(), "dev", ifname)
		}
	}
	for i := 0; i < opts.RootPorts; i++ {
		idx := i + 1
		// IFNAMSIZ is 16: "vbnl" + pid (hex, <= 6) + seq (hex, <= 3) + "r" + idx fits.
		rp := &RootPort{Name: fmt.Sprintf("%s%x%03xr%d", rootIfPrefix, os.Getpid(), seq&0xfff, idx), port: fmt.Sprintf("r%d", idx)}
		if len(rp.Name) > 15 {
			tb.Fatalf("netlab: root port name %q too long", rp.Name)
		}
		// Both ends get the MTU: a veth drops (ENOBUFS on send) a frame bigger
		// than its peer's MTU.
		must("ip", "link", "add", rp.Name, "mtu", strconv.Itoa(mtu), "type", "veth", "peer", "name", rp.port, "mtu", strconv.Itoa(mtu), "netns", br)
		l.Root = append(l.Root, rp)
		must("ip", "-n", br, "link", "set", rp.port, "master", "br0", "up")
		_, _ = run(context.Background(), "sysctl", "-qw", "net.ipv6.conf."+rp.Name+".disable_ipv6=1")
		hw := net.HardwareAddr{0x02, 0xfe, byte(seq >> 8), byte(seq), 0x00, byte(idx)}
		rp.MAC = hw
		must("ip", "link", "set", rp.Name, "address", hw.String(), "up")
	}
	// A veth reports carrier only once both ends are up; wait for it so the
	// first frame a test sends is not lost.
	l.waitUp()
	return l
}

func (l *LAN) waitUp() {
	deadline := time.Now().Add(5 * time.Second)
	for _, rp := range l.Root {
		for {
			b, err := os.ReadFile("/sys/class/net/" + rp.Name + "/operstate")
			if err == nil && strings.TrimSpace(string(b)) == "up" {
				break
			}
			if time.Now().After(deadline) {
				l.tb.Fatalf("netlab: root port %s never came up", rp.Name)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// Host returns host i (1-based).
func (l *LAN) Host(i int) *Host {
	if i < 1 || i > len(l.Hosts) {
		l.tb.Fatalf("netlab: no host %d (LAN has %d)", i, len(l.Hosts))
	}
	return l.Hosts[i-1]
}

// LogDir is the directory holding the logs of started processes.
func (l *LAN) LogDir() string { return l.dir }

// Exec runs a command to completion inside namespace ns (a Host's NS or
// BridgeNS; "" is the root namespace) and returns its combined output. It is
// bounded by execTimeout.
func (l *LAN) Exec(ns string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), execTimeout)
	defer cancel()
	return run(ctx, nsArgs(ns, args)...)
}

// MustExec is Exec that fails the test on error.
func (l *LAN) MustExec(ns string, args ...string) []byte {
	l.tb.Helper()
	out, err := l.Exec(ns, args...)
	if err != nil {
		l.tb.Fatalf("netlab: in %s: %s: %v: %s", nsLabel(ns), strings.Join(args, " "), err, out)
	}
	return out
}

// Start starts a long-running command inside namespace ns. Its stdout and
// stderr go to files in the LAN's log directory (see Output). `ip netns exec`
// execs the command in place, so the returned Cmd's PID is the command's own:
// Stop and the teardown signal exactly that process.
func (l *LAN) Start(ns string, args ...string) *exec.Cmd {
	l.tb.Helper()
	cmd, err := l.TryStart(ns, args...)
	if err != nil {
		l.tb.Fatal(err)
	}
	return cmd
}

// TryStart is Start that returns the error instead of failing the test.
func (l *LAN) TryStart(ns string, args ...string) (*exec.Cmd, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.down {
		return nil, errors.New("netlab: Start after teardown")
	}
	n := len(l.procs) + 1
	base := filepath.Join(l.dir, fmt.Sprintf("%02d-%s", n, sanitize(filepath.Base(args[0]))))
	so, err := os.Create(base + ".stdout")
	if err != nil {
		return nil, err
	}
	se, err := os.Create(base + ".stderr")
	if err != nil {
		so.Close()
		return nil, err
	}
	a := nsArgs(ns, args)
	cmd := exec.Command(a[0], a[1:]...)
	cmd.Stdout, cmd.Stderr = so, se
	// Own process group: a ^C to `go test` must not reach the child before
	// our cleanup does, and the child never inherits our terminal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		so.Close()
		se.Close()
		return nil, fmt.Errorf("netlab: start %s in %s: %w", strings.Join(args, " "), nsLabel(ns), err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{}), stdout: so, stderr: se}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	l.procs = append(l.procs, p)
	l.tb.Logf("netlab: started pid %d in %s: %s (logs %s.*)", cmd.Process.Pid, nsLabel(ns), strings.Join(args, " "), base)
	return cmd, nil
}

func (l *LAN) find(cmd *exec.Cmd) *proc {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, p := range l.procs {
		if p.cmd == cmd {
			return p
		}
	}
	return nil
}

// Output returns what a started command wrote so far.
func (l *LAN) Output(cmd *exec.Cmd) (stdout, stderr string) {
	p := l.find(cmd)
	if p == nil {
		return "", ""
	}
	a, _ := os.ReadFile(p.stdout.Name())
	b, _ := os.ReadFile(p.stderr.Name())
	return string(a), string(b)
}

// WaitOutput waits until the command's stdout matches re, or it exits, or
// the timeout passes. It returns the stdout and whether it matched.
func (l *LAN) WaitOutput(cmd *exec.Cmd, re *regexp.Regexp, timeout time.Duration) (string, bool) {
	p := l.find(cmd)
	deadline := time.Now().Add(timeout)
	for {
		out, _ := l.Output(cmd)
		if re.MatchString(out) {
			return out, true
		}
		if p == nil || time.Now().After(deadline) {
			return out, false
		}
		select {
		case <-p.done:
			out, _ = l.Output(cmd)
			return out, re.MatchString(out)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Exited reports whether a started command has exited, and its Wait error.
func (l *LAN) Exited(cmd *exec.Cmd) (bool, error) {
	p := l.find(cmd)
	if p == nil {
		return true, errors.New("netlab: command not started by this LAN")
	}
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// Wait waits up to timeout for a started command to exit on its own.
func (l *LAN) Wait(cmd *exec.Cmd, timeout time.Duration) (exited bool, err error) {
	p := l.find(cmd)
	if p == nil {
		return true, errors.New("netlab: command not started by this LAN")
	}
	select {
	case <-p.done:
		return true, p.err
	case <-time.After(timeout):
		return false, nil
	}
}

// Stop sends sig to a started command (by PID), waits up to 3 s, then
// SIGKILLs it. SIGKILL as sig is a crash; SIGTERM an orderly stop.
func (l *LAN) Stop(cmd *exec.Cmd, sig syscall.Signal) {
	p := l.find(cmd)
	if p == nil {
		return
	}
	stopProc(p, sig, 3*time.Second)
}

func stopProc(p *proc, sig syscall.Signal, grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// SetMTU sets the MTU of every link of the LAN: bridge, ports, host
// interfaces and root ports.
func (l *LAN) SetMTU(mtu int) {
	l.tb.Helper()
	m := strconv.Itoa(mtu)
	// Raise ports before the bridge and hosts after, so no link ever
	// carries frames bigger than its peer accepts during the change.
	for _, h := range l.Hosts {
		l.MustExec(l.BridgeNS, "ip", "link", "set", h.port, "mtu", m)
		l.MustExec("", "ip", "-n", h.NS, "link", "set", h.If, "mtu", m)
	}
	for _, rp := range l.Root {
		l.MustExec(l.BridgeNS, "ip", "link", "set", rp.port, "mtu", m)
		l.MustExec("", "ip", "link", "set", rp.Name, "mtu", m)
	}
	l.MustExec(l.BridgeNS, "ip", "link", "set", "br0", "mtu", m)
	l.mtu = mtu
}

// MTU is the LAN's MTU as last set.
func (l *LAN) MTU() int { return l.mtu }

// LinkDown cuts a host (or root port, by name) from the bridge by setting its
// bridge-side port down: the host's interface loses carrier as if its cable
// were pulled. Processes keep running; this is how tests partition a node.
func (l *LAN) LinkDown(name string) { l.setPort(name, "down") }

// LinkUp reconnects what LinkDown cut.
func (l *LAN) LinkUp(name string) { l.setPort(name, "up") }

func (l *LAN) setPort(name, state string) {
	l.tb.Helper()
	port := ""
	for _, h := range l.Hosts {
		if h.NS == name || strconv.Itoa(h.Index) == name {
			port = h.port
		}
	}
	for _, rp := range l.Root {
		if rp.Name == name {
			port = rp.port
		}
	}
	if port == "" {
		l.tb.Fatalf("netlab: LinkDown/Up: no host or root port %q", name)
	}
	l.MustExec(l.BridgeNS, "ip", "link", "set", port, state)
}

// InNS runs fn on an OS thread that has joined namespace ns, so sockets fn
// opens live there (an in-process Raft node on a namespace's address, for
// instance). Goroutines fn starts do NOT inherit the namespace. If the
// thread cannot return to its original namespace it is left locked, and Go
// retires it when the goroutine ends.
func InNS(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			errc <- fmt.Errorf("netlab: open current netns: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + ns)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: open netns %s: %w", ns, err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: setns %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// Close kills every process the LAN started (SIGTERM, then SIGKILL, by PID)
// and deletes its namespaces and root ports. It runs from t.Cleanup; calling
// it earlier is allowed and idempotent.
func (l *LAN) Close() {
	l.mu.Lock()
	if l.down {
		l.mu.Unlock()
		return
	}
	l.down = true
	procs := l.procs
	l.mu.Unlock()

	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stopProc(p, syscall.SIGTERM, 2*time.Second)
			p.stdout.Close()
			p.stderr.Close()
		}()
	}
	wg.Wait()
	ctx := context.Background()
	// Deleting a namespace deletes the veths in it and so their peers;
	// the explicit root-port deletion covers a root port whose peer was
	// never moved into the bridge namespace.
	for _, rp := range l.Root {
		_, _ = run(ctx, "ip", "link", "del", rp.Name)
	}
	for _, h := range l.Hosts {
		if out, err := run(ctx, "ip", "netns", "del", h.NS); err != nil && !strings.Contains(string(out), "No such file") {
			l.tb.Logf("netlab: teardown: ip netns del %s: %v: %s", h.NS, err, out)
		}
	}
	if out, err := run(ctx, "ip", "netns", "del", l.BridgeNS); err != nil && !strings.Contains(string(out), "No such file") {
		l.tb.Logf("netlab: teardown: ip netns del %s: %v: %s", l.BridgeNS, err, out)
	}
}

// Leftovers lists namespaces and root-namespace links that belong to the
// LAN with the given ID (tests use it to prove teardown is complete).
func Leftovers(id string) ([]string, error) {
	var left []string
	nss, err := os.ReadDir("/run/netns")
	if err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	for _, e := range nss {
		if strings.HasPrefix(e.Name(), NSPrefix+id+"-") {
			left = append(left, "netns "+e.Name())
		}
	}
	pid, seq, ok := strings.Cut(id, "-")
	if !ok {
		return left, nil
	}
	p, _ := strconv.Atoi(pid)
	s, _ := strconv.Atoi(seq)
	links, err := net.Interfaces()
	if err != nil {
		return left, err
	}
	prefix := fmt.Sprintf("%s%x%03xr", rootIfPrefix, p, s&0xfff)
	for _, li := range links {
		if strings.HasPrefix(li.Name, prefix) {
			left = append(left, "link "+li.Name)
		}
	}
	return left, nil
}

var staleNS = regexp.MustCompile(`^` + regexp.QuoteMeta(NSPrefix) + `(\d+)-\d+-`)

// sweepStale deletes namespaces left by netlab test processes that no longer
// exist (killed with SIGKILL, for instance, so t.Cleanup never ran). A
// namespace of a live process is never touched.
func sweepStale(tb testing.TB) {
	nss, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range nss {
		m := staleNS.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		if pid == os.Getpid() || pidAlive(pid) {
			continue
		}
		if _, err := run(context.Background(), "ip", "netns", "del", e.Name()); err == nil {
			tb.Logf("netlab: removed stale namespace %s (pid %d is gone)", e.Name(), pid)
		}
	}
}

func pidAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

func nsArgs(ns string, args []string) []string {
	if ns == "" {
		return args
	}
	return append([]string{"ip", "netns", "exec", ns}, args...)
}

func nsLabel(ns string) string {
	if ns == "" {
		return "root namespace"
	}
	return "netns " + ns
}

func run(ctx context.Context, args ...string) ([]byte, error) {
	if ctx == context.Background() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, execTimeout)
		defer cancel()
	}
	return exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '/' || r == ' ' {
			return '_'
		}
		return r
	}, s)
}
