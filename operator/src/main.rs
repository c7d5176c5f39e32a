//! The Switchyard operator's entry point. The reconcile pipeline lands with the operator issue; until then
//! the binary only reports what it is, so the workspace builds and ships one binary per component.

fn main() {
    println!("switchyard-operator {}", env!("CARGO_PKG_VERSION"));
}
