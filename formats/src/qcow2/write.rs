//! Guest writes into a qcow2 image, and header changes.
//!
//! A write runs in three steps: under the metadata lock, each touched cluster is classified
//! and fresh clusters are reserved; without the lock, the data is written (completing partial
//! allocation units from what they read before); under the lock again, the new L2 entries are
//! staged in memory. Staged entries reach the disk only through `commit`.

use super::alloc::Writing;
use super::cache::Meta;
use super::header::{self, Header};
use super::table::{Kind, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS};
use super::Qcow2;
use crate::io::{sync, write_all};
use crate::util::{align_down, align_up, place_outside};
use crate::{Error, ReadBelow, Result};

/// What a write does to one guest cluster.
struct ClusterPlan {
    /// Guest offset of the cluster.
    cluster: u64,
    /// Touched byte range inside the cluster.
    lo: u64,
    hi: u64,
    /// Host cluster that receives the data.
    host: u64,
    /// The cluster's entry and bitmap before the write.
    entry: u64,
    bitmap: u64,
    /// The host cluster is newly reserved (else written in place).
    fresh: bool,
    /// Every allocated unit of the old cluster must be carried into the fresh one (the old
    /// cluster is shared with a snapshot, or compressed).
    copy_all: bool,
    /// The entry and bitmap to stage, if they change.
    new_entry: Option<(u64, u64)>,
    /// Old host bytes to release after the commit.
    free: Option<(u64, u64)>,
}

/// A data write: bytes from the caller's buffer, or a buffer built to complete units.
enum Source {
    Data(usize, usize),
    Owned(Vec<u8>),
}

