//! Service and check definitions from configuration directories (`config_dir`), the way a
//! Consul agent reads `-config-dir`: every `*.json` and `*.hcl` file, in name order, may hold
//! `service`, `services`, `check` and `checks`, with the fields of the agent API (any case,
//! snake_case too).
//!
//! The definitions go through the Consul adapter's own conversion
//! ([`agent::service_definition`], [`agent::check_definition`]) and its registration path,
//! so defaults and validation are those of `/v1/agent/service/register`. [`sync`] runs at
//! start and on every reload (SIGHUP, `PUT /v1/agent/reload`): services and checks that came
//! from the files and are gone from them are removed, the others (re-)registered; services
//! and checks registered through the API are left alone, as Consul keeps them. A reload
//! reads and validates everything before it changes anything, so a bad file leaves the
//! previous definitions in place.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use muster_core::{CheckSpec, Command};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::AppState;
use crate::http::consul::agent::{self, CheckDefinition, ServiceRegistration};
use crate::http::consul::body::{Obj, norm};
use crate::http::consul::render::Node;
use crate::http::consul::{ConsulError, render};

/// A definition file that cannot be used, or a definition the agent refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    /// The file (or directory) at fault; none when the registry refused a removal.
    pub file: Option<PathBuf>,
    /// The line, when the parser knows it.
    pub line: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: {}", file.display(), self.reason),
            (Some(file), None) => write!(f, "{}: {}", file.display(), self.reason),
            (None, _) => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for DefinitionError {}

/// What the last [`sync`] registered from the files, so the next one knows what to remove.
/// Kept in the data directory too: the registry keeps the registrations across a restart,
/// and a file removed while the agent was stopped must still take its services with it.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Loaded {
    /// Whether this was read back from the data directory (once, at the first sync).
    #[serde(skip)]
    restored: bool,
    /// IDs of the services defined in the files.
    services: BTreeSet<String>,
    /// Per service ID, the names of its checks that came from the files.
    service_checks: BTreeMap<String, BTreeSet<String>>,
    /// Names of the node checks that came from the files.
    node_checks: BTreeSet<String>,
}

/// What a [`sync`] found in the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    /// Services defined.
    pub services: usize,
    /// Standalone checks defined (a service's own checks are counted with it).
    pub checks: usize,
    /// Services and node checks removed because their definitions are gone.
    pub removed: usize,
}

/// One definition as a file holds it, before conversion.
#[derive(Debug)]
struct Source {
    file: PathBuf,
    /// Where in the file: `service`, `services[2]`, `check`, ...
    place: String,
    body: Value,
}

impl Source {
    fn error(&self, e: &ConsulError) -> DefinitionError {
        DefinitionError {
            file: Some(self.file.clone()),
            line: None,
            reason: format!("{}: {}", self.place, e.message()),
        }
    }
}

/// Every definition in the directories, in file order.
#[derive(Debug, Default)]
struct Files {
    services: Vec<Source>,
    checks: Vec<Source>,
}

/// Reads the directories, validates every definition in them and brings the registry in
/// line: registers what is new or changed, removes what came from the files and is gone.
/// Nothing is changed when a file cannot be read or a definition is refused.
pub async fn sync(state: &AppState) -> Result<Synced, DefinitionError> {
    let dirs = state.config().config_dir.clone();
    let record = record_file(state);
    // Without directories there is nothing to do, unless an earlier run registered
    // definitions: then they are removed.
    let recorded = match &record {
        Some(path) => tokio::fs::try_exists(path).await.unwrap_or(true),
        None => false,
    };
    if dirs.is_empty() && !recorded {
        return Ok(Synced {
            services: 0,
            checks: 0,
            removed: 0,
        });
    }
    let files = tokio::task::spawn_blocking(move || read_dirs(&dirs))
        .await
        .map_err(|e| DefinitionError {
            file: None,
            line: None,
            reason: format!("reading the config directories failed: {e}"),
        })??;
    // One sync at a time: SIGHUP and the reload endpoint may race.
    let mut loaded = state.loaded_definitions().lock().await;
    if !loaded.restored {
        if let Some(path) = &record {
            *loaded = read_record(path).await?;
        }
        loaded.restored = true;
    }
    let plan = plan(state, &files, &loaded)?;
    let synced = Synced {
        services: plan.services.len(),
        checks: files.checks.len(),
        removed: plan.removed_services.len() + plan.removed_node_checks.len(),
    };
    apply(state, plan, &mut loaded).await?;
    if let Some(path) = &record {
        write_record(path, &loaded).await?;
    }
    Ok(synced)
}

/// Where the data directory keeps [`Loaded`]; none in memory (`dev`), where nothing else
/// survives a restart either.
fn record_file(state: &AppState) -> Option<PathBuf> {
    let config = state.config();
    (!config.dev).then(|| config.data_dir.join(RECORD_FILE))
}

