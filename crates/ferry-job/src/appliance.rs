//! The appliance's settings (docs/APPLIANCE.md): what an operator gives a new process-server
//! appliance through the hypervisor, parsed and checked here, turned into the files `ferry serve`
//! and the OS read by `ferry appliance configure`.
//!
//! Two sources, the same keys in both:
//! - **OVF properties** (VMware, and any tool that writes an OVF environment): `ovf-env.xml` on the
//!   ISO the hypervisor attaches (`ovf:transport="iso"`), properties `ferry.KEY`;
//! - **cloud-init NoCloud** (QEMU, Proxmox, Hyper-V with a `cidata` volume): `user-data` as
//!   `#cloud-config` YAML with a `ferry:` mapping of `KEY: value`, `hostname` from `user-data` or
//!   `meta-data`'s `local-hostname`, and the network from `network-config` (version 2: ethernets
//!   with `dhcp4`, `addresses`, `gateway4` or a default route, `nameservers`).
//!
//! Pure: text in, settings or an error naming the key out (the fuzz target `appliance_settings`
//! feeds it anything). Empty values mean "not set" (VMware passes every property, empty ones too).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

/// Every key, with what it takes (the `--help` of `ferry appliance configure` and
/// docs/APPLIANCE.md list the same).
pub const KEYS: &[(&str, &str)] = &[
    ("hostname", "the appliance's host name"),
    ("network", "`dhcp` (default) or `static`"),
    ("address", "static IPv4/IPv6 address with prefix, e.g. 192.0.2.10/24"),
    ("gateway", "static default gateway"),
    ("dns", "DNS servers, comma-separated"),
    ("store", "where points go: azure://ACCOUNT/CONTAINER, or a directory (default /var/lib/ferry/store, on the cache disk)"),
    ("azure_connection_string", "Azure Storage connection string (or the next two)"),
    ("azure_account_key", "the storage account's key"),
    ("azure_sas_token", "a SAS token for the container"),
    ("azure_allow_http", "`true` to allow a plain-http blob endpoint on another host (a trusted lab network only; default false)"),
    ("listen_port", "TCP port agents connect to (default 7443)"),
    ("metrics_port", "port of the Prometheus endpoint, 0 for none (default 9464)"),
    ("downloads_port", "port the agent packages are served on, 0 for none (default 8080)"),
    ("cache_size", "cache quota, e.g. 100GiB (default 80 % of the cache disk)"),
    ("retention", "how long points are kept, e.g. 24h, 7d (default 24h)"),
    ("throttle_ingest", "ingest throttle for all agents: a rate or a weekly schedule"),
    ("throttle_upload", "upload throttle towards Azure: a rate or a weekly schedule"),
    ("master_key", "an existing master key (64 hex digits) to use instead of a new one"),
    ("root_password_hash", "crypt(3) hash of the console root password (default: set at first login)"),
];

/// How the appliance reaches its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// DHCP on every Ethernet interface.
    Dhcp,
    /// One or more interfaces configured explicitly.
    Interfaces(Vec<Interface>),
}

/// One interface's configuration (a systemd-networkd `.network` file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name glob (`en*`) or None with a MAC address.
    pub name: Option<String>,
    pub mac: Option<String>,
    pub dhcp4: bool,
    pub addresses: Vec<String>,
    pub gateway: Option<IpAddr>,
    pub dns: Vec<IpAddr>,
}

/// Settings, each `None` when the source does not set it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub hostname: Option<String>,
    pub network: Option<Network>,
    /// The `network`, `address`, `gateway`, `dns` settings as given; [`Settings::check`] turns
    /// them into `network`.
    net_mode: Option<String>,
    net_address: Option<String>,
    net_gateway: Option<IpAddr>,
    net_dns: Vec<IpAddr>,
    /// The network from a NoCloud `network-config` (the ferry settings win over it).
    net_config: Option<Network>,
    pub store: Option<String>,
    pub azure_connection_string: Option<String>,
    pub azure_account_key: Option<String>,
    pub azure_sas_token: Option<String>,
    pub azure_allow_http: Option<bool>,
    pub listen_port: Option<u16>,
    pub metrics_port: Option<u16>,
    pub downloads_port: Option<u16>,
    pub cache_size: Option<u64>,
    pub retention: Option<String>,
    pub throttle_ingest: Option<String>,
    pub throttle_upload: Option<String>,
    pub master_key: Option<String>,
    pub root_password_hash: Option<String>,
    /// Which keys were set, for the summary (values never printed: some are secrets).
    pub keys: Vec<String>,
}

fn bad(key: &str, why: impl std::fmt::Display) -> String {
    format!("setting {key}: {why}")
}

fn one_line(key: &str, v: &str) -> Result<String, String> {
    if v.chars().any(|c| c.is_control()) {
        return Err(bad(
            key,
            "control characters or line breaks are not allowed",
        ));
    }
    Ok(v.to_string())
}

fn port(key: &str, v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .map_err(|_| bad(key, format!("'{v}' is not a port number (0-65535)")))
}

fn hostname(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if !ok {
        return Err(bad(
            "hostname",
            format!("'{v}' is not a host name (letters, digits and '-', at most 63)"),
        ));
    }
    Ok(v.to_string())
}

/// `ADDRESS/PREFIX` checked; returned as written.
fn cidr(key: &str, v: &str) -> Result<String, String> {
    let (a, p) = v.split_once('/').ok_or_else(|| {
        bad(
            key,
            format!("'{v}' needs a prefix length, e.g. 192.0.2.10/24"),
        )
    })?;
    let ip: IpAddr = a
        .parse()
        .map_err(|_| bad(key, format!("'{a}' is not an IP address")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match p.parse::<u8>() {
        Ok(n) if n <= max => Ok(format!("{ip}/{n}")),
        _ => Err(bad(key, format!("'{p}' is not a prefix length (0-{max})"))),
    }
}

fn ip(key: &str, v: &str) -> Result<IpAddr, String> {
    v.trim()
        .parse()
        .map_err(|_| bad(key, format!("'{v}' is not an IP address")))
}

fn hex_key(v: &str) -> Result<String, String> {
    let t = v.trim();
    if t.len() != 64 || !t.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(
            "master_key",
            "expected 64 hex digits (the content of a key file, `ferry key export`)",
        ));
    }
    Ok(t.to_ascii_lowercase())
}

