//! The mesh CA and host certificates (rcgen): `meshd ca init` and `meshd cert issue`, and the in-memory CA of
//! `meshd dev`.
//!
//! A mesh CA is a self-signed root (ECDSA P-256) whose one URI SAN, `spiffe://<trust_domain>`, records the trust
//! domain; it may sign host certificates only (path length 0). A host certificate carries its node's SPIFFE ID
//! as its only URI SAN, is valid for both TLS server and client authentication, and is `CA:FALSE`.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::{Duration, OffsetDateTime};

use super::identity::{NodeId, TrustDomain, uri_sans};

/// File names inside a CA directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// Default lifetimes.
pub const CA_DAYS: u32 = 3650;
pub const HOST_DAYS: u32 = 365;
/// Certificates start an hour in the past, so hosts whose clocks lag a little accept them at once.
const BACKDATE: Duration = Duration::hours(1);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Bad arguments or input files (exit 64).
    #[error("{0}")]
    Input(String),
    /// An output file exists, or cannot be written (exit 73).
    #[error("{0}")]
    Output(String),
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

/// Makes a new mesh CA for `td`, valid for `days`.
pub fn new_ca(td: &TrustDomain, days: u32) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(|e| PkiError::Input(format!("generating a key: {e}")))?;
    let params = ca_params(td, days)?;
    let not_after = params.not_after;
    let cert = params
        .self_signed(&key)
        .map_err(|e| PkiError::Input(format!("signing the CA certificate: {e}")))?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

fn ca_params(td: &TrustDomain, days: u32) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshd");
    dn.push(DnType::CommonName, format!("meshd CA {td}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![uri_san(&td.uri())?];
    (params.not_before, params.not_after) = validity(days)?;
    Ok(params)
}

fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    uri.to_string()
        .try_into()
        .map(SanType::URI)
        .map_err(|e| PkiError::Input(format!("{uri:?}: {e}")))
}

fn validity(days: u32) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    if days == 0 {
        return Err(PkiError::Input("--days must be at least 1".into()));
    }
    let now = OffsetDateTime::now_utc();
    let end = now
        .checked_add(Duration::days(i64::from(days)))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| PkiError::Input(format!("--days {days}: too far in the future")))?;
    Ok((now - BACKDATE, end))
}

/// A CA loaded from its directory, ready to sign.
pub struct LoadedCa {
    pub trust_domain: TrustDomain,
    pub cert_pem: String,
    /// A host certificate never outlives its CA.
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl LoadedCa {
    /// Reads `dir/ca.crt` and `dir/ca.key`, and checks they belong together and make a mesh CA.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path)
                .map_err(|e| PkiError::Input(format!("{}: {e}", path.display())))
        };
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        Self::from_pem(
            read(CA_CERT)?,
            &read(CA_KEY)?,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    /// An in-memory CA (for `meshd dev` and tests).
    pub fn generate(td: &TrustDomain, days: u32) -> Result<Self, PkiError> {
        let ca = new_ca(td, days)?;
        Self::from_pem(
            ca.cert_pem,
            &ca.key_pem,
            "the new CA certificate",
            "its key",
        )
    }

    /// `cert_name` and `key_name` say where the PEM came from, in errors.
    fn from_pem(
        cert_pem: String,
        key_pem: &str,
        cert_name: &str,
        key_name: &str,
    ) -> Result<Self, PkiError> {
        let der: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
                PkiError::Input(format!("{cert_name}: not a PEM certificate ({e})"))
            })?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::Input(format!("{cert_name}: not an X.509 certificate ({e})")))?;
        if !x509.is_ca() {
            return Err(PkiError::Input(format!(
                "{cert_name}: not a CA certificate (basicConstraints CA:TRUE is missing)"
            )));
        }
        let trust_domain = match uri_sans(&x509).as_slice() {
            [one] => one
                .strip_prefix("spiffe://")
                .filter(|d| !d.contains('/'))
                .and_then(|d| TrustDomain::parse(d).ok()),
            _ => None,
        }
        .ok_or_else(|| {
            PkiError::Input(format!(
                "{cert_name}: not a meshd CA (its one URI SAN must be spiffe://<trust domain>; make one with `meshd ca init`)"
            ))
        })?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::Input(format!("{key_name}: not a usable private key ({e})")))?;
        if key.subject_public_key_info() != x509.tbs_certificate.subject_pki.raw {
            return Err(PkiError::Input(format!(
                "{key_name} does not match {cert_name} (the key of another CA?)"
            )));
        }
        let not_after = x509.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(PkiError::Input(format!(
                "{cert_name}: the CA expired on {}",
                day(not_after)
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| PkiError::Input(format!("{cert_name}: {e}")))?;
        Ok(LoadedCa {
            trust_domain,
            cert_pem,
            not_after,
            issuer,
        })
    }

    /// Issues a host certificate for `node`, with extra IP and DNS SANs.
    pub fn issue(
        &self,
        node: &str,
        days: u32,
        ips: &[IpAddr],
        dns: &[String],
    ) -> Result<Issued, PkiError> {
        let id = NodeId::new(self.trust_domain.clone(), node).map_err(PkiError::Input)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshd");
        dn.push(DnType::CommonName, node);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut sans = vec![uri_san(&id.uri())?];
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        for name in dns {
            let ia5 = name
                .clone()
                .try_into()
                .map_err(|e| PkiError::Input(format!("--dns {name:?}: {e}")))?;
            sans.push(SanType::DnsName(ia5));
        }
        params.subject_alt_names = sans;
        (params.not_before, params.not_after) = validity(days)?;
        params.not_after = params.not_after.min(self.not_after);
        let key =
            KeyPair::generate().map_err(|e| PkiError::Input(format!("generating a key: {e}")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| PkiError::Input(format!("signing the certificate: {e}")))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: params.not_after,
        })
    }
}

