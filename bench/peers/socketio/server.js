// Socket.IO 4 peer for the benchmark: the same workload as the broker, in Socket.IO's idiom.
//   node server.js [PORT]   (PORT 0 or absent picks a free one; prints {"event":"ready","port":N})
// A client authenticates with {token} in the handshake auth (an HS256 JWT checked against
// BENCH_JWT_SECRET when it is set), emits "sub" with a topic (acknowledged) to join that room,
// and emits "pub" with a topic and data: everyone in the room gets "msg" with the data.
"use strict";

const crypto = require("crypto");
const http = require("http");
const { Server } = require("socket.io");

const secret = process.env.BENCH_JWT_SECRET || "";

function b64url(buf) {
  return buf.toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}

// HS256 verification with node's crypto: the same work as the broker's PyJWT check.
function verify(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const expected = Buffer.from(
    b64url(crypto.createHmac("sha256", secret).update(parts[0] + "." + parts[1]).digest()),
  );
  const given = Buffer.from(parts[2]);
  if (expected.length !== given.length || !crypto.timingSafeEqual(expected, given)) return null;
  let header, claims;
  try {
    header = JSON.parse(Buffer.from(parts[0], "base64url").toString());
    claims = JSON.parse(Buffer.from(parts[1], "base64url").toString());
  } catch (e) {
    return null;
  }
  if (header.alg !== "HS256" || typeof claims.sub !== "string") return null;
  if (typeof claims.exp !== "number" || claims.exp < Date.now() / 1000) return null;
  return claims;
}

const server = http.createServer();
const io = new Server(server, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
  httpCompression: false,
  pingInterval: 600000,
  pingTimeout: 600000,
});

io.use((socket, next) => {
  if (!secret) return next();
  const claims = verify(socket.handshake.auth && socket.handshake.auth.token);
  if (!claims) return next(new Error("unauthorized"));
  socket.data.sub = claims.sub;
  next();
});

io.on("connection", (socket) => {
  socket.on("sub", (topic, ack) => {
    socket.join(topic);
    if (typeof ack === "function") ack(true);
  });
  socket.on("pub", (topic, data) => {
    io.to(topic).emit("msg", data);
  });
});

server.listen(Number(process.argv[2] || 0), "127.0.0.1", 4096, () => {
  console.log(JSON.stringify({ event: "ready", port: server.address().port }));
});
