//! `switchyard-e2e pod-exec`: the container wrapper. It runs under `ip netns exec`, which already gave
//! it a private mount namespace (mounts made here never reach the host), mounts the pod's volumes at
//! their `mountPath`s and then replaces itself with the container's program.
//!
//! A mount target that does not exist on the host (such as `/var/run/secrets/kubernetes.io/
//! serviceaccount`) is made without touching the host: its nearest existing parent folder gets an
//! overlay whose writable layer is a tmpfs private to this process, and the target is created in it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use crate::error::{Error, IoContext, Result};
use crate::node::volumes::Mount;

/// Mounts `mounts` (creating targets under overlays in `scratch`), changes to `workdir` and execs
/// `command`. Only returns on failure.
pub fn run(scratch: &Path, mounts: &[Mount], workdir: Option<&Path>, command: &[String]) -> Result<()> {
    let mut overlays: Vec<PathBuf> = vec![];
    for m in mounts {
        let is_dir = m.source.is_dir();
        let target = ensure_target(&m.target, is_dir, scratch, &mut overlays)?;
        mount(
            Some(&m.source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .ctx(|| format!("bind-mounting {} on {}", m.source.display(), target.display()))?;
        if m.read_only {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .ctx(|| format!("making {} read-only", target.display()))?;
        }
    }
    if let Some(dir) = workdir {
        std::env::set_current_dir(dir).ctx(|| format!("changing to {}", dir.display()))?;
    }
    let (program, args) = command
        .split_first()
        .ok_or_else(|| Error::Invalid("pod-exec needs a command".into()))?;
    let err = std::process::Command::new(program).args(args).exec();
    Err(Error::Io {
        context: format!("executing {program}"),
        source: err,
    })
}

/// Makes `target` exist (as a folder or an empty file) without writing to the host's file systems;
/// returns its canonical path.
fn ensure_target(
    target: &Path,
    is_dir: bool,
    scratch: &Path,
    overlays: &mut Vec<PathBuf>,
) -> Result<PathBuf> {
    if !target.is_absolute() {
        return Err(Error::Invalid(format!(
            "mountPath {} is not absolute",
            target.display()
        )));
    }
    if target.exists() {
        return std::fs::canonicalize(target).ctx(|| format!("resolving {}", target.display()));
    }
    let mut ancestor = target.parent();
    while let Some(a) = ancestor {
        if a.exists() {
            break;
        }
        ancestor = a.parent();
    }
    let ancestor = ancestor.unwrap_or(Path::new("/"));
    let real_ancestor =
        std::fs::canonicalize(ancestor).ctx(|| format!("resolving {}", ancestor.display()))?;
    let rest = target.strip_prefix(ancestor).unwrap_or(target);
    let real_target = real_ancestor.join(rest);
    if !overlays.iter().any(|o| real_ancestor.starts_with(o)) {
        if real_ancestor == Path::new("/") {
            return Err(Error::Invalid(format!(
                "mountPath {}: no parent folder exists on the host to overlay",
                target.display()
            )));
        }
        let layer = scratch.join(overlays.len().to_string());
        std::fs::create_dir_all(&layer).ctx(|| format!("creating {}", layer.display()))?;
        mount(
            Some("swyd-scratch"),
            &layer,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        )
        .ctx(|| format!("mounting a tmpfs on {}", layer.display()))?;
        let (upper, work) = (layer.join("upper"), layer.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir(d).ctx(|| format!("creating {}", d.display()))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            real_ancestor.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("swyd-overlay"),
            &real_ancestor,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .ctx(|| format!("overlaying {}", real_ancestor.display()))?;
        overlays.push(real_ancestor);
    }
    if is_dir {
        std::fs::create_dir_all(&real_target).ctx(|| format!("creating {}", real_target.display()))?;
    } else {
        if let Some(parent) = real_target.parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&real_target, b"").ctx(|| format!("creating {}", real_target.display()))?;
    }
    Ok(real_target)
}