impl Settings {
    /// Sets `key` (without the `ferry.` prefix) from its text. Empty text leaves it unset.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        if !KEYS.iter().any(|(k, _)| *k == key) {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "unknown setting '{key}' (known: {})",
                known.join(", ")
            ));
        }
        let v = value.trim();
        if v.is_empty() {
            return Ok(());
        }
        match key {
            "hostname" => self.hostname = Some(hostname(v)?),
            "network" => match v {
                "dhcp" | "static" => self.net_mode = Some(v.to_string()),
                _ => return Err(bad(key, format!("'{v}' is neither dhcp nor static"))),
            },
            "address" => self.net_address = Some(cidr(key, v)?),
            "gateway" => self.net_gateway = Some(ip(key, v)?),
            "dns" => {
                self.net_dns = v
                    .split([',', ' '])
                    .filter(|s| !s.is_empty())
                    .map(|s| ip(key, s))
                    .collect::<Result<Vec<_>, _>>()?;
            }
            "store" => {
                crate::StoreLocation::parse(v).map_err(|e| bad(key, e))?;
                self.store = Some(one_line(key, v)?);
            }
            "azure_connection_string" => self.azure_connection_string = Some(one_line(key, v)?),
            "azure_account_key" => self.azure_account_key = Some(one_line(key, v)?),
            "azure_sas_token" => self.azure_sas_token = Some(one_line(key, v)?),
            "azure_allow_http" => {
                self.azure_allow_http = Some(match v {
                    "true" | "yes" | "1" => true,
                    "false" | "no" | "0" => false,
                    _ => return Err(bad(key, format!("'{v}' is neither true nor false"))),
                })
            }
            "listen_port" => match port(key, v)? {
                0 => return Err(bad(key, "agents need a port: 0 is not one")),
                p => self.listen_port = Some(p),
            },
            "metrics_port" => self.metrics_port = Some(port(key, v)?),
            "downloads_port" => self.downloads_port = Some(port(key, v)?),
            "cache_size" => {
                let n = crate::serve_config::parse_size(v).map_err(|e| bad(key, e))?;
                self.cache_size = Some(n);
            }
            "retention" => {
                crate::serve_config::parse_retention(v).map_err(|e| bad(key, e))?;
                self.retention = Some(v.to_string());
            }
            "throttle_ingest" | "throttle_upload" => {
                let v = one_line(key, v)?;
                if key == "throttle_ingest" {
                    self.throttle_ingest = Some(v)
                } else {
                    self.throttle_upload = Some(v)
                }
            }
            "master_key" => self.master_key = Some(hex_key(v)?),
            "root_password_hash" => {
                let v = one_line(key, v)?;
                if !v.starts_with('$') || v.contains(':') {
                    return Err(bad(
                        key,
                        "expected a crypt(3) hash such as the output of `openssl passwd -6`",
                    ));
                }
                self.root_password_hash = Some(v);
            }
            _ => unreachable!("checked against KEYS above"),
        }
        if !self.keys.iter().any(|k| k == key) {
            self.keys.push(key.to_string());
        }
        Ok(())
    }

    /// Turns the network settings into [`Network`]: `static` needs an address; `address`,
    /// `gateway`, `dns` need `static` (DHCP gives them). The ferry settings win over a
    /// `network-config` document (Proxmox writes one whatever the operator chose). Idempotent.
    fn finish_network(&mut self) -> Result<(), String> {
        let statics =
            self.net_address.is_some() || self.net_gateway.is_some() || !self.net_dns.is_empty();
        self.network = match self.net_mode.as_deref() {
            Some("static") => {
                let Some(a) = self.net_address.clone() else {
                    return Err("network is static but no address is set (setting address, e.g. 192.0.2.10/24)".into());
                };
                let mut i = Interface::any();
                i.addresses = vec![a];
                i.gateway = self.net_gateway;
                i.dns = self.net_dns.clone();
                Some(Network::Interfaces(vec![i]))
            }
            Some(_) if statics => {
                return Err("address, gateway and dns are for network static (with DHCP the network gives them): set network to static, or clear them".into())
            }
            Some(_) => Some(Network::Dhcp),
            None if statics => {
                return Err("address, gateway or dns is set but network is not: set network to static".into())
            }
            None => self.net_config.clone(),
        };
        Ok(())
    }

    /// Checks what only the whole set can say.
    pub fn check(&mut self) -> Result<(), String> {
        self.finish_network()?;
        if let Some(Network::Interfaces(ifs)) = &self.network {
            for i in ifs {
                if !i.dhcp4 && i.addresses.is_empty() {
                    return Err(
                        "network is static but no address is set (setting address, e.g. 192.0.2.10/24)"
                            .into(),
                    );
                }
            }
        }
        let is_azure = self
            .store
            .as_deref()
            .is_some_and(|s| s.starts_with("azure://"));
        let creds = [
            &self.azure_connection_string,
            &self.azure_account_key,
            &self.azure_sas_token,
        ]
        .iter()
        .filter(|c| c.is_some())
        .count();
        if self.azure_allow_http == Some(true) && !is_azure {
            return Err("azure_allow_http is set but the store is not azure://ACCOUNT/CONTAINER (setting store)".into());
        }
        if creds > 0 && !is_azure {
            return Err("Azure credentials are set but the store is not azure://ACCOUNT/CONTAINER (setting store)".into());
        }
        if creds > 1 {
            return Err("give one of azure_connection_string, azure_account_key, azure_sas_token, not several".into());
        }
        for (k, p) in [
            ("listen_port", self.listen_port),
            ("metrics_port", self.metrics_port),
            ("downloads_port", self.downloads_port),
        ] {
            if let Some(p @ 1..=1023) = p {
                return Err(bad(k, format!("{p} is a privileged port: the appliance's services run without privileges; use 1024 or above")));
            }
        }
        if let Some(st) = self.store.as_deref().filter(|s| !s.starts_with("azure://")) {
            // Only plain names below /var/lib/ferry: no '.', '..' or empty parts to hide a
            // reserved directory behind.
            let rest = st.strip_prefix("/var/lib/ferry/").unwrap_or("");
            let parts: Vec<&str> = rest.split('/').collect();
            let first = parts[0];
            if rest.is_empty()
                || parts
                    .iter()
                    .enumerate()
                    .any(|(i, p)| *p == "." || *p == ".." || (p.is_empty() && i + 1 < parts.len()))
                || [
                    "",
                    "server",
                    "server-cache",
                    "stage",
                    "master.key",
                    "master.key.exported",
                    "lost+found",
                ]
                .contains(&first)
            {
                return Err(bad("store", format!("a local store on the appliance is a new directory under /var/lib/ferry (the cache disk), e.g. /var/lib/ferry/store, not '{st}'")));
            }
        }
        let ports = [
            self.listen_port.unwrap_or(7443),
            self.metrics_port.unwrap_or(9464),
            self.downloads_port.unwrap_or(8080),
        ];
        let set: Vec<u16> = ports.iter().copied().filter(|p| *p != 0).collect();
        for (i, p) in set.iter().enumerate() {
            if set[i + 1..].contains(p) {
                return Err(format!(
                    "port {p} is given to two services (listen_port, metrics_port, downloads_port)"
                ));
            }
        }
        Ok(())
    }
}

