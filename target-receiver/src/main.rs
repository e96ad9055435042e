//! `cdp-receiver`: parses arguments, sets up tracing (stderr), and initialises the data
//! directory, prints a pairing bundle, or runs the appliance until SIGINT or SIGTERM.
//! Nothing else lives here.

use anyhow::Context;
use clap::Parser;
use target_receiver::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Init(args) => {
            let summary = target_receiver::appliance::init(&args.data_dir)
                .with_context(|| format!("initialising {}", args.data_dir.display()))?;
            let verb = if summary.created {
                "initialised"
            } else {
                "already initialised"
            };
            println!("appliance {verb} in {}", args.data_dir.display());
            println!("certificate fingerprint: {}", summary.fingerprint);
            println!("API token: {}", summary.token_path.display());
            Ok(())
        }
        Command::Pair(args) => {
            let bundle = target_receiver::cli::pair(&args).with_context(|| {
                format!("making a pairing bundle in {}", args.data_dir.display())
            })?;
            print!("{bundle}");
            eprintln!(
                "pairing bundle valid for {}s: carry it to the agent and run `cdp-agent pair --data-dir DIR --bundle FILE`",
                args.expires.as_secs()
            );
            Ok(())
        }
        Command::Run(args) => {
            let config = args.into_config();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let stop = stop_signal().context("installing signal handlers")?;
                target_receiver::run(config, stop)
                    .await
                    .context("cdp-receiver run")
            })
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}
