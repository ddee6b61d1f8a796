"""KeyService over gRPC: decode, call the service, encode. Admin RPCs need the operator's key-admin token, which
the orchestration server never holds."""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration

from fedcompute.attestation.results import ReleaseBinding
from fedcompute.core.errors import FedcomputeError, InvalidArgument
from fedcompute.core.tasks import MAX_REPORT_GOAL
from fedcompute.core.telemetry import KeyMetrics
from fedcompute.keys import statement
from fedcompute.keys.service import KeyService
from fedcompute.rpc.auth import require_bearer
from fedcompute.rpc.errors import status_for
from fedcompute.v1 import common_pb2, key_pb2, key_pb2_grpc

# One release covers at most this many contributions (a round closes at its report_goal, bounded by it), and a key
# service takes requests of at most this many bytes (40,000 inputs are ~3.8 MB). Anyone may send a ReleaseKeyShare,
# and parsing costs ~30 bytes of memory per byte received before any check: 128 MiB of empty inputs took ~9 GB.
MAX_RELEASE_INPUTS = MAX_REPORT_GOAL
MAX_REQUEST_BYTES = 4 * 1024 * 1024


class KeyServicer(key_pb2_grpc.KeyServiceServicer):
    def __init__(self, service: KeyService, admin_token: str, metrics: KeyMetrics | None = None) -> None:
        self._service = service
        self._token = admin_token
        self._metrics = metrics or KeyMetrics.create()

    def GetPublicKeys(
        self, request: key_pb2.GetPublicKeysRequest, context: grpc.ServicerContext
    ) -> key_pb2.GetPublicKeysResponse:
        keys = self._service.public_keys(request.population_name)
        return key_pb2.GetPublicKeysResponse(keys=keys, max_age=Duration(seconds=self._service.max_age_s))

    def GetProviderInfo(
        self, request: key_pb2.GetProviderInfoRequest, context: grpc.ServicerContext
    ) -> key_pb2.GetProviderInfoResponse:
        identity = self._service.identity
        return key_pb2.GetProviderInfoResponse(
            provider_id=identity.provider_id,
            signing_public_key=statement.public_der(identity.signing_key.public_key()),
            wrapping_public_key=identity.wrapping_public,
        )

    def ReleaseKeyShare(
        self, request: key_pb2.ReleaseKeyShareRequest, context: grpc.ServicerContext
    ) -> key_pb2.ReleaseKeyShareResponse:
        binding = ReleaseBinding.of(request)
        if len(request.inputs) > MAX_RELEASE_INPUTS:  # before a tuple each: anyone may send this, token or not
            raise InvalidArgument("inputs", f"at most {MAX_RELEASE_INPUTS} contributions in one release")
        inputs = [(i.assignment_id, i.envelope_sha256_hex) for i in request.inputs]
        try:
            release = self._service.release(binding, request.attestation_result, inputs)
        except FedcomputeError as exc:
            self._metrics.refusals.labels(status_for(exc).name).inc()
            raise
        self._metrics.releases.labels("repeat" if release.repeat else "new").inc()
        if release.epsilon_after is not None:
            self._metrics.epsilon.labels(release.policy_id).set(release.epsilon_after)
        return key_pb2.ReleaseKeyShareResponse(
            provider_id=release.provider_id,
            share_index=release.share_index,
            encrypted_share=release.encrypted_share,
            release_context=release.release_context,
            signature=release.signature,
        )

    def GetReleaseCount(
        self, request: key_pb2.GetReleaseCountRequest, context: grpc.ServicerContext
    ) -> key_pb2.GetReleaseCountResponse:
        return key_pb2.GetReleaseCountResponse(
            provider_id=self._service.identity.provider_id,
            releases_charged=self._service.release_count(request.policy_sha256_hex),
        )

    def ImportKeyShare(
        self, request: key_pb2.ImportKeyShareRequest, context: grpc.ServicerContext
    ) -> key_pb2.ImportKeyShareResponse:
        require_bearer(context, self._token)
        signature = self._service.import_share(request.key, request.share_index, request.wrapped_share)
        return key_pb2.ImportKeyShareResponse(
            signature=common_pb2.KeySignature(provider_id=self._service.identity.provider_id, signature=signature)
        )

    def ActivateKey(
        self, request: key_pb2.ActivateKeyRequest, context: grpc.ServicerContext
    ) -> key_pb2.ActivateKeyResponse:
        require_bearer(context, self._token)
        self._service.activate(request.key)
        return key_pb2.ActivateKeyResponse()

    def RegisterPolicy(
        self, request: key_pb2.RegisterPolicyRequest, context: grpc.ServicerContext
    ) -> key_pb2.RegisterPolicyResponse:
        require_bearer(context, self._token)
        signature = self._service.register_policy(request.policy)
        return key_pb2.RegisterPolicyResponse(
            signature=common_pb2.KeySignature(provider_id=self._service.identity.provider_id, signature=signature)
        )

    def GetReleaseLog(
        self, request: key_pb2.GetReleaseLogRequest, context: grpc.ServicerContext
    ) -> key_pb2.GetReleaseLogResponse:
        entries = self._service.release_log(request.start_seq)
        return key_pb2.GetReleaseLogResponse(
            provider_id=self._service.identity.provider_id,
            entries=[key_pb2.ReleaseLogEntry(body=e.body, signature=e.signature) for e in entries],
        )
