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

/// Everything committed in `output` (a directory or s3://), read through its Delta table
/// (at Delta version `version`, or the latest); `side`
/// names it in errors ("input" for the commands that read an output as their input). A
/// location with no committed epoch is an error saying what it holds instead: nothing, files
/// that are not verger's, or a run that committed nothing yet.
pub fn read_committed(
    output: &str,
    store: &args::StoreArgs,
    side: &'static str,
    version: Option<u64>,
) -> anyhow::Result<verger::sink::reader::Table> {
    let runtime = tokio::runtime::Runtime::new()?;
    let options = store.options();
    let store = runtime
        .block_on(verger::storage::open(output, false, &options))
        .map_err(|e| e.on_side(side))?;
    let delta = verger::commit::DeltaOutput::of(store.as_ref(), &options)?;
    let store = runtime.block_on(async { delta.files(store, &options) })?;
    let table = runtime.block_on(verger::sink::reader::read_table(
        store.as_ref(),
        &delta,
        version,
    ))?;
    if table.commits.is_empty() {
        let page = runtime.block_on(store.list_page("", None, 1000))?;
        let what = match page
            .objects
            .iter()
            .find(|o| !verger::dataflow::is_output_key(&o.key))
        {
            _ if page.objects.is_empty() => "is empty".to_string(),
            Some(o) => format!(
                "is not a verger output (it holds {}, and no Delta table)",
                o.key
            ),
            None => {
                "has no committed epoch yet (a run started there committed nothing)".to_string()
            }
        };
        anyhow::bail!("{side} {output} {what}");
    }
    Ok(table)
}
