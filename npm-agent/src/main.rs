//! npm-agent entry point: CLI parsing, logging, and the verbs. anyhow lives only here and in
//! `cli/` (the edge).
use clap::Parser;
use npm_agent::cli::{
    self,
    args::{Cli, Command},
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(async move {
        match args.command {
            Command::Run(a) => cli::run::run(a).await.map(|()| 0),
            Command::Compile(a) => cli::compile::run(a),
            Command::Explain(a) => cli::explain::run(a),
            Command::Uninstall(a) => cli::uninstall::run(a),
            Command::Status(a) => cli::status::run(a),
            Command::Monitor(a) => cli::monitor::run(a),
            Command::Lab(a) => {
                let job = tokio::task::spawn_blocking(move || cli::lab::run(a));
                tokio::select! {
                    r = job => r?,
                    _ = tokio::signal::ctrl_c() => {
                        cli::lab::cleanup_leftovers();
                        eprintln!("interrupted; lab removed");
                        Ok(130)
                    }
                }
            }
        }
    })?;
    std::process::exit(code);
}
