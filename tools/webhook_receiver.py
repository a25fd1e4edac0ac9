"""A webhook receiver for trying Doppel's routes (the README's walkthrough and the
tests): verifies every request with the official Standard Webhooks library, can fail some
at random, and logs each request.

Usage: webhook_receiver.py SECRET_FILE LOG_FILE [--port P] [--fail-rate R]
       [--slow-rate R] [--slow-secs S] [--status CODE] [--seed N]

Prints the port it listens on (127.0.0.1; any free one unless --port), then serves until
killed. --fail-rate: answer 500 to that fraction of requests; --slow-rate and --slow-secs:
sleep that long before answering that fraction (and answer 504); --status: answer every
request with that status. The signing secret
is read from SECRET_FILE at each request (the test writes it once the route exists).
Each request is logged as one JSON line: the answer given (`status`), whether the
signature verified (`true`, or why not), the event's id, thing, seq and type, and the
event itself (`body`).
"""

import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

secret_file, log_file = sys.argv[1], sys.argv[2]
options = dict(zip(sys.argv[3::2], sys.argv[4::2]))
fail_rate = float(options.get("--fail-rate", 0))
slow_rate = float(options.get("--slow-rate", 0))
slow_secs = float(options.get("--slow-secs", 0))
forced = int(options.get("--status", 0))
rng = random.Random(int(options.get("--seed", 1)))
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with lock:
            roll, slow = rng.random(), rng.random() < slow_rate
        try:
            with open(secret_file) as f:
                secret = f.read().strip()
            Webhook(secret).verify(body, dict(self.headers.items()))
            verified = True
        except Exception as e:  # any failure to verify is reported, not raised
            verified = str(e) or type(e).__name__
        if forced:
            status = forced
        elif verified is not True:
            status = 400
        elif roll < fail_rate:
            status = 500
        else:
            status = 204
        if slow:
            # Past the route's timeout: Doppel gives up on this attempt, whatever comes.
            time.sleep(slow_secs)
            status = 504 if status == 204 else status
        event = json.loads(body) if body.startswith(b"{") else {}
        line = {
            "status": status,
            "verified": verified,
            "id": self.headers.get("webhook-id"),
            "event": event.get("id"),
            "thing": event.get("thing"),
            "seq": event.get("seq"),
            "type": event.get("type"),
            "timeout": slow,
            "body": event,
        }
        with lock:
            with open(log_file, "a") as f:
                f.write(json.dumps(line) + "\n")
        try:
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except (BrokenPipeError, ConnectionResetError):
            pass  # Doppel stopped waiting (the slow requests): nothing to answer

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(options.get("--port", 0))), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
