//! The `dit` command end to end: sampling parity through the CLI flags, reproducibility, and
//! every kind of bad input giving one clear error line and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn dit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dit"))
        .args(args)
        .output()
        .expect("run dit")
}

fn succeeds(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts a clean failure: non-zero exit, no panic, one `error:` line containing `needle`.
fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line: {err}");
    assert!(
        lines[0].contains(needle),
        "error line lacks '{needle}': {}",
        lines[0]
    );
}

/// `dit sample` on the 10-class fixture checkpoint, latents only, with `extra` flags.
fn sample_c10(extra: &[&str]) -> Output {
    let ckpt = fixture("dit_c10_128.pt");
    let mut args = vec!["sample", "--ckpt", p(&ckpt), "--no-decode"];
    args.extend_from_slice(extra);
    dit(&args)
}

/// `dit train` with a tiny model (depth 1, width 32, 2 heads) and these arguments.
fn train_tiny(args: &[&str]) -> Output {
    let mut all = vec!["train", "--depth", "1", "--hidden", "32", "--heads", "2"];
    all.extend_from_slice(args);
    dit(&all)
}

/// The `state.json` of a `dit train` checkpoint folder.
fn state_of(ckpt: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (d / b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap())
    .sqrt()
}

#[test]
fn ddim_through_the_cli_matches_the_reference_latents() {
    let dir = tempfile::tempdir().unwrap();
    let f =
        candle_core::safetensors::load(fixture("dit_c10_128.safetensors"), &Device::Cpu).unwrap();
    let noise = dir.path().join("noise.npy");
    f["noise"].write_npy(&noise).unwrap();
    let latents = dir.path().join("latents.npy");
    let labels: Vec<String> = f["labels"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|l| l.to_string())
        .collect();
    let out = sample_c10(&[
        "--num-heads",
        "6",
        "--sampler",
        "ddim",
        "--num-sampling-steps",
        "25",
        "--cfg-scale",
        "4",
        "--labels",
        &labels.join(","),
        "--noise",
        p(&noise),
        "--save-latents",
        p(&latents),
    ]);
    succeeds(&out);
    let got = Tensor::read_npy(&latents).unwrap();
    let e = rel_l2(&got, &f["ddim25_cfg4"]);
    assert!(e < 1e-4, "rel L2 {e}");
}

#[test]
fn same_seed_same_samples_and_a_png_grid() {
    let dir = tempfile::tempdir().unwrap();
    let run = |seed: &str, name: &str| {
        let lat = dir.path().join(format!("{name}.npy"));
        let png = dir.path().join(format!("{name}.png"));
        let out = dit(&[
            "sample",
            "--steps",
            "4",
            "--seed",
            seed,
            "--labels",
            "1,2,3",
            "--save-latents",
            p(&lat),
            "--out",
            p(&png),
        ]);
        succeeds(&out);
        let img = image::open(&png).unwrap();
        // The embedded model: 3 digits of 28 px in one row with 2 px padding.
        assert_eq!((img.width(), img.height()), (3 * 30 + 2, 32));
        Tensor::read_npy(&lat).unwrap()
    };
    let (a, b, c) = (run("7", "a"), run("7", "b"), run("8", "c"));
    assert_eq!(a.dims(), [3, 1, 28, 28]);
    assert_eq!(rel_l2(&a, &b), 0.0);
    assert!(rel_l2(&a, &c) > 0.1);
}

#[test]
fn latent_model_decodes_through_a_diffusers_vae_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (grid, each) = (dir.path().join("grid.png"), dir.path().join("each"));
    let vae = fixture("tiny_vae_folder");
    let out = dit(&[
        "sample",
        "--ckpt",
        p(&fixture("dit_c10_128.pt")),
        "--num-heads",
        "6",
        "--steps",
        "3",
        "--labels",
        "4,5",
        "--vae",
        p(&vae),
        "--out",
        p(&grid),
        "--out-dir",
        p(&each),
    ]);
    succeeds(&out);
    // 16x16 latents through a VAE with one upsampling: 32x32 images, two in a row.
    let img = image::open(&grid).unwrap();
    assert_eq!((img.width(), img.height()), (2 * 34 + 2, 36));
    let one = image::open(each.join("000001.png")).unwrap();
    assert_eq!((one.width(), one.height()), (32, 32));
    // Not a blank picture: the decoder's output varies across pixels.
    let px = one.to_rgb8();
    assert!(px.pixels().any(|q| q != px.get_pixel(0, 0)));
}

#[test]
fn train_logs_checkpoints_resumes_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // No --patch / --lr / --ema-decay: the built-in recipe's defaults (patch 4).
    let tiny = [
        "--batch-size",
        "4",
        "--log-every",
        "2",
        "--ckpt-every",
        "3",
        "--keep",
        "2",
        "--sample-every",
        "6",
        "--micro-batch-size",
        "3",
        "--warmup",
        "2",
        "--decay-from",
        "4",
    ];
    let mut args = vec!["--out", p(&out), "--steps", "6"];
    args.extend_from_slice(&tiny);
    succeeds(&train_tiny(&args));
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [2, 4, 6]
    );
    assert!(lines
        .iter()
        .all(|l| l["loss"].as_f64().unwrap().is_finite()
            && l["images_per_s"].as_f64().unwrap() > 0.0));
    // Warmed up by step 2, constant to step 4, decayed to --min-lr (0) at the last step.
    let lr: Vec<f64> = lines.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    assert!(lr[0] > 0.0 && lr[1] == lr[0] && lr[2] == 0.0, "{lr:?}");
    // A loss plot beside the checkpoints; an EMA sample grid at step 6 (10 classes x 2 rows of
    // 28 px with 2 px padding).
    let plot = image::open(out.join("loss.png")).unwrap();
    assert_eq!((plot.width(), plot.height()), (800, 500));
    let grid = image::open(out.join("samples/step-0000006.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (10 * 30 + 2, 2 * 30 + 2));
    let state: serde_json::Value = state_of(&out.join("step-0000006"));
    assert_eq!(state["model"]["patch_size"], 4);
    // Checkpoints at 3 and 6, both kept; resuming from 6 continues to 9 and prunes 3.
    assert!(
        out.join("step-0000003/state.json").is_file()
            && out.join("step-0000006/weights.safetensors").is_file()
    );
    let resume = out.join("step-0000006");
    let mut args = vec!["--out", p(&out), "--steps", "9", "--resume", p(&resume)];
    args.extend_from_slice(&tiny);
    succeeds(&train_tiny(&args));
    assert!(out.join("step-0000009").is_dir() && !out.join("step-0000003").exists());
    // The checkpoint samples (EMA weights, its own config): 28x28 digits, a grid of two.
    let png = dir.path().join("s.png");
    succeeds(&dit(&[
        "sample",
        "--ckpt",
        p(&out.join("step-0000009")),
        "--steps",
        "3",
        "--labels",
        "1,2",
        "--out",
        p(&png),
    ]));
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (2 * 30 + 2, 32));
}

