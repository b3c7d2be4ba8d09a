//! The staging ring: a few host buffers (CUDA: pinned) that reader threads fill from the
//! model file, one layer each, ahead of use. A buffer handed out is given back with a
//! fence (CUDA: the event of the copy that reads it), and is refilled only after the
//! fence says that reader is done; the reader threads wait for it, not the caller.
//!
//! A layer's bytes are read as aligned runs ([`Layout`]): its tensors' byte ranges merged
//! where they touch, widened to [`ALIGN`](crate::diskread::ALIGN) and split in [`CHUNK`]s
//! that [`READERS`] threads read in parallel, so several reads are in flight. Each fill
//! runs on a thread of its own, which first waits for the buffer's fence.

use crate::diskread::{CHUNK, DiskReader, align_down, align_up};
use crate::error::{Error, Result};
use crate::gbi::{Gbi, TensorInfo};
use crate::hostmem::{Alloc, HostBuf};
use crate::stream::Part;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

/// Waits until the last reader of a given-back buffer is done.
pub trait Fence: Send {
    fn wait(&self) -> Result<()>;
}

/// One aligned run of the file: `[file_start, file_start + len)` read into the buffer at
/// `at`; `need` bytes of it lie inside the file.
#[derive(Clone, Debug)]
struct Run {
    file_start: usize,
    at: usize,
    len: usize,
    need: usize,
}

/// Where a layer's tensors lie in a buffer it was read into.
#[derive(Clone, Debug)]
pub struct Layout {
    runs: Vec<Run>,
    /// Tensor name → offset in the buffer.
    at: HashMap<String, usize>,
    /// Bytes of buffer needed.
    pub len: usize,
}

impl Layout {
    /// The layout of `tensors` (any order).
    pub fn of(tensors: &[&TensorInfo]) -> Layout {
        let mut ts: Vec<&TensorInfo> = tensors.to_vec();
        ts.sort_by_key(|t| t.offset);
        let mut runs: Vec<Run> = Vec::new();
        let mut at = HashMap::new();
        let mut end = 0; // end of the current run's real bytes
        for t in ts {
            let touches = runs
                .last()
                .is_some_and(|r| t.offset <= r.file_start + r.len);
            if !touches {
                let pos = runs.last().map_or(0, |r| r.at + r.len);
                let start = align_down(t.offset);
                runs.push(Run {
                    file_start: start,
                    at: pos,
                    len: 0,
                    need: 0,
                });
                end = t.offset;
            }
            let r = runs.last_mut().expect("a run was just pushed");
            end = end.max(t.offset + t.len);
            r.need = end - r.file_start;
            r.len = align_up(r.need);
            at.insert(t.name.clone(), r.at + (t.offset - r.file_start));
        }
        let len = runs.last().map_or(0, |r| r.at + r.len);
        Layout { runs, at, len }
    }

    /// The bytes of `t` in `buf` (read with this layout); empty for a foreign tensor.
    pub fn bytes<'a>(&self, buf: &'a [u8], t: &TensorInfo) -> &'a [u8] {
        self.at
            .get(&t.name)
            .and_then(|&a| buf.get(a..a + t.len))
            .unwrap_or(&[])
    }

    /// Read the layout's runs from `reader` into `buf`, in [`CHUNK`]s, on [`READERS`]
    /// threads of their own (several reads in flight).
    pub fn read(&self, reader: &DiskReader, buf: &mut [u8]) -> Result<()> {
        if buf.len() < self.len {
            return Err(Error::internal(format!(
                "a staging buffer of {} bytes for a layer of {}",
                buf.len(),
                self.len
            )));
        }
        let mut pieces: Vec<(&mut [u8], u64, usize)> = Vec::new();
        let mut rest = &mut buf[..self.len];
        for r in &self.runs {
            let (run, tail) = std::mem::take(&mut rest).split_at_mut(r.len);
            rest = tail;
            for (k, chunk) in run.chunks_mut(CHUNK).enumerate() {
                let off = k * CHUNK;
                let need = r.need.saturating_sub(off).min(chunk.len());
                pieces.push((chunk, (r.file_start + off) as u64, need));
            }
        }
        let threads = READERS.min(pieces.len());
        let queue = Mutex::new(pieces.into_iter());
        let next = || queue.lock().ok().and_then(|mut q| q.next());
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        while let Some((chunk, off, need)) = next() {
                            reader.read(chunk, off, need)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(Error::internal("a reader thread panicked")))
            })
        })
    }
}

