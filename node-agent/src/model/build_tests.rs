use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::*;

fn service(name: &str, spec: Value) -> Service {
    service_with(name, spec, json!({}), json!({}))
}

fn service_with(name: &str, spec: Value, labels: Value, status: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": name, "labels": labels},
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

fn slice(service: &str, suffix: &str, family: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": format!("{service}-{suffix}"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn ready(ip: &str, node: &str) -> Value {
    json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true, "serving": true, "terminating": false}})
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: Some("zone-a".into()),
        ..Default::default()
    }
}

fn web() -> Service {
    service(
        "web",
        json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}),
    )
}

fn web_slice() -> EndpointSlice {
    slice(
        "web",
        "a",
        "IPv4",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        json!([ready("10.244.1.5", "node-a"), ready("10.244.2.5", "node-b")]),
    )
}

fn port_name(name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: "ns".into(),
        name: name.into(),
        port: port.into(),
        protocol,
    }
}

fn endpoints(list: &[Endpoint]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

#[test]
fn cluster_ip_service_gets_its_endpoints_with_target_port() {
    let (model, report) = build([&web()], [&web_slice()], &node(), None);
    assert!(report.skipped.is_empty());
    let svc = &model.v4.services[&port_name("web", "http", Protocol::Tcp)];
    assert_eq!(svc.cluster_ip.to_string(), "10.96.0.10");
    assert_eq!(svc.port, 80);
    assert_eq!(
        endpoints(&svc.cluster_endpoints),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
    assert!(svc.cluster_endpoints[0].is_local && !svc.cluster_endpoints[1].is_local);
    assert!(svc.has_any_endpoints);
    assert!(model.v6.services.is_empty());
}

#[test]
fn headless_external_name_and_other_proxies_services_are_ignored() {
    let headless = service("headless", json!({"clusterIP": "None", "ports": [{"port": 80}]}));
    let external = service(
        "ext",
        json!({"type": "ExternalName", "externalName": "example.com"}),
    );
    let other = service_with(
        "other",
        json!({"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}),
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
        json!({}),
    );
    let ours = service_with(
        "ours",
        json!({"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}),
        json!({"service.kubernetes.io/service-proxy-name": "switchyard"}),
        json!({}),
    );
    let services = [&headless, &external, &other, &ours];
    let (model, report) = build(services, [], &node(), Some("switchyard"));
    assert!(report.skipped.is_empty());
    let names: Vec<&str> = model.v4.services.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["ours"]);

    let (model, _) = build(services, [], &node(), None);
    assert!(
        model.v4.services.is_empty(),
        "without a proxy name every labelled service is skipped"
    );
}

#[test]
fn dual_stack_service_is_split_per_family() {
    let svc = service(
        "dual",
        json!({"clusterIPs": ["10.96.0.20", "fd00::20"], "ipFamilies": ["IPv4", "IPv6"],
        "externalIPs": ["192.0.2.1", "2001:db8::1"], "ports": [{"port": 53, "protocol": "UDP"}]}),
    );
    let s4 = slice(
        "dual",
        "v4",
        "IPv4",
        json!([{"port": 5353, "protocol": "UDP"}]),
        json!([ready("10.244.1.9", "node-a")]),
    );
    let s6 = slice(
        "dual",
        "v6",
        "IPv6",
        json!([{"port": 5353, "protocol": "UDP"}]),
        json!([ready("fd00:244::9", "node-b")]),
    );
    let (model, _) = build([&svc], [&s4, &s6], &node(), None);
    let name = port_name("dual", "", Protocol::Udp);
    let v4 = &model.v4.services[&name];
    let v6 = &model.v6.services[&name];
    assert_eq!(v4.cluster_ip.to_string(), "10.96.0.20");
    assert_eq!(v6.cluster_ip.to_string(), "fd00::20");
    assert_eq!(endpoints(&v4.cluster_endpoints), ["10.244.1.9:5353"]);
    assert_eq!(endpoints(&v6.cluster_endpoints), ["[fd00:244::9]:5353"]);
    assert_eq!(v4.external_ips.len(), 1);
    assert_eq!(v6.external_ips[0].to_string(), "2001:db8::1");
}

#[test]
fn sctp_and_multiple_ports_match_slices_by_name_and_protocol() {
    let svc = service(
        "multi",
        json!({"clusterIP": "10.96.0.30", "ports": [
        {"name": "a", "port": 80, "protocol": "TCP"},
        {"name": "b", "port": 80, "protocol": "UDP"},
        {"name": "c", "port": 9, "protocol": "SCTP"}]}),
    );
    let s = slice(
        "multi",
        "x",
        "IPv4",
        json!([{"name": "a", "port": 8080, "protocol": "TCP"}, {"name": "b", "port": 8081, "protocol": "UDP"},
               {"name": "c", "port": 9999, "protocol": "SCTP"}]),
        json!([ready("10.244.1.1", "node-a")]),
    );
    let (model, _) = build([&svc], [&s], &node(), None);
    assert_eq!(
        endpoints(&model.v4.services[&port_name("multi", "a", Protocol::Tcp)].cluster_endpoints),
        ["10.244.1.1:8080"]
    );
    assert_eq!(
        endpoints(&model.v4.services[&port_name("multi", "b", Protocol::Udp)].cluster_endpoints),
        ["10.244.1.1:8081"]
    );
    assert_eq!(
        endpoints(&model.v4.services[&port_name("multi", "c", Protocol::Sctp)].cluster_endpoints),
        ["10.244.1.1:9999"]
    );
}

#[test]
fn load_balancer_fields_are_modelled() {
    let svc = service_with(
        "lb",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40", "externalTrafficPolicy": "Local",
               "healthCheckNodePort": 32000, "loadBalancerSourceRanges": [" 203.0.113.0/24 ", "2001:db8::/32"],
               "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
               "ports": [{"port": 443, "nodePort": 30443}]}),
        json!({}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"ip": "198.51.100.8", "ipMode": "Proxy"},
                                             {"hostname": "lb.example.com"}]}}),
    );
    let s = slice(
        "lb",
        "a",
        "IPv4",
        json!([{"port": 8443}]),
        json!([ready("10.244.1.1", "node-a"), ready("10.244.2.1", "node-b")]),
    );
    let (model, report) = build([&svc], [&s], &node(), None);
    assert!(report.skipped.is_empty(), "{report:?}");
    let lb = &model.v4.services[&port_name("lb", "", Protocol::Tcp)];
    assert_eq!(lb.node_port, Some(30443));
    assert_eq!(
        lb.load_balancer_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["198.51.100.7"]
    );
    assert_eq!(
        lb.load_balancer_source_ranges
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["203.0.113.0/24"]
    );
    assert_eq!(lb.session_affinity_seconds, Some(60));
    assert_eq!(lb.health_check_node_port, Some(32000));
    assert!(lb.external_policy_local);
    // ETP Local with ITP Cluster: both sets are needed.
    assert_eq!(endpoints(&lb.local_endpoints), ["10.244.1.1:8443"]);
    assert_eq!(
        endpoints(&lb.cluster_endpoints),
        ["10.244.1.1:8443", "10.244.2.1:8443"]
    );
    assert_eq!(endpoints(lb.external_endpoints()), ["10.244.1.1:8443"]);
    assert_eq!(endpoints(lb.internal_endpoints()).len(), 2);
}

