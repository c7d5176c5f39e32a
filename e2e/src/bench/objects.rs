//! The objects both proxies see: selector-less Services with EndpointSlices written by the bench, so
//! the two proxies get exactly the same input and no controller touches it.

use std::net::Ipv4Addr;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

/// Namespace of the bench objects.
pub const NAMESPACE: &str = "swyd-bench";
/// Field manager of every write.
const MANAGER: &str = "switchyard-bench";
/// Writes in flight while filling the cluster.
const PARALLEL: usize = 32;
/// Name of the probed service.
pub const PROBE: &str = "probe";
/// Port of every service.
pub const SERVICE_PORT: u16 = 80;
/// Port of every endpoint (the echo servers listen there).
pub const TARGET_PORT: u16 = 8080;

/// Name of filler service `i`.
pub fn filler_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// Address of endpoint `j` of filler service `i`: unique, never answering (nothing connects to it).
pub fn filler_ip(i: usize, j: usize, per_service: usize) -> Ipv4Addr {
    let k = u32::try_from(i * per_service + j).unwrap_or(u32::MAX) & 0x007f_ffff;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) | k)
}

/// A churn address: from another range, so it never equals a filler address.
pub fn churn_ip(k: u64) -> Ipv4Addr {
    let k = u32::try_from(k & 0x003f_ffff).unwrap_or(0);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) | k)
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]},
    })
}

/// The EndpointSlice of `service` with these ready endpoints on `node`.
pub fn slice(service: &str, ips: &[Ipv4Addr], node: &str) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": node}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-bench"), "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "bench.switchyard.dev",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Writes `slice` (server-side apply: creates or replaces the endpoints).
pub async fn apply_slice(client: &Client, slice: &Value) -> anyhow::Result<()> {
    let name = slice["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE)
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(slice))
        .await?;
    Ok(())
}

/// Creates the bench namespace.
pub async fn create_namespace(client: &Client) -> anyhow::Result<()> {
    let namespaces = Api::<Namespace>::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates the probe service pointing at `endpoint`; returns its ClusterIP.
pub async fn create_probe(client: &Client, endpoint: Ipv4Addr, node: &str) -> anyhow::Result<Ipv4Addr> {
    let services = Api::<Service>::namespaced(client.clone(), NAMESPACE);
    let svc: Service = serde_json::from_value(service(PROBE))?;
    let created = services.create(&PostParams::default(), &svc).await?;
    apply_slice(client, &slice(PROBE, &[endpoint], node)).await?;
    let ip = created
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| anyhow::anyhow!("the probe service got no ClusterIP"))?;
    Ok(ip.parse()?)
}

/// Creates filler services `from..to`, each with `per_service` endpoints on `node`.
pub async fn create_fillers(
    client: &Client,
    from: usize,
    to: usize,
    per_service: usize,
    node: &str,
) -> anyhow::Result<()> {
    let services = Api::<Service>::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(from..to)
        .map(|i| {
            let services = services.clone();
            async move {
                let name = filler_name(i);
                let svc: Service = serde_json::from_value(service(&name))?;
                match services.create(&PostParams::default(), &svc).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
                let ips: Vec<Ipv4Addr> = (0..per_service).map(|j| filler_ip(i, j, per_service)).collect();
                apply_slice(client, &slice(&name, &ips, node)).await
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Deletes the bench namespace (and with it every bench object).
pub async fn delete_all(client: &Client) -> anyhow::Result<()> {
    let namespaces = Api::<Namespace>::all(client.clone());
    match namespaces.delete(NAMESPACE, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn filler_and_churn_addresses_are_unique_and_apart() {
        let fillers: BTreeSet<Ipv4Addr> = (0..30_000)
            .flat_map(|i| (0..10).map(move |j| filler_ip(i, j, 10)))
            .collect();
        assert_eq!(fillers.len(), 300_000);
        let churn: BTreeSet<Ipv4Addr> = (0..100_000).map(churn_ip).collect();
        assert_eq!(churn.len(), 100_000);
        assert!(fillers.is_disjoint(&churn));
        assert_eq!(filler_ip(0, 1, 10), Ipv4Addr::new(10, 128, 0, 1));
    }

    #[test]
    fn slice_names_its_service_and_every_endpoint() {
        let s = slice("svc-00001", &[Ipv4Addr::new(10, 128, 0, 1)], "node-3");
        let parsed: EndpointSlice = serde_json::from_value(s).unwrap();
        assert_eq!(
            parsed.metadata.labels.unwrap()["kubernetes.io/service-name"],
            "svc-00001"
        );
        assert_eq!(parsed.endpoints[0].addresses, ["10.128.0.1"]);
    }
}
