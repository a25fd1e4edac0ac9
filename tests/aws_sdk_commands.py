"""A device on the official AWS IoT Device SDK v2 for Python (awsiotsdk's MQTT 5 client,
awscrt.mqtt5; the SDK has no commands client, so devices use the commands topics directly,
as AWS documents) runs a command that waited for it while it was offline.

Run by tests/aws_sdk.rs: python aws_sdk_commands.py HOST PORT THING SECRET EXECUTION_ID
It subscribes, takes the command, answers IN_PROGRESS then SUCCEEDED (with an MQTT 5
response topic and correlation data), and checks that a late answer is rejected.
"""
import json
import sys
from concurrent.futures import Future
from awscrt import mqtt5
from sdk_check import Waiter, fail

host, port, thing, password, execution_id = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
base = "$aws/commands/things/%s/executions" % thing
Q = mqtt5.QoS.AT_LEAST_ONCE

inbox = Waiter()
connected = Future()
client = mqtt5.Client(mqtt5.ClientOptions(
    host_name=host, port=port,
    connect_options=mqtt5.ConnectPacket(client_id=thing, username="sdk-check", password=password),
    on_publish_callback_fn=lambda data: inbox(data.publish_packet),
    on_lifecycle_event_connection_success_fn=lambda _: connected.set_result(None),
    on_lifecycle_event_connection_failure_fn=lambda d: connected.set_exception(Exception(str(d.exception))),
))
client.start()
connected.result(10)
client.subscribe(mqtt5.SubscribePacket([
    mqtt5.Subscription(base + "/+/request/#", Q),
    mqtt5.Subscription(base + "/+/response/+/json", Q),
])).result(10)

request = inbox.take(20)
if request.topic != "%s/%s/request/json" % (base, execution_id):
    fail("the waiting command came on %s" % request.topic)
if json.loads(request.payload) != {"delay": 5}:
    fail("the command payload: %r" % request.payload)

def answer(body, **props):
    client.publish(mqtt5.PublishPacket(topic="%s/%s/response/json" % (base, execution_id),
                                       payload=json.dumps(body), qos=Q, **props)).result(10)
    return inbox.take()

reply = answer({"status": "IN_PROGRESS"})
if not reply.topic.endswith("/response/accepted/json") or json.loads(reply.payload)["status"] != "IN_PROGRESS":
    fail("IN_PROGRESS was not accepted: %s %r" % (reply.topic, reply.payload))

accepted_topic = "%s/%s/response/accepted/json" % (base, execution_id)
reply = answer({"status": "SUCCEEDED", "result": {"uptime": {"s": "3"}}},
               response_topic=accepted_topic, correlation_data=b"c-42")
if reply.topic != accepted_topic or json.loads(reply.payload)["status"] != "SUCCEEDED":
    fail("SUCCEEDED was not accepted: %s %r" % (reply.topic, reply.payload))
if reply.correlation_data_bytes != b"c-42":
    fail("the correlation data was not echoed: %r" % reply.correlation_data_bytes)

reply = answer({"status": "FAILED"})
if not reply.topic.endswith("/response/rejected/json") or json.loads(reply.payload)["error"] != "TerminalStateReached":
    fail("a late answer was not rejected: %s %r" % (reply.topic, reply.payload))

client.stop()
print("SDK CHECK PASSED", flush=True)
