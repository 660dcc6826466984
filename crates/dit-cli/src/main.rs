//! `dit`: the command line of dit-rs. A thin layer: parse, call the library, write files.

mod bench;
mod decode;
mod edit;
mod eval;
mod eval_builtin;
mod eval_shapes;
mod extract;
mod launch;
mod sample;
mod sample_many;
mod text_encoders;
mod train;

use clap::{Parser, Subcommand};

// A forward pass allocates and frees activation buffers of tens of MB. glibc (and mimalloc by
// default) hand them back to the kernel, so every pass page-faulted and zeroed them anew: 40% of
// the DiT-XL/2 forward time. mimalloc with purging off keeps freed memory for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "dit", version, about = "Diffusion Transformers (DiT) in Rust")]
struct Cli {
    /// Where to compute: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Draw class-conditional samples (with no checkpoint: the embedded default model).
    Sample(Box<sample::SampleArgs>),
    /// Decode saved latents (`sample --save-latents`) to images with the VAE.
    Decode(decode::DecodeArgs),
    /// Image-to-image: noise a picture to `--strength` and denoise it for the given classes.
    Edit(Box<edit::EditArgs>),
    /// Inpainting: regenerate the masked region of a picture, keeping the rest.
    Inpaint(Box<edit::InpaintArgs>),
    /// Many samples for evaluation (the reference sample_ddp.py): resumable shards, then one
    /// .npz (arr_0, uint8 N x H x W x 3) for the ADM suite.
    SampleMany(Box<sample_many::SampleManyArgs>),
    /// Convert a DiT checkpoint (.pt, bare or train.py; the EMA weights) to .safetensors, or a
    /// `dit train` checkpoint folder to its EMA weights plus `OUT.json` (its config).
    Convert {
        input: std::path::PathBuf,
        output: std::path::PathBuf,
        /// Store the weights in f16 (half the size; loaded back as f32).
        #[arg(long)]
        half: bool,
        /// The input is FID Inception weights (pytorch-fid's .pth or the TorchScript file), not
        /// a DiT: rename to `dit eval`'s layout and check that the network loads.
        #[arg(long)]
        inception: bool,
    },
    /// Time the forward pass (and the VAE decode) of our implementation.
    Bench(bench::BenchArgs),
    /// Train a DiT: on the built-in digits or shapes, a latent store, a class folder or a
    /// captioned set (checkpoints, JSONL log, sample grids, resume).
    Train(Box<train::TrainArgs>),
    /// The ADM evaluation suite on two image batches (.npz): FID, sFID, Inception Score,
    /// precision and recall, on the FID Inception network.
    Eval(Box<eval::EvalArgs>),
    /// Score a model of the built-in digits: classifier accuracy per class and a Fréchet
    /// distance to real digits in the classifier's feature space.
    EvalBuiltin(Box<eval_builtin::EvalBuiltinArgs>),
    /// Score a text model of the built-in shapes: how often colour, shape, position and
    /// background of its images match the caption, for held-out and seen captions.
    EvalShapes(Box<eval_shapes::EvalArgs>),
    /// Score a text-to-video model of the built-in moving shapes: how often the direction of
    /// travel (and colour, shape, background) match the caption, with and without motion-free
    /// guidance.
    EvalMotion(Box<eval_shapes::EvalArgs>),
    /// Train the classifier that `eval-builtin` uses, on the built-in digits.
    TrainClassifier(eval_builtin::TrainClassifierArgs),
    /// Forward-pass Gflops (multiply-accumulates, as the paper counts) and parameters.
    Flops(FlopsArgs),
    /// Encode an image folder with the VAE into a latent store for training.
    ExtractLatents(extract::ExtractArgs),
    /// Render the loss curve of a `dit train` log (log.jsonl) to a PNG.
    PlotLoss {
        log: std::path::PathBuf,
        #[arg(long, default_value = "loss.png")]
        out: std::path::PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    keep_freed_memory();
    let cli = Cli::parse();
    let result = dit::device::parse(&cli.device)
        .map_err(anyhow::Error::from)
        .and_then(|device| run(cli.command, &device));
    if let Err(e) = result {
        // One clear line, no backtrace: bad input is not a crash.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command, device: &candle_core::Device) -> anyhow::Result<()> {
    match command {
        Command::Sample(args) => sample::run(*args, device),
        Command::SampleMany(args) => sample_many::run(*args, device),
        Command::Decode(args) => decode::run(args, device),
        Command::Edit(args) => edit::edit(*args, device),
        Command::Inpaint(args) => edit::inpaint(*args, device),
        Command::Convert {
            input,
            output,
            half,
            inception: true,
        } => convert_inception(&input, &output, half),
        Command::Convert {
            input,
            output,
            half,
            inception: false,
        } => convert(&input, &output, half),
        Command::Bench(args) => bench::run(args, device),
        Command::Train(args) => train::run(*args, device),
        Command::EvalShapes(args) => eval_shapes::run_shapes(*args, device),
        Command::EvalMotion(args) => eval_shapes::run_motion(*args, device),
        Command::Eval(args) => eval::run(*args, device),
        Command::EvalBuiltin(args) => eval_builtin::run(*args, device),
        Command::TrainClassifier(args) => eval_builtin::train_classifier(args, device),
        Command::ExtractLatents(args) => extract::run(args, device),
        Command::Flops(args) => flops(&args),
        Command::PlotLoss { log, out } => train::plot_loss(&log, &out).map(|()| {
            println!("wrote {}", out.display());
        }),
    }
}

fn convert(input: &std::path::Path, output: &std::path::Path, half: bool) -> anyhow::Result<()> {
    let (cfg, mut tensors) = if input.is_dir() {
        let (cfg, tensors) = dit::checkpoint::read_training_dir(input)?;
        let json = serde_json::to_string_pretty(&cfg)?;
        std::fs::write(output.with_extension("json"), json)?;
        (cfg, tensors)
    } else {
        let tensors = dit::checkpoint::read_tensors(input)?;
        (dit::checkpoint::infer_config(&tensors, None)?, tensors)
    };
    dit::checkpoint::validate(&cfg, &tensors)?;
    if half {
        half_precision(&mut tensors)?;
    }
    dit::checkpoint::save_safetensors_atomic(&tensors, output)?;
    println!(
        "wrote {} ({} tensors; depth {}, hidden {}, patch {}, {} classes)",
        output.display(),
        tensors.len(),
        cfg.depth,
        cfg.hidden_size,
        cfg.patch_size,
        cfg.num_classes
    );
    Ok(())
}

fn half_precision(tensors: &mut dit::checkpoint::Tensors) -> anyhow::Result<()> {
    for t in tensors.values_mut() {
        *t = t.to_dtype(candle_core::DType::F16)?;
    }
    Ok(())
}

fn convert_inception(
    input: &std::path::Path,
    output: &std::path::Path,
    half: bool,
) -> anyhow::Result<()> {
    use dit::eval::inception::{canonical_names, InceptionV3};
    let mut tensors = canonical_names(&dit::checkpoint::read_tensors(input)?);
    let net = InceptionV3::from_tensors(&tensors, &candle_core::Device::Cpu)?;
    if half {
        half_precision(&mut tensors)?;
    }
    dit::checkpoint::save_safetensors_atomic(&tensors, output)?;
    let fc = match net.has_classifier() {
        true => "with",
        false => "without",
    };
    println!(
        "wrote {} ({} tensors, {fc} the 1008-way classifier)",
        output.display(),
        tensors.len()
    );
    Ok(())
}

/// `dit flops`.
#[derive(clap::Args)]
struct FlopsArgs {
    /// Named configs, comma-separated (default: the embedded model).
    #[arg(long, value_delimiter = ',')]
    model: Vec<String>,
    /// Every named config.
    #[arg(long)]
    all: bool,
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    /// Block designs to cost (§3.2 of the paper), comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ada-ln-zero")]
    block: Vec<train::BlockArg>,
    /// GenTron models (`--model GenTron-XL/2,GenTron-G/2`): the text encoder's token width,
    /// pooled width and padded length (default: CLIP ViT-L/14's 768, 768, 77), and
    /// optionally a second encoder's token width, read by every other block (CLIP + T5-XXL:
    /// 768 768 77 4096).
    #[arg(long, num_args = 3..=4, value_names = ["TOKENS_DIM", "POOLED_DIM", "LENGTH", "SECOND_DIM"], default_values_t = [768, 768, 77])]
    text: Vec<usize>,
    /// Video models: frames per clip (Gflops are then per clip). GenTron text-to-video: per-frame
    /// patches with a temporal attention layer in each block.
    #[arg(long)]
    frames: Option<usize>,
    /// With --frames: spacetime patches (Sora) of this many frames instead of temporal attention.
    #[arg(long, requires = "frames")]
    tubelet: Option<usize>,
}

fn flops(a: &FlopsArgs) -> anyhow::Result<()> {
    let (models, all, image_size, text) = (&a.model, a.all, a.image_size, &a.text);
    let video = a.frames.map(|frames| dit::config::VideoConfig {
        frames,
        tubelet: a.tubelet,
    });
    let text = dit::config::TextConditioning {
        pooled_dim: text[1],
        second_context_dim: text.get(3).copied(),
        ..dit::config::TextConditioning::single(text[0], text[2])
    };
    let configs: Vec<(String, dit::DiTConfig)> = if all || !models.is_empty() {
        let names = if all {
            dit::DiTConfig::names()
        } else {
            models.to_vec()
        };
        names
            .into_iter()
            .map(|n| {
                let cfg = match n.starts_with("GenTron-") {
                    true => dit::DiTConfig::gentron(&n, image_size, text)?,
                    false => dit::DiTConfig::named(&n, image_size)?,
                };
                Ok((n.clone(), cfg))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        vec![("embedded (MNIST, 28 px)".into(), dit::builtin::config()?)]
    };
    let per = match video {
        None => "Gflops".to_string(),
        Some(v) => format!("Gflops/{}-frame clip", v.frames),
    };
    println!(
        "{:24} {:16} {per:>10} {:>14}",
        "model", "block", "parameters"
    );
    for (name, cfg) in configs {
        for &b in &a.block {
            let cfg = match cfg.text {
                Some(_) => cfg.clone(), // GenTron: adaLN-Zero blocks with text cross-attention
                None => dit::DiTConfig {
                    block: b.into(),
                    ..cfg.clone()
                },
            };
            let cfg = dit::DiTConfig { video, ..cfg };
            cfg.validate()?;
            let macs = dit::eval::flops::forward_macs(&cfg);
            let params = dit::checkpoint::parameter_count(&cfg);
            let design = format!("{:?}", cfg.block);
            println!(
                "{name:24} {design:16} {:>10.2} {:>14}",
                macs.gflops(),
                params
            );
        }
    }
    Ok(())
}

/// Turns off mimalloc's purging of freed memory (`MIMALLOC_PURGE_DELAY=-1`; the option's index
/// is 15 in mimalloc v2 and v3, where it is not exported as a constant).
fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option; no preconditions.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}
