//! OCI images built from the project's Dockerfiles without docker or a registry, for containerd.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use meshaccel_e2e::image::{BuildRequest, build};
//! let mut req = BuildRequest::new("accelerator/Dockerfile", "meshaccel.local/meshaccel:dev");
//! // The Dockerfile's `build` stage is what cargo does on the host: its output is given here.
//! req.stage_file("build", "/out/meshaccel", "target/debug/meshaccel");
//! let image = build(&req, "/tmp/meshaccel.tar".as_ref())?;
//! // `ctr -n k8s.io images import /tmp/meshaccel.tar` names it meshaccel.local/meshaccel:dev.
//! # let _ = image; Ok(()) }
//! ```
//!
//! A small Dockerfile interpreter builds the Dockerfile's *final stage* only, so that the
//! Dockerfile stays the one definition of the image (and stays valid for a real `docker build`):
//!
//! - `FROM debian:<release>-slim`: a Debian root filesystem made by `debootstrap
//!   --variant=minbase <release>` (close to the official slim image, not identical: no
//!   docs/locales exclusion), cached under `$MESHACCEL_CACHE` (default /var/cache/meshaccel) as
//!   `rootfs-debian-<release>-minbase-<recipe>/`. No other base image can be made here.
//! - `ARG` (with defaults, overridable by the caller; global ARGs before the first FROM) and `ENV`
//!   are substituted (`$VAR`, `${VAR}`, `${VAR:-default}`) in FROM, COPY, ENV, WORKDIR, USER and
//!   LABEL, as docker does; RUN gets them as environment variables (its shell expands them).
//! - `RUN` runs with `chroot` in a copy of the current root filesystem, in a private mount
//!   namespace with its own /proc and a minimal /dev, and the host's resolv.conf (removed again
//!   afterwards), so apt reaches the host's Debian mirror. Each RUN's result is cached under
//!   `$MESHACCEL_CACHE/image-steps/<key>/`, the key hashing the base and every preceding
//!   instruction (with the content of copied files), so a rebuild only writes the layer.
//! - `COPY <src>... <dst>` takes files from the caller's context directory; `COPY --from=<stage>`
//!   takes the files the caller maps with [`BuildRequest::stage_file`] (the earlier stages are
//!   what the host's cargo build does) and refuses any path it cannot map.
//! - `USER`, `ENTRYPOINT`, `CMD`, `ENV`, `WORKDIR`, `LABEL` go into the OCI image config (docker's
//!   defaults of the Debian image apply: PATH, `CMD ["bash"]` until an ENTRYPOINT resets it).
//! - Any other instruction, flag or form is an error naming the file and line.
//!
//! The output is an OCI image layout in a tar file (`oci-layout`, `index.json` whose manifest
//! carries the reference in `org.opencontainers.image.ref.name` and `io.containerd.image.name`, the
//! manifest, the config and one uncompressed layer holding the whole final root filesystem).
//!
//! Everything on disk needs root (debootstrap, chroot, mounts, file ownership).
//!
//! The module has a pure part (parsing, planning, substitution, cache keys, OCI JSON) and an I/O
//! part (base rootfs, RUN, layer and tarball), below.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{self, BufWriter, Read as _, Write},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Bump when the way a base root filesystem is made changes (it is part of its cache path).
const BASE_RECIPE: u32 = 2;
/// Bump when the way a RUN step is executed changes (it is part of every step key).
const STEP_RECIPE: u32 = 1;
/// The Debian mirror debootstrap and the images' apt use (the one this machine can reach).
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// What docker's debian image sets; ENV may extend it.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// =============================================================================================
// Pure part: parsing

/// One instruction of a Dockerfile, continuation lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line where the instruction starts (for errors).
    pub line: usize,
    /// Upper-cased keyword (`RUN`, `COPY`, ...).
    pub keyword: String,
    /// `--name=value` flags before the arguments (`--from=build`).
    pub flags: Vec<(String, String)>,
    pub args: Args,
}

/// The two forms docker accepts for RUN/CMD/ENTRYPOINT (and a plain string for the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Args {
    Shell(String),
    Exec(Vec<String>),
}

impl Args {
    fn text(&self) -> String {
        match self {
            Args::Shell(s) => s.clone(),
            Args::Exec(v) => serde_json::to_string(v).unwrap_or_default(),
        }
    }
}

/// Splits a Dockerfile into instructions: comments and blank lines dropped (so comment lines
/// inside a continued RUN do not end it, as in docker), `\` continuations joined.
pub fn parse(text: &str, file: &Path) -> anyhow::Result<Vec<Instruction>> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                acc.push_str(head);
                acc.push(' ');
                pending = Some((start, acc));
            }
            None => {
                acc.push_str(trimmed);
                out.push(parse_instruction(start, &acc, file)?);
            }
        }
    }
    if let Some((line, _)) = pending {
        bail!(
            "{}:{line}: the instruction's last line ends with `\\` (nothing continues it)",
            file.display()
        );
    }
    Ok(out)
}

