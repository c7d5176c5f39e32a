//! One pod on a simulated node, from acceptance to removal: set up its network, materialize its
//! volumes, run its containers (init containers first), probe them, restart them per `restartPolicy`,
//! report status, and on deletion keep it terminating for its grace period before removing the object.
//!
//! Echo pods stay Ready while terminating (like an application that drains), so their endpoints show
//! up as `serving` and `terminating` for the grace period. Two annotations change that for tests:
//! `switchyard.dev/e2e-ready: "false"` keeps an echo pod not Ready, and
//! `switchyard.dev/e2e-terminating-ready: "false"` makes it not Ready as soon as it is deleted.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::layout::{ClusterSpec, Layout, NodeLayout};
use crate::network;
use crate::node::env::{self, PodFacts};
use crate::node::images::{Runtime, classify};
use crate::node::status::{Condition, ContainerView, PodView, State, apply_body};
use crate::node::volumes::Volumes;
use crate::probe;
use crate::process::{self, Command, Process};

/// Field manager of everything the node simulators write.
pub const FIELD_MANAGER: &str = "switchyard-e2e";
/// Keeps an echo pod not Ready while `"false"`.
pub const READY_ANNOTATION: &str = "switchyard.dev/e2e-ready";
/// Makes an echo pod not Ready once deleted when `"false"`.
pub const TERMINATING_READY_ANNOTATION: &str = "switchyard.dev/e2e-terminating-ready";

/// What the node's pod watch tells a pod runner.
#[derive(Clone, Debug)]
pub enum PodEvent {
    /// The pod's current object.
    Present(Arc<Pod>),
    /// The object is gone (deleted with no grace, or by someone else).
    Gone,
    /// The node is shutting down: stop everything, leave the API alone.
    Shutdown,
}

/// What every pod runner of a node shares.
pub struct NodeCtx {
    /// The cluster spec (binaries).
    pub spec: Arc<ClusterSpec>,
    /// The cluster layout.
    pub layout: Arc<Layout>,
    /// This node.
    pub node: NodeLayout,
    /// A client with this node's identity (`system:node:<name>`).
    pub client: kube::Client,
    /// The API server as pods reach it.
    pub apiserver: SocketAddr,
    /// Pod IP host parts in use.
    pub used_ips: Mutex<BTreeSet<u8>>,
}

impl std::fmt::Debug for NodeCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCtx")
            .field("node", &self.node.name)
            .finish_non_exhaustive()
    }
}

impl NodeCtx {
    fn allocate_ip(&self) -> Option<u8> {
        let mut used = self.used_ips.lock().ok()?;
        let host = (2..=254u8).find(|h| !used.contains(h))?;
        used.insert(host);
        Some(host)
    }

    fn release_ip(&self, host: u8) {
        if let Ok(mut used) = self.used_ips.lock() {
            used.remove(&host);
        }
    }
}

fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

#[derive(Debug, Default)]
struct ProbeState {
    next: Option<Instant>,
    successes: i32,
    failures: i32,
    ok: bool,
}

#[derive(Debug)]
struct Ctr {
    spec: Container,
    runtime: Runtime,
    init: bool,
    process: Option<Process>,
    started_at: Option<Timestamp>,
    restart_count: i32,
    state: State,
    last: Option<State>,
    restart_at: Option<Instant>,
    readiness: ProbeState,
    liveness: ProbeState,
}

impl Ctr {
    fn new(spec: Container, runtime: Runtime, init: bool) -> Self {
        let state = match &runtime {
            Runtime::Unavailable(message) => State::Waiting {
                reason: "ErrImagePull".into(),
                message: message.clone(),
            },
            _ => State::Waiting {
                reason: if init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                }
                .into(),
                message: String::new(),
            },
        };
        Ctr {
            spec,
            runtime,
            init,
            process: None,
            started_at: None,
            restart_count: 0,
            state,
            last: None,
            restart_at: None,
            readiness: ProbeState::default(),
            liveness: ProbeState::default(),
        }
    }

    fn running(&self) -> bool {
        self.process.as_ref().is_some_and(|p| p.exit_status().is_none())
    }

    fn exited_ok(&self) -> bool {
        matches!(self.state, State::Terminated { exit_code: 0, .. })
    }
}

