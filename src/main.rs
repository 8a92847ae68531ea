//! The `cerbas` binary: flags, logging and signals, the only code with
//! process-wide effects. It registers the example functions of `functions.rs`
//! and hands over to [`cerbas::run`]; `cerbas cron check|list` print a CRONTAB's
//! report instead (`cerbas::cron`).

mod functions;

use cerbas::{Config, Env, Overrides, Registry, Shutdown};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs Rust functions for requests clients put into Redis.
#[derive(Parser, Debug)]
#[command(name = "cerbas", version, about)]
struct Cli {
    /// Configuration file [default: cerbas.toml if it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Redis URL, e.g. redis://:password@127.0.0.1:6379 (overrides CERBAS_REDIS_URL)
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// dev (db 1) or prod (db 8) unless the URL names a db (overrides CERBAS_ENV)
    #[arg(long, value_parser = ["dev", "prod"])]
    env: Option<String>,
    /// Worker threads
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// The cron file; "" for none (cron off)
    #[arg(long, value_name = "PATH", value_parser = any_path)]
    crontab: Option<PathBuf>,
    /// Address of the HTTP plug, e.g. 127.0.0.1:4455
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Without one, the server runs.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check or list a CRONTAB
    #[command(subcommand)]
    Cron(CronCommand),
}

#[derive(Subcommand, Debug)]
enum CronCommand {
    /// Report every bad line (number, reason, line); exit 1 if there is one
    Check {
        /// The file [default: the configuration's crontab]
        path: Option<PathBuf>,
    },
    /// Print each entry with its next three runs and, if Redis answers, its last outcome
    List {
        /// The file [default: the configuration's crontab]
        path: Option<PathBuf>,
    },
}

/// A path as given, "" included (clap's own path parser refuses "", which here
/// means "none", as `crontab = ""` does in the configuration).
fn any_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// `cerbas cron check|list`: prints the report on stdout.
fn cron_command(config: &Config, command: &CronCommand) -> ExitCode {
    let mut registry = Registry::new();
    functions::register(&mut registry);
    registry.apply_config(&config.functions);
    let known = cerbas::cron::Known::new(config, &registry);
    let (CronCommand::Check { path } | CronCommand::List { path }) = command;
    let path = path.clone().unwrap_or_else(|| config.crontab.clone());
    if path.as_os_str().is_empty() {
        eprintln!("cerbas: no crontab given (the configuration says crontab = \"\")");
        return ExitCode::from(2);
    }
    let report = match command {
        CronCommand::Check { .. } => {
            cerbas::cron::read(&path, &known).map(|tab| cerbas::cron::check_report(&path, &tab))
        }
        CronCommand::List { .. } => cerbas::cron::list(config, &known, &path).map(|r| (r, true)),
    };
    match report {
        Ok((text, ok)) => {
            print!("{text}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("cerbas: {e}");
            ExitCode::from(2)
        }
    }
}

fn load(cli: &Cli) -> Result<Config, cerbas::Error> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None if std::path::Path::new("cerbas.toml").exists() => {
            Config::from_file("cerbas.toml".as_ref())?
        }
        None => {
            log::warn!("no cerbas.toml here and no --config: using defaults (no registered users)");
            Config::default()
        }
    };
    config.apply_process_env()?;
    config.apply_overrides(&Overrides {
        redis_url: cli.redis.clone(),
        env: cli.env.as_deref().map(str::parse::<Env>).transpose()?,
        workers: cli.workers,
        crontab: cli.crontab.clone(),
        http: cli.http.clone(),
    });
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => return fatal(&e),
    };
    if let Some(Command::Cron(c)) = &cli.command {
        return cron_command(&config, c);
    }
    let shutdown = Shutdown::new();
    let signals = shutdown.clone();
    let seen = AtomicUsize::new(0);
    // The handler only forwards: the first signal asks for a graceful stop, a
    // second one ends the process at once.
    let handler = ctrlc::set_handler(move || {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            signals.trigger();
        } else {
            std::process::exit(130);
        }
    });
    if let Err(e) = handler {
        log::error!("cannot install the signal handler: {e}");
        return ExitCode::from(2);
    }
    let mut registry = Registry::new();
    functions::register(&mut registry);
    functions::register_proxied(&mut registry, &config.proxy);
    match cerbas::run(config, registry, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(&e),
    }
}

/// Says why the server cannot run, on stderr whatever `RUST_LOG` says (an operator
/// who turned logging off still needs the reason), and picks the exit code: 2 for
/// settings that can never work, 1 for anything else.
fn fatal(e: &cerbas::Error) -> ExitCode {
    eprintln!("cerbas: {e}");
    match e {
        cerbas::Error::Config(_) | cerbas::Error::Unusable(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}
