//! The `verger` command line: its grammar ([`args`]) and one module per subcommand. Thin: the
//! work is in the library.

pub mod args;
pub mod bench;
pub mod demo;
pub mod inspect;
pub mod model;
pub mod progress;
pub mod report;
pub mod run;
pub mod train;
pub mod tuning;

/// Everything committed in `output` (a directory or s3://), read through its manifests; `side`
/// names it in errors ("input" for the commands that read an output as their input).
pub fn read_committed(
    output: &str,
    store: &args::StoreArgs,
    side: &'static str,
) -> anyhow::Result<verger::sink::reader::Table> {
    let runtime = tokio::runtime::Runtime::new()?;
    let store = runtime
        .block_on(verger::storage::open(output, false, &store.options()))
        .map_err(|e| e.on_side(side))?;
    Ok(runtime.block_on(verger::sink::reader::read_table(store.as_ref()))?)
}
