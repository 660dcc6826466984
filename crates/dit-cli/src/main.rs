//! `dit`: the command line of dit-rs. A thin layer: parse, call the library, write files.

mod bench;
mod sample;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dit", version, about = "Diffusion Transformers (DiT) in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Draw class-conditional samples (with no checkpoint: the embedded default model).
    Sample(Box<sample::SampleArgs>),
    /// Convert a DiT checkpoint (.pt, bare or train.py; the EMA weights) to .safetensors.
    Convert {
        input: std::path::PathBuf,
        output: std::path::PathBuf,
    },
    /// Time the forward pass (and the VAE decode) of our implementation.
    Bench(bench::BenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sample(args) => sample::run(*args),
        Command::Convert { input, output } => convert(&input, &output),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        // One clear line, no backtrace: bad input is not a crash.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn convert(input: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    let tensors = dit::checkpoint::read_tensors(input)?;
    let cfg = dit::checkpoint::infer_config(&tensors, None)?;
    dit::checkpoint::validate(&cfg, &tensors)?;
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

/// glibc serves large buffers with mmap and returns them to the kernel on free, so every
/// activation tensor of every forward pass was page-faulted and zeroed anew (a quarter of the
/// DiT-B/2 forward time). Serve them from the heap and keep freed memory for reuse.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread starts.
    unsafe {
        // 32 MiB is glibc's largest mmap threshold; one arena so rayon's workers share it.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
