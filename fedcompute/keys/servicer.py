"""KeyService over gRPC: decode, call the service, encode."""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration

from fedcompute.keys import hpke
from fedcompute.keys.service import KeyService, PublishedKey
from fedcompute.rpc.auth import require_bearer
from fedcompute.v1 import common_pb2, key_pb2, key_pb2_grpc


def encode_public_key(key: PublishedKey) -> common_pb2.PublicKey:
    return common_pb2.PublicKey(
        key_id=key.key_id,
        public_key=key.public_key,
        kem_id=hpke.KEM_ID,
        kdf_id=hpke.KDF_ID,
        aead_id=hpke.AEAD_ID,
        activation_time_unix=key.activation_unix,
        expiration_time_unix=key.expiration_unix,
        population_name=key.population_name,
        provider_id=key.provider_id,
    )


class KeyServicer(key_pb2_grpc.KeyServiceServicer):
    def __init__(self, service: KeyService, internal_token: str) -> None:
        self._service = service
        self._token = internal_token

    def GetPublicKeys(
        self, request: key_pb2.GetPublicKeysRequest, context: grpc.ServicerContext
    ) -> key_pb2.GetPublicKeysResponse:
        keys = self._service.public_keys(request.population_name)
        return key_pb2.GetPublicKeysResponse(
            keys=[encode_public_key(k) for k in keys], max_age=Duration(seconds=self._service.max_age_s)
        )

    def ReleaseKeyShare(
        self, request: key_pb2.ReleaseKeyShareRequest, context: grpc.ServicerContext
    ) -> key_pb2.ReleaseKeyShareResponse:
        require_bearer(context, self._token)
        release = self._service.release(
            request.key_id, request.task_id, request.round, request.aggregation_job_id, request.recipient_public_key
        )
        return key_pb2.ReleaseKeyShareResponse(
            provider_id=release.provider_id,
            share_index=release.share_index,
            encrypted_share=release.encrypted_share,
            release_context=release.release_context,
        )
