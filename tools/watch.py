#!/usr/bin/env python3
"""Prints the events of one GraphQL subscription (graphql-transport-ws), one JSON line each.

Usage:
  python3 tools/watch.py [--only TYPES] [--count N] [--out FILE] 'subscription { ... }'
  python3 tools/watch.py --show FILE --count N

The API token comes from TOKEN, the server's HTTP port from HTTP_PORT (default 8080).

  --count N      stop after N events (the first, Subscribed, included)
  --only TYPES   print only events whose __typename is in TYPES (comma-separated);
                 Subscribed is always printed
  --out FILE     run in the background, writing the events to FILE, and return as soon
                 as the subscription is live (its Subscribed event is in FILE)
  --show FILE    wait (at most 20 s) until FILE holds N events, then print them

Needs the websockets package (python3 -m pip install websockets).
"""
import argparse, asyncio, json, os, subprocess, sys, time

DEADLINE = 20.0


def typename(message):
    data = json.loads(message).get("payload", {}).get("data") or {}
    event = next(iter(data.values()), None) or {}
    return event.get("__typename")


async def watch(query, count, only):
    import websockets
    url = "ws://localhost:%s/graphql/ws" % os.environ.get("HTTP_PORT", "8080")
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        await ws.send(json.dumps({"type": "connection_init",
                                  "payload": {"Authorization": "Bearer " + os.environ["TOKEN"]}}))
        ack = json.loads(await ws.recv())
        if ack.get("type") != "connection_ack":
            sys.exit("not acknowledged: %s" % ack)
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query}}))
        seen = 0
        async for message in ws:
            kind = typename(message)
            if only and kind != "Subscribed" and kind not in only:
                continue
            print(message, flush=True)
            seen += 1
            if count and seen >= count:
                return


def wait_for_lines(path, count, child=None):
    """The first `count` lines of `path`, once it has them (at most DEADLINE seconds)."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if os.path.exists(path):
            with open(path) as f:
                lines = [l for l in f.read().splitlines() if l]
            if len(lines) >= count:
                return lines[:count]
        if child is not None and child.poll() is not None:
            sys.exit("watch.py stopped (exit %s) before its subscription was live" % child.returncode)
        time.sleep(0.05)
    sys.exit("%s: fewer than %d events after %.0f s" % (path, count, DEADLINE))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", nargs="?")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--only", default="")
    p.add_argument("--out")
    p.add_argument("--show")
    a = p.parse_args()
    if a.show:
        for line in wait_for_lines(a.show, max(a.count, 1)):
            print(line)
        return
    if not a.query:
        p.error("give a subscription query")
    if a.out:
        args = [sys.executable, os.path.abspath(__file__), a.query, "--count", str(a.count), "--only", a.only]
        with open(a.out, "w") as out:
            child = subprocess.Popen(args, stdout=out, start_new_session=True)
        wait_for_lines(a.out, 1, child)
        return
    only = {t for t in a.only.split(",") if t}
    try:
        asyncio.run(watch(a.query, a.count, only))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