/// The record's file name in the data directory.
const RECORD_FILE: &str = "config-dir-definitions.json";

async fn read_record(path: &Path) -> Result<Loaded, DefinitionError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DefinitionError {
            file: Some(path.to_path_buf()),
            line: None,
            reason: format!(
                "unreadable record of the definitions registered from the config \
                 directories ({e}); delete it, and deregister through the API any service \
                 left from files removed since"
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Loaded::default()),
        Err(e) => Err(DefinitionError {
            file: Some(path.to_path_buf()),
            line: None,
            reason: format!("cannot read: {e}"),
        }),
    }
}

/// Writes the record whole or not at all: a new file, then renamed over the old one.
async fn write_record(path: &Path, loaded: &Loaded) -> Result<(), DefinitionError> {
    let cannot = |e: std::io::Error| DefinitionError {
        file: Some(path.to_path_buf()),
        line: None,
        reason: format!("cannot write: {e}"),
    };
    let bytes = serde_json::to_vec(loaded).map_err(|e| cannot(std::io::Error::other(e)))?;
    let fresh = path.with_extension("json.new");
    tokio::fs::write(&fresh, bytes).await.map_err(cannot)?;
    tokio::fs::rename(&fresh, path).await.map_err(cannot)
}

/// [`sync`], logging the outcome: what SIGHUP and the reload endpoint run.
pub async fn reload(state: &AppState) -> Result<Synced, DefinitionError> {
    match sync(state).await {
        Ok(s) => {
            tracing::info!(
                services = s.services,
                checks = s.checks,
                removed = s.removed,
                "service and check definitions reloaded"
            );
            Ok(s)
        }
        Err(e) => {
            tracing::error!("reload failed, the previous definitions stay: {e}");
            Err(e)
        }
    }
}

/// The writes a sync makes.
#[derive(Debug)]
struct Plan {
    /// Services to register, with the names of their checks that come from the files and
    /// whether the service itself is defined in them.
    services: Vec<(ServiceRegistration, BTreeSet<String>, bool, PathBuf)>,
    removed_services: Vec<String>,
    node_checks: Vec<(CheckSpec, PathBuf)>,
    removed_node_checks: Vec<String>,
}

fn plan(state: &AppState, files: &Files, loaded: &Loaded) -> Result<Plan, DefinitionError> {
    let node = Node::of(state);
    let registry = state.config().registry();
    let min_ttl = registry.limits.min_ttl;
    // Later definitions of one ID replace earlier ones, as later files override in Consul.
    let mut services: BTreeMap<String, (ServiceRegistration, &Source)> = BTreeMap::new();
    for src in &files.services {
        let o = Obj::of(&src.body, &src.place).map_err(|e| src.error(&e))?;
        let reg =
            agent::service_definition(&o, &node.address, min_ttl).map_err(|e| src.error(&e))?;
        services.insert(reg.id.to_string(), (reg, src));
    }
    let mut node_checks: BTreeMap<String, (CheckSpec, &Source)> = BTreeMap::new();
    let mut service_checks: BTreeMap<String, Vec<(CheckSpec, &Source)>> = BTreeMap::new();
    for src in &files.checks {
        let o = Obj::of(&src.body, &src.place).map_err(|e| src.error(&e))?;
        let CheckDefinition { service_id, check } =
            agent::check_definition(&o, min_ttl).map_err(|e| src.error(&e))?;
        check
            .validate("check", &registry.limits)
            .map_err(|e| src.error(&e.into()))?;
        match service_id {
            None => {
                node_checks.insert(check.name.clone(), (check, src));
            }
            Some(id) => service_checks.entry(id).or_default().push((check, src)),
        }
    }

    let snap = state.snapshot();
    let no_previous = BTreeSet::new();
    let targets: BTreeSet<String> = services
        .keys()
        .chain(service_checks.keys())
        .chain(loaded.service_checks.keys())
        .cloned()
        .collect();
    let mut plan = Plan {
        services: Vec::new(),
        removed_services: Vec::new(),
        node_checks: Vec::new(),
        removed_node_checks: Vec::new(),
    };
    for id in targets {
        let previous = loaded.service_checks.get(&id).unwrap_or(&no_previous);
        let added = service_checks.remove(&id).unwrap_or_default();
        // A service that came from the files and is gone from them is removed below: it
        // cannot carry checks.
        let current = agent::own_service(&snap, &id)
            .ok()
            .filter(|_| services.contains_key(&id) || !loaded.services.contains(&id));
        let (mut reg, mut from_files, file, defined) = match services.remove(&id) {
            Some((reg, src)) => {
                let own = reg.spec.checks.iter().map(|c| c.name.clone()).collect();
                (reg, own, src.file.clone(), true)
            }
            None => match &current {
                Some(inst) => {
                    let mut spec = inst.spec.clone();
                    spec.checks.retain(|c| !previous.contains(&c.name));
                    let reg = ServiceRegistration {
                        name: render::service_name(inst).to_string(),
                        service: inst.service.clone(),
                        id: inst.id.clone(),
                        spec,
                    };
                    let file = added
                        .first()
                        .map(|(_, s)| s.file.clone())
                        .unwrap_or_default();
                    (reg, BTreeSet::new(), file, false)
                }
                None => match added.first() {
                    Some((_, src)) => {
                        return Err(src.error(&ConsulError::not_found(format!(
                            "ServiceID {id:?} does not exist"
                        ))));
                    }
                    // Its service went away; nothing is left to take the checks off.
                    None => continue,
                },
            },
        };
        for (check, _) in added {
            from_files.insert(check.name.clone());
            reg.spec.checks.retain(|c| c.name != check.name);
            reg.spec.checks.push(check);
        }
        // Checks registered through the API on a service from the files stay, as Consul
        // restores them at a reload.
        if defined && let Some(inst) = &current {
            for c in &inst.spec.checks {
                if !previous.contains(&c.name) && !from_files.contains(&c.name) {
                    reg.spec.checks.push(c.clone());
                }
            }
        }
        registry.admits(&reg.spec).map_err(|e| DefinitionError {
            file: Some(file.clone()),
            line: None,
            reason: format!("service {:?}: {e}", reg.id.as_str()),
        })?;
        plan.services.push((reg, from_files, defined, file));
    }
    let kept: BTreeSet<String> = plan
        .services
        .iter()
        .filter(|(_, _, defined, _)| *defined)
        .map(|(reg, ..)| reg.id.to_string())
        .collect();
    plan.removed_services = loaded
        .services
        .iter()
        .filter(|id| !kept.contains(*id) && agent::own_service(&snap, id).is_ok())
        .cloned()
        .collect();
    plan.removed_node_checks = loaded
        .node_checks
        .iter()
        .filter(|n| {
            !node_checks.contains_key(*n) && snap.node_checks.iter().any(|c| &c.spec.name == *n)
        })
        .cloned()
        .collect();
    plan.node_checks = node_checks
        .into_values()
        .map(|(c, src)| (c, src.file.clone()))
        .collect();
    Ok(plan)
}

