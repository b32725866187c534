//! `weft-proxy`: command-line entry point. Parses arguments and calls the `weft_proxy` library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_proxy::{bpffs::PinLayout, counters};

#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version, about = "weft's eBPF datapath agent")]
struct Cli {
    /// Directory in bpffs where maps and links are pinned.
    #[arg(long, global = true, env = "WEFT_PIN_DIR", default_value = weft_proxy::bpffs::DEFAULT_PIN_ROOT)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per-interface packet and byte counters (tcx programs).
    #[command(subcommand)]
    Counters(CountersCmd),
}

#[derive(Debug, Subcommand)]
enum CountersCmd {
    /// Attach the counters to both directions of each interface (in this network namespace).
    Attach {
        /// Interface names.
        #[arg(required = true)]
        interfaces: Vec<String>,
    },
    /// Detach the counters from interfaces and forget their counts.
    Detach {
        /// Interface names.
        #[arg(required_unless_present = "all")]
        interfaces: Vec<String>,
        /// Detach from every interface and remove the counter map.
        #[arg(long, conflicts_with = "interfaces")]
        all: bool,
    },
    /// Print the counters.
    Show {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let layout = PinLayout::new(cli.pin_dir);
    match cli.command {
        Command::Counters(CountersCmd::Attach { interfaces }) => {
            for iface in &interfaces {
                counters::attach(&layout, iface)
                    .with_context(|| format!("attaching to {iface}"))?;
            }
        }
        Command::Counters(CountersCmd::Detach { interfaces, all }) => {
            if all {
                counters::detach_all(&layout)?;
            }
            for iface in &interfaces {
                counters::detach(&layout, iface)
                    .with_context(|| format!("detaching from {iface}"))?;
            }
        }
        Command::Counters(CountersCmd::Show { json }) => {
            let rows = counters::read(&layout)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", counters::render_table(&rows));
            }
        }
    }
    Ok(())
}
