//! MQTT over TLS, with and without required client certificates, and certificate login
//! without a password, against certificates made for the test (a CA, a server
//! certificate for localhost, a device certificate).

mod common;

use std::sync::Arc;

use bytes::BytesMut;
use common::{next_v4, server_tls, shadow};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rumqttc::mqttbytes::{QoS, v4};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt;
use twin_actors::FleetConfig;
use twin_gateway::{GatewayConfig, TlsAuth};
use twin_model::DeviceId;
use twin_model::certificate::{CertificateId, CertificateStatus};

struct Pki {
    /// Issues more certificates.
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_pem: String,
    server_key_pem: String,
    device_der: CertificateDer<'static>,
    device_pem: String,
    device_key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let device_key = KeyPair::generate().unwrap();
    let device = CertificateParams::new(vec!["lamp-tls".to_string()])
        .unwrap()
        .signed_by(&device_key, &issuer)
        .unwrap();
    Pki {
        issuer,
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        server_pem: server.pem(),
        server_key_pem: server_key.serialize_pem(),
        device_der: device.der().clone(),
        device_pem: device.pem(),
        device_key: PrivateKeyDer::try_from(device_key.serialize_der()).unwrap(),
    }
}

fn connector(pki: &Pki, with_device_cert: bool) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = if with_device_cert {
        builder
            .with_client_auth_cert(vec![pki.device_der.clone()], pki.device_key.clone_key())
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Connects over TLS as `thing` (with `secret` as the password, if any); the stream and
/// the CONNACK's code.
async fn connect_tls(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    thing: &str,
    secret: Option<&str>,
) -> std::io::Result<(TlsStream, v4::ConnectReturnCode)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut out = BytesMut::new();
    let mut connect = v4::Connect::new(thing);
    if let Some(secret) = secret {
        connect.set_login(thing, secret);
    }
    connect.write(&mut out).unwrap();
    tls.write_all(&out).await?;
    let mut inbuf = BytesMut::new();
    match next_v4(&mut tls, &mut inbuf).await {
        v4::Packet::ConnAck(a) => Ok((tls, a.code)),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Connects over TLS as `thing`, updates its shadow and returns the accepted version.
async fn update_over_tls(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    thing: &str,
    secret: &str,
) -> std::io::Result<u64> {
    let (tls, code) = connect_tls(addr, connector, thing, Some(secret)).await?;
    assert_eq!(code, v4::ConnectReturnCode::Success);
    update_shadow(tls, thing).await
}

/// Updates the shadow of `thing` on a connection that is logged in as it; the accepted
/// version.
async fn update_shadow(mut tls: TlsStream, thing: &str) -> std::io::Result<u64> {
    let mut out = BytesMut::new();
    let mut sub = v4::Subscribe::new(
        format!("{}/update/accepted", shadow(thing)),
        QoS::AtLeastOnce,
    );
    sub.pkid = 1;
    sub.write(&mut out).unwrap();
    tls.write_all(&out).await?;
    let mut inbuf = BytesMut::new();
    assert!(matches!(
        next_v4(&mut tls, &mut inbuf).await,
        v4::Packet::SubAck(_)
    ));
    let mut out = BytesMut::new();
    let mut p = v4::Publish::new(
        format!("{}/update", shadow(thing)),
        QoS::AtLeastOnce,
        r#"{"state":{"reported":{"tls":true}}}"#,
    );
    p.pkid = 2;
    p.write(&mut out).unwrap();
    tls.write_all(&out).await?;
    loop {
        if let v4::Packet::Publish(p) = next_v4(&mut tls, &mut inbuf).await {
            let accepted: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            return Ok(accepted["version"].as_u64().unwrap());
        }
    }
}

/// A server with a TLS listener for `pki`'s server certificate; with `require_client_certs`,
/// devices must present a certificate from `pki`'s CA.
async fn tls_server(pki: &Pki, require_client_certs: bool) -> common::Server {
    tls_server_with(pki, require_client_certs, TlsAuth::Any).await
}

async fn tls_server_with(pki: &Pki, require_client_certs: bool, auth: TlsAuth) -> common::Server {
    let ca = require_client_certs.then_some(pki.ca_pem.as_bytes());
    let acceptor = twin_gateway::tls::acceptor(
        pki.server_pem.as_bytes(),
        pki.server_key_pem.as_bytes(),
        ca,
        auth == TlsAuth::Certificate,
    )
    .unwrap();
    let gateway = GatewayConfig {
        tls_auth: auth,
        ..GatewayConfig::default()
    };
    server_tls(FleetConfig::default(), gateway, Some(acceptor)).await
}

/// Registers `pki`'s device certificate (ACTIVE); its id.
async fn register_device_certificate(s: &common::Server, pki: &Pki) -> CertificateId {
    s.fleet
        .certificates()
        .register(&pki.device_pem, CertificateStatus::Active)
        .await
        .unwrap()
        .id
}

/// Registers `pki`'s device certificate and attaches it to `thing`; its id.
async fn attach_device_certificate(s: &common::Server, pki: &Pki, thing: &str) -> CertificateId {
    let id = register_device_certificate(s, pki).await;
    s.fleet
        .certificates()
        .attach(&self::thing(thing), &id)
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn a_registered_attached_certificate_logs_in_without_a_password() {
    let pki = pki();
    let s = tls_server(&pki, false).await;
    s.register("lamp-tls").await;
    s.register("other").await;
    let addr = s.tls_addr.unwrap();
    let with_cert = connector(&pki, true);
    let refused = |code| code == v4::ConnectReturnCode::NotAuthorized;

    let (_, code) = connect_tls(addr, &with_cert, "lamp-tls", None)
        .await
        .unwrap();
    assert!(
        refused(code),
        "an unregistered certificate is refused: {code:?}"
    );
    let id = register_device_certificate(&s, &pki).await;
    let (_, code) = connect_tls(addr, &with_cert, "lamp-tls", None)
        .await
        .unwrap();
    assert!(
        refused(code),
        "a certificate not attached to the thing is refused: {code:?}"
    );

    s.fleet
        .certificates()
        .attach(&thing("other"), &id)
        .await
        .unwrap();
    let (_, code) = connect_tls(addr, &with_cert, "lamp-tls", None)
        .await
        .unwrap();
    assert!(
        refused(code),
        "attached to another thing only: refused ({code:?})"
    );
    let (tls, code) = connect_tls(addr, &with_cert, "other", None).await.unwrap();
    assert_eq!(code, v4::ConnectReturnCode::Success);
    assert_eq!(update_shadow(tls, "other").await.unwrap(), 1);

    // A connection without a certificate and without a password gets nowhere.
    let (_, code) = connect_tls(addr, &connector(&pki, false), "other", None)
        .await
        .unwrap();
    assert!(refused(code), "{code:?}");

    s.fleet
        .certificates()
        .set_status(&id, CertificateStatus::Inactive)
        .await
        .unwrap();
    let (_, code) = connect_tls(addr, &with_cert, "other", None).await.unwrap();
    assert!(
        refused(code),
        "an inactive certificate is refused: {code:?}"
    );
}

/// Reads until the server closes the connection (within [`common::WAIT`]).
async fn closed_by_server(mut tls: TlsStream) {
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(common::WAIT, async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server did not close the connection");
}

#[tokio::test]
async fn revoking_or_detaching_a_certificate_ends_its_live_connection() {
    let pki = pki();
    let s = tls_server(&pki, false).await;
    s.register("lamp-tls").await;
    let id = register_device_certificate(&s, &pki).await;
    let lamp = thing("lamp-tls");
    s.fleet.certificates().attach(&lamp, &id).await.unwrap();
    let addr = s.tls_addr.unwrap();
    let with_cert = connector(&pki, true);

    let (tls, code) = connect_tls(addr, &with_cert, "lamp-tls", None)
        .await
        .unwrap();
    assert_eq!(code, v4::ConnectReturnCode::Success);
    s.fleet.certificates().detach(&lamp, &id).await.unwrap();
    closed_by_server(tls).await;
    let (_, code) = connect_tls(addr, &with_cert, "lamp-tls", None)
        .await
        .unwrap();
    assert_eq!(code, v4::ConnectReturnCode::NotAuthorized);

    s.fleet.certificates().attach(&lamp, &id).await.unwrap();
    let (tls, code) = connect_tls(addr, &with_cert, "lamp-tls", None)
        .await
        .unwrap();
    assert_eq!(code, v4::ConnectReturnCode::Success);
    s.fleet
        .certificates()
        .set_status(&id, CertificateStatus::Revoked)
        .await
        .unwrap();
    closed_by_server(tls).await;
    let again = s
        .fleet
        .certificates()
        .set_status(&id, CertificateStatus::Active)
        .await;
    assert!(again.is_err(), "a revoked certificate stays revoked");
}

#[tokio::test]
async fn a_certificate_only_listener_takes_no_password_and_requires_a_certificate() {
    let pki = pki();
    let s = tls_server_with(&pki, false, TlsAuth::Certificate).await;
    s.register("lamp-tls").await;
    attach_device_certificate(&s, &pki, "lamp-tls").await;
    let addr = s.tls_addr.unwrap();
    let (_, code) = connect_tls(addr, &connector(&pki, true), "lamp-tls", Some("wrong"))
        .await
        .unwrap();
    assert_eq!(
        code,
        v4::ConnectReturnCode::Success,
        "the password is not read"
    );
    assert_handshake_refused(addr, &connector(&pki, false)).await;

    let s = tls_server_with(&pki, false, TlsAuth::Password).await;
    s.register("lamp-tls").await;
    attach_device_certificate(&s, &pki, "lamp-tls").await;
    let (_, code) = connect_tls(
        s.tls_addr.unwrap(),
        &connector(&pki, true),
        "lamp-tls",
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        code,
        v4::ConnectReturnCode::NotAuthorized,
        "password logins only"
    );
}

fn thing(name: &str) -> DeviceId {
    DeviceId::parse(name).unwrap()
}

#[tokio::test]
async fn devices_update_their_shadows_over_tls() {
    let pki = pki();
    let s = tls_server(&pki, false).await;
    let secret = s.register("lamp-tls").await;
    let version = update_over_tls(
        s.tls_addr.unwrap(),
        &connector(&pki, false),
        "lamp-tls",
        &secret,
    )
    .await
    .unwrap();
    assert_eq!(version, 1);
}

#[tokio::test]
async fn required_client_certificates_keep_out_devices_without_one() {
    let pki = pki();
    let s = tls_server(&pki, true).await;
    let secret = s.register("lamp-tls").await;
    let addr = s.tls_addr.unwrap();
    let version = update_over_tls(addr, &connector(&pki, true), "lamp-tls", &secret)
        .await
        .unwrap();
    assert_eq!(
        version, 1,
        "a device with a certificate from the CA gets in"
    );
    assert_handshake_refused(addr, &connector(&pki, false)).await;
}

/// A TLS connection through `connector` gets no MQTT session: without a certificate the
/// handshake fails, which TLS 1.3 reports on the first read.
async fn assert_handshake_refused(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) {
    let refused = tokio::time::timeout(common::WAIT, async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        tls.write_all(b"\x10\x00").await?;
        let mut buf = [0u8; 16];
        tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await
    })
    .await
    .unwrap();
    assert!(
        matches!(refused, Err(_) | Ok(0)),
        "no certificate, no connection: {refused:?}"
    );
}

#[test]
fn bad_pem_is_refused_with_a_clear_error() {
    let err = twin_gateway::tls::acceptor(b"not a certificate", b"", None, false)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "no PEM certificate found in the server certificate"
    );
    let pki = pki();
    let err = twin_gateway::tls::acceptor(pki.server_pem.as_bytes(), b"garbage", None, false)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("the server key is not valid PEM"),
        "{err}"
    );
}

/// A device certificate from `issuer` whose common name is `name`; the connector that
/// presents it.
fn device_named(pki: &Pki, issuer: &Issuer<'_, KeyPair>, name: &str) -> tokio_rustls::TlsConnector {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn a_ca_with_auto_registration_registers_its_certificates_at_their_first_connection() {
    let pki = pki();
    let s = tls_server(&pki, false).await;
    s.register("auto-1").await;
    s.register("auto-2").await;
    let addr = s.tls_addr.unwrap();
    let device = device_named(&pki, &pki.issuer, "auto-1");
    let refused = v4::ConnectReturnCode::NotAuthorized;

    let (_, code) = connect_tls(addr, &device, "auto-1", None).await.unwrap();
    assert_eq!(code, refused, "an unregistered CA registers nothing");
    let ca = s
        .fleet
        .certificates()
        .register_ca(&pki.ca_pem, false)
        .await
        .unwrap();
    let (_, code) = connect_tls(addr, &device, "auto-1", None).await.unwrap();
    assert_eq!(
        code, refused,
        "a CA without auto-registration registers nothing"
    );
    assert!(
        s.fleet
            .certificates()
            .register_ca(&pki.device_pem, true)
            .await
            .is_err(),
        "a device certificate is not a CA"
    );

    s.fleet
        .certificates()
        .update_ca(&ca.id, None, Some(true))
        .await
        .unwrap();
    let (_, code) = connect_tls(addr, &device, "auto-2", None).await.unwrap();
    assert_eq!(code, refused, "its common name is another thing's");
    let (tls, code) = connect_tls(addr, &device, "auto-1", None).await.unwrap();
    assert_eq!(code, v4::ConnectReturnCode::Success);
    assert_eq!(update_shadow(tls, "auto-1").await.unwrap(), 1);
    let thing = s.fleet.queries().thing(&thing("auto-1")).unwrap();
    assert_eq!(
        thing.record.certificates.len(),
        1,
        "registered and attached"
    );
    let (_, code) = connect_tls(addr, &device, "auto-1", None).await.unwrap();
    assert_eq!(
        code,
        v4::ConnectReturnCode::Success,
        "and known from then on"
    );

    // A look-alike CA (same name, another key) registers nothing.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let forger = Issuer::new(params, key);
    let forged = device_named(&pki, &forger, "auto-2");
    let (_, code) = connect_tls(addr, &forged, "auto-2", None).await.unwrap();
    assert_eq!(code, refused, "signed by another key");
}

#[tokio::test]
async fn a_claim_certificate_may_only_use_fleet_provisioning() {
    let pki = pki();
    let s = tls_server(&pki, false).await;
    s.register("lamp-tls").await;
    s.fleet
        .provisioning()
        .put_template(twin_model::provisioning::ProvisioningTemplate {
            name: "lamps".into(),
            thing_name: "lamp-{{SerialNumber}}".into(),
            attributes: Default::default(),
            pre_provisioning_check: None,
            device_configuration: Default::default(),
            enabled: true,
        })
        .await
        .unwrap();
    let claim = s
        .fleet
        .certificates()
        .register_as(
            &pki.device_pem,
            CertificateStatus::Active,
            Some("lamps".into()),
        )
        .await
        .unwrap();
    let addr = s.tls_addr.unwrap();
    let with_claim = connector(&pki, true);

    let (mut tls, code) = connect_tls(addr, &with_claim, "claim-1", None)
        .await
        .unwrap();
    assert_eq!(
        code,
        v4::ConnectReturnCode::Success,
        "a claim certificate logs in as no thing"
    );
    let mut out = BytesMut::new();
    let mut sub = v4::Subscribe::new(
        format!("{}/update/accepted", shadow("lamp-tls")),
        QoS::AtLeastOnce,
    );
    sub.pkid = 1;
    sub.add(
        "$aws/provisioning-templates/lamps/provision/json/rejected".into(),
        QoS::AtLeastOnce,
    );
    sub.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let mut inbuf = BytesMut::new();
    let v4::Packet::SubAck(ack) = next_v4(&mut tls, &mut inbuf).await else {
        panic!("SUBACK expected")
    };
    assert_eq!(
        ack.return_codes,
        [
            v4::SubscribeReasonCode::Failure,
            v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ],
        "its answers only"
    );
    // A bad request is answered on `rejected`, in AWS's format.
    let mut out = BytesMut::new();
    let mut p = v4::Publish::new(
        "$aws/provisioning-templates/lamps/provision/json",
        QoS::AtLeastOnce,
        "{}",
    );
    p.pkid = 2;
    p.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let rejected = loop {
        if let v4::Packet::Publish(p) = next_v4(&mut tls, &mut inbuf).await {
            break serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap();
        }
    };
    assert_eq!(rejected["statusCode"], 400);
    assert_eq!(rejected["errorCode"], "InvalidPayload");
    // A shadow update ends a 3.1.1 connection, as any publish outside its topics.
    let mut out = BytesMut::new();
    let mut p = v4::Publish::new(
        format!("{}/update", shadow("lamp-tls")),
        QoS::AtLeastOnce,
        "{}",
    );
    p.pkid = 3;
    p.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    closed_by_server(tls).await;
    let unchanged = s.fleet.queries().thing(&thing("lamp-tls")).unwrap();
    assert!(unchanged.shadows().next().is_none(), "no shadow was made");

    // Whatever the client id, a claim certificate logs in as no thing.
    let (_, code) = connect_tls(addr, &with_claim, "lamp-tls", None)
        .await
        .unwrap();
    assert_eq!(
        code,
        v4::ConnectReturnCode::Success,
        "a claim login, whatever the client id"
    );
    let (tls, _) = connect_tls(addr, &with_claim, "claim-2", None)
        .await
        .unwrap();
    s.fleet
        .certificates()
        .set_status(&claim.id, CertificateStatus::Revoked)
        .await
        .unwrap();
    closed_by_server(tls).await;
    let (_, code) = connect_tls(addr, &with_claim, "claim-3", None)
        .await
        .unwrap();
    assert_eq!(
        code,
        v4::ConnectReturnCode::NotAuthorized,
        "a revoked claim certificate"
    );
}