#[test]
fn eval_builtin_reports_accuracy_and_frechet_distance() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("m.json");
    let out = dit(&[
        "eval-builtin",
        "--per-class",
        "3",
        "--steps",
        "5",
        "--json",
        p(&json),
    ]);
    succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("classifier accuracy on generated samples"),
        "{stdout}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(m["samples"], 30);
    // The embedded classifier on real held-out digits: well above chance.
    assert!(m["real_heldout_accuracy"].as_f64().unwrap() > 0.95, "{m}");
    let (fd, floor) = (
        m["frechet_distance"].as_f64().unwrap(),
        m["frechet_distance_real_floor"].as_f64().unwrap(),
    );
    assert!(fd.is_finite() && floor > 0.0 && fd > floor, "{m}");
    assert_eq!(m["per_class_accuracy"].as_array().unwrap().len(), 10);
}

/// An image folder of two classes ("cat": 3 images, "ant": 2, and one corrupt file).
fn image_folder(root: &Path) {
    for (class, n) in [("cat", 3u8), ("ant", 2)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(20, 18, |x, y| {
                image::Rgb([(x * 12) as u8, (y * 14) as u8, i * 100 + class.len() as u8])
            });
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(root.join("cat/broken.png"), b"not a png").unwrap();
}

/// `dit extract-latents` of 16 px images through the tiny VAE (latents 4x8x8).
fn extract_tiny(images: &Path, store: &Path, extra: &[&str]) -> Output {
    let vae = fixture("tiny_vae_folder");
    let mut args = vec![
        "extract-latents",
        p(images),
        "--out",
        p(store),
        "--image-size",
        "16",
    ];
    args.extend_from_slice(&["--vae", p(&vae)]);
    args.extend_from_slice(extra);
    dit(&args)
}

#[test]
fn extract_latents_then_train_and_fine_tune_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (images, store) = (dir.path().join("images"), dir.path().join("store"));
    image_folder(&images);
    let out = extract_tiny(&images, &store, &["--batch-size", "2", "--shard-size", "3"]);
    succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The tiny VAE halves the size: 16 px -> 4x8x8 latents; the corrupt file is counted.
    assert!(
        stdout.contains("wrote 5 latents (2 classes, 4x8x8)") && stdout.contains("1 unreadable"),
        "{stdout}"
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["classes"], serde_json::json!(["ant", "cat"]));
    assert_eq!(index["shards"].as_array().unwrap().len(), 2);
    let common = [
        "--steps",
        "2",
        "--global-batch-size",
        "4",
        "--sample-every",
        "0",
        "--log-every",
        "1",
        "--flip",
    ];
    let run = dir.path().join("run");
    let mut args = vec!["--data", p(&store), "--out", p(&run), "--patch", "2"];
    args.extend_from_slice(&common);
    succeeds(&train_tiny(&args));
    let state: serde_json::Value = state_of(&run.join("step-0000002"));
    assert_eq!(state["model"]["num_classes"], 2);
    assert_eq!(state["model"]["in_channels"], 4);
    assert_eq!(state["model"]["input_size"], 8);
    // Fine-tuning a 10-class checkpoint (train.py layout) on the 2-class store: the label
    // table is resized, every other weight kept.
    let tuned = dir.path().join("tuned");
    let ckpt = fixture("dit_c10_128.pt");
    let mut args = vec!["--data", p(&store), "--out", p(&tuned), "--init", p(&ckpt)];
    args.extend_from_slice(&common);
    succeeds(&train_tiny(&args));
    let w = candle_core::safetensors::load(
        tuned.join("step-0000002/weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(w["model.y_embedder.embedding_table.weight"].dims(), [3, 96]);
    assert_eq!(w["model.blocks.2.attn.qkv.weight"].dims(), [288, 96]);
}

#[test]
fn keep_aspect_buckets_then_packed_training() {
    let dir = tempfile::tempdir().unwrap();
    let (images, store) = (dir.path().join("images"), dir.path().join("store"));
    // Wide, tall and square photos in two classes.
    for (class, sizes) in [
        ("a", [(40u32, 20u32), (16, 48)]),
        ("b", [(30, 30), (36, 20)]),
    ] {
        std::fs::create_dir_all(images.join(class)).unwrap();
        for (i, (w, h)) in sizes.iter().enumerate() {
            let img = image::RgbImage::from_fn(*w, *h, |x, y| {
                image::Rgb([(x * 6) as u8, (y * 5) as u8, 40 * i as u8])
            });
            img.save(images.join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    let out = extract_tiny(
        &images,
        &store,
        &["--bucket-multiple", "4", "--keep-aspect"],
    );
    succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Buckets of about 16x16 px: 2:1 photos go to 20x12, the 1:3 one to 8x32.
    assert!(
        stdout.contains("20x12: 2") && stdout.contains("8x32: 1") && stdout.contains("16x16: 1"),
        "{stdout}"
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("index.json")).unwrap()).unwrap();
    let mut shapes: Vec<String> = index["shard_shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    shapes.sort();
    // The tiny VAE halves: latents 4 x h/2 x w/2.
    assert_eq!(shapes, ["[4,16,4]", "[4,6,10]", "[4,8,8]"]);
    let run = dir.path().join("run");
    let args = |extra: &[&'static str]| {
        let mut v = vec![
            "--data",
            p(&store),
            "--out",
            p(&run),
            "--patch",
            "2",
            "--steps",
            "2",
            "--global-batch-size",
            "4",
            "--sample-every",
            "0",
            "--flip",
        ];
        v.extend_from_slice(extra);
        v
    };
    fails_with(&train_tiny(&args(&[])), "train it with --pack SEQ_LEN");
    succeeds(&train_tiny(&args(&[
        "--pack",
        "32",
        "--token-drop",
        "0.25",
    ])));
    let state = state_of(&run.join("step-0000002"));
    assert_eq!(state["model"]["input_size"], 8);
}

#[test]
fn train_in_pixel_space_from_an_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    image_folder(&images);
    let run = dir.path().join("run");
    succeeds(&train_tiny(&[
        "--data",
        p(&images),
        "--image-size",
        "8",
        "--channels",
        "3",
        "--out",
        p(&run),
        "--steps",
        "1",
        "--global-batch-size",
        "2",
        "--patch",
        "2",
        "--sample-every",
        "0",
    ]));
    let state: serde_json::Value = state_of(&run.join("step-0000001"));
    assert_eq!(
        (
            state["model"]["in_channels"].as_u64(),
            state["model"]["input_size"].as_u64()
        ),
        (Some(3), Some(8))
    );
    // A corrupt image met during training is an error naming the file, not a panic.
    let out = train_tiny(&[
        "--data",
        p(&images),
        "--image-size",
        "8",
        "--out",
        p(&dir.path().join("r2")),
        "--steps",
        "3",
        "--global-batch-size",
        "6",
        "--patch",
        "2",
        "--sample-every",
        "0",
    ]);
    fails_with(&out, "broken.png");
}

#[test]
fn a_diverging_run_stops_and_keeps_its_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // lr 1e30: the first update blows the weights up, the second loss overflows.
    let out = train_tiny(&[
        "--out",
        p(&run),
        "--steps",
        "5",
        "--lr",
        "1e30",
        "--ckpt-every",
        "1",
        "--global-batch-size",
        "2",
        "--patch",
        "4",
        "--sample-every",
        "0",
    ]);
    fails_with(&out, "stopping. The last good checkpoint is");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("step-0000001"), "{stderr}");
    assert!(run.join("step-0000001/weights.safetensors").is_file());
    assert!(!run.join("step-0000002").exists());
    // The kept checkpoint still loads.
    let png = dir.path().join("s.png");
    succeeds(&dit(&[
        "sample",
        "--ckpt",
        p(&run.join("step-0000001")),
        "--steps",
        "2",
        "--labels",
        "1",
        "--out",
        p(&png),
    ]));
}

#[test]
fn missing_checkpoint() {
    fails_with(
        &dit(&["sample", "--ckpt", "/nonexistent/DiT-XL-2-256x256.pt"]),
        "does not exist",
    );
}

#[test]
fn truncated_and_corrupt_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dit_c1000_256.pt", "dit_c10_128.safetensors"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let ext = Path::new(name).extension().unwrap().to_str().unwrap();
        let cut = dir.path().join(format!("cut.{ext}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        fails_with(
            &dit(&["sample", "--ckpt", p(&cut), "--no-decode"]),
            "cannot read checkpoint",
        );
        let junk = dir.path().join(format!("junk.{ext}"));
        std::fs::write(&junk, b"this is not a checkpoint at all").unwrap();
        fails_with(
            &dit(&["sample", "--ckpt", p(&junk), "--no-decode"]),
            "cannot read checkpoint",
        );
    }
}

#[test]
fn config_that_disagrees_names_the_tensor_and_both_shapes() {
    let out = dit(&[
        "sample",
        "--model",
        "DiT-S/2",
        "--image-size",
        "128",
        "--num-classes",
        "10",
        "--ckpt",
        p(&fixture("dit_c10_128.pt")),
        "--no-decode",
    ]);
    fails_with(&out, "x_embedder.proj.weight has shape [96, 4, 4, 4] in the checkpoint but the model config expects [384, 4, 2, 2]");
    let out = sample_c10(&["--num-classes", "1000"]);
    fails_with(&out, "y_embedder.embedding_table.weight has shape [11, 96]");
    // Converting keeps every tensor; the converted file loads the same way.
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("c10.safetensors");
    let out = dit(&["convert", p(&fixture("dit_c10_128.pt")), p(&st)]);
    succeeds(&out);
    let out = dit(&[
        "sample",
        "--ckpt",
        p(&st),
        "--num-heads",
        "5",
        "--no-decode",
    ]);
    fails_with(
        &out,
        "hidden size 96 is not divisible by the number of heads 5",
    );
}

#[test]
fn wrong_noise_shape() {
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("noise.npy");
    Tensor::zeros((2, 3, 8, 8), candle_core::DType::F32, &Device::Cpu)
        .unwrap()
        .write_npy(&noise)
        .unwrap();
    let out = sample_c10(&["--labels", "1,2", "--noise", p(&noise)]);
    fails_with(
        &out,
        "noise has shape [2, 3, 8, 8] but 2 samples of this model need (N, C, H, W) with N = 2, C = 4",
    );
}

#[test]
fn samples_at_other_sizes_and_aspect_ratios() {
    // The embedded model (28 x 28 digits, patch 4) sampled 28 high and 44 wide.
    let dir = tempfile::tempdir().unwrap();
    let out = dit(&[
        "sample",
        "--labels",
        "3,5",
        "--steps",
        "4",
        "--height",
        "28",
        "--width",
        "44",
        "--out",
        p(&dir.path().join("grid.png")),
        "--out-dir",
        p(dir.path()),
    ]);
    succeeds(&out);
    let one = image::open(dir.path().join("000000.png")).unwrap();
    assert_eq!((one.height(), one.width()), (28, 44));
    fails_with(
        &dit(&["sample", "--steps", "2", "--width", "30"]),
        "--width 30: must be a positive multiple of 4 pixels",
    );
    // Several sizes at once, packed: each sample at its own size.
    let packed = dir.path().join("packed");
    let out = dit(&[
        "sample",
        "--labels",
        "1,2,3",
        "--steps",
        "4",
        "--sizes",
        "28x28,20x36,36x20",
        "--out",
        p(&dir.path().join("sizes.png")),
        "--out-dir",
        p(&packed),
    ]);
    succeeds(&out);
    for (i, (h, w)) in [(28, 28), (20, 36), (36, 20)].iter().enumerate() {
        let img = image::open(packed.join(format!("{i:06}.png"))).unwrap();
        assert_eq!((img.height(), img.width()), (*h, *w));
    }
    fails_with(
        &dit(&["sample", "--steps", "2", "--sizes", "28by28"]),
        "is not HEIGHTxWIDTH",
    );
}

#[test]
fn label_out_of_range() {
    let out = sample_c10(&["--labels", "3,10"]);
    fails_with(&out, "label 10 is out of range: the model has 10 classes");
}

#[test]
fn image_size_not_divisible() {
    fails_with(
        &dit(&[
            "sample",
            "--ckpt",
            p(&fixture("dit_c10_128.pt")),
            "--image-size",
            "100",
        ]),
        "not divisible by 8",
    );
    fails_with(
        &dit(&[
            "sample",
            "--ckpt",
            p(&fixture("dit_c10_128.pt")),
            "--image-size",
            "136",
        ]),
        "not divisible by the patch size 4",
    );
}

#[test]
fn flops_prints_the_papers_numbers() {
    let out = dit(&["flops", "--model", "DiT-XL/2,DiT-S/8"]);
    succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("118.6") && stdout.contains("0.36") && stdout.contains("674834720"),
        "{stdout}"
    );
    fails_with(&dit(&["flops", "--model", "DiT-M/3"]), "unknown model");
    // §3.2's designs: cross-attention 137.62 Gflops for DiT-XL/2.
    let out = dit(&[
        "flops",
        "--model",
        "DiT-XL/2",
        "--block",
        "cross-attention,in-context",
    ]);
    succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("CrossAttention") && stdout.contains("137.6"),
        "{stdout}"
    );
    assert!(
        stdout.contains("InContext") && stdout.contains("119.3"),
        "{stdout}"
    );
    // Clips: a one-frame spacetime clip costs the image; tubes must split the clip.
    let out = dit(&[
        "flops",
        "--model",
        "DiT-XL/2",
        "--frames",
        "1",
        "--tubelet",
        "1",
    ]);
    succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Gflops/1-frame clip") && stdout.contains("118.6"),
        "{stdout}"
    );
    let args = [
        "flops",
        "--model",
        "DiT-S/2",
        "--frames",
        "3",
        "--tubelet",
        "2",
    ];
    fails_with(&dit(&args), "do not split");
}