fn parse_instruction(line: usize, text: &str, file: &Path) -> anyhow::Result<Instruction> {
    let (keyword, mut rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let mut flags = Vec::new();
    loop {
        rest = rest.trim_start();
        let Some(flag) = rest.strip_prefix("--") else {
            break;
        };
        let end = flag.find(char::is_whitespace).unwrap_or(flag.len());
        let (name, value) = flag[..end].split_once('=').unwrap_or((&flag[..end], ""));
        flags.push((name.to_string(), value.to_string()));
        rest = &flag[end..];
    }
    let rest = rest.trim();
    let args = if rest.starts_with('[') {
        match serde_json::from_str::<Vec<String>>(rest) {
            Ok(v) => Args::Exec(v),
            // docker too falls back to the shell form when the JSON does not parse.
            Err(_) => Args::Shell(rest.to_string()),
        }
    } else {
        Args::Shell(rest.to_string())
    };
    if keyword.is_empty() {
        bail!("{}:{line}: empty instruction", file.display());
    }
    Ok(Instruction {
        line,
        keyword: keyword.to_ascii_uppercase(),
        flags,
        args,
    })
}

// =============================================================================================
// Pure part: substitution

/// Expands `$VAR`, `${VAR}`, `${VAR:-default}` and `${VAR:+alt}` with `vars` (unset = empty, as in
/// docker); `\$` is a literal `$`. `what` names the input for errors.
pub fn substitute(s: &str, vars: &BTreeMap<String, String>, what: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                out.push('$');
                chars.next();
            }
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let mut body = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => body.push(c),
                        None => bail!("{what}: `${{` without a closing `}}` in `{s}`"),
                    }
                }
                out.push_str(&expand_braced(&body, vars, what)?);
            }
            '$' if chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == '_') =>
            {
                let mut name = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        name.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn expand_braced(
    body: &str,
    vars: &BTreeMap<String, String>,
    what: &str,
) -> anyhow::Result<String> {
    let (name, op) = match body.find(':') {
        Some(i) => (&body[..i], Some(&body[i..])),
        None => (body, None),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("{what}: `${{{body}}}` is not a variable this interpreter can expand");
    }
    let value = vars.get(name).filter(|v| !v.is_empty());
    Ok(match op {
        None => value.cloned().unwrap_or_default(),
        Some(op) if op.starts_with(":-") => value.cloned().unwrap_or_else(|| op[2..].to_string()),
        Some(op) if op.starts_with(":+") => value.map(|_| op[2..].to_string()).unwrap_or_default(),
        Some(op) => bail!("{what}: `${{{name}{op}}}`: only :- and :+ are supported"),
    })
}

/// Docker's `KEY=value KEY2="v 2"` list (ENV, LABEL), or the legacy `KEY value` form.
fn key_values(s: &str, what: &str) -> anyhow::Result<Vec<(String, String)>> {
    let words = shell_words(s, what)?;
    if words.len() >= 2 && !words[0].contains('=') {
        let (k, v) = s.trim().split_once(char::is_whitespace).unwrap_or_default();
        return Ok(vec![(k.to_string(), v.trim().to_string())]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{what}: `{w}` is not KEY=value"),
        })
        .collect()
}

/// Whitespace-separated words with "double" and 'single' quotes (what ENV, LABEL, COPY need).
fn shell_words(s: &str, what: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => cur.extend(chars.next()),
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                cur.extend(chars.next());
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        bail!("{what}: unterminated quote in `{s}`");
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

// =============================================================================================
// Pure part: the plan of the final stage

/// The base image a `FROM` maps to: a debootstrapped Debian.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub release: String,
    pub variant: String,
}

impl Base {
    /// The cache directory name: keyed by release, variant and recipe.
    pub fn cache_name(&self) -> String {
        format!(
            "rootfs-debian-{}-{}-{BASE_RECIPE}",
            self.release, self.variant
        )
    }
}

/// A change to the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Run {
        line: usize,
        /// The exec form's argv, or `["/bin/sh", "-c", <shell form>]`.
        argv: Vec<String>,
        /// ARG and ENV values in effect (RUN sees both as environment variables).
        env: BTreeMap<String, String>,
        /// The USER in effect (numeric `uid[:gid]` only: names would be resolved against the host).
        user: Option<String>,
        workdir: String,
    },
    Copy {
        line: usize,
        /// Host files (resolved from the context dir or the caller's stage files).
        sources: Vec<PathBuf>,
        /// Absolute path in the image of each source.
        dests: Vec<String>,
        uid: u32,
        gid: u32,
    },
    Mkdir {
        path: String,
    },
}

/// The runtime settings that go into the OCI image config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    pub user: Option<String>,
    pub env: Vec<(String, String)>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// What building the final stage of a Dockerfile takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub base: Base,
    pub steps: Vec<Step>,
    pub config: ImageConfig,
}

/// Where COPY sources come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The build context directory of plain `COPY <src>` (none: such COPYs are an error).
    pub context: Option<PathBuf>,
    /// (stage, absolute path in that stage) → host file, for `COPY --from=<stage>`.
    pub stage_files: BTreeMap<(String, String), PathBuf>,
}

/// Plans the final stage of `instructions` (from `file`, for errors) with the caller's build
/// arguments overriding ARG defaults.
pub fn plan(
    instructions: &[Instruction],
    file: &Path,
    build_args: &BTreeMap<String, String>,
    sources: &Sources,
) -> anyhow::Result<Plan> {
    let at = |line: usize| format!("{}:{line}", file.display());
    let Some(last_from) = instructions.iter().rposition(|i| i.keyword == "FROM") else {
        bail!("{}: no FROM instruction", file.display());
    };
    // Global ARGs (before the first FROM) are visible to FROM lines, and to a stage that
    // redeclares them without a default.
    let mut global = BTreeMap::new();
    for ins in instructions.iter().take_while(|i| i.keyword != "FROM") {
        if ins.keyword != "ARG" {
            bail!(
                "{}: only ARG may come before the first FROM, not {}",
                at(ins.line),
                ins.keyword
            );
        }
        let (name, value) = arg_decl(ins, &global, build_args, &at)?;
        global.insert(name, value);
    }
    // Earlier stages are the host's business (cargo), but their instructions must still be ones
    // this file format has, so that a typo is not silently ignored.
    for ins in &instructions[..last_from] {
        if !KNOWN.contains(&ins.keyword.as_str()) {
            bail!("{}: unknown instruction {}", at(ins.line), ins.keyword);
        }
    }
    let from = &instructions[last_from];
    let base = from_base(from, &global, &at)?;

    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut env: Vec<(String, String)> = vec![("PATH".into(), DEFAULT_PATH.into())];
    let mut config = ImageConfig {
        cmd: Some(vec!["bash".into()]),
        ..Default::default()
    };
    let mut steps = Vec::new();
    let mut workdir = "/".to_string();
    for ins in &instructions[last_from + 1..] {
        let what = at(ins.line);
        let allowed_flags: &[&str] = match ins.keyword.as_str() {
            "COPY" => &["from", "chown"],
            _ => &[],
        };
        if let Some((flag, _)) = ins
            .flags
            .iter()
            .find(|(f, _)| !allowed_flags.contains(&f.as_str()))
        {
            bail!(
                "{what}: {} --{flag} is not supported by this interpreter (see e2e/src/image.rs)",
                ins.keyword
            );
        }
        match ins.keyword.as_str() {
            "ARG" => {
                let (name, value) = arg_decl(ins, &global, build_args, &at)?;
                args.insert(name, value);
            }
            "ENV" => {
                let text = ins.args.text();
                for (k, v) in key_values(&text, &what)? {
                    let v = substitute(&v, &vars(&args, &env), &what)?;
                    env.retain(|(e, _)| *e != k);
                    env.push((k, v));
                }
            }
            "LABEL" => {
                for (k, v) in key_values(&ins.args.text(), &what)? {
                    config
                        .labels
                        .insert(k, substitute(&v, &vars(&args, &env), &what)?);
                }
            }
            "WORKDIR" => {
                let dir = substitute(ins.args.text().trim(), &vars(&args, &env), &what)?;
                workdir = if dir.starts_with('/') {
                    dir
                } else {
                    format!("{}/{dir}", workdir.trim_end_matches('/'))
                };
                config.workdir = Some(workdir.clone());
                steps.push(Step::Mkdir {
                    path: workdir.clone(),
                });
            }
            "USER" => {
                let user = substitute(ins.args.text().trim(), &vars(&args, &env), &what)?;
                if user.is_empty() {
                    bail!("{what}: USER needs a user");
                }
                config.user = Some(user);
            }
            "ENTRYPOINT" => {
                config.entrypoint = Some(command_argv(&ins.args));
                // docker: an ENTRYPOINT resets the CMD inherited from the base image.
                config.cmd = None;
            }
            "CMD" => config.cmd = Some(command_argv(&ins.args)),
            "RUN" => {
                if let Some(user) = &config.user
                    && !user
                        .split(':')
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                {
                    bail!(
                        "{what}: RUN after USER {user}: only numeric uid[:gid] can be used for RUN \
                         here (a name would be looked up on the host, not in the image)"
                    );
                }
                let mut run_env = args.clone();
                run_env.extend(env.iter().cloned());
                steps.push(Step::Run {
                    line: ins.line,
                    argv: command_argv(&ins.args),
                    env: run_env,
                    user: config.user.clone(),
                    workdir: workdir.clone(),
                });
            }
            "COPY" => steps.push(copy_step(
                ins,
                &vars(&args, &env),
                &workdir,
                sources,
                &what,
            )?),
            other => bail!(
                "{what}: instruction {other} is not supported by this interpreter (it knows ARG, \
                 ENV, LABEL, WORKDIR, USER, ENTRYPOINT, CMD, RUN, COPY; see e2e/src/image.rs)"
            ),
        }
    }
    config.env = env;
    Ok(Plan {
        base,
        steps,
        config,
    })
}

