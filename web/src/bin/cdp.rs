//! `cdp`: parses arguments, sets up tracing (stderr), and calls the library (`web::cli`,
//! `web::demo`). Nothing else lives here; it must never hold logic a test cannot reach.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use web::cli::{Cli, Command, EXIT_ERROR};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cdp: starting the async runtime: {err}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let env = |name: &str| std::env::var_os(name);
    // Each command writes its output with one `write_all`.
    let mut stdout = std::io::stdout();
    let done = match &cli.command {
        Command::Status(args) => {
            runtime.block_on(web::cli::status(&cli.api, args, &env, &mut stdout))
        }
        Command::Checkpoint(args) => {
            runtime.block_on(web::cli::checkpoint(&cli.api, args, &env, &mut stdout))
        }
        Command::Checkpoints(args) => {
            runtime.block_on(web::cli::checkpoints(&cli.api, args, &env, &mut stdout))
        }
        Command::View(command) => {
            runtime.block_on(web::cli::view(&cli.api, command, &env, &mut stdout))
        }
        Command::Pause(args) => {
            runtime.block_on(web::cli::pause(&cli.api, args, &env, &mut stdout))
        }
        Command::Resume(args) => {
            runtime.block_on(web::cli::resume(&cli.api, args, &env, &mut stdout))
        }
        Command::Throttle(args) => {
            runtime.block_on(web::cli::throttle(&cli.api, args, &env, &mut stdout))
        }
        Command::Demo(args) => {
            return match runtime.block_on(demo(args.clone())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("cdp demo: {err:#}");
                    ExitCode::from(EXIT_ERROR)
                }
            };
        }
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cdp: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

async fn demo(args: web::cli::DemoArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the cdp executable")?;
    let bin_dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?
        .to_owned();
    let config = web::demo::DemoConfig::new(args.dir, bin_dir);
    let stop = stop_signal().context("installing signal handlers")?;
    let mut stdout = std::io::stdout();
    web::demo::run(&config, &mut stdout, stop).await?;
    Ok(())
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
