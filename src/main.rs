//! The `verger` binary: parses the command line, runs the subcommand, turns its ending into
//! an exit code and a failure into one line on stderr.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use cli::args::{Cli, Command, LogFormat, ModelCommand};
use cli::run::{Ending, Service};
use tracing_subscriber::EnvFilter;
use verger::cluster::Cluster;
use verger::source::{KeyFilter, Mode};

/// Log filter without VERGER_LOG: warnings, but not the AWS SDK's own (Debug dumps of every
/// retried request and of each credential source tried); verger reports S3 trouble itself, in
/// one line per outage and one error naming the cause.
const DEFAULT_LOG: &str =
    "warn,aws_config=error,aws_smithy_runtime=error,aws_smithy_runtime_api=error,aws_sdk_s3=error";

/// Exit code of a usage error (clap's own).
const USAGE_EXIT_CODE: u8 = 2;

/// Exit code of a batch run whose input held nothing to process.
const EMPTY_INPUT_EXIT_CODE: u8 = 4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run(args) = &cli.command {
        let engine = &args.engine;
        if let Err(e) = cli::tuning::check_worker_count(engine.workers, engine.oversubscribe) {
            eprintln!("verger: error: {e}");
            return ExitCode::from(USAGE_EXIT_CODE);
        }
    }
    let filter =
        EnvFilter::try_from_env("VERGER_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // Not locked for the whole run: a thread printing meanwhile would wait on the lock for ever.
    let mut stdout = std::io::stdout();
    let result = dispatch(cli.command, &mut stdout).and_then(|ending| {
        stdout.flush()?;
        Ok(ending)
    });
    match result {
        Ok(Ending::Done) => ExitCode::SUCCESS,
        Ok(Ending::Empty) => ExitCode::from(EMPTY_INPUT_EXIT_CODE),
        Ok(Ending::Interrupted(signal)) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
        // The reader went away (`verger inspect OUT | head -1`): nothing left to tell anyone.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::debug!("{e:?}");
            eprintln!("verger: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command, out: &mut dyn Write) -> Result<Ending> {
    match command {
        Command::Run(args) => {
            let filter = KeyFilter::new(&args.include, &args.exclude)
                .context("bad --include/--exclude glob")?;
            let c = &args.cluster;
            let cluster = Cluster::new(c.processes, c.process, c.hostfile.as_deref())?;
            let service = Service {
                mode: match args.watch {
                    true => Mode::Watch {
                        poll_interval: args.poll_interval,
                    },
                    false => Mode::Once,
                },
                metrics_addr: args.metrics_addr,
                progress: !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                connect_timeout: c.connect_timeout,
                allow_empty: args.allow_empty,
                keep_deleted: args.keep_deleted,
                head: args.head.clone(),
            };
            cli::run::run_job(
                out,
                (&args.input, &args.output, &args.prefix),
                filter,
                &args.engine,
                cluster,
                service,
            )
        }
        Command::Demo(args) => cli::demo::demo(out, &args),
        Command::Model(ModelCommand::Fetch(args)) => {
            cli::model::fetch(out, &args)?;
            Ok(Ending::Done)
        }
        Command::Model(ModelCommand::Calibrate(args)) => {
            cli::model::calibrate(out, &args)?;
            Ok(Ending::Done)
        }
        Command::Model(ModelCommand::List { model_dir }) => {
            cli::model::list(out, model_dir.as_deref())?;
            Ok(Ending::Done)
        }
        Command::Bench(args) => cli::bench::bench(out, &args).map(|()| Ending::Done),
        Command::Inspect {
            output,
            version,
            store,
            splits,
        } => cli::inspect::inspect(out, (&output, version), &store, &splits.splits())
            .map(|()| Ending::Done),
        Command::Train(args) => cli::train::train(
            out,
            (&args.input, args.version, &args.output),
            &args.store,
            &args.splits.splits(),
            &args.config(),
        )
        .map(|()| Ending::Done),
        Command::Report {
            output,
            html,
            metrics,
            max_points,
            version,
            store,
            splits,
        } => cli::report::report(
            out,
            (&output, version, &html),
            &store,
            metrics.as_deref(),
            (max_points, &splits.splits()),
        )
        .map(|()| Ending::Done),
    }
}

/// Whether `e` comes from writing to a pipe whose reader has gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, leaving out a cause the text already holds (typed
/// errors often print their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    verger::storage::error_chain(e.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("out/x: {source}")]
    struct Repeats {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = anyhow::Error::new(Repeats {
            source: std::io::Error::other("not a directory"),
        })
        .context("opening the output");
        assert_eq!(one_line(&e), "opening the output: out/x: not a directory");
    }

    #[test]
    fn a_closed_pipe_is_recognised_through_context() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("printing");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
