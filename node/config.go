package node

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Version is the vblade-ha release.
const Version = "0.1.0"

// Config is the one TOML format of vblade-ha: `vblade serve -c FILE` uses the
// exports and the standalone keys; `vblade node -c FILE` uses the cluster
// keys as well.
type Config struct {
	// StateDir keeps standalone target state (mask lists, config strings,
	// reservations) across restarts. Empty: memory only.
	StateDir string `toml:"state_dir"`
	// LogLevel is debug, info, warn or error; LogFormat is text or json.
	LogLevel  string `toml:"log_level"`
	LogFormat string `toml:"log_format"`

	Exports []Export `toml:"export"`

	// Cluster mode (`vblade node`).
	NodeID string `toml:"node_id"`
	// DataDir holds the Raft log (bolt) and snapshot metadata.
	DataDir string `toml:"data_dir"`
	// RaftAddr is host:port to bind; it carries Raft and node-to-node admin
	// traffic. RaftAdvertise is the address peers use (default RaftAddr).
	RaftAddr      string `toml:"raft_addr"`
	RaftAdvertise string `toml:"raft_advertise"`
	// AdminSocket is the unix socket vbladectl talks to.
	AdminSocket string `toml:"admin_socket"`
	// MetricsAddr, if set, serves Prometheus metrics on host:port.
	MetricsAddr string `toml:"metrics_addr"`
	// MACMode is "virtual" (a per-target MAC that moves with leadership) or
	// "node" (the interface's own MAC, re-announced on failover).
	MACMode string `toml:"mac_mode"`
	// ClusterName seeds the virtual MACs; every node of a cluster must use
	// the same name.
	ClusterName string `toml:"cluster_name"`
	// Raft timing (see docs/ARCHITECTURE.md for the trade-off).
	HeartbeatTimeout Duration `toml:"heartbeat_timeout"`
	ElectionTimeout  Duration `toml:"election_timeout"`
	LeaderLease      Duration `toml:"leader_lease"`
	// SnapshotInterval and SnapshotThreshold tune log compaction.
	SnapshotInterval  Duration `toml:"snapshot_interval"`
	SnapshotThreshold uint64   `toml:"snapshot_threshold"`
	TrailingLogs      uint64   `toml:"trailing_logs"`

	// Peer authentication (see node/tls.go for the threat model). TLSCert
	// and TLSKey are this node's certificate and key, TLSCA the cluster CA
	// bundle peers must chain to; JoinTokenFile holds the secret a joining
	// node must present. All four are required unless Insecure is set.
	TLSCert       string `toml:"tls_cert"`
	TLSKey        string `toml:"tls_key"`
	TLSCA         string `toml:"tls_ca"`
	JoinTokenFile string `toml:"join_token_file"`
	// Insecure runs the node port as plain TCP with no authentication:
	// anyone who reaches it can rewrite every disk. Only for a test LAN or
	// a network that is itself the security boundary.
	Insecure bool `toml:"insecure"`
	// AdminGroup, if set, lets this group use the admin socket (mode 0660);
	// otherwise only its owner can (0600).
	AdminGroup string `toml:"admin_group"`
}

// Duration is a time.Duration written as a Go duration string ("500ms").
type Duration struct{ time.Duration }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("duration %q: %w", b, err)
	}
	if v < 0 {
		return fmt.Errorf("duration %q is negative", b)
	}
	d.Duration = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Defaults for cluster mode, tuned for a LAN.
const (
	DefaultAdminSocket      = "/run/vblade/admin.sock"
	DefaultHeartbeatTimeout = 500 * time.Millisecond
	DefaultElectionTimeout  = 500 * time.Millisecond
	DefaultClusterName      = "vblade-ha"
)

// ApplyClusterDefaults fills unset cluster keys.
func (c *Config) ApplyClusterDefaults() {
	if c.AdminSocket == "" {
		c.AdminSocket = DefaultAdminSocket
	}
	if c.MACMode == "" {
		c.MACMode = "virtual"
	}
	if c.ClusterName == "" {
		c.ClusterName = DefaultClusterName
	}
	if c.HeartbeatTimeout.Duration == 0 {
		c.HeartbeatTimeout.Duration = DefaultHeartbeatTimeout
	}
	if c.ElectionTimeout.Duration == 0 {
		c.ElectionTimeout.Duration = DefaultElectionTimeout
	}
	if c.LeaderLease.Duration == 0 {
		c.LeaderLease.Duration = c.HeartbeatTimeout.Duration / 2
	}
	if c.RaftAdvertise == "" {
		c.RaftAdvertise = c.RaftAddr
	}
}

