//! `docker-compose.yml` checked against the real binary, since Docker cannot run in CI: every
//! env var set on our services is one the binary reads (`[env: NAME=…]` in `--help`), every
//! command and healthcheck subcommand and flag exists, published ports and URLs between services
//! match the listen addresses, and dependencies wait for health. Run it with
//! `cargo test --test compose`. Env vars read by libraries rather than flags (RUST_LOG, the
//! standard OTEL_* variables) are listed in `LIBRARY_ENV`.

use std::collections::BTreeMap;
use std::process::Command;

use serde_yaml_ng::Value;

const COMPOSE: &str = "docker-compose.yml";
/// The image built from this repository.
const OUR_IMAGE: &str = "syft-router:local";

/// Env vars our services read that are not clap flags, with who reads them.
const LIBRARY_ENV: &[(&str, &str)] = &[
    ("RUST_LOG", "tracing-subscriber's EnvFilter (log filter)"),
    (
        "SYFT_TRACE_INCOMING",
        "syft-telemetry (a caller's trace context)",
    ),
    // Standard OpenTelemetry SDK variables (https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/),
    // read by the OTLP exporter when tracing export is enabled.
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "OpenTelemetry OTLP exporter"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "OpenTelemetry OTLP exporter"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "OpenTelemetry OTLP exporter"),
    ("OTEL_SERVICE_NAME", "OpenTelemetry resource"),
    ("OTEL_RESOURCE_ATTRIBUTES", "OpenTelemetry resource"),
    ("OTEL_TRACES_SAMPLER", "OpenTelemetry sampler"),
    ("OTEL_TRACES_SAMPLER_ARG", "OpenTelemetry sampler"),
];

fn compose() -> Value {
    let text = std::fs::read_to_string(COMPOSE).expect("read docker-compose.yml");
    serde_yaml_ng::from_str(&text).expect("docker-compose.yml is valid YAML")
}

fn services(doc: &Value) -> BTreeMap<String, Value> {
    doc["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service name").to_string(), v.clone()))
        .collect()
}

fn ours(doc: &Value) -> BTreeMap<String, Value> {
    services(doc)
        .into_iter()
        .filter(|(_, s)| s["image"].as_str() == Some(OUR_IMAGE))
        .collect()
}

/// `${NAME:-default}` → `default`, `${NAME}` → `` (what compose does with NAME unset).
fn expand(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &rest[start + 2..start + end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// A service's environment (map or `KEY=VALUE` list form), expanded.
fn env_of(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| (scalar(k), expand(&scalar(v))))
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| {
                let item = scalar(i);
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                (k.to_string(), expand(v))
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("environment must be a map or a list: {other:?}"),
    }
}

fn words(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("use the exec (list) form, not {v:?}"))
        .iter()
        .map(scalar)
        .collect()
}

