package node

import (
	"errors"
	"fmt"
	"os"
	"strings"

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
