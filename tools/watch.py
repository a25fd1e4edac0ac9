#!/usr/bin/env python3
# Prints the events of one GraphQL subscription (graphql-transport-ws) as JSON lines.
# Usage: TOKEN=dpl_... [PORT=8080] python3 tools/watch.py 'subscription { ... }'
# Needs the websockets package (python3 -m pip install websockets).
import asyncio, json, os, sys, websockets

async def main():
    url = "ws://localhost:%s/graphql/ws" % os.environ.get("PORT", "8080")
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        await ws.send(json.dumps({"type": "connection_init",
                                  "payload": {"Authorization": "Bearer " + os.environ["TOKEN"]}}))
        await ws.recv()  # connection_ack
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": sys.argv[1]}}))
        async for message in ws:
            print(message, flush=True)

asyncio.run(main())
