//! weft's cluster certificates. Owns: the cluster's certificate authority ([`Ca`]: generated
//! by `weft up`, ECDSA P-256 as kubeadm's default), the serving and client certificates it
//! issues ([`Ca::issue`]), the rustls configurations that serve them and verify a peer's
//! certificate against the CA ([`server_config`], [`client_config`]), and who a client
//! certificate names ([`subject_of`]): Kubernetes' convention, the common name is the user and
//! each organization a group (`CN=system:node:node1, O=system:nodes`).
//!
//! [`serve::serve_tls`] is the HTTPS accept loop the API server and the node endpoint share.
//!
//! PEM in, PEM out: the files are the ones kube-apiserver's flags take (`--tls-cert-file`,
//! `--client-ca-file`), and a kubeconfig embeds them as they are.

pub mod serve;

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

/// What can go wrong making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen refused to make a certificate or key.
    #[error("{context}: {source}")]
    Generate {
        /// What was being made.
        context: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{what}: {message}")]
    Pem {
        /// Which file or field.
        what: String,
        /// What is wrong with it.
        message: String,
    },
    /// A certificate this crate cannot make.
    #[error("{0}")]
    Unsupported(String),
    /// rustls refused the certificates or key.
    #[error("{context}: {source}")]
    Tls {
        /// What was being configured.
        context: String,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn generate(context: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |source| Error::Generate {
        context: context.to_owned(),
        source,
    }
}

/// Who a certificate is for: the user (common name) and the groups (organizations; a
/// certificate this crate issues carries at most one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The common name: the user name.
    pub common_name: String,
    /// The organizations: the user's groups.
    pub organizations: Vec<String>,
}

impl Subject {
    /// A subject with a user name and groups.
    pub fn new(common_name: &str, organizations: &[&str]) -> Self {
        Self {
            common_name: common_name.to_owned(),
            organizations: organizations.iter().map(|o| (*o).to_owned()).collect(),
        }
    }
}

/// What an issued certificate may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A server's certificate (TLS server authentication).
    Server,
    /// A client's certificate (TLS client authentication).
    Client,
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A certificate authority: a self-signed CA certificate and its key.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.cert.params().distinguished_name)
            .finish_non_exhaustive()
    }
}

/// How long certificates stay valid: ten years for the CA, one for what it issues (kubeadm's
/// figures).
const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 365;

fn validity(params: &mut CertificateParams, days: i64) {
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
    // A minute back, for clocks of other namespaces' processes a little behind.
    params.not_before = now - std::time::Duration::from_secs(60);
    params.not_after = now + std::time::Duration::from_secs(days.unsigned_abs() * 86_400);
}

impl Ca {
    /// A new CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(generate("generating the CA's key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_DAYS);
        let cert = params
            .self_signed(&key)
            .map_err(generate("signing the CA's certificate"))?;
        Ok(Self { cert, key })
    }

    /// Loads a CA written by [`Ca::cert_pem`] and [`Ca::key_pem`].
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).map_err(generate("reading the CA's key"))?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(generate("reading the CA's certificate"))?;
        // Signing the same subject with the same key again gives an issuer equal to the
        // original for everything a signature names (subject, key identifier).
        let cert = params
            .self_signed(&key)
            .map_err(generate("re-reading the CA's certificate"))?;
        Ok(Self { cert, key })
    }

    /// The CA's certificate.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA's private key.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a certificate for `who`, valid for the DNS names and IP addresses in `names`
    /// (for a server: every name clients reach it by).
    pub fn issue(&self, who: &Subject, names: &[String], usage: Usage) -> Result<Issued> {
        let context = format!("issuing a certificate for {}", who.common_name);
        if who.organizations.len() > 1 {
            // rcgen keeps one value per attribute type in a name.
            return Err(Error::Unsupported(format!(
                "{context}: one group (organization) per certificate, not {}",
                who.organizations.len()
            )));
        }
        let key = KeyPair::generate().map_err(generate(&context))?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(generate(&context))?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, who.common_name.as_str());
        if let Some(o) = who.organizations.first() {
            params
                .distinguished_name
                .push(DnType::OrganizationName, o.as_str());
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_DAYS);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(generate(&context))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            what: what.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            what: what.to_owned(),
            message: "no certificate in it".to_owned(),
        });
    }
    Ok(certs)
}

fn key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

