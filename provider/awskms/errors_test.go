package awskms

import (
	"context"
	"errors"
	"net"
	"testing"

	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/profullstack/keybroker/provider"
)

// TestKind checks the mapping table for the codes local-kms cannot produce
// (credentials, throttling, KMS-internal failures) as well as those it can.
func TestKind(t *testing.T) {
	for code, want := range map[string]error{
		"NotFoundException":           provider.ErrKeyNotFound,
		"DisabledException":           provider.ErrKeyDisabled,
		"KMSInvalidStateException":    provider.ErrKeyDisabled,
		"InvalidCiphertextException":  provider.ErrInvalidCiphertext,
		"IncorrectKeyException":       provider.ErrInvalidCiphertext,
		"AccessDeniedException":       provider.ErrAccessDenied,
		"UnrecognizedClientException": provider.ErrAccessDenied,
		"ExpiredTokenException":       provider.ErrAccessDenied,
		"ThrottlingException":         provider.ErrUnavailable,
		"LimitExceededException":      provider.ErrUnavailable,
		"KMSInternalException":        provider.ErrUnavailable,
		"DependencyTimeoutException":  provider.ErrUnavailable,
		"KeyUnavailableException":     provider.ErrUnavailable,
		"ValidationException":         nil,
	} {
		err := &smithy.OperationError{ServiceID: "KMS", OperationName: "Decrypt", Err: &smithy.GenericAPIError{Code: code, Message: "m"}}
		if got := kind(err); got != want {
			t.Errorf("kind(%s) = %v, want %v", code, got, want)
		}
	}
	send := &smithyhttp.RequestSendError{Err: &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}}
	if got := kind(send); got != provider.ErrUnavailable {
		t.Errorf("kind(connection refused) = %v, want ErrUnavailable", got)
	}
	if got := kind(context.DeadlineExceeded); got != provider.ErrUnavailable {
		t.Errorf("kind(operation timeout) = %v, want ErrUnavailable", got)
	}

	// The caller's own cancellation is never a portable kind.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := (&Provider{}).fail(ctx, "wrap", &smithy.OperationError{Err: &smithy.GenericAPIError{Code: "ThrottlingException"}})
	if !errors.Is(err, context.Canceled) || provider.IsRetryable(err) {
		t.Errorf("fail with a canceled context = %v, want context.Canceled, not retryable", err)
	}
	var ae smithy.APIError
	if !errors.As(err, &ae) {
		t.Errorf("fail with a canceled context lost the SDK error: %v", err)
	}
}
