//! `weft-pause`: the pod sandbox's process. It holds the pod's namespaces open, reaps any
//! process re-parented to it, and exits on SIGINT or SIGTERM, like Kubernetes' pause.

use nix::sys::{
    signal::{SigSet, Signal},
    wait::{WaitPidFlag, waitpid},
};

fn main() {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if s == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(_) => std::process::exit(2),
        }
    }
}