impl Interface {
    fn any() -> Self {
        Interface {
            name: Some("en* eth*".into()),
            mac: None,
            dhcp4: false,
            addresses: vec![],
            gateway: None,
            dns: vec![],
        }
    }
}

fn local(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|b| *b == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

/// Settings from an OVF environment document (`ovf-env.xml`): every `Property` whose key starts
/// with `ferry.`; other properties are ignored.
pub fn from_ovf_env(xml: &str) -> Result<Settings, String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let mut s = Settings::default();
    let mut saw_env = false;
    let mut depth = 0usize;
    loop {
        let ev = r
            .read_event()
            .map_err(|e| format!("ovf-env.xml is not well-formed XML: {e}"))?;
        let e = match ev {
            Event::Eof if depth == 0 => break,
            Event::Eof => {
                return Err("ovf-env.xml is not well-formed XML: it ends inside an element".into())
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                continue;
            }
            Event::Start(e) => {
                depth += 1;
                e
            }
            Event::Empty(e) => e,
            _ => continue,
        };
        let qn = e.name();
        let name = local(qn.as_ref());
        if name == b"Environment" {
            saw_env = true;
        }
        if name != b"Property" {
            continue;
        }
        let (mut key, mut value) = (None, None);
        for a in e.attributes() {
            let a = a.map_err(|e| format!("ovf-env.xml: a bad attribute: {e}"))?;
            let v = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| format!("ovf-env.xml: a bad attribute value: {e}"))?
                .into_owned();
            match local(a.key.as_ref()) {
                b"key" => key = Some(v),
                b"value" => value = Some(v),
                _ => {}
            }
        }
        let key = key.ok_or("ovf-env.xml: a Property without oe:key")?;
        if let Some(k) = key.strip_prefix("ferry.") {
            s.set(k, value.as_deref().unwrap_or(""))
                .map_err(|e| format!("OVF property ferry.{k}: {e}"))?;
        }
    }
    if !saw_env {
        return Err("ovf-env.xml has no Environment element: not an OVF environment".into());
    }
    s.check()?;
    Ok(s)
}

/// A YAML scalar as text (numbers and booleans as written).
fn scalar(key: &str, v: &serde_norway::Value) -> Result<String, String> {
    use serde_norway::Value;
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        _ => Err(bad(key, "expected a single value, not a list or mapping")),
    }
}

fn yaml(what: &str, text: &str) -> Result<serde_norway::Value, String> {
    if text.trim().is_empty() {
        return Ok(serde_norway::Value::Null);
    }
    serde_norway::from_str(text).map_err(|e| format!("{what} is not valid YAML: {e}"))
}

/// Settings from a NoCloud data source's files (any may be absent: pass "").
pub fn from_nocloud(
    meta_data: &str,
    user_data: &str,
    network_config: &str,
) -> Result<Settings, String> {
    use serde_norway::Value;
    let mut s = Settings::default();
    let meta = yaml("meta-data", meta_data)?;
    if let Some(h) = meta.get("local-hostname") {
        s.set("hostname", &scalar("local-hostname", h)?)
            .map_err(|e| format!("meta-data: {e}"))?;
    }
    if !user_data.trim().is_empty() {
        let first = user_data.lines().next().unwrap_or("").trim();
        if first != "#cloud-config" {
            return Err(format!(
                "user-data must be #cloud-config YAML (its first line is '{}')",
                first.chars().take(40).collect::<String>()
            ));
        }
        let ud = yaml("user-data", user_data)?;
        match &ud {
            Value::Mapping(_) | Value::Null => {}
            _ => return Err("user-data: expected a mapping at the top".into()),
        }
        if let Some(h) = ud.get("hostname") {
            s.set("hostname", &scalar("hostname", h)?)
                .map_err(|e| format!("user-data: {e}"))?;
        }
        match ud.get("ferry") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    let k = match k {
                        Value::String(k) => k.clone(),
                        _ => return Err("user-data: ferry: keys must be names".into()),
                    };
                    s.set(&k, &scalar(&k, v)?)
                        .map_err(|e| format!("user-data: ferry: {e}"))?;
                }
            }
            Some(_) => return Err("user-data: ferry: expected a mapping of settings".into()),
        }
    }
    let net = yaml("network-config", network_config)?;
    if !net.is_null() {
        // None: a document that configures no interface (Proxmox writes one without any
        // ipconfig): DHCP, as without it.
        s.net_config = network_config_doc(&net)?;
        if s.net_config.is_some() {
            s.keys.push("network-config".into());
        }
    }
    s.check()?;
    Ok(s)
}

