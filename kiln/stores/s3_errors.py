"""Mapping botocore's exceptions to one `StoreError` each, at the S3 boundary.

Messages carry the error code, bucket, endpoint and entry, and say what to do
next; never credentials.
"""
from __future__ import annotations

import botocore.exceptions

from kiln.errors import StoreError

ENDPOINT_ENV = "KILN_S3_ENDPOINT_URL"

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "TokenRefreshRequired", "InvalidClientTokenId", "UnrecognizedClientException",
               "AuthorizationHeaderMalformed", "MissingSecurityHeader"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
               "ServiceUnavailable", "503", "InternalError", "500", "502", "504",
               "RequestTimeout", "TooManyRequests", "429"}
_NOT_IMPLEMENTED = {"NotImplemented", "501"}
_REQUEST_CODES = {"InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed",
                  "IllegalLocationConstraintException"}

#: the exceptions a boto3 call raises; catch these and map them with `store_error`
BOTO_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def http_status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_missing(exc: BaseException) -> bool:
    return isinstance(exc, botocore.exceptions.ClientError) and (
        error_code(exc) in {"404", "NoSuchKey", "NotFound"} or http_status(exc) == 404) \
        and error_code(exc) != "NoSuchBucket"


def is_precondition(exc: BaseException) -> bool:
    return isinstance(exc, botocore.exceptions.ClientError) and (
        error_code(exc) == "PreconditionFailed" or http_status(exc) == 412)


def is_not_implemented(exc: BaseException) -> bool:
    return isinstance(exc, botocore.exceptions.ClientError) and (
        error_code(exc) in _NOT_IMPLEMENTED or http_status(exc) == 501)


def store_error(exc: BaseException, action: str, *, url: str, bucket: str, endpoint_url: str | None,
                max_attempts: int, name: str | None = None) -> StoreError:
    """One StoreError for a foreign exception; the caller raises it `from exc`."""
    where = f"bucket {bucket!r}" + (f" at {endpoint_url}" if endpoint_url else "")
    ctx = {"store": url, "entry": name}
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StoreError(f"no AWS credentials found to {action} in {where}",
                          hint="set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                               "(or run on a machine with an instance role)", **ctx)
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return StoreError(f"AWS profile not found while trying to {action} in {where}",
                          hint="check AWS_PROFILE against `aws configure list-profiles`", **ctx)
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ReadTimeoutError,
                        botocore.exceptions.ConnectionClosedError)):
        endpoint = endpoint_url or "the AWS S3 endpoint"
        return StoreError(f"cannot reach {endpoint} to {action} in bucket {bucket!r} "
                          f"({type(exc).__name__}, after {max_attempts} attempts)",
                          hint=f"check the network and {ENDPOINT_ENV} / AWS_ENDPOINT_URL_S3 "
                               "(is the server running? right host and port?)", **ctx)
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        if code == "NoSuchBucket":
            return StoreError(f"S3 {where} does not exist",
                              hint=f"create it (`aws s3 mb s3://{bucket}`) or fix the "
                                   "bucket in [store] url", **ctx)
        if code in _AUTH_CODES:
            return StoreError(f"S3 rejected the credentials ({code}) for {where}",
                              hint="check AWS_PROFILE / AWS_ACCESS_KEY_ID and its secret "
                                   "(`aws sts get-caller-identity`)", **ctx)
        if code in _DENIED_CODES:
            return StoreError(f"access denied ({code}) to {action} in {where}",
                              hint=f"grant s3:GetObject, s3:PutObject, s3:DeleteObject and "
                                   f"s3:ListBucket on {url} to these credentials", **ctx)
        if code in _BUSY_CODES or http_status(exc) >= 500 or http_status(exc) == 429:
            return StoreError(f"S3 {where} is overloaded or failing ({code}) and kept failing "
                              f"after {max_attempts} attempts to {action}",
                              hint="retry later; raise AWS_MAX_ATTEMPTS if this is throttling", **ctx)
        if code in _REQUEST_CODES:
            return StoreError(f"S3 refused the request for {where} ({code})",
                              hint="check the bucket name and AWS_REGION for this bucket", **ctx)
        return StoreError(f"S3 error {code} while trying to {action} in {where}",
                          hint="see the chained exception; check the bucket and permissions", **ctx)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return StoreError(f"S3 client error ({type(exc).__name__}) while trying to {action} "
                          f"in {where}", hint="see the chained exception", **ctx)
    return StoreError(f"{type(exc).__name__} while trying to {action} in {where}", **ctx)
