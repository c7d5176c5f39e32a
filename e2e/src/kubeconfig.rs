//! Kubeconfig files: the admin's for the host (through the loopback forwarder) and the components'
//! (inside the control-plane namespace, or the node simulators'). Certificates are referenced by path;
//! they live next to the kubeconfig in the state folder.

use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::pki::CertFiles;

/// Renders a kubeconfig with one cluster, one user (client certificate) and one current context.
pub fn render(cluster: &str, server: &str, ca: &Path, user: &str, client: &CertFiles) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: {cluster}
    cluster:
      server: {server}
      certificate-authority: {ca}
users:
  - name: {user}
    user:
      client-certificate: {cert}
      client-key: {key}
contexts:
  - name: {cluster}
    context:
      cluster: {cluster}
      user: {user}
current-context: {cluster}
",
        ca = ca.display(),
        cert = client.cert.display(),
        key = client.key.display(),
    )
}

/// Writes a kubeconfig file.
pub fn write(path: &Path, contents: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, contents).ctx(|| format!("writing {}", path.display()))
}

/// A client for the API server from a kubeconfig file.
pub async fn client(path: &Path) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(Error::Kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(Error::Kubeconfig)?;
    kube::Client::try_from(config).map_err(|e| Error::kube("building a client", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_names_server_ca_and_client_certificate() {
        let files = CertFiles {
            cert: "/s/pki/admin.crt".into(),
            key: "/s/pki/admin.key".into(),
        };
        let text = render(
            "swyd-dev",
            "https://127.0.0.1:40000",
            Path::new("/s/pki/ca.crt"),
            "admin",
            &files,
        );
        let parsed: kube::config::Kubeconfig = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some("swyd-dev"));
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:40000"));
        assert_eq!(cluster.certificate_authority.as_deref(), Some("/s/pki/ca.crt"));
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.client_key.as_deref(), Some("/s/pki/admin.key"));
    }
}