/// A `network-config` document: version 2 (netplan-like, `ethernets`), or version 1 (a `config`
/// list of `physical` interfaces with `subnets`, and `nameserver` entries, as Proxmox writes it).
fn network_config_doc(v: &serde_norway::Value) -> Result<Option<Network>, String> {
    use serde_norway::Value;
    // Either the document itself or under `network:`.
    let v = v.get("network").unwrap_or(v);
    match v.get("version") {
        Some(Value::Number(n)) if n.as_u64() == Some(2) => network_v2(v).map(Some),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => network_v1(v),
        Some(Value::Number(n)) => Err(format!(
            "network-config version {n} is not supported: use version 1 or 2, or the ferry settings network/address/gateway/dns"
        )),
        _ => Err("network-config: no version (expected version: 1 or 2)".into()),
    }
}

fn prefix_of(mask: &str) -> Option<u8> {
    let m: std::net::Ipv4Addr = mask.parse().ok()?;
    let bits = u32::from(m);
    let n = bits.leading_ones();
    (bits.checked_shl(n).unwrap_or(0) == 0).then_some(n as u8)
}

fn network_v1(v: &serde_norway::Value) -> Result<Option<Network>, String> {
    use serde_norway::Value;
    let items = match v.get("config") {
        Some(Value::Sequence(items)) => items,
        None | Some(Value::Null) => return Ok(None),
        Some(_) => return Err("network-config version 1: config is not a list".into()),
    };
    let mut out: Vec<Interface> = Vec::new();
    let mut dns = Vec::new();
    for (n, it) in items.iter().enumerate() {
        let what = |k: &str| format!("network-config config[{n}].{k}");
        let kind = it.get("type").map(|t| scalar("type", t)).transpose()?;
        match kind.as_deref() {
            Some("nameserver") => match it.get("address") {
                Some(Value::Sequence(list)) => {
                    for a in list {
                        dns.push(ip(&what("address"), &scalar("address", a)?)?);
                    }
                }
                Some(a) => dns.push(ip(&what("address"), &scalar("address", a)?)?),
                None => {}
            },
            Some("physical") => {
                let mut i = Interface {
                    name: None,
                    mac: None,
                    dhcp4: false,
                    addresses: vec![],
                    gateway: None,
                    dns: vec![],
                };
                if let Some(m) = it.get("mac_address") {
                    i.mac = Some(mac(&what("mac_address"), &scalar("mac_address", m)?)?);
                } else if let Some(nm) = it.get("name") {
                    i.name = Some(glob(&what("name"), &scalar("name", nm)?)?);
                } else {
                    return Err(format!(
                        "{}: a physical interface needs name or mac_address",
                        what("type")
                    ));
                }
                let subnets = match it.get("subnets") {
                    Some(Value::Sequence(v)) => v.clone(),
                    None | Some(Value::Null) => vec![],
                    Some(_) => return Err(format!("{}: expected a list", what("subnets"))),
                };
                for sn in &subnets {
                    let t = sn.get("type").map(|t| scalar("type", t)).transpose()?;
                    match t.as_deref() {
                        Some("dhcp" | "dhcp4") => i.dhcp4 = true,
                        Some("static") => {
                            let a = sn
                                .get("address")
                                .map(|a| scalar("address", a))
                                .transpose()?
                                .ok_or_else(|| {
                                    format!("{}: a static subnet needs an address", what("subnets"))
                                })?;
                            let a = if a.contains('/') {
                                cidr(&what("subnets.address"), &a)?
                            } else {
                                let mask = sn
                                    .get("netmask")
                                    .map(|m| scalar("netmask", m))
                                    .transpose()?
                                    .ok_or_else(|| {
                                        format!(
                                            "{}: address {a} needs a netmask or a /prefix",
                                            what("subnets")
                                        )
                                    })?;
                                let p = prefix_of(&mask).ok_or_else(|| {
                                    format!(
                                        "{}: '{mask}' is not a netmask",
                                        what("subnets.netmask")
                                    )
                                })?;
                                cidr(&what("subnets.address"), &format!("{a}/{p}"))?
                            };
                            i.addresses.push(a);
                            if let Some(g) = sn.get("gateway") {
                                i.gateway =
                                    Some(ip(&what("subnets.gateway"), &scalar("gateway", g)?)?);
                            }
                            if let Some(Value::Sequence(list)) = sn.get("dns_nameservers") {
                                for a in list {
                                    i.dns.push(ip(
                                        &what("subnets.dns_nameservers"),
                                        &scalar("address", a)?,
                                    )?);
                                }
                            }
                        }
                        // IPv6: the appliance listens on IPv4 (docs/APPLIANCE.md).
                        Some(
                            "ipv6_dhcpv6-stateless"
                            | "ipv6_dhcpv6-stateful"
                            | "ipv6_slaac"
                            | "dhcp6"
                            | "static6",
                        ) => {}
                        other => {
                            return Err(format!(
                                "{}: subnet type {other:?} is not supported (static, dhcp)",
                                what("subnets")
                            ))
                        }
                    }
                }
                // A NIC without IPv4 configuration (none given, or IPv6 only) is left alone.
                if i.dhcp4 || !i.addresses.is_empty() {
                    out.push(i);
                }
            }
            // Bonds, bridges, VLANs, routes: not on an appliance with one NIC.
            other => {
                return Err(format!(
                    "{}: type {other:?} is not supported (physical, nameserver)",
                    what("type")
                ))
            }
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    for i in &mut out {
        if i.dns.is_empty() {
            i.dns = dns.clone();
        }
    }
    Ok(Some(Network::Interfaces(out)))
}

fn mac(what: &str, v: &str) -> Result<String, String> {
    let mac = v.to_ascii_lowercase();
    let ok = mac.len() == 17
        && mac
            .split(':')
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(format!("{what}: '{mac}' is not a MAC address"));
    }
    Ok(mac)
}

fn network_v2(v: &serde_norway::Value) -> Result<Network, String> {
    use serde_norway::Value;
    let eth = match v.get("ethernets") {
        Some(Value::Mapping(m)) => m,
        _ => return Err("network-config: no ethernets mapping".into()),
    };
    let mut out = Vec::new();
    for (id, e) in eth {
        let id = match id {
            Value::String(s) => s.clone(),
            _ => return Err("network-config: ethernets: ids must be names".into()),
        };
        let what = |k: &str| format!("network-config ethernets.{id}.{k}");
        let mut i = Interface {
            name: None,
            mac: None,
            dhcp4: false,
            addresses: vec![],
            gateway: None,
            dns: vec![],
        };
        if let Some(m) = e.get("match") {
            if let Some(n) = m.get("name") {
                i.name = Some(glob(&what("match.name"), &scalar("name", n)?)?);
            }
            if let Some(a) = m.get("macaddress") {
                i.mac = Some(mac(&what("match.macaddress"), &scalar("macaddress", a)?)?);
            }
        }
        if i.name.is_none() && i.mac.is_none() {
            i.name = Some(glob(&what("(id)"), &id)?);
        }
        if let Some(d) = e.get("dhcp4") {
            i.dhcp4 = match d {
                Value::Bool(b) => *b,
                Value::String(s) if s == "true" || s == "yes" => true,
                Value::String(s) if s == "false" || s == "no" => false,
                _ => return Err(format!("{}: expected true or false", what("dhcp4"))),
            };
        }
        if let Some(a) = e.get("addresses") {
            let Value::Sequence(list) = a else {
                return Err(format!("{}: expected a list", what("addresses")));
            };
            for a in list {
                i.addresses
                    .push(cidr(&what("addresses"), &scalar("addresses", a)?)?);
            }
        }
        if let Some(g) = e.get("gateway4") {
            i.gateway = Some(ip(&what("gateway4"), &scalar("gateway4", g)?)?);
        }
        if let Some(Value::Sequence(routes)) = e.get("routes") {
            for r in routes {
                let to = r.get("to").map(|t| scalar("to", t)).transpose()?;
                if matches!(to.as_deref(), Some("default" | "0.0.0.0/0")) {
                    if let Some(via) = r.get("via") {
                        i.gateway = Some(ip(&what("routes.via"), &scalar("via", via)?)?);
                    }
                }
            }
        }
        if let Some(ns) = e.get("nameservers").and_then(|n| n.get("addresses")) {
            let Value::Sequence(list) = ns else {
                return Err(format!(
                    "{}: expected a list",
                    what("nameservers.addresses")
                ));
            };
            for a in list {
                i.dns
                    .push(ip(&what("nameservers.addresses"), &scalar("address", a)?)?);
            }
        }
        if !i.dhcp4 && i.addresses.is_empty() {
            return Err(format!(
                "network-config ethernets.{id}: neither dhcp4: true nor addresses"
            ));
        }
        out.push(i);
    }
    if out.is_empty() {
        return Err("network-config: ethernets is empty".into());
    }
    Ok(Network::Interfaces(out))
}

fn glob(what: &str, v: &str) -> Result<String, String> {
    if v.is_empty()
        || v.len() > 15
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '*' | '?' | '-' | '_' | '.'))
    {
        return Err(format!("{what}: '{v}' is not an interface name or glob"));
    }
    Ok(v.to_string())
}

