//! How a device logs in on its listener: a password, or the client certificate it
//! presented over TLS, as `mqtt_tls_auth` allows ([`TlsAuth`]).

use twin_model::certificate::CertificateId;

use crate::TlsAuth;

/// What the transport tells of a device before its CONNECT.
pub(crate) enum Transport {
    Plain,
    /// TLS, with the client certificate the device presented (its id and DER).
    Tls {
        certificate: Option<(CertificateId, Vec<u8>)>,
    },
}

/// How a device logs in, as its listener allows.
pub(crate) enum Method {
    Password(Option<String>),
    Certificate(CertificateId, Vec<u8>),
}

impl Transport {
    /// The login method for a CONNECT with `password` (`Err`: why none is allowed).
    pub(crate) fn method(
        self,
        allowed: TlsAuth,
        password: Option<String>,
    ) -> Result<Method, &'static str> {
        match (self, allowed) {
            (Self::Plain, _) | (Self::Tls { .. }, TlsAuth::Password) => {
                Ok(Method::Password(password))
            }
            (
                Self::Tls {
                    certificate: Some((id, der)),
                },
                TlsAuth::Certificate,
            ) => Ok(Method::Certificate(id, der)),
            (Self::Tls { certificate: None }, TlsAuth::Certificate) => Err(
                "this listener takes only certificate logins (mqtt_tls_auth = certificate) and no client certificate was presented",
            ),
            (
                Self::Tls {
                    certificate: Some((id, der)),
                },
                TlsAuth::Any,
            ) if password.is_none() => Ok(Method::Certificate(id, der)),
            (Self::Tls { .. }, TlsAuth::Any) => Ok(Method::Password(password)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(with_certificate: bool) -> Transport {
        Transport::Tls {
            certificate: with_certificate
                .then(|| (CertificateId::from_digest(&[1; 32]), vec![1, 2, 3])),
        }
    }

    fn uses_certificate(m: Result<Method, &str>) -> bool {
        matches!(m, Ok(Method::Certificate(..)))
    }

    #[test]
    fn a_listener_takes_the_methods_its_setting_allows() {
        let pw = || Some("secret".to_owned());
        // any: the password when given, else the certificate.
        assert!(!uses_certificate(tls(true).method(TlsAuth::Any, pw())));
        assert!(uses_certificate(tls(true).method(TlsAuth::Any, None)));
        assert!(!uses_certificate(tls(false).method(TlsAuth::Any, None)));
        // certificate: never the password, and a certificate is needed.
        assert!(uses_certificate(
            tls(true).method(TlsAuth::Certificate, pw())
        ));
        assert!(tls(false).method(TlsAuth::Certificate, pw()).is_err());
        // password, and the plain listener: never the certificate.
        assert!(!uses_certificate(tls(true).method(TlsAuth::Password, None)));
        assert!(!uses_certificate(
            Transport::Plain.method(TlsAuth::Certificate, None)
        ));
    }
}