#[test]
fn sample_many_writes_a_resumable_npz() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("samples.npz");
    let args = [
        "sample-many",
        "--num-samples",
        "5",
        "--shard-size",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--npz",
        p(&npz),
    ];
    succeeds(&dit(&args));
    let read = || {
        let mut t = Tensor::read_npz(&npz).unwrap();
        assert_eq!(t.len(), 1);
        let (name, arr) = t.remove(0);
        assert_eq!(name, "arr_0");
        arr
    };
    let first = read();
    assert_eq!(first.dims(), [5, 28, 28, 3]);
    assert_eq!(first.dtype(), DType::U8);
    // A crash after two shards: the rerun keeps them and redraws the last one identically.
    let shards = dir.path().join("samples.npz.shards");
    std::fs::remove_file(shards.join("shard-00002.npy")).unwrap();
    std::fs::remove_file(&npz).unwrap();
    let out = dit(&args);
    succeeds(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("done before, kept")
            .count(),
        2
    );
    let again = read();
    let diff = (first.to_dtype(DType::F32).unwrap() - again.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn edit_and_inpaint_with_the_embedded_model() {
    let dir = tempfile::tempdir().unwrap();
    let (img, mask) = (dir.path().join("in.png"), dir.path().join("mask.png"));
    image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (8..20).contains(&x) && y > 4 {
            255
        } else {
            0
        }])
    })
    .save(&img)
    .unwrap();
    // Regenerate the right half.
    image::GrayImage::from_fn(28, 28, |x, _| image::Luma([if x >= 14 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let halves = |png: &Path| {
        let g = image::open(png).unwrap().to_luma8();
        assert_eq!(g.dimensions(), (2 * 30 + 2, 32));
        let crop = |x0: u32| image::imageops::crop_imm(&g, x0, 2, 28, 28).to_image();
        (crop(2), crop(32))
    };
    // Strength 0: the result is the input.
    let out = dir.path().join("edit.png");
    succeeds(&dit(&[
        "edit",
        "--image",
        p(&img),
        "--strength",
        "0",
        "--labels",
        "3",
        "--steps",
        "4",
        "--out",
        p(&out),
    ]));
    let (input, result) = halves(&out);
    assert_eq!(input, result);
    // Inpainting keeps the left half exactly (pixel space) and redraws the right half.
    let out = dir.path().join("inpaint.png");
    succeeds(&dit(&[
        "inpaint",
        "--image",
        p(&img),
        "--mask",
        p(&mask),
        "--labels",
        "3",
        "--steps",
        "5",
        "--resample",
        "2",
        "--out",
        p(&out),
    ]));
    let (input, result) = halves(&out);
    for y in 0..28 {
        for x in 0..14 {
            assert_eq!(input.get_pixel(x, y), result.get_pixel(x, y), "({x}, {y})");
        }
    }
    assert_ne!(input, result);
    // A latent model through a VAE (the tiny diffusers fixture, factor 2: 16x16 latents of
    // 32 px images) on a real photograph: strength 0 gives back the input's latents, so both
    // decode alike.
    let out = dir.path().join("latent.png");
    let (ckpt, vae) = (fixture("dit_c10_128.pt"), fixture("tiny_vae_folder"));
    let img = fixture("photo_cat.png");
    succeeds(&dit(&[
        "edit",
        "--ckpt",
        p(&ckpt),
        "--num-heads",
        "6",
        "--vae",
        p(&vae),
        "--image",
        p(&img),
        "--strength",
        "0",
        "--labels",
        "2",
        "--steps",
        "3",
        "--out",
        p(&out),
    ]));
    let g = image::open(&out).unwrap().to_rgb8();
    assert_eq!(g.dimensions(), (2 * 34 + 2, 36));
    let crop = |x0: u32| image::imageops::crop_imm(&g, x0, 2, 32, 32).to_image();
    assert_eq!(crop(2), crop(36));
}

#[test]
fn a_v_prediction_cosine_model_trains_and_samples_as_trained() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    succeeds(&train_tiny(&[
        "--out",
        p(&run),
        "--steps",
        "2",
        "--global-batch-size",
        "2",
        "--patch",
        "4",
        "--prediction",
        "v",
        "--schedule",
        "cosine",
        "--loss",
        "l1",
        "--sample-every",
        "0",
    ]));
    let ckpt = run.join("step-0000002");
    let state: serde_json::Value = state_of(&ckpt);
    assert_eq!(
        (
            state["model"]["prediction"].as_str(),
            state["model"]["schedule"].as_str()
        ),
        (Some("v"), Some("cosine"))
    );
    // Exported and sampled: the config travels with the weights.
    let st = dir.path().join("m.safetensors");
    succeeds(&dit(&["convert", p(&ckpt), p(&st)]));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("m.json")).unwrap()).unwrap();
    assert_eq!(json["prediction"], "v");
    let png = dir.path().join("s.png");
    succeeds(&dit(&[
        "sample",
        "--ckpt",
        p(&ckpt),
        "--steps",
        "3",
        "--labels",
        "1",
        "--sampler",
        "dpm-solver-pp",
        "--out",
        p(&png),
    ]));
    // Fine-tuned from it: the checkpoint's target and schedule unless the flags say otherwise.
    for (flags, want) in [(&[][..], "v"), (&["--prediction", "eps"][..], "eps")] {
        let tuned = dir.path().join(format!("tuned-{want}"));
        let mut args = vec!["--out", p(&tuned), "--init", p(&ckpt), "--steps", "1"];
        args.extend(["--global-batch-size", "2", "--sample-every", "0"]);
        args.extend(flags);
        succeeds(&train_tiny(&args));
        let state = state_of(&tuned.join("step-0000001"));
        let got = (
            state["model"]["prediction"].as_str(),
            state["model"]["schedule"].as_str(),
        );
        assert_eq!(got, (Some(want), Some("cosine")), "{flags:?}");
    }
}

