//! Links the `weft-cni` executable as non-PIE. A CNI plugin is exec'd for every pod operation, and
//! on this kind of VM most of its start-up time is page faults; in a PIE executable the dynamic
//! loader first writes every relocated pointer (Rust's vtables make many), touching dozens of
//! pages. Non-PIE resolves them at link time (see `cni-bench`'s "process start only" row).

fn main() {
    println!("cargo:rustc-link-arg-bin=weft-cni=-no-pie");
}
