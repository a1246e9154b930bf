package kmstest

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Limits of the real API for SOFTWARE keys, enforced with InvalidArgument.
const (
	MaxPlaintextLen = 64 << 10
	MaxAADLen       = 64 << 10
)

// Ciphertext layout: version id (4 bytes, big endian) | nonce | sealed.
const (
	headerLen        = 4
	nonceLen         = 12
	tagLen           = 16
	minCiphertextLen = headerLen + nonceLen + tagLen
	maxCiphertextLen = minCiphertextLen + MaxPlaintextLen
)

// defaultDestroyScheduled is Cloud KMS's default destroy_scheduled_duration.
const defaultDestroyScheduled = 30 * 24 * time.Hour

var (
	locationRE = regexp.MustCompile(`^projects/[^/]+/locations/[^/]+$`)
	idRE       = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,63}$`)
	keyNameRE  = regexp.MustCompile(`^projects/[^/]+/locations/[^/]+/keyRings/[a-zA-Z0-9_-]{1,63}/cryptoKeys/[a-zA-Z0-9_-]{1,63}$`)
	versionRE  = regexp.MustCompile(`^(projects/[^/]+/locations/[^/]+/keyRings/[a-zA-Z0-9_-]{1,63}/cryptoKeys/[a-zA-Z0-9_-]{1,63})/cryptoKeyVersions/([1-9][0-9]{0,8})$`)
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) int64 { return int64(crc32.Checksum(b, crcTable)) }

// Server is an in-process Cloud KMS KeyManagementService on a loopback
// listener. It is safe for concurrent use.
type Server struct {
	kmspb.UnimplementedKeyManagementServiceServer

	lis net.Listener
	srv *grpc.Server

	mu          sync.Mutex
	keyRings    map[string]*kmspb.KeyRing
	keys        map[string]*cryptoKey
	interceptor grpc.UnaryServerInterceptor
}

type cryptoKey struct {
	pb       *kmspb.CryptoKey // Primary is filled in on the way out
	versions []*keyVersion    // version id i is versions[i-1]
	primary  int              // version id; 0 = none
}

type keyVersion struct {
	id   int
	pb   *kmspb.CryptoKeyVersion
	aead cipher.AEAD // nil once destroyed
}

var _ kmspb.KeyManagementServiceServer = (*Server)(nil)

// Start starts a server on 127.0.0.1 with an ephemeral port. Close stops it.
func Start() (*Server, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("kmstest: listen: %w", err)
	}
	s := &Server{
		lis:      lis,
		keyRings: map[string]*kmspb.KeyRing{},
		keys:     map[string]*cryptoKey{},
	}
	s.srv = grpc.NewServer(grpc.UnaryInterceptor(s.intercept))
	kmspb.RegisterKeyManagementServiceServer(s.srv, s)
	go s.srv.Serve(lis) //nolint:errcheck // Serve returns when Close stops the server.
	return s, nil
}

// Addr is the host:port the server listens on.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// ClientOptions are the options that point the real client library
// (kms.NewKeyManagementClient) at s: its endpoint, plaintext gRPC, and no
// credentials.
func (s *Server) ClientOptions() []option.ClientOption {
	return []option.ClientOption{
		option.WithEndpoint(s.Addr()),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
		option.WithoutAuthentication(),
	}
}

// Close stops the server, cutting open connections.
func (s *Server) Close() { s.srv.Stop() }

// NewKey creates key ring ring (in projects/kmstest/locations/global) if it
// does not exist yet, and an ENCRYPT_DECRYPT key id in it with one primary
// version, and returns the key's resource name: the set-up most tests of
// other packages need before gcpkms.Open(ctx, name, s.ClientOptions()...).
func (s *Server) NewKey(ring, id string) (string, error) {
	const loc = "projects/kmstest/locations/global"
	ctx := context.Background()
	_, err := s.CreateKeyRing(ctx, &kmspb.CreateKeyRingRequest{Parent: loc, KeyRingId: ring, KeyRing: &kmspb.KeyRing{}})
	if err != nil && status.Code(err) != codes.AlreadyExists {
		return "", fmt.Errorf("kmstest: new key: %w", err)
	}
	k, err := s.CreateCryptoKey(ctx, &kmspb.CreateCryptoKeyRequest{Parent: loc + "/keyRings/" + ring, CryptoKeyId: id,
		CryptoKey: &kmspb.CryptoKey{Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT}})
	if err != nil {
		return "", fmt.Errorf("kmstest: new key: %w", err)
	}
	return k.GetName(), nil
}

// SetInterceptor installs f around every RPC (nil removes it), so a test can
// inject faults: fail a call with a chosen code, or alter a response (for
// example corrupt a checksum) after the handler ran.
func (s *Server) SetInterceptor(f grpc.UnaryServerInterceptor) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.interceptor = f
}

func (s *Server) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	s.mu.Lock()
	f := s.interceptor
	s.mu.Unlock()
	if f == nil {
		return h(ctx, req)
	}
	return f(ctx, req, info, h)
}

func invalid(format string, a ...any) error {
	return status.Errorf(codes.InvalidArgument, format, a...)
}

func notFound(name string) error { return status.Errorf(codes.NotFound, "%s not found.", name) }

// CreateKeyRing creates an empty key ring.
func (s *Server) CreateKeyRing(_ context.Context, req *kmspb.CreateKeyRingRequest) (*kmspb.KeyRing, error) {
	if !locationRE.MatchString(req.GetParent()) {
		return nil, invalid("parent must be of the form projects/*/locations/*")
	}
	if !idRE.MatchString(req.GetKeyRingId()) {
		return nil, invalid("key_ring_id must match [a-zA-Z0-9_-]{1,63}")
	}
	name := req.GetParent() + "/keyRings/" + req.GetKeyRingId()
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.keyRings[name]; ok {
		return nil, status.Errorf(codes.AlreadyExists, "KeyRing %s already exists.", name)
	}
	kr := &kmspb.KeyRing{Name: name, CreateTime: timestamppb.Now()}
	s.keyRings[name] = kr
	return proto.Clone(kr).(*kmspb.KeyRing), nil
}

// CreateCryptoKey creates a symmetric ENCRYPT_DECRYPT key with a first,
// primary version unless skip_initial_version_creation is set.
func (s *Server) CreateCryptoKey(_ context.Context, req *kmspb.CreateCryptoKeyRequest) (*kmspb.CryptoKey, error) {
	if !idRE.MatchString(req.GetCryptoKeyId()) {
		return nil, invalid("crypto_key_id must match [a-zA-Z0-9_-]{1,63}")
	}
	in := req.GetCryptoKey()
	switch {
	case in == nil:
		return nil, invalid("crypto_key is required")
	case in.GetPurpose() != kmspb.CryptoKey_ENCRYPT_DECRYPT:
		return nil, invalid("kmstest supports only purpose ENCRYPT_DECRYPT, got %v", in.GetPurpose())
	case in.GetRotationSchedule() != nil || in.GetNextRotationTime() != nil:
		return nil, invalid("kmstest does not support automatic rotation")
	case in.GetImportOnly() || in.GetCryptoKeyBackend() != "":
		return nil, invalid("kmstest does not support import-only or EKM-backed keys")
	}
	if t := in.GetVersionTemplate(); t != nil {
		if a := t.GetAlgorithm(); a != kmspb.CryptoKeyVersion_CRYPTO_KEY_VERSION_ALGORITHM_UNSPECIFIED && a != kmspb.CryptoKeyVersion_GOOGLE_SYMMETRIC_ENCRYPTION {
			return nil, invalid("kmstest supports only algorithm GOOGLE_SYMMETRIC_ENCRYPTION, got %v", a)
		}
		if p := t.GetProtectionLevel(); p != kmspb.ProtectionLevel_PROTECTION_LEVEL_UNSPECIFIED && p != kmspb.ProtectionLevel_SOFTWARE {
			return nil, invalid("kmstest supports only protection level SOFTWARE, got %v", p)
		}
	}
	name := req.GetParent() + "/cryptoKeys/" + req.GetCryptoKeyId()
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.keyRings[req.GetParent()]; !ok {
		return nil, notFound("KeyRing " + req.GetParent())
	}
	if _, ok := s.keys[name]; ok {
		return nil, status.Errorf(codes.AlreadyExists, "CryptoKey %s already exists.", name)
	}
	dsd := in.GetDestroyScheduledDuration()
	if dsd == nil {
		dsd = durationpb.New(defaultDestroyScheduled)
	}
	k := &cryptoKey{pb: &kmspb.CryptoKey{
		Name:       name,
		Purpose:    kmspb.CryptoKey_ENCRYPT_DECRYPT,
		CreateTime: timestamppb.Now(),
		VersionTemplate: &kmspb.CryptoKeyVersionTemplate{
			ProtectionLevel: kmspb.ProtectionLevel_SOFTWARE,
			Algorithm:       kmspb.CryptoKeyVersion_GOOGLE_SYMMETRIC_ENCRYPTION,
		},
		Labels:                   in.GetLabels(),
		DestroyScheduledDuration: dsd,
	}}
	if !req.GetSkipInitialVersionCreation() {
		v, err := k.newVersion()
		if err != nil {
			return nil, err
		}
		k.primary = v
	}
	s.keys[name] = k
	return k.out(), nil
}

// newVersion adds an ENABLED version with a fresh random AES-256 key and
// returns its id.
func (k *cryptoKey) newVersion() (int, error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return 0, status.Errorf(codes.Internal, "kmstest: generating key material: %v", err)
	}
	block, err := aes.NewCipher(raw)
	clear(raw)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "kmstest: %v", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "kmstest: %v", err)
	}
	id := len(k.versions) + 1
	now := timestamppb.Now()
	k.versions = append(k.versions, &keyVersion{id: id, aead: aead, pb: &kmspb.CryptoKeyVersion{
		Name:            k.pb.Name + "/cryptoKeyVersions/" + strconv.Itoa(id),
		State:           kmspb.CryptoKeyVersion_ENABLED,
		ProtectionLevel: kmspb.ProtectionLevel_SOFTWARE,
		Algorithm:       kmspb.CryptoKeyVersion_GOOGLE_SYMMETRIC_ENCRYPTION,
		CreateTime:      now,
		GenerateTime:    now,
	}})
	return id, nil
}

// out returns a copy of the key as the API shows it.
func (k *cryptoKey) out() *kmspb.CryptoKey {
	c := proto.Clone(k.pb).(*kmspb.CryptoKey)
	if k.primary != 0 {
		c.Primary = proto.Clone(k.versions[k.primary-1].pb).(*kmspb.CryptoKeyVersion)
	}
	return c
}

func (k *cryptoKey) version(id int) *keyVersion {
	if id < 1 || id > len(k.versions) {
		return nil
	}
	return k.versions[id-1]
}

// key looks a CryptoKey up; s.mu must be held.
func (s *Server) key(name string) (*cryptoKey, error) {
	if !keyNameRE.MatchString(name) {
		return nil, invalid("name must be of the form projects/*/locations/*/keyRings/*/cryptoKeys/*")
	}
	k, ok := s.keys[name]
	if !ok {
		return nil, notFound("CryptoKey " + name)
	}
	return k, nil
}

// version looks a CryptoKeyVersion up by name; s.mu must be held.
func (s *Server) version(name string) (*cryptoKey, *keyVersion, error) {
	m := versionRE.FindStringSubmatch(name)
	if m == nil {
		return nil, nil, invalid("name must be of the form projects/*/locations/*/keyRings/*/cryptoKeys/*/cryptoKeyVersions/*")
	}
	k, err := s.key(m[1])
	if err != nil {
		return nil, nil, err
	}
	id, _ := strconv.Atoi(m[2]) // versionRE bounds it to 9 digits
	v := k.version(id)
	if v == nil {
		return nil, nil, notFound("CryptoKeyVersion " + name)
	}
	return k, v, nil
}

// GetCryptoKey returns a key with its primary version.
func (s *Server) GetCryptoKey(_ context.Context, req *kmspb.GetCryptoKeyRequest) (*kmspb.CryptoKey, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, err := s.key(req.GetName())
	if err != nil {
		return nil, err
	}
	return k.out(), nil
}

// CreateCryptoKeyVersion adds an ENABLED version; it does not become primary.
func (s *Server) CreateCryptoKeyVersion(_ context.Context, req *kmspb.CreateCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, err := s.key(req.GetParent())
	if err != nil {
		return nil, err
	}
	id, err := k.newVersion()
	if err != nil {
		return nil, err
	}
	return proto.Clone(k.version(id).pb).(*kmspb.CryptoKeyVersion), nil
}

// Page sizes of ListCryptoKeyVersions: the default when page_size is 0,
// and the cap on larger requests.
const (
	defaultPageSize = 100
	maxPageSize     = 1000
)

// ListCryptoKeyVersions lists a key's versions in id order, a page at a
// time. filter and order_by are not supported.
func (s *Server) ListCryptoKeyVersions(_ context.Context, req *kmspb.ListCryptoKeyVersionsRequest) (*kmspb.ListCryptoKeyVersionsResponse, error) {
	if req.GetFilter() != "" || req.GetOrderBy() != "" {
		return nil, invalid("kmstest does not support filter or order_by")
	}
	size := int(req.GetPageSize())
	switch {
	case size < 0:
		return nil, invalid("page_size must not be negative")
	case size == 0:
		size = defaultPageSize
	case size > maxPageSize:
		size = maxPageSize
	}
	start := 0
	if tok := req.GetPageToken(); tok != "" {
		n, err := strconv.Atoi(tok)
		if err != nil || n < 1 {
			return nil, invalid("invalid page_token")
		}
		start = n
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	k, err := s.key(req.GetParent())
	if err != nil {
		return nil, err
	}
	resp := &kmspb.ListCryptoKeyVersionsResponse{TotalSize: int32(len(k.versions))}
	end := min(start+size, len(k.versions))
	for _, v := range k.versions[min(start, end):end] {
		resp.CryptoKeyVersions = append(resp.CryptoKeyVersions, proto.Clone(v.pb).(*kmspb.CryptoKeyVersion))
	}
	if end < len(k.versions) {
		resp.NextPageToken = strconv.Itoa(end)
	}
	return resp, nil
}

// UpdateCryptoKeyPrimaryVersion makes an ENABLED version primary.
func (s *Server) UpdateCryptoKeyPrimaryVersion(_ context.Context, req *kmspb.UpdateCryptoKeyPrimaryVersionRequest) (*kmspb.CryptoKey, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, err := s.key(req.GetName())
	if err != nil {
		return nil, err
	}
	id, err := strconv.Atoi(req.GetCryptoKeyVersionId())
	if err != nil || id < 1 {
		return nil, invalid("crypto_key_version_id must be a positive integer")
	}
	v := k.version(id)
	if v == nil {
		return nil, notFound("CryptoKeyVersion " + k.pb.Name + "/cryptoKeyVersions/" + req.GetCryptoKeyVersionId())
	}
	if v.pb.State != kmspb.CryptoKeyVersion_ENABLED {
		return nil, notEnabled(v)
	}
	k.primary = id
	return k.out(), nil
}

func notEnabled(v *keyVersion) error {
	return status.Errorf(codes.FailedPrecondition, "%s is not enabled, current state is: %v.", v.pb.Name, v.pb.State)
}

// GetCryptoKeyVersion returns one version.
func (s *Server) GetCryptoKeyVersion(_ context.Context, req *kmspb.GetCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, v, err := s.version(req.GetName())
	if err != nil {
		return nil, err
	}
	return proto.Clone(v.pb).(*kmspb.CryptoKeyVersion), nil
}

// UpdateCryptoKeyVersion changes a version's state between ENABLED and
// DISABLED; "state" is the only update_mask path it supports.
func (s *Server) UpdateCryptoKeyVersion(_ context.Context, req *kmspb.UpdateCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	if p := req.GetUpdateMask().GetPaths(); len(p) != 1 || p[0] != "state" {
		return nil, invalid("kmstest supports only update_mask [state]")
	}
	want := req.GetCryptoKeyVersion().GetState()
	if want != kmspb.CryptoKeyVersion_ENABLED && want != kmspb.CryptoKeyVersion_DISABLED {
		return nil, invalid("state can only be updated to ENABLED or DISABLED")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, v, err := s.version(req.GetCryptoKeyVersion().GetName())
	if err != nil {
		return nil, err
	}
	if st := v.pb.State; st != kmspb.CryptoKeyVersion_ENABLED && st != kmspb.CryptoKeyVersion_DISABLED {
		return nil, status.Errorf(codes.FailedPrecondition, "%s state %v cannot be updated.", v.pb.Name, st)
	}
	v.pb.State = want
	return proto.Clone(v.pb).(*kmspb.CryptoKeyVersion), nil
}

// DestroyCryptoKeyVersion schedules a version for destruction. The fake
// drops the key material at once and has no RestoreCryptoKeyVersion.
func (s *Server) DestroyCryptoKeyVersion(_ context.Context, req *kmspb.DestroyCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, v, err := s.version(req.GetName())
	if err != nil {
		return nil, err
	}
	if st := v.pb.State; st != kmspb.CryptoKeyVersion_ENABLED && st != kmspb.CryptoKeyVersion_DISABLED {
		return nil, status.Errorf(codes.FailedPrecondition, "%s is in state %v and cannot be destroyed.", v.pb.Name, st)
	}
	v.pb.State = kmspb.CryptoKeyVersion_DESTROY_SCHEDULED
	v.pb.DestroyTime = timestamppb.New(time.Now().Add(k.pb.DestroyScheduledDuration.AsDuration()))
	v.aead = nil
	return proto.Clone(v.pb).(*kmspb.CryptoKeyVersion), nil
}

func checkCRC(field string, data []byte, sum *wrapperspb.Int64Value) error {
	if sum != nil && sum.GetValue() != crc(data) {
		return invalid("The checksum in field %s_crc32c did not match the data in field %s.", field, field)
	}
	return nil
}

// gcmAAD binds the version's full name to the caller's AAD, so ciphertext
// whose version prefix is relabelled, or that is given to another key, fails
// authentication.
func gcmAAD(versionName string, aad []byte) []byte {
	b := make([]byte, 0, 2+len(versionName)+len(aad))
	b = binary.BigEndian.AppendUint16(b, uint16(len(versionName)))
	b = append(b, versionName...)
	return append(b, aad...)
}

// Encrypt encrypts under the named version, or the key's primary version.
func (s *Server) Encrypt(_ context.Context, req *kmspb.EncryptRequest) (*kmspb.EncryptResponse, error) {
	pt, aad := req.GetPlaintext(), req.GetAdditionalAuthenticatedData()
	switch {
	case len(pt) == 0:
		return nil, invalid("plaintext is required")
	case len(pt) > MaxPlaintextLen:
		return nil, invalid("plaintext is larger than %d bytes", MaxPlaintextLen)
	case len(aad) > MaxAADLen:
		return nil, invalid("additional_authenticated_data is larger than %d bytes", MaxAADLen)
	}
	if err := checkCRC("plaintext", pt, req.GetPlaintextCrc32C()); err != nil {
		return nil, err
	}
	if err := checkCRC("additional_authenticated_data", aad, req.GetAdditionalAuthenticatedDataCrc32C()); err != nil {
		return nil, err
	}

	s.mu.Lock()
	v, err := s.encryptVersion(req.GetName())
	var (
		aead cipher.AEAD
		name string
		id   int
	)
	if err == nil {
		aead, name, id = v.aead, v.pb.Name, v.id
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}

	out := make([]byte, headerLen+nonceLen, headerLen+nonceLen+len(pt)+tagLen)
	binary.BigEndian.PutUint32(out, uint32(id))
	if _, err := rand.Read(out[headerLen:]); err != nil {
		return nil, status.Errorf(codes.Internal, "kmstest: nonce: %v", err)
	}
	out = aead.Seal(out, out[headerLen:], pt, gcmAAD(name, aad))
	return &kmspb.EncryptResponse{
		Name:                    name,
		Ciphertext:              out,
		CiphertextCrc32C:        wrapperspb.Int64(crc(out)),
		VerifiedPlaintextCrc32C: req.GetPlaintextCrc32C() != nil,
		VerifiedAdditionalAuthenticatedDataCrc32C: req.GetAdditionalAuthenticatedDataCrc32C() != nil,
		ProtectionLevel: kmspb.ProtectionLevel_SOFTWARE,
	}, nil
}

// encryptVersion resolves Encrypt's name, a CryptoKey (its primary) or a
// CryptoKeyVersion, to an ENABLED version; s.mu must be held.
func (s *Server) encryptVersion(name string) (*keyVersion, error) {
	var v *keyVersion
	if strings.Contains(name, "/cryptoKeyVersions/") {
		_, ver, err := s.version(name)
		if err != nil {
			return nil, err
		}
		v = ver
	} else {
		k, err := s.key(name)
		if err != nil {
			return nil, err
		}
		if v = k.version(k.primary); v == nil {
			return nil, status.Errorf(codes.FailedPrecondition, "%s has no primary CryptoKeyVersion.", k.pb.Name)
		}
	}
	if v.pb.State != kmspb.CryptoKeyVersion_ENABLED {
		return nil, notEnabled(v)
	}
	return v, nil
}

var errDecrypt = status.Error(codes.InvalidArgument, "Decryption failed: verify that 'name' refers to the correct CryptoKey.")

// Decrypt decrypts with whichever version of the named key the ciphertext
// records.
func (s *Server) Decrypt(_ context.Context, req *kmspb.DecryptRequest) (*kmspb.DecryptResponse, error) {
	ct, aad := req.GetCiphertext(), req.GetAdditionalAuthenticatedData()
	switch {
	case len(ct) == 0:
		return nil, invalid("ciphertext is required")
	case len(ct) > maxCiphertextLen:
		return nil, invalid("ciphertext is larger than %d bytes", maxCiphertextLen)
	case len(aad) > MaxAADLen:
		return nil, invalid("additional_authenticated_data is larger than %d bytes", MaxAADLen)
	}
	if err := checkCRC("ciphertext", ct, req.GetCiphertextCrc32C()); err != nil {
		return nil, err
	}
	if err := checkCRC("additional_authenticated_data", aad, req.GetAdditionalAuthenticatedDataCrc32C()); err != nil {
		return nil, err
	}
	if len(ct) < minCiphertextLen {
		return nil, errDecrypt
	}
	id := binary.BigEndian.Uint32(ct)

	s.mu.Lock()
	k, err := s.key(req.GetName())
	var v *keyVersion
	if err == nil {
		if id == 0 || id > uint32(len(k.versions)) {
			err = errDecrypt
		} else if v = k.versions[id-1]; v.pb.State != kmspb.CryptoKeyVersion_ENABLED {
			err = notEnabled(v)
		}
	}
	var aead cipher.AEAD
	var name string
	var primary bool
	if err == nil {
		aead, name, primary = v.aead, v.pb.Name, k.primary == int(id)
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}

	pt, err := aead.Open(nil, ct[headerLen:headerLen+nonceLen], ct[headerLen+nonceLen:], gcmAAD(name, aad))
	if err != nil {
		return nil, errDecrypt
	}
	return &kmspb.DecryptResponse{
		Plaintext:       pt,
		PlaintextCrc32C: wrapperspb.Int64(crc(pt)),
		UsedPrimary:     primary,
		ProtectionLevel: kmspb.ProtectionLevel_SOFTWARE,
	}, nil
}