async fn apply(state: &AppState, plan: Plan, loaded: &mut Loaded) -> Result<(), DefinitionError> {
    let refused = |file: Option<&Path>, what: String, e: ConsulError| DefinitionError {
        file: file.map(Path::to_path_buf),
        line: None,
        reason: format!("{what}: {}", e.message()),
    };
    let mut next = Loaded {
        restored: true,
        ..Loaded::default()
    };
    for id in &plan.removed_services {
        let snap = state.snapshot();
        if let Ok(inst) = agent::own_service(&snap, id) {
            let command = Command::Deregister {
                service: inst.service.clone(),
                id: inst.id.clone(),
            };
            agent::submit(state, command)
                .await
                .map_err(|e| refused(None, format!("removing service {id:?}"), e))?;
        }
    }
    for name in &plan.removed_node_checks {
        let command = Command::DeregisterNodeCheck { name: name.clone() };
        agent::submit(state, command)
            .await
            .map_err(|e| refused(None, format!("removing check {name:?}"), e))?;
    }
    for (reg, from_files, defined, file) in plan.services {
        let id = reg.id.to_string();
        agent::register(state, reg, false)
            .await
            .map_err(|e| refused(Some(&file), format!("service {id:?}"), e))?;
        if defined {
            next.services.insert(id.clone());
        }
        if !from_files.is_empty() {
            next.service_checks.insert(id, from_files);
        }
    }
    for (check, file) in plan.node_checks {
        let name = check.name.clone();
        agent::submit(state, Command::RegisterNodeCheck(check))
            .await
            .map_err(|e| refused(Some(&file), format!("check {name:?}"), e))?;
        next.node_checks.insert(name);
    }
    *loaded = next;
    Ok(())
}

