//! Pod volumes on a simulated node. ConfigMap, Secret, downward-API and projected volumes (with real
//! service-account tokens from the TokenRequest API, bound to the pod) are written to the pod's folder
//! in the state folder; hostPath volumes are the host's own paths; emptyDir is a fresh folder. The
//! container wrapper ([`crate::podexec`]) then mounts them at their `mountPath`s inside the
//! container's private mount namespace.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, Pod, Secret, ServiceAccount, Volume};
use kube::Api;
use kube::api::PostParams;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::node::env::{PodFacts, field_ref, get_optional};

/// One mount for the container wrapper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// What to mount (a file or folder on the host).
    pub source: PathBuf,
    /// Where the container sees it.
    pub target: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
}

#[derive(Clone, Debug)]
enum Source {
    /// A folder the harness filled.
    Dir(PathBuf),
    /// A host path; `fallback` is used when it does not exist and the type allows creating it, so the
    /// harness never creates files on the host.
    Host {
        path: PathBuf,
        fallback: Option<PathBuf>,
    },
}

#[derive(Clone, Debug)]
struct TokenFile {
    file: PathBuf,
    service_account: String,
    audience: Option<String>,
    expiration_seconds: i64,
    refresh_at: Instant,
}

/// The pod's volumes, materialized.
#[derive(Debug, Default)]
pub struct Volumes {
    sources: BTreeMap<String, Source>,
    tokens: Vec<TokenFile>,
}

/// Writes `contents` to `dir/rel` atomically (write then rename), so a bind-mounted folder never shows a
/// half-written file.
fn write_file(dir: &Path, rel: &str, contents: &[u8], mode: Option<i32>) -> Result<()> {
    let rel_path = Path::new(rel);
    if rel_path.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::Invalid(format!(
            "volume path {rel:?} must be relative without .."
        )));
    }
    let path = dir.join(rel_path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    let tmp = path.with_extension("swyd-tmp");
    std::fs::write(&tmp, contents).ctx(|| format!("writing {}", tmp.display()))?;
    let mode = u32::try_from(mode.unwrap_or(0o644)).unwrap_or(0o644);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("setting mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).ctx(|| format!("writing {}", path.display()))
}

fn write_keys(dir: &Path, data: &BTreeMap<String, Vec<u8>>, items: Option<&Vec<KeyToPath>>) -> Result<()> {
    match items {
        Some(items) => {
            for item in items {
                if let Some(value) = data.get(&item.key) {
                    write_file(dir, &item.path, value, item.mode)?;
                }
            }
        }
        None => {
            for (key, value) in data {
                write_file(dir, key, value, None)?;
            }
        }
    }
    Ok(())
}

fn config_map_data(cm: ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    data.extend(
        cm.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0)),
    );
    data
}

