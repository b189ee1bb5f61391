//! A throwaway PKI for the security tests, written to a directory: a CA, a server
//! certificate for 127.0.0.1/localhost, client certificates (one valid, one from another
//! CA, one expired) and their keys, all PEM.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, date_time_ymd,
};

/// Paths of one certificate and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything the security tests need.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: PathBuf,
    pub server: CertFiles,
    /// Signed by the CA, identity `agent-good`.
    pub client: CertFiles,
    /// Signed by another CA.
    pub foreign_client: CertFiles,
    /// Signed by the CA, expired in 2001.
    pub expired_client: CertFiles,
}

fn ca(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn leaf(
    dir: &Path,
    name: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    purpose: ExtendedKeyUsagePurpose,
    expired: bool,
) -> anyhow::Result<CertFiles> {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![purpose];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if expired {
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    Ok(files)
}

impl Pki {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let authority = ca("stallscope test CA")?;
        let other = ca("some other CA")?;
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, authority.pem())?;
        Ok(Self {
            ca: ca_path,
            server: leaf(
                dir,
                "collector",
                &authority,
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
                false,
            )?,
            client: leaf(
                dir,
                "agent-good",
                &authority,
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
                false,
            )?,
            foreign_client: leaf(
                dir,
                "agent-foreign",
                &other,
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
                false,
            )?,
            expired_client: leaf(
                dir,
                "agent-expired",
                &authority,
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
                true,
            )?,
        })
    }
}