/// What substitution sees: ARGs, then ENV (ENV wins, as in docker).
fn vars(args: &BTreeMap<String, String>, env: &[(String, String)]) -> BTreeMap<String, String> {
    let mut v = args.clone();
    v.extend(env.iter().cloned());
    v
}

const KNOWN: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// `ARG NAME[=default]`: the caller's value, else the default, else the global ARG of that name.
fn arg_decl(
    ins: &Instruction,
    global: &BTreeMap<String, String>,
    build_args: &BTreeMap<String, String>,
    at: &dyn Fn(usize) -> String,
) -> anyhow::Result<(String, String)> {
    let text = ins.args.text();
    let text = text.trim();
    let (name, default) = match text.split_once('=') {
        Some((n, d)) => (n, Some(d.trim_matches('"'))),
        None => (text, None),
    };
    if name.is_empty() || text.contains(char::is_whitespace) {
        bail!(
            "{}: ARG must be one `NAME` or `NAME=default`, got `{text}`",
            at(ins.line)
        );
    }
    let value = match (build_args.get(name), default) {
        (Some(v), _) => v.clone(),
        (None, Some(d)) => substitute(d, global, &at(ins.line))?,
        (None, None) => global.get(name).cloned().unwrap_or_default(),
    };
    Ok((name.to_string(), value))
}

fn from_base(
    from: &Instruction,
    global: &BTreeMap<String, String>,
    at: &dyn Fn(usize) -> String,
) -> anyhow::Result<Base> {
    let what = at(from.line);
    if let Some((flag, _)) = from.flags.first() {
        bail!("{what}: FROM --{flag} is not supported");
    }
    let text = substitute(&from.args.text(), global, &what)?;
    let image = text.split_whitespace().next().unwrap_or_default();
    let release = image
        .strip_prefix("debian:")
        .and_then(|t| t.strip_suffix("-slim"))
        .filter(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric()));
    match release {
        Some(release) => Ok(Base {
            release: release.to_string(),
            variant: "minbase".into(),
        }),
        None => bail!(
            "{what}: the final stage is FROM {image}: only debian:<release>-slim can be built \
             here (it is made with debootstrap --variant=minbase)"
        ),
    }
}

fn command_argv(args: &Args) -> Vec<String> {
    match args {
        Args::Exec(v) => v.clone(),
        Args::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
    }
}

fn copy_step(
    ins: &Instruction,
    vars: &BTreeMap<String, String>,
    workdir: &str,
    sources: &Sources,
    what: &str,
) -> anyhow::Result<Step> {
    let words = match &ins.args {
        Args::Exec(v) => v.clone(),
        Args::Shell(s) => shell_words(s, what)?,
    };
    let words = words
        .iter()
        .map(|w| substitute(w, vars, what))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let [srcs @ .., dst] = words.as_slice() else {
        bail!("{what}: COPY needs a source and a destination");
    };
    if srcs.is_empty() {
        bail!("{what}: COPY needs a source and a destination");
    }
    let dst = if dst.starts_with('/') {
        dst.clone()
    } else {
        format!("{}/{dst}", workdir.trim_end_matches('/'))
    };
    let into_dir = dst.ends_with('/');
    if srcs.len() > 1 && !into_dir {
        bail!("{what}: COPY with several sources needs a destination ending in `/`");
    }
    let (mut uid, mut gid) = (0, 0);
    let mut from = None;
    for (flag, value) in &ins.flags {
        match flag.as_str() {
            "from" => from = Some(value.clone()),
            "chown" => {
                let (u, g) = value.split_once(':').unwrap_or((value, value));
                match (u.parse(), g.parse()) {
                    (Ok(u), Ok(g)) => (uid, gid) = (u, g),
                    _ => bail!("{what}: COPY --chown={value}: only numeric uid:gid is supported"),
                }
            }
            _ => unreachable!("flags were checked"),
        }
    }
    let mut host = Vec::new();
    let mut dests = Vec::new();
    for src in srcs {
        host.push(copy_source(from.as_deref(), src, sources, what)?);
        let name = Path::new(src)
            .file_name()
            .with_context(|| format!("{what}: COPY source `{src}` has no file name"))?
            .to_string_lossy()
            .into_owned();
        dests.push(if into_dir {
            format!("{dst}{name}")
        } else {
            dst.clone()
        });
    }
    for d in &dests {
        check_image_path(d).with_context(|| what.to_string())?;
    }
    Ok(Step::Copy {
        line: ins.line,
        sources: host,
        dests,
        uid,
        gid,
    })
}

fn copy_source(
    from: Option<&str>,
    src: &str,
    sources: &Sources,
    what: &str,
) -> anyhow::Result<PathBuf> {
    match from {
        Some(stage) => {
            let key = (stage.to_string(), src.to_string());
            match sources.stage_files.get(&key) {
                Some(p) => Ok(p.clone()),
                None => bail!(
                    "{what}: COPY --from={stage} {src}: this interpreter does not build stage \
                     `{stage}`; the caller must provide that file (BuildRequest::stage_file(\"{stage}\", \
                     \"{src}\", <host file>)); it provides {:?}",
                    sources.stage_files.keys().collect::<Vec<_>>()
                ),
            }
        }
        None => {
            let Some(context) = &sources.context else {
                bail!("{what}: COPY {src} needs a build context directory (BuildRequest::context)");
            };
            let rel = Path::new(src);
            if rel.is_absolute() || rel.components().any(|c| c == Component::ParentDir) {
                bail!("{what}: COPY {src}: the source must be a path inside the build context");
            }
            Ok(context.join(rel))
        }
    }
}