fn secret_data(s: Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

impl Volumes {
    /// Materializes every volume of `pod` under `dir`.
    pub async fn materialize(
        client: &kube::Client,
        pod: &Pod,
        facts: &PodFacts,
        dir: &Path,
    ) -> Result<Volumes> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let mut volumes = Volumes::default();
        let spec_volumes: Vec<Volume> = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for volume in spec_volumes {
            let vdir = dir.join("volumes").join(&volume.name);
            let source = if let Some(host) = &volume.host_path {
                let path = PathBuf::from(&host.path);
                let fallback = match host.type_.as_deref() {
                    Some("DirectoryOrCreate") | Some("") | None => Some(vdir.clone()),
                    Some("FileOrCreate") => Some(vdir.join("file")),
                    _ => None,
                };
                if !path.exists()
                    && let Some(f) = &fallback
                {
                    if host.type_.as_deref() == Some("FileOrCreate") {
                        write_file(&vdir, "file", b"", Some(0o644))?;
                    } else {
                        std::fs::create_dir_all(f).ctx(|| format!("creating {}", f.display()))?;
                    }
                }
                Source::Host { path, fallback }
            } else {
                std::fs::create_dir_all(&vdir).ctx(|| format!("creating {}", vdir.display()))?;
                if let Some(cm) = &volume.config_map {
                    let optional = cm.optional.unwrap_or(false);
                    if let Some(obj) = get_optional(
                        Api::<ConfigMap>::namespaced(client.clone(), &ns),
                        &cm.name,
                        optional,
                    )
                    .await?
                    {
                        write_keys(&vdir, &config_map_data(obj), cm.items.as_ref())?;
                    }
                } else if let Some(s) = &volume.secret {
                    let name = s.secret_name.clone().unwrap_or_default();
                    let optional = s.optional.unwrap_or(false);
                    if let Some(obj) =
                        get_optional(Api::<Secret>::namespaced(client.clone(), &ns), &name, optional).await?
                    {
                        write_keys(&vdir, &secret_data(obj), s.items.as_ref())?;
                    }
                } else if let Some(d) = &volume.downward_api {
                    for item in d.items.iter().flatten() {
                        if let Some(f) = &item.field_ref
                            && let Some(v) = field_ref(pod, facts, &f.field_path)
                        {
                            write_file(&vdir, &item.path, v.as_bytes(), item.mode)?;
                        }
                    }
                } else if let Some(p) = &volume.projected {
                    for source in p.sources.iter().flatten() {
                        if let Some(t) = &source.service_account_token {
                            let sa = pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.service_account_name.clone())
                                .unwrap_or_else(|| "default".to_owned());
                            let token = TokenFile {
                                file: vdir.join(&t.path),
                                service_account: sa,
                                audience: t.audience.clone().filter(|a| !a.is_empty()),
                                expiration_seconds: t.expiration_seconds.unwrap_or(3607),
                                refresh_at: Instant::now(),
                            };
                            volumes.tokens.push(token);
                        }
                        if let Some(cm) = &source.config_map {
                            let optional = cm.optional.unwrap_or(false);
                            if let Some(obj) = get_optional(
                                Api::<ConfigMap>::namespaced(client.clone(), &ns),
                                &cm.name,
                                optional,
                            )
                            .await?
                            {
                                write_keys(&vdir, &config_map_data(obj), cm.items.as_ref())?;
                            }
                        }
                        if let Some(s) = &source.secret {
                            let optional = s.optional.unwrap_or(false);
                            if let Some(obj) = get_optional(
                                Api::<Secret>::namespaced(client.clone(), &ns),
                                &s.name,
                                optional,
                            )
                            .await?
                            {
                                write_keys(&vdir, &secret_data(obj), s.items.as_ref())?;
                            }
                        }
                        if let Some(d) = &source.downward_api {
                            for item in d.items.iter().flatten() {
                                if let Some(f) = &item.field_ref
                                    && let Some(v) = field_ref(pod, facts, &f.field_path)
                                {
                                    write_file(&vdir, &item.path, v.as_bytes(), item.mode)?;
                                }
                            }
                        }
                    }
                }
                // emptyDir and anything else: the empty folder.
                Source::Dir(vdir)
            };
            volumes.sources.insert(volume.name.clone(), source);
        }
        volumes.refresh_tokens(client, pod).await?;
        Ok(volumes)
    }

    /// Requests new tokens for the projected token files that are due (80% of their lifetime, like the
    /// kubelet).
    pub async fn refresh_tokens(&mut self, client: &kube::Client, pod: &Pod) -> Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        for token in self.tokens.iter_mut().filter(|t| t.refresh_at <= Instant::now()) {
            let request = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: token.audience.iter().cloned().collect(),
                    expiration_seconds: Some(token.expiration_seconds),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: pod.metadata.name.clone(),
                        uid: pod.metadata.uid.clone(),
                    }),
                },
                ..TokenRequest::default()
            };
            let api = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
            let response: TokenRequest = api
                .create_subresource("token", &token.service_account, &PostParams::default(), &request)
                .await
                .map_err(|e| {
                    Error::kube(
                        format!("requesting a token for {ns}/{}", token.service_account),
                        e,
                    )
                })?;
            let value = response
                .status
                .map(|s| s.token)
                .ok_or_else(|| Error::Failed("TokenRequest returned no token".into()))?;
            let dir = token.file.parent().unwrap_or(Path::new("/"));
            let name = token
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            write_file(dir, &name, value.as_bytes(), Some(0o600))?;
            let lifetime = u64::try_from(token.expiration_seconds).unwrap_or(3607);
            token.refresh_at = Instant::now() + Duration::from_secs(lifetime * 8 / 10);
        }
        Ok(())
    }

    /// The mounts of one container.
    pub fn mounts(&self, container: &Container) -> Result<Vec<Mount>> {
        let mut mounts = vec![];
        for vm in container.volume_mounts.iter().flatten() {
            let source = self.sources.get(&vm.name).ok_or_else(|| {
                Error::Invalid(format!("volumeMount {} refers to no volume of the pod", vm.name))
            })?;
            let base = match source {
                Source::Dir(d) => d.clone(),
                Source::Host { path, fallback } => match fallback {
                    Some(f) if !path.exists() => f.clone(),
                    _ => path.clone(),
                },
            };
            let source = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => base.join(sub),
                None => base,
            };
            let target = PathBuf::from(&vm.mount_path);
            if source == target {
                // A hostPath seen at its own path: the container already sees it.
                continue;
            }
            mounts.push(Mount {
                source,
                target,
                read_only: vm.read_only.unwrap_or(false),
            });
        }
        Ok(mounts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_files_refuse_paths_that_escape_their_folder() {
        let dir = std::env::temp_dir().join(format!("swyd-vol-test-{}", std::process::id()));
        assert!(write_file(&dir, "../x", b"", None).is_err());
        assert!(write_file(&dir, "/etc/x", b"", None).is_err());
        write_file(&dir, "a/b.yaml", b"k: v", None).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a/b.yaml")).unwrap(), "k: v");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
