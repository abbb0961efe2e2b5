'use strict';
// rcluster-lb message bus client for Node (no dependencies). Gives a worker or the agent
// `process.on('message')`-like messaging without the cluster module:
//
//   const bus = require('./rcluster').connect();
//   bus.on('message', (msg) => console.log(msg.from, msg.type, msg.data));
//   bus.send('agent', 'hello', { n: 1 });   // to: 'master' | 'agent' | 'all' | worker id
//   bus.broadcast('config', { v: 2 });      // every worker and the agent but the sender
//   bus.heartbeat(1000);                    // for --heartbeat-timeout
//
// The envelope is one JSON object per line (docs/PROTOCOL.md section 6); the master stamps
// `from` (a worker id, 'agent' or 'master') itself from the kernel's peer credentials.
const net = require('net');
const { EventEmitter } = require('events');

class Bus extends EventEmitter {
  constructor(path) {
    super();
    if (!path) throw new Error('RCLUSTER_IPC is not set: not started by rcluster-lb');
    this.role = process.env.RCLUSTER_ROLE || 'worker';
    this.id = process.env.RCLUSTER_WORKER_ID === undefined ? null : Number(process.env.RCLUSTER_WORKER_ID);
    this._timer = null;
    this._buf = '';
    this.socket = net.connect(path);
    this.socket.setEncoding('utf8');
    this.socket.on('connect', () => this.emit('connect'));
    this.socket.on('data', (chunk) => {
      this._buf += chunk;
      let nl;
      while ((nl = this._buf.indexOf('\n')) >= 0) {
        const line = this._buf.slice(0, nl);
        this._buf = this._buf.slice(nl + 1);
        if (!line.trim()) continue;
        let msg;
        try { msg = JSON.parse(line); } catch (e) { this.emit('error', e); continue; }
        this.emit('message', msg);
      }
    });
    this.socket.on('error', (e) => this.emit('error', e));
    this.socket.on('close', () => { this.stopHeartbeat(); this.emit('close'); });
  }

  send(to, type, data) {
    return this.socket.write(JSON.stringify({ to, type, data: data === undefined ? null : data }) + '\n');
  }

  broadcast(type, data) { return this.send('all', type, data); }

  // Sends a heartbeat now and every `ms` milliseconds. The timer does not keep the process
  // alive, and it runs on the event loop: a blocked loop stops the heartbeats, which is the point.
  heartbeat(ms) {
    this.stopHeartbeat();
    this.send('master', 'heartbeat');
    this._timer = setInterval(() => this.send('master', 'heartbeat'), ms);
    this._timer.unref();
    return this;
  }

  stopHeartbeat() { if (this._timer) { clearInterval(this._timer); this._timer = null; } }

  // By default the connection keeps the process alive (an agent wants that); unref() does not.
  unref() { this.socket.unref(); return this; }
  ref() { this.socket.ref(); return this; }
  close() { this.stopHeartbeat(); this.socket.end(); }
}

exports.Bus = Bus;
exports.connect = (path) => new Bus(path || process.env.RCLUSTER_IPC);
