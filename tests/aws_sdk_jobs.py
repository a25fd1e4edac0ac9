"""The unmodified AWS IoT Device SDK v2 for Python (awsiotsdk) jobs client against Doppel:
wait for notify-next, get pending, start-next, report progress, succeed, find none left.

Run by tests/aws_sdk.rs: python aws_sdk_jobs.py HOST PORT THING SECRET
It prints READY once subscribed; the test then creates the job "fw-sdk".
"""
import sys
from awscrt import io, mqtt
from awsiot import iotjobs
from sdk_check import Waiter, fail

host, port, thing, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
elg = io.EventLoopGroup(1); resolver = io.DefaultHostResolver(elg); bootstrap = io.ClientBootstrap(elg, resolver)
client = mqtt.Client(bootstrap, None)  # plain TCP: no TLS context
conn = mqtt.Connection(client=client, host_name=host, port=port, client_id=thing, clean_session=True,
                       keep_alive_secs=30, username="sdk-check", password=password)
conn.connect().result(10)
jobs = iotjobs.IotJobsClient(conn)
Q = mqtt.QoS.AT_LEAST_ONCE

next_changed = Waiter(); pending_ok = Waiter(); start_ok = Waiter(); start_err = Waiter()
update_ok = Waiter(); update_err = Waiter()
subs = [
    jobs.subscribe_to_next_job_execution_changed_events(
        iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), Q, next_changed),
    jobs.subscribe_to_get_pending_job_executions_accepted(
        iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=thing), Q, pending_ok),
    jobs.subscribe_to_start_next_pending_job_execution_accepted(
        iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), Q, start_ok),
    jobs.subscribe_to_start_next_pending_job_execution_rejected(
        iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), Q, start_err),
    jobs.subscribe_to_update_job_execution_accepted(
        iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="fw-sdk"), Q, update_ok),
    jobs.subscribe_to_update_job_execution_rejected(
        iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="fw-sdk"), Q, update_err),
]
for future, _topic in subs:
    future.result(10)
print("READY", flush=True)

event = next_changed.take(20)
if event.execution is None or event.execution.job_id != "fw-sdk":
    fail("notify-next did not announce fw-sdk")
if event.execution.job_document["firmware"]["version"] != "9.9.9":
    fail("the job document did not come through")

jobs.publish_get_pending_job_executions(
    iotjobs.GetPendingJobExecutionsRequest(thing_name=thing, client_token="p1"), Q).result(10)
pending = pending_ok.take()
if [j.job_id for j in pending.queued_jobs] != ["fw-sdk"] or pending.client_token != "p1":
    fail("get pending")

jobs.publish_start_next_pending_job_execution(
    iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing, status_details={"step": "download"},
                                                step_timeout_in_minutes=5), Q).result(10)
started = start_ok.take()
if started.execution.status != "IN_PROGRESS" or started.execution.status_details != {"step": "download"}:
    fail("start-next")
version = started.execution.version_number

jobs.publish_update_job_execution(
    iotjobs.UpdateJobExecutionRequest(thing_name=thing, job_id="fw-sdk", status=iotjobs.JobStatus.IN_PROGRESS,
                                      status_details={"step": "install", "percent": "60"},
                                      expected_version=version, include_job_execution_state=True), Q).result(10)
progress = update_ok.take()
if progress.execution_state.status != "IN_PROGRESS" or progress.execution_state.status_details["percent"] != "60":
    fail("progress update")

jobs.publish_update_job_execution(
    iotjobs.UpdateJobExecutionRequest(thing_name=thing, job_id="fw-sdk", status=iotjobs.JobStatus.SUCCEEDED,
                                      expected_version=version + 1), Q).result(10)
update_ok.take()

# A stale version is rejected with the AWS error code.
jobs.publish_update_job_execution(
    iotjobs.UpdateJobExecutionRequest(thing_name=thing, job_id="fw-sdk", status=iotjobs.JobStatus.FAILED,
                                      expected_version=1), Q).result(10)
err = update_err.take()
if err.code not in ("VersionMismatch", "InvalidStateTransition"):
    fail("a stale update was not rejected: %s" % err.code)

done = next_changed.take()
if done.execution is not None:
    fail("notify-next after success should carry no execution")
jobs.publish_start_next_pending_job_execution(
    iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing), Q).result(10)
if start_ok.take().execution is not None:
    fail("start-next found a job after the only one succeeded")

conn.disconnect().result(10)
print("SDK CHECK PASSED", flush=True)
