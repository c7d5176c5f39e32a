//! What runs for a container image. There is no container runtime: a few images map to programs on this
//! machine, and every other image fails to "pull" with a message that says which images exist.
//!
//! | image | runs |
//! |---|---|
//! | `switchyard.dev/echo:<tag>` | the echo server ([`crate::echo`]) in the pod's namespace |
//! | `switchyard.dev/e2e:<tag>` | this harness's binary with the container's args (test tools) |
//! | any name containing `switchyard-agent` | the locally built `switchyard-agent` |
//! | any name containing `switchyard-operator` | the locally built `switchyard-operator` |

use std::path::{Path, PathBuf};

use crate::echo::ECHO_IMAGE;
use crate::layout::ClusterSpec;

/// Repository of the harness's own image.
pub const TOOL_IMAGE: &str = "switchyard.dev/e2e";

/// How a container's image is run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// The echo server.
    Echo,
    /// A local program, started with the container's command and args as a process.
    Binary(PathBuf),
    /// Cannot run: `ErrImagePull` with this message.
    Unavailable(String),
}

/// The image without tag or digest: `reg.io/a/b:1.0@sha256:..` -> `reg.io/a/b`.
pub fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

/// Decides what runs for `image`.
pub fn classify(image: &str, spec: &ClusterSpec) -> Runtime {
    let repo = repository(image);
    if repo == ECHO_IMAGE {
        return Runtime::Echo;
    }
    if repo == TOOL_IMAGE {
        return local(
            &spec.harness_bin,
            "switchyard-e2e",
            "cargo build -p switchyard-e2e",
        );
    }
    if image.contains("switchyard-agent") {
        return local(
            &spec.agent_bin,
            "switchyard-agent",
            "cargo build -p switchyard-agent, or set SWITCHYARD_AGENT_BIN",
        );
    }
    if image.contains("switchyard-operator") {
        return local(
            &spec.operator_bin,
            "switchyard-operator",
            "cargo build -p switchyard-operator, or set SWITCHYARD_OPERATOR_BIN",
        );
    }
    Runtime::Unavailable(format!(
        "image {image:?} cannot run on a simulated node (there is no container runtime); \
         use {ECHO_IMAGE}:<tag> for test workloads, {TOOL_IMAGE}:<tag> for the harness's tools, \
         or an image whose name contains switchyard-agent or switchyard-operator"
    ))
}

fn local(path: &Path, what: &str, how: &str) -> Runtime {
    if path.is_file() {
        Runtime::Binary(path.to_owned())
    } else {
        Runtime::Unavailable(format!(
            "the {what} binary is not built: {} is missing ({how})",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ClusterSpec {
        let mut spec = ClusterSpec::new("t", 1, PathBuf::from("/proc/self/exe")).unwrap();
        spec.agent_bin = PathBuf::from("/proc/self/exe");
        spec.operator_bin = PathBuf::from("/nonexistent/switchyard-operator");
        spec
    }

    #[test]
    fn repositories_drop_tags_and_digests_but_keep_registry_ports() {
        assert_eq!(repository("switchyard.dev/echo:test"), "switchyard.dev/echo");
        assert_eq!(repository("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(repository("localhost:5000/a/b:1@sha256:ab"), "localhost:5000/a/b");
        assert_eq!(repository("nginx"), "nginx");
    }

    #[test]
    fn images_map_to_echo_local_binaries_or_a_pull_error() {
        let spec = spec();
        assert_eq!(classify("switchyard.dev/echo:test", &spec), Runtime::Echo);
        assert_eq!(
            classify("ghcr.io/switchyard-dev/switchyard-agent:0.1.0", &spec),
            Runtime::Binary("/proc/self/exe".into())
        );
        assert!(
            matches!(classify("switchyard-operator:dev", &spec), Runtime::Unavailable(m) if m.contains("not built"))
        );
        assert!(
            matches!(classify("nginx:1.27", &spec), Runtime::Unavailable(m) if m.contains("no container runtime"))
        );
    }
}