/// A destination must be absolute and plain (no `..`, no `.`), so the layer path is exact.
fn check_image_path(p: &str) -> anyhow::Result<()> {
    let path = Path::new(p);
    if !path.is_absolute()
        || path
            .components()
            .skip(1)
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        bail!("image path `{p}` must be absolute without `.` or `..`");
    }
    Ok(())
}

// =============================================================================================
// Pure part: cache keys and OCI documents

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The next key of the chain: the key of everything before, and this part.
pub fn chain_key(prev: &str, part: &str) -> String {
    sha256_hex(format!("{prev}\n{part}").as_bytes())
}

/// The first key of a chain: the base and the step recipe.
pub fn base_key(base: &Base) -> String {
    sha256_hex(format!("{}\nsteps-{STEP_RECIPE}", base.cache_name()).as_bytes())
}

/// The key part of a step. Copied files enter by content (`digests`, one per source), so a
/// rebuilt binary invalidates the RUNs after its COPY.
pub fn step_key_part(step: &Step, digests: &[String]) -> String {
    match step {
        Step::Run {
            argv,
            env,
            user,
            workdir,
            ..
        } => json!({"run": argv, "env": env, "user": user, "workdir": workdir}).to_string(),
        Step::Copy {
            dests, uid, gid, ..
        } => json!({"copy": dests, "sha256": digests, "uid": uid, "gid": gid}).to_string(),
        Step::Mkdir { path } => json!({ "mkdir": path }).to_string(),
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: &'static str,
    /// Hex SHA-256, without `sha256:`.
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn of(media_type: &'static str, data: &[u8]) -> Self {
        Descriptor {
            media_type,
            digest: sha256_hex(data),
            size: data.len() as u64,
        }
    }
    fn json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": format!("sha256:{}", self.digest), "size": self.size})
    }
}

pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// The OCI image config: runtime settings and the layer's diff id (uncompressed = its digest).
pub fn config_json(config: &ImageConfig, layer_digest: &str) -> Value {
    let mut c = serde_json::Map::new();
    if let Some(u) = &config.user {
        c.insert("User".into(), json!(u));
    }
    let env: Vec<String> = config.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    c.insert("Env".into(), json!(env));
    if let Some(e) = &config.entrypoint {
        c.insert("Entrypoint".into(), json!(e));
    }
    if let Some(cmd) = &config.cmd {
        c.insert("Cmd".into(), json!(cmd));
    }
    if let Some(w) = &config.workdir {
        c.insert("WorkingDir".into(), json!(w));
    }
    if !config.labels.is_empty() {
        c.insert("Labels".into(), json!(config.labels));
    }
    json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created_by": "meshaccel-e2e image builder (e2e/src/image.rs)"}],
    })
}

/// The OCI manifest of one config and one layer.
pub fn manifest_json(config: &Descriptor, layer: &Descriptor) -> Value {
    json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.json(),
        "layers": [layer.json()],
    })
}

/// The layout's index: one manifest named `reference` (both annotations: containerd's import
/// takes `io.containerd.image.name` as is, other tools read the OCI one).
pub fn index_json(manifest: &Descriptor, reference: &str) -> Value {
    let mut m = manifest.json();
    m["platform"] = json!({"architecture": oci_arch(), "os": "linux"});
    m["annotations"] = json!({
        "org.opencontainers.image.ref.name": reference,
        "io.containerd.image.name": reference,
    });
    json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [m]})
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

// =============================================================================================
// I/O part

/// One image to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub dockerfile: PathBuf,
    /// The image reference, e.g. `meshaccel.local/meshaccel:dev`.
    pub reference: String,
    pub sources: Sources,
    pub build_args: BTreeMap<String, String>,
}

impl BuildRequest {
    pub fn new(dockerfile: impl Into<PathBuf>, reference: impl Into<String>) -> Self {
        BuildRequest {
            dockerfile: dockerfile.into(),
            reference: reference.into(),
            sources: Sources::default(),
            build_args: BTreeMap::new(),
        }
    }

    /// The context directory of plain `COPY <src>`.
    pub fn context(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.sources.context = Some(dir.into());
        self
    }

    /// `COPY --from=<stage> <path>` takes `host` (the host build made what that stage would).
    pub fn stage_file(&mut self, stage: &str, path: &str, host: impl Into<PathBuf>) -> &mut Self {
        self.sources
            .stage_files
            .insert((stage.to_string(), path.to_string()), host.into());
        self
    }

    pub fn build_arg(&mut self, name: &str, value: &str) -> &mut Self {
        self.build_args.insert(name.into(), value.into());
        self
    }
}

/// A built image tarball.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub tarball: PathBuf,
    pub reference: String,
    /// `sha256:<hex>` of the manifest (what containerd lists as the image's digest).
    pub manifest_digest: String,
    pub config: ImageConfig,
}

/// Where cached root filesystems live: `$MESHACCEL_CACHE`, default /var/cache/meshaccel.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MESHACCEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/meshaccel"))
}

/// Builds the final stage of `req.dockerfile` into an OCI image tarball at `out`.
pub fn build(req: &BuildRequest, out: &Path) -> anyhow::Result<BuiltImage> {
    let text = fs::read_to_string(&req.dockerfile)
        .with_context(|| format!("reading {}", req.dockerfile.display()))?;
    let instructions = parse(&text, &req.dockerfile)?;
    let plan = plan(
        &instructions,
        &req.dockerfile,
        &req.build_args,
        &req.sources,
    )?;
    let cache = cache_dir();
    let mut root = base_rootfs(&plan.base, &cache)?;
    let mut key = base_key(&plan.base);
    // Files and directories added since the last RUN: they go into the layer on top of `root`
    // without copying the whole tree.
    let mut overlay: Vec<Overlay> = Vec::new();
    for step in &plan.steps {
        match step {
            Step::Run { line, .. } => {
                key = chain_key(&key, &step_key_part(step, &[]));
                root = run_step(step, &root, &overlay, &key, &cache)
                    .with_context(|| format!("{}:{line}: RUN", req.dockerfile.display()))?;
                overlay.clear();
            }
            Step::Copy {
                line,
                sources,
                dests,
                uid,
                gid,
            } => {
                let mut digests = Vec::new();
                for (src, dst) in sources.iter().zip(dests) {
                    let meta = fs::metadata(src).with_context(|| {
                        format!(
                            "{}:{line}: COPY source {} (build it first?)",
                            req.dockerfile.display(),
                            src.display()
                        )
                    })?;
                    if !meta.is_file() {
                        bail!(
                            "{}:{line}: COPY source {} is not a regular file (only files can be copied here)",
                            req.dockerfile.display(),
                            src.display()
                        );
                    }
                    digests.push(file_sha256(src)?);
                    overlay.push(Overlay::File {
                        dst: dst.clone(),
                        src: src.clone(),
                        mode: meta.mode() & 0o7777,
                        uid: *uid,
                        gid: *gid,
                    });
                }
                key = chain_key(&key, &step_key_part(step, &digests));
            }
            Step::Mkdir { path } => {
                key = chain_key(&key, &step_key_part(step, &[]));
                overlay.push(Overlay::Dir { dst: path.clone() });
            }
        }
    }
    write_tarball(&root, &overlay, &plan.config, &req.reference, out)
}