#[test]
fn gpu_requests_in_a_cpu_build_are_clear_errors() {
    // This suite builds without the cuda / nccl features.
    fails_with(&dit(&["--device", "cuda:0", "sample"]), "--features cuda");
    fails_with(
        &dit(&["--device", "tpu", "sample"]),
        "expected cpu, cuda or cuda:N",
    );
    let out = tempfile::tempdir().unwrap();
    let run = [
        "train",
        "--steps",
        "1",
        "--gpus",
        "2",
        "--out",
        p(out.path()),
    ];
    fails_with(&dit(&run), "--features cuda,nccl");
    // A worker of a data-parallel run needs its place in the run and a GPU build.
    let worker = Command::new(env!("CARGO_BIN_EXE_dit"))
        .args(["train", "--steps", "1", "--out", p(out.path())])
        .env("DIT_WORLD_SIZE", "2")
        .env("DIT_RANK", "5")
        .output()
        .unwrap();
    fails_with(&worker, "DIT_RANK 5 is not below DIT_WORLD_SIZE 2");
}

/// Each block design of §3.2 trains, checkpoints (its design in state.json), samples from the
/// checkpoint, and converts to safetensors with its config.
#[test]
fn block_designs_train_sample_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    for design in ["ada-ln", "cross-attention", "in-context"] {
        let out = dir.path().join(design);
        succeeds(&train_tiny(&[
            "--block",
            design,
            "--out",
            p(&out),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--ckpt-every",
            "2",
            "--sample-every",
            "0",
        ]));
        let ckpt = out.join("step-0000002");
        let state: serde_json::Value = state_of(&ckpt);
        assert_eq!(state["model"]["block"], design);
        let png = dir.path().join(format!("{design}.png"));
        let sample = |ckpt: &Path| {
            succeeds(&dit(&[
                "sample",
                "--ckpt",
                p(ckpt),
                "--steps",
                "2",
                "--labels",
                "3",
                "--out",
                p(&png),
            ]))
        };
        sample(&ckpt);
        // Exported: weights plus the config beside them (tests/parity.rs checks that bare
        // weights are recognised by their names).
        let st = dir.path().join(format!("{design}.safetensors"));
        succeeds(&dit(&["convert", p(&ckpt), p(&st)]));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(st.with_extension("json")).unwrap())
                .unwrap();
        assert_eq!(cfg["block"], design);
        sample(&st);
    }
    fails_with(&train_tiny(&["--block", "sideways"]), "sideways");
}

