//! `cdp-agent`: parses arguments, sets up tracing (stderr), and runs the agent library until
//! SIGINT or SIGTERM (SIGHUP re-reads the throttle), pairs with an appliance, or replays a journal. Nothing else lives here.

use anyhow::Context;
use clap::Parser;
use source_agent::cli::{Cli, Command};

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
        Command::Run(args) => {
            let config_file = args.config.clone();
            let config = args.into_config().context("reading the configuration")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let stop = stop_signal().context("installing signal handlers")?;
                source_agent::run(config, config_file, stop)
                    .await
                    .context("cdp-agent run")
            })
        }
        Command::Pair(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let appliance = runtime
                .block_on(source_agent::cli::pair(&args))
                .with_context(|| format!("pairing with the bundle {}", args.bundle.display()))?;
            let addrs: Vec<String> = appliance.addrs.iter().map(ToString::to_string).collect();
            println!(
                "paired with appliance {} ({}) at {}",
                appliance.name.as_str(),
                appliance.fingerprint,
                addrs.join(", ")
            );
            println!(
                "replicate with: cdp-agent run --data-dir {} --target {} ...",
                args.data_dir.display(),
                addrs.first().map_or("ADDR", String::as_str)
            );
            Ok(())
        }
        Command::Replay(args) => {
            let (disk, out) = source_agent::config::parse_disk_flag(&args.disk)?;
            let summary = source_agent::replay::replay(
                &args.data_dir,
                &disk,
                &out,
                args.base.as_deref(),
                &mut |line| eprintln!("{line}"),
            )
            .with_context(|| format!("replaying disk {disk} from {}", args.data_dir.display()))?;
            eprintln!(
                "replayed disk {disk}: {} records, {} bytes written to {}",
                summary.records,
                summary.bytes,
                out.display()
            );
            Ok(())
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
