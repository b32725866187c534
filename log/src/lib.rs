//! How weft's binaries log: `tracing` events as text on stderr (stdout is a CNI plugin's
//! result, and the other binaries' output for humans), filtered by an environment variable
//! in `tracing-subscriber`'s `EnvFilter` syntax (`info`, `weft_cni=debug,warn`, ...).

/// Installs the subscriber: the filter comes from the variable `var` (`RUST_LOG` for most
/// binaries), else `default`.
pub fn init(var: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(var)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