/// The 64 hex digits of an exported master key (`ferry key export`'s output: comment lines
/// starting with `#`, blank lines, one line of 64 hex digits), lower-case.
pub fn parse_key_export(text: &str) -> Result<String, String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    match lines.as_slice() {
        [one] if one.len() == 64 && one.chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(one.to_ascii_lowercase())
        }
        _ => Err("not an exported master key: expected one line of 64 hex digits (`ferry key export` writes it)".into()),
    }
}

/// Where things live on the appliance.
pub const STATE_ROOT: &str = "/var/lib/ferry";
pub const DEFAULT_STORE: &str = "/var/lib/ferry/store";

/// `/etc/ferry/ferry.toml` for these settings. `default_cache` is the quota when none is set.
pub fn ferry_toml(s: &Settings, default_cache: u64) -> String {
    let q = |v: &str| toml::Value::String(v.to_string()).to_string();
    let mut t = String::from(
        "# Written by `ferry appliance configure` at boot from the appliance's settings (OVF properties\n\
         # or a cloud-init NoCloud volume). With a settings source, edits here are replaced at the next\n\
         # boot: change the source instead. Without one, this file is written once and is yours to edit.\n\
         # Keys: docs/CONFIGURATION.md; appliance settings: docs/APPLIANCE.md.\n\n[serve]\n",
    );
    let _ = writeln!(
        t,
        "listen = {}",
        q(&format!("0.0.0.0:{}", s.listen_port.unwrap_or(7443)))
    );
    let _ = writeln!(
        t,
        "store = {}",
        q(s.store.as_deref().unwrap_or(DEFAULT_STORE))
    );
    let _ = writeln!(t, "key_file = {}", q(&format!("{STATE_ROOT}/master.key")));
    let _ = writeln!(
        t,
        "cache_dir = {}",
        q(&format!("{STATE_ROOT}/server-cache"))
    );
    let _ = writeln!(t, "cache_size = {}", s.cache_size.unwrap_or(default_cache));
    let _ = writeln!(t, "state_dir = {}", q(&format!("{STATE_ROOT}/server")));
    let _ = writeln!(
        t,
        "retention = {}",
        q(s.retention.as_deref().unwrap_or("24h"))
    );
    match s.metrics_port.unwrap_or(9464) {
        0 => {}
        p => {
            let _ = writeln!(t, "metrics_listen = {}", q(&format!("0.0.0.0:{p}")));
        }
    }
    if let Some(v) = &s.throttle_ingest {
        let _ = writeln!(t, "throttle_ingest = {}", q(v));
    }
    if let Some(v) = &s.throttle_upload {
        let _ = writeln!(t, "throttle_upload = {}", q(v));
    }
    t
}

