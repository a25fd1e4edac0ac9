//! The connection of a device logged in with a claim certificate: AWS IoT's fleet
//! provisioning MQTT API and nothing else. It may subscribe to the answers of
//! `$aws/certificates/create/json`, `$aws/certificates/create-from-csr/json` and
//! `$aws/provisioning-templates/{its template}/provision/json` (`/accepted`,
//! `/rejected`) and publish those three requests; anything else is refused as outside its
//! topics. It has no thing, twin or persistent session; it ends when its certificate
//! stops being ACTIVE.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use twin_actors::services::CertificateLogin;
use twin_model::{Rejection, RejectionKind};

use crate::acl;
use crate::codec::{
    self, DisconnectCode, InPublish, Inbound, Outbound, PubAckCode, SubCode, Version,
};
use crate::connection::{Context, Stream, read_some, write};
use crate::limits::TokenBucket;

const CREATE: &str = "$aws/certificates/create/json";
const CREATE_FROM_CSR: &str = "$aws/certificates/create-from-csr/json";

/// The request topics a claim certificate of `template` may publish to.
fn requests(template: &str) -> [String; 3] {
    [
        CREATE.to_owned(),
        CREATE_FROM_CSR.to_owned(),
        format!("$aws/provisioning-templates/{template}/provision/json"),
    ]
}

/// Whether a claim certificate of `template` may subscribe to `filter`: the answers of
/// its requests only.
fn may_subscribe(template: &str, filter: &str) -> bool {
    requests(template).iter().any(|request| {
        ["accepted", "rejected"]
            .iter()
            .any(|answer| filter == format!("{request}/{answer}"))
    })
}

/// The `rejected` payload of AWS IoT's provisioning API for `r`.
fn rejected(r: &Rejection) -> Value {
    let error_code = match r.kind {
        RejectionKind::BadRequest | RejectionKind::UnsupportedEncoding => "InvalidPayload",
        RejectionKind::Forbidden | RejectionKind::Unauthorized => "Forbidden",
        RejectionKind::NotFound => "ResourceNotFound",
        RejectionKind::TooManyRequests => "Throttled",
        RejectionKind::VersionConflict => "ConflictException",
        RejectionKind::PayloadTooLarge => "PayloadTooLarge",
        RejectionKind::Internal | RejectionKind::Unavailable => "InternalFailure",
    };
    json!({"statusCode": r.kind.code(), "errorCode": error_code, "errorMessage": r.message})
}

/// A request's payload as a JSON object, or why not.
fn object(payload: &[u8]) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_slice(payload) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Rejection::bad_request("the payload is not a JSON object")),
    }
}

fn string<'a>(body: &'a Map<String, Value>, key: &str) -> Result<&'a str, Rejection> {
    body.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| Rejection::bad_request(format!("{key} is missing or not a string")))
}

/// A claim device's session.
pub(crate) struct ClaimSession<S> {
    pub(crate) ctx: Arc<Context>,
    pub(crate) stream: S,
    pub(crate) peer: SocketAddr,
    pub(crate) version: Version,
    pub(crate) rbuf: BytesMut,
    pub(crate) template: String,
    pub(crate) login: CertificateLogin,
    pub(crate) keep_alive: u16,
}

