"""trio-pubsub: a WebSocket publish/subscribe broker on trio.

Theory of operation, in one paragraph: a *worker* (one ``trio.run``) accepts WebSocket
connections, authenticates them at the handshake (:mod:`broker.auth`), and runs one
:class:`~broker.session.Session` per connection. Client frames are parsed without I/O by
:mod:`broker.protocol`. Publications go to a *bus* (:mod:`broker.bus`), which assigns offsets,
keeps history and presence, and hands each publication back to every worker that has
subscribers for it; the worker's :class:`~broker.router.Router` frames it once and appends the
same bytes to each subscriber's :class:`~broker.sendqueue.SendQueue`, which one flusher per
worker writes out. Several workers are run by :mod:`broker.supervisor`.
"""

__version__ = "0.1.0"

from broker import native

# Before any compiled module is imported: run their extensions only while they match their
# sources (broker/native.py).
native.select()
