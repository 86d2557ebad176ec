//! Whether a registry speaks TLS: a TLS handshake with it, its certificate not checked.
//! A registry marked insecure (or reached with `--tls-verify=false`) is then spoken to
//! over HTTPS without verification, or over plain HTTP when it has no TLS, as
//! containers/image does for podman. Nothing is sent after the handshake.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// How long the handshake may take before the registry counts as plain HTTP.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `registry` (`host[:port]`, port 443 when none) completes a TLS handshake.
/// Answers are kept for the life of the process.
pub fn speaks_tls(registry: &str) -> bool {
    static SEEN: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(&known) = seen.lock().unwrap_or_else(|p| p.into_inner()).get(registry) {
        return known;
    }
    let answer = handshake(registry).is_ok();
    tracing::debug!(registry, tls = answer, "TLS probe of an insecure registry");
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(registry.to_string(), answer);
    answer
}

fn handshake(registry: &str) -> Result<(), String> {
    let (host, port) = split(registry);
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut sock = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `host[:port]` (a bracketed IPv6 address too) and the port, 443 when none is given.
fn split(registry: &str) -> (&str, u16) {
    if let Some(rest) = registry.strip_prefix('[') {
        if let Some((h, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (h, port.unwrap_or(443));
        }
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, port),
            Err(_) => (registry, 443),
        },
        _ => (registry, 443),
    }
}

/// Accepts any certificate: the probe only asks whether TLS is spoken.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(split("127.0.0.1:5000"), ("127.0.0.1", 5000));
        assert_eq!(split("registry.example"), ("registry.example", 443));
        assert_eq!(split("[::1]:5000"), ("::1", 5000));
        assert_eq!(split("[::1]"), ("::1", 443));
    }

    #[test]
    fn a_plain_listener_is_not_tls() {
        // A server that answers like plain HTTP: not TLS.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let _ = std::io::Write::write_all(
                    &mut s,
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
                );
            }
        });
        assert!(!speaks_tls(&format!("127.0.0.1:{port}")));
        // Nothing listening: not TLS either (the HTTP attempt then says why).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(!speaks_tls(&format!("127.0.0.1:{port}")));
    }
}
