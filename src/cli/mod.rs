//! The `verger` command line: its grammar ([`args`]), what each subcommand does
//! ([`commands`]) and the progress bar ([`progress`]). Thin: the work is in the library.

pub mod args;
pub mod commands;
pub mod progress;
