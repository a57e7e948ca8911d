//! `fedmesh iptables`: transparent interception for a pod's (or a network namespace's) sidecar.
//! Run once per network namespace before the app starts (the injected init container does):
//!
//! - inbound TCP to any port is redirected to the sidecar's inbound port (mTLS termination),
//!   except the ports named in `--exclude-inbound-ports` (the sidecar's admin port, say);
//! - outbound TCP is redirected to the sidecar's outbound port, except traffic of the sidecar
//!   itself (its uid, or its `SO_MARK`), loopback, and excluded ports and CIDRs.
//!
//! The rules live in two chains of the nat table, `FEDMESH_INBOUND` and `FEDMESH_OUTBOUND`;
//! running the command again replaces them (idempotent), `--remove` takes them out.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::Args;

const INBOUND: &str = "FEDMESH_INBOUND";
const OUTBOUND: &str = "FEDMESH_OUTBOUND";

#[derive(Args, Clone, Debug)]
pub struct IptablesArgs {
    /// The uid the sidecar runs as; its own connections are not redirected.
    #[arg(long)]
    proxy_uid: Option<u32>,
    /// The SO_MARK the sidecar puts on its own connections (`fedmesh sidecar --mark`).
    #[arg(long)]
    proxy_mark: Option<u32>,
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Inbound ports that reach the pod directly (comma-separated), e.g. the sidecar's admin port.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone (comma-separated CIDRs), e.g. the control plane's.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<Ipv4Cidr>,
    /// Print the rules (iptables-restore format) instead of installing them.
    #[arg(long)]
    print: bool,
    /// Take the rules out again.
    #[arg(long, conflicts_with = "print")]
    remove: bool,
}

/// An IPv4 CIDR such as 10.96.0.0/12 (the rules are for iptables, which is IPv4).
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Cidr(Ipv4Addr, u8);

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 CIDR such as 10.96.0.0/12");
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let a: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let l: u8 = l.parse().map_err(|_| bad())?;
        if l > 32 {
            return Err(bad());
        }
        Ok(Ipv4Cidr(a, l))
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// The rules, in `iptables-restore --noflush` format (a chain declared there is flushed).
pub fn rules(a: &IptablesArgs) -> anyhow::Result<String> {
    if a.proxy_uid.is_none() && a.proxy_mark.is_none() {
        bail!(
            "give --proxy-uid or --proxy-mark: without one the sidecar's own connections would be \
             redirected back to itself"
        );
    }
    if a.inbound_port == a.outbound_port {
        bail!("--inbound-port and --outbound-port must differ");
    }
    let mut r = String::from("*nat\n");
    r += &format!(":{INBOUND} - [0:0]\n:{OUTBOUND} - [0:0]\n");
    r += &format!("-A PREROUTING -p tcp -j {INBOUND}\n");
    for p in &a.exclude_inbound_ports {
        r += &format!("-A {INBOUND} -p tcp --dport {p} -j RETURN\n");
    }
    r += &format!(
        "-A {INBOUND} -p tcp -j REDIRECT --to-ports {}\n",
        a.inbound_port
    );
    r += &format!("-A OUTPUT -p tcp -j {OUTBOUND}\n");
    if let Some(uid) = a.proxy_uid {
        r += &format!("-A {OUTBOUND} -m owner --uid-owner {uid} -j RETURN\n");
    }
    if let Some(mark) = a.proxy_mark {
        r += &format!("-A {OUTBOUND} -m mark --mark {mark:#x} -j RETURN\n");
    }
    r += &format!("-A {OUTBOUND} -d 127.0.0.0/8 -j RETURN\n");
    for p in &a.exclude_outbound_ports {
        r += &format!("-A {OUTBOUND} -p tcp --dport {p} -j RETURN\n");
    }
    for c in &a.exclude_outbound_cidrs {
        r += &format!("-A {OUTBOUND} -d {c} -j RETURN\n");
    }
    r += &format!(
        "-A {OUTBOUND} -p tcp -j REDIRECT --to-ports {}\n",
        a.outbound_port
    );
    r += "COMMIT\n";
    Ok(r)
}

fn iptables(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("iptables").args(args).output()
}

/// Removes the jumps into our chains (as often as they occur) and the chains.
fn remove() -> anyhow::Result<()> {
    for (hook, chain) in [("PREROUTING", INBOUND), ("OUTPUT", OUTBOUND)] {
        // At most a few copies exist; bounded so a broken iptables cannot loop forever.
        for _ in 0..32 {
            let out = iptables(&["-t", "nat", "-D", hook, "-p", "tcp", "-j", chain])
                .context("running iptables (is it installed? apt-get install iptables)")?;
            if !out.status.success() {
                break;
            }
        }
        let _ = iptables(&["-t", "nat", "-F", chain]);
        let _ = iptables(&["-t", "nat", "-X", chain]);
    }
    Ok(())
}

pub fn run(a: IptablesArgs) -> anyhow::Result<()> {
    if a.remove {
        remove()?;
        eprintln!("fedmesh iptables: interception rules removed");
        return Ok(());
    }
    let text = rules(&a)?;
    if a.print {
        print!("{text}");
        return Ok(());
    }
    // Replace, not append: an init container that runs again must not stack rules.
    remove()?;
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore (is iptables installed? apt-get install iptables)")?;
    child
        .stdin
        .take()
        .context("iptables-restore stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore refused the rules: {}\n(it needs CAP_NET_ADMIN and CAP_NET_RAW in \
             this network namespace; the rules were:\n{text})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprintln!(
        "fedmesh iptables: inbound TCP → :{}, outbound TCP → :{}",
        a.inbound_port, a.outbound_port
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: IptablesArgs,
    }

    fn parse(args: &[&str]) -> IptablesArgs {
        T::parse_from(std::iter::once("t").chain(args.iter().copied())).a
    }

    #[test]
    fn rules_exempt_the_proxy_loopback_and_exclusions() {
        let r = rules(&parse(&[
            "--proxy-uid",
            "1337",
            "--exclude-inbound-ports",
            "15020,15021",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12",
        ]))
        .unwrap();
        let want = "*nat
:FEDMESH_INBOUND - [0:0]
:FEDMESH_OUTBOUND - [0:0]
-A PREROUTING -p tcp -j FEDMESH_INBOUND
-A FEDMESH_INBOUND -p tcp --dport 15020 -j RETURN
-A FEDMESH_INBOUND -p tcp --dport 15021 -j RETURN
-A FEDMESH_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -p tcp -j FEDMESH_OUTBOUND
-A FEDMESH_OUTBOUND -m owner --uid-owner 1337 -j RETURN
-A FEDMESH_OUTBOUND -d 127.0.0.0/8 -j RETURN
-A FEDMESH_OUTBOUND -d 10.96.0.0/12 -j RETURN
-A FEDMESH_OUTBOUND -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
        assert_eq!(r, want);
    }

    #[test]
    fn without_an_exemption_the_rules_are_refused() {
        let e = rules(&parse(&[])).unwrap_err().to_string();
        assert!(e.contains("--proxy-uid"), "{e}");
        let e = rules(&parse(&["--proxy-mark", "7", "--inbound-port", "15001"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must differ"), "{e}");
    }
}