/// A layer read into a staging buffer, handed out by [`StagingRing::take`].
pub struct Staged {
    slot: usize,
    pub part: Part,
    pub buf: Box<dyn HostBuf>,
}

/// A fill in progress: the buffer comes back with the outcome.
type Pending = Arc<(Mutex<Option<(Box<dyn HostBuf>, Result<()>)>>, Condvar)>;

enum Slot {
    /// In the ring, holding `part`'s bytes if some; refilled after `fence`.
    Idle {
        part: Option<Part>,
        buf: Box<dyn HostBuf>,
        fence: Option<Box<dyn Fence>>,
    },
    Filling(Part, Pending),
    /// Handed out.
    Out(Part),
    /// Transient, while a slot changes state.
    Gone,
}

/// The ring (see the module's description).
pub struct StagingRing {
    gbi: Arc<Gbi>,
    reader: Arc<DiskReader>,
    layouts: HashMap<Part, Arc<Layout>>,
    slots: Vec<Slot>,
    /// Why a fill could not start, when one could not (its buffer is lost).
    failed: Option<String>,
    /// Bytes read from disk so far.
    pub bytes_read: u64,
}

/// Reader threads of one layer's fill.
pub const READERS: usize = 4;

impl StagingRing {
    /// `buffers` buffers from `alloc`, each large enough for every layout.
    pub fn new(
        gbi: Arc<Gbi>,
        reader: Arc<DiskReader>,
        layouts: HashMap<Part, Arc<Layout>>,
        buffers: usize,
        alloc: Alloc,
    ) -> Result<StagingRing> {
        let size = layouts.values().map(|l| l.len).max().unwrap_or(0);
        let slots = (0..buffers.max(1))
            .map(|_| {
                Ok(Slot::Idle {
                    part: None,
                    buf: alloc(size)?,
                    fence: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StagingRing {
            gbi,
            reader,
            layouts,
            slots,
            failed: None,
            bytes_read: 0,
        })
    }

    /// The layout `part` is read with.
    pub fn layout(&self, part: Part) -> Option<&Layout> {
        self.layouts.get(&part).map(|l| &**l)
    }

    fn holds(&self, part: Part) -> bool {
        self.slots.iter().any(|s| match s {
            Slot::Idle { part: p, .. } => *p == Some(part),
            Slot::Filling(p, _) | Slot::Out(p) => *p == part,
            Slot::Gone => false,
        })
    }

    /// Start reading `part` into a buffer not holding one of `keep`, if there is one.
    /// Returns false when no buffer was free.
    pub fn prefetch(&mut self, part: Part, keep: &[Part]) -> bool {
        if self.holds(part) {
            return true;
        }
        let Some(layout) = self.layouts.get(&part).cloned() else {
            return true; // not a disk layer
        };
        let victim = self.slots.iter().position(
            |s| matches!(s, Slot::Idle { part: p, .. } if p.is_none_or(|p| !keep.contains(&p))),
        );
        let Some(i) = victim else { return false };
        let Slot::Idle { mut buf, fence, .. } = std::mem::replace(&mut self.slots[i], Slot::Gone)
        else {
            return false;
        };
        let pending: Pending = Arc::new((Mutex::new(None), Condvar::new()));
        let (done, gbi, reader) = (pending.clone(), self.gbi.clone(), self.reader.clone());
        self.bytes_read += layout.len as u64;
        // a thread of its own per fill: it waits for the fence, then reads
        let spawned = std::thread::Builder::new()
            .name("lema-fill".into())
            .spawn(move || {
                let r = (|| {
                    if let Some(f) = fence {
                        f.wait()?;
                    }
                    // a file modified since it was opened is an error naming it
                    gbi.check_unchanged()?;
                    layout.read(&reader, buf.bytes_mut())
                })();
                let (lock, cv) = &*done;
                if let Ok(mut g) = lock.lock() {
                    *g = Some((buf, r));
                }
                cv.notify_all();
            });
        match spawned {
            Ok(_) => self.slots[i] = Slot::Filling(part, pending),
            Err(e) => self.failed = Some(format!("could not start a reader thread: {e}")),
        }
        true
    }

    /// Wait for the fill of slot `i` and make it idle again; the fill's outcome.
    fn finish(&mut self, i: usize) -> Result<()> {
        let Slot::Filling(part, pending) = std::mem::replace(&mut self.slots[i], Slot::Gone) else {
            return Ok(());
        };
        let (lock, cv) = &*pending;
        let mut g = lock
            .lock()
            .map_err(|_| Error::internal("a reader thread panicked"))?;
        while g.is_none() {
            g = cv
                .wait(g)
                .map_err(|_| Error::internal("a reader thread panicked"))?;
        }
        let (buf, r) = g.take().expect("checked above");
        self.slots[i] = Slot::Idle {
            part: r.is_ok().then_some(part),
            buf,
            fence: None,
        };
        r
    }

    /// The buffer holding `part`, read first if need be (waiting for its fill).
    pub fn take(&mut self, part: Part) -> Result<Staged> {
        for _attempt in 0..2 {
            if let Some(i) = self
                .slots
                .iter()
                .position(|s| matches!(s, Slot::Filling(p, _) if *p == part))
            {
                self.finish(i)?;
            }
            if let Some(i) = self
                .slots
                .iter()
                .position(|s| matches!(s, Slot::Idle { part: Some(p), .. } if *p == part))
            {
                let Slot::Idle { buf, .. } = std::mem::replace(&mut self.slots[i], Slot::Out(part))
                else {
                    unreachable!("matched above")
                };
                return Ok(Staged { slot: i, part, buf });
            }
            if !self.prefetch(part, &[part]) {
                // every buffer is busy reading other layers: wait for the oldest
                if let Some(i) = self
                    .slots
                    .iter()
                    .position(|s| matches!(s, Slot::Filling(..)))
                {
                    self.finish(i)?;
                    self.prefetch(part, &[part]);
                }
            }
        }
        Err(Error::config(match &self.failed {
            Some(why) => format!("reading {part:?} from disk: {why}"),
            None => format!(
                "internal: no staging buffer for {part:?} (all {} are handed out)",
                self.slots.len()
            ),
        }))
    }

    /// Give `s` back; it is refilled only after `fence` (when given).
    pub fn give_back(&mut self, s: Staged, fence: Option<Box<dyn Fence>>) {
        if let Some(slot) = self.slots.get_mut(s.slot) {
            *slot = Slot::Idle {
                part: Some(s.part),
                buf: s.buf,
                fence,
            };
        }
    }

    /// How many buffers the ring has.
    pub fn buffers(&self) -> usize {
        self.slots.len()
    }
}

impl Drop for StagingRing {
    fn drop(&mut self) {
        // fills in flight own their buffers; wait so that none outlives the ring's users
        for i in 0..self.slots.len() {
            let _ = self.finish(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diskread::ALIGN;
    use crate::gbi::Group;
    use crate::hostmem::HeapBuf;
    use crate::types::DType;
    use std::time::{Duration, Instant};

    /// A tiny model's index, a reader of it and the layouts of its blocks and head.
    fn setup(dir: &std::path::Path) -> (Arc<Gbi>, Arc<DiskReader>, HashMap<Part, Arc<Layout>>) {
        let shape = crate::bench::preset("tiny").unwrap();
        let path = crate::bench::write_random_model(dir, &shape, DType::BF16, 3, 0.02).unwrap();
        let gbi = Arc::new(Gbi::open(&path).unwrap());
        let reader = Arc::new(DiskReader::new(gbi.file(), gbi.path()).unwrap());
        let mut layouts = HashMap::new();
        for (p, g) in [
            (Part::Block(0), Group::Layer(0)),
            (Part::Block(1), Group::Layer(1)),
            (Part::Head, Group::Head),
        ] {
            layouts.insert(p, Arc::new(Layout::of(&gbi.group(g))));
        }
        (gbi, reader, layouts)
    }

    #[test]
    fn layouts_read_every_tensor_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (gbi, reader, layouts) = setup(dir.path());
        for (g, l) in [Group::Layer(0), Group::Layer(1), Group::Head]
            .into_iter()
            .zip([Part::Block(0), Part::Block(1), Part::Head])
        {
            let layout = &layouts[&l];
            let tensors = gbi.group(g);
            // aligned runs: the buffer is whole pages and covers the tensors
            assert_eq!(layout.len % ALIGN, 0);
            assert!(layout.len >= tensors.iter().map(|t| t.len).sum::<usize>());
            let mut buf = HeapBuf::alloc(layout.len).unwrap();
            layout.read(&reader, buf.bytes_mut()).unwrap();
            for t in tensors {
                assert_eq!(layout.bytes(buf.bytes(), t), gbi.bytes(t), "{}", t.name);
            }
        }
    }

    #[test]
    fn separate_runs_and_a_short_buffer() {
        let t = |name: &str, offset, len| TensorInfo {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![len / 4],
            offset,
            len,
        };
        // a and b touch one page, c lies far away: two runs, each from an aligned start
        let (a, b, c) = (t("a", 100, 40), t("b", 4000, 400), t("c", 1 << 20, 8));
        let l = Layout::of(&[&c, &b, &a]);
        assert_eq!(l.runs.len(), 2);
        assert_eq!((l.runs[0].file_start, l.runs[0].len), (0, 8192));
        assert_eq!((l.runs[1].file_start, l.runs[1].at), (1 << 20, 8192));
        assert_eq!(l.len, 3 * ALIGN);
        assert_eq!(l.at["a"], 100);
        assert_eq!(l.at["c"], 8192);
        let mut small = HeapBuf::alloc(ALIGN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (_, reader, _) = setup(dir.path());
        let msg = l.read(&reader, small.bytes_mut()).unwrap_err().to_string();
        assert!(msg.contains("staging buffer"), "{msg}");
    }

    /// A fence the test opens.
    struct Gate(Arc<(Mutex<bool>, Condvar)>);
    impl Fence for Gate {
        fn wait(&self) -> Result<()> {
            let (m, cv) = &*self.0;
            let mut open = m.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            Ok(())
        }
    }

    #[test]
    fn a_buffer_is_refilled_only_after_its_fence() {
        let dir = tempfile::tempdir().unwrap();
        let (gbi, reader, layouts) = setup(dir.path());
        let mut ring =
            StagingRing::new(gbi.clone(), reader, layouts.clone(), 1, &mut HeapBuf::alloc).unwrap();
        let s = ring.take(Part::Block(0)).unwrap();
        let t0 = &gbi.group(Group::Layer(0))[0];
        assert_eq!(
            layouts[&Part::Block(0)].bytes(s.buf.bytes(), t0),
            gbi.bytes(t0)
        );
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        ring.give_back(s, Some(Box::new(Gate(gate.clone()))));
        // the one buffer is wanted for block 1: its fill must wait for the gate
        assert!(ring.prefetch(Part::Block(1), &[Part::Block(1)]));
        let opener = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                *gate.0.lock().unwrap() = true;
                gate.1.notify_all();
            })
        };
        let start = Instant::now();
        let s = ring.take(Part::Block(1)).unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "read before the fence"
        );
        opener.join().unwrap();
        let t1 = &gbi.group(Group::Layer(1))[0];
        assert_eq!(
            layouts[&Part::Block(1)].bytes(s.buf.bytes(), t1),
            gbi.bytes(t1)
        );
        // while handed out, the buffer cannot serve another layer
        let msg = ring.take(Part::Head).err().unwrap().to_string();
        assert!(msg.contains("handed out"), "{msg}");
        ring.give_back(s, None);
        // given back, it still holds block 1: asked again, no read
        let before = ring.bytes_read;
        let s = ring.take(Part::Block(1)).unwrap();
        assert_eq!(ring.bytes_read, before);
        ring.give_back(s, None);
    }

    #[test]
    fn a_file_modified_before_a_fill_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (gbi, reader, layouts) = setup(dir.path());
        let mut ring =
            StagingRing::new(gbi.clone(), reader, layouts, 2, &mut HeapBuf::alloc).unwrap();
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(gbi.path())
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let msg = ring.take(Part::Block(0)).err().unwrap().to_string();
        assert!(
            msg.contains(&gbi.path().display().to_string()) && msg.contains("modified"),
            "{msg}"
        );
        // the buffers came back from the failed fills: the next error is the file's
        // again, not a ring without buffers
        for p in [Part::Block(1), Part::Head] {
            let msg = ring.take(p).err().unwrap().to_string();
            assert!(msg.contains("modified"), "{msg}");
        }
        assert_eq!(ring.buffers(), 2);
    }
}
