"""The public surface is exactly API.md's names plus the documented extensions."""

import amp_cohorts_async as amp

API_MD_NAMES = {
    "CohortsClient", "Limits", "RateWindow", "RetryPolicy", "PollPolicy",
    "Cohort", "SyncMetadata", "CohortRequest", "RequestStatus", "DownloadResult",
    "CohortOutcome", "Usage", "UploadResult", "MembershipChange", "MembershipResult",
    "MembershipOutcome", "ProgressEvent", "IdType", "MembershipIdType", "Operation",
    "AmplitudeError", "InvalidRequestError", "TransportError", "APIStatusError",
    "AuthenticationError", "NotFoundError", "RateLimitError", "ServerError",
    "ResponseValidationError", "QuotaExceededError", "CohortJobError", "DownloadError",
    "iter_members", "iter_member_batches", "MemberBatch", "LimitsBackend",
    "diff_members", "MembershipDiff", "mirror_cohort", "MirrorResult",
    "FileLimits",
    "SyncReport", "SyncEntry",
    "iter_arrow_batches",
}
# Additions beyond API.md, documented in the README.
EXTENSIONS = {"PartialWriteError", "DiskError", "DownloadPolicy", "InMemoryLimits",
              "LimitsBackendError", "Permit", "PermitRequest", "PermitWait", "Settlement",
              "UncertainUploadError"}


def test_all_is_exactly_the_documented_names() -> None:
    assert set(amp.__all__) == API_MD_NAMES | EXTENSIONS
    assert len(amp.__all__) == len(set(amp.__all__))


def test_every_name_is_importable() -> None:
    for name in amp.__all__:
        assert getattr(amp, name) is not None


def test_error_tree() -> None:
    assert issubclass(amp.InvalidRequestError, ValueError)
    for cls in (amp.AuthenticationError, amp.NotFoundError, amp.RateLimitError, amp.ServerError):
        assert issubclass(cls, amp.APIStatusError)
    assert issubclass(amp.DiskError, amp.DownloadError)
    for cls in (amp.InvalidRequestError, amp.TransportError, amp.APIStatusError,
                amp.ResponseValidationError, amp.QuotaExceededError, amp.CohortJobError,
                amp.DownloadError, amp.PartialWriteError, amp.UncertainUploadError):
        assert issubclass(cls, amp.AmplitudeError)


def test_version_is_lazy_and_a_string() -> None:
    assert isinstance(amp.__version__, str)


def test_dir_shows_only_the_public_surface() -> None:
    import types

    public = [name for name in dir(amp) if not name.startswith("_") and name.isidentifier()
              and not isinstance(getattr(amp, name), types.ModuleType)]  # e.g. amp.testing
    assert set(public) == set(amp.__all__)


def test_every_public_class_has_a_docstring() -> None:
    import inspect

    for name in amp.__all__:
        obj = getattr(amp, name)
        if inspect.isclass(obj):
            doc = inspect.getdoc(obj) or ""
            assert doc, name
            assert not doc.startswith(f"{name}("), name  # not attrs' generated one


def test_help_documents_every_constructor_parameter() -> None:
    import inspect

    doc = amp.CohortsClient.__doc__ or ""
    for parameter in inspect.signature(amp.CohortsClient.__init__).parameters:
        if parameter != "self":
            assert parameter in doc, parameter
