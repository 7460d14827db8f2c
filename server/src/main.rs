//! The `ferry` command.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ferry_server::config::Config;

#[derive(Parser)]
#[command(name = "ferry", version, about = "Ferry real-time messaging server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve {
        /// TOML configuration file.
        #[arg(long, env = "FERRY_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address for WebSocket and /healthz (overrides the file).
        #[arg(long, env = "FERRY_LISTEN")]
        listen: Option<SocketAddr>,
        /// Data directory of the embedded store (overrides the file).
        #[arg(long, env = "FERRY_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Serve { config, listen, data_dir } => {
            let mut cfg = match &config {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                }
                None => Config::default(),
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
            let addr = listener.local_addr()?;
            // The first line names the address; tests and scripts read it.
            // Write errors are ignored: a closed stdout must not stop a server.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ferry listening on ws://{addr}/ws (health: http://{addr}/healthz)");
            let _ = writeln!(
                out,
                "data: {} | anonymous access: {} | dev auth (token = user id): {}",
                cfg.data_dir.display(),
                if cfg.allow_anonymous { "on" } else { "off" },
                if cfg.insecure_token_is_user { "on" } else { "off" },
            );
            let _ = out.flush();
            drop(out);
            ferry_server::run(listener, cfg, shutdown_signal()).await
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
