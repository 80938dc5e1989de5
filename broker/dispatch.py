"""The request dispatcher: one client frame parsed and carried out, the publish path first.

Theory of operation
-------------------
:class:`SessionDispatch` adds to :class:`~broker.reads.SessionReads` the dispatch of
what the client sends, and the requests that are not reads: ``auth`` (in-band authentication
and token refresh), ``publish`` and ``ping``. The serving loop of
:class:`~broker.session.Session` hands it each message through :meth:`_serve_now`.

The hot path, a publication the bus takes without waiting, is served in plain calls from the
bytes already read (:meth:`_serve_now`, :meth:`_publish`): no coroutine, and no closure when it
has no ``id``; everything else is awaited (:meth:`_serve`). Publications are pipelined where
the bus allows it: the bus answers them in order, and any other request (or a refusal) waits
for them first, so replies still come in request order. Every failure becomes an error reply
(:meth:`_answer_failure`): :class:`~broker.errors.FrameError` with its code, a bus that is
down with ``unavailable``, anything else, logged once, with ``internal``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import structlog
import trio

from broker import protocol as p
from broker.bus.base import Publication
from broker.errors import AuthError, BusUnavailable, FrameError
from broker.reads import SessionReads
from broker.topics import validate_topic

__all__ = ["SessionDispatch"]

log = structlog.get_logger()


class SessionDispatch(SessionReads):
    """Parses and carries out the client's requests (see the module docstring)."""

    __slots__ = ()  # the state is SessionState's

    # --- input --------------------------------------------------------------------------

    def _serve_now(self, message: str | bytes) -> Coroutine[Any, Any, None] | None:
        """Parse and carry out one client frame as far as that needs no waiting; every failure
        becomes an error reply. Returns what is left, to be awaited at once (None when
        nothing is): a publication the bus takes without waiting, the hot path, is served
        here whole, without a coroutine."""
        try:
            command = p.parse_command(message)
        except FrameError as exc:
            return self._fail(exc.frame_id, exc, "parse")
        if type(command) is not p.Publish or self.identity is None:
            return self._serve(command)
        try:
            if self._publish(command):
                return None
        except Exception as exc:
            return self._fail(command.id, exc, "publish")
        return self._serve(command)

    async def _serve(self, command: p.Command) -> None:
        """Carry out ``command`` (a publication here only when the bus must be awaited)."""
        try:
            await self._execute(command)
        except Exception as exc:
            left = self._fail(command.id, exc, type(command).__name__.lower())
            if left is not None:
                await left

    def _fail(
        self, frame_id: p.FrameId, exc: BaseException, op: str
    ) -> Coroutine[Any, Any, None] | None:
        """Answer a request that failed with ``exc`` (:meth:`_answer_failure`) once every
        pipelined publication is answered, so that replies stay in request order: returns the
        wait for those, to be awaited at once, when some are unanswered."""
        if self.publishing:
            return self._fail_in_order(frame_id, exc, op)
        self._answer_failure(frame_id, exc, op)
        return None

    async def _fail_in_order(self, frame_id: p.FrameId, exc: BaseException, op: str) -> None:
        await self._settle_publishes()
        self._answer_failure(frame_id, exc, op)

    def _answer_failure(self, frame_id: p.FrameId, exc: BaseException, op: str) -> None:
        """The error reply to a request that failed with ``exc``: :class:`FrameError` with its
        code, :class:`BusUnavailable` with ``unavailable``, anything else (logged once) with
        ``internal``."""
        if isinstance(exc, FrameError):
            self.error(frame_id, exc.code, exc.message)
        elif isinstance(exc, BusUnavailable):
            self.error(frame_id, "unavailable", "the message bus is unavailable; try again")
        else:
            log.error("internal_error", op=op, exc_info=exc)
            self.error(frame_id, "internal", "internal error; the request was not carried out")

    async def _settle_publishes(self) -> None:
        """Wait until every pipelined publication has been answered (replies stay in order)."""
        while self.publishing:
            self._published = trio.Event()
            await self._published.wait()

    async def _execute(self, command: p.Command) -> None:
        if isinstance(command, p.Publish) and self.identity is not None:
            # The bus must be awaited (_serve_now did the rest): one publication at a time.
            self.publishing += 1
            try:
                pub = await self.worker.bus.publish(
                    command.topic, command.data, self.identity.client
                )
            finally:
                # Answered here or by _fail, never by _on_published.
                self._settle()
            self._on_published(command.id, pub)
            return
        await self._settle_publishes()
        if isinstance(command, p.Auth):
            await self._auth(command)
            return
        if self.identity is None:
            raise FrameError("unauthorized", 'authenticate first: send {"op":"auth","token":...}')
        if isinstance(command, p.Subscribe):
            await self._subscribe(command)
        elif isinstance(command, p.Unsubscribe):
            await self._unsubscribe(command)
        elif isinstance(command, p.Ping):
            self.reply(command.id)
        elif isinstance(command, p.History):
            await self._history(command)
        elif isinstance(command, p.Presence):
            await self._presence(command)

    async def _auth(self, cmd: p.Auth) -> None:
        worker = self.worker
        try:
            identity = worker.verifier.verify(cmd.token)
        except AuthError as exc:
            worker.count_auth_failure(exc.reason)
            log.info("auth_failed", reason=exc.reason, source="inband")
            self.error(cmd.id, "unauthorized", str(exc))
            if self.identity is None:
                self.close(p.CloseCode.NOT_AUTHENTICATED, "authentication failed")
            return
        if self.identity is None:
            refused = worker.slots.admit(self.conn_id, identity.client)
            if refused is not None:
                code, error_code, message = worker.refusal(refused)
                log.info("refused", reason=refused, client=identity.client, source="inband")
                self.error(cmd.id, error_code, message)
                self.close(code, message)
                return
            self.identity = identity
            self._set_expiry(identity)
            self._reschedule()
            structlog.contextvars.bind_contextvars(client=identity.client)
            log.info("authenticated", source="inband")
            self._welcome()
        else:
            if identity.client != self.identity.client:
                raise FrameError(
                    "unauthorized", "a refreshed token must name the same client (sub)"
                )
            self.identity = identity
            self._set_expiry(identity)
            self._reschedule()
            for pattern, sub in self.subs.items():
                if not identity.subscribe.allows_pattern(pattern):
                    self.close(
                        p.CloseCode.POLICY_VIOLATION, f"no longer allowed to subscribe to {pattern}"
                    )
                    return
                if sub.presence and not identity.presence.allows_topic(pattern):
                    self.close(
                        p.CloseCode.POLICY_VIOLATION,
                        f"no longer allowed to read the presence of {pattern}",
                    )
                    return
        self.reply(cmd.id, client=identity.client, expires_at=identity.expires_at)

    def _publish(self, cmd: p.Publish) -> bool:
        """Check ``cmd`` and hand it to the bus without waiting, if the bus can: True then
        (answered here when the bus settles it at once, else by the bus through
        :meth:`_on_published`, in order), False when the caller must await the bus instead
        (:meth:`_execute`). Raises :class:`FrameError` (``bad_topic``, ``forbidden``,
        ``too_large``, ``rate_limited``, ``too_many_topics``) when it is refused."""
        identity = self.identity
        assert identity is not None
        topic = validate_topic(cmd.topic)
        if not identity.publish.allows_topic(topic):
            raise FrameError("forbidden", f"not allowed to publish to {topic}")
        limits = self.worker.config.limits
        data = cmd.data
        if len(data) > limits.max_data_size or not data.isascii():  # else it passes
            p.check_data_size(data, limits.max_data_size)
        # Refilled up to when the frame was read, not now: never later than now, so never
        # looser, and without a clock read per publication.
        if not self.bucket.take(self.ws.last_receive):
            raise FrameError(
                "rate_limited", f"publish rate limit is {limits.publish_rate:g}/s; slow down"
            )
        # Pipelined where the bus allows it: the reader goes on with the next frame while the
        # publication travels, so a burst of publications reaches the bus (and then every
        # subscriber) together. The bus answers publications in order, and any other op waits
        # for them first (_execute), so replies still come in request order. Without an id
        # nothing but the count needs answering, and no closure is made.
        frame_id = cmd.id
        bus = self.worker.bus
        if not self.publishing:  # nothing before it left to answer: its reply may go now
            pub = bus.publish_now(topic, data, identity.client)
            if pub is not None:
                if frame_id is not None:
                    self.send_text(p.encode_published(frame_id, pub.offset, pub.epoch))
                return True
        self.publishing += 1
        if frame_id is None:
            done: Callable[[Publication | BaseException], None] = self._on_published_anonymous
        else:

            def done(result: Publication | BaseException) -> None:
                self._settle()
                self._on_published(frame_id, result)

        taken = False
        try:
            taken = bus.publish_nowait(topic, data, identity.client, done)
        finally:
            if not taken:  # to be awaited (_execute), or failed: not pipelined after all
                self.publishing -= 1
        return taken

    def _settle(self) -> None:
        """One pipelined publication is answered."""
        self.publishing -= 1
        if not self.publishing and self._published is not None:
            self._published.set()

    def _on_published_anonymous(self, result: Publication | BaseException) -> None:
        self._settle()
        if type(result) is not Publication:
            self._on_published(None, result)

    def _on_published(self, frame_id: p.FrameId, result: Publication | BaseException) -> None:
        """Answer a publication the bus has settled with ``result``."""
        if isinstance(result, Publication):
            if frame_id is not None:
                self.send_text(p.encode_published(frame_id, result.offset, result.epoch))
        else:
            # too_many_topics from the bus, or a failure. Its turn is now: the bus answers in
            # order, so every publication before it is answered already.
            self._answer_failure(frame_id, result, "publish")
