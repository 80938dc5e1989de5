// client-worker.js: the SharedWorker that holds the one WebSocket shared by the tabs of an
// origin (client.js's `shared` option; see client-shared.js). One instance runs per broker URL
// and user: the worker's name is the sharing key.
import { Hub, PREFIX, randomId, tabLock } from "./client-hub.js";

/** Serve a hub in this SharedWorker: each connecting tab says hello with its id, and the
 * worker watches the tab's lock; the worker holds a lock of its own, which it tells the tabs,
 * so that they learn when it is gone. */
function serveSharedWorker(scope) {
  let hub = null;
  let lock = null;
  const held = new Promise((resolve) => {
    lock = `${PREFIX}:worker:${scope.name}:${randomId()}`;
    navigator.locks.request(lock, () => {
      resolve();
      return new Promise(() => {});
    });
  });
  scope.onconnect = (event) => {
    const port = event.ports[0];
    const link = { id: randomId(), send: (msg) => port.postMessage(msg) };
    port.onmessage = (e) => {
      const msg = e.data;
      if (msg.type === "hello") {
        if (!hub) hub = new Hub();
        held.then(() => port.postMessage({ type: "hello", hub: lock, lock }));
        // the tab's own lock is granted to us once the tab is gone
        navigator.locks.request(tabLock(msg.key, msg.tab), () => hub.linkGone(link));
      } else if (hub) hub.receive(link, msg);
    };
    port.start();
  };
}

serveSharedWorker(self);