/// The FID Inception weights if fetched (tools/fetch-inception.sh); `.ci/run` requires them.
fn inception_weights() -> Option<PathBuf> {
    let path = std::env::var_os("DIT_INCEPTION")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/dit/inception-2015-12-05.pt"))
        })
        .filter(|p| p.is_file());
    if path.is_none() {
        assert!(
            std::env::var_os("DIT_REQUIRE_FETCHED").is_none(),
            "DIT_REQUIRE_FETCHED is set but the Inception weights are missing"
        );
        eprintln!("SKIPPED: no Inception weights (run tools/fetch-inception.sh)");
    }
    path
}

/// A text-conditioned model samples from `--prompt`s with the MiniLM encoder: deterministic per
/// seed, prompt-dependent; mismatches are clear errors.
#[test]
fn text_models_sample_from_prompts() {
    let dir = tempfile::tempdir().unwrap();
    // Class-model errors need no encoder.
    fails_with(
        &sample_c10(&["--prompt", "a red circle"]),
        "needs a text-conditioned model",
    );
    let Some(encoder) = std::env::var_os("DIT_MINILM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dit/all-MiniLM-L6-v2"))
        })
        .filter(|p| p.is_dir())
    else {
        assert!(
            std::env::var_os("DIT_REQUIRE_FETCHED").is_none(),
            "MiniLM missing"
        );
        eprintln!("SKIPPED: run tools/fetch-minilm.sh");
        return;
    };
    // A tiny pixel-space text model for MiniLM's 384-wide embeddings: reference init with a
    // random final linear and open cross-attention, so the output depends on the prompt.
    let cfg = dit::DiTConfig {
        input_size: 16,
        patch_size: 4,
        in_channels: 3,
        hidden_size: 64,
        depth: 2,
        num_heads: 4,
        num_classes: 0,
        text: Some(dit::config::TextConditioning::single(384, 16)),
        ..Default::default()
    };
    let mut w = dit::train::reference_init(&cfg, &mut dit::rng::NoiseRng::new(0)).unwrap();
    for (k, v) in w.iter_mut() {
        if k.starts_with("final_layer.linear.w")
            || k.ends_with("cross_attn.proj.weight")
            || k.contains("adaLN_modulation.1.w")
        {
            *v = Tensor::randn(0f32, 0.05, v.shape(), &Device::Cpu).unwrap();
        }
    }
    let st = dir.path().join("text.safetensors");
    candle_core::safetensors::save(&w, &st).unwrap();
    std::fs::write(
        st.with_extension("json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let sample = |prompt: &str, seed: &str, out: &str| {
        let out = dir.path().join(out);
        succeeds(&dit(&[
            "sample",
            "--ckpt",
            p(&st),
            "--text-encoder",
            p(&encoder),
            "--prompt",
            prompt,
            "--prompt",
            "a blue square",
            "--steps",
            "3",
            "--seed",
            seed,
            "--save-latents",
            p(&out),
            "--no-decode",
            "--out",
            p(&out.with_extension("png")),
        ]));
        Tensor::read_npy(&out).unwrap()
    };
    let a = sample("a red circle in the top left", "1", "a.npy");
    assert_eq!(a.dims(), [2, 3, 16, 16]);
    let b = sample("a red circle in the top left", "1", "b.npy");
    assert_eq!(rel_l2(&a, &b), 0.0);
    let c = sample("a yellow triangle", "1", "c.npy");
    assert!(rel_l2(&c.get(0).unwrap(), &a.get(0).unwrap()) > 1e-4);
    fails_with(
        &dit(&["sample", "--ckpt", p(&st), "--text-encoder", p(&encoder)]),
        "needs --prompt",
    );
}

#[test]
fn eval_scores_sample_many_output_and_caches_reference_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    // Bad input first (needs no weights): clear errors.
    std::fs::write(d("junk.npz"), b"not a zip").unwrap();
    fails_with(
        &dit(&[
            "eval",
            "--samples",
            p(&d("junk.npz")),
            "--ref",
            p(&d("junk.npz")),
        ]),
        "not an .npz",
    );
    let photos = candle_core::safetensors::load(fixture("inception.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("images")
        .unwrap();
    Tensor::write_npz(&[("arr_0", &photos)], d("ref.npz")).unwrap();
    fails_with(
        &dit(&[
            "eval",
            "--samples",
            p(&d("ref.npz")),
            "--ref",
            p(&d("ref.npz")),
            "--inception",
            p(&d("missing.pt")),
        ]),
        "fetch-inception.sh",
    );
    let Some(weights) = inception_weights() else {
        return;
    };
    succeeds(&dit(&[
        "sample-many",
        "--npz",
        p(&d("s.npz")),
        "--num-samples",
        "5",
        "--steps",
        "3",
    ]));
    let samples = d("s.npz");
    let eval = |reference: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--samples",
            p(&samples),
            "--ref",
            p(reference),
            "--inception",
            p(&weights),
        ];
        args.extend(extra);
        let out = dit(&args);
        succeeds(&out);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let stats = d("ref-stats.npz");
    let first = eval(
        &d("ref.npz"),
        &["--save-ref-stats", p(&stats), "--json", p(&d("a.json"))],
    );
    for line in [
        "FID:",
        "sFID:",
        "Precision:",
        "Recall:",
        "Inception Score: n/a",
    ] {
        assert!(first.contains(line), "{line} missing: {first}");
    }
    let second = eval(&stats, &["--json", p(&d("b.json"))]);
    let read = |n: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d(n)).unwrap()).unwrap()
    };
    let (a, b) = (read("a.json"), read("b.json"));
    assert!(
        a["fid"].as_f64().unwrap() > 1.0,
        "digits are not photos: {a}"
    );
    assert_eq!(a, b, "cached reference statistics change nothing: {second}");
    assert_eq!(a["num_samples"], 5);
}

