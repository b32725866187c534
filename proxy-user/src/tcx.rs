//! Attaching classifier programs with tcx and pinning the links, so they outlive the agent.
//! Attaching again swaps the program behind an existing pinned link atomically (an upgrade).

use std::path::Path;

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    },
};

use crate::{Error, Result, bpffs::remove_pin};

/// The index of an interface in this network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(ifname).map_err(|source| Error::NoSuchInterface {
        name: ifname.to_owned(),
        source,
    })
}

/// The classifier program `name` of the object, loaded into the kernel (once).
pub fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(Error::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| Error::Program { name, source })?;
    // One program serves many interfaces: load it the first time only.
    match prog.load() {
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => {}
        Err(source) => return Err(Error::Program { name, source }),
    }
    Ok(prog)
}

/// Where a program goes among the tcx programs of a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// After those already there.
    Last,
    /// Before every other (service translation before policy, so policy sees the backend).
    First,
}

fn fresh_attach(
    prog: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    attach_type: TcAttachType,
    order: Order,
) -> Result<SchedClassifierLinkId> {
    let order = match order {
        Order::Last => LinkOrder::default(),
        Order::First => LinkOrder::first(),
    };
    prog.attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(order))
        .map_err(|source| Error::Program { name, source })
}

/// Attaches `prog_name` to `ifname` in direction `attach_type` and pins the link at `pin`.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    prog_name: &'static str,
    ifname: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<()> {
    attach_pinned_at(ebpf, prog_name, ifname, attach_type, pin, Order::Last)
}

/// [`attach_pinned`] at a given place among the hook's programs (an existing pinned link keeps
/// its place).
pub fn attach_pinned_at(
    ebpf: &mut Ebpf,
    prog_name: &'static str,
    ifname: &str,
    attach_type: TcAttachType,
    pin: &Path,
    order: Order,
) -> Result<()> {
    let prog = classifier(ebpf, prog_name)?;
    let link_err = |e: &dyn std::fmt::Display| Error::Link {
        path: pin.to_path_buf(),
        message: e.to_string(),
    };
    let link_id = match PinnedLink::from_pin(pin) {
        // Already attached: atomically swap the program behind the existing link.
        Ok(old) => {
            let old = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| link_err(&e))?;
            match prog.attach_to_link(old) {
                Ok(id) => id,
                // The interface behind the old link is gone; start over.
                Err(_) => fresh_attach(prog, prog_name, ifname, attach_type, order)?,
            }
        }
        Err(_) => fresh_attach(prog, prog_name, ifname, attach_type, order)?,
    };
    let link = prog.take_link(link_id).map_err(|source| Error::Program {
        name: prog_name,
        source,
    })?;
    let link = FdLink::try_from(link).map_err(|e| link_err(&e))?;
    remove_pin(pin)?;
    // The pin keeps the attachment alive once our handle is dropped.
    drop(link.pin(pin).map_err(|e| link_err(&e))?);
    Ok(())
}

/// Loads classifier programs and pins them under the layout's `progs/`, replacing older pins, so
/// another process (weft-cni) can attach them to an interface the moment it exists.
pub fn pin_programs(
    ebpf: &mut Ebpf,
    names: &[&'static str],
    layout: &crate::bpffs::PinLayout,
) -> Result<()> {
    for name in names {
        let prog = classifier(ebpf, name)?;
        let path = layout.prog(name);
        remove_pin(&path)?;
        prog.pin(&path).map_err(|e| Error::Link {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}