#[test]
fn session_affinity_defaults_to_three_hours() {
    let svc = service(
        "aff",
        json!({"clusterIP": "10.96.0.41", "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}),
    );
    let (model, _) = build([&svc], [], &node(), None);
    assert_eq!(
        model
            .v4
            .services
            .values()
            .next()
            .unwrap()
            .session_affinity_seconds,
        Some(10800)
    );
}

#[test]
fn node_port_is_ignored_on_cluster_ip_services_and_lb_ips_on_non_lb() {
    let svc = service_with(
        "cip",
        json!({"type": "ClusterIP", "clusterIP": "10.96.0.42", "ports": [{"port": 80, "nodePort": 30080}]}),
        json!({}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}),
    );
    let (model, _) = build([&svc], [], &node(), None);
    let svc = model.v4.services.values().next().unwrap();
    assert_eq!(svc.node_port, None);
    assert!(svc.load_balancer_ips.is_empty());
    assert!(!svc.has_any_endpoints);
}

#[test]
fn internal_traffic_policy_local_uses_only_local_endpoints() {
    let svc = service(
        "itp",
        json!({"clusterIP": "10.96.0.50", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
    );
    let s = slice(
        "itp",
        "a",
        "IPv4",
        json!([{"port": 80}]),
        json!([ready("10.244.1.1", "node-a"), ready("10.244.2.1", "node-b")]),
    );
    let (model, _) = build([&svc], [&s], &node(), None);
    let svc = model.v4.services.values().next().unwrap();
    assert_eq!(endpoints(svc.internal_endpoints()), ["10.244.1.1:80"]);
    assert!(svc.cluster_endpoints.is_empty(), "nothing uses Cluster policy");
}

#[test]
fn endpoints_in_two_slices_are_deduplicated() {
    let a = slice(
        "web",
        "a",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([ready("10.244.1.5", "node-a")]),
    );
    let b = slice(
        "web",
        "b",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([ready("10.244.1.5", "node-a"), ready("10.244.3.5", "node-c")]),
    );
    let (model, _) = build([&web()], [&a, &b], &node(), None);
    let svc = model.v4.services.values().next().unwrap();
    assert_eq!(
        endpoints(&svc.cluster_endpoints),
        ["10.244.1.5:8080", "10.244.3.5:8080"]
    );
}

#[test]
fn absent_conditions_mean_ready_and_serving() {
    let s = slice(
        "web",
        "a",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([{"addresses": ["10.244.1.5"]}]),
    );
    let (model, _) = build([&web()], [&s], &node(), None);
    let ep = &model.v4.services.values().next().unwrap().cluster_endpoints[0];
    assert!(ep.ready && ep.serving && !ep.terminating && !ep.is_local);
}

#[test]
fn malformed_objects_are_skipped_and_reported_without_affecting_others() {
    let bad_ip = service(
        "bad-ip",
        json!({"clusterIP": "10.96.0.999", "ports": [{"port": 80}]}),
    );
    let bad_port = service(
        "bad-port",
        json!({"clusterIP": "10.96.0.61", "ports": [{"port": 70000}]}),
    );
    let bad_proto = service(
        "bad-proto",
        json!({"clusterIP": "10.96.0.62", "ports": [{"port": 80, "protocol": "ICMP"}]}),
    );
    let bad_range = service(
        "bad-range",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.63",
        "loadBalancerSourceRanges": ["not-a-cidr"], "ports": [{"port": 80}]}),
    );
    let bad_slice_ip = slice(
        "web",
        "bad",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([ready("10.244.1.500", "node-a")]),
    );
    let bad_slice_port = slice(
        "web",
        "badport",
        "IPv4",
        json!([{"name": "http", "port": -1}]),
        json!([ready("10.244.1.6", "node-a")]),
    );
    let (model, report) = build(
        [&bad_ip, &web(), &bad_port, &bad_proto, &bad_range],
        [&web_slice(), &bad_slice_ip, &bad_slice_port],
        &node(),
        None,
    );
    let mut reasons: Vec<(String, &str)> = report
        .skipped
        .iter()
        .map(|s| (s.object.clone(), s.reason))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("ns/bad-ip".to_owned(), "invalid_ip"),
            ("ns/bad-port".to_owned(), "invalid_port"),
            ("ns/bad-proto".to_owned(), "invalid_protocol"),
            ("ns/bad-range".to_owned(), "invalid_cidr"),
            ("ns/web-bad".to_owned(), "invalid_ip"),
            ("ns/web-badport".to_owned(), "invalid_port"),
        ]
    );
    let names: Vec<&str> = model.v4.services.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["web"], "the well-formed service is still modelled");
    assert_eq!(
        endpoints(&model.v4.services.values().next().unwrap().cluster_endpoints).len(),
        2
    );
}

#[test]
fn changed_since_names_added_changed_and_removed_ports() {
    let (before, _) = build([&web()], [&web_slice()], &node(), None);
    let other = service(
        "other",
        json!({"clusterIP": "10.96.0.70", "ports": [{"port": 80}]}),
    );
    let fewer = slice(
        "web",
        "a",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([ready("10.244.1.5", "node-a")]),
    );
    let (after, _) = build([&web(), &other], [&fewer], &node(), None);
    let changed: Vec<String> = after
        .v4
        .changed_since(&before.v4)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(changed, ["ns/other/tcp", "ns/web:http/tcp"]);
    let (gone, _) = build([], [], &node(), None);
    assert_eq!(gone.v4.changed_since(&after.v4).len(), 2);
    assert!(after.v4.changed_since(&after.v4).is_empty());
}
