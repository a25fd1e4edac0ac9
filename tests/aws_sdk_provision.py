"""The unmodified AWS IoT Device SDK v2 for Python (awsiotsdk) iotidentity client provisions
a device with Doppel's fleet provisioning: it logs in with a claim certificate, gets a key
and certificate of its own (CreateKeysAndCertificate), trades the ownership token and its
parameters for a thing (RegisterThing), then logs in with the new certificate as that thing
and updates its shadow.

Run by tests/aws_sdk.rs: python aws_sdk_provision.py HOST PORT CLAIM_CERT CLAIM_KEY CA TEMPLATE SERIAL OUT_DIR
"""
import os
import sys
from concurrent.futures import Future
from awscrt import mqtt
from awsiot import iotidentity, iotshadow, mqtt_connection_builder

host, port = sys.argv[1], int(sys.argv[2])
claim_cert, claim_key, ca, template, serial, out = sys.argv[3:9]
Q = mqtt.QoS.AT_LEAST_ONCE

def waiter():
    f = Future(); return f, (lambda r: f.done() or f.set_result(r))

def connect(cert, key, client_id):
    conn = mqtt_connection_builder.mtls_from_path(endpoint=host, port=port, cert_filepath=cert,
        pri_key_filepath=key, ca_filepath=ca, client_id=client_id, clean_session=True, keep_alive_secs=30)
    conn.connect().result(10)
    return conn

claim = connect(claim_cert, claim_key, "claim-" + serial)
identity = iotidentity.IotIdentityClient(claim)
created, on_created = waiter(); create_err, on_create_err = waiter()
identity.subscribe_to_create_keys_and_certificate_accepted(
    iotidentity.CreateKeysAndCertificateSubscriptionRequest(), Q, on_created)[0].result(10)
identity.subscribe_to_create_keys_and_certificate_rejected(
    iotidentity.CreateKeysAndCertificateSubscriptionRequest(), Q, on_create_err)[0].result(10)
identity.publish_create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest(), Q).result(10)
keys = created.result(10)
print("created certificate", keys.certificate_id)
assert keys.certificate_ownership_token and keys.private_key.startswith("-----BEGIN")

registered, on_registered = waiter(); register_err, on_register_err = waiter()
sub = iotidentity.RegisterThingSubscriptionRequest(template_name=template)
identity.subscribe_to_register_thing_accepted(sub, Q, on_registered)[0].result(10)
identity.subscribe_to_register_thing_rejected(sub, Q, on_register_err)[0].result(10)
# A made-up token is rejected; the real one is traded once.
identity.publish_register_thing(iotidentity.RegisterThingRequest(template_name=template,
    certificate_ownership_token="made-up", parameters={"SerialNumber": serial}), Q).result(10)
bad = register_err.result(10)
print("made-up token rejected:", bad.status_code, bad.error_code, bad.error_message)
assert bad.status_code == 400
identity.publish_register_thing(iotidentity.RegisterThingRequest(template_name=template,
    certificate_ownership_token=keys.certificate_ownership_token, parameters={"SerialNumber": serial}), Q).result(10)
thing = registered.result(10)
print("registered thing", thing.thing_name, "configuration", thing.device_configuration)
claim.disconnect().result(10)

cert_file, key_file = os.path.join(out, "device.cert.pem"), os.path.join(out, "device.key.pem")
with open(cert_file, "w") as f: f.write(keys.certificate_pem)
with open(key_file, "w") as f: f.write(keys.private_key)
device = connect(cert_file, key_file, thing.thing_name)
shadow = iotshadow.IotShadowClient(device)
accepted, on_accepted = waiter()
shadow.subscribe_to_update_shadow_accepted(
    iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing.thing_name), Q, on_accepted)[0].result(10)
shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(thing_name=thing.thing_name,
    state=iotshadow.ShadowState(reported={"provisioned": True})), Q).result(10)
print("shadow update accepted: version", accepted.result(10).version)
device.disconnect().result(10)
print("SDK CHECK PASSED")
