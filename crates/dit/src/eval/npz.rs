//! Streaming the image batches of the ADM evaluation format: an `.npz` whose `arr_0` is uint8
//! (N, H, W, 3) (or a bare `.npy`). A 50K batch at 256x256 is 9.8 GB, so images are read a batch
//! at a time straight from the file: `np.savez` stores members uncompressed, and we seek to the
//! array's bytes inside the zip. A compressed member (`np.savez_compressed`) is inflated as a
//! stream instead.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Reads uint8 (N, H, W, C) images from `arr_0` of an .npz (or an .npy) in batches.
pub struct ImageBatches {
    path: PathBuf,
    reader: Box<dyn Read>,
    /// (N, H, W, C)
    pub shape: [usize; 4],
    next: usize,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Input(format!(
        "cannot read images from {}: {what}",
        path.display()
    ))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl ImageBatches {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(io(path))?;
        let mut magic = [0u8; 6];
        file.read_exact(&mut magic).map_err(io(path))?;
        file.seek(SeekFrom::Start(0)).map_err(io(path))?;
        let mut reader: Box<dyn Read> = if &magic == b"\x93NUMPY" {
            Box::new(BufReader::new(file))
        } else {
            Self::member(path, file)?
        };
        let shape = read_npy_header(&mut reader).map_err(|e| bad(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            shape,
            next: 0,
        })
    }

    /// The `arr_0.npy` member of a zip: a direct file reader at its bytes when stored, an
    /// inflating stream when compressed.
    fn member(path: &Path, file: File) -> Result<Box<dyn Read>> {
        let mut zip = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| bad(path, format!("not an .npz / .npy ({e})")))?;
        let entry = zip
            .by_name("arr_0.npy")
            .map_err(|_| bad(path, "it has no arr_0 (the ADM format's images)"))?;
        let stored = entry.compression() == zip::CompressionMethod::Stored;
        if let (true, Some(start)) = (stored, entry.data_start()) {
            let size = entry.size();
            drop(entry);
            let mut f = File::open(path).map_err(io(path))?;
            f.seek(SeekFrom::Start(start)).map_err(io(path))?;
            Ok(Box::new(BufReader::new(f.take(size))))
        } else {
            drop(entry);
            let mut buf = Vec::new();
            zip.by_name("arr_0.npy")
                .map_err(|e| bad(path, e))?
                .read_to_end(&mut buf)
                .map_err(io(path))?;
            Ok(Box::new(std::io::Cursor::new(buf)))
        }
    }

    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    /// The next up to `n` images as a uint8 (b, H, W, C) tensor; `None` at the end.
    pub fn next_batch(&mut self, n: usize, device: &Device) -> Result<Option<Tensor>> {
        let [total, h, w, c] = self.shape;
        let b = n.min(total - self.next);
        if b == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; b * h * w * c];
        self.reader.read_exact(&mut buf).map_err(|e| {
            bad(
                &self.path,
                format!("truncated at image {} of {total}: {e}", self.next),
            )
        })?;
        self.next += b;
        Ok(Some(Tensor::from_vec(buf, (b, h, w, c), device)?))
    }
}

/// Parses an .npy header, checking it holds C-ordered uint8 of rank 4; returns the shape.
fn read_npy_header(r: &mut dyn Read) -> std::result::Result<[usize; 4], String> {
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).map_err(|e| e.to_string())?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err("not an .npy array".into());
    }
    let len = if pre[6] == 1 {
        let mut l = [0u8; 2];
        r.read_exact(&mut l).map_err(|e| e.to_string())?;
        u16::from_le_bytes(l) as usize
    } else {
        let mut l = [0u8; 4];
        r.read_exact(&mut l).map_err(|e| e.to_string())?;
        u32::from_le_bytes(l) as usize
    };
    let mut header = vec![0u8; len];
    r.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header = String::from_utf8_lossy(&header);
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or("no descr in the header")?;
    // Byte order is meaningless for one-byte values: '|u1', '<u1' and 'u1' are all uint8.
    if !["'|u1'", "'<u1'", "'>u1'", "'u1'"]
        .iter()
        .any(|d| descr.starts_with(d))
    {
        return Err(format!(
            "images must be uint8, the array is {}",
            descr.split(',').next().unwrap_or("")
        ));
    }
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape = field("shape").ok_or("no shape in the header")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape in the header")?;
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("bad shape ({inner})")))
        .collect::<std::result::Result<_, _>>()?;
    match dims[..] {
        [n, h, w, c] if c == 3 => Ok([n, h, w, c]),
        _ => Err(format!(
            "images must be (N, H, W, 3), the array is {dims:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npz_written_by_candle_streams_back_in_batches_and_bad_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("dit-npz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..5 * 4 * 6 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let t = Tensor::from_vec(data.clone(), (5, 4, 6, 3), &Device::Cpu).unwrap();
        let npz = dir.join("a.npz");
        Tensor::write_npz(&[("arr_0", &t)], &npz).unwrap();
        let npy = dir.join("a.npy");
        t.write_npy(&npy).unwrap();
        for path in [&npz, &npy] {
            let mut r = ImageBatches::open(path).unwrap();
            assert_eq!(r.shape, [5, 4, 6, 3]);
            let mut got = Vec::new();
            let mut sizes = Vec::new();
            while let Some(b) = r.next_batch(2, &Device::Cpu).unwrap() {
                sizes.push(b.dim(0).unwrap());
                got.extend(b.flatten_all().unwrap().to_vec1::<u8>().unwrap());
            }
            assert_eq!(sizes, [2, 2, 1]);
            assert_eq!(got, data);
        }
        // Truncation and wrong dtypes are errors naming the problem, not panics.
        let bytes = std::fs::read(&npy).unwrap();
        let cut = dir.join("cut.npy");
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        let mut r = ImageBatches::open(&cut).unwrap();
        let err = loop {
            match r.next_batch(2, &Device::Cpu) {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a truncated file read to the end"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(err.contains("truncated"), "{err}");
        let f = dir.join("f.npz");
        Tensor::write_npz(
            &[("arr_0", &t.to_dtype(candle_core::DType::F32).unwrap())],
            &f,
        )
        .unwrap();
        let err = ImageBatches::open(&f).err().unwrap().to_string();
        assert!(err.contains("uint8"), "{err}");
        let g = dir.join("g.npz");
        Tensor::write_npz(&[("mu", &t)], &g).unwrap();
        assert!(ImageBatches::open(&g)
            .err()
            .unwrap()
            .to_string()
            .contains("arr_0"));
        std::fs::write(dir.join("junk.npz"), b"not a zip").unwrap();
        assert!(ImageBatches::open(&dir.join("junk.npz")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
