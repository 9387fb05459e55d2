"""Registering the Teacher servicer with request deserializers that never raise (bytes that are not a valid
request message are the caller's mistake: INVALID_ARGUMENT, where gRPC's own deserializer failure gave UNKNOWN).

    add_teacher_servicer(servicer, server)       # what the generated add_TeacherServicer_to_server does
    request = checked(request)                   # in a handler: raises the RequestError of an Undecodable
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf import message_factory

from asymkd.v1 import teacher_pb2 as pb
from teacher_server.validation import RequestError, invalid

if TYPE_CHECKING:
    from teacher_server.servicer import TeacherServicer


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not parse: the type it should have been and the parser's error."""

    type_name: str
    error: str

    def refusal(self, where: str = "request") -> RequestError:
        return invalid(where, f"not a valid {self.type_name} ({self.error})")


def _decoder(message_class) -> Callable[[bytes], object]:
    """A request deserializer that never raises: a message, or an Undecodable the handler refuses."""
    name = message_class.DESCRIPTOR.full_name

    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # DecodeError, or whatever the parser raises on hostile bytes
            return Undecodable(name, str(e) or type(e).__name__)

    return decode


def checked(request, where: str = "request"):
    if isinstance(request, Undecodable):
        raise request.refusal(where)
    return request


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_teacher_servicer(servicer: TeacherServicer, server: grpc.aio.Server) -> None:
    """What the generated `add_TeacherServicer_to_server` does, with request deserializers that never raise
    (built from the service descriptor with grpc's own handler factories)."""
    service = pb.DESCRIPTOR.services_by_name["Teacher"]
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_decoder(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
