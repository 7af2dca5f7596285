"""Bearer-token check for every gRPC call (the standard health service excepted, for probes)."""

from __future__ import annotations

import grpc

from common.auth import token_matches

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
DENIED = "missing or wrong bearer token"


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


async def _deny_stream(request, context):
    """A streaming reply's refusal: grpc.aio takes a response-streaming handler by whether it is an
    async generator function, so this must be one (a lambda returning one is called as a plain
    iterator and fails with TypeError, answered UNKNOWN with a traceback in the log)."""
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
    yield  # pragma: no cover - abort raises


# Per (request_streaming, response_streaming): the handler factory and the refusal it serves.
_DENIALS = {
    (False, False): (grpc.unary_unary_rpc_method_handler, _deny),
    (True, False): (grpc.stream_unary_rpc_method_handler, _deny),
    (False, True): (grpc.unary_stream_rpc_method_handler, _deny_stream),
    (True, True): (grpc.stream_stream_rpc_method_handler, _deny_stream),
}


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        if method.startswith(OPEN_PREFIXES) or token_matches(metadata.get("authorization"), self.token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        factory, deny = _DENIALS[handler.request_streaming, handler.response_streaming]
        return factory(deny)