fn help(path: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_syft-router"))
        .args(path)
        .arg("--help")
        .env_clear()
        .env("NO_COLOR", "1")
        .output()
        .expect("run syft-router --help");
    assert!(
        out.status.success(),
        "syft-router {} --help failed: {}",
        path.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Subcommand names listed under `Commands:` in a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Splits a command line into its subcommand path and the rest, and returns the help of that
/// subcommand.
fn resolve(args: &[String]) -> (Vec<String>, Vec<String>, String) {
    let mut path = Vec::new();
    let mut text = help(&path);
    for (i, word) in args.iter().enumerate() {
        if subcommands(&text).iter().any(|s| s == word) {
            path.push(word.clone());
            text = help(&path);
        } else {
            return (path, args[i..].to_vec(), text);
        }
    }
    (path, Vec::new(), text)
}

fn has_flag(help: &str, flag: &str) -> bool {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .any(|w| w == flag || w.strip_suffix('=') == Some(flag))
        || help.contains(&format!("{flag} <"))
}

fn check_command(problems: &mut Vec<String>, what: &str, args: &[String]) -> String {
    let (path, rest, text) = resolve(args);
    if path.is_empty() {
        problems.push(format!("{what}: {args:?} names no syft-router subcommand"));
    }
    for word in &rest {
        if let Some(flag) = word
            .strip_prefix("--")
            .map(|f| f.split('=').next().unwrap_or(f))
        {
            let flag = format!("--{flag}");
            if !has_flag(&text, &flag) {
                problems.push(format!(
                    "{what}: `syft-router {}` has no flag {flag}",
                    path.join(" ")
                ));
            }
        }
    }
    text
}

#[test]
fn compose_env_vars_commands_and_healthchecks_exist_in_the_binary() {
    let doc = compose();
    let ours = ours(&doc);
    assert!(
        ["ledger", "router"].iter().all(|s| ours.contains_key(*s)),
        "the ledger and the router run our image: {:?}",
        ours.keys()
    );
    let mut problems = Vec::new();
    for (name, service) in &ours {
        let text = check_command(
            &mut problems,
            &format!("{name}.command"),
            &words(&service["command"]),
        );
        for var in env_of(service).keys() {
            if LIBRARY_ENV.iter().any(|(v, _)| v == var) {
                continue;
            }
            // `[env: NAME=value]`, or `[env: NAME]` for secrets (hide_env_values).
            if !text.contains(&format!("[env: {var}=")) && !text.contains(&format!("[env: {var}]"))
            {
                problems.push(format!(
                    "{name}: env var {var} is not read by `syft-router {}`",
                    words(&service["command"]).join(" ")
                ));
            }
        }
        if let Some(test) = service["healthcheck"]["test"].as_sequence() {
            let test: Vec<String> = test.iter().map(scalar).collect();
            match test.split_first() {
                Some((kind, rest)) if kind == "CMD" => {
                    assert_eq!(
                        rest[0], "syft-router",
                        "{name}: healthcheck runs the binary"
                    );
                    check_command(&mut problems, &format!("{name}.healthcheck"), &rest[1..]);
                }
                _ => problems.push(format!("{name}: healthcheck must use the CMD form")),
            }
        }
    }
    assert_none("docker-compose.yml does not match the binary", &problems);
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// Listen addresses (`*_ADDR`) of a service: var → (host, port).
fn listen_addrs(service: &Value) -> BTreeMap<String, (String, u16)> {
    env_of(service)
        .into_iter()
        .filter(|(k, _)| k.ends_with("_ADDR"))
        .map(|(k, v)| {
            let (host, _) = v.rsplit_once(':').unwrap_or_else(|| panic!("{k}={v}"));
            (k, (host.to_string(), port_of(&v)))
        })
        .collect()
}

#[test]
fn compose_ports_and_urls_match_listen_addresses() {
    let doc = compose();
    let all = services(&doc);
    let ours = ours(&doc);
    let mut problems = Vec::new();
    for (name, service) in &ours {
        let addrs = listen_addrs(service);
        let ports: Vec<u16> = addrs.values().map(|(_, p)| *p).collect();
        for (var, (host, _)) in &addrs {
            if host != "0.0.0.0" {
                problems.push(format!(
                    "{name}: {var} listens on {host}, unreachable from other containers"
                ));
            }
        }
        for published in service["ports"].as_sequence().into_iter().flatten() {
            let published = scalar(published);
            // The file's secrets default to values in the repository: a port published on every
            // interface let anyone reaching the host use the ledger's admin key.
            if !published.starts_with("127.0.0.1:") {
                problems.push(format!(
                    "{name}: publishes {published:?} beyond the loopback (127.0.0.1:…)"
                ));
            }
            let container: u16 = published
                .rsplit(':')
                .next()
                .and_then(|p| p.split('/').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{name}: bad port {published:?}"));
            if !ports.contains(&container) {
                problems.push(format!(
                    "{name}: publishes container port {container}, but it listens on {ports:?}"
                ));
            }
        }
        // The healthcheck asks the service's own gRPC port.
        if let Some(test) = service["healthcheck"]["test"].as_sequence() {
            let test: Vec<String> = test.iter().map(scalar).collect();
            if let Some(i) = test.iter().position(|w| w == "--url") {
                let url = &test[i + 1];
                if !ports.contains(&port_of(url)) {
                    problems.push(format!(
                        "{name}: healthcheck asks {url}, but it listens on {ports:?}"
                    ));
                }
            }
        }
        // URLs naming another service must name one of its listening ports.
        for (var, value) in env_of(service) {
            let Some((_, after)) = value.split_once("://") else {
                continue;
            };
            let authority = after.split(['/', '@']).next().unwrap_or_default();
            let authority = after
                .split('/')
                .next()
                .and_then(|a| a.rsplit('@').next())
                .unwrap_or(authority);
            let Some((host, port)) = authority.rsplit_once(':') else {
                continue;
            };
            let Some(target) = all.get(host) else {
                if host != "127.0.0.1" && host != "localhost" {
                    problems.push(format!("{name}: {var} names unknown service {host}"));
                }
                continue;
            };
            let port: u16 = port.parse().expect("port");
            if let Some(target) = ours.get(host) {
                let theirs: Vec<u16> = listen_addrs(target).values().map(|(_, p)| *p).collect();
                if !theirs.contains(&port) {
                    problems.push(format!(
                        "{name}: {var} uses {host}:{port}, but {host} listens on {theirs:?}"
                    ));
                }
            }
            let depends = &service["depends_on"][host];
            if depends.is_null() && !target["image"].is_null() {
                problems.push(format!("{name}: uses {host} but does not depend on it"));
            }
        }
    }
    assert_none("docker-compose.yml ports and URLs", &problems);
}

#[test]
fn compose_services_wait_for_healthy_dependencies() {
    let doc = compose();
    let all = services(&doc);
    for (name, service) in &all {
        let Some(deps) = service["depends_on"].as_mapping() else {
            continue;
        };
        for (dep, how) in deps {
            let dep = scalar(dep);
            let target = all
                .get(&dep)
                .unwrap_or_else(|| panic!("{name} depends on unknown {dep}"));
            match how["condition"].as_str() {
                Some("service_healthy") => assert!(
                    !target["healthcheck"].is_null(),
                    "{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                ),
                Some("service_completed_successfully") => assert_eq!(
                    target["restart"].as_str(),
                    Some("no"),
                    "{dep} is a one-shot job"
                ),
                Some("service_started") => {}
                other => panic!("{name} -> {dep}: unexpected condition {other:?}"),
            }
        }
    }
    let cond = |svc: &str, dep: &str| {
        all[svc]["depends_on"][dep]["condition"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(
        cond("ledger", "postgres").as_deref(),
        Some("service_healthy")
    );
    assert_eq!(cond("router", "ledger").as_deref(), Some("service_healthy"));
    assert!(!all["postgres"]["healthcheck"].is_null());

    // The setup job creates exactly the account the router is configured to be paid as.
    let router = env_of(&all["router"]);
    let setup = env_of(&all["setup"]);
    assert_eq!(
        setup["SYFT_ACCOUNT_SECRET"], router["SYFT_ROUTER_LEDGER_SECRET"],
        "the owner's secret"
    );
    assert_eq!(setup["SYFT_LEDGER_URL"], router["SYFT_LEDGER_URL"]);
    let config_path = &router["SYFT_ROUTER_CONFIG"];
    let mount = words(&all["router"]["volumes"])
        .into_iter()
        .find_map(|v| {
            let mut parts = v.split(':');
            let host = parts.next()?.to_string();
            (parts.next()? == config_path).then_some(host)
        })
        .unwrap_or_else(|| panic!("{config_path} is not mounted into the router"));
    let config = syft_router_svc::RouterConfig::from_file(&mount).expect("router config parses");
    let setup_cmd = words(&all["setup"]["command"]);
    assert!(
        setup_cmd.contains(&config.owner_email),
        "setup creates {setup_cmd:?}, the router is owned by {}",
        config.owner_email
    );
}

#[test]
fn dockerfile_builds_locked_and_runs_the_binary_as_non_root() {
    let text = std::fs::read_to_string("Dockerfile").expect("Dockerfile");
    assert!(text.contains("cargo build --release --locked"));
    let runtime = text.rsplit("\nFROM ").next().expect("a runtime stage");
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "runs as {user}"
    );
    assert!(runtime.contains("ENTRYPOINT [\"syft-router\"]"));
    let ignore = std::fs::read_to_string(".dockerignore").expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}

/// `[workspace] members` of the root Cargo.toml.
fn workspace_members() -> Vec<String> {
    let text = std::fs::read_to_string("Cargo.toml").expect("Cargo.toml");
    let doc: toml::Table = text.parse().expect("Cargo.toml parses");
    doc["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .map(|m| {
            m.as_str()
                .expect("member path")
                .trim_end_matches('/')
                .to_string()
        })
        .collect()
}

/// The instructions of the Dockerfile's first (build) stage, continuation lines joined.
fn build_stage(dockerfile: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
        .into_iter()
        .skip_while(|i| !i.starts_with("FROM "))
        .enumerate()
        .take_while(|(n, i)| *n == 0 || !i.starts_with("FROM "))
        .map(|(_, i)| i)
        .collect()
}

/// Glob match as `.dockerignore` does it: `*` stays within one path segment, `**` spans several.
fn glob(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', b'/', rest @ ..] => {
                go(rest, s)
                    || s.iter()
                        .enumerate()
                        .any(|(i, c)| *c == b'/' && go(rest, &s[i + 1..]))
            }
            [b'*', rest @ ..] => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| go(rest, &s[i..])),
            [c, rest @ ..] => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

/// The `.dockerignore` rule that keeps `path` (or a directory above it) out of the build context.
fn ignored_by(ignore: &str, path: &str) -> Option<String> {
    let mut prefixes = Vec::new();
    let mut acc = String::new();
    for part in path.split('/') {
        if !acc.is_empty() {
            acc.push('/');
        }
        acc.push_str(part);
        prefixes.push(acc.clone());
    }
    let mut verdict = None;
    for rule in ignore.lines().map(str::trim) {
        if rule.is_empty() || rule.starts_with('#') {
            continue;
        }
        let (negated, pattern) = match rule.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, rule),
        };
        let pattern = pattern.trim_start_matches("./").trim_end_matches('/');
        if prefixes.iter().any(|p| glob(pattern, p)) {
            verdict = (!negated).then(|| rule.to_string());
        }
    }
    verdict
}

#[test]
fn dockerignore_globs() {
    assert!(glob("target", "target"));
    assert!(glob("**/*.db", "data/ledger.db"));
    assert!(glob("**/*.db", "ledger.db"));
    assert!(!glob("*.md", "docs/x.md"));
    assert!(glob("*.md", "README.md"));
    let ignore = "target/\n*.md\n!README.md\n";
    assert_eq!(
        ignored_by(ignore, "target/release").as_deref(),
        Some("target/")
    );
    assert_eq!(ignored_by(ignore, "CHANGES.md").as_deref(), Some("*.md"));
    assert_eq!(ignored_by(ignore, "README.md"), None);
    assert_eq!(ignored_by(ignore, "crates/money"), None);
}

/// The build stage must see every workspace member (its manifest and sources) before it runs
/// `cargo build`; otherwise cargo cannot load the workspace (`crates/telemetry` was once missed).
/// Copying the whole tree is the way that cannot drift; explicit copies are checked member by
/// member.
#[test]
fn dockerfile_build_stage_covers_every_workspace_member() {
    let members = workspace_members();
    assert!(
        members.iter().any(|m| m == "crates/telemetry"),
        "members parsed: {members:?}"
    );
    let dockerfile = std::fs::read_to_string("Dockerfile").expect("Dockerfile");
    let stage = build_stage(&dockerfile);
    let first_build = stage
        .iter()
        .position(|i| i.contains("cargo build"))
        .expect("the build stage runs cargo build");
    // `COPY [--flags] src... dest` before the first build.
    let copied: Vec<String> = stage[..first_build]
        .iter()
        .filter_map(|i| i.strip_prefix("COPY "))
        .flat_map(|args| {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let sources = words.len().saturating_sub(1);
            words[..sources]
                .iter()
                .map(|w| w.trim_start_matches("./").trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let whole_tree = copied.iter().any(|s| s == "." || s.is_empty());
    let ignore = std::fs::read_to_string(".dockerignore").unwrap_or_default();
    let mut problems = Vec::new();
    for member in &members {
        let manifest = format!("{member}/Cargo.toml");
        if !whole_tree && !copied.iter().any(|s| s == member || *s == manifest) {
            problems.push(format!(
                "the build stage runs `cargo build` before copying workspace member {member}"
            ));
        }
    }
    // What the build reads besides the members: manifests, protos (build script), migrations
    // (sqlx::migrate!), the binary's own sources.
    let needed = ["Cargo.toml", "Cargo.lock", "src", "proto", "migrations"];
    for path in members.iter().map(String::as_str).chain(needed) {
        if let Some(rule) = ignored_by(&ignore, path) {
            problems.push(format!(
                ".dockerignore rule {rule:?} keeps {path} out of the image build"
            ));
        }
        if !std::path::Path::new(path).exists() {
            problems.push(format!("{path} does not exist"));
        }
    }
    assert_none("Dockerfile vs workspace", &problems);
}

/// Builds the image when a container engine answers here; CI machines without one print
/// `SKIPPED` (the static checks above still run).
#[test]
fn docker_image_builds_when_an_engine_runs() {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match engine {
        Ok(out) if out.status.success() => {}
        Ok(_) => {
            syft_testkit::skipped(
                syft_testkit::Need::Docker,
                "no Docker engine answers (`docker info` failed); image not built",
            );
            return;
        }
        Err(e) => {
            syft_testkit::skipped(
                syft_testkit::Need::Docker,
                format!("no docker command ({e}); image not built"),
            );
            return;
        }
    }
    let out = Command::new("docker")
        .args(["build", "--quiet", "-t", "syft-router:compose-test", "."])
        .output()
        .expect("run docker build");
    assert!(
        out.status.success(),
        "docker build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = Command::new("docker")
        .args(["run", "--rm", "syft-router:compose-test", "--help"])
        .output()
        .expect("run the image");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("ledger"),
        "the image runs syft-router"
    );
}

/// Fails with every problem found, one a line, under `what`.
fn assert_none(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}
