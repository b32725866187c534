//! `weft-cni`: the executable a CNI runtime runs. Reads CNI_* variables and the config on stdin,
//! prints the result or a CNI error as JSON on stdout, and exits non-zero on failure. Logs go to
//! stderr (quiet unless `WEFT_CNI_LOG` asks for more).

use std::io::Read as _;

use weft_cni::{CniError, config, error::code, plugin};

fn main() {
    weft_log::init("WEFT_CNI_LOG", "warn");
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Err(e) => Err(CniError {
            cni_version: Some(config::LATEST_VERSION.to_owned()),
            ..CniError::new(code::IO, format!("reading stdin: {e}"))
        }),
        Ok(_) => plugin::invoke(|k| std::env::var(k).ok(), &stdin),
    };
    match outcome {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            println!(
                "{}",
                serde_json::to_string(&e)
                    .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"error\"}}", e.code))
            );
            std::process::exit(1);
        }
    }
}
