//! The operator CLI: one file per verb on top of the library. Flags and `--json` field names are
//! a contract with users' scripts: extend them, never rename them.
pub mod args;
pub mod compile;
pub mod explain;
pub mod lab;
pub mod monitor;
pub mod run;
pub mod status;
pub mod steps;
pub mod uninstall;
