//! `switchyard-e2e`: see `switchyard-e2e --help` and e2e/README.md.

fn main() -> anyhow::Result<()> {
    switchyard_e2e::cli::main()
}
