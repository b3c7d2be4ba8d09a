//! The global binary index (GBI): the one place that parses a `.safetensors` file. It maps
//! the file, checks every header entry against the file's real size, and groups the
//! tensors by the layer they belong to, so the weight stream can hand out a layer's bytes
//! (and prefetch the next layer's pages) without looking at names again.
//!
//! The header is parsed here rather than with the safetensors crate so that every defect
//! of a file (truncation, lying sizes, overlapping or out-of-range offsets, unsupported
//! dtypes) becomes an error that names the file and the tensor, never a panic.

use crate::error::{Error, Result};
use crate::fsutil::MAX_HEADER_SIZE;
use crate::modelfile::{FileState, Kind, Stamp};
use crate::types::DType;
use memmap2::Mmap;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Where one tensor lies in the file, validated against the file's size at open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The HF name, as in the header.
    pub name: String,
    /// Element type of the stored bytes.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// absolute byte offset in the file
    pub offset: usize,
    /// Length in bytes (`product(shape) × dtype size`).
    pub len: usize,
}

/// The part of the model a tensor belongs to, by its HF name: what the weight stream
/// loads together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// Token (and GPT-2 position) embeddings.
    Embed,
    /// Transformer block N.
    Layer(usize),
    /// Final norm and LM head.
    Head,
    /// Anything else (e.g. stray buffers, quant states); never streamed.
    Other,
}

/// Name prefixes of the embedding tensors (Llama, GPT-2 with and without `transformer.`).
const EMBED_PREFIXES: [&str; 5] = [
    "model.embed_tokens.",
    "transformer.wte.",
    "transformer.wpe.",
    "wte.",
    "wpe.",
];
/// Name prefixes followed by `N.` for the tensors of block N.
const LAYER_PREFIXES: [&str; 3] = ["model.layers.", "transformer.h.", "h."];
/// Name prefixes of the final norm and LM head.
const HEAD_PREFIXES: [&str; 4] = ["model.norm.", "lm_head.", "transformer.ln_f.", "ln_f."];

/// An open, validated `.safetensors` file: its memory map and an index of its tensors.
///
/// The file is memory-mapped: it must not be modified or truncated (by this or any other
/// process) while the `Gbi` is alive, or reads may see changed bytes or fault. The weight
/// streams call [`Gbi::check_unchanged`] before each layer they read, which turns such a
/// change into an error naming the file; a truncation in the moment between that check
/// and the read faults (SIGBUS), which [`crate::modelfile::install_fault_handler`] turns
/// into a message naming the file. Replacing the file by a rename is safe: the mapping
/// keeps the old file.
pub struct Gbi {
    path: PathBuf,
    mmap: Mmap,
    /// The open file behind the map, and what it was when opened.
    file: File,
    stamp: Stamp,
    /// Slot of the map in the SIGBUS handler's table.
    fault_slot: Option<usize>,
    /// In file order (ascending offset, then name).
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// Indices into `tensors`, in file order, for every group present.
    groups: BTreeMap<Group, Vec<usize>>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for Gbi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gbi")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("layers", &self.num_layers())
            .finish()
    }
}