/// Captioned data trains a text model end to end: captions encoded once into a cache that a
/// resumed run reuses, checkpoints of a text config, a sample grid with its captions, and the
/// checkpoint sampling from prompts. (The tiny CLIP fixture stands in for a real encoder.)
#[test]
fn captioned_folders_train_text_models_that_resume_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("more")).unwrap();
    let colours = [("red", [220u8, 30, 30]), ("blue", [40, 70, 230])];
    for (i, (name, rgb)) in colours.iter().enumerate() {
        for j in 0..2 {
            let stem = if j == 0 {
                data.join(format!("{i}"))
            } else {
                data.join("more").join(format!("{i}"))
            };
            image::RgbImage::from_pixel(12, 12, image::Rgb(*rgb))
                .save(stem.with_extension("png"))
                .unwrap();
            std::fs::write(stem.with_extension("txt"), format!("a {name} square\n")).unwrap();
        }
    }
    let encoder = fixture("tiny_clip");
    let out = dir.path().join("run");
    let run = |steps: &str, resume: Option<&Path>| {
        let mut args = vec![
            "--data",
            p(&data),
            "--image-size",
            "8",
            "--patch",
            "4",
            "--text-encoder",
            p(&encoder),
            "--max-tokens",
            "12",
            "--out",
            p(&out),
            "--steps",
            steps,
            "--batch-size",
            "4",
            "--ckpt-every",
            "2",
            "--sample-every",
            "2",
        ];
        if let Some(r) = resume {
            args.extend(["--resume", p(r)]);
        }
        train_tiny(&args)
    };
    let first = run("2", None);
    succeeds(&first);
    assert!(String::from_utf8_lossy(&first.stdout).contains("encoded 2 captions"));
    let cache = out.join("text-embeddings.safetensors");
    let cached = candle_core::safetensors::load(&cache, &Device::Cpu).unwrap();
    // Two captions, trimmed to their real token count (far below --max-tokens), 32 wide.
    let (n, s, c) = cached["tokens"].dims3().unwrap();
    assert_eq!((n, c), (2, 32));
    assert!(s > 2 && s < 12, "{s}");
    let state: serde_json::Value = state_of(&out.join("step-0000002"));
    assert_eq!(state["model"]["num_classes"], 0);
    assert_eq!(state["model"]["text"]["context_dim"], 32);
    // Two captions x 2 rows of 8 px tiles (2 px padding); the captions beside it.
    let grid = image::open(out.join("samples/step-0000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * 10 + 2, 2 * 10 + 2));
    let names = std::fs::read_to_string(out.join("samples/step-0000002.txt")).unwrap();
    assert_eq!(names, "a blue square\na red square\n");
    // Resuming reuses the cache (no re-encoding) and continues.
    let modified = std::fs::metadata(&cache).unwrap().modified().unwrap();
    let again = run("4", Some(&out.join("step-0000002")));
    succeeds(&again);
    assert!(!String::from_utf8_lossy(&again.stdout).contains("encoded"));
    assert_eq!(
        std::fs::metadata(&cache).unwrap().modified().unwrap(),
        modified
    );
    assert!(out.join("step-0000004/weights.safetensors").is_file());
    // The checkpoint samples from prompts with the same encoder.
    let npy = dir.path().join("s.npy");
    succeeds(&dit(&[
        "sample",
        "--ckpt",
        p(&out.join("step-0000004")),
        "--text-encoder",
        p(&encoder),
        "--prompt",
        "a red square",
        "--steps",
        "2",
        "--save-latents",
        p(&npy),
        "--no-decode",
        "--out",
        p(&npy.with_extension("png")),
    ]));
    assert_eq!(Tensor::read_npy(&npy).unwrap().dims(), [1, 3, 8, 8]);
    // A class model cannot continue on captions.
    let classes = dir.path().join("classes");
    succeeds(&train_tiny(&[
        "--out",
        p(&classes),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--sample-every",
        "0",
    ]));
    let out2 = dir.path().join("run2");
    fails_with(
        &train_tiny(&[
            "--data",
            p(&data),
            "--text-encoder",
            p(&encoder),
            "--out",
            p(&out2),
            "--resume",
            p(&classes.join("step-0000001")),
        ]),
        "the data is captioned but the model is class-conditional",
    );
    // The built-in shapes train a text model too; mirroring them is refused.
    fails_with(
        &train_tiny(&["--builtin", "shapes", "--flip", "--out", p(&out2)]),
        "--flip",
    );
    succeeds(&train_tiny(&[
        "--builtin",
        "shapes",
        "--image-size",
        "8",
        "--per-caption",
        "1",
        "--text-encoder",
        p(&encoder),
        "--out",
        p(&out2),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--sample-every",
        "0",
    ]));
}

/// GenTron's two encoders: `--text-encoder` twice trains a model whose blocks alternate between
/// them (CLIP's tokens in even blocks, T5's in odd ones; both tiny fixtures are 32 wide), caches
/// both, and samples or resumes only when given both.
#[test]
fn two_text_encoders_alternate_over_the_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (clip, t5) = (fixture("tiny_clip"), fixture("tiny_t5"));
    let out = dir.path().join("run");
    let train = |encoders: &[&Path], out: &Path, resume: Option<&Path>| {
        let mut args = vec![
            "--builtin",
            "shapes",
            "--image-size",
            "8",
            "--per-caption",
            "1",
            "--patch",
            "4",
            "--max-tokens",
            "12",
            "--batch-size",
            "2",
            "--sample-every",
            "1",
            "--out",
            p(out),
        ];
        for e in encoders {
            args.extend(["--text-encoder", p(e)]);
        }
        match resume {
            Some(r) => args.extend(["--resume", p(r), "--steps", "2"]),
            None => args.extend(["--steps", "1"]),
        }
        let mut all = vec!["train", "--depth", "2", "--hidden", "32", "--heads", "2"];
        all.extend_from_slice(&args);
        dit(&all)
    };
    succeeds(&train(&[&clip, &t5], &out, None));
    let state: serde_json::Value = state_of(&out.join("step-0000001"));
    let text = &state["model"]["text"];
    assert_eq!(
        (
            text["context_dim"].as_u64(),
            text["second_context_dim"].as_u64()
        ),
        (Some(32), Some(32))
    );
    let cache =
        candle_core::safetensors::load(out.join("text-embeddings.safetensors"), &Device::Cpu)
            .unwrap();
    // T5's tokens differ from CLIP's for the same captions.
    let (a, b) = (&cache["tokens"], &cache["second.tokens"]);
    assert_eq!(a.dim(0).unwrap(), b.dim(0).unwrap());
    assert_eq!(b.dim(2).unwrap(), 32);
    let n = a.dim(1).unwrap().min(b.dim(1).unwrap());
    let d = (a.narrow(1, 0, n).unwrap() - b.narrow(1, 0, n).unwrap())
        .unwrap()
        .abs()
        .unwrap();
    assert!(d.sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0);
    assert!(out.join("samples/step-0000001.png").is_file());
    let weights =
        candle_core::safetensors::load(out.join("step-0000001/weights.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(
        weights["model.blocks.0.cross_attn.kv.weight"].dims(),
        [64, 32]
    );
    assert_eq!(
        weights["model.blocks.1.cross_attn.kv.weight"].dims(),
        [64, 32]
    );
    let (ckpt, png) = (out.join("step-0000001"), dir.path().join("s.png"));
    let sample = |encoders: &[&Path]| {
        let mut args = vec![
            "sample",
            "--ckpt",
            p(&ckpt),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--no-decode",
            "--out",
            p(&png),
        ];
        for e in encoders {
            args.extend(["--text-encoder", p(e)]);
        }
        dit(&args)
    };
    succeeds(&sample(&[&clip, &t5]));
    fails_with(&sample(&[&clip]), "reads 2 text encoder(s)");
    // Resuming with one encoder where the checkpoint reads two is refused.
    fails_with(
        &train(&[&clip], &out, Some(&out.join("step-0000001"))),
        "text tokens of widths",
    );
    succeeds(&train(&[&clip, &t5], &out, Some(&out.join("step-0000001"))));
}

/// A captioned set in the emoji package's layout (RGBA PNGs named in emoji.json) is extracted to
/// a latent store that keeps the captions, and a text model trains from the store.
#[test]
fn emoji_layout_extracts_to_a_captioned_store_that_trains_a_text_model() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("emoji-datasource-google");
    let images = pkg.join("img/google/64");
    std::fs::create_dir_all(&images).unwrap();
    let json = r#"[
      {"name": "RED APPLE", "image": "1f34e.png", "has_img_google": true},
      {"name": "BLUE HEART", "image": "1f499.png", "has_img_google": true,
       "skin_variations": {"1F3FD": {"image": "1f499-1f3fd.png", "has_img_google": true}}}
    ]"#;
    std::fs::write(pkg.join("emoji.json"), json).unwrap();
    for (f, rgb) in [
        ("1f34e.png", [200u8, 20, 20]),
        ("1f499.png", [20, 20, 200]),
        ("1f499-1f3fd.png", [20, 120, 200]),
    ] {
        image::RgbaImage::from_fn(20, 20, |x, _| {
            image::Rgba([rgb[0], rgb[1], rgb[2], (x * 12) as u8])
        })
        .save(images.join(f))
        .unwrap();
    }
    let store = dir.path().join("store");
    let out = extract_tiny(&pkg, &store, &[]);
    succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("wrote 3 latents (3 captions, 4x8x8)"),
        "{stdout}"
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["captions"],
        serde_json::json!(["blue heart", "blue heart, medium skin tone", "red apple"])
    );
    let run = dir.path().join("run");
    succeeds(&train_tiny(&[
        "--data",
        p(&store),
        "--text-encoder",
        p(&fixture("tiny_clip")),
        "--patch",
        "2",
        "--out",
        p(&run),
        "--steps",
        "1",
        "--batch-size",
        "3",
        "--sample-every",
        "0",
    ]));
    let state: serde_json::Value = state_of(&run.join("step-0000001"));
    assert_eq!(state["model"]["in_channels"], 4);
    assert_eq!(state["model"]["text"]["context_dim"], 32);
}

