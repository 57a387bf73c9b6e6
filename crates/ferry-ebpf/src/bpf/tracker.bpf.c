// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * Ferry's write tracker: an in-kernel dirty bitmap of 64 KiB chunks per tracked whole disk.
 *
 * on_bio_queue (tp_btf/block_bio_queue) fires once per bio at submission, after partition remap, so
 * bi_sector is relative to the whole disk. Bios whose op is a write-direction op (bi_opf & 0xff odd:
 * WRITE, DISCARD, SECURE_ERASE, WRITE_ZEROES, ...) on a tracked disk set the bits of every 64 KiB
 * chunk they touch in the disk's current epoch.
 *
 * The queue-time mark happens before the data reaches the disk: a drain between submission and
 * completion reports the chunk while it may still hold the old bytes. So the completion marks the
 * same chunks again, in the epoch current then, and a later drain reports them after the new bytes
 * are there:
 * - on_rq_complete (tp_btf/block_rq_complete) for request-based (blk-mq) disks: the request still
 *   carries its whole-disk position and the completed byte count. blk-mq clears the bios' trace flag,
 *   so block_bio_complete never fires for them.
 * - on_bio_complete (tp_btf/block_bio_complete) for bio-based disks (device mapper, md, zram, ...):
 *   a completed bio's iterator may have been advanced, so on_bio_queue remembers the range of each
 *   write bio of such a disk in `pending`, by bio address, until it completes.
 *
 * Epochs: each disk has two bitmaps; userspace flips `slots[slot].epoch` and then drains the other
 * one. A program counts itself in `active[slot * 2 + epoch]` (per CPU) while it marks; userspace waits
 * for the old epoch's count to reach zero before it reads. The count is taken before the epoch is
 * read a second time (Dekker): a program that read the old epoch but was not counted in time sees the
 * new epoch on its second read and marks both, so a mark is never left only in an epoch already read.
 *
 * Nothing here can drop an event silently: a write beyond the bitmap counts in `overflow`, a bio that
 * cannot be remembered for its completion counts in `untracked`, and the kernel counts skipped runs
 * in the programs' recursion_misses. Userspace turns any of them into "needs resync".
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define CHUNK_SHIFT 16 /* 64 KiB */
#define SECTOR_SHIFT 9
#define CHUNK_SECTORS_SHIFT (CHUNK_SHIFT - SECTOR_SHIFT)
/*
 * Two levels per bitmap, so a bio of any size costs a few loop iterations (the verifier walks every
 * iteration of a bounded loop, and a 4 GiB discard would be 1026 words): a bio's first and last
 * chunk words are set in the fine bitmap (a bit per 64 KiB chunk); the words in between, which would
 * be all ones, are recorded as bits of the coarse bitmap (a bit per fine word: 64 chunks, 4 MiB).
 * bi_size is 32 bits, so a bio spans at most 1026 fine words, at most 18 coarse words.
 */
#define MAX_COARSE_WORDS_PER_BIO 20
#define MAX_DISKS 64
/* Ops from REQ_OP_DRV_IN (34) on are driver-private pass-through commands: no block range. */
#define REQ_OP_DRV_IN 34
/* slot_ctl.flags */
#define SLOT_BIO_BASED 1

#define READ_ONCE_U32(x) (*(volatile __u32 *)&(x))
#define READ_ONCE_U64(x) (*(volatile __u64 *)&(x))

/* Per tracked disk; userspace writes all but the counters before it attaches the programs. */
struct slot_ctl {
	__u32 epoch; /* 0 or 1: the bitmap marks go to; flipped by userspace */
	__u32 flags; /* SLOT_BIO_BASED: completions come through block_bio_complete */
	__u64 base[2]; /* index in `words` of each epoch's fine bitmap */
	__u64 coarse[2]; /* index in `words` of each epoch's coarse bitmap */
	__u64 chunks; /* bitmap capacity in chunks (the disk size when tracking started) */
	__u64 overflow; /* write bios that reached past `chunks` (the disk grew) */
	__u64 untracked; /* write bios that could not be remembered in `pending` */
};

