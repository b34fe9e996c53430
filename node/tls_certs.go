package node

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// A cluster's TLS material as `vbladectl cluster certs` writes it into one
// directory: the CA (ca.crt for every node, ca.key kept off the nodes), one
// certificate and key per node (ID.crt, ID.key) and the join token.
const (
	CAFile        = "ca.crt"
	CAKeyFile     = "ca.key"
	JoinTokenFile = "join-token"
)

// Default lifetimes. Node certificates are short enough that rotation is a
// routine the operator practises (reload is live, see tls.go).
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultNodeValidity = 825 * 24 * time.Hour
)

// CA is a cluster certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	PEM  []byte
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

// NewCA creates a self-signed ECDSA P-256 CA named after the cluster.
func NewCA(name string, validity time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{CommonName: name + " cluster CA", Organization: []string{"vblade-ha"}},
		NotBefore:             now.Add(-time.Hour), // tolerate clock skew between nodes
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// LoadCA reads a CA written by WriteFiles (or supplied by the operator: an
// ECDSA, RSA or Ed25519 key in PKCS#8, SEC 1 or PKCS#1 form).
func LoadCA(certPath, keyPath string) (*CA, error) {
	cpem, err := os.ReadFile(certPath)
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(cpem)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", certPath)
	}
	cert, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certPath, err)
	}
	kpem, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, err
	}
	kb, _ := pem.Decode(kpem)
	if kb == nil {
		return nil, fmt.Errorf("%s: no PEM key", keyPath)
	}
	var key *ecdsa.PrivateKey
	if k, err := x509.ParsePKCS8PrivateKey(kb.Bytes); err == nil {
		ek, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%s: only ECDSA CA keys can sign here (got %T); issue node certificates with your own tooling instead", keyPath, k)
		}
		key = ek
	} else if key, err = x509.ParseECPrivateKey(kb.Bytes); err != nil {
		return nil, fmt.Errorf("%s: not an ECDSA private key: %w", keyPath, err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%s does not belong to %s", keyPath, certPath)
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})}, nil
}

// IssueNode creates a node certificate for id, valid as server and client,
// naming id (CN and DNS SAN) and each host (IP or DNS SAN). It returns the
// certificate and key in PEM.
func (ca *CA) IssueNode(id string, hosts []string, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	if err := validNodeID(id); err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		Subject:      pkix.Name{CommonName: id, Organization: []string{"vblade-ha"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{id},
	}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		switch {
		case h == "":
		case net.ParseIP(h) != nil:
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(h))
		case h != id:
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}

// KeyPEM is the CA key in PKCS#8 PEM.
func (ca *CA) KeyPEM() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// NewJoinToken returns 32 random bytes, base64url encoded.
func NewJoinToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// CertsOptions configures GenerateCerts.
type CertsOptions struct {
	Dir     string
	Cluster string   // names the CA; default DefaultClusterName
	Nodes   []string // node ids
	// Hosts[i] is node i's raft_advertise host (IP or DNS name); empty or
	// short: the node id is the only name (it must then resolve).
	Hosts        []string
	NodeValidity time.Duration
	// Force replaces existing node certificates (rotation); the CA and the
	// join token are never replaced (delete them to start over).
	Force bool
}

// CertsResult lists what GenerateCerts wrote and reused.
type CertsResult struct {
	Written   []string
	ReusedCA  bool
	ReusedTok bool
}

// GenerateCerts writes (or completes) a cluster's TLS material in Dir: the
// CA if there is none, the join token if there is none, and a certificate
// per node. Keys are written 0600, never over an existing file unless Force
// applies to it.
func GenerateCerts(o CertsOptions) (*CertsResult, error) {
	if len(o.Nodes) == 0 {
		return nil, errors.New("no nodes given: pass the node ids (node_id of each node)")
	}
	if len(o.Hosts) > len(o.Nodes) {
		return nil, fmt.Errorf("%d hosts for %d nodes: give one host (the node's raft_advertise host) per node, in the same order", len(o.Hosts), len(o.Nodes))
	}
	if o.Cluster == "" {
		o.Cluster = DefaultClusterName
	}
	if o.NodeValidity == 0 {
		o.NodeValidity = DefaultNodeValidity
	}
	seen := map[string]bool{}
	for _, id := range o.Nodes {
		if err := validNodeID(id); err != nil {
			return nil, err
		}
		if strings.ContainsAny(id, `/\`) || id == "ca" {
			return nil, fmt.Errorf("node id %q cannot name a file here", id)
		}
		if seen[id] {
			return nil, fmt.Errorf("node %q listed twice", id)
		}
		seen[id] = true
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	res := &CertsResult{}
	caCrt, caKey := filepath.Join(o.Dir, CAFile), filepath.Join(o.Dir, CAKeyFile)
	var ca *CA
	if _, err := os.Stat(caCrt); err == nil {
		if ca, err = LoadCA(caCrt, caKey); err != nil {
			return nil, fmt.Errorf("existing CA in %s: %w (remove %s and %s to create a new CA)", o.Dir, err, CAFile, CAKeyFile)
		}
		res.ReusedCA = true
	} else {
		var err error
		if ca, err = NewCA(o.Cluster, DefaultCAValidity); err != nil {
			return nil, err
		}
		kp, err := ca.KeyPEM()
		if err != nil {
			return nil, err
		}
		if err := writeNew(caKey, kp, 0o600, false); err != nil {
			return nil, err
		}
		if err := writeNew(caCrt, ca.PEM, 0o644, false); err != nil {
			return nil, err
		}
		res.Written = append(res.Written, caCrt, caKey)
	}
	tokPath := filepath.Join(o.Dir, JoinTokenFile)
	if _, err := os.Stat(tokPath); err == nil {
		if _, err := readJoinToken(tokPath); err != nil {
			return nil, err
		}
		res.ReusedTok = true
	} else {
		tok, err := NewJoinToken()
		if err != nil {
			return nil, err
		}
		if err := writeNew(tokPath, []byte(tok+"\n"), 0o600, false); err != nil {
			return nil, err
		}
		res.Written = append(res.Written, tokPath)
	}
	for i, id := range o.Nodes {
		var hosts []string
		if i < len(o.Hosts) {
			hosts = strings.Split(o.Hosts[i], "+")
		}
		cp, kp, err := ca.IssueNode(id, hosts, o.NodeValidity)
		if err != nil {
			return nil, fmt.Errorf("node %s: %w", id, err)
		}
		crt, key := filepath.Join(o.Dir, id+".crt"), filepath.Join(o.Dir, id+".key")
		// Key first: a reader that sees the new certificate finds its key.
		if err := writeNew(key, kp, 0o600, o.Force); err != nil {
			return nil, err
		}
		if err := writeNew(crt, cp, 0o644, o.Force); err != nil {
			return nil, err
		}
		res.Written = append(res.Written, crt, key)
	}
	return res, nil
}

// writeNew writes a file atomically (temporary file and rename, so a node
// reloading its certificate never reads half a file); without replace it
// refuses to overwrite.
func writeNew(path string, data []byte, mode os.FileMode, replace bool) error {
	if !replace {
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("%s exists: not overwriting it (pass --force to reissue node certificates; remove the file to recreate a CA or token)", path)
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