// ValidateCluster checks the keys cluster mode needs.
func (c *Config) ValidateCluster() error {
	switch {
	case c.NodeID == "":
		return errors.New("node_id is required")
	case c.DataDir == "":
		return errors.New("data_dir is required")
	case c.RaftAddr == "":
		return errors.New("raft_addr is required (host:port this node listens on for Raft and peers)")
	case len(c.Exports) == 0:
		return errors.New("no [[export]] tables: a node needs at least one export")
	}
	if _, _, err := net.SplitHostPort(c.RaftAddr); err != nil {
		return fmt.Errorf("raft_addr %q: %w", c.RaftAddr, err)
	}
	if host, _, err := net.SplitHostPort(c.RaftAdvertise); err != nil || host == "" || net.ParseIP(host).IsUnspecified() {
		return fmt.Errorf("raft_advertise %q must be a host:port peers can reach (set it when raft_addr binds a wildcard address)", c.RaftAdvertise)
	}
	switch c.MACMode {
	case "virtual", "node":
	default:
		return fmt.Errorf("mac_mode %q: want \"virtual\" or \"node\"", c.MACMode)
	}
	if err := c.validateTLS(); err != nil {
		return err
	}
	if c.LeaderLease.Duration >= c.HeartbeatTimeout.Duration {
		return fmt.Errorf("leader_lease %v must be shorter than heartbeat_timeout %v, or a deposed leader could answer after a new one is elected",
			c.LeaderLease.Duration, c.HeartbeatTimeout.Duration)
	}
	return nil
}

// validateTLS enforces mutual TLS as the default: a cluster node without
// TLS material refuses to start unless insecure = true says so explicitly.
// The files themselves are checked when the node starts (NewNode).
func (c *Config) validateTLS() error {
	set := map[string]string{"tls_cert": c.TLSCert, "tls_key": c.TLSKey, "tls_ca": c.TLSCA, "join_token_file": c.JoinTokenFile}
	var missing, given []string
	for _, k := range []string{"tls_cert", "tls_key", "tls_ca", "join_token_file"} {
		if set[k] == "" {
			missing = append(missing, k)
		} else {
			given = append(given, k)
		}
	}
	if c.Insecure {
		if len(given) > 0 && c.TLSCert+c.TLSKey+c.TLSCA != "" {
			return fmt.Errorf("insecure = true but %s set: the node port is either TLS or plain; remove insecure (recommended) or the TLS keys", strings.Join(given, ", "))
		}
		return nil
	}
	if len(missing) > 0 {
		return fmt.Errorf("cluster mode needs peer authentication: %s not set; create a CA, node certificates and a join token with `vbladectl cluster certs --dir DIR --nodes ID,...` and set tls_cert, tls_key, tls_ca and join_token_file, or set insecure = true to run the node port unauthenticated (anyone who reaches it can rewrite every disk)",
			strings.Join(missing, ", "))
	}
	return nil
}

// LoadConfig reads and checks a configuration file. Unknown keys are errors,
// not silently ignored: a misspelt option that did nothing would be found
// only when it mattered.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return ParseConfig(path, data)
}

// ParseConfig parses configuration text; name is used in messages.
func ParseConfig(name string, data []byte) (*Config, error) {
	var c Config
	md, err := toml.Decode(string(data), &c)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("%s:%d:%d: %s", name, pe.Position.Line, pe.Position.Col, pe.Message)
		}
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("%s: unknown key(s): %s", name, strings.Join(keys, ", "))
	}
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return &c, nil
}

func (c *Config) validate() error {
	switch c.LogLevel {
	case "", "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log_level %q: want debug, info, warn or error", c.LogLevel)
	}
	switch c.LogFormat {
	case "", "text", "json":
	default:
		return fmt.Errorf("log_format %q: want text or json", c.LogFormat)
	}
	seen := map[string]bool{}
	for i := range c.Exports {
		e := &c.Exports[i]
		if e.BufCount == 0 {
			e.BufCount = 16
		}
		if err := e.Validate(); err != nil {
			return fmt.Errorf("export #%d: %w", i+1, err)
		}
		k := e.Addr().String()
		if seen[k] {
			return fmt.Errorf("export #%d: %s is exported twice", i+1, k)
		}
		seen[k] = true
	}
	return nil
}
