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