/// What the header parse yields, before it is attached to a mapping.
struct Parsed {
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl Gbi {
    /// Map `path`, parse its safetensors header and validate every entry against the file.
    pub fn open(path: &Path) -> Result<Gbi> {
        // a GGUF, a pickle or a FIFO gets its own message (and a FIFO is never opened)
        if let kind @ (Kind::Gguf | Kind::Pickle { .. } | Kind::NotRegular(_)) =
            crate::modelfile::classify(path)?
            && let Some(e) = crate::modelfile::refusal(path, kind)
        {
            return Err(e);
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let stamp = Stamp::of(&file, path)?;
        let file_len = stamp.len();
        if file_len < 8 {
            return Err(too_short(path, file_len as usize));
        }
        // SAFETY: the map is read-only and private to this `Gbi`. Its soundness relies on
        // the file not being modified or truncated while mapped, which the type's
        // documentation requires of callers; every range read from it is checked at open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let Parsed { tensors, metadata } = parse(path, &mmap)?;

        let mut by_name = HashMap::with_capacity(tensors.len());
        let mut groups: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
        for (i, t) in tensors.iter().enumerate() {
            by_name.insert(t.name.clone(), i);
            groups.entry(Self::group_of(&t.name)).or_default().push(i);
        }
        let fault_slot =
            crate::modelfile::register_mapping(mmap.as_ptr() as usize, mmap.len(), path);
        Ok(Gbi {
            path: path.to_path_buf(),
            mmap,
            file,
            stamp,
            fault_slot,
            tensors,
            by_name,
            groups,
            metadata,
        })
    }

    /// The file this index maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the mapped file stands now against what it was when opened (two `stat` calls).
    pub fn file_state(&self) -> Result<FileState> {
        self.stamp.check(&self.file, &self.path)
    }

    /// An error naming the file when it was modified in place (truncated, extended or
    /// rewritten) since it was opened: what the weight streams call before reading a
    /// layer. A file replaced by a rename passes: the map keeps the old bytes.
    pub fn check_unchanged(&self) -> Result<()> {
        match self.file_state()? {
            FileState::Modified(what) => Err(crate::modelfile::modified_error(&self.path, &what)),
            FileState::Unchanged | FileState::Replaced => Ok(()),
        }
    }

    /// The content fingerprint of the mapped file
    /// ([`crate::modelfile::content_fingerprint`]), read from the open file: the bytes
    /// this index serves, even when the path names another file now.
    pub fn content_fingerprint(&self) -> Result<String> {
        self.check_unchanged()?;
        crate::modelfile::content_fingerprint(&self.file, &self.path)
    }

    /// Number of tensors in the file.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The named tensor, or an error that names the file, lists a few of its tensors and
    /// suggests a close name when there is one.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.get(name).ok_or_else(|| self.missing(name, None))
    }

    /// The named tensor, if present.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// Serve the bytes of `target` under `name` as well (a tied head: `lm_head.weight`
    /// read from the embedding when a checkpoint leaves it out, as transformers ties it).
    /// `name` must not be in the file already.
    pub fn alias(&mut self, name: &str, target: &str) -> Result<()> {
        if self.by_name.contains_key(name) {
            return Err(Error::internal(format!(
                "alias '{name}' is a tensor of the file"
            )));
        }
        let mut t = self.tensor(target)?.clone();
        t.name = name.to_string();
        let i = self.tensors.len();
        self.tensors.push(t);
        self.by_name.insert(name.to_string(), i);
        self.groups.entry(Self::group_of(name)).or_default().push(i);
        Ok(())
    }

    /// The open file behind the map (for reading it without the map: the staging ring).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The whole mapped file (for registering it with a device driver as pinned,
    /// read-only host memory).
    pub fn mapped(&self) -> &[u8] {
        &self.mmap
    }

    /// The tensor's bytes, borrowed from the map. `t` must come from this `Gbi` (its range
    /// was validated at open); a foreign one that lies outside the file yields `&[]`.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        t.offset
            .checked_add(t.len)
            .and_then(|end| self.mmap.get(t.offset..end))
            .unwrap_or(&[])
    }