/// `/etc/ferry/serve.env` (systemd EnvironmentFile) with the Azure credentials; None without any.
pub fn serve_env(s: &Settings) -> Option<String> {
    let cred = if let Some(v) = &s.azure_connection_string {
        Some(("AZURE_STORAGE_CONNECTION_STRING", v))
    } else if let Some(v) = &s.azure_account_key {
        Some(("AZURE_STORAGE_KEY", v))
    } else {
        s.azure_sas_token
            .as_ref()
            .map(|v| ("AZURE_STORAGE_SAS_TOKEN", v))
    };
    let allow = s.azure_allow_http == Some(true);
    if cred.is_none() && !allow {
        return None;
    }
    let mut t = String::from(
        "# Written by `ferry appliance configure` from the appliance's settings. Mode 0600.\n",
    );
    if let Some((name, v)) = cred {
        // systemd's EnvironmentFile: inside double quotes, a backslash makes the next \, ", `
        // or $ literal; nothing is expanded.
        let esc = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('`', "\\`")
            .replace('$', "\\$");
        let _ = writeln!(t, "{name}=\"{esc}\"");
    }
    if allow {
        t.push_str("FERRY_AZURE_ALLOW_HTTP=1\n");
    }
    Some(t)
}

/// systemd-networkd files (name, content) for the network settings; DHCP on every Ethernet
/// interface when none is set.
pub fn networkd(s: &Settings) -> Vec<(String, String)> {
    let head = "# Written by `ferry appliance configure` from the appliance's settings.\n";
    let dhcp = vec![(
        "10-ferry-dhcp.network".to_string(),
        format!("{head}[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"),
    )];
    let ifs = match &s.network {
        None | Some(Network::Dhcp) => return dhcp,
        Some(Network::Interfaces(v)) => v,
    };
    ifs.iter()
        .enumerate()
        .map(|(n, i)| {
            let mut t = format!("{head}[Match]\n");
            if let Some(m) = &i.mac {
                let _ = writeln!(t, "MACAddress={m}");
            }
            if let Some(name) = &i.name {
                let _ = writeln!(t, "Name={name}");
            }
            t.push_str("\n[Network]\n");
            if i.dhcp4 {
                t.push_str("DHCP=ipv4\n");
            }
            for a in &i.addresses {
                let _ = writeln!(t, "Address={a}");
            }
            if let Some(g) = i.gateway {
                let _ = writeln!(t, "Gateway={g}");
            }
            for d in &i.dns {
                let _ = writeln!(t, "DNS={d}");
            }
            (format!("10-ferry-{n}.network"), t)
        })
        .collect()
}

/// The settings' summary without secret values: key → "set" or its value.
pub fn summary(s: &Settings) -> BTreeMap<String, String> {
    let secret = [
        "azure_connection_string",
        "azure_account_key",
        "azure_sas_token",
        "master_key",
        "root_password_hash",
    ];
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            let shown = if secret.contains(&k) {
                "(set)".to_string()
            } else {
                v
            };
            m.insert(k.to_string(), shown);
        }
    };
    put("hostname", s.hostname.clone());
    put(
        "network",
        s.network.as_ref().map(|n| match n {
            Network::Dhcp => "dhcp".to_string(),
            Network::Interfaces(v) => v
                .iter()
                .map(|i| {
                    if i.dhcp4 {
                        "dhcp".to_string()
                    } else {
                        i.addresses.join(",")
                    }
                })
                .collect::<Vec<_>>()
                .join("; "),
        }),
    );
    put("store", s.store.clone());
    put("azure_connection_string", s.azure_connection_string.clone());
    put("azure_account_key", s.azure_account_key.clone());
    put("azure_sas_token", s.azure_sas_token.clone());
    put(
        "azure_allow_http",
        s.azure_allow_http.map(|b| b.to_string()),
    );
    put("listen_port", s.listen_port.map(|p| p.to_string()));
    put("metrics_port", s.metrics_port.map(|p| p.to_string()));
    put("downloads_port", s.downloads_port.map(|p| p.to_string()));
    put("cache_size", s.cache_size.map(|p| p.to_string()));
    put("retention", s.retention.clone());
    put("throttle_ingest", s.throttle_ingest.clone());
    put("throttle_upload", s.throttle_upload.clone());
    put("master_key", s.master_key.clone());
    put("root_password_hash", s.root_password_hash.clone());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF_ENV: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     oe:id="ferry-appliance">
  <PlatformSection><Kind>VMware ESXi</Kind></PlatformSection>
  <PropertySection>
    <Property oe:key="ferry.hostname" oe:value="ps01"/>
    <Property oe:key="ferry.network" oe:value="static"/>
    <Property oe:key="ferry.address" oe:value="192.0.2.10/24"/>
    <Property oe:key="ferry.gateway" oe:value="192.0.2.1"/>
    <Property oe:key="ferry.dns" oe:value="192.0.2.53, 192.0.2.54"/>
    <Property oe:key="ferry.store" oe:value="azure://ferrydr/replicas"/>
    <Property oe:key="ferry.azure_connection_string" oe:value="DefaultEndpointsProtocol=https;AccountName=ferrydr;AccountKey=a&quot;b$c"/>
    <Property oe:key="ferry.cache_size" oe:value="100GiB"/>
    <Property oe:key="ferry.retention" oe:value=""/>
    <Property oe:key="ferry.throttle_upload" oe:value="mon-fri 08:00-18:00 10MiB/s; * unlimited"/>
    <Property oe:key="vami.other" oe:value="ignored"/>
  </PropertySection>
