//! The derpd binary: parse flags, set up logging, start the server, wait.

use std::process::ExitCode;

use argh::FromArgs;

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().collect();
    let cmd = raw.first().map_or("derpd", String::as_str);
    let normalized = match derpd::config::normalize_args(raw.get(1..).unwrap_or_default()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("derpd: {e}");
            return ExitCode::from(2);
        }
    };
    let refs: Vec<&str> = normalized.iter().map(String::as_str).collect();
    let args = match derpd::config::Args::from_args(&[cmd], &refs) {
        Ok(a) => a,
        Err(e) => {
            // argh's early exit: --help (status Ok) or a usage error.
            return if e.status.is_ok() {
                println!("{}", e.output);
                ExitCode::SUCCESS
            } else {
                eprintln!("{}", e.output);
                ExitCode::from(2)
            };
        }
    };
    if args.version {
        // The architecture lets a router owner (and build-release.sh) check what they run.
        let endian = if cfg!(target_endian = "big") {
            "big"
        } else {
            "little"
        };
        println!(
            "derpd {} ({}/{}, {}-bit, {endian}-endian)",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::env::consts::ARCH,
            usize::BITS,
        );
        return ExitCode::SUCCESS;
    }
    let level = args.log_level.parse().unwrap_or(log::LevelFilter::Info);
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .env()
        .init();
    let cfg = match derpd::config::Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    // SIGTERM/SIGINT: Restarting to every client, a bounded flush, exit 0. SIGHUP: reload.
    // Caught before the server starts, so a signal right after its start-up lines is handled.
    let signals = match derpd::server::catch_signals() {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot catch signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    match derpd::server::Server::start(cfg) {
        Ok(server) => {
            server.run_until_signalled(signals);
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
