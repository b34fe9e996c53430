// Command vblade is the vblade-ha node daemon. With the classic arguments it
// is a drop-in for vblade 25:
//
//	vblade [-b bufcnt] [-o offset] [-l length] [-d] [-s] [-r] [-m mac[,mac...]] shelf slot netif filename
//
// and it has subcommands for what vblade never did: `vblade serve -c FILE`
// serves several exports from one TOML file, `vblade node -c FILE` runs a
// cluster node.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/node"
	"github.com/vblade-ha/vblade-ha/storage"
)

const usageLine = "usage: vblade [-b bufcnt] [-o offset] [-l length] [-d ] [-s] [-r] [ -m mac[,mac...] ] shelf slot netif filename"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "serve":
			return serveMain(args[1:], stdout, stderr)
		case "echo":
			return echoMain(args[1:], stdout, stderr)
		case "node":
			return nodeMain(args[1:], stdout, stderr)
		case "compat":
			return compatMain(args[1:], stdout, stderr)
		case "version", "--version":
			fmt.Fprintln(stdout, "vblade-ha", node.Version)
			return 0
		}
	}
	return classicMain(args, stdout, stderr)
}

// classicOpts is the parsed classic command line.
type classicOpts struct {
	export   node.Export
	stateDir string
	logLevel string
}

// parseClassic parses vblade's command line the way glibc getopt does with
// "b:dsrm:o:l:": clustered flags (-dsr), attached values (-b16), options
// anywhere among the operands, "--" ending options. Long options are ours.
func parseClassic(args []string, stderr io.Writer) (classicOpts, error) {
	o := classicOpts{stateDir: os.Getenv("VBLADE_STATE_DIR"), logLevel: "info"}
	e := &o.export
	e.BufCount = aoe.DefaultBufferCount
	var operands []string
	var masks []string
	usage := errors.New(usageLine)
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			operands = append(operands, args[i+1:]...)
			break
		}
		if strings.HasPrefix(a, "--") {
			name, val, hasVal := strings.Cut(a[2:], "=")
			switch name {
			case "state-dir", "log-level":
				if !hasVal {
					if i+1 >= len(args) {
						return o, usage
					}
					i++
					val = args[i]
				}
				if name == "state-dir" {
					o.stateDir = val
				} else {
					o.logLevel = val
				}
			case "help":
				return o, usage
			default:
				fmt.Fprintf(stderr, "vblade: unrecognized option '--%s'\n", name)
				return o, usage
			}
			continue
		}
		if len(a) < 2 || a[0] != '-' {
			operands = append(operands, a)
			continue
		}
		for j := 1; j < len(a); j++ {
			c := a[j]
			switch c {
			case 'd':
				e.Direct = true
			case 's':
				e.Sync = true
			case 'r':
				e.ReadOnly = true
			case 'b', 'm', 'o', 'l':
				val := a[j+1:]
				if val == "" {
					if i+1 >= len(args) {
						fmt.Fprintf(stderr, "vblade: option requires an argument -- '%c'\n", c)
						return o, usage
					}
					i++
					val = args[i]
				}
				j = len(a)
				switch c {
				case 'b':
					n, _ := strconv.Atoi(val) // atoi, as vblade: junk is 0, rejected below
					e.BufCount = n
				case 'm':
					masks = append(masks, strings.Split(val, ",")...)
				case 'o':
					n, err := strconv.ParseInt(val, 0, 64)
					if err != nil || n < 0 {
						return o, usage
					}
					e.Offset = n
				case 'l':
					n, err := strconv.ParseInt(val, 0, 64)
					if err != nil || n < 1 {
						return o, usage
					}
					e.Length = n
				}
			default:
				fmt.Fprintf(stderr, "vblade: invalid option -- '%c'\n", c)
				return o, usage
			}
		}
	}
	if len(operands) != 4 || e.BufCount <= 0 {
		return o, usage
	}
	// atoi semantics for shelf and slot, as vblade.
	shelf, _ := strconv.Atoi(operands[0])
	slot, _ := strconv.Atoi(operands[1])
	e.Shelf, e.Slot, e.Netif, e.Path = shelf, slot, operands[2], operands[3]
	for _, m := range masks {
		// vblade warns and carries on without a MAC it cannot parse.
		if _, err := aoe.ParseMAC(m); err != nil {
			fmt.Fprintf(stderr, "ignoring mask %s, parseether failure\n", m)
			continue
		}
		e.Masks = append(e.Masks, m)
	}
	return o, nil
}

func classicMain(args []string, stdout, stderr io.Writer) int {
	o, err := parseClassic(args, stderr)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	log, err := newLogger(o.logLevel, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	s := &node.Standalone{
		StateDir: o.stateDir,
		Exports:  []node.Export{o.export},
		Logger:   log,
		Started:  printStarted(stdout),
	}
	return runUntilSignal(s.Run, stderr)
}

// printStarted prints vblade's start line, which scripts parse.
func printStarted(w io.Writer) func(e *node.Export, t *aoe.Target) {
	return func(e *node.Export, t *aoe.Target) {
		mode := "O_RDWR"
		if e.ReadOnly {
			mode = "O_RDONLY"
		}
		fmt.Fprintf(w, "pid %d: e%d.%d, %d sectors %s\n", os.Getpid(), e.Shelf, e.Slot, t.Sectors(), mode)
	}
}

// runUntilSignal runs fn until SIGINT or SIGTERM and maps its error to an
// exit status.
func runUntilSignal(fn func(context.Context) error, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := fn(ctx); err != nil {
		fmt.Fprintln(stderr, "vblade:", err)
		return 1
	}
	return 0
}

func newLogger(level string, w io.Writer) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

// echoMain serves a target with no storage behind it (reads return zeros,
// writes are discarded). It is the wire-speed reference of `make bench`:
// the best any target can do on this LAN.
//
//	vblade echo [-b bufcnt] shelf slot netif size-in-MiB
func echoMain(args []string, stdout, stderr io.Writer) int {
	bufcnt := aoe.DefaultBufferCount
	if len(args) >= 2 && args[0] == "-b" {
		n, err := strconv.Atoi(args[1])
		if err != nil || n <= 0 {
			fmt.Fprintln(stderr, "usage: vblade echo [-b bufcnt] shelf slot netif size-in-MiB")
			return 1
		}
		bufcnt, args = n, args[2:]
	}
	if len(args) != 4 {
		fmt.Fprintln(stderr, "usage: vblade echo [-b bufcnt] shelf slot netif size-in-MiB")
		return 1
	}
	shelf, err1 := strconv.Atoi(args[0])
	slot, err2 := strconv.Atoi(args[1])
	mib, err3 := strconv.ParseInt(args[3], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil || mib <= 0 {
		fmt.Fprintln(stderr, "usage: vblade echo [-b bufcnt] shelf slot netif size-in-MiB")
		return 1
	}
	log, _ := newLogger("info", stderr)
	s := &node.Standalone{
		Exports: []node.Export{{Shelf: shelf, Slot: slot, Netif: args[2], Path: "(echo)", BufCount: bufcnt}},
		Logger:  log,
		Started: printStarted(stdout),
		OpenDisk: func(e *node.Export) (aoe.Disk, io.Closer, error) {
			return storage.NewZero(mib << 20), io.NopCloser(nil), nil
		},
	}
	return runUntilSignal(s.Run, stderr)
}