</Environment>"#;

    #[test]
    fn ovf_environment_gives_every_ferry_property() {
        let s = from_ovf_env(OVF_ENV).unwrap();
        assert_eq!(s.hostname.as_deref(), Some("ps01"));
        assert_eq!(s.store.as_deref(), Some("azure://ferrydr/replicas"));
        assert_eq!(s.cache_size, Some(100 << 30));
        assert_eq!(s.retention, None, "empty values mean unset");
        let Some(Network::Interfaces(ifs)) = &s.network else {
            panic!("{:?}", s.network)
        };
        assert_eq!(ifs[0].addresses, vec!["192.0.2.10/24".to_string()]);
        assert_eq!(ifs[0].gateway, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(ifs[0].dns.len(), 2);
        let env = serve_env(&s).unwrap();
        assert!(
            env.contains(r#"AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=https;AccountName=ferrydr;AccountKey=a\"b\$c""#),
            "{env}"
        );
        let toml = ferry_toml(&s, 1 << 30);
        let parsed = crate::serve_config::parse_file_config(&toml).unwrap();
        assert_eq!(parsed.serve.cache_size, Some(100 << 30));
        assert_eq!(
            parsed.serve.store.as_deref(),
            Some("azure://ferrydr/replicas")
        );
        assert_eq!(
            parsed.serve.throttle_upload.as_deref(),
            Some("mon-fri 08:00-18:00 10MiB/s; * unlimited")
        );
        let net = networkd(&s);
        assert_eq!(net.len(), 1);
        assert!(
            net[0].1.contains(
                "Address=192.0.2.10/24\nGateway=192.0.2.1\nDNS=192.0.2.53\nDNS=192.0.2.54\n"
            ),
            "{}",
            net[0].1
        );
        let sum = summary(&s);
        assert_eq!(sum["azure_connection_string"], "(set)");
        assert!(!format!("{sum:?}").contains("AccountKey"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = from_ovf_env(&OVF_ENV.replace("100GiB", "lots")).unwrap_err();
        assert!(e.contains("ferry.cache_size"), "{e}");
        let e = from_ovf_env(&OVF_ENV.replace("192.0.2.10/24", "192.0.2.10")).unwrap_err();
        assert!(e.contains("ferry.address") && e.contains("prefix"), "{e}");
        let e = from_ovf_env(&OVF_ENV.replace("ferry.retention", "ferry.retension")).unwrap_err();
        assert!(e.contains("unknown setting 'retension'"), "{e}");
        let e = from_ovf_env(&OVF_ENV.replace("azure://ferrydr/replicas", "/srv/x")).unwrap_err();
        assert!(e.contains("Azure credentials"), "{e}");
        let e = from_ovf_env("<Environment>").unwrap_err();
        assert!(e.contains("well-formed"), "{e}");
        assert!(from_ovf_env("<x/>")
            .unwrap_err()
            .contains("not an OVF environment"));
        let e = from_ovf_env(&OVF_ENV.replace("ps01", "ps 01")).unwrap_err();
        assert!(e.contains("not a host name"), "{e}");
    }

    #[test]
    fn nocloud_user_data_meta_data_and_network_config() {
        let ud = "#cloud-config\nhostname: ps02\nusers: []\nferry:\n  store: azure://dev/c\n  azure_connection_string: \"UseDevelopmentStorage=true\"\n  listen_port: 7444\n  metrics_port: 0\n  master_key: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n";
        let nc = "version: 2\nethernets:\n  lan:\n    match:\n      macaddress: \"52:54:00:12:34:56\"\n    addresses: [10.0.0.5/8]\n    routes:\n      - to: default\n        via: 10.0.0.1\n    nameservers:\n      addresses: [10.0.0.2]\n";
        let s = from_nocloud(
            "instance-id: i-1\nlocal-hostname: ignored-by-user-data\n",
            ud,
            nc,
        )
        .unwrap();
        assert_eq!(s.hostname.as_deref(), Some("ps02"));
        assert_eq!(s.listen_port, Some(7444));
        assert_eq!(s.master_key.as_deref(), Some(&"a".repeat(64)[..]));
        let toml = ferry_toml(&s, 5 << 30);
        assert!(toml.contains("listen = \"0.0.0.0:7444\""));
        assert!(!toml.contains("metrics_listen"), "{toml}");
        assert!(toml.contains(&format!("cache_size = {}", 5u64 << 30)));
        let net = networkd(&s);
        assert_eq!(
            net[0].1.split_once("[Match]\n").unwrap().1,
            "MACAddress=52:54:00:12:34:56\n\n[Network]\nAddress=10.0.0.5/8\nGateway=10.0.0.1\nDNS=10.0.0.2\n"
        );
        // Nothing at all: defaults, DHCP.
        let s = from_nocloud("", "", "").unwrap();
        assert_eq!(s, Settings::default());
        assert!(networkd(&s)[0].1.contains("DHCP=ipv4"));
        assert!(ferry_toml(&s, 1 << 30).contains("store = \"/var/lib/ferry/store\""));
    }

    /// systemd's own reading of the EnvironmentFile quoting (`systemd-run --property
    /// EnvironmentFile=`) would be the final word; this pins the rules docs/APPLIANCE.md relies
    /// on: \\, \", \` and \$ escaped inside double quotes, nothing else touched.
    #[test]
    fn credentials_with_quotes_dollars_and_backslashes_are_escaped() {
        let mut s = Settings::default();
        s.set("store", "azure://a/c").unwrap();
        s.set("azure_account_key", r#"k$y"with\back`tick"#).unwrap();
        s.check().unwrap();
        assert_eq!(
            serve_env(&s).unwrap().lines().nth(1).unwrap(),
            r#"AZURE_STORAGE_KEY="k\$y\"with\\back\`tick""#
        );
    }

    #[test]
    fn proxmox_network_config_version_1() {
        let nc = "version: 1\nconfig:\n    - type: physical\n      name: eth0\n      mac_address: 'BC:24:11:AA:BB:CC'\n      subnets:\n      - type: static\n        address: '10.1.2.3'\n        netmask: '255.255.255.0'\n        gateway: '10.1.2.1'\n    - type: nameserver\n      address:\n      - '10.1.2.53'\n      search:\n      - 'example.com'\n";
        let s = from_nocloud("", "", nc).unwrap();
        let net = networkd(&s);
        assert_eq!(
            net[0].1.split_once("[Match]\n").unwrap().1,
            "MACAddress=bc:24:11:aa:bb:cc\n\n[Network]\nAddress=10.1.2.3/24\nGateway=10.1.2.1\nDNS=10.1.2.53\n"
        );
        let dhcp =
            "version: 1\nconfig:\n - type: physical\n   name: eth0\n   subnets:\n   - type: dhcp\n";
        assert!(networkd(&from_nocloud("", "", dhcp).unwrap())[0]
            .1
            .contains("Name=eth0\n\n[Network]\nDHCP=ipv4\n"));
        let e = from_nocloud("", "", &nc.replace("255.255.255.0", "255.0.255.0")).unwrap_err();
        assert!(e.contains("not a netmask"), "{e}");
        // As Proxmox writes them: no ipconfig at all (a nameserver only, or nothing), an
        // IPv6-only NIC, a static6 subnet next to a static one: DHCP where nothing is said.
        let only_ns =
            "version: 1\nconfig:\n    - type: nameserver\n      address:\n      - '10.1.2.53'\n";
        let s = from_nocloud("", "", only_ns).unwrap();
        assert_eq!(s.network, None);
        assert!(networkd(&s)[0].1.contains("DHCP=ipv4"));
        assert_eq!(
            from_nocloud("", "", "version: 1\nconfig:\n")
                .unwrap()
                .network,
            None
        );
        let v6 = "version: 1\nconfig:\n - type: physical\n   name: eth0\n   subnets:\n   - type: static6\n     address: 'fd00::5/64'\n";
        assert_eq!(from_nocloud("", "", v6).unwrap().network, None);
        let both = nc.replace(
            "      - type: static\n",
            "      - type: static6\n        address: 'fd00::5/64'\n      - type: static\n",
        );
        assert!(networkd(&from_nocloud("", "", &both).unwrap())[0]
            .1
            .contains("Address=10.1.2.3/24\n"));
        // The ferry settings win over the document Proxmox always writes.
        let ud = "#cloud-config\nferry:\n  network: static\n  address: 192.0.2.9/24\n";
        let mut s = from_nocloud("", ud, nc).unwrap();
        assert!(
            networkd(&s)[0].1.contains("Address=192.0.2.9/24\n"),
            "{:?}",
            s.network
        );
        s.check().unwrap();
        s.check().unwrap();
        assert!(
            networkd(&s)[0].1.contains("Address=192.0.2.9/24\n"),
            "check is idempotent"
        );
        let e = from_nocloud(
            "",
            "",
            "version: 1\nconfig:\n - type: bond\n   name: bond0\n",
        )
        .unwrap_err();
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn settings_the_appliance_could_not_run_are_refused() {
        let cfg = |body: &str| from_nocloud("", &format!("#cloud-config\nferry:\n{body}"), "");
        let e = cfg("  network: dhcp\n  dns: 10.0.0.1\n").unwrap_err();
        assert!(e.contains("for network static"), "{e}");
        let e = cfg("  dns: 10.0.0.1\n").unwrap_err();
        assert!(e.contains("set network to static"), "{e}");
        let e = cfg("  network: static\n  gateway: 10.0.0.1\n").unwrap_err();
        assert!(e.contains("no address"), "{e}");
        let s = cfg("  dns: 10.0.0.2\n  address: 10.0.0.5/24\n  network: static\n").unwrap();
        assert!(
            networkd(&s)[0].1.contains("Name=en* eth*\n"),
            "any order; every NIC name"
        );
        let e = cfg("  listen_port: 443\n").unwrap_err();
        assert!(e.contains("privileged port"), "{e}");
        let e = cfg("  downloads_port: 80\n").unwrap_err();
        assert!(e.contains("downloads_port"), "{e}");
        assert!(cfg("  downloads_port: 0\n").is_ok());
        for bad in [
            "/srv/store",
            "/var/lib/ferry",
            "/var/lib/ferry/",
            "/var/lib/ferry/.",
            "/var/lib/ferry/server",
            "/var/lib/ferry/./server",
            "/var/lib/ferry//server",
            "/var/lib/ferry/x/../server",
            "/var/lib/ferry/x/..",
        ] {
            let e = cfg(&format!("  store: {bad}\n")).unwrap_err();
            assert!(e.contains("under /var/lib/ferry"), "{bad}: {e}");
        }
        assert!(cfg("  store: /var/lib/ferry/store2\n").is_ok());
    }

    #[test]
    fn nocloud_mistakes_are_clear() {
        // (user-data, network-config, what the error must say)
        let cases = [
            ("ferry:\n  store: /x\n", "", "#cloud-config"),
            (
                "#cloud-config\nferry:\n  listen_port: 0\n",
                "",
                "listen_port",
            ),
            ("#cloud-config\nferry: [1]\n", "", "mapping"),
            ("", "version: 3\nconfig: []\n", "version 3 is not supported"),
            ("", "version: 2\nethernets:\n  eth0: {}\n", "neither dhcp4"),
            (
                "#cloud-config\nferry:\n  metrics_port: 7443\n",
                "",
                "port 7443",
            ),
            ("#cloud-config\nferry:\n  master_key: abc\n", "", "64 hex"),
            ("#cloud-config\n\tbad: [\n", "", "not valid YAML"),
        ];
        for (ud, nc, says) in cases {
            let e = from_nocloud("", ud, nc).unwrap_err();
            assert!(e.contains(says), "{ud:?} {nc:?}: {e}");
        }
    }
}
