package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/node"
)

// `vblade compat FILE` serves the one export an /etc/vblade.conf.d/NAME.conf
// file of Debian's vblade-persistence describes, so that a vblade user's
// configuration keeps working under vblade@NAME.service unchanged.
//
// The files are "a POSIX shell fragment" that the systemd side reads as an
// EnvironmentFile (no expansion):
//
//	shelf=14
//	slot=2
//	netif=ens3
//	filename=/dev/mapper/export
//	options='-r -m 11:22:33:44:55:66,22:33:44:55:66:77 -o 8'
//	ionice='--class best-effort --classdata 7'
//
// shelf, slot, netif and filename are required; options are vblade's command
// line options; ionice sets the I/O scheduling class as ionice(1) would.

const compatUsage = "usage: vblade compat [--check] [--state-dir DIR] [--log-level LEVEL] /etc/vblade.conf.d/NAME.conf"

// debianIonice is what Debian's vblade@.service applies when the file sets
// no ionice=: best effort, lowest priority.
const debianIonice = "-c2 -n7"

// compatConfig is one parsed vblade.conf.d file.
type compatConfig struct {
	Shelf, Slot, Netif, Filename string
	Options                      []string
	Ionice                       string
	// Unknown lists variables the file sets that vblade-persistence does
	// not know; they are harmless there (plain shell variables) and warned
	// about here.
	Unknown []string
}

// args is the classic command line the file stands for, in the order
// Debian's unit runs it: operands first, options after (vblade's getopt
// permutes, and so does parseClassic).
func (c *compatConfig) args() []string {
	return append([]string{c.Shelf, c.Slot, c.Netif, c.Filename}, c.Options...)
}