/// An image `FROM scratch` holding only `files` (host path, absolute image path), mode and
/// content as on the host, owned by root: what Kubernetes' build/pause Dockerfile makes of the
/// pause binary.
pub fn scratch_image(
    files: &[(PathBuf, String)],
    config: &ImageConfig,
    reference: &str,
    out: &Path,
) -> anyhow::Result<BuiltImage> {
    let empty = tempfile::tempdir().context("creating an empty root")?;
    let overlay = files
        .iter()
        .map(|(src, dst)| {
            check_image_path(dst)?;
            let meta = fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
            Ok(Overlay::File {
                dst: dst.clone(),
                src: src.clone(),
                mode: meta.mode() & 0o7777,
                uid: 0,
                gid: 0,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    write_tarball(empty.path(), &overlay, config, reference, out)
}

/// What a COPY or WORKDIR adds on top of a root filesystem.
#[derive(Debug, Clone)]
enum Overlay {
    File {
        dst: String,
        src: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Dir {
        dst: String,
    },
}

impl Overlay {
    fn dst(&self) -> &str {
        match self {
            Overlay::File { dst, .. } | Overlay::Dir { dst } => dst,
        }
    }
}

fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

fn run_cmd(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what}: {cmd:?} failed ({status})");
    }
    Ok(())
}

fn have(cmd: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(cmd).is_file())
}

/// A unique sibling name for building `target` before renaming it into place.
fn temp_sibling(target: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}

/// Renames a finished `tmp` to `target`; when another build got there first (same key, same
/// content) its copy is kept and ours removed.
fn publish(tmp: &Path, target: &Path) -> anyhow::Result<()> {
    match fs::rename(tmp, target) {
        Ok(()) => Ok(()),
        Err(_) if target.is_dir() => {
            fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))
        }
        Err(e) => {
            Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))
        }
    }
}

/// Removes `dir` on drop unless disarmed: a failed build leaves no half-made cache entry.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// The cached Debian root filesystem of `base`, made with debootstrap when missing.
pub fn base_rootfs(base: &Base, cache: &Path) -> anyhow::Result<PathBuf> {
    let target = cache.join(base.cache_name());
    if target.join("usr/bin/apt-get").is_file() {
        return Ok(target);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    if !have("debootstrap") {
        eprintln!("[image] installing debootstrap with apt-get");
        run_cmd(
            Command::new("apt-get").args(["install", "-y", "-qq", "debootstrap"]),
            "installing debootstrap (or run scripts/install-cluster.sh)",
        )?;
    }
    let tmp = temp_sibling(&target);
    let guard = RemoveOnDrop(Some(tmp.clone()));
    eprintln!(
        "[image] debootstrap --variant={} {} into {} (a few minutes, once)",
        base.variant,
        base.release,
        target.display()
    );
    let started = Instant::now();
    // In a private mount namespace: debootstrap mounts /proc and /sys in the target and may
    // leave them mounted when it fails; they go away with the namespace.
    run_cmd(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "debootstrap"])
            .arg(format!("--variant={}", base.variant))
            .arg(&base.release)
            .arg(&tmp)
            .arg(DEBIAN_MIRROR)
            .stdout(Stdio::null()),
        &format!("debootstrap {} (needs {DEBIAN_MIRROR})", base.release),
    )?;
    finish_base(&tmp, &base.release)?;
    publish(&tmp, &target)?;
    std::mem::forget(guard);
    eprintln!(
        "[image] base {} ready in {:.0?}",
        target.display(),
        started.elapsed()
    );
    Ok(target)
}

/// Makes a debootstrapped tree look like docker's debian image where it matters: the same apt
/// sources (updates and security too), no host identity, no package cache.
fn finish_base(root: &Path, release: &str) -> anyhow::Result<()> {
    let sources = format!(
        "Types: deb\nURIs: {DEBIAN_MIRROR}\nSuites: {release} {release}-updates\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
         Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: {release}-security\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    fs::create_dir_all(root.join("etc/apt/sources.list.d"))?;
    fs::write(root.join("etc/apt/sources.list.d/debian.sources"), sources)
        .context("writing the image's apt sources")?;
    for f in ["etc/apt/sources.list", "etc/resolv.conf", "etc/hostname"] {
        match fs::remove_file(root.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {f} from the base")),
        }
    }
    fs::write(root.join("etc/apt/apt.conf.d/docker-clean"), APT_CLEAN)
        .context("writing the image's apt cleanup config")?;
    fs::create_dir_all(root.join("etc/dpkg/dpkg.cfg.d"))?;
    fs::write(root.join("etc/dpkg/dpkg.cfg.d/docker"), DPKG_EXCLUDES)
        .context("writing the image's dpkg excludes")?;
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "var/cache/apt",
    ] {
        clear_files(&root.join(dir))?;
    }
    // What the excludes keep out of later packages, out of the base's too (as in the slim image).
    run_cmd(
        Command::new("sh")
            .arg("-c")
            .arg(
                "cd \"$1\" && find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete && \
                 find usr/share/doc -mindepth 1 -type d -empty -delete && \
                 rm -rf usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/groff/* \
                   usr/share/lintian/overrides/*",
            )
            .arg("finish-base")
            .arg(root),
        "removing docs, man pages and locales from the base",
    )
}

/// docker's debian images: apt keeps no package files and no pkgcache (80 MB in every RUN step
/// that runs apt-get update otherwise).
const APT_CLEAN: &str = r#"DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"#;

/// The slim image's dpkg excludes: no docs but copyrights, no man pages, no locales.
const DPKG_EXCLUDES: &str = "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n\
path-exclude /usr/share/groff/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/linda/*\n\
path-exclude /usr/share/lintian/overrides/*\npath-exclude /usr/share/locale/*\npath-exclude /usr/share/man/*\n";

