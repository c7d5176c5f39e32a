//! The cluster's certificates and keys: one CA, the API server's serving certificate, client
//! certificates for the admin, the controller manager, the scheduler and every node, and the
//! service-account signing key. ECDSA P-256 throughout; written to the state folder's `pki/`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

use crate::error::{Error, IoContext, Result};
use crate::layout::{KUBERNETES_SERVICE_IP, Layout};

/// A certificate and its key on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM (PKCS#8) private key.
    pub key: PathBuf,
}

/// Paths of everything [`generate`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pki {
    /// The cluster CA (signs every certificate; also the client CA of the API server).
    pub ca: CertFiles,
    /// The API server's serving certificate.
    pub apiserver: CertFiles,
    /// `kubernetes-admin` in group `system:masters`.
    pub admin: CertFiles,
    /// `system:kube-controller-manager`.
    pub controller_manager: CertFiles,
    /// `system:kube-scheduler`.
    pub scheduler: CertFiles,
    /// Service-account token signing key (private).
    pub sa_key: PathBuf,
    /// Service-account token verification key (public).
    pub sa_pub: PathBuf,
}

impl Pki {
    /// Where the files of `layout` are (whether or not they exist yet).
    pub fn paths(layout: &Layout) -> Self {
        let dir = layout.pki_dir();
        let pair = |name: &str| CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        Pki {
            ca: pair("ca"),
            apiserver: pair("apiserver"),
            admin: pair("admin"),
            controller_manager: pair("controller-manager"),
            scheduler: pair("scheduler"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        }
    }

    /// The client certificate of a node (`system:node:<name>`).
    pub fn node(layout: &Layout, node: &str) -> CertFiles {
        let dir = layout.pki_dir();
        CertFiles {
            cert: dir.join(format!("node-{node}.crt")),
            key: dir.join(format!("node-{node}.key")),
        }
    }
}

/// Subject alternative names of the API server: every name and address a client may use.
pub fn apiserver_sans(layout: &Layout) -> Vec<String> {
    let mut sans: Vec<String> = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
        "127.0.0.1",
        "::1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    sans.push(KUBERNETES_SERVICE_IP.to_string());
    if layout.dual_stack {
        sans.push("fd00:10:96::1".to_owned());
    }
    sans.extend(layout.cp_ips().iter().map(ToString::to_string));
    sans
}

/// Generates every certificate and key of the cluster into `layout.pki_dir()`.
pub fn generate(layout: &Layout) -> Result<Pki> {
    let dir = layout.pki_dir();
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let paths = Pki::paths(layout);

    let ca_key = keypair("CA key")?;
    let mut ca_params = params("CA", Vec::new())?;
    ca_params.distinguished_name = name(&format!("switchyard-e2e-{}-ca", layout.name), None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| pki_error("CA", source))?;
    write(&paths.ca.cert, &ca_cert.pem(), 0o644)?;
    write(&paths.ca.key, &ca_key.serialize_pem(), 0o600)?;
    let issuer = Issuer::new(ca_params, ca_key);

    leaf(
        &issuer,
        &paths.apiserver,
        "kube-apiserver",
        None,
        apiserver_sans(layout),
        true,
    )?;
    leaf(
        &issuer,
        &paths.admin,
        "kubernetes-admin",
        Some("system:masters"),
        Vec::new(),
        false,
    )?;
    leaf(
        &issuer,
        &paths.controller_manager,
        "system:kube-controller-manager",
        None,
        Vec::new(),
        false,
    )?;
    leaf(
        &issuer,
        &paths.scheduler,
        "system:kube-scheduler",
        None,
        Vec::new(),
        false,
    )?;
    for node in &layout.nodes {
        leaf(
            &issuer,
            &Pki::node(layout, &node.name),
            &format!("system:node:{}", node.name),
            Some("system:nodes"),
            Vec::new(),
            false,
        )?;
    }

    let sa = keypair("service-account key")?;
    write(&paths.sa_key, &sa.serialize_pem(), 0o600)?;
    write(&paths.sa_pub, &sa.public_key_pem(), 0o644)?;
    Ok(paths)
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    files: &CertFiles,
    common_name: &str,
    organization: Option<&str>,
    sans: Vec<String>,
    server: bool,
) -> Result<()> {
    let key = keypair(common_name)?;
    let mut p = params(common_name, sans)?;
    p.distinguished_name = name(common_name, organization);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    p.use_authority_key_identifier_extension = true;
    let cert = p
        .signed_by(&key, issuer)
        .map_err(|source| pki_error(common_name, source))?;
    write(&files.cert, &cert.pem(), 0o644)?;
    write(&files.key, &key.serialize_pem(), 0o600)
}

fn keypair(what: &str) -> Result<KeyPair> {
    KeyPair::generate().map_err(|source| pki_error(what, source))
}

fn params(what: &str, sans: Vec<String>) -> Result<CertificateParams> {
    CertificateParams::new(sans).map_err(|source| pki_error(what, source))
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn pki_error(what: &str, source: rcgen::Error) -> Error {
    Error::Pki {
        what: what.to_owned(),
        source,
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .ctx(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .ctx(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apiserver_certificate_names_the_service_ip_the_control_plane_and_loopback() {
        let layout = Layout::new("dev", Path::new("/tmp"), 1, true);
        let sans = apiserver_sans(&layout);
        for want in [
            "10.96.0.1",
            "fd00:10:96::1",
            "172.31.0.2",
            "fd00:172:31::2",
            "127.0.0.1",
            "kubernetes.default.svc",
        ] {
            assert!(sans.iter().any(|s| s == want), "{want} missing from {sans:?}");
        }
    }

    #[test]
    fn generate_writes_every_certificate_and_key() {
        let root = std::env::temp_dir().join(format!("swyd-pki-test-{}", std::process::id()));
        let layout = Layout::new("pki", &root, 2, true);
        let pki = generate(&layout).unwrap();
        for f in [
            &pki.ca,
            &pki.apiserver,
            &pki.admin,
            &pki.controller_manager,
            &pki.scheduler,
        ] {
            assert!(
                std::fs::read_to_string(&f.cert)
                    .unwrap()
                    .contains("BEGIN CERTIFICATE")
            );
            assert!(std::fs::read_to_string(&f.key).unwrap().contains("PRIVATE KEY"));
        }
        assert!(Pki::node(&layout, "node-2").cert.exists());
        assert!(
            std::fs::read_to_string(&pki.sa_pub)
                .unwrap()
                .contains("PUBLIC KEY")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
