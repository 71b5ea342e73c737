"""botocore exceptions -> the protocol's typed errors.

Why a table: the orchestrator decides by error type alone (next AZ/offer on CapacityError, next
provider on QuotaError, stop on AuthError), so every EC2 error code we know of must land in the
right class. Messages carry the EC2 code and message (which hold no secrets) and never the request.
"""

from __future__ import annotations

from cloudtune.providers.base import (
    AuthError,
    CapacityError,
    InvalidRequestError,
    NotFoundError,
    ProviderError,
    QuotaError,
    RateLimitedError,
    TransientError,
)

from cloudtune.errors import UserError

PROVIDER = "aws"

NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run aws sso login"
)

CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "UnfulfillableCapacity",
    "SpotMaxPriceTooLow",
    # "The specified request is unsupported", e.g. an instance type a zone does not offer (or no longer
    # offers) although DescribeInstanceTypeOfferings listed it: the next zone or offer may run it.
    "Unsupported",
})
# MaxSpotInstanceCountExceeded: the account's spot-instance (vCPU) limit, an account quota, not the market.
QUOTA_CODES = frozenset({"VcpuLimitExceeded", "InstanceLimitExceeded", "PendingVerification",
                         "MaxSpotInstanceCountExceeded",
                         "ParameterLimitExceeded"})  # SSM: 10,000 standard parameters per account and region
RATE_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
                        "TooManyUpdates"})  # SSM: concurrent updates of one parameter
AUTH_CODES = frozenset({
    "AuthFailure",
    "UnauthorizedOperation",
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "RequestExpired",
    "Blocked",
})
NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "ParameterNotFound"})
# SSM PutParameter with a KMS key that does not exist, is disabled, or is not usable by the caller.
KMS_KEY_CODES = frozenset({"InvalidKeyId", "KMSInvalidStateException", "KMSNotFoundException",
                           "KMSDisabledException", "KMSAccessDeniedException"})
TRANSIENT_CODES = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"})


class AWSConfigError(InvalidRequestError, UserError):
    """A request or configuration the user must fix (store, AMI, env). Also a UserError, so
    `cloudtune run --dry-run` prints it as one line; the orchestrator sees an InvalidRequestError."""


class RegionNotSwept(QuotaError, UserError):
    """The offer's region is outside CLOUDTUNE_AWS_REGIONS: `gc` would never see a machine there, so
    the orchestrator must fail over to the next offer instead (QuotaError)."""


def error_code(err: BaseException) -> str:
    response = getattr(err, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


def translate(err: Exception, action: str) -> ProviderError:
    """The typed error for a botocore exception raised while doing `action` (e.g. 'RunInstances in us-east-1')."""
    from botocore import exceptions as bx

    if isinstance(err, ProviderError):
        return err
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError | bx.TokenRetrievalError
                  | bx.SSOTokenLoadError | bx.UnauthorizedSSOTokenError | bx.ProfileNotFound):
        detail = "" if isinstance(err, bx.NoCredentialsError) else f" ({err})"
        return AuthError(NO_CREDENTIALS + detail, provider=PROVIDER)
    if isinstance(err, bx.ClientError):
        code = error_code(err)
        message = str((err.response.get("Error") or {}).get("Message") or "").strip()
        status = int((err.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        text = f"{action}: {code}: {message}" if message else f"{action}: {code}"
        if code in CAPACITY_CODES:
            return CapacityError(text, provider=PROVIDER)
        if code == "ParameterLimitExceeded":
            return QuotaError(text + " (delete unused SSM parameters, e.g. with `cloudtune gc --yes`)", provider=PROVIDER)
        if code in QUOTA_CODES:
            return QuotaError(text + " (request a higher EC2 quota in the Service Quotas console)", provider=PROVIDER)
        if code == "OptInRequired":
            return QuotaError(text + " (enable the region for this account or remove it from CLOUDTUNE_AWS_REGIONS)",
                              provider=PROVIDER)
        if code in RATE_CODES:
            return RateLimitedError(text, provider=PROVIDER)
        if code in AUTH_CODES:
            return AuthError(text, provider=PROVIDER)
        if code in NOT_FOUND_CODES:
            return NotFoundError(text, provider=PROVIDER)
        if code in KMS_KEY_CODES:
            return InvalidRequestError(text + " (check CLOUDTUNE_AWS_SSM_KMS_KEY, or unset it to use alias/aws/ssm)",
                                       provider=PROVIDER)
        if code in TRANSIENT_CODES or status >= 500:
            return TransientError(text, provider=PROVIDER)
        return InvalidRequestError(text, provider=PROVIDER)
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectionClosedError | bx.ConnectTimeoutError
                  | bx.ReadTimeoutError | bx.ConnectionError):
        return TransientError(f"{action}: {type(err).__name__}: {err}", provider=PROVIDER)
    if isinstance(err, bx.BotoCoreError):
        return TransientError(f"{action}: {type(err).__name__}: {err}", provider=PROVIDER)
    raise err
