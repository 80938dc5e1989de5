// client-worker.js: the SharedWorker that holds the one WebSocket shared by the tabs of an
// origin (client.js's `shared` option; see client-shared.js). One instance runs per broker URL
// and user: the worker's name is the sharing key.
import { serveSharedWorker } from "./client-shared.js";

serveSharedWorker(self);
