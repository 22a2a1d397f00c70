"""Authentication and tenant resolution: the interceptor between error mapping and the rest.

For each ``conveyor.v1`` call, once (a stream is checked when it opens, never per
message or per task): the key in ``authorization: Bearer <key>`` is checked
(``tenancy/auth.py``), the method's scope (the ``required_scope`` option in the protos, see
``api_keys.required_scopes``) must be among the key's, and the request context gets the
key's tenant, id and scopes, which every handler and query filters by. A stream runs
under :class:`~conveyor.coordinator.auth.OpenStreams`, which ends it when its key is
revoked or expires. Refusals are raised as domain errors; the error interceptor outside
this one turns them into statuses. Health and reflection are not ``conveyor.v1``
methods: they pass unchecked.

With authentication off (``--insecure``) this interceptor is left out of the chain: every
call acts as tenant ``default`` with every scope.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from conveyor.coordinator.api import context as request_context
from conveyor.coordinator.api.interceptors.base import (
    Behavior,
    BehaviorInterceptor,
    take_first_message,
)
from conveyor.coordinator.errors import ConveyorError, QuotaExceeded
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.coordinator.tenancy.auth import Authenticator, OpenStreams
from conveyor.coordinator.tenancy.quotas import hold_back


class AuthInterceptor(BehaviorInterceptor):
    def __init__(self, authenticator: Authenticator, streams: OpenStreams) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._streams = streams
        self._scopes = api_keys.required_scopes()
        self._streaming = api_keys.streaming_methods()
        self._client_streaming = api_keys.client_streaming_methods()

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        # Fails closed: a method without a scope (impossible: required_scopes() refuses to
        # start then) would need one nobody has.
        scope = self._scopes.get(method, "(none)")
        streaming = method in self._streaming
        client_streaming = method in self._client_streaming
        authenticator, streams = self._authenticator, self._streams

        async def authenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = request_context.current()
            try:
                identity = authenticator.authenticate(
                    context.invocation_metadata() or (), call.peer, method, call.request_id
                )
                if scope not in identity.scopes:
                    raise authenticator.denied(identity, method, scope, call.peer)
            except ConveyorError as exc:
                if isinstance(exc, QuotaExceeded) and exc.retry_after is not None:
                    # A throttled peer: every call it makes meanwhile ignores the RetryInfo
                    # it got, so each is answered late (see Quotas.hold).
                    await hold_back(exc.retry_after)
                if client_streaming:
                    await take_first_message(context)
                raise
            token = request_context.update(
                tenant=identity.tenant, key_id=identity.key_id, scopes=identity.scopes
            )
            try:
                if streaming:

                    async def stream() -> Any:
                        return await behavior(request, context)

                    return await streams.run(identity, stream)
                return await behavior(request, context)
            finally:
                request_context.reset(token)

        return authenticated