/// A file to write: its path, contents, and whether it is a private key (mode 0600).
pub struct OutFile<'a> {
    pub path: PathBuf,
    pub contents: &'a str,
    pub secret: bool,
}

/// Writes `files`, all or none: without `force`, an existing file stops everything before anything is
/// written. Each file is written to a temporary name beside it, then renamed into place.
pub fn write_all(files: &[OutFile<'_>], force: bool) -> Result<(), PkiError> {
    if !force {
        let existing: Vec<String> = files
            .iter()
            .filter(|f| f.path.exists())
            .map(|f| f.path.display().to_string())
            .collect();
        if !existing.is_empty() {
            let verb = if existing.len() == 1 {
                "exists"
            } else {
                "exist"
            };
            return Err(PkiError::Output(format!(
                "{} already {verb}; pass --force to replace",
                existing.join(" and ")
            )));
        }
    }
    // Every file goes to a temporary name of its own first; only when all are written are they renamed into
    // place, so a failure leaves the old files as they were.
    let tag = format!("{}.{:016x}", std::process::id(), fastrand::u64(..));
    let mut staged: Vec<(PathBuf, &Path)> = Vec::new();
    let cleanup = |staged: &[(PathBuf, &Path)]| {
        for (tmp, _) in staged {
            let _ = fs::remove_file(tmp);
        }
    };
    for f in files {
        if let Some(dir) = f.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = fs::create_dir_all(dir)
        {
            cleanup(&staged);
            return Err(PkiError::Output(format!("{}: {e}", dir.display())));
        }
        let mut name = f.path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{tag}.tmp"));
        let tmp = f.path.with_file_name(name);
        let written = (|| {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if f.secret { 0o600 } else { 0o644 })
                .open(&tmp)?;
            out.write_all(f.contents.as_bytes())?;
            out.sync_all()
        })();
        staged.push((tmp, &f.path));
        if let Err(e) = written {
            cleanup(&staged);
            return Err(PkiError::Output(format!("{}: {e}", f.path.display())));
        }
    }
    for (i, (tmp, path)) in staged.iter().enumerate() {
        if let Err(e) = fs::rename(tmp, path) {
            cleanup(&staged[i..]);
            return Err(PkiError::Output(format!("{}: {e}", path.display())));
        }
    }
    Ok(())
}

/// `meshd ca init`: writes `out/ca.crt` and `out/ca.key`; returns what to print.
pub fn ca_init(trust_domain: &str, out: &Path, days: u32, force: bool) -> Result<String, PkiError> {
    let td = TrustDomain::parse(trust_domain).map_err(PkiError::Input)?;
    let ca = new_ca(&td, days)?;
    let (cert, key) = (out.join(CA_CERT), out.join(CA_KEY));
    write_all(
        &[
            OutFile {
                path: cert.clone(),
                contents: &ca.cert_pem,
                secret: false,
            },
            OutFile {
                path: key.clone(),
                contents: &ca.key_pem,
                secret: true,
            },
        ],
        force,
    )?;
    Ok(format!(
        "wrote {} (mesh CA certificate for trust domain {td}, valid until {}): put it on every host, as [tls] ca\n\
         wrote {} (the CA's private key, mode 0600): keep it off the hosts; it signs host certificates\n",
        cert.display(),
        day(ca.not_after),
        key.display(),
    ))
}

/// `meshd cert issue`: writes `out/<node>.crt` and `out/<node>.key`; returns what to print.
pub fn cert_issue(
    ca_dir: &Path,
    node: &str,
    out: &Path,
    days: u32,
    ips: &[IpAddr],
    dns: &[String],
    force: bool,
) -> Result<String, PkiError> {
    let ca = LoadedCa::load(ca_dir)?;
    let host = ca.issue(node, days, ips, dns)?;
    let (cert, key) = (
        out.join(format!("{node}.crt")),
        out.join(format!("{node}.key")),
    );
    write_all(
        &[
            OutFile {
                path: cert.clone(),
                contents: &host.cert_pem,
                secret: false,
            },
            OutFile {
                path: key.clone(),
                contents: &host.key_pem,
                secret: true,
            },
        ],
        force,
    )?;
    let id = NodeId::new(ca.trust_domain.clone(), node).map_err(PkiError::Input)?;
    Ok(format!(
        "wrote {} (host certificate for {id}, valid until {}): [tls] cert on node {node:?}\n\
         wrote {} (its private key, mode 0600): [tls] key on node {node:?}\n",
        cert.display(),
        day(host.not_after),
        key.display(),
    ))
}

/// `YYYY-MM-DD` of a validity bound, for messages.
pub fn day(t: OffsetDateTime) -> String {
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity::node_of;

    #[test]
    fn a_generated_ca_issues_host_certificates_with_one_node_identity() {
        let td = TrustDomain::parse("mesh.test").unwrap();
        let ca = LoadedCa::generate(&td, 30).unwrap();
        let host = ca
            .issue(
                "host-a",
                7,
                &["10.0.0.5".parse().unwrap()],
                &["a.example".into()],
            )
            .unwrap();
        let der: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(host.cert_pem.as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x509.is_ca());
        assert_eq!(node_of(&x509, &td).unwrap().node, "host-a");
        let lifetime =
            x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
        assert_eq!(lifetime, 7 * 86400 + 3600);
        assert!(matches!(
            ca.issue("a/b", 7, &[], &[]),
            Err(PkiError::Input(_))
        ));
        assert!(matches!(
            ca.issue("ok", 0, &[], &[]),
            Err(PkiError::Input(_))
        ));
    }
}
