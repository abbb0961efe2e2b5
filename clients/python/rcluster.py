"""rcluster-lb message bus client for Python (standard library only).

    import rcluster
    bus = rcluster.connect()
    bus.on_message(lambda msg: print(msg["from"], msg["type"], msg["data"]))  # reader thread
    bus.send("agent", "hello", {"n": 1})   # to: "master" | "agent" | "all" | worker id
    bus.broadcast("config", {"v": 2})       # every worker and the agent but the sender
    bus.heartbeat(1.0)                      # for --heartbeat-timeout
    msg = bus.recv()                        # or read synchronously (None at end of file)

One JSON object per line (docs/PROTOCOL.md section 6); the master stamps "from" (a worker id,
"agent" or "master") itself from the kernel's peer credentials.
"""
import json
import os
import socket
import threading


class Bus:
    def __init__(self, path=None):
        path = path or os.environ.get("RCLUSTER_IPC")
        if not path:
            raise RuntimeError("RCLUSTER_IPC is not set: not started by rcluster-lb")
        self.role = os.environ.get("RCLUSTER_ROLE", "worker")
        wid = os.environ.get("RCLUSTER_WORKER_ID")
        self.id = int(wid) if wid is not None else None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._reader = self.sock.makefile("rb")
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def send(self, to, type, data=None):
        line = json.dumps({"to": to, "type": type, "data": data}).encode() + b"\n"
        with self._lock:
            self.sock.sendall(line)

    def broadcast(self, type, data=None):
        self.send("all", type, data)

    def recv(self):
        """The next envelope as a dict, or None when the master closed the connection."""
        while True:
            line = self._reader.readline()
            if not line:
                return None
            if line.strip():
                return json.loads(line)

    def on_message(self, callback):
        """Calls callback(msg) for every envelope, on a daemon thread."""
        def loop():
            while True:
                msg = self.recv()
                if msg is None:
                    return
                callback(msg)
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t

    def heartbeat(self, interval):
        """Sends a heartbeat now and every `interval` seconds, on a daemon thread."""
        self.send("master", "heartbeat")

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.send("master", "heartbeat")
                except OSError:
                    return
        threading.Thread(target=loop, daemon=True).start()

    def close(self):
        self._stop.set()
        self.sock.close()


def connect(path=None):
    return Bus(path)
