"""Server reflection, v1 and v1alpha.

grpcio-reflection ships only ``grpc.reflection.v1alpha``; current tools (grpcurl, Postman, grpc_cli) ask for
``grpc.reflection.v1`` first. The two protocols are the same messages under another package, so v1 is served by
the same servicer: its file descriptor is v1alpha's with the package renamed, added to the default pool once,
so that v1 is itself describable through reflection.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_lock = threading.Lock()


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    with _lock:
        try:
            pool.FindFileByName(_V1_FILE)
            return
        except KeyError:
            pass
        proto = descriptor_pb2.FileDescriptorProto()
        reflection_pb2.DESCRIPTOR.CopyToProto(proto)
        proto.name = _V1_FILE
        proto.package = "grpc.reflection.v1"
        for message in proto.message_type:
            for f in message.field:
                if f.HasField("type_name"):
                    f.type_name = f.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
        for service in proto.service:
            for m in service.method:
                m.input_type = m.input_type.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
                m.output_type = m.output_type.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
        proto.options.Clear()
        pool.Add(proto)


def enable_reflection(service_names: Sequence[str], server: grpc.Server) -> None:
    """Serve reflection v1alpha and v1 for ``service_names`` (and for both reflection services)."""
    _add_v1_descriptor()
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME]
    servicer = reflection.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)  # v1alpha, grpcio-reflection's own registration
    handler: Any = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )  # same wire format as v1alpha: field numbers and types are identical
    generic = grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler})
    server.add_generic_rpc_handlers((generic,))
