'use strict';
// Benchmark app: answers every request with "ok"; ?us=N busy-spins N microseconds of CPU first.
const cluster = require('node:cluster');
const http = require('node:http');
const id = String(cluster.isWorker ? cluster.worker.id - 1 : (process.env.RCLUSTER_WORKER_ID || '0'));
const pid = String(process.pid);
const body = 'ok\n';
function spin(us) {
  const end = process.hrtime.bigint() + BigInt(us) * 1000n;
  while (process.hrtime.bigint() < end) { /* busy */ }
}
http.createServer((req, res) => {
  const q = req.url.indexOf('?');
  if (q >= 0) {
    const us = Number(new URLSearchParams(req.url.slice(q + 1)).get('us'));
    if (us > 0) spin(Math.min(us, 10000000));
  }
  res.writeHead(200, {
    'Content-Type': 'text/plain',
    'Content-Length': body.length,
    'X-Worker-Id': id,
    'X-Worker-Pid': pid,
  });
  res.end(body);
}).listen(Number(process.env.PORT || 0), '127.0.0.1');
