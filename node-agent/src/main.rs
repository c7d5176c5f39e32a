//! `switchyard-agent`: see `switchyard-agent --help`.

fn main() -> anyhow::Result<()> {
    switchyard_agent::cli::main()
}