    /// The named tensor, which must have `shape`; a missing tensor or another shape is an
    /// error naming the file, the tensor and both shapes (the usual cause: a config.json
    /// that does not belong to these weights).
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let t = self
            .get(name)
            .ok_or_else(|| self.missing(name, Some(shape)))?;
        if t.shape != shape {
            return Err(Error::tensor(
                &self.path,
                name,
                format!(
                    "expected shape {shape:?} from the model config, found {:?} ({}); the \
                     config.json may not belong to these weights",
                    t.shape, t.dtype
                ),
            ));
        }
        Ok(t)
    }

    /// All tensors in file order (ascending offset), the order that reads the file
    /// sequentially.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.iter()
    }

    /// The group a tensor name belongs to: `model.embed_tokens.*`, `[transformer.]wte.*`,
    /// `[transformer.]wpe.*` → Embed; `model.layers.N.*`, `[transformer.]h.N.*` → Layer(N);
    /// `model.norm.*`, `lm_head.*`, `[transformer.]ln_f.*` → Head; else (also a layer
    /// index that is not a plain decimal number) Other.
    pub fn group_of(name: &str) -> Group {
        // a quantized weight's quant state (JSON bytes) is read on the host when the model
        // opens; nothing on the device reads it, so it is not streamed with its block
        if name.contains(".quant_state.") {
            return Group::Other;
        }
        if EMBED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            return Group::Embed;
        }
        for p in LAYER_PREFIXES {
            if let Some(rest) = name.strip_prefix(p) {
                return match rest.split_once('.') {
                    Some((n, _)) if is_index(n) => n.parse().map_or(Group::Other, Group::Layer),
                    _ => Group::Other,
                };
            }
        }
        if HEAD_PREFIXES.iter().any(|p| name.starts_with(p)) {
            return Group::Head;
        }
        Group::Other
    }

    /// The tensors of group `g`, in file order (empty when the file has none).
    pub fn group(&self, g: Group) -> Vec<&TensorInfo> {
        self.groups
            .get(&g)
            .map(|ix| ix.iter().filter_map(|&i| self.tensors.get(i)).collect())
            .unwrap_or_default()
    }

    /// One more than the largest layer index present; 0 when there are no layers.
    pub fn num_layers(&self) -> usize {
        self.groups
            .keys()
            .filter_map(|g| match g {
                Group::Layer(n) => Some(n.saturating_add(1)),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Total bytes of group `g`'s tensors (what streaming it moves).
    pub fn group_bytes(&self, g: Group) -> usize {
        self.group(g).iter().map(|t| t.len).sum()
    }

    /// The header's `__metadata__` map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Hint the OS to read a group's pages ahead (madvise WILLNEED); errors ignored.
    pub fn prefetch(&self, g: Group) {
        #[cfg(unix)]
        {
            // Merge adjacent tensors into runs: one call per contiguous range.
            let mut run: Option<(usize, usize)> = None;
            let advise = |(start, end): (usize, usize)| {
                let _ = self
                    .mmap
                    .advise_range(memmap2::Advice::WillNeed, start, end - start);
            };
            for t in self.group(g) {
                if t.len == 0 {
                    continue;
                }
                let end = t.offset + t.len;
                run = match run {
                    Some((s, e)) if t.offset <= e => Some((s, e.max(end))),
                    Some(r) => {
                        advise(r);
                        Some((t.offset, end))
                    }
                    None => Some((t.offset, end)),
                };
            }
            if let Some(r) = run {
                advise(r);
            }
        }
        #[cfg(not(unix))]
        let _ = g;
    }

    /// The error for a tensor that is not in the file.
    fn missing(&self, name: &str, expected: Option<&[usize]>) -> Error {
        let mut msg = String::from("missing");
        if let Some(shape) = expected {
            msg += &format!(" (expected shape {shape:?} from the model config)");
        }
        if self.tensors.is_empty() {
            msg += "; the file has no tensors";
        } else {
            let examples: Vec<String> = self
                .tensors
                .iter()
                .take(3)
                .map(|t| format!("'{}'", t.name))
                .collect();
            msg += &format!(
                "; the file has {} tensors, e.g. {}",
                self.tensors.len(),
                examples.join(", ")
            );
        }
        if let Some(close) = self.suggest(name) {
            msg += &format!("; did you mean '{close}'?");
        }
        if expected.is_some() {
            msg += "; the config.json may not belong to these weights";
        }
        Error::tensor(&self.path, name, msg)
    }

    /// A tensor name close to `want`: one that differs by a dotted prefix (such as
    /// `transformer.` or `base_model.model.`), else the nearest by edit distance, if near.
    fn suggest(&self, want: &str) -> Option<&str> {
        let names = || self.tensors.iter().map(|t| t.name.as_str());
        if let Some(n) = names().find(|n| {
            (n.len() > want.len() && n.ends_with(want) && n[..n.len() - want.len()].ends_with('.'))
                || (want.len() > n.len()
                    && want.ends_with(n)
                    && want[..want.len() - n.len()].ends_with('.'))
        }) {
            return Some(n);
        }
        let bound = (want.len() / 4).max(2);
        names()
            .filter(|n| n.len().abs_diff(want.len()) <= bound)
            .map(|n| (edit_distance(n.as_bytes(), want.as_bytes()), n))
            .filter(|&(d, _)| d <= bound)
            .min()
            .map(|(_, n)| n)
    }
}

impl Drop for Gbi {
    fn drop(&mut self) {
        // before the map goes (the fields drop after this)
        if let Some(slot) = self.fault_slot {
            crate::modelfile::unregister_mapping(slot);
        }
    }
}

/// A plain decimal index: digits only, no sign, no leading zero (so that each layer has
/// one spelling).
fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

/// Levenshtein distance between two byte strings.
fn edit_distance(a: &[u8], b: &[u8]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn too_short(path: &Path, len: usize) -> Error {
    Error::format(
        path,
        format!(
            "file is {len} bytes, too short for a safetensors file (8-byte header size, then \
             the header); it is truncated or not safetensors"
        ),
    )
}

/// The header's top-level entries in file order with duplicates kept (a JSON map would
/// silently keep only the last of two tensors with one name).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(EntriesVisitor)
    }
}

/// A JSON value shortened for messages.
fn quote(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

/// Parse and validate the header of a safetensors file held in `bytes`. Everything that
/// `Gbi` later reads is checked here: afterwards, every tensor's range lies in `bytes`.
fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let fmt_err = |msg: String| Error::format(path, msg);
    let Some((size_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(too_short(path, bytes.len()));
    };
    let header_size = u64::from_le_bytes(*size_bytes);
    if header_size > MAX_HEADER_SIZE as u64 {
        return Err(fmt_err(format!(
            "header size {header_size} is larger than the {MAX_HEADER_SIZE}-byte limit; the \
             file is corrupt or not safetensors"
        )));
    }
    let header_size = header_size as usize;
    if header_size > rest.len() {
        return Err(fmt_err(format!(
            "header size {header_size} is more than the {} bytes that follow it; the file is \
             truncated or not safetensors",
            rest.len()
        )));
    }
    let (header, data) = rest.split_at(header_size);
    let data_start = 8 + header_size;
    let text = std::str::from_utf8(header).map_err(|e| {
        fmt_err(format!(
            "header is not valid UTF-8 ({e}); the file is corrupt or not safetensors"
        ))
    })?;
    let Entries(entries) = serde_json::from_str(text).map_err(|e| {
        fmt_err(format!(
            "header is not a valid JSON object ({e}); the file is corrupt or not safetensors"
        ))
    })?;

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut names = std::collections::HashSet::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            if metadata.is_some() {
                return Err(fmt_err("header has two '__metadata__' entries".into()));
            }
            metadata = Some(parse_metadata(path, &value)?);
            continue;
        }
        if !names.insert(name.clone()) {
            return Err(Error::tensor(path, name, "appears twice in the header"));
        }
        let (t, begin, end) = parse_entry(path, name, &value, data_start, data.len())?;
        tensors.push((t, begin, end));
    }

    // File order; then no two non-empty ranges may share a byte.
    tensors.sort_by(|a, b| (a.1, a.2, &a.0.name).cmp(&(b.1, b.2, &b.0.name)));
    let mut last: Option<(&str, usize, usize)> = None;
    for (t, begin, end) in &tensors {
        if begin == end {
            continue;
        }
        if let Some((other, ob, oe)) = last
            && *begin < oe
        {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "data_offsets [{begin}, {end}] overlap those of tensor '{other}' \
                     [{ob}, {oe}]; the file is corrupt"
                ),
            ));
        }
        last = Some((&t.name, *begin, *end));
    }
    Ok(Parsed {
        tensors: tensors.into_iter().map(|(t, _, _)| t).collect(),
        metadata: metadata.unwrap_or_default(),
    })
}

