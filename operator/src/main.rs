//! `switchyard-operator`: see `switchyard-operator --help`.

fn main() -> anyhow::Result<()> {
    switchyard_operator::cli::main()
}