/* A write bio between submission and completion. */
struct pending_bio {
	__u32 slot;
	__u32 _pad;
	__u64 first; /* first and last chunk, inclusive, already clamped to the bitmap */
	__u64 last;
};

/* Whole-disk dev_t in the kernel's encoding (major << 20 | first_minor) -> slot; sized by userspace. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_DISKS);
	__type(key, __u32);
	__type(value, __u32);
} disks SEC(".maps");

/* One per tracked disk; sized by userspace before load. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct slot_ctl);
} slots SEC(".maps");

/* All bitmaps: per slot and epoch, fine then coarse words; sized by userspace before load. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} words SEC(".maps");

/* Programs marking into slot * 2 + epoch right now, per CPU; sized by userspace before load. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} active SEC(".maps");

/* Write bios of bio-based disks in flight, by bio address; sized by userspace before load. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct pending_bio);
} pending SEC(".maps");

static __always_inline void set_bits(__u64 word, __u64 mask)
{
	/* Userspace keeps every index below 2^32 (it refuses larger bitmaps). */
	__u32 key = (__u32)word;
	__u64 *p = bpf_map_lookup_elem(&words, &key);

	if (!p)
		return;
	/* Skip the locked op when the bits are set already: keeps a hot word's cache line shared. */
	if ((READ_ONCE_U64(*p) & mask) != mask)
		__sync_fetch_and_or(p, mask);
}

/*
 * Sets bits first..=last of the bitmap at word `base`. Callers keep the range within
 * MAX_COARSE_WORDS_PER_BIO words, the loop's bound; its first and last word are peeled off so the
 * loop body has no branch but the exit, which keeps the verifier's walk short.
 */
static __always_inline void set_range(__u64 base, __u64 first, __u64 last)
{
	__u64 w0 = first >> 6, w1 = last >> 6;
	__u64 head = ~0ULL << (first & 63);
	__u64 tail = ~0ULL >> (63 - (last & 63));

	if (w0 == w1) {
		set_bits(base + w0, head & tail);
		return;
	}
	set_bits(base + w0, head);
	for (__u32 i = 1; i < MAX_COARSE_WORDS_PER_BIO; i++) {
		if (w0 + i >= w1)
			break;
		set_bits(base + w0 + i, ~0ULL);
	}
	set_bits(base + w1, tail);
}

/*
 * Marks chunks first..=last (first <= last < chunks) in one epoch: `fine` and `coarse` are the
 * indexes of its two bitmaps. A global function, so the verifier checks it once, not per call site.
 */
__noinline int mark_range(__u64 fine, __u64 coarse, __u64 first, __u64 last)
{
	__u64 w0 = first >> 6, w1 = last >> 6;

	if (w0 > w1)
		return 0;
	set_range(fine, first, w0 == w1 ? last : first | 63);
	if (w1 == w0)
		return 0;
	set_bits(fine + w1, ~0ULL >> (63 - (last & 63)));
	if (w1 - w0 >= 2)
		set_range(coarse, w0 + 1, w1 - 1);
	return 0;
}

/* Marks chunks first..=last of `slot` in its current epoch (see the epoch note at the top). */
static __always_inline void record(__u32 slot, struct slot_ctl *ctl, __u64 first, __u64 last)
{
	__u32 e = READ_ONCE_U32(ctl->epoch) & 1;
	__u32 key = slot * 2 + e;
	__u64 *act = bpf_map_lookup_elem(&active, &key);
	__u64 prev;
	__u32 again;

	if (!act)
		return;
	/* A value-returning atomic is a full barrier on every JIT; keep the value so it stays one. */
	prev = __sync_fetch_and_add(act, 1);
	barrier_var(prev);
	again = READ_ONCE_U32(ctl->epoch) & 1;
	mark_range(ctl->base[e], ctl->coarse[e], first, last);
	if (again != e)
		mark_range(ctl->base[again], ctl->coarse[again], first, last);
	prev = __sync_fetch_and_sub(act, 1);
	barrier_var(prev);
}

