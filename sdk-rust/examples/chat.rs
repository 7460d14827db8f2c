//! A tiny terminal chat on a Ferry channel.
//!
//! ```sh
//! cargo run --release -p ferry-server -- serve          # in one terminal
//! cargo run --example chat -- --channel room:1 --user alice
//! cargo run --example chat -- --channel room:1 --user bob
//! ```
//! Lines you type are published (QoS 2); everyone's lines are printed, and
//! what was said while you were away arrives when you come back (the state
//! lives in `--state-dir`).

use std::time::Duration;

use clap::Parser;
use ferry_client::{Client, HistoryRequest, Qos, SubscriptionEvent};
use futures_util::StreamExt;
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
struct Args {
    /// Server WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws")]
    url: String,
    /// Channel to chat on.
    #[arg(long, default_value = "room:1")]
    channel: String,
    /// Your user name (the development server takes it as the token).
    #[arg(long, default_value = "guest")]
    user: String,
    /// Device id; defaults to `<user>-cli`.
    #[arg(long)]
    device: Option<String>,
    /// Where the client keeps its outbox and positions.
    #[arg(long, default_value = ".ferry-chat")]
    state_dir: String,
    /// Print the last N messages on start.
    #[arg(long, default_value_t = 10)]
    history: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = args.device.clone().unwrap_or_else(|| format!("{}-cli", args.user));
    let client =
        Client::builder(&args.url).token(&args.user).device_id(&device).storage_dir(&args.state_dir).build()?;
    let mut room = client.subscribe(&args.channel, Qos::ExactlyOnce).await?;
    client.connect();
    if !client.wait_connected(Duration::from_secs(10)).await {
        eprintln!("(still connecting to {} ...)", args.url);
    }
    if args.history > 0 {
        let req = HistoryRequest {
            channel: args.channel.clone(),
            since: None,
            until: None,
            limit: args.history,
            reverse: true,
        };
        if let Ok((mut pubs, _)) = client.history(req).await {
            pubs.reverse();
            for p in pubs {
                print_line(&p);
            }
            println!("--- live on {} as {} ---", args.channel, args.user);
        }
    }
    let mut state = client.state();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            ev = room.next() => match ev {
                Some(SubscriptionEvent::Publication(p)) => print_line(&p),
                Some(SubscriptionEvent::Gap { .. }) => println!("(some messages are no longer available)"),
                Some(SubscriptionEvent::Ended { code, reason }) => {
                    println!("(subscription ended: {code} {reason})");
                    break;
                }
                Some(_) => {}
                None => break,
            },
            changed = state.changed() => {
                if changed.is_err() { break; }
                println!("({:?})", *state.borrow());
            }
            line = lines.next_line() => match line? {
                Some(l) if !l.trim().is_empty() => {
                    let text = format!("{}: {}", args.user, l.trim());
                    let c = client.clone();
                    let ch = args.channel.clone();
                    tokio::spawn(async move {
                        if let Err(e) = c.publish(&ch, text.into_bytes(), Qos::ExactlyOnce).await {
                            eprintln!("(not sent: {e})");
                        }
                    });
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    let report = client.close(Duration::from_secs(3)).await;
    if !report.unacked.is_empty() {
        eprintln!("({} messages will be sent next time)", report.unacked.len());
    }
    Ok(())
}

fn print_line(p: &ferry_client::Publication) {
    println!("[{}] {}", p.offset, String::from_utf8_lossy(&p.payload.data.0));
}