/// `--text-encoder owner/name` finds the model in the Hugging Face cache ($HF_HOME/hub, the
/// hub's own layout), offline; a repo missing from the cache is a clear error.
#[test]
fn text_encoders_resolve_from_the_hugging_face_cache() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("hf/hub/models--tiny--clip");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in std::fs::read_dir(fixture("tiny_clip")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    let run = |encoder: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_dit"))
            .args([
                "train",
                "--depth",
                "1",
                "--hidden",
                "32",
                "--heads",
                "2",
                "--builtin",
                "shapes",
                "--image-size",
                "8",
                "--per-caption",
                "1",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--sample-every",
                "0",
                "--text-encoder",
                encoder,
                "--out",
            ])
            .arg(dir.path().join(out))
            .env("HF_HOME", dir.path().join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let ok = run("tiny/clip", "a");
    succeeds(&ok);
    assert!(String::from_utf8_lossy(&ok.stdout).contains("snapshots/0123abcd"));
    fails_with(&run("tiny/absent", "b"), "not in the Hugging Face cache");
}

/// Text-to-video end to end on the built-in moving shapes: a video model (also one started from
/// an image model's checkpoint) trains with clip sample grids and GIFs, samples clips from
/// prompts with motion-free guidance (GIF and frames), and `eval-motion` scores it both ways.
#[test]
fn moving_shapes_train_a_video_model_that_samples_clips_and_is_scored() {
    let dir = tempfile::tempdir().unwrap();
    let clip = fixture("tiny_clip");
    let common = |builtin: &'static str, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--builtin",
            builtin,
            "--image-size",
            "8",
            "--per-caption",
            "1",
            "--frames",
            "3",
            "--text-encoder",
            p(&clip),
            "--patch",
            "4",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--sample-every",
            "2",
            "--out",
            p(out),
        ];
        args.extend_from_slice(extra);
        train_tiny(&args)
    };
    let video = dir.path().join("video");
    succeeds(&common(
        "moving-shapes",
        &video,
        &["--motion-free", "0.5", "--joint-images"],
    ));
    let ckpt = video.join("step-0000002");
    assert_eq!(state_of(&ckpt)["model"]["video"]["frames"], 3);
    // The grid: 8 captions x 3 frames of 8 px; the GIF beside it.
    let grid = image::open(video.join("samples/step-0000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (3 * 10 + 2, 8 * 10 + 2));
    assert!(video.join("samples/step-0000002.gif").is_file());
    // An image model's checkpoint starts a video model.
    let image = dir.path().join("image");
    succeeds(&common("shapes", &image, &[]));
    let from_image = dir.path().join("from-image");
    succeeds(&common(
        "moving-shapes",
        &from_image,
        &["--init", p(&image.join("step-0000002"))],
    ));
    let w = candle_core::safetensors::load(
        from_image.join("step-0000002/weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        w["model.blocks.0.temporal_attn.qkv.weight"].dims(),
        [96, 32]
    );
    // Sampling clips: 4 frames, motion-free guidance; PNG grid, GIF, per-clip frames.
    let (png, frames) = (dir.path().join("clips.png"), dir.path().join("frames"));
    let out = dit(&[
        "sample",
        "--ckpt",
        p(&ckpt),
        "--text-encoder",
        p(&clip),
        "--prompt",
        "a red circle moving left on a black background",
        "--prompt",
        "a blue square moving up on a white background",
        "--frames",
        "4",
        "--motion-scale",
        "1.2",
        "--cfg-scale",
        "7.5",
        "--steps",
        "2",
        "--out",
        p(&png),
        "--out-dir",
        p(&frames),
    ]);
    succeeds(&out);
    let grid = image::open(&png).unwrap();
    assert_eq!((grid.width(), grid.height()), (4 * 10 + 2, 2 * 10 + 2));
    let gif = std::fs::File::open(png.with_extension("gif")).unwrap();
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(gif)).unwrap();
    use image::AnimationDecoder;
    assert_eq!(decoder.into_frames().count(), 4);
    assert!(frames.join("000001/003.png").is_file() && frames.join("000001.gif").is_file());
    // --motion-scale needs a video model.
    fails_with(
        &dit(&[
            "sample",
            "--ckpt",
            p(&image.join("step-0000002")),
            "--text-encoder",
            p(&clip),
            "--prompt",
            "x",
            "--motion-scale",
            "1.2",
            "--out",
            p(&png),
        ]),
        "--motion-scale is for text-to-video models",
    );
    // eval-motion: held-out captions with and without motion-free guidance.
    let json = dir.path().join("m.json");
    succeeds(&dit(&[
        "eval-motion",
        "--ckpt",
        p(&ckpt),
        "--text-encoder",
        p(&clip),
        "--per-caption",
        "1",
        "--held-out-only",
        "--steps",
        "2",
        "--json",
        p(&json),
    ]));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for run in [
        "held-out / text guidance",
        "held-out / motion-free guidance",
    ] {
        let d = m[run]["direction"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&d), "{m}");
        assert!(m[run]["clips"].as_u64().unwrap() > 30, "{m}");
    }
    // Spacetime patches instead of temporal attention: 3-frame tubes; no motion-free guidance.
    let tubes = dir.path().join("tubes");
    succeeds(&common("moving-shapes", &tubes, &["--tubelet", "3"]));
    let tube_ckpt = tubes.join("step-0000002");
    assert_eq!(state_of(&tube_ckpt)["model"]["video"]["tubelet"], 3);
    let w = candle_core::safetensors::load(tube_ckpt.join("weights.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(w["model.x_embedder.proj.weight"].dims(), [32, 3, 3, 4, 4]);
    assert!(!w.contains_key("model.blocks.0.temporal_attn.qkv.weight"));
    let tube_sample = |extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--ckpt",
            p(&tube_ckpt),
            "--text-encoder",
            p(&clip),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--out",
            p(&png),
        ];
        args.extend_from_slice(extra);
        dit(&args)
    };
    succeeds(&tube_sample(&["--frames", "6"]));
    fails_with(
        &tube_sample(&["--motion-scale", "1.2"]),
        "temporal attention",
    );
    // eval-shapes refuses a video model, eval-motion an image model.
    fails_with(
        &dit(&[
            "eval-shapes",
            "--ckpt",
            p(&ckpt),
            "--text-encoder",
            p(&clip),
        ]),
        "text-to-image models",
    );
}

