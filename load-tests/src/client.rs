//! A minimal MQTT client for load generation, on rumqttc's packet codecs.
//!
//! One connection is one task's `Conn`: no background tasks, no channels, so a hundred
//! thousand of them stay cheap. Each connection can bind its own source address
//! (127.0.0.x), which is how a single host goes past one address's ephemeral ports.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    /// MQTT 3.1.1
    V4,
    /// MQTT 5
    V5,
}

/// What a connection received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Publish {
        topic: String,
        payload: Bytes,
    },
    /// A PUBACK: its packet id, and whether it took the message (MQTT 5: reason code 0,
    /// Success; always on MQTT 3.1.1).
    PubAck(u16, bool),
    SubAck(Vec<u8>),
    PingResp,
    Other,
}

const MAX_PACKET: usize = 1024 * 1024;

pub struct Conn {
    stream: TcpStream,
    protocol: Protocol,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_pkid: u16,
}

impl Conn {
    /// Opens a TCP connection (from `bind`, if given) and completes CONNECT/CONNACK.
    pub async fn connect(
        server: SocketAddr,
        bind: Option<IpAddr>,
        protocol: Protocol,
        client_id: &str,
        password: Option<&str>,
        keep_alive: Duration,
    ) -> anyhow::Result<Self> {
        let socket = if server.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = bind {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding to {ip}"))?;
        }
        let stream = socket
            .connect(server)
            .await
            .with_context(|| format!("connecting to {server}"))?;
        stream.set_nodelay(true)?;
        let mut conn = Self {
            stream,
            protocol,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(256),
            next_pkid: 0,
        };
        let keep_alive = u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX);
        match protocol {
            Protocol::V4 => {
                let mut c = v4::Connect::new(client_id);
                c.keep_alive = keep_alive;
                if let Some(p) = password {
                    c.set_login(client_id, p);
                }
                c.write(&mut conn.wbuf)?;
            }
            Protocol::V5 => {
                let c = v5::Connect {
                    keep_alive,
                    client_id: client_id.into(),
                    clean_start: true,
                    properties: None,
                };
                let login = password.map(|p| v5::Login::new(client_id, p));
                c.write(&None, &login, &mut conn.wbuf)?;
            }
        }
        conn.flush().await?;
        let code = loop {
            conn.fill().await?;
            match conn.protocol {
                Protocol::V4 => match v4::Packet::read(&mut conn.rbuf, MAX_PACKET) {
                    Ok(v4::Packet::ConnAck(a)) => break a.code as u8,
                    Ok(p) => bail!("expected CONNACK, got {p:?}"),
                    Err(m4::Error::InsufficientBytes(_)) => continue,
                    Err(e) => bail!("bad CONNACK: {e}"),
                },
                Protocol::V5 => match v5::Packet::read(&mut conn.rbuf, None) {
                    Ok(v5::Packet::ConnAck(a)) => {
                        break if a.code == v5::ConnectReturnCode::Success {
                            0
                        } else {
                            0x80
                        };
                    }
                    Ok(p) => bail!("expected CONNACK, got {p:?}"),
                    Err(m5::Error::InsufficientBytes(_)) => continue,
                    Err(e) => bail!("bad CONNACK: {e}"),
                },
            }
        };
        if code != 0 {
            bail!("connection refused by the server (CONNACK code {code:#x})");
        }
        Ok(conn)
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("connection closed by the server");
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    /// Subscribes with QoS 1 and waits for the SUBACK (answering anything that comes first).
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let pkid = self.pkid();
        match self.protocol {
            Protocol::V4 => {
                let mut s = v4::Subscribe::new(filter, m4::QoS::AtLeastOnce);
                s.pkid = pkid;
                s.write(&mut self.wbuf)?;
            }
            Protocol::V5 => {
                let mut s = v5::Subscribe::new(v5::Filter::new(filter, m5::QoS::AtLeastOnce), None);
                s.pkid = pkid;
                s.write(&mut self.wbuf)?;
            }
        }
        self.flush().await?;
        loop {
            if let Incoming::SubAck(codes) = self.next().await? {
                return match codes.first() {
                    Some(0..=2) => Ok(()),
                    other => Err(anyhow!("subscription to {filter} refused ({other:?})")),
                };
            }
        }
    }

    /// Publishes with QoS 1 (without waiting for the PUBACK).
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        let pkid = self.pkid();
        match self.protocol {
            Protocol::V4 => {
                let mut p = v4::Publish::new(topic, m4::QoS::AtLeastOnce, payload);
                p.pkid = pkid;
                p.write(&mut self.wbuf)?;
            }
            Protocol::V5 => {
                let mut p = v5::Publish::new(topic, m5::QoS::AtLeastOnce, payload.to_vec(), None);
                p.pkid = pkid;
                p.write(&mut self.wbuf)?;
            }
        }
        self.flush().await
    }

    pub async fn ping(&mut self) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::V4 => v4::PingReq.write(&mut self.wbuf)?,
            Protocol::V5 => v5::PingReq::write(&mut self.wbuf)?,
        };
        self.flush().await
    }

    /// The next packet from the server; QoS 1 publishes are acknowledged here.
    pub async fn next(&mut self) -> anyhow::Result<Incoming> {
        loop {
            let parsed = match self.protocol {
                Protocol::V4 => match v4::Packet::read(&mut self.rbuf, MAX_PACKET) {
                    Ok(v4::Packet::Publish(p)) => {
                        if p.qos != m4::QoS::AtMostOnce {
                            v4::PubAck::new(p.pkid).write(&mut self.wbuf)?;
                        }
                        Some(Incoming::Publish {
                            topic: p.topic,
                            payload: p.payload,
                        })
                    }
                    Ok(v4::Packet::PubAck(a)) => Some(Incoming::PubAck(a.pkid, true)),
                    Ok(v4::Packet::SubAck(s)) => Some(Incoming::SubAck(
                        s.return_codes
                            .iter()
                            .map(|c| match c {
                                v4::SubscribeReasonCode::Success(q) => *q as u8,
                                v4::SubscribeReasonCode::Failure => 0x80,
                            })
                            .collect(),
                    )),
                    Ok(v4::Packet::PingResp) => Some(Incoming::PingResp),
                    Ok(v4::Packet::Disconnect) => bail!("disconnected by the server"),
                    Ok(_) => Some(Incoming::Other),
                    Err(m4::Error::InsufficientBytes(_)) => None,
                    Err(e) => bail!("bad packet from the server: {e}"),
                },
                Protocol::V5 => match v5::Packet::read(&mut self.rbuf, None) {
                    Ok(v5::Packet::Publish(p)) => {
                        if p.qos != m5::QoS::AtMostOnce {
                            v5::PubAck::new(p.pkid, None).write(&mut self.wbuf)?;
                        }
                        Some(Incoming::Publish {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                        })
                    }
                    Ok(v5::Packet::PubAck(a)) => Some(Incoming::PubAck(
                        a.pkid,
                        a.reason == v5::PubAckReason::Success,
                    )),
                    Ok(v5::Packet::SubAck(s)) => Some(Incoming::SubAck(
                        s.return_codes
                            .iter()
                            .map(|c| match c {
                                v5::SubscribeReasonCode::Success(q) => *q as u8,
                                _ => 0x80,
                            })
                            .collect(),
                    )),
                    Ok(v5::Packet::PingResp(_)) => Some(Incoming::PingResp),
                    Ok(v5::Packet::Disconnect(d)) => {
                        bail!("disconnected by the server ({:?})", d.reason_code)
                    }
                    Ok(_) => Some(Incoming::Other),
                    Err(m5::Error::InsufficientBytes(_)) => None,
                    Err(e) => bail!("bad packet from the server: {e}"),
                },
            };
            if !self.wbuf.is_empty() {
                self.flush().await?;
            }
            match parsed {
                Some(p) => return Ok(p),
                None => self.fill().await?,
            }
        }
    }

    /// Waits for the next publish on a topic for which `wanted` says yes.
    pub async fn publish_where(
        &mut self,
        wanted: impl Fn(&str) -> bool,
    ) -> anyhow::Result<(String, Bytes)> {
        loop {
            if let Incoming::Publish { topic, payload } = self.next().await?
                && wanted(&topic)
            {
                return Ok((topic, payload));
            }
        }
    }
}

/// The source address of the `i`-th connection, spread over `count` loopback addresses
/// (127.0.0.1, 127.0.0.2, ...). `None` when `count` is 0 (let the OS choose).
pub fn source_addr(i: usize, count: usize) -> Option<IpAddr> {
    (count > 0).then(|| IpAddr::from([127, 0, 0, 1 + (i % count.min(254)) as u8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_spread_over_loopback_addresses() {
        assert_eq!(source_addr(0, 0), None);
        assert_eq!(source_addr(0, 4), Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(source_addr(5, 4), Some(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(source_addr(253, 1000), Some(IpAddr::from([127, 0, 0, 254])));
    }
}