fn clear_files(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let e = e?;
        if e.file_type()?.is_file() {
            fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Runs a RUN step on a copy of `root` plus `overlay`; the result is cached under `key`.
fn run_step(
    step: &Step,
    root: &Path,
    overlay: &[Overlay],
    key: &str,
    cache: &Path,
) -> anyhow::Result<PathBuf> {
    let Step::Run {
        argv,
        env,
        user,
        workdir,
        ..
    } = step
    else {
        unreachable!("run_step takes RUN steps");
    };
    let steps = cache.join("image-steps");
    let target = steps.join(key);
    if target.join(".done").is_file() {
        eprintln!("[image] RUN cached: {}", short(&argv.join(" ")));
        return Ok(target);
    }
    fs::create_dir_all(&steps).with_context(|| format!("creating {}", steps.display()))?;
    let tmp = temp_sibling(&target);
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let started = Instant::now();
    // cp keeps hard links, devices, ownership and modes; `--reflink=auto` is free where supported.
    run_cmd(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(root)
            .arg(&tmp),
        "copying the root filesystem for RUN",
    )?;
    for o in overlay {
        apply_overlay(&tmp, o)?;
    }
    fs::create_dir_all(tmp.join(workdir.trim_start_matches('/')))?;
    let resolv = tmp.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    fs::copy("/etc/resolv.conf", &resolv).context("copying the host's /etc/resolv.conf in")?;
    eprintln!("[image] RUN {}", short(&argv.join(" ")));
    let result = chroot_run(&tmp, argv, env, user.as_deref(), workdir);
    let _ = fs::remove_file(&resolv);
    result?;
    fs::write(tmp.join(".done"), b"").context("marking the step done")?;
    publish(&tmp, &target)?;
    std::mem::forget(guard);
    eprintln!("[image] RUN done in {:.0?}", started.elapsed());
    Ok(target)
}

fn short(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match s.char_indices().nth(100) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// The mount namespace script of a RUN: a fresh /proc, a tmpfs /dev with the host's harmless
/// nodes bound in, then chroot. Nothing outlives the namespace, also when the step fails.
const CHROOT_SCRIPT: &str = r#"set -eu
root=$1; userspec=$2; workdir=$3; shift 3
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=755,size=16m tmpfs "$root/dev"
for n in null zero full random urandom tty; do
  : > "$root/dev/$n"; mount --bind "/dev/$n" "$root/dev/$n"
done
ln -s /proc/self/fd "$root/dev/fd"; ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"; ln -s /proc/self/fd/2 "$root/dev/stderr"
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
exec chroot ${userspec:+--userspec=$userspec} "$root" /bin/sh -c 'cd -- "$0" && exec "$@"' "$workdir" "$@"
"#;

fn chroot_run(
    root: &Path,
    argv: &[String],
    env: &BTreeMap<String, String>,
    user: Option<&str>,
    workdir: &str,
) -> anyhow::Result<()> {
    let userspec = match user {
        Some(u) if u.contains(':') => u.to_string(),
        Some(u) => format!("{u}:{u}"),
        None => String::new(),
    };
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(CHROOT_SCRIPT)
        .arg("meshaccel-image-run")
        .arg(root)
        .arg(&userspec)
        .arg(workdir)
        .arg("/usr/bin/env")
        .arg("-i")
        .arg("HOME=/root")
        .args(env.iter().map(|(k, v)| format!("{k}={v}")))
        .args(argv)
        .stdin(Stdio::null());
    run_cmd(&mut cmd, "the RUN command")
}

fn apply_overlay(root: &Path, o: &Overlay) -> anyhow::Result<()> {
    let path = root.join(o.dst().trim_start_matches('/'));
    check_no_symlink_parents(root, o.dst())?;
    match o {
        Overlay::Dir { .. } => {
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?
        }
        Overlay::File {
            src,
            mode,
            uid,
            gid,
            ..
        } => {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let _ = fs::remove_file(&path);
            fs::copy(src, &path)
                .with_context(|| format!("copying {} to {}", src.display(), path.display()))?;
            std::os::unix::fs::chown(&path, Some(*uid), Some(*gid))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
        }
    }
    Ok(())
}

/// A COPY through a symlinked directory (`/bin` → `usr/bin` in Debian's merged /usr) would put a
/// second, conflicting entry into the layer: refuse it and name the real path.
fn check_no_symlink_parents(root: &Path, dst: &str) -> anyhow::Result<()> {
    let mut cur = root.to_path_buf();
    let parts: Vec<_> = Path::new(dst).components().skip(1).collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        cur.push(part);
        if fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "image path {dst} goes through the symlink /{}: use the path it points to",
                cur.strip_prefix(root).unwrap_or(&cur).display()
            );
        }
    }
    Ok(())
}

/// Counts and hashes what goes through it (the layer's digest without reading it twice).
struct HashingWriter<W> {
    inner: W,
    ctx: ring::digest::Context,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the layer (the tree at `root` with `overlay` on top) and the OCI layout tarball.
fn write_tarball(
    root: &Path,
    overlay: &[Overlay],
    config: &ImageConfig,
    reference: &str,
    out: &Path,
) -> anyhow::Result<BuiltImage> {
    let started = Instant::now();
    let layer_path = out.with_extension("layer.tmp");
    let _layer_guard = RemoveFileOnDrop(layer_path.clone());
    let layer = write_layer(root, overlay, &layer_path)?;
    let config_bytes = serde_json::to_vec(&config_json(config, &layer.digest))?;
    let config_desc = Descriptor::of(MEDIA_CONFIG, &config_bytes);
    let manifest_bytes = serde_json::to_vec(&manifest_json(&config_desc, &layer))?;
    let manifest_desc = Descriptor::of(MEDIA_MANIFEST, &manifest_bytes);
    let index_bytes = serde_json::to_vec(&index_json(&manifest_desc, reference))?;

    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mut add = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)
            .with_context(|| format!("writing {name} into {}", out.display()))
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index_bytes)?;
    add(
        &format!("blobs/sha256/{}", manifest_desc.digest),
        &manifest_bytes,
    )?;
    add(
        &format!("blobs/sha256/{}", config_desc.digest),
        &config_bytes,
    )?;
    let mut h = tar::Header::new_ustar();
    h.set_size(layer.size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    let layer_file = fs::File::open(&layer_path)?;
    tar.append_data(&mut h, format!("blobs/sha256/{}", layer.digest), layer_file)
        .context("writing the layer into the tarball")?;
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .with_context(|| format!("finishing {}", out.display()))?;
    eprintln!(
        "[image] {reference}: {} ({} MB layer) in {:.1?}",
        out.display(),
        layer.size >> 20,
        started.elapsed()
    );
    Ok(BuiltImage {
        tarball: out.to_path_buf(),
        reference: reference.to_string(),
        manifest_digest: format!("sha256:{}", manifest_desc.digest),
        config: config.clone(),
    })
}

