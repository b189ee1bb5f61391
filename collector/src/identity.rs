//! Who is calling: an agent's identity (from its client certificate under mTLS, or from
//! the `x-stallscope-agent` header where plaintext was explicitly allowed) and the bearer
//! tokens that authorize queries.

use std::collections::HashSet;

use tonic::{Request, Status, metadata::MetadataMap};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

/// Header carrying the agent identity on explicitly allowed plaintext connections.
pub const AGENT_HEADER: &str = "x-stallscope-agent";

/// Longest accepted agent identity.
const MAX_IDENTITY_LEN: usize = 253;

/// How agents are identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// The client certificate's common name, or its first DNS name.
    Certificate,
    /// The `x-stallscope-agent` header (plaintext only).
    Header,
}

/// The identity in a DER client certificate: its subject common name, else its first DNS
/// subject alternative name.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| valid_identity(cn))
    {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) if valid_identity(dns) => Some((*dns).to_owned()),
        _ => None,
    })
}

/// Identities are host-name-like: letters, digits, `.`, `-`, `_`, `:`, `@`.
pub fn valid_identity(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_IDENTITY_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '@'))
}

/// The calling agent's identity, or the status that refuses the call.
pub fn agent_identity<T>(request: &Request<T>, source: IdentitySource) -> Result<String, Status> {
    match source {
        IdentitySource::Certificate => {
            let certs = request.peer_certs().ok_or_else(|| {
                Status::unauthenticated(
                    "ingest needs a client certificate signed by the collector's client CA (mTLS); none was presented",
                )
            })?;
            let first = certs.first().ok_or_else(|| {
                Status::unauthenticated("ingest needs a client certificate; the chain was empty")
            })?;
            certificate_identity(first.as_ref()).ok_or_else(|| {
                Status::permission_denied(
                    "the client certificate names no usable agent identity (subject CN or DNS name)",
                )
            })
        }
        IdentitySource::Header => {
            let id = request
                .metadata()
                .get(AGENT_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if valid_identity(id) {
                Ok(id.to_owned())
            } else {
                Err(Status::unauthenticated(format!(
                    "plaintext ingest needs an `{AGENT_HEADER}` header with the agent identity (letters, digits, . - _ : @)"
                )))
            }
        }
    }
}

/// The bearer tokens allowed to query. An empty set means queries need no token, which
/// only an explicit flag allows.
#[derive(Debug, Clone, Default)]
pub struct QueryTokens {
    tokens: HashSet<Vec<u8>>,
    required: bool,
}

impl QueryTokens {
    pub fn new(tokens: impl IntoIterator<Item = String>) -> Self {
        Self {
            tokens: tokens
                .into_iter()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .map(String::into_bytes)
                .collect(),
            required: true,
        }
    }

    /// No token needed (only with `--insecure-no-query-auth`).
    pub fn disabled() -> Self {
        Self {
            tokens: HashSet::new(),
            required: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether callers need a token (false only with `--insecure-no-query-auth`).
    pub fn required(&self) -> bool {
        self.required
    }

    /// Checks the `authorization: Bearer <token>` header.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok());
        self.check_bearer(header).map_err(|reason| match reason {
            TokenRefusal::Missing => Status::unauthenticated(
                "queries need a bearer token: pass --token, set STALLSCOPE_TOKEN, or put `token` in the CLI config",
            ),
            other => Status::unauthenticated(other.to_string()),
        })
    }

    /// Checks an `authorization` header's value (`Bearer <token>`), whatever the
    /// transport (gRPC metadata, an HTTP header).
    pub fn check_bearer(&self, header: Option<&str>) -> Result<(), TokenRefusal> {
        if !self.required {
            return Ok(());
        }
        let header = header.ok_or(TokenRefusal::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(TokenRefusal::NotBearer)?
            .trim()
            .as_bytes();
        // Compare against every token in full, so timing says nothing about which
        // prefix matched.
        let mut matched = false;
        for known in &self.tokens {
            matched |= constant_time_eq(known, token);
        }
        if matched {
            Ok(())
        } else {
            Err(TokenRefusal::Invalid)
        }
    }
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("a bearer token is required (`authorization: Bearer <token>`)")]
    Missing,
    #[error("the authorization header must be `Bearer <token>`")]
    NotBearer,
    #[error("the bearer token is not valid for this collector")]
    Invalid,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    #[test]
    fn identities_are_checked() {
        assert!(valid_identity("web-1.prod:agent"));
        assert!(!valid_identity(""));
        assert!(!valid_identity("a b"));
        assert!(!valid_identity("x/../y"));
    }

    #[test]
    fn tokens_are_required_and_compared() {
        let tokens = QueryTokens::new(["s3cret".to_owned()]);
        let mut metadata = MetadataMap::new();
        assert_eq!(
            tokens.check(&metadata).map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
        metadata.insert("authorization", MetadataValue::from_static("Bearer wrong!"));
        assert!(tokens.check(&metadata).is_err());
        metadata.insert("authorization", MetadataValue::from_static("Bearer s3cret"));
        assert!(tokens.check(&metadata).is_ok());
        assert!(QueryTokens::disabled().check(&MetadataMap::new()).is_ok());
    }
}
