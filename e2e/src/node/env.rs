//! A container's environment as the kubelet builds it: the in-cluster API server variables, then the
//! container's `envFrom` and `env` (literal values with `$(VAR)` expansion, downward API field
//! references, ConfigMap and Secret keys).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::Api;

use crate::error::{Error, Result};

/// Search path given to every container.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Facts about the pod that field references read.
#[derive(Clone, Debug)]
pub struct PodFacts {
    /// Pod IPs.
    pub pod_ips: Vec<IpAddr>,
    /// Node IPs.
    pub host_ips: Vec<IpAddr>,
}

/// Resolves a downward-API `fieldPath`.
pub fn field_ref(pod: &Pod, facts: &PodFacts, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let join = |ips: &[IpAddr]| ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let map_entry = |map: Option<&BTreeMap<String, String>>, rest: &str| {
        let key = rest.strip_prefix("['").and_then(|r| r.strip_suffix("']"))?;
        map?.get(key).cloned()
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => facts.pod_ips.first().map(ToString::to_string),
        "status.podIPs" => Some(join(&facts.pod_ips)),
        "status.hostIP" => facts.host_ips.first().map(ToString::to_string),
        "status.hostIPs" => Some(join(&facts.host_ips)),
        "metadata.labels" => Some(format_map(meta.labels.as_ref())),
        "metadata.annotations" => Some(format_map(meta.annotations.as_ref())),
        _ => {
            if let Some(rest) = path.strip_prefix("metadata.labels") {
                map_entry(meta.labels.as_ref(), rest)
            } else if let Some(rest) = path.strip_prefix("metadata.annotations") {
                map_entry(meta.annotations.as_ref(), rest)
            } else {
                None
            }
        }
    }
}

fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.map(|m| m.iter().map(|(k, v)| format!("{k}=\"{v}\"\n")).collect())
        .unwrap_or_default()
}

/// Expands `$(NAME)` from `vars`; `$$(NAME)` is a literal `$(NAME)`; unknown names stay as written.
pub fn expand(value: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
            && let Some(v) = vars.get(&inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The variables every container sees before its own: the API server as pods reach it (its real address;
/// the `kubernetes` ClusterIP only works once a proxy programs it), and the host name.
pub fn base(pod: &Pod, node_name: &str, apiserver: SocketAddr) -> BTreeMap<String, String> {
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    let hostname = if host_network {
        node_name.to_owned()
    } else {
        pod.metadata.name.clone().unwrap_or_default()
    };
    let (host, port) = (apiserver.ip().to_string(), apiserver.port().to_string());
    BTreeMap::from([
        ("PATH".to_owned(), PATH.to_owned()),
        ("HOSTNAME".to_owned(), hostname),
        ("KUBERNETES_SERVICE_HOST".to_owned(), host.clone()),
        ("KUBERNETES_SERVICE_PORT".to_owned(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".to_owned(), port.clone()),
        ("KUBERNETES_PORT".to_owned(), format!("tcp://{apiserver}")),
        (
            format!("KUBERNETES_PORT_{port}_TCP"),
            format!("tcp://{apiserver}"),
        ),
        (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".to_owned()),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port),
        (format!("KUBERNETES_PORT_{}_TCP_ADDR", apiserver.port()), host),
    ])
}

/// The container's full environment.
pub async fn resolve(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
    facts: &PodFacts,
    mut vars: BTreeMap<String, String>,
) -> Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            let optional = r.optional.unwrap_or(false);
            if let Some(cm) = get_optional(
                Api::<ConfigMap>::namespaced(client.clone(), &ns),
                &r.name,
                optional,
            )
            .await?
            {
                for (k, v) in cm.data.unwrap_or_default() {
                    vars.insert(format!("{prefix}{k}"), v);
                }
            }
        }
        if let Some(r) = &from.secret_ref {
            let optional = r.optional.unwrap_or(false);
            if let Some(s) =
                get_optional(Api::<Secret>::namespaced(client.clone(), &ns), &r.name, optional).await?
            {
                for (k, v) in s.data.unwrap_or_default() {
                    vars.insert(format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into_owned());
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(v) = &var.value {
            Some(expand(v, &vars))
        } else if let Some(from) = &var.value_from {
            if let Some(f) = &from.field_ref {
                field_ref(pod, facts, &f.field_path)
            } else if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                get_optional(
                    Api::<ConfigMap>::namespaced(client.clone(), &ns),
                    &r.name,
                    optional,
                )
                .await?
                .and_then(|cm| cm.data.and_then(|mut d| d.remove(&r.key)))
            } else if let Some(r) = &from.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                get_optional(Api::<Secret>::namespaced(client.clone(), &ns), &r.name, optional)
                    .await?
                    .and_then(|s| s.data.and_then(|mut d| d.remove(&r.key)))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            } else {
                // resourceFieldRef: no resource accounting here; an empty value is honest.
                Some(String::new())
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            vars.insert(var.name.clone(), value);
        }
    }
    Ok(vars.into_iter().collect())
}

/// Reads an object; a missing one is `None` when optional and an error otherwise.
pub async fn get_optional<K>(api: Api<K>, name: &str, optional: bool) -> Result<Option<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await {
        Ok(Some(obj)) => Ok(Some(obj)),
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(Error::Invalid(format!("{} {name} not found", K::kind(&())))),
        Err(e) => Err(Error::kube(format!("reading {name}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_references_expand_from_earlier_variables() {
        let vars = BTreeMap::from([("A".to_owned(), "x".to_owned())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "x-$(B)-$(A)-$");
    }

    #[test]
    fn field_references_read_metadata_spec_and_addresses() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "echo"}},
            "spec": {"nodeName": "node-1", "containers": []},
        }))
        .unwrap();
        let facts = PodFacts {
            pod_ips: vec!["10.244.1.2".parse().unwrap()],
            host_ips: vec!["172.31.0.11".parse().unwrap()],
        };
        assert_eq!(
            field_ref(&pod, &facts, "spec.nodeName").as_deref(),
            Some("node-1")
        );
        assert_eq!(
            field_ref(&pod, &facts, "status.podIP").as_deref(),
            Some("10.244.1.2")
        );
        assert_eq!(
            field_ref(&pod, &facts, "metadata.labels['app']").as_deref(),
            Some("echo")
        );
        assert_eq!(field_ref(&pod, &facts, "spec.unknown"), None);
    }

    #[test]
    fn containers_reach_the_api_server_at_its_real_address() {
        let pod: Pod = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"hostNetwork": true, "containers": []}}),
        )
        .unwrap();
        let env = base(&pod, "node-2", "172.31.0.2:6443".parse().unwrap());
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "172.31.0.2");
        assert_eq!(env["KUBERNETES_SERVICE_PORT"], "6443");
        assert_eq!(env["HOSTNAME"], "node-2");
    }
}