impl<S: Stream> ClaimSession<S> {
    /// Serves the session until it ends.
    pub(crate) async fn run(mut self) {
        let mut shutdown = self.ctx.shutdown.clone();
        let mut subscriptions: Vec<(String, u8)> = Vec::new();
        let mut publishes = TokenBucket::new(
            self.ctx.config.max_publishes_per_second,
            self.ctx.config.max_publishes_per_second,
            Instant::now(),
        );
        let mut next_pkid: u16 = 0;
        // One and a half keep-alives of silence end the session (MQTT 3.1.2.10).
        let silence = if self.keep_alive > 0 {
            Duration::from_millis(u64::from(self.keep_alive) * 1500)
        } else {
            Duration::MAX / 4
        };
        let max = self.ctx.config.max_packet_size;
        loop {
            let mut out = BytesMut::new();
            // Whatever came in with the CONNECT, then each read.
            loop {
                let packet = match codec::read(&mut self.rbuf, self.version, max) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "claim session: bad packet");
                        return;
                    }
                };
                crate::telemetry::received(&packet);
                match packet {
                    Inbound::Subscribe { pkid, filters } => {
                        let codes = filters
                            .into_iter()
                            .map(|(filter, qos)| {
                                if may_subscribe(&self.template, &filter) {
                                    let granted = qos.min(1);
                                    subscriptions.retain(|(f, _)| *f != filter);
                                    subscriptions.push((filter, granted));
                                    SubCode::Granted(granted)
                                } else {
                                    tracing::warn!(peer = %self.peer, %filter, "claim certificate: subscription refused outside the provisioning topics");
                                    SubCode::NotAuthorized
                                }
                            })
                            .collect();
                        self.send(&Outbound::SubAck { pkid, codes }, &mut out);
                    }
                    Inbound::Unsubscribe { pkid, filters } => {
                        subscriptions.retain(|(f, _)| !filters.contains(f));
                        let count = filters.len();
                        self.send(&Outbound::UnsubAck { pkid, count }, &mut out);
                    }
                    Inbound::PingReq => self.send(&Outbound::PingResp, &mut out),
                    Inbound::PubAck(_) => {}
                    Inbound::Disconnect { .. } => return,
                    Inbound::Publish(p) => {
                        if !publishes.admit(Instant::now()) {
                            crate::telemetry::throttled();
                            if !self.refuse(&p, PubAckCode::QuotaExceeded, &mut out) {
                                let _ = self.stream.write_all(&out).await;
                                return;
                            }
                            continue;
                        }
                        if !requests(&self.template).contains(&p.topic) {
                            tracing::warn!(peer = %self.peer, topic = %p.topic, "claim certificate: publish refused outside the provisioning topics");
                            if !self.refuse(&p, PubAckCode::NotAuthorized, &mut out) {
                                let _ = self.stream.write_all(&out).await;
                                return;
                            }
                            continue;
                        }
                        let answer = self.answer(&p).await;
                        self.audit(&p.topic, &answer).await;
                        if p.qos == 1 {
                            let ack = Outbound::PubAck {
                                pkid: p.pkid,
                                code: PubAckCode::Success,
                            };
                            self.send(&ack, &mut out);
                        }
                        let (suffix, body) = match answer {
                            Ok(body) => ("accepted", body),
                            Err(r) => ("rejected", rejected(&r)),
                        };
                        let topic = format!("{}/{suffix}", p.topic);
                        let granted = subscriptions
                            .iter()
                            .filter(|(f, _)| acl::matches(f, &topic))
                            .map(|(_, q)| *q)
                            .max();
                        if let Some(qos) = granted {
                            next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                            let publish = Outbound::Publish {
                                topic,
                                payload: Bytes::from(body.to_string()),
                                qos,
                                pkid: if qos == 1 { next_pkid } else { 0 },
                                dup: false,
                                correlation_data: p.correlation_data.clone(),
                                traceparent: None,
                            };
                            self.send(&publish, &mut out);
                        }
                    }
                    Inbound::Connect(_) | Inbound::Unsupported(_) => {
                        self.send(
                            &Outbound::Disconnect(
                                DisconnectCode::ProtocolError,
                                "unexpected packet".into(),
                            ),
                            &mut out,
                        );
                        let _ = self.stream.write_all(&out).await;
                        return;
                    }
                }
            }
            if !out.is_empty() && self.stream.write_all(&out).await.is_err() {
                return;
            }
            tokio::select! {
                why = self.login.ended() => {
                    let mut out = BytesMut::new();
                    self.send(&Outbound::Disconnect(DisconnectCode::NotAuthorized, why.into()), &mut out);
                    let _ = self.stream.write_all(&out).await;
                    return;
                }
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(silence) => return,
                read = read_some(&mut self.stream, &mut self.rbuf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        }
    }

    fn send(&self, packet: &Outbound, out: &mut BytesMut) {
        write(packet, self.version, out, usize::MAX);
    }

    /// Refuses a publish: PUBACK `code` (MQTT 5 QoS 1), dropped (MQTT 5 QoS 0), or the
    /// end of a 3.1.1 connection (`false`: end it).
    fn refuse(&self, p: &InPublish, code: PubAckCode, out: &mut BytesMut) -> bool {
        if self.version == Version::V4 {
            return false;
        }
        if p.qos == 1 {
            self.send(&Outbound::PubAck { pkid: p.pkid, code }, out);
        }
        true
    }

    /// Appends a provisioning request to the audit log, the claim certificate as its
    /// actor (no secrets: the private key and the ownership token are left out).
    async fn audit(&self, topic: &str, answer: &Result<Value, Rejection>) {
        let (arguments, outcome) = match answer {
            Ok(body) => {
                let mut shown = body.clone();
                if let Some(m) = shown.as_object_mut() {
                    m.remove("privateKey");
                    m.remove("certificateOwnershipToken");
                    m.remove("certificatePem");
                }
                (shown, "ok".to_owned())
            }
            Err(r) => (Value::Null, format!("error: {}", r.message)),
        };
        let action = twin_store::audit::Action {
            actor: format!("certificate:{}", self.login.certificate()),
            action: format!("mqtt {topic}"),
            arguments,
            outcome,
            at: twin_store::now_millis(),
        };
        if let Err(e) = self.ctx.fleet.audit().append(action).await {
            tracing::error!(error = %e, "a provisioning request was not written to the audit log");
        }
    }

    /// The answer to a provisioning request.
    async fn answer(&self, p: &InPublish) -> Result<Value, Rejection> {
        let body = object(&p.payload)?;
        let provisioning = self.ctx.fleet.provisioning();
        let fail = |e: twin_actors::FleetError| e.to_rejection();
        if p.topic == CREATE {
            let made = provisioning
                .create_keys_and_certificate()
                .await
                .map_err(fail)?;
            return Ok(json!({
                "certificateId": made.record.id.as_str(),
                "certificatePem": made.record.pem,
                "privateKey": made.private_key_pem,
                "certificateOwnershipToken": made.ownership_token,
            }));
        }
        if p.topic == CREATE_FROM_CSR {
            let csr = string(&body, "certificateSigningRequest")?;
            let made = provisioning
                .create_certificate_from_csr(csr)
                .await
                .map_err(fail)?;
            return Ok(json!({
                "certificateId": made.record.id.as_str(),
                "certificatePem": made.record.pem,
                "certificateOwnershipToken": made.ownership_token,
            }));
        }
        let token = string(&body, "certificateOwnershipToken")?;
        let parameters = match body.get("parameters") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(Rejection::bad_request("parameters is not an object")),
        };
        let registered = provisioning
            .register_thing(&self.template, token, &parameters)
            .await
            .map_err(fail)?;
        Ok(json!({
            "thingName": registered.thing.as_str(),
            "deviceConfiguration": registered.device_configuration,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_certificate_subscribes_only_to_its_answers() {
        assert!(may_subscribe(
            "lamps",
            "$aws/certificates/create/json/accepted"
        ));
        assert!(may_subscribe(
            "lamps",
            "$aws/certificates/create-from-csr/json/rejected"
        ));
        assert!(may_subscribe(
            "lamps",
            "$aws/provisioning-templates/lamps/provision/json/accepted"
        ));
        assert!(!may_subscribe(
            "lamps",
            "$aws/provisioning-templates/other/provision/json/accepted"
        ));
        assert!(!may_subscribe("lamps", "$aws/certificates/#"));
        assert!(!may_subscribe(
            "lamps",
            "$aws/things/lamp-1/shadow/update/accepted"
        ));
        assert!(
            requests("lamps")
                .contains(&"$aws/provisioning-templates/lamps/provision/json".to_owned())
        );
    }

    #[test]
    fn rejections_carry_aws_error_codes() {
        let r = rejected(&Rejection::bad_request("no"));
        assert_eq!(
            r,
            json!({"statusCode": 400, "errorCode": "InvalidPayload", "errorMessage": "no"})
        );
    }
}
