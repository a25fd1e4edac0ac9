"""The unmodified AWS IoT Device SDK v2 for Python (awsiotsdk) shadow client against Doppel:
update -> accepted + delta, get (with delta), delete, get -> 404.

Run by tests/aws_sdk.rs: python aws_sdk_shadow.py HOST PORT THING SECRET (plain TCP, the
secret as password), or python aws_sdk_shadow.py HOST PORT THING --mtls CERT KEY CA (mutual
TLS and no password, through the SDK's own mtls_from_path builder, as for AWS IoT Core).
"""
import sys
from concurrent.futures import Future
from awscrt import io, mqtt
from awsiot import iotshadow, mqtt_connection_builder

host, port, thing = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if len(sys.argv) > 4 and sys.argv[4] == "--mtls":
    cert, key, ca = sys.argv[5:8]
    conn = mqtt_connection_builder.mtls_from_path(endpoint=host, port=port, cert_filepath=cert,
        pri_key_filepath=key, ca_filepath=ca, client_id=thing, clean_session=True, keep_alive_secs=30)
else:
    password = sys.argv[4] if len(sys.argv) > 4 else None
    elg = io.EventLoopGroup(1); resolver = io.DefaultHostResolver(elg); bootstrap = io.ClientBootstrap(elg, resolver)
    client = mqtt.Client(bootstrap, None)  # plain TCP: no TLS context
    conn = mqtt.Connection(client=client, host_name=host, port=port, client_id=thing, clean_session=True,
                           keep_alive_secs=30, username="sdk-check", password=password)
conn.connect().result(10)
shadow = iotshadow.IotShadowClient(conn)
Q = mqtt.QoS.AT_LEAST_ONCE

def waiter():
    f = Future(); return f, (lambda r: f.done() or f.set_result(r))

upd_ok, on_upd_ok = waiter(); upd_err, on_upd_err = waiter()
delta, on_delta = waiter(); get_ok, on_get_ok = waiter(); get_err, on_get_err = waiter()
del_ok, on_del_ok = waiter()
for future, _topic in [
    shadow.subscribe_to_update_shadow_accepted(iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), Q, on_upd_ok),
    shadow.subscribe_to_update_shadow_rejected(iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), Q, on_upd_err),
    shadow.subscribe_to_shadow_delta_updated_events(iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing), Q, on_delta),
    shadow.subscribe_to_get_shadow_accepted(iotshadow.GetShadowSubscriptionRequest(thing_name=thing), Q, on_get_ok),
    shadow.subscribe_to_get_shadow_rejected(iotshadow.GetShadowSubscriptionRequest(thing_name=thing), Q, on_get_err),
    shadow.subscribe_to_delete_shadow_accepted(iotshadow.DeleteShadowSubscriptionRequest(thing_name=thing), Q, on_del_ok),
]:
    future.result(10)

# update: desired differs from reported -> accepted + delta
shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(thing_name=thing, client_token="sdk-1",
    state=iotshadow.ShadowState(desired={"color": "green"}, reported={"color": "off"})), Q).result(10)
acc = upd_ok.result(10)
print("update accepted: version", acc.version, "token", acc.client_token, "desired", acc.state.desired)
assert acc.version == 1 and acc.client_token == "sdk-1"
d = delta.result(10)
print("delta:", d.state, "version", d.version)
assert d.state == {"color": "green"}
# get
shadow.publish_get_shadow(iotshadow.GetShadowRequest(thing_name=thing, client_token="sdk-2"), Q).result(10)
g = get_ok.result(10)
print("get accepted: version", g.version, "desired", g.state.desired, "reported", g.state.reported, "delta", g.state.delta)
assert g.state.delta == {"color": "green"}
# delete, then get is rejected with 404
shadow.publish_delete_shadow(iotshadow.DeleteShadowRequest(thing_name=thing, client_token="sdk-3"), Q).result(10)
dl = del_ok.result(10)
print("delete accepted: version", dl.version)
assert dl.version == 1
shadow.publish_get_shadow(iotshadow.GetShadowRequest(thing_name=thing, client_token="sdk-4"), Q).result(10)
e = get_err.result(10)
print("get rejected:", e.code, e.message)
assert e.code == 404
conn.disconnect().result(10)
print("SDK CHECK PASSED")
