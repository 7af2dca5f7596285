"""Bearer-token check for every gRPC call (the standard health service excepted, for probes)."""

from __future__ import annotations

import grpc

from common.auth import token_matches

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self.token = token

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = deny

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        if method.startswith(OPEN_PREFIXES) or token_matches(metadata.get("authorization"), self.token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self._stream_deny(ctx))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: self._stream_deny(ctx))
        return grpc.unary_unary_rpc_method_handler(self._deny)

    async def _stream_deny(self, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        yield  # pragma: no cover - abort raises
