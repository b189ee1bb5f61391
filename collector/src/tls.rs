//! TLS material the collector's listeners share (gRPC, the HTTP receiver, the web UI),
//! read once at start-up by `config`.

/// TLS material, read at start-up.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Vec<u8>,
}
