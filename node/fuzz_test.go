package node

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"reflect"
	"strings"
	"testing"
)

// The admin API's request decoders are what a peer (and, on the unix
// socket, a local user) reaches first. FuzzAdminDecoders runs every one of
// them on the same body: none may panic, and a body one of them accepts
// must survive a round trip through encoding/json unchanged (so the value
// the handler acts on is the value the sender meant).
func FuzzAdminDecoders(f *testing.F) {
	for _, s := range []string{
		``, `{}`, `null`, `[]`, `{"address":"10.0.0.1:7000"}`, `{"address":"[::1]:7000"}`,
		`{"id":"n2","address":"h:1","exports":[{"shelf":1,"slot":0,"size":1024}]}`,
		`{"id":"n2","address":"h:1","exports":[],"promote":true,"forwarded":true,"token":"abcdefabcdefabcdef"}`,
		`{"id":"n2","address":"h:1","forwarded":true}`, `{"to":"n3"}`, `{"index":18446744073709551615}`,
		`{"address":"10.0.0.1:7000"} {}`, `{"a":1}`, `{"exports":[{"size":-512}]}`, "\xef\xbb\xbf{}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		roundTrip(t, "join", body, decodeJoinRequest)
		roundTrip(t, "peer join", body, decodePeerJoinRequest)
		roundTrip(t, "peer remove", body, decodePeerRemoveRequest)
		roundTrip(t, "transfer", body, decodeTransferRequest)
		roundTrip(t, "checksum", body, decodeChecksumRequest)
		_ = decodeEmpty(bytes.NewReader(body))
	})
}

func roundTrip[T any](t *testing.T, what string, body []byte, dec func(io.Reader) (T, error)) {
	t.Helper()
	v, err := dec(bytes.NewReader(body))
	if err != nil {
		return
	}
	enc, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("%s: accepted %q but cannot re-encode: %v", what, body, err)
	}
	w, err := dec(bytes.NewReader(enc))
	if err != nil {
		t.Fatalf("%s: accepted %q, but its re-encoding %s is refused: %v", what, body, enc, err)
	}
	if !reflect.DeepEqual(normalize(v), normalize(w)) {
		t.Fatalf("%s: %q decodes to %+v, its re-encoding to %+v", what, body, v, w)
	}
}

// normalize treats a nil and an empty slice alike (omitempty-free JSON
// turns one into the other).
func normalize(v any) string {
	b, _ := json.Marshal(v)
	return strings.ReplaceAll(string(b), "null", "[]")
}

// FuzzParseConfig: the configuration parser never panics, every error names
// the file, and an accepted file stays accepted (and equal) when the
// parsed configuration is checked for cluster mode.
func FuzzParseConfig(f *testing.F) {
	for _, p := range []string{"../ops/examples/node.toml", "../ops/examples/serve.toml"} {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	for _, s := range []string{
		"", "node_id = \"n1\"\n", "[[export]]\nshelf = 1\nslot = 0\nnetif = \"x\"\npath = \"/x\"\n",
		"heartbeat_timeout = \"-1s\"\n", "insecure = true\ntls_cert = \"a\"\n", "bogus = 1\n", "[[export]]\nmask = [\"zz\"]\n",
		"node_id = \"n1\"\ndata_dir = \"/d\"\nraft_addr = \"127.0.0.1:1\"\ninsecure = true\nleader_lease = \"1h\"\n[[export]]\nshelf = 1\nslot = 0\nnetif = \"x\"\npath = \"/x\"\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig("fuzz.toml", data)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz.toml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		c.ApplyClusterDefaults()
		_ = c.ValidateCluster()
		for i := range c.Exports {
			_ = c.Exports[i].Addr().String()
		}
	})
}