enum Phase {
    /// Network or volumes not ready yet (retried).
    Preparing,
    /// Containers are being run.
    Active,
}

struct PodRun {
    ctx: Arc<NodeCtx>,
    pod: Arc<Pod>,
    uid: String,
    namespace: String,
    name: String,
    dir: PathBuf,
    host_network: bool,
    netns: String,
    ip_host: Option<u8>,
    pod_ips: Vec<IpAddr>,
    network_ready: bool,
    volumes: Option<Volumes>,
    containers: Vec<Ctr>,
    phase: Phase,
    prepare_error: Option<String>,
    next_prepare: Instant,
    start_time: Timestamp,
    conditions: Vec<Condition>,
    terminating_until: Option<Instant>,
    last_status: Option<serde_json::Value>,
}

/// Runs one pod until it is removed or the node shuts down.
pub async fn run(ctx: Arc<NodeCtx>, mut events: watch::Receiver<PodEvent>) {
    let pod = match events.borrow_and_update().clone() {
        PodEvent::Present(p) => p,
        PodEvent::Gone | PodEvent::Shutdown => return,
    };
    let mut run = PodRun::new(ctx, pod);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = events.changed() => {
                let event = if changed.is_err() { PodEvent::Shutdown } else { events.borrow_and_update().clone() };
                match event {
                    PodEvent::Present(pod) => run.update(pod),
                    PodEvent::Gone | PodEvent::Shutdown => {
                        run.stop_local().await;
                        return;
                    }
                }
            }
            _ = tick.tick() => {
                if run.step().await {
                    run.stop_local().await;
                    run.delete_object().await;
                    return;
                }
                run.publish().await;
            }
        }
    }
}