struct RemoveFileOnDrop(PathBuf);

impl Drop for RemoveFileOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Directories whose contents the runtime provides (and /dev's nodes would be the host's).
const RUNTIME_DIRS: &[&str] = &["dev", "proc", "sys"];

fn write_layer(root: &Path, overlay: &[Overlay], path: &Path) -> anyhow::Result<Descriptor> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let hashing = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        ctx: ring::digest::Context::new(&ring::digest::SHA256),
        size: 0,
    };
    let mut tar = tar::Builder::new(hashing);
    tar.mode(tar::HeaderMode::Complete);
    tar.follow_symlinks(false);
    let shadowed: BTreeSet<&str> = overlay
        .iter()
        .map(|o| o.dst().trim_start_matches('/'))
        .collect();
    add_tree(&mut tar, root, Path::new(""), &shadowed)?;
    for o in overlay {
        check_no_symlink_parents(root, o.dst())?;
        add_overlay(&mut tar, root, o)?;
    }
    let hashing = tar.into_inner().context("finishing the layer")?;
    let HashingWriter {
        mut inner,
        ctx,
        size,
    } = hashing;
    inner.flush().context("writing the layer")?;
    Ok(Descriptor {
        media_type: MEDIA_LAYER,
        digest: hex(ctx.finish().as_ref()),
        size,
    })
}

/// Adds the tree under `root/rel` in name order (a stable layer for the same tree).
fn add_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    shadowed: &BTreeSet<&str>,
) -> anyhow::Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let rel_child = rel.join(&name);
        let rel_str = rel_child.to_string_lossy();
        if rel_str == ".done" || shadowed.contains(rel_str.as_ref()) {
            continue;
        }
        let abs = root.join(&rel_child);
        let meta = fs::symlink_metadata(&abs)?;
        if meta.file_type().is_socket() {
            continue;
        }
        tar.append_path_with_name(&abs, &rel_child)
            .with_context(|| format!("adding {} to the layer", abs.display()))?;
        if meta.is_dir()
            && !(rel.as_os_str().is_empty() && RUNTIME_DIRS.contains(&rel_str.as_ref()))
        {
            add_tree(tar, root, &rel_child, shadowed)?;
        }
    }
    Ok(())
}

use std::os::unix::fs::FileTypeExt as _;