/// A folder of captioned clips (a folder of frames, a GIF) trains a text-to-video model, in
/// pixel space and, frame by frame through a VAE, in latent space.
#[test]
fn clip_folders_train_text_to_video_models() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("clips");
    std::fs::create_dir_all(data.join("fade")).unwrap();
    for f in 0..4u8 {
        image::RgbImage::from_pixel(12, 12, image::Rgb([f * 60, 10, 10]))
            .save(data.join(format!("fade/{f}.png")))
            .unwrap();
    }
    std::fs::write(data.join("fade.txt"), "a red fade").unwrap();
    let frames: Vec<image::RgbImage> = (0..5u8)
        .map(|f| image::RgbImage::from_pixel(12, 12, image::Rgb([10, 10, f * 50])))
        .collect();
    dit::image_io::save_gif(&frames, 100, &data.join("blue.gif")).unwrap();
    std::fs::write(data.join("blue.txt"), "a blue fade").unwrap();
    let (encoder, vae) = (fixture("tiny_clip"), fixture("tiny_vae_folder"));
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--data",
            p(&data),
            "--image-size",
            "8",
            "--text-encoder",
            p(&encoder),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--sample-every",
            "0",
            "--out",
            p(out),
        ];
        args.extend_from_slice(extra);
        train_tiny(&args)
    };
    let pixels = dir.path().join("pixels");
    succeeds(&run(
        &pixels,
        &["--patch", "4", "--frames", "2", "--frame-stride", "2"],
    ));
    let model = &state_of(&pixels.join("step-0000001"))["model"];
    assert_eq!(
        (
            model["video"]["frames"].as_u64(),
            model["in_channels"].as_u64()
        ),
        (Some(2), Some(3))
    );
    let latents = dir.path().join("latents");
    succeeds(&run(
        &latents,
        &[
            "--patch",
            "2",
            "--vae",
            p(&vae),
            "--frames",
            "2",
            "--frame-stride",
            "2",
        ],
    ));
    let model = &state_of(&latents.join("step-0000001"))["model"];
    assert_eq!(
        (model["in_channels"].as_u64(), model["input_size"].as_u64()),
        (Some(4), Some(4))
    );
    // More frames than a clip has: an error naming the clip.
    fails_with(
        &run(
            &dir.path().join("long"),
            &["--patch", "4", "--frames", "4", "--frame-stride", "2"],
        ),
        "need 7",
    );
}

#[test]
fn bench_pack_times_packed_against_padded() {
    let out = dit(&[
        "bench",
        "--pack",
        "64",
        "--models",
        "DiT-S/8",
        "--image-size",
        "256",
        "--batch-size",
        "6",
        "--iters",
        "1",
    ]);
    succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (packed, padded) = (&lines[0], &lines[1]);
    assert_eq!(packed["what"], "train_step_packed");
    assert_eq!(padded["what"], "train_step_padded");
    // Six images of 4 to 16 tokens: a few sequences of 64 packed, six padded rows.
    let (seqs, tokens) = (
        packed["sequences"].as_u64().unwrap(),
        packed["tokens"].as_u64().unwrap(),
    );
    assert!(
        seqs * 64 >= tokens && seqs < 6,
        "{seqs} sequences for {tokens} tokens"
    );
    assert_eq!(padded["sequences"], 6);
    assert!(packed["fill"].as_f64().unwrap() < 1.0);
    assert!(packed["seq_len"] == 64 && packed["tokens"] == padded["tokens"]);
    assert!(stdout.contains("packed/padded = "), "{stdout}");
}

#[test]
fn decode_turns_saved_latents_into_diffusers_images() {
    let dir = tempfile::tempdir().unwrap();
    let io =
        candle_core::safetensors::load(fixture("tiny_vae_io.safetensors"), &Device::Cpu).unwrap();
    let (lat, imgs, grid) = (
        dir.path().join("lat.npy"),
        dir.path().join("img.npy"),
        dir.path().join("grid.png"),
    );
    io["latents"].write_npy(&lat).unwrap();
    let vae = fixture("tiny_vae_folder");
    let out = dit(&[
        "decode",
        p(&lat),
        "--vae",
        p(&vae),
        "--out",
        p(&grid),
        "--save-images",
        p(&imgs),
    ]);
    succeeds(&out);
    // diffusers' AutoencoderKL decoded the same latents (tools/make_fixtures.py).
    let got = Tensor::read_npy(&imgs).unwrap();
    let e = rel_l2(&got, &io["decoded"]);
    assert!(e < 1e-5, "decode rel L2 {e}");
    assert!(grid.is_file());

    // Latents of the wrong channel count are refused with their shape.
    io["latents"]
        .narrow(1, 0, 3)
        .unwrap()
        .write_npy(&lat)
        .unwrap();
    fails_with(
        &dit(&["decode", p(&lat), "--vae", p(&vae), "--out", p(&grid)]),
        "have shape [2, 3,",
    );
}