static __always_inline bool is_write_op(__u32 opf)
{
	__u32 op = opf & 0xff;

	return (op & 1) && op < REQ_OP_DRV_IN;
}

/* The slot of a tracked whole disk, or NULL. */
static __always_inline struct slot_ctl *slot_of(struct gendisk *disk, __u32 *slot_out)
{
	__u32 dev, *slot;

	if (!disk)
		return NULL;
	dev = ((__u32)disk->major << 20) | (__u32)disk->first_minor;
	slot = bpf_map_lookup_elem(&disks, &dev);
	if (!slot)
		return NULL;
	*slot_out = *slot;
	return bpf_map_lookup_elem(&slots, slot);
}

/*
 * Fills p->first and p->last with the chunks of bytes [sector * 512, sector * 512 + bytes), clamped
 * to the bitmap (counting the overflow when `submitted`: once per bio). False when there is nothing
 * to mark.
 */
static __always_inline bool chunk_range(struct slot_ctl *ctl, __u64 sector, __u64 bytes,
					struct pending_bio *p, bool submitted)
{
	__u64 end;

	if (bytes == 0) /* an empty flush (REQ_OP_WRITE | REQ_PREFLUSH) writes nothing */
		return false;
	end = sector + (bytes >> SECTOR_SHIFT) + ((bytes & 511) ? 1 : 0); /* exclusive, in sectors */
	p->first = sector >> CHUNK_SECTORS_SHIFT;
	p->last = (end - 1) >> CHUNK_SECTORS_SHIFT;
	if (p->last >= ctl->chunks) {
		if (submitted)
			__sync_fetch_and_add(&ctl->overflow, 1);
		if (p->first >= ctl->chunks)
			return false;
		p->last = ctl->chunks - 1;
	}
	return true;
}

SEC("tp_btf/block_bio_queue")
int BPF_PROG(on_bio_queue, struct bio *bio)
{
	struct slot_ctl *ctl;
	struct pending_bio p = {};
	__u64 key;

	if (!is_write_op(bio->bi_opf)) /* reads, flushes without data, ...: not a change */
		return 0;
	/* bd_disk: the whole disk, also for a bio sent to a partition (bd_dev would be the partition) */
	ctl = slot_of(bio->bi_bdev->bd_disk, &p.slot);
	if (!ctl || !chunk_range(ctl, bio->bi_iter.bi_sector, bio->bi_iter.bi_size, &p, true))
		return 0;
	record(p.slot, ctl, p.first, p.last);

	if (!(ctl->flags & SLOT_BIO_BASED))
		return 0;
	key = (__u64)bio;
	if (bpf_map_update_elem(&pending, &key, &p, BPF_ANY))
		__sync_fetch_and_add(&ctl->untracked, 1);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(on_rq_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	struct request___old *old = (void *)rq;
	struct gendisk *disk;
	struct slot_ctl *ctl;
	struct pending_bio p = {};

	if (!is_write_op(rq->cmd_flags))
		return 0;
	if (bpf_core_field_exists(old->rq_disk)) /* before 6.0 */
		disk = BPF_CORE_READ(old, rq_disk);
	else
		disk = rq->q->disk;
	ctl = slot_of(disk, &p.slot);
	/* __sector is the position of the part completing now (it advances on partial completions). */
	if (!ctl || !chunk_range(ctl, rq->__sector, nr_bytes, &p, false))
		return 0;
	record(p.slot, ctl, p.first, p.last);
	return 0;
}

SEC("tp_btf/block_bio_complete")
int BPF_PROG(on_bio_complete, struct request_queue *q, struct bio *bio)
{
	__u64 key = (__u64)bio;
	struct pending_bio *found, p;
	struct slot_ctl *ctl;

	found = bpf_map_lookup_elem(&pending, &key);
	if (!found)
		return 0;
	p = *found;
	bpf_map_delete_elem(&pending, &key);
	ctl = bpf_map_lookup_elem(&slots, &p.slot);
	if (!ctl || p.first > p.last || p.last >= ctl->chunks)
		return 0;
	record(p.slot, ctl, p.first, p.last);
	return 0;
}
