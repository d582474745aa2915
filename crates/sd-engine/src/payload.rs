//! Payload files: safetensors written tensor by tensor (never the whole component in
//! memory) with their SHA-256 computed on the way, and read back memory-mapped with
//! FP8 codes (`U8`) allowed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::{EngineError, Result};

/// One tensor to be written: its bytes are produced later, in order.
#[derive(Clone, Debug)]
pub(crate) struct TensorPlan {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorPlan {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::U8 => "U8",
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        _ => "UNSUPPORTED",
    }
}

/// A `Write` that hashes and counts what goes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a safetensors file at `path` (a new file), asking `data(i)` for the bytes of
/// `tensors[i]` in order. Returns (file bytes, hex sha256). The file is fsynced.
pub(crate) fn write_payload(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    tensors: &[TensorPlan],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<(u64, String)> {
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0usize;
    for t in tensors {
        let n = t.nbytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": dtype_name(t.dtype),
                "shape": t.shape,
                "data_offsets": [offset, offset + n],
            }),
        );
        offset += n;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let file = File::create_new(path).map_err(io)?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() != t.nbytes() {
            return Err(EngineError::Internal(format!(
                "tensor {} produced {} bytes, expected {}",
                t.name,
                bytes.len(),
                t.nbytes()
            )));
        }
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)?;
    let Hashing { inner, hash, bytes } = w;
    let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok((bytes, hex::encode(hash.finalize())))
}

/// Hex SHA-256 of a file (memory-mapped).
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        return Ok(hex::encode(Sha256::digest([])));
    }
    // SAFETY: read-only map of a bundle file; bundles are immutable once written.
    let map = unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    for chunk in map.chunks(1 << 22) {
        h.update(chunk);
    }
    Ok(hex::encode(h.finalize()))
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A memory-mapped payload file.
pub(crate) struct Payload {
    pub path: PathBuf,
    map: Mmap,
    pub entries: BTreeMap<String, Entry>,
}

impl Payload {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only map; its checksum was verified against the manifest.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (header_len, meta) =
            SafeTensors::read_metadata(&map).map_err(|e| EngineError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("not a valid safetensors payload ({e})"),
            })?;
        let base = 8 + header_len;
        let mut entries = BTreeMap::new();
        for (name, info) in meta.tensors() {
            entries.insert(
                name,
                Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            entries,
        })
    }

    pub fn bytes(&self, e: &Entry) -> &[u8] {
        &self.map[e.start..e.end]
    }

    /// A tensor's entry, or a corrupt-bundle error naming it.
    pub fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| EngineError::Corrupt {
            path: self.path.clone(),
            reason: format!("tensor `{name}` listed in the manifest is not in the payload"),
        })
    }

    /// An F32 tensor as values.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        if e.dtype != Dtype::F32 {
            return Err(EngineError::Corrupt {
                path: self.path.clone(),
                reason: format!("tensor `{name}` is {:?}, expected F32", e.dtype),
            });
        }
        Ok(self
            .bytes(e)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}
