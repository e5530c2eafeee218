//! TLS for the client API (rustls with the ring provider): HTTP/1.1 and HTTP/2 by ALPN (R1).

use std::io::BufReader;
use std::sync::Arc;

use crate::config::Tls;

pub fn server_config(tls: &Tls) -> Result<rustls::ServerConfig, String> {
    let cert_file = std::fs::File::open(&tls.cert)
        .map_err(|e| format!("server.tls.cert: cannot read {}: {e}", tls.cert.display()))?;
    let key_file = std::fs::File::open(&tls.key)
        .map_err(|e| format!("server.tls.key: cannot read {}: {e}", tls.key.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(cert_file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server.tls.cert: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert: no certificate in {}",
            tls.cert.display()
        ));
    }
    let key = rustls_pemfile::private_key(&mut BufReader::new(key_file))
        .map_err(|e| format!("server.tls.key: {e}"))?
        .ok_or_else(|| format!("server.tls.key: no private key in {}", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("server.tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
