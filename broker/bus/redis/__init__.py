"""The Redis bus: brokers on several machines share topics through one Redis (or Redis Cluster).

One responsibility per module, each with its theory of operation; imports go one way, down
this list:

- :mod:`.scripts`: the key layout and the Lua scripts (publishing, history, presence);
- :mod:`.names`: key, channel and glob names, and the messages the scripts publish;
- :mod:`.connection`: the coredis client, up or down, fail-fast commands, reconnection;
- :mod:`.subscriber`: what is subscribed, the pub/sub listener, resubscription;
- :mod:`.presence`: this node's presence entries, their refresh and the sweep of dead ones;
- :mod:`.bus`: :class:`RedisBus`, publishing, history, watching and in-order delivery.
"""

from broker.bus.redis.bus import FILL_PAGE, HistoryRuleFn, RedisBus
from broker.bus.redis.names import redis_glob
from broker.bus.redis.scripts import REDIS_ENTRY_OVERHEAD

__all__ = ["FILL_PAGE", "REDIS_ENTRY_OVERHEAD", "HistoryRuleFn", "RedisBus", "redis_glob"]