impl Qcow2 {
    /// A guest write; with `only_unallocated`, a copy-on-read fill
    /// ([`crate::Image::fill_unallocated`]): the allocation is then read under the held
    /// clusters, so a client write that allocated a unit first is never overwritten. Returns
    /// the bytes written.
    pub(super) fn write_impl(
        &self,
        offset: u64,
        data: &[u8],
        below: &dyn ReadBelow,
        only_unallocated: bool,
    ) -> Result<u64> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "write of {} bytes at {offset} is past the end of the image",
                    data.len()
                ))
            })?;
        if data.is_empty() {
            return Ok(0);
        }
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let cs = self.geo.cluster_size();
        let _held = self.clusters.hold(offset / cs, end.div_ceil(cs));
        if only_unallocated {
            return crate::fill_runs(self, offset, data, |start, part| {
                self.write_held(start, start + part.len() as u64, part, below)
            });
        }
        self.write_held(offset, end, data, below)?;
        Ok(data.len() as u64)
    }

    /// A write of `data` to `[offset, end)` whose clusters the caller holds.
    fn write_held(&self, offset: u64, end: u64, data: &[u8], below: &dyn ReadBelow) -> Result<()> {
        let plans = {
            let mut m = self.meta();
            let mut w = self.prepare_write(&mut m)?;
            self.plan(&mut w, offset, end)?
        };
        let mut writes: Vec<(u64, Source)> = Vec::with_capacity(plans.len());
        for p in &plans {
            for (host, src) in self.build(p, offset, data, below)? {
                // Coalesce writes straight from the caller's buffer that continue each other.
                if let (Some((h, Source::Data(a, b))), Source::Data(c, d)) =
                    (writes.last_mut(), &src)
                {
                    if *h + (*b - *a) as u64 == host && *b == *c {
                        *b = *d;
                        continue;
                    }
                }
                writes.push((host, src));
            }
        }
        for (host, src) in &writes {
            let buf = match src {
                Source::Data(a, b) => &data[*a..*b],
                Source::Owned(v) => v.as_slice(),
            };
            write_all(&*self.storage, buf, *host, "guest data")?;
        }
        let mut m = self.meta();
        let mut w = self.prepare_write(&mut m)?;
        self.stage(&mut w, &plans)
    }

    /// Compresses one cluster's data (the image's last cluster may be short: it is padded
    /// with zeros); `None` when it does not shrink.
    pub(super) fn compress_cluster_impl(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let cs = self.geo.cluster_size() as usize;
        if data.len() > cs {
            return Ok(None);
        }
        if data.len() < cs {
            let mut padded = data.to_vec();
            padded.resize(cs, 0);
            return super::compress::compress(self.compression(), &padded);
        }
        super::compress::compress(self.compression(), data)
    }

    /// Writes compressed data (from [`Self::compress_cluster_impl`]) as the cluster at
    /// `offset`, which the image must not hold: compressed clusters are only ever written into
    /// unallocated ones, as qemu does. Returns false when it wrote nothing.
    pub(super) fn write_compressed_impl(&self, offset: u64, bytes: &[u8]) -> Result<bool> {
        let cs = self.geo.cluster_size();
        if offset % cs != 0 || offset >= self.size() || bytes.len() as u64 >= cs {
            return Ok(false);
        }
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let _held = self.clusters.hold(offset / cs, offset / cs + 1);
        let host = {
            let mut m = self.meta();
            let mut w = self.prepare_write(&mut m)?;
            let (entry, _) = self.entry_at(&mut w, offset)?;
            if entry & OFFSET_MASK != 0 || entry & OFLAG_COMPRESSED != 0 {
                return Ok(false);
            }
            w.alloc().alloc_bytes(bytes.len() as u64)
        };
        write_all(&*self.storage, bytes, host, "a compressed cluster")?;
        let mut m = self.meta();
        let mut w = self.prepare_write(&mut m)?;
        self.set_entry(
            &mut w,
            offset,
            self.geo.compressed_entry(host, bytes.len() as u64),
            0,
        )?;
        Ok(true)
    }

    /// Sets aside, in call order, the L2 tables and fresh host clusters a write of
    /// `[offset, offset + len)` will take (see [`crate::Image::reserve`]): tables first, then
    /// data, as a write allocates them in qemu.
    pub(super) fn reserve_impl(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(());
        }
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let geo = self.geo;
        let cs = geo.cluster_size();
        // A write in flight holds its clusters from planning to staging: waiting for it means
        // never setting aside a cluster that write is about to point at.
        let _held = self.clusters.hold(offset / cs, end.div_ceil(cs));
        let mut m = self.meta();
        let mut w = self.prepare_write(&mut m)?;
        let mut cluster = align_down(offset, cs);
        while cluster < end {
            let (entry, _) = self.entry_at(&mut w, cluster)?;
            if needs_fresh(geo, entry) {
                let l1i = (cluster >> (geo.cluster_bits + geo.l2_bits())) as usize;
                self.writable_l2(&mut w, &geo, l1i)?;
                w.alloc().set_aside(cluster);
            }
            cluster += cs;
        }
        Ok(())
    }

    /// Classifies the clusters of `[offset, end)` and reserves fresh ones.
    fn plan(&self, m: &mut Writing, offset: u64, end: u64) -> Result<Vec<ClusterPlan>> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut plans = Vec::new();
        let mut cluster = align_down(offset, cs);
        while cluster < end {
            let lo = offset.max(cluster) - cluster;
            let hi = end.min(cluster + cs) - cluster;
            let (entry, bitmap) = self.entry_at(m, cluster)?;
            let host_old = entry & OFFSET_MASK;
            let compressed = entry & OFLAG_COMPRESSED != 0;
            let ours = entry & OFLAG_COPIED != 0 && !compressed && host_old != 0;
            let mut p = ClusterPlan {
                cluster,
                lo,
                hi,
                host: host_old,
                entry,
                bitmap,
                fresh: false,
                copy_all: false,
                new_entry: None,
                free: None,
            };
            if ours {
                // Writing in place: the cluster must be data, not metadata a damaged L2 entry
                // points at.
                if let Some(mm) = &m.metadata {
                    mm.check_data(host_old, cs)?;
                }
            }
            if !geo.extended_l2 {
                if needs_fresh(geo, entry) {
                    p.fresh = true;
                    p.new_entry = Some((0, 0)); // filled in below
                    p.free = match geo.kind(entry, 0, 0)? {
                        Kind::Compressed { host, len } => Some((host, len)),
                        Kind::Normal(h) | Kind::ZeroAlloc(h) => Some((h, cs)),
                        _ => None,
                    };
                }
            } else {
                let unit = geo.subcluster_size();
                let touched = unit_mask(lo / unit, (hi - 1) / unit);
                let new_bitmap = if compressed {
                    u64::from(u32::MAX)
                } else {
                    (bitmap | touched) & !(touched << SUBCLUSTERS)
                };
                if needs_fresh(geo, entry) {
                    p.fresh = true;
                    p.copy_all = compressed || host_old != 0;
                    p.free = if compressed {
                        let (h, l) = geo.compressed(entry);
                        Some((h, l))
                    } else if host_old != 0 {
                        Some((host_old, cs))
                    } else {
                        None
                    };
                }
                if p.fresh || new_bitmap != bitmap {
                    p.new_entry = Some((0, new_bitmap));
                }
            }
            if p.fresh {
                p.host = m.alloc().take(cluster);
            }
            if let Some((e, _)) = p.new_entry.as_mut() {
                *e = p.host | OFLAG_COPIED;
            }
            plans.push(p);
            cluster += cs;
        }
        Ok(plans)
    }

    /// The (staged or stored) entry and bitmap of the guest cluster at `cluster`.
    pub(super) fn entry_at(&self, m: &mut Meta, cluster: u64) -> Result<(u64, u64)> {
        let geo = self.geo;
        let l1i = (cluster >> (geo.cluster_bits + geo.l2_bits())) as usize;
        let l2 = m.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK;
        if l2 == 0 {
            return Ok((0, 0));
        }
        let idx = ((cluster / geo.cluster_size()) & (geo.l2_entries() - 1)) as usize;
        Ok(m.l2_table(&*self.storage, &geo, l2)?.entry(idx))
    }

    /// The data writes for one cluster plan.
    fn build(
        &self,
        p: &ClusterPlan,
        offset: u64,
        data: &[u8],
        below: &dyn ReadBelow,
    ) -> Result<Vec<(u64, Source)>> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let unit = geo.subcluster_size();
        let data_at = |x: u64| (p.cluster + x - offset) as usize;
        // Span of units written: all of them when the old cluster is carried over.
        let (span_lo, span_hi) = if p.copy_all {
            (0, cs)
        } else {
            (align_down(p.lo, unit), align_up(p.hi, unit))
        };
        // A cluster of our own (standard L2) holds its content already: write just the bytes.
        let in_place = !p.fresh && !geo.extended_l2;
        if in_place || (span_lo == p.lo && span_hi == p.hi) {
            return Ok(vec![(
                p.host + p.lo,
                Source::Data(data_at(p.lo), data_at(p.hi)),
            )]);
        }
        let mut buf = vec![0u8; (span_hi - span_lo) as usize];
        let mut decompressed: Option<Vec<u8>> = None;
        let mut u = span_lo;
        while u < span_hi {
            let ue = u + unit;
            let covered = p.lo <= u && ue <= p.hi;
            let touched = p.lo < ue && u < p.hi;
            let sub = if geo.extended_l2 {
                (u / unit) as u32
            } else {
                0
            };
            let kind = geo.kind(p.entry, p.bitmap, sub)?;
            if !covered && (touched || matches!(kind, Kind::Normal(_) | Kind::Compressed { .. })) {
                let out = &mut buf[(u - span_lo) as usize..(ue - span_lo) as usize];
                match kind {
                    Kind::Unallocated => below.read_below(p.cluster + u, out)?,
                    Kind::Zero | Kind::ZeroAlloc(_) => out.fill(0),
                    Kind::Normal(h) => {
                        // `h` already points at the unit inside the old cluster (extended L2)
                        // or at the cluster itself.
                        let at = if geo.extended_l2 { h } else { h + u };
                        crate::Image::read_host(self, at, out)?
                    }
                    Kind::Compressed { host, len } => {
                        if decompressed.is_none() {
                            let mut c = vec![0u8; cs as usize];
                            crate::Image::read_compressed(self, host, len, &mut c)?;
                            decompressed = Some(c);
                        }
                        let c = decompressed.as_ref().expect("set above");
                        out.copy_from_slice(&c[u as usize..ue as usize]);
                    }
                }
            }
            u = ue;
        }
        let (a, b) = (p.lo - span_lo, p.hi - span_lo);
        buf[a as usize..b as usize].copy_from_slice(&data[data_at(p.lo)..data_at(p.hi)]);
        Ok(vec![(p.host + span_lo, Source::Owned(buf))])
    }

    /// Stages the entries of written clusters.
    fn stage(&self, m: &mut Writing, plans: &[ClusterPlan]) -> Result<()> {
        for p in plans {
            let Some((entry, bitmap)) = p.new_entry else {
                m.alloc().data_written = true;
                continue;
            };
            self.set_entry(m, p.cluster, entry, bitmap)?;
            if let Some((h, l)) = p.free {
                m.alloc().free_range(h, l);
            }
        }
        Ok(())
    }

    pub(super) fn set_entry(
        &self,
        m: &mut Writing,
        cluster: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        let geo = self.geo;
        let l1i = (cluster >> (geo.cluster_bits + geo.l2_bits())) as usize;
        let idx = ((cluster / geo.cluster_size()) & (geo.l2_entries() - 1)) as usize;
        let l2 = self.writable_l2(m, &geo, l1i)?;
        m.l2.get_mut(&l2)
            .expect("writable_l2 caches it")
            .set_entry(idx, entry, bitmap);
        Ok(())
    }

    pub(super) fn write_zeroes_impl(
        &self,
        offset: u64,
        len: u64,
        below: &dyn ReadBelow,
    ) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "zero write of {len} bytes at {offset} is past the end of the image"
                ))
            })?;
        let version = self.meta().header.version;
        let unit = self.geo.subcluster_size();
        // Whole units get a zero marker (v3); partial units, and everything on v2, which has
        // no zero clusters, get written zeros.
        let (mid_lo, mid_hi) = if version >= 3 {
            (align_up(offset, unit), align_down(end, unit))
        } else {
            (end, end)
        };
        if mid_lo < mid_hi {
            let mut partial = vec![(offset, mid_lo), (mid_hi, end)];
            {
                let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
                let cs = self.geo.cluster_size();
                let _held = self.clusters.hold(mid_lo / cs, mid_hi.div_ceil(cs));
                let mut m = self.meta();
                let mut w = self.prepare_write(&mut m)?;
                partial.extend(self.zero_units(&mut w, mid_lo, mid_hi)?);
            }
            return self.write_zero_data(&partial, len, below);
        }
        self.write_zero_data(&[(offset, end)], len, below)
    }

    /// Writes zero bytes over the given ranges (those a zero marker cannot express).
    fn write_zero_data(
        &self,
        ranges: &[(u64, u64)],
        len: u64,
        below: &dyn ReadBelow,
    ) -> Result<()> {
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        for &(a, b) in ranges {
            let mut pos = a;
            while pos < b {
                let n = (b - pos).min(zeros.len() as u64);
                self.write_impl(pos, &zeros[..n as usize], below, false)?;
                pos += n;
            }
        }
        Ok(())
    }

    /// Marks whole allocation units of `[lo, hi)` as zero (v3). Returns the ranges a marker
    /// cannot express (part of a compressed cluster): those need written zeros.
    fn zero_units(&self, m: &mut Writing, lo: u64, hi: u64) -> Result<Vec<(u64, u64)>> {
        let mut rest = Vec::new();
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut cluster = align_down(lo, cs);
        while cluster < hi {
            let a = lo.max(cluster) - cluster;
            let b = hi.min(cluster + cs) - cluster;
            let (entry, bitmap) = self.entry_at(m, cluster)?;
            let host = entry & OFFSET_MASK;
            let compressed = entry & OFLAG_COMPRESSED != 0;
            let (new, free) = if !geo.extended_l2 {
                let free = match geo.kind(entry, 0, 0)? {
                    Kind::Compressed { host, len } => Some((host, len)),
                    Kind::Normal(h) | Kind::ZeroAlloc(h) => Some((h, cs)),
                    _ => None,
                };
                ((OFLAG_ZERO, 0), free)
            } else if a == 0 && b == cs {
                // The whole cluster reads zero: drop any host cluster.
                let free = if compressed {
                    Some(geo.compressed(entry))
                } else {
                    (host != 0).then_some((host, cs))
                };
                ((0, u64::from(u32::MAX) << SUBCLUSTERS), free)
            } else if compressed {
                // Subclusters of a compressed cluster cannot be marked: the cluster is
                // rewritten plainly with these parts zeroed.
                rest.push((cluster + a, cluster + b));
                cluster += cs;
                continue;
            } else {
                let unit = geo.subcluster_size();
                let mask = unit_mask(a / unit, (b - 1) / unit);
                ((entry, (bitmap & !mask) | mask << SUBCLUSTERS), None)
            };
            if new != (entry, bitmap) {
                self.set_entry(m, cluster, new.0, new.1)?;
            }
            if let Some((h, l)) = free {
                m.alloc().free_range(h, l);
            }
            cluster += cs;
        }
        Ok(rest)
    }

    pub(super) fn set_backing_impl(&self, backing: Option<&crate::BackingRef>) -> Result<()> {
        let mut h = self.header_for_change()?;
        match backing {
            Some(b) => {
                if b.name.len() > header::MAX_BACKING_NAME {
                    return Err(Error::invalid(format!(
                        "backing file name is {} bytes; qcow2 allows 1023",
                        b.name.len()
                    )));
                }
                h.backing_name = Some(b.name.clone());
                let fmt = b.format.as_ref().map(|f| f.as_bytes().to_vec());
                h.set_extension(header::EXT_BACKING_FORMAT, fmt);
            }
            None => {
                h.backing_name = None;
                h.set_extension(header::EXT_BACKING_FORMAT, None);
            }
        }
        self.rewrite_header(h)
    }

    pub(super) fn set_cowimg_flags_impl(&self, on: bool) -> Result<()> {
        let mut h = self.header_for_change()?;
        let mut flags = h.cowimg_flags();
        if on {
            flags |= header::COWIMG_FLAG_COPY_ON_READ;
        } else {
            flags &= !header::COWIMG_FLAG_COPY_ON_READ;
        }
        let data = (flags != 0).then(|| {
            let mut d = vec![0u8; 8];
            d[..4].copy_from_slice(&flags.to_be_bytes());
            d
        });
        h.set_extension(header::EXT_COWIMG, data);
        self.rewrite_header(h)
    }

    /// Sets or clears the lazy refcounts bit, refused on v2 in qemu's words. The image is
    /// never left dirty by cowimg (a dirty one is repaired before the change), so clearing
    /// the bit needs no refcount flush.
    pub(super) fn set_lazy_refcounts_impl(&self, on: bool) -> Result<()> {
        let mut h = self.header_for_change()?;
        if h.version < 3 && on {
            return Err(Error::Refused(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
            ));
        }
        if h.version < 3 {
            return Ok(());
        }
        if on {
            h.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
        } else {
            h.compatible_features &= !header::COMPAT_LAZY_REFCOUNTS;
        }
        self.rewrite_header(h)
    }

    /// Moves the snapshot table to new clusters holding `table` (the same entries,
    /// re-encoded), for `check -r all`, which holds the image exclusively and has just
    /// repaired the refcounts (`m` reloaded from disk). As in every commit, the new table and
    /// its refcounts are synced before the header points at it, and the old table (`old_len`
    /// bytes) is freed last: a crash leaks clusters at worst.
    ///
    /// The checks of a first write are skipped on purpose: the repair is what clears the
    /// dirty and corrupt bits, and a snapshot table that overlaps other metadata is exactly
    /// what moving it to clusters past the end of the file cures.
    pub(super) fn replace_snapshot_table_locked(
        &self,
        m: &mut Meta,
        table: &[u8],
        old_len: u64,
    ) -> Result<()> {
        let s = &*self.storage;
        let mut m = super::alloc::unchecked(m, s)?;
        let cs = self.geo.cluster_size();
        let clusters = (table.len() as u64).div_ceil(cs).max(1);
        let alloc = m.alloc();
        let host = alloc.reserve(clusters);
        let mut buf = table.to_vec();
        buf.resize((clusters * cs) as usize, 0);
        write_all(s, &buf, host, "the snapshot table")?;
        self.commit_locked(&mut m)?;

        let old = m.header.snapshots_offset;
        m.header.snapshots_offset = host;
        write_all(s, &m.header.encode_fixed(), 0, "the header")?;
        sync(s)?;

        if old_len > 0 {
            let alloc = m.alloc();
            alloc.free_range(old, old_len);
            self.commit_locked(&mut m)?;
        }
        Ok(())
    }

    /// The header to change, after checking that the image may be changed now.
    pub(super) fn header_for_change(&self) -> Result<Header> {
        let mut m = self.meta();
        self.prepare_write(&mut m)?;
        if m.has_staged() {
            return Err(Error::Refused(
                "internal: header change with uncommitted writes".into(),
            ));
        }
        Ok(m.header.clone())
    }

    /// Writes a changed header crash-safely.
    ///
    /// The switch is one write of sector 0, which holds the fixed fields and the whole
    /// extension chain; the backing name is first written, and synced, at a place in cluster 0
    /// that the current header does not reference. At every instant the image has either the
    /// old header or the new one. qemu rewrites all of cluster 0 in one unsynced write instead.
    /// The feature name table (names for error messages only) is kept when it still fits in
    /// sector 0; qemu writes it back on its next header update.
    pub(super) fn rewrite_header(&self, mut new: Header) -> Result<()> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        let s = &*self.storage;
        let cs = self.geo.cluster_size();
        let hl = u64::from(new.header_length);
        let name = new.backing_name.clone().unwrap_or_default().into_bytes();
        let full = new.encode_extensions(true);
        let ext = if hl + full.len() as u64 <= 512 {
            full
        } else {
            new.encode_extensions(false)
        };
        let chain_end = hl + ext.len() as u64;

        let mut sector = new.clone();
        let fits_sector = chain_end <= 512.min(cs);
        let name_pos = if name.is_empty() {
            Some(0)
        } else if cs == 512 {
            (chain_end + name.len() as u64 <= 512).then_some(chain_end)
        } else if fits_sector {
            let live: Vec<(u64, u64)> = m
                .header
                .live_ranges()
                .into_iter()
                .filter(|&(_, e)| e > 512)
                .map(|(a, e)| (a.max(512), e))
                .collect();
            place_outside(name.len() as u64, 512, cs, &live)
        } else {
            None
        };
        match name_pos {
            Some(pos) if fits_sector => {
                sector.backing_file_offset = if name.is_empty() { 0 } else { pos };
                sector.backing_file_size = name.len() as u32;
                let mut buf = sector.encode_fixed();
                buf.extend_from_slice(&ext);
                if cs == 512 && !name.is_empty() {
                    buf.extend_from_slice(&name);
                } else if !name.is_empty() {
                    write_all(s, &name, pos, "the backing file name")?;
                    sync(s)?;
                }
                buf.resize(512.min(cs) as usize, 0);
                write_all(s, &buf, 0, "the header")?;
            }
            _ => {
                // The essential header does not fit in one sector (many or large extensions):
                // fall back to qemu's single write of the whole header area.
                let full = new.encode_extensions(true);
                let ext = if hl + (full.len() + name.len()) as u64 <= cs {
                    full
                } else {
                    new.encode_extensions(false)
                };
                let name_at = hl + ext.len() as u64;
                if name_at + name.len() as u64 > cs {
                    return Err(Error::Refused("No space left in the file header".into()));
                }
                sector.backing_file_offset = if name.is_empty() { 0 } else { name_at };
                sector.backing_file_size = name.len() as u32;
                let mut buf = sector.encode_fixed();
                buf.extend_from_slice(&ext);
                buf.extend_from_slice(&name);
                write_all(s, &buf, 0, "the header")?;
            }
        }
        sync(s)?;
        new.backing_file_offset = sector.backing_file_offset;
        new.backing_file_size = sector.backing_file_size;
        new.extensions_end = chain_end;
        m.header = new;
        Ok(())
    }
}

/// Whether a write into the guest cluster with L2 entry `entry` needs a fresh host cluster:
/// unless the cluster is plain data of this image's own (COPIED), and, with standard L2, not
/// a preallocated zero cluster (extended L2 keeps zeros in the bitmap).
fn needs_fresh(geo: super::table::Geometry, entry: u64) -> bool {
    let ours =
        entry & OFLAG_COPIED != 0 && entry & OFLAG_COMPRESSED == 0 && entry & OFFSET_MASK != 0;
    !ours || (!geo.extended_l2 && entry & OFLAG_ZERO != 0)
}

/// Bits `first..=last` set.
fn unit_mask(first: u64, last: u64) -> u64 {
    let n = last - first + 1;
    (if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }) << first
}