impl PodRun {
    fn new(ctx: Arc<NodeCtx>, pod: Arc<Pod>) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        let netns = if host_network {
            ctx.node.netns.clone()
        } else {
            ctx.layout.pod_netns(&uid)
        };
        let classify_all = |cs: Vec<Container>, init: bool| {
            cs.into_iter()
                .map(|c| {
                    let runtime = classify(c.image.as_deref().unwrap_or_default(), &ctx.spec);
                    Ctr::new(c, runtime, init)
                })
                .collect::<Vec<_>>()
        };
        let mut containers = classify_all(spec.init_containers.unwrap_or_default(), true);
        containers.extend(classify_all(spec.containers, false));
        let t = now();
        PodRun {
            dir: ctx.layout.pods_dir().join(&uid),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid,
            host_network,
            netns,
            ip_host: None,
            pod_ips: vec![],
            network_ready: false,
            volumes: None,
            containers,
            phase: Phase::Preparing,
            prepare_error: None,
            next_prepare: Instant::now(),
            start_time: t,
            conditions: [
                "PodReadyToStartContainers",
                "Initialized",
                "ContainersReady",
                "Ready",
            ]
            .iter()
            .map(|ty| Condition {
                type_: (*ty).into(),
                status: false,
                since: t,
                reason: None,
            })
            .collect(),
            terminating_until: None,
            last_status: None,
            pod,
            ctx,
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    fn update(&mut self, pod: Arc<Pod>) {
        self.pod = pod;
        if self.deleting() && self.terminating_until.is_none() {
            let grace = self
                .pod
                .metadata
                .deletion_grace_period_seconds
                .unwrap_or(30)
                .max(0);
            tracing::info!(pod = %self.key(), grace, "terminating");
            self.terminating_until = Some(Instant::now() + Duration::from_secs(grace.unsigned_abs()));
            for c in &self.containers {
                // Programs get SIGTERM now; echo servers keep serving until the grace period ends.
                if matches!(c.runtime, Runtime::Binary(_))
                    && let Some(p) = &c.process
                {
                    p.signal(Signal::SIGTERM);
                }
            }
        }
    }

    /// One step of the state machine; true when the pod is finished and its object can go.
    async fn step(&mut self) -> bool {
        if let Some(until) = self.terminating_until {
            let all_stopped = self.containers.iter().all(|c| !c.running());
            if Instant::now() >= until || all_stopped || !matches!(self.phase, Phase::Active) {
                return true;
            }
        }
        if self
            .containers
            .iter()
            .any(|c| matches!(c.runtime, Runtime::Unavailable(_)))
        {
            return false;
        }
        if matches!(self.phase, Phase::Preparing) {
            if Instant::now() < self.next_prepare {
                return false;
            }
            match self.prepare().await {
                Ok(()) => {
                    self.phase = Phase::Active;
                    self.prepare_error = None;
                }
                Err(e) => {
                    tracing::warn!(pod = %self.key(), error = %e, "preparing the pod");
                    self.prepare_error = Some(e.to_string());
                    self.next_prepare = Instant::now() + Duration::from_secs(2);
                    return false;
                }
            }
        }
        self.refresh_tokens().await;
        self.reap();
        if self.terminating_until.is_none() {
            self.start_due().await;
        }
        self.probe().await;
        false
    }

    async fn prepare(&mut self) -> Result<()> {
        if !self.network_ready {
            if self.host_network {
                self.pod_ips = self.ctx.node.ips.clone();
            } else {
                let host = match self.ip_host {
                    Some(h) => h,
                    None => {
                        let h = self
                            .ctx
                            .allocate_ip()
                            .ok_or_else(|| Error::Failed("no free pod IP on this node".into()))?;
                        self.ip_host = Some(h);
                        h
                    }
                };
                let ips = self.ctx.node.pod_ips(host);
                // A half-made namespace from a failed attempt is removed first.
                network::detach_pod(&self.netns)?;
                network::attach_pod(&self.ctx.node, &self.netns, &self.uid, &ips).await?;
                self.pod_ips = ips;
            }
            self.network_ready = true;
        }
        let needs_volumes = self
            .containers
            .iter()
            .any(|c| matches!(c.runtime, Runtime::Binary(_)));
        if needs_volumes && self.volumes.is_none() {
            let facts = self.facts();
            self.volumes = Some(Volumes::materialize(&self.ctx.client, &self.pod, &facts, &self.dir).await?);
        }
        Ok(())
    }

    fn facts(&self) -> PodFacts {
        PodFacts {
            pod_ips: self.pod_ips.clone(),
            host_ips: self.ctx.node.ips.clone(),
        }
    }

    async fn refresh_tokens(&mut self) {
        if let Some(v) = &mut self.volumes
            && let Err(e) = v.refresh_tokens(&self.ctx.client, &self.pod).await
        {
            tracing::warn!(pod = %self.key(), error = %e, "refreshing service-account tokens");
        }
    }

    /// Records exits and schedules restarts.
    fn reap(&mut self) {
        let policy = self.restart_policy().to_owned();
        let terminating = self.terminating_until.is_some();
        for c in &mut self.containers {
            let Some(status) = c.process.as_ref().and_then(Process::exit_status) else {
                continue;
            };
            c.process = None;
            let exit_code = process::exit_code(status);
            let finished = now();
            let terminated = State::Terminated {
                exit_code,
                reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
                started_at: c.started_at.unwrap_or(finished),
                finished_at: finished,
            };
            tracing::info!(container = %c.spec.name, status = %process::describe_exit(status), "container exited");
            c.readiness = ProbeState::default();
            c.liveness = ProbeState::default();
            let restart = !terminating
                && match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => exit_code != 0,
                    _ => !c.init || exit_code != 0,
                };
            if restart {
                let backoff =
                    Duration::from_secs(1 << c.restart_count.clamp(0, 5)).min(Duration::from_secs(30));
                c.restart_at = Some(Instant::now() + backoff);
                c.last = Some(terminated);
                c.state = State::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: format!(
                        "back-off {}s restarting failed container {}",
                        backoff.as_secs(),
                        c.spec.name
                    ),
                };
            } else {
                c.state = terminated;
            }
        }
    }

    /// Starts the next init container, or every app container that is due (first start or restart).
    async fn start_due(&mut self) {
        let init_pending = self.containers.iter().position(|c| c.init && !c.exited_ok());
        let candidates: Vec<usize> = match init_pending {
            Some(i) => vec![i],
            None => (0..self.containers.len())
                .filter(|&i| !self.containers[i].init)
                .collect(),
        };
        for i in candidates {
            let c = &self.containers[i];
            let due = match c.restart_at {
                Some(at) => Instant::now() >= at,
                None => c.process.is_none() && matches!(c.state, State::Waiting { .. }),
            };
            if !due || c.running() {
                continue;
            }
            if let Err(e) = self.start(i).await {
                tracing::warn!(pod = %self.key(), error = %e, "starting a container");
                let c = &mut self.containers[i];
                c.state = State::Waiting {
                    reason: "CreateContainerError".into(),
                    message: e.to_string(),
                };
                c.restart_at = Some(Instant::now() + Duration::from_secs(2));
            }
        }
    }

    async fn start(&mut self, i: usize) -> Result<()> {
        let spec = &self.ctx.spec;
        let c = &self.containers[i];
        let log = self
            .ctx
            .layout
            .logs_dir()
            .join("pods")
            .join(format!("{}_{}_{}.log", self.namespace, self.name, c.spec.name));
        let command = match &c.runtime {
            Runtime::Echo => {
                let mut args = vec![
                    "echo-server".to_owned(),
                    "--pod".into(),
                    self.name.clone(),
                    "--node".into(),
                    self.ctx.node.name.clone(),
                ];
                let mut ports: Vec<i32> = c.spec.ports.iter().flatten().map(|p| p.container_port).collect();
                ports.sort_unstable();
                ports.dedup();
                for p in ports {
                    args.extend(["--port".to_owned(), p.to_string()]);
                }
                Command {
                    program: spec.harness_bin.clone(),
                    args,
                    env: vec![
                        ("PATH".into(), env::PATH.into()),
                        ("RUST_LOG".into(), "info".into()),
                    ],
                    clear_env: true,
                    netns: Some(self.netns.clone()),
                    cwd: None,
                }
            }
            Runtime::Binary(binary) => {
                let volumes = self
                    .volumes
                    .as_ref()
                    .ok_or_else(|| Error::Failed("volumes not ready".into()))?;
                let mounts = volumes.mounts(&c.spec)?;
                let base = env::base(&self.pod, &self.ctx.node.name, self.ctx.apiserver);
                let environment =
                    env::resolve(&self.ctx.client, &self.pod, &c.spec, &self.facts(), base).await?;
                let vars = environment.iter().cloned().collect();
                let mut argv: Vec<String> = vec![binary.display().to_string()];
                if let Some(cmd) = c.spec.command.as_ref().filter(|c| !c.is_empty()) {
                    argv.extend(cmd.iter().skip(1).map(|a| env::expand(a, &vars)));
                }
                argv.extend(c.spec.args.iter().flatten().map(|a| env::expand(a, &vars)));
                let scratch = self
                    .dir
                    .join("scratch")
                    .join(format!("{}-{}", c.spec.name, c.restart_count));
                std::fs::create_dir_all(&scratch).map_err(|source| Error::Io {
                    context: format!("creating {}", scratch.display()),
                    source,
                })?;
                let mounts_json = serde_json::to_string(&mounts).map_err(|source| Error::Json {
                    context: "encoding mounts".into(),
                    source,
                })?;
                let mut args = vec![
                    "pod-exec".to_owned(),
                    "--scratch".into(),
                    scratch.display().to_string(),
                    "--mounts".into(),
                    mounts_json,
                ];
                if let Some(wd) = &c.spec.working_dir {
                    args.extend(["--workdir".to_owned(), wd.clone()]);
                }
                args.push("--".into());
                args.extend(argv);
                Command {
                    program: spec.harness_bin.clone(),
                    args,
                    env: environment,
                    clear_env: true,
                    netns: Some(self.netns.clone()),
                    cwd: None,
                }
            }
            Runtime::Unavailable(m) => return Err(Error::Failed(m.clone())),
        };
        let name = format!("{}/{}", self.key(), c.spec.name);
        let process = Process::spawn(&name, &command, &log)?;
        let c = &mut self.containers[i];
        if c.restart_at.take().is_some() {
            c.restart_count += 1;
        }
        let started = now();
        c.started_at = Some(started);
        c.state = State::Running { started_at: started };
        c.process = Some(process);
        let delay = |p: Option<&Probe>| {
            Instant::now()
                + Duration::from_secs(
                    p.and_then(|p| p.initial_delay_seconds)
                        .unwrap_or(0)
                        .max(0)
                        .unsigned_abs()
                        .into(),
                )
        };
        c.readiness.next = Some(delay(c.spec.readiness_probe.as_ref()));
        c.liveness.next = Some(delay(c.spec.liveness_probe.as_ref()));
        tracing::info!(pod = %name, netns = %self.netns, "container started");
        Ok(())
    }

    /// Runs the readiness and liveness probes that are due, concurrently.
    async fn probe(&mut self) {
        let target_ip = self.pod_ips.first().copied();
        let Some(ip) = target_ip else { return };
        let mut checks = vec![];
        for (i, c) in self.containers.iter().enumerate() {
            if !c.running() {
                continue;
            }
            for (liveness, probe, state) in [
                (false, c.spec.readiness_probe.as_ref(), &c.readiness),
                (true, c.spec.liveness_probe.as_ref(), &c.liveness),
            ] {
                let Some(probe) = probe else { continue };
                if state.next.is_none_or(|t| Instant::now() < t) {
                    continue;
                }
                let check = check_probe(self.netns.clone(), ip, probe.clone(), c.spec.clone());
                checks.push(async move { (i, liveness, check.await) });
            }
        }
        if checks.is_empty() {
            return;
        }
        for (i, liveness, ok) in futures::future::join_all(checks).await {
            let c = &mut self.containers[i];
            let probe = if liveness {
                c.spec.liveness_probe.clone()
            } else {
                c.spec.readiness_probe.clone()
            };
            let Some(probe) = probe else { continue };
            let state = if liveness {
                &mut c.liveness
            } else {
                &mut c.readiness
            };
            let period = probe.period_seconds.unwrap_or(10).max(1).unsigned_abs();
            state.next = Some(Instant::now() + Duration::from_secs(period.into()));
            if ok {
                state.successes += 1;
                state.failures = 0;
                if state.successes >= probe.success_threshold.unwrap_or(1).max(1) {
                    state.ok = true;
                }
            } else {
                state.failures += 1;
                state.successes = 0;
                if state.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                    state.ok = false;
                    if liveness {
                        tracing::info!(container = %c.spec.name, "liveness probe failed, restarting");
                        if let Some(p) = &c.process {
                            p.signal(Signal::SIGKILL);
                        }
                        state.failures = 0;
                    }
                }
            }
        }
    }

    fn container_ready(&self, c: &Ctr) -> bool {
        if !c.running() {
            return false;
        }
        if c.spec.readiness_probe.is_some() && !c.readiness.ok {
            return false;
        }
        if matches!(c.runtime, Runtime::Echo) {
            if annotation(&self.pod, READY_ANNOTATION) == Some("false") {
                return false;
            }
            if self.terminating_until.is_some()
                && annotation(&self.pod, TERMINATING_READY_ANNOTATION) == Some("false")
            {
                return false;
            }
        }
        true
    }

    fn view(&mut self) -> PodView {
        let apps: Vec<&Ctr> = self.containers.iter().filter(|c| !c.init).collect();
        let initialized = self.containers.iter().filter(|c| c.init).all(Ctr::exited_ok);
        let all_ready = initialized && apps.iter().all(|c| self.container_ready(c));
        let all_done = apps.iter().all(|c| matches!(c.state, State::Terminated { .. }));
        let init_failed = self.containers.iter().any(|c| {
            c.init
                && c.restart_at.is_none()
                && matches!(c.state, State::Terminated { exit_code, .. } if exit_code != 0)
        });
        let phase = if init_failed {
            "Failed"
        } else if all_done && !apps.is_empty() {
            if apps.iter().all(|c| c.exited_ok()) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if initialized && apps.iter().any(|c| c.running() || c.restart_at.is_some()) {
            "Running"
        } else {
            "Pending"
        };
        let t = now();
        let wanted = [
            ("PodReadyToStartContainers", self.network_ready, None),
            ("Initialized", initialized, Some("ContainersNotInitialized")),
            ("ContainersReady", all_ready, Some("ContainersNotReady")),
            ("Ready", all_ready, Some("ContainersNotReady")),
        ];
        for (ty, status, reason) in wanted {
            if let Some(c) = self.conditions.iter_mut().find(|c| c.type_ == ty)
                && c.status != status
            {
                c.status = status;
                c.since = t;
                c.reason = if status { None } else { reason.map(str::to_owned) };
            }
        }
        let prepare_error = self.prepare_error.clone();
        let view_of = |c: &Ctr| ContainerView {
            name: c.spec.name.clone(),
            image: c.spec.image.clone().unwrap_or_default(),
            ready: self.container_ready(c),
            restart_count: c.restart_count,
            state: match (&c.state, &prepare_error) {
                (State::Waiting { reason, .. }, Some(err)) if reason != "ErrImagePull" => State::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: err.clone(),
                },
                (s, _) => s.clone(),
            },
            last: c.last.clone(),
        };
        PodView {
            phase: phase.into(),
            conditions: self.conditions.clone(),
            pod_ips: if self.network_ready {
                self.pod_ips.clone()
            } else {
                vec![]
            },
            host_ips: self.ctx.node.ips.clone(),
            start_time: self.start_time,
            init_containers: self.containers.iter().filter(|c| c.init).map(view_of).collect(),
            containers: self.containers.iter().filter(|c| !c.init).map(view_of).collect(),
        }
    }

    /// Applies the status when it changed.
    async fn publish(&mut self) {
        let view = self.view();
        let body = apply_body(&self.namespace, &self.name, &self.uid, &view);
        if self.last_status.as_ref() == Some(&body) {
            return;
        }
        let api = Api::<Pod>::namespaced(self.ctx.client.clone(), &self.namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch_status(&self.name, &params, &Patch::Apply(&body)).await {
            Ok(_) => self.last_status = Some(body),
            Err(e) => tracing::warn!(pod = %self.key(), error = %e, "updating pod status"),
        }
    }

    /// Stops every process and removes the pod's namespace and folder (not the API object).
    async fn stop_local(&mut self) {
        for c in &mut self.containers {
            if let Some(mut p) = c.process.take() {
                p.stop(Duration::ZERO).await;
            }
        }
        if !self.host_network
            && self.network_ready
            && let Err(e) = network::detach_pod(&self.netns)
        {
            tracing::warn!(pod = %self.key(), error = %e, "removing the pod namespace");
        }
        if !self.host_network {
            // A namespace left by an interrupted setup goes too.
            let _ = network::detach_pod(&self.netns);
        }
        if let Some(host) = self.ip_host.take() {
            self.ctx.release_ip(host);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Removes the pod object now that it has terminated (as the kubelet does, with no grace period).
    async fn delete_object(&self) {
        let api = Api::<Pod>::namespaced(self.ctx.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&self.name, &params).await {
            Ok(_) => tracing::info!(pod = %self.key(), "removed"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(pod = %self.key(), error = %e, "removing the pod object"),
        }
    }
}

/// Runs one probe: HTTP GET (2xx/3xx passes) or TCP connect, from inside the pod's namespace. Exec and
/// gRPC probes pass (nothing here can run them).
async fn check_probe(netns: String, pod_ip: IpAddr, probe: Probe, container: Container) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1).unsigned_abs().into());
    let port = |p: &IntOrString| -> Option<u16> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        }
    };
    let host = |h: &Option<String>| {
        h.as_deref()
            .and_then(|h| h.parse::<IpAddr>().ok())
            .unwrap_or(pod_ip)
    };
    if let Some(http) = &probe.http_get {
        let Some(p) = port(&http.port) else { return false };
        let addr = SocketAddr::new(host(&http.host), p);
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        matches!(probe::http_get(&netns, addr, &path, timeout).await, Ok((code, _)) if (200..400).contains(&code))
    } else if let Some(tcp) = &probe.tcp_socket {
        let Some(p) = port(&tcp.port) else { return false };
        probe::tcp_open(&netns, SocketAddr::new(host(&tcp.host), p), timeout).await
    } else {
        true
    }
}
