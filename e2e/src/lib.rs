//! Switchyard's local cluster for end-to-end tests and the demo: a real Kubernetes control plane
//! (upstream etcd, kube-apiserver, kube-controller-manager, kube-scheduler, built by
//! `e2e/upstream/build.sh`) and simulated nodes in network namespaces that run the pods bound to them.
//! See e2e/README.md for the picture, the commands and the test images.
//!
//! The crate owns only what it creates: network namespaces named `swyd-<cluster>-*`, processes inside
//! them, and the state folder `<root>/swyd-cluster-<cluster>`. It never changes the host's own network
//! namespace or mounts (containers get private mount namespaces).

pub mod bench;
pub mod cleanup;
pub mod cli;
pub mod cluster;
pub mod controlplane;
pub mod echo;
pub mod error;
pub mod forward;
pub mod kubeconfig;
pub mod layout;
pub mod netns;
pub mod network;
pub mod node;
pub mod pki;
pub mod podexec;
pub mod probe;
pub mod process;
pub mod supervisor;
pub mod testing;
pub mod tools;

pub use cluster::{Cluster, ReadyInfo};
pub use error::{Error, Result};
pub use layout::{ClusterSpec, Layout};
