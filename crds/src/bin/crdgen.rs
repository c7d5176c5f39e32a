//! Writes the CRD manifests into a directory (default: the `crds/` folder of the source tree).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for (file, crd) in switchyard_api::crd::all() {
        let path = dir.join(file);
        std::fs::write(&path, switchyard_api::crd::to_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    // The configuration reference sits in docs/ of the source tree, or beside the CRDs when a directory is given.
    let docs = match std::env::args().nth(1) {
        Some(_) => dir.join("configuration.md"),
        None => dir.join("../docs/configuration.md"),
    };
    std::fs::write(&docs, switchyard_api::crd::configuration_reference())?;
    println!("wrote {}", docs.display());
    Ok(())
}