// parseCompat reads a vblade.conf.d file. name is used in messages.
func parseCompat(name string, data []byte) (*compatConfig, error) {
	vars := map[string]string{}
	c := &compatConfig{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := strings.TrimSpace(sc.Text())
		// Backslash-newline continues a line, in sh and in EnvironmentFile.
		for strings.HasSuffix(line, `\`) && sc.Scan() {
			lineNo++
			line = line[:len(line)-1] + strings.TrimSpace(sc.Text())
		}
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		key, raw, ok := strings.Cut(line, "=")
		if !ok || !validVarName(key) {
			return nil, fmt.Errorf("%s:%d: %q is not a variable assignment (want name=value, e.g. shelf=1)", name, lineNo, line)
		}
		words, err := shellWords(raw)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %s: %w", name, lineNo, key, err)
		}
		// name=a b is two words in sh (a command run with name=a); both
		// readers of these files take the whole value, so join them.
		vars[key] = strings.Join(words, " ")
		switch key {
		case "shelf", "slot", "netif", "filename", "options", "ionice":
		default:
			c.Unknown = append(c.Unknown, key)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	c.Shelf, c.Slot, c.Netif, c.Filename = vars["shelf"], vars["slot"], vars["netif"], vars["filename"]
	var missing []string
	for _, k := range []string{"shelf", "slot", "netif", "filename"} {
		if vars[k] == "" {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%s: %s not set: vblade-persistence needs shelf=, slot=, netif= and filename= (see vblade-persistence(5))",
			name, strings.Join(missing, ", "))
	}
	// The options value is split into words as systemd splits an unquoted
	// $options in ExecStart=, plus quoting, which sh would honour.
	opts, err := shellWords(vars["options"])
	if err != nil {
		return nil, fmt.Errorf("%s: options: %w", name, err)
	}
	c.Options = opts
	c.Ionice = vars["ionice"]
	if _, ok := vars["ionice"]; !ok {
		c.Ionice = debianIonice
	}
	return c, nil
}

func validVarName(s string) bool {
	if s == "" || s[0] >= '0' && s[0] <= '9' {
		return false
	}
	for _, r := range s {
		if !(r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

// shellWords splits s into words with sh quoting: '...' literal, "..." with
// \" \\ \$ \` escapes, backslash escapes outside quotes, # starting a comment
// at a word boundary. Expansions ($var, $(cmd)) are refused: systemd would
// pass them literally and sh would expand them, so their meaning is
// ambiguous.
func shellWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case ch == ' ' || ch == '\t':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case ch == '#' && !inWord:
			return words, nil
		case ch == '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, errors.New("unterminated ' quote")
			}
			cur.WriteString(s[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case ch == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && strings.IndexByte("\"\\$`", s[i+1]) >= 0 {
					i++
				} else if s[i] == '$' || s[i] == '`' {
					return nil, errors.New("shell expansion ($ or `) is not supported: write the value literally")
				}
				cur.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, errors.New(`unterminated " quote`)
			}
			inWord = true
		case ch == '\\':
			if i+1 < len(s) {
				i++
				cur.WriteByte(s[i])
			}
			inWord = true
		case ch == '$' || ch == '`':
			return nil, errors.New("shell expansion ($ or `) is not supported: write the value literally")
		default:
			cur.WriteByte(ch)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// ioprio classes, as in linux/ioprio.h.
const (
	ioprioClassRT   = 1
	ioprioClassBE   = 2
	ioprioClassIdle = 3
	ioprioWhoProc   = 1
)

// parseIonice understands the ionice(1) options vblade-persistence files
// use: -c/--class (number or realtime, best-effort, idle), -n/--classdata,
// and -t/--ignore (failures are not fatal). It returns the ioprio value.
func parseIonice(s string) (prio int, ignore bool, err error) {
	words, err := shellWords(s)
	if err != nil {
		return 0, false, err
	}
	class, data := ioprioClassBE, 4
	for i := 0; i < len(words); i++ {
		w := words[i]
		name, val, hasVal := strings.Cut(w, "=")
		if !strings.HasPrefix(w, "--") {
			name, val, hasVal = w, "", false
			if len(w) > 2 && w[0] == '-' && (w[1] == 'c' || w[1] == 'n') {
				name, val, hasVal = w[:2], w[2:], true
			}
		}
		switch name {
		case "-t", "--ignore":
			ignore = true
			continue
		case "-c", "--class", "-n", "--classdata":
		default:
			return 0, false, fmt.Errorf("ionice option %q not supported (want -c/--class, -n/--classdata, -t)", w)
		}
		if !hasVal {
			if i+1 >= len(words) {
				return 0, false, fmt.Errorf("ionice option %s needs a value", w)
			}
			i++
			val = words[i]
		}
		if name == "-c" || name == "--class" {
			switch strings.ToLower(val) {
			case "1", "realtime":
				class = ioprioClassRT
			case "2", "best-effort":
				class = ioprioClassBE
			case "3", "idle":
				class = ioprioClassIdle
			case "0", "none":
				class = 0
			default:
				return 0, false, fmt.Errorf("ionice class %q: want realtime, best-effort, idle or 1-3", val)
			}
			continue
		}
		n, err := strconv.Atoi(val)
		if err != nil || n < 0 || n > 7 {
			return 0, false, fmt.Errorf("ionice classdata %q: want 0-7", val)
		}
		data = n
	}
	if class == ioprioClassIdle || class == 0 {
		data = 0
	}
	return class<<13 | data, ignore, nil
}

// setIoprio applies prio to every thread of this process. The I/O priority
// is per thread on Linux, and threads inherit it from the one that creates
// them, so setting it on the existing threads early covers the later ones.
func setIoprio(prio int) error {
	tids, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, d := range tids {
		tid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		if _, _, e := syscall.Syscall(syscall.SYS_IOPRIO_SET, ioprioWhoProc, uintptr(tid), uintptr(prio)); e != 0 && e != syscall.ESRCH {
			return e
		}
	}
	return nil
}

// compatMain runs `vblade compat`.
func compatMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vblade compat", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprintln(stderr, compatUsage); fs.PrintDefaults() }
	check := fs.Bool("check", false, "validate the file and exit")
	stateDir := fs.String("state-dir", os.Getenv("VBLADE_STATE_DIR"), "keep mask lists, config strings and reservations here across restarts")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, compatUsage)
		return 2
	}
	path := fs.Arg(0)
	data, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintf(stderr, "vblade: %v (vblade@NAME.service reads /etc/vblade.conf.d/NAME.conf)\n", err)
		return 1
	}
	cc, err := parseCompat(path, data)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	for _, k := range cc.Unknown {
		fmt.Fprintf(stderr, "vblade: %s: ignoring unknown variable %s (vblade-persistence knows shelf, slot, netif, filename, options, ionice)\n", path, k)
	}
	o, err := parseClassic(cc.args(), stderr)
	if err != nil {
		fmt.Fprintf(stderr, "vblade: %s: shelf/slot/netif/filename/options do not form a valid vblade command line (vblade %s): %v\n",
			path, strings.Join(cc.args(), " "), err)
		return 1
	}
	prio, ignoreIoprio, err := parseIonice(cc.Ionice)
	if err != nil {
		fmt.Fprintf(stderr, "vblade: %s: ionice=%q: %v\n", path, cc.Ionice, err)
		return 1
	}
	if err := o.export.Validate(); err != nil {
		fmt.Fprintf(stderr, "vblade: %s: %v\n", path, err)
		return 1
	}
	if *check {
		fmt.Fprintf(stdout, "%s: ok (e%d.%d on %s: %s)\n", path, o.export.Shelf, o.export.Slot, o.export.Netif, o.export.Path)
		return 0
	}
	if err := setIoprio(prio); err != nil && !ignoreIoprio {
		fmt.Fprintf(stderr, "vblade: %s: ionice=%q: %v (realtime needs CAP_SYS_NICE; add -t to ignore)\n", path, cc.Ionice, err)
		return 1
	}
	log, err := newLogger(*logLevel, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	started := printStarted(stdout)
	s := &node.Standalone{
		StateDir: *stateDir,
		Exports:  []node.Export{o.export},
		Logger:   log.With("instance", strings.TrimSuffix(filepath.Base(path), ".conf")),
		Started: func(e *node.Export, t *aoe.Target) {
			started(e, t)
			// Under vblade@.service (Type=notify) this is the start.
			node.NotifyReady()
		},
	}
	return runUntilSignal(s.Run, stderr)
}