fn add_overlay<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    o: &Overlay,
) -> anyhow::Result<()> {
    let rel = o.dst().trim_start_matches('/');
    // Parents the base does not have get directory entries first.
    let mut parent = PathBuf::new();
    let parts: Vec<_> = Path::new(rel).components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        parent.push(part);
        if !root.join(&parent).exists() {
            append_dir(tar, &parent)?;
        }
    }
    match o {
        Overlay::Dir { .. } => {
            if !root.join(rel).is_dir() {
                append_dir(tar, Path::new(rel))?;
            }
        }
        Overlay::File {
            src,
            mode,
            uid,
            gid,
            ..
        } => {
            let f = fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
            let mut h = tar::Header::new_gnu();
            h.set_size(f.metadata()?.len());
            h.set_mode(*mode);
            h.set_uid((*uid).into());
            h.set_gid((*gid).into());
            h.set_mtime(f.metadata()?.mtime().max(0) as u64);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, rel, f)
                .with_context(|| format!("adding {} as /{rel}", src.display()))?;
        }
    }
    Ok(())
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, rel: &Path) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut h, rel, io::empty())
        .with_context(|| format!("adding directory /{}", rel.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<Instruction> {
        parse(s, Path::new("Dockerfile")).unwrap()
    }

    fn sources_with_build() -> Sources {
        let mut s = Sources::default();
        s.stage_files.insert(
            ("build".into(), "/out/meshaccel".into()),
            PathBuf::from("/host/meshaccel"),
        );
        s
    }

    fn plan_of(text: &str, args: &[(&str, &str)], sources: &Sources) -> anyhow::Result<Plan> {
        let args = args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        plan(&p(text), Path::new("Dockerfile"), &args, sources)
    }

    #[test]
    fn parse_joins_continuations_and_skips_comments_inside() {
        let ins = p("# c\nRUN a; \\\n# inner comment\n    b\n\nUSER 1:1\n");
        assert_eq!(ins.len(), 2);
        assert_eq!(ins[0].line, 2);
        assert_eq!(ins[0].args, Args::Shell("a;  b".into()));
        assert_eq!(ins[1].line, 6);
        assert_eq!(ins[1].keyword, "USER");
    }

    #[test]
    fn parse_reads_flags_and_exec_form() {
        let ins = p("copy --from=build /out/x /usr/bin/x\nENTRYPOINT [\"/bin/x\", \"a b\"]\n");
        assert_eq!(ins[0].keyword, "COPY");
        assert_eq!(ins[0].flags, vec![("from".into(), "build".into())]);
        assert_eq!(ins[1].args, Args::Exec(vec!["/bin/x".into(), "a b".into()]));
    }

    #[test]
    fn parse_rejects_dangling_continuation() {
        let e = parse("RUN a \\\n", Path::new("F")).unwrap_err().to_string();
        assert!(e.contains("F:1"), "{e}");
    }

    #[test]
    fn substitute_forms() {
        let vars: BTreeMap<String, String> =
            [("A".to_string(), "x".to_string())].into_iter().collect();
        let s = |t: &str| substitute(t, &vars, "t").unwrap();
        assert_eq!(
            s("$A-${A}-${B:-d}-${A:-d}-${A:+y}-${B:+y}-\\$A"),
            "x-x-d-x-y--$A"
        );
        assert_eq!(s("${B}end"), "end");
        assert!(substitute("${A", &vars, "t").is_err());
        assert!(substitute("${A/x/y}", &vars, "t").is_err());
    }

    #[test]
    fn plans_the_final_stage_of_the_agent_dockerfile() {
        let text = include_str!("../../accelerator/Dockerfile");
        let plan = plan_of(text, &[], &sources_with_build()).unwrap();
        assert_eq!(
            plan.base,
            Base {
                release: "bookworm".into(),
                variant: "minbase".into()
            }
        );
        assert_eq!(plan.steps.len(), 2, "{:?}", plan.steps);
        let Step::Run { argv, env, .. } = &plan.steps[0] else {
            panic!("first step is not RUN: {:?}", plan.steps[0]);
        };
        assert_eq!(argv[..2], ["/bin/sh".to_string(), "-c".to_string()]);
        assert!(
            argv[2].contains("install -y --no-install-recommends iptables"),
            "{argv:?}"
        );
        assert_eq!(env.get("PATH").map(String::as_str), Some(DEFAULT_PATH));
        let Step::Copy { sources, dests, .. } = &plan.steps[1] else {
            panic!("second step is not COPY");
        };
        assert_eq!(sources, &[PathBuf::from("/host/meshaccel")]);
        assert_eq!(dests, &["/usr/local/bin/meshaccel".to_string()]);
        assert_eq!(plan.config.user.as_deref(), Some("0:0"));
        assert_eq!(
            plan.config.entrypoint,
            Some(vec!["/usr/local/bin/meshaccel".to_string()])
        );
        assert_eq!(plan.config.cmd, Some(vec!["agent".to_string()]));
    }

    #[test]
    fn build_args_override_arg_defaults_in_from() {
        let text = "ARG R=bookworm\nFROM debian:${R}-slim\n";
        let plan = plan_of(text, &[("R", "trixie")], &Sources::default()).unwrap();
        assert_eq!(plan.base.release, "trixie");
        let plan = plan_of(text, &[], &Sources::default()).unwrap();
        assert_eq!(plan.base.release, "bookworm");
    }

    #[test]
    fn stage_args_env_and_config() {
        let text = "ARG V=1\nFROM debian:bookworm-slim\nARG V\nARG W=w$V\nENV PATH=/opt:$PATH A=\"a $W\"\n\
                    WORKDIR /app\nLABEL k=v${V}\nRUN echo $A\nENTRYPOINT run me\n";
        let plan = plan_of(text, &[], &Sources::default()).unwrap();
        let env: BTreeMap<_, _> = plan.config.env.iter().cloned().collect();
        assert_eq!(env["PATH"], format!("/opt:{DEFAULT_PATH}"));
        assert_eq!(env["A"], "a w1");
        assert_eq!(plan.config.workdir.as_deref(), Some("/app"));
        assert_eq!(plan.config.labels["k"], "v1");
        assert_eq!(
            plan.config.entrypoint,
            Some(vec!["/bin/sh".into(), "-c".into(), "run me".into()])
        );
        assert_eq!(
            plan.config.cmd, None,
            "ENTRYPOINT resets the base image's CMD"
        );
        let Step::Run { env, workdir, .. } = &plan.steps[1] else {
            panic!("{:?}", plan.steps);
        };
        assert_eq!(env["V"], "1");
        assert_eq!(env["W"], "w1");
        assert_eq!(workdir, "/app");
    }

    #[test]
    fn refuses_what_it_cannot_build() {
        let err = |text: &str| {
            plan_of(text, &[], &Sources::default())
                .unwrap_err()
                .to_string()
        };
        let e = err("FROM alpine:3\n");
        assert!(
            e.contains("Dockerfile:1") && e.contains("debian:<release>-slim"),
            "{e}"
        );
        let e = err("FROM debian:bookworm-slim\nHEALTHCHECK NONE\n");
        assert!(
            e.contains("Dockerfile:2") && e.contains("HEALTHCHECK"),
            "{e}"
        );
        let e = err("FROM debian:bookworm-slim\nFROBNICATE x\n");
        assert!(e.contains("Dockerfile:2"), "{e}");
        let e = err("FROM x AS b\nFROBNICATE x\nFROM debian:bookworm-slim\n");
        assert!(
            e.contains("Dockerfile:2") && e.contains("unknown instruction"),
            "{e}"
        );
        let e = err("FROM debian:bookworm-slim\nCOPY --from=build /out/other /x\n");
        assert!(
            e.contains("--from=build /out/other") && e.contains("stage_file"),
            "{e}"
        );
        let e = err("FROM debian:bookworm-slim\nRUN --mount=type=cache,target=/x true\n");
        assert!(e.contains("--mount"), "{e}");
        let e = err("FROM debian:bookworm-slim\nUSER app\nRUN true\n");
        assert!(e.contains("numeric"), "{e}");
        let e = err("FROM debian:bookworm-slim\nCOPY x /y\n");
        assert!(e.contains("build context"), "{e}");
    }

    #[test]
    fn copy_destinations() {
        let sources = Sources {
            context: Some("/ctx".into()),
            ..Default::default()
        };
        let plan = plan_of(
            "FROM debian:bookworm-slim\nWORKDIR /w\nCOPY --chown=5:6 a b /dst/\nCOPY c rel\n",
            &[],
            &sources,
        )
        .unwrap();
        assert_eq!(
            plan.steps[1],
            Step::Copy {
                line: 3,
                sources: vec!["/ctx/a".into(), "/ctx/b".into()],
                dests: vec!["/dst/a".into(), "/dst/b".into()],
                uid: 5,
                gid: 6
            }
        );
        let Step::Copy { dests, .. } = &plan.steps[2] else {
            panic!()
        };
        assert_eq!(dests, &["/w/rel".to_string()]);
        assert!(plan_of("FROM debian:bookworm-slim\nCOPY ../x /y\n", &[], &sources).is_err());
        assert!(plan_of("FROM debian:bookworm-slim\nCOPY a b /y\n", &[], &sources).is_err());
    }

    #[test]
    fn keys_chain_every_preceding_instruction() {
        let base = Base {
            release: "bookworm".into(),
            variant: "minbase".into(),
        };
        let k0 = base_key(&base);
        let k1 = chain_key(&k0, "a");
        assert_eq!(k1, chain_key(&k0, "a"));
        assert_ne!(k1, chain_key(&k0, "b"));
        assert_ne!(chain_key(&k1, "c"), chain_key(&chain_key(&k0, "b"), "c"));
        let other = Base {
            release: "trixie".into(),
            ..base
        };
        assert_ne!(k0, base_key(&other));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn oci_documents() {
        let cfg = ImageConfig {
            user: Some("1337:1337".into()),
            env: vec![("PATH".into(), "/bin".into())],
            entrypoint: Some(vec!["/envoy".into()]),
            ..Default::default()
        };
        let c = config_json(&cfg, "ab");
        assert_eq!(c["config"]["User"], "1337:1337");
        assert_eq!(c["config"]["Env"], json!(["PATH=/bin"]));
        assert_eq!(c["config"]["Entrypoint"], json!(["/envoy"]));
        assert!(c["config"].get("Cmd").is_none());
        assert_eq!(c["rootfs"]["diff_ids"], json!(["sha256:ab"]));
        assert_eq!(c["os"], "linux");
        let cd = Descriptor::of(MEDIA_CONFIG, b"{}");
        let ld = Descriptor {
            media_type: MEDIA_LAYER,
            digest: "cd".into(),
            size: 3,
        };
        let m = manifest_json(&cd, &ld);
        assert_eq!(m["layers"][0]["digest"], "sha256:cd");
        assert_eq!(m["config"]["size"], 2);
        let i = index_json(&cd, "meshaccel.local/x:t");
        assert_eq!(
            i["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            "meshaccel.local/x:t"
        );
    }
}