/// Reads every `*.json` and `*.hcl` file of `dirs`, each directory's in name order.
fn read_dirs(dirs: &[PathBuf]) -> Result<Files, DefinitionError> {
    let mut files = Files::default();
    for dir in dirs {
        let cannot = |e: std::io::Error| DefinitionError {
            file: Some(dir.clone()),
            line: None,
            reason: format!("cannot read the config directory: {e}"),
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(cannot)? {
            let path = entry.map_err(cannot)?.path();
            // Symbolic links are followed, as Consul follows them; directories are not read.
            if !path.is_file() {
                continue;
            }
            match path.extension().and_then(|e| e.to_str()) {
                Some("json" | "hcl") => paths.push(path),
                _ => tracing::debug!(
                    file = %path.display(),
                    "skipping: the extension must be .hcl or .json"
                ),
            }
        }
        paths.sort();
        for path in paths {
            let value = read_file(&path)?;
            collect(&path, &value, &mut files)?;
        }
    }
    Ok(files)
}

/// Parses one file as JSON or HCL, by its extension.
fn read_file(path: &Path) -> Result<Value, DefinitionError> {
    let error = |line, reason| DefinitionError {
        file: Some(path.to_path_buf()),
        line,
        reason,
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| error(None, format!("cannot read: {e}")))?;
    if path.extension().is_some_and(|e| e == "hcl") {
        hcl::from_str::<Value>(&text).map_err(|e| match e {
            hcl::Error::Parse(p) => {
                // The HCL1 habit that HCL2 refuses most often.
                let hint = if p.message().contains("newline") {
                    " (each attribute takes its own line: HCL2 does not allow \
                     `name = \"web\" port = 80` on one line)"
                } else {
                    ""
                };
                error(
                    Some(p.location().line()),
                    format!("invalid HCL: {}{hint}", p.message()),
                )
            }
            other => error(None, format!("invalid HCL: {other}")),
        })
    } else {
        serde_json::from_str::<Value>(&text).map_err(|e| {
            let line = (e.line() > 0).then_some(e.line());
            error(line, format!("invalid JSON: {e}"))
        })
    }
}

/// The keys of a definition file that muster reads; the rest is a Consul agent's own
/// configuration, which files in the same directory often hold.
const DEFINITION_KEYS: [&str; 4] = ["service", "services", "check", "checks"];

/// Takes the definitions out of one parsed file.
fn collect(file: &Path, value: &Value, files: &mut Files) -> Result<(), DefinitionError> {
    let error = |reason: String| DefinitionError {
        file: Some(file.to_path_buf()),
        line: None,
        reason,
    };
    let Value::Object(top) = value else {
        return Err(error("the file must hold an object".into()));
    };
    let ignored: Vec<&str> = top
        .keys()
        .filter(|k| !DEFINITION_KEYS.contains(&norm(k).as_str()))
        .map(String::as_str)
        .collect();
    if !ignored.is_empty() {
        tracing::info!(
            file = %file.display(),
            keys = %ignored.join(", "),
            "ignoring settings other than service and check definitions"
        );
    }
    for (key, v) in top {
        let key_norm = norm(key);
        let (list, singular) = match key_norm.as_str() {
            "service" => (&mut files.services, true),
            "services" => (&mut files.services, false),
            "check" => (&mut files.checks, true),
            "checks" => (&mut files.checks, false),
            _ => continue,
        };
        let items = blocks(v, key, singular).map_err(error)?;
        let several = items.len() > 1 || !singular;
        for (n, item) in items.into_iter().enumerate() {
            let place = if several {
                format!("{key}[{n}]")
            } else {
                key.clone()
            };
            let body = if key_norm.starts_with("service") {
                service_blocks(item, &place).map_err(error)?
            } else {
                item.clone()
            };
            list.push(Source {
                file: file.to_path_buf(),
                place,
                body,
            });
        }
    }
    Ok(())
}

/// The definitions under one key. HCL gives one block as an object and repeated blocks as an
/// array; a singular key takes one block only, as Consul's decoder does.
fn blocks<'a>(v: &'a Value, key: &str, singular: bool) -> Result<Vec<&'a Value>, String> {
    match v {
        Value::Object(_) => Ok(vec![v]),
        Value::Array(items) if singular && items.len() > 1 => Err(format!(
            "{key}: {} definitions under `{key}`, which takes one; put several under `{key}s`",
            items.len()
        )),
        Value::Array(items) => Ok(items.iter().filter(|i| !i.is_null()).collect()),
        _ => Err(format!("{key}: expected an object or a list of objects")),
    }
}

/// A service's `check`/`checks` blocks in the shape the conversion takes: `checks` a list
/// (one HCL block is an object), `check` one object.
fn service_blocks(service: &Value, place: &str) -> Result<Value, String> {
    let mut service = service.clone();
    if let Value::Object(fields) = &mut service {
        for (key, v) in fields.iter_mut() {
            match norm(key).as_str() {
                "checks" if v.is_object() => *v = Value::Array(vec![v.take()]),
                "check" => {
                    if let Value::Array(items) = v {
                        if items.len() > 1 {
                            return Err(format!(
                                "{place}: {} definitions under `{key}`, which takes one; put \
                                 several under `checks`",
                                items.len()
                            ));
                        }
                        *v = items.pop().unwrap_or(Value::Null);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(service)
}
