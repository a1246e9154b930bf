package awskms

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/profullstack/keybroker/provider"
)

// fail wraps an SDK error in a *provider.Error whose Kind is the portable
// error it maps to; the SDK error stays reachable with errors.As. ctx is the
// caller's context: when the caller gave up, the error matches ctx.Err() and
// no Kind, so it is not reported as retryable.
func (p *Provider) fail(ctx context.Context, op string, err error) error {
	e := &provider.Error{Provider: Scheme, Op: op, Err: err}
	if ctxErr := ctx.Err(); ctxErr != nil {
		if !errors.Is(err, ctxErr) {
			e.Err = fmt.Errorf("%w: %w", ctxErr, err)
		}
		return e
	}
	e.Kind = kind(err)
	return e
}

// kind maps an AWS KMS error to a portable error, or nil when none fits
// (for example a ValidationException, which is a bug, not a state).
func kind(err error) error {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		switch ae.ErrorCode() {
		case "NotFoundException":
			return provider.ErrKeyNotFound
		case "DisabledException", "KMSInvalidStateException":
			// KMSInvalidStateException: pending deletion, pending import or
			// unavailable; the key exists but cannot be used now.
			return provider.ErrKeyDisabled
		case "InvalidCiphertextException", "IncorrectKeyException":
			return provider.ErrInvalidCiphertext
		case "AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
			"IncompleteSignature", "InvalidClientTokenId", "ExpiredTokenException", "MissingAuthenticationToken":
			return provider.ErrAccessDenied
		case "ThrottlingException", "LimitExceededException", "KMSInternalException",
			"DependencyTimeoutException", "KeyUnavailableException", "InternalFailure", "ServiceUnavailable":
			return provider.ErrUnavailable
		}
	}
	// The operation's own timeout (the caller's was checked by fail).
	if errors.Is(err, context.DeadlineExceeded) {
		return provider.ErrUnavailable
	}
	if retry.IsErrorRetryables(retry.DefaultRetryables).IsErrorRetryable(err) == aws.TrueTernary {
		return provider.ErrUnavailable
	}
	var send *smithyhttp.RequestSendError
	if errors.As(err, &send) {
		return provider.ErrUnavailable
	}
	var re *awshttp.ResponseError
	if errors.As(err, &re) && re.HTTPStatusCode() >= 500 && re.HTTPStatusCode() != http.StatusNotImplemented {
		return provider.ErrUnavailable
	}
	return nil
}

// unsupported reports whether err says the key service lacks an operation
// (an AWS-compatible server without it) or the key cannot perform it.
func unsupported(err error) bool {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		switch ae.ErrorCode() {
		case "UnsupportedOperationException", "UnknownOperationException", "InvalidAction":
			return true
		}
	}
	var re *awshttp.ResponseError
	return errors.As(err, &re) && re.HTTPStatusCode() == http.StatusNotImplemented
}