fn roots(what: &str, ca_pem: &[u8]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(what, ca_pem)? {
        roots.add(c).map_err(|source| Error::Tls {
            context: format!("adding {what}"),
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls(context: &str) -> impl FnOnce(rustls::Error) -> Error + '_ {
    move |source| Error::Tls {
        context: context.to_owned(),
        source,
    }
}

/// Client certificates a server asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Asked for and verified when sent; a client without one goes on (and may authenticate
    /// otherwise, with a bearer token), as kube-apiserver does.
    Optional,
    /// Required: the handshake fails without a certificate the CA issued (the node endpoint,
    /// which only the API server may call).
    Required,
}

/// A rustls server configuration serving `cert_pem`/`key_pem` over HTTP/1.1, verifying client
/// certificates against `client_ca_pem` when given.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<(&[u8], ClientAuth)>,
) -> Result<rustls::ServerConfig> {
    let context = "configuring TLS";
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls(context))?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some((pem, auth)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("the client CA", pem)?),
                provider(),
            );
            let verifier = match auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| Error::Pem {
                what: "the client CA".to_owned(),
                message: e.to_string(),
            })?)
        }
    };
    let mut config = builder
        .with_single_cert(
            certs("the serving certificate", cert_pem)?,
            key("the serving key", key_pem)?,
        )
        .map_err(tls(context))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A rustls client configuration trusting `ca_pem`, presenting `identity` (certificate and key
/// PEM) when given.
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig> {
    let context = "configuring the TLS client";
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls(context))?
        .with_root_certificates(roots("the CA", ca_pem)?);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, k)) => builder
            .with_client_auth_cert(
                certs("the client certificate", cert)?,
                key("the client key", k)?,
            )
            .map_err(tls(context))?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Who a (verified) certificate names: its common name and organizations.
pub fn subject_of(der: &[u8]) -> Result<Subject> {
    let bad = |message: String| Error::Pem {
        what: "the peer's certificate".to_owned(),
        message,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
    let subject = cert.subject();
    let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| {
        a.as_str()
            .map(str::to_owned)
            .map_err(|e| bad(e.to_string()))
    };
    let common_name = match subject.iter_common_name().next() {
        Some(cn) => text(cn)?,
        None => return Err(bad("it names no common name".to_owned())),
    };
    let organizations = subject
        .iter_organization()
        .map(text)
        .collect::<Result<Vec<_>>>()?;
    Ok(Subject {
        common_name,
        organizations,
    })
}

/// The DER of the first certificate in `pem`.
pub fn first_der(what: &str, pem: &[u8]) -> Result<Vec<u8>> {
    Ok(certs(what, pem)?.swap_remove(0).to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_client_certificate_names_its_user_and_groups() {
        let ca = Ca::generate("weft-ca").expect("ca");
        let who = Subject::new("system:node:node1", &["system:nodes"]);
        let issued = ca.issue(&who, &[], Usage::Client).expect("issue");
        let der = first_der("cert", issued.cert_pem.as_bytes()).expect("der");
        assert_eq!(subject_of(&der).expect("subject"), who);
        let two = Subject::new("x", &["a", "b"]);
        assert!(matches!(
            ca.issue(&two, &[], Usage::Client),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_its_original_verifies() {
        let ca = Ca::generate("weft-ca").expect("ca");
        let again = Ca::load(&ca.cert_pem(), &ca.key_pem()).expect("load");
        let server = again
            .issue(
                &Subject::new("weft-apiserver", &[]),
                &["127.0.0.1".to_owned(), "kubernetes".to_owned()],
                Usage::Server,
            )
            .expect("issue");
        // rustls accepts the pair and the chain against the original CA certificate.
        server_config(
            server.cert_pem.as_bytes(),
            server.key_pem.as_bytes(),
            Some((ca.cert_pem().as_bytes(), ClientAuth::Optional)),
        )
        .expect("server config");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots("ca", ca.cert_pem().as_bytes()).expect("roots")),
            provider(),
        )
        .build()
        .expect("verifier");
        let leaf =
            CertificateDer::from(first_der("server", server.cert_pem.as_bytes()).expect("der"));
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            &leaf,
            &[],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("the original CA verifies what the reloaded one issued");
    }

    #[test]
    fn pem_without_a_certificate_is_refused() {
        let e = server_config(b"nothing here", b"", None).expect_err("refused");
        assert!(e.to_string().contains("no certificate"), "{e}");
    }
}
