//! MQTT over TLS, with and without required client certificates, against certificates
//! made for the test (a CA, a server certificate for localhost, a device certificate).

mod common;

use std::sync::Arc;

use bytes::BytesMut;
use common::{next_v4, server_tls, shadow};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rumqttc::mqttbytes::{QoS, v4};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt;
use twin_actors::FleetConfig;
use twin_gateway::GatewayConfig;

struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_pem: String,
    server_key_pem: String,
    device_der: CertificateDer<'static>,
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
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        server_pem: server.pem(),
        server_key_pem: server_key.serialize_pem(),
        device_der: device.der().clone(),
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

/// Connects over TLS as `thing`, updates its shadow and returns the accepted version.
async fn update_over_tls(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    thing: &str,
    secret: &str,
) -> std::io::Result<u64> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut out = BytesMut::new();
    let mut connect = v4::Connect::new(thing);
    connect.set_login(thing, secret);
    connect.write(&mut out).unwrap();
    let mut sub = v4::Subscribe::new(
        format!("{}/update/accepted", shadow(thing)),
        QoS::AtLeastOnce,
    );
    sub.pkid = 1;
    sub.write(&mut out).unwrap();
    tls.write_all(&out).await?;
    let mut inbuf = BytesMut::new();
    assert!(
        matches!(next_v4(&mut tls, &mut inbuf).await, v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success)
    );
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
    let ca = require_client_certs.then_some(pki.ca_pem.as_bytes());
    let acceptor =
        twin_gateway::tls::acceptor(pki.server_pem.as_bytes(), pki.server_key_pem.as_bytes(), ca)
            .unwrap();
    server_tls(
        FleetConfig::default(),
        GatewayConfig::default(),
        Some(acceptor),
    )
    .await
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
    // Without a certificate the handshake fails: TLS 1.3 reports it on the first read.
    let refused = tokio::time::timeout(common::WAIT, async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = connector(&pki, false)
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
    let err = twin_gateway::tls::acceptor(b"not a certificate", b"", None)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "no PEM certificate found in the server certificate"
    );
    let pki = pki();
    let err = twin_gateway::tls::acceptor(pki.server_pem.as_bytes(), b"garbage", None)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("the server key is not valid PEM"),
        "{err}"
    );
}
