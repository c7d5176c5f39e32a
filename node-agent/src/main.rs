//! The Switchyard node agent's entry point.

fn main() {
    println!("switchyard-agent {}", env!("CARGO_PKG_VERSION"));
}