/// `__metadata__`: an object of strings.
fn parse_metadata(path: &Path, value: &Value) -> Result<BTreeMap<String, String>> {
    let Value::Object(obj) = value else {
        return Err(Error::format(
            path,
            format!(
                "header '__metadata__' must be an object of strings, found {}",
                quote(value)
            ),
        ));
    };
    obj.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(Error::format(
                path,
                format!(
                    "header '__metadata__' entry '{k}' must be a string, found {}",
                    quote(v)
                ),
            )),
        })
        .collect()
}

/// One tensor entry of the header, checked against the data section; also returns its
/// `data_offsets` (relative to the data section).
fn parse_entry(
    path: &Path,
    name: String,
    value: &Value,
    data_start: usize,
    data_len: usize,
) -> Result<(TensorInfo, usize, usize)> {
    let err = |msg: String| Error::tensor(path, name.as_str(), msg);
    let Value::Object(obj) = value else {
        return Err(err(format!(
            "header entry must be an object with dtype, shape and data_offsets, found {}",
            quote(value)
        )));
    };
    let field = |key: &str| {
        obj.get(key)
            .ok_or_else(|| err(format!("header entry has no '{key}'")))
    };
    let dtype = match field("dtype")? {
        Value::String(s) => match s.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "U8" => DType::U8,
            "F8_E4M3" => DType::F8E4M3,
            other => {
                return Err(err(format!(
                    "dtype '{other}' is not supported; supported: F32, F16, BF16, U8 and F8_E4M3 (quantized weights)"
                )));
            }
        },
        v => return Err(err(format!("dtype must be a string, found {}", quote(v)))),
    };
    let usizes = |key: &str| -> Result<Vec<usize>> {
        let v = field(key)?;
        let bad = || {
            err(format!(
                "'{key}' must be a list of non-negative integers, found {}",
                quote(v)
            ))
        };
        let Value::Array(items) = v else {
            return Err(bad());
        };
        items
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(bad)
            })
            .collect()
    };
    let shape = usizes("shape")?;
    let offsets = usizes("data_offsets")?;
    let &[begin, end] = offsets.as_slice() else {
        return Err(err(format!(
            "data_offsets must have 2 entries [begin, end], found {}",
            offsets.len()
        )));
    };
    if begin > end {
        return Err(err(format!(
            "data_offsets [{begin}, {end}] end before they begin; the file is corrupt"
        )));
    }
    if end > data_len {
        return Err(err(format!(
            "data_offsets [{begin}, {end}] reach past the {data_len}-byte data section; the \
             file is truncated or corrupt"
        )));
    }
    let want = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("shape {shape:?} is too large (size overflows)")))?;
    if end - begin != want {
        return Err(err(format!(
            "data_offsets [{begin}, {end}] hold {} bytes, but shape {shape:?} of {} needs \
             {want}; the file is corrupt",
            end - begin,
            dtype.safetensors_name()
        )));
    }
    let info = TensorInfo {
        name,
        dtype,
        shape,
        offset: data_start + begin,
        len: want,
    };
    Ok((info, begin, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::{TensorOut, f32_bytes, write_safetensors};
    use std::borrow::Cow;

    /// A tiny xorshift64 generator: seeded, reproducible, no dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// A two-layer Llama-like model plus one stray tensor, with random contents.
    fn sample() -> Vec<TensorOut<'static>> {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut t = |name: &str, dtype: DType, shape: &[usize]| {
            let n: usize = shape.iter().product::<usize>() * dtype.size();
            TensorOut {
                name: name.into(),
                dtype,
                shape: shape.to_vec(),
                data: Cow::Owned(rng.bytes(n)),
            }
        };
        vec![
            t("model.embed_tokens.weight", DType::BF16, &[5, 4]),
            t(
                "model.layers.0.self_attn.q_proj.weight",
                DType::BF16,
                &[4, 4],
            ),
            t("model.layers.0.input_layernorm.weight", DType::F32, &[4]),
            t(
                "model.layers.1.self_attn.q_proj.weight",
                DType::F16,
                &[4, 4],
            ),
            t("model.layers.1.mlp.up_proj.weight", DType::BF16, &[3, 4]),
            t("model.norm.weight", DType::F32, &[4]),
            t("lm_head.weight", DType::BF16, &[5, 4]),
            t("rotary.inv_freq", DType::F32, &[2]),
        ]
    }

    fn write_sample(dir: &Path) -> (PathBuf, Vec<TensorOut<'static>>) {
        let p = dir.join("model.safetensors");
        let tensors = sample();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&p, &tensors, &meta).unwrap();
        (p, tensors)
    }

    /// A file from a hand-written header and data section.
    fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    /// The error message of opening a file holding `bytes`, which must fail.
    fn open_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, bytes).unwrap();
        match Gbi::open(&p) {
            Ok(g) => panic!("expected an error, opened {g:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(&p.display().to_string()), "no path in: {msg}");
                msg
            }
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
        }
    }

    /// Use every accessor of an opened index; nothing may panic.
    fn exercise(g: &Gbi) -> usize {
        let mut n = 0;
        for t in g.tensors() {
            n += g.bytes(t).len();
            assert_eq!(g.bytes(t).len(), t.len);
            assert!(g.get(&t.name).is_some());
            let _ = g.expect(&t.name, &t.shape);
        }
        for grp in [Group::Embed, Group::Head, Group::Other, Group::Layer(0)] {
            n += g.group_bytes(grp);
            g.prefetch(grp);
        }
        let _ = g.num_layers();
        let _ = g.tensor("no.such.tensor");
        n
    }

    #[test]
    fn round_trip_through_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (p, tensors) = write_sample(dir.path());
        let g = Gbi::open(&p).unwrap();
        assert_eq!(g.path(), p);
        assert_eq!(g.len(), tensors.len());
        assert_eq!(g.metadata().get("format").map(String::as_str), Some("pt"));
        for t in &tensors {
            let info = g.tensor(&t.name).unwrap();
            assert_eq!(info.dtype, t.dtype, "{}", t.name);
            assert_eq!(info.shape, t.shape, "{}", t.name);
            assert_eq!(g.bytes(info), t.data.as_ref(), "{}", t.name);
            assert_eq!(g.expect(&t.name, &t.shape).unwrap(), info);
        }
        // File order: strictly ascending offsets, tiling the data section to the end.
        let file_len = std::fs::metadata(&p).unwrap().len() as usize;
        let infos: Vec<&TensorInfo> = g.tensors().collect();
        for w in infos.windows(2) {
            assert_eq!(w[0].offset + w[0].len, w[1].offset);
        }
        let last = infos.last().unwrap();
        assert_eq!(last.offset + last.len, file_len);

        let names = |grp| -> Vec<String> { g.group(grp).iter().map(|t| t.name.clone()).collect() };
        assert_eq!(names(Group::Embed), vec!["model.embed_tokens.weight"]);
        assert_eq!(names(Group::Layer(1)).len(), 2);
        assert_eq!(
            names(Group::Layer(0))
                .iter()
                .collect::<std::collections::BTreeSet<_>>(),
            [
                "model.layers.0.input_layernorm.weight".to_string(),
                "model.layers.0.self_attn.q_proj.weight".to_string()
            ]
            .iter()
            .collect()
        );
        assert_eq!(names(Group::Head).len(), 2);
        assert_eq!(names(Group::Other), vec!["rotary.inv_freq"]);
        assert!(g.group(Group::Layer(2)).is_empty());
        assert_eq!(g.num_layers(), 2);
        assert_eq!(g.group_bytes(Group::Layer(1)), 4 * 4 * 2 + 3 * 4 * 2);
        assert_eq!(g.group_bytes(Group::Layer(7)), 0);
        assert!(g.get("nope").is_none());
        g.prefetch(Group::Layer(0));
        assert!(exercise(&g) > 0);
    }

    #[test]
    fn f32_values_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.safetensors");
        let v = [1.0f32, -2.0, 0.5, 1e-3, 7.25, -0.0];
        let t = TensorOut {
            name: "h.0.attn.c_attn.bias".into(),
            dtype: DType::F32,
            shape: vec![2, 3],
            data: Cow::Owned(f32_bytes(&v)),
        };
        write_safetensors(&p, &[t], &BTreeMap::new()).unwrap();
        let g = Gbi::open(&p).unwrap();
        assert!(g.metadata().is_empty());
        let info = g.tensor("h.0.attn.c_attn.bias").unwrap();
        let mut out = [0f32; 6];
        info.dtype.decode_into(g.bytes(info), &mut out);
        assert_eq!(out, v);
        assert_eq!(g.num_layers(), 1);
    }

    #[test]
    fn empty_file_and_empty_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.safetensors");
        write_safetensors(&p, &[], &BTreeMap::new()).unwrap();
        let g = Gbi::open(&p).unwrap();
        assert!(g.is_empty());
        assert_eq!(g.num_layers(), 0);
        let msg = g.tensor("x").unwrap_err().to_string();
        assert_contains(&msg, &["'x'", "no tensors"]);

        // Zero-sized tensors may share offsets with anything.
        let hdr = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},
                      "b":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},
                      "c":{"dtype":"F16","shape":[0,3],"data_offsets":[4,4]}}"#;
        let bytes = raw_file(hdr, &[1, 2, 3, 4]);
        let parsed = parse(Path::new("mem"), &bytes).unwrap();
        let names: Vec<&str> = parsed.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["b", "a", "c"]);
    }

    #[test]
    fn group_naming() {
        let cases = [
            ("model.embed_tokens.weight", Group::Embed),
            ("transformer.wte.weight", Group::Embed),
            ("transformer.wpe.weight", Group::Embed),
            ("wte.weight", Group::Embed),
            ("wpe.weight", Group::Embed),
            ("model.layers.0.self_attn.q_proj.weight", Group::Layer(0)),
            ("model.layers.31.mlp.down_proj.weight", Group::Layer(31)),
            ("transformer.h.11.attn.c_attn.weight", Group::Layer(11)),
            ("h.3.ln_1.bias", Group::Layer(3)),
            ("model.norm.weight", Group::Head),
            ("lm_head.weight", Group::Head),
            ("transformer.ln_f.weight", Group::Head),
            ("ln_f.bias", Group::Head),
            ("model.layers.x.mlp.weight", Group::Other),
            ("model.layers.01.mlp.weight", Group::Other),
            ("model.layers.+1.mlp.weight", Group::Other),
            ("model.layers.-1.mlp.weight", Group::Other),
            ("model.layers..mlp.weight", Group::Other),
            ("model.layers.5", Group::Other),
            ("model.layers.99999999999999999999999999.a", Group::Other),
            ("model.embed_tokens", Group::Other),
            ("model.normal.weight", Group::Other),
            ("lm_head", Group::Other),
            ("hh.0.x", Group::Other),
            ("rotary_emb.inv_freq", Group::Other),
            ("", Group::Other),
        ];
        for (name, want) in cases {
            assert_eq!(Gbi::group_of(name), want, "{name}");
        }
    }

    #[test]
    fn missing_tensor_message() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = write_sample(dir.path());
        let g = Gbi::open(&p).unwrap();
        let path = p.display().to_string();

        let msg = g
            .tensor("model.layers.0.self_attn.k_proj.weight")
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                &path,
                "'model.layers.0.self_attn.k_proj.weight'",
                "missing",
                "8 tensors",
                "e.g.",
                "did you mean 'model.layers.0.self_attn.q_proj.weight'",
            ],
        );
        // A name that differs by a prefix is suggested even though it is far in edits.
        let msg = g
            .tensor("base_model.model.model.norm.weight")
            .unwrap_err()
            .to_string();
        assert_contains(&msg, &["did you mean 'model.norm.weight'"]);
        let msg = g
            .tensor("layers.1.mlp.up_proj.weight")
            .unwrap_err()
            .to_string();
        assert_contains(&msg, &["did you mean 'model.layers.1.mlp.up_proj.weight'"]);
        // Nothing close: no suggestion.
        let msg = g
            .tensor("completely.unrelated.thing")
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("did you mean"), "{msg}");
    }

    #[test]
    fn expect_shape_mismatch_message() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = write_sample(dir.path());
        let g = Gbi::open(&p).unwrap();
        let msg = g.expect("lm_head.weight", &[6, 4]).unwrap_err().to_string();
        assert_contains(
            &msg,
            &[
                &p.display().to_string(),
                "'lm_head.weight'",
                "expected shape [6, 4]",
                "found [5, 4]",
                "config.json may not belong to these weights",
            ],
        );
        let msg = g
            .expect("model.layers.2.mlp.up_proj.weight", &[3, 4])
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                "missing",
                "expected shape [3, 4]",
                "config.json may not belong",
            ],
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = write_sample(dir.path());
        let full = std::fs::read(&p).unwrap();
        assert!(Gbi::open(&p).is_ok());
        for n in 0..full.len() {
            let msg = open_err(&full[..n]);
            assert!(
                msg.contains("too short")
                    || msg.contains("truncated")
                    || msg.contains("more than the"),
                "prefix {n}: {msg}"
            );
        }
    }

    #[test]
    fn unopenable_paths() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.safetensors");
        let msg = Gbi::open(&missing).unwrap_err().to_string();
        assert_contains(&msg, &["absent.safetensors"]);
        // A folder opens as a file on Unix but cannot be parsed or mapped.
        let msg = Gbi::open(dir.path()).unwrap_err().to_string();
        assert_contains(&msg, &[&dir.path().display().to_string()]);
    }

    #[test]
    fn lying_header_size() {
        let good = raw_file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        );
        for size in [u64::MAX, 100_000_001, 1 << 40] {
            let mut b = good.clone();
            b[..8].copy_from_slice(&size.to_le_bytes());
            let msg = open_err(&b);
            assert_contains(&msg, &[&size.to_string(), "limit"]);
        }
        // Within the limit but past the end of the file.
        let mut b = good.clone();
        b[..8].copy_from_slice(&(good.len() as u64 - 7).to_le_bytes());
        let msg = open_err(&b);
        assert_contains(&msg, &["header size", "truncated"]);
        // Too small: the JSON is cut off.
        let mut b = good.clone();
        b[..8].copy_from_slice(&10u64.to_le_bytes());
        assert_contains(&open_err(&b), &["not a valid JSON object"]);
    }

    #[test]
    fn bad_entries() {
        let one = |hdr: &str, data_len: usize| open_err(&raw_file(hdr, &vec![0u8; data_len]));
        let msg = one(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        );
        assert_contains(&msg, &["'b'", "overlap", "'a'", "[4, 12]", "[0, 8]"]);
        let msg = one(
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
            24,
        );
        assert_contains(&msg, &["'w'", "20 bytes", "[2, 3]", "needs 24"]);
        let msg = one(
            r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            8,
        );
        assert_contains(&msg, &["'ids'", "'I64'", "F32, F16, BF16"]);
        let msg = one(
            r#"{"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#,
            8,
        );
        assert_contains(&msg, &["'w'", "'F64'", "not supported"]);
        let msg = one(
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            2,
        );
        assert_contains(&msg, &["'w'", "past the 2-byte data section"]);
        let msg = one(
            r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#,
            4,
        );
        assert_contains(&msg, &["'w'", "end before they begin"]);
        let msg = one(
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
            8,
        );
        assert_contains(&msg, &["'w'", "2 entries"]);
        let msg = one(
            r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            4,
        );
        assert_contains(&msg, &["'w'", "'shape'", "non-negative"]);
        let msg = one(
            r#"{"w":{"dtype":"F32","shape":"4","data_offsets":[0,4]}}"#,
            4,
        );
        assert_contains(&msg, &["'w'", "'shape'"]);
        let msg = one(r#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#, 4);
        assert_contains(&msg, &["'w'", "no 'shape'"]);
        let msg = one(r#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, 4);
        assert_contains(&msg, &["'w'", "no 'dtype'"]);
        let msg = one(r#"{"w":{"dtype":"F32","shape":[1]}}"#, 4);
        assert_contains(&msg, &["'w'", "no 'data_offsets'"]);
        let msg = one(r#"{"w":{"dtype":32,"shape":[1],"data_offsets":[0,4]}}"#, 4);
        assert_contains(&msg, &["'w'", "dtype must be a string"]);
        let msg = one(r#"{"w":[1,2,3]}"#, 4);
        assert_contains(&msg, &["'w'", "must be an object"]);
        let big = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{},{}],"data_offsets":[0,4]}}}}"#,
            usize::MAX / 2,
            3
        );
        assert_contains(&one(&big, 4), &["'w'", "too large"]);
        let msg = one(
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                "w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        );
        assert_contains(&msg, &["'w'", "twice"]);
        let msg = one(r#"{"__metadata__":{"format":1}}"#, 0);
        assert_contains(&msg, &["__metadata__", "format", "string"]);
        let msg = one(r#"{"__metadata__":[]}"#, 0);
        assert_contains(&msg, &["__metadata__", "object of strings"]);
        let msg = one(r#"{"__metadata__":{},"__metadata__":{}}"#, 0);
        assert_contains(&msg, &["two '__metadata__'"]);
    }

    #[test]
    fn bad_json_header() {
        for hdr in [
            "",
            "[1,2]",
            "\"text\"",
            "{",
            "{\"a\":}",
            "{} trailing",
            "nul",
        ] {
            let msg = open_err(&raw_file(hdr, &[]));
            assert_contains(&msg, &["not a valid JSON object"]);
        }
        let mut b = raw_file("{\"\u{e9}\":1}", &[]);
        b[10] = 0xff; // break the UTF-8 of the name
        let msg = open_err(&b);
        assert_contains(&msg, &["UTF-8"]);
        // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_contains(&open_err(&raw_file(&deep, &[])), &["JSON"]);
    }

    #[test]
    fn random_mutations_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = write_sample(dir.path());
        let good = std::fs::read(&p).unwrap();
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let (mut ok, mut err) = (0, 0);
        for i in 0..4000 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(4) {
                if b.is_empty() {
                    break;
                }
                // Mostly the header, where mutations matter; sometimes anywhere.
                let at = if rng.below(8) == 0 {
                    rng.below(b.len())
                } else {
                    rng.below(header_end.min(b.len()))
                };
                match rng.below(4) {
                    0 => b[at] = rng.next() as u8,
                    1 => b[at] ^= 1 << rng.below(8),
                    2 => b[at] = b"0123456789[]{}\",:-e."[rng.below(20)],
                    _ => {
                        let cut = rng.below(b.len() + 1);
                        b.truncate(cut);
                    }
                }
            }
            // Every 16th case goes through a real file and the mmap.
            if i % 16 == 0 {
                let q = dir.path().join("mutant.safetensors");
                std::fs::write(&q, &b).unwrap();
                match Gbi::open(&q) {
                    Ok(g) => {
                        exercise(&g);
                        ok += 1;
                    }
                    Err(_) => err += 1,
                }
            } else {
                match parse(Path::new("mem"), &b) {
                    Ok(parsed) => {
                        for t in &parsed.tensors {
                            assert!(t.offset + t.len <= b.len(), "{}", t.name);
                        }
                        ok += 1;
                    }
                    Err(_) => err += 1,
                }
            }
        }
        // The mutations exercised both outcomes.
        assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
    }
}
