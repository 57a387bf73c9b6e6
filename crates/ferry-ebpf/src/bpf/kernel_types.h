/* SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause */
/*
 * The few kernel types tracker.bpf.c reads, written by hand instead of a generated vmlinux.h.
 *
 * Every struct carries preserve_access_index, so clang emits CO-RE relocations and libbpf resolves
 * each field against the running kernel's BTF (/sys/kernel/btf/vmlinux) at load time: the layouts
 * below only name the fields we use; their order and the missing fields do not matter. This keeps
 * the build independent of the build machine's kernel (no bpftool, no /sys/kernel/btf needed to
 * compile), which is what a fresh CI machine or a container build has.
 *
 * Field availability: bio->bi_bdev exists since 5.12 (before it was bi_disk + bi_partno), the
 * one-argument block_bio_queue tracepoint since 5.11; the tracker requires >= 5.12.
 */
#ifndef FERRY_KERNEL_TYPES_H
#define FERRY_KERNEL_TYPES_H

typedef signed char __s8;
typedef unsigned char __u8;
typedef short __s16;
typedef unsigned short __u16;
typedef int __s32;
typedef unsigned int __u32;
typedef long long __s64;
typedef unsigned long long __u64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u64 __be64;
typedef __u32 __wsum;

typedef _Bool bool;
#define true 1
#define false 0

typedef __u8 u8;
typedef __u32 u32;
typedef __u64 u64;

/* UAPI constants (stable ABI) used by the map definitions. */
enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
};

enum {
	BPF_F_NO_PREALLOC = (1U << 0),
	BPF_F_MMAPABLE = (1U << 10),
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct gendisk {
	int major;
	int first_minor;
};

struct block_device {
	struct gendisk *bd_disk;
};

struct bvec_iter {
	__u64 bi_sector; /* sector_t: 512-byte units, already remapped to the whole disk */
	unsigned int bi_size; /* bytes */
};

struct bio {
	struct block_device *bi_bdev;
	unsigned int bi_opf; /* blk_opf_t: op in the low 8 bits, flags above */
	struct bvec_iter bi_iter;
};

struct request_queue {
	struct gendisk *disk; /* since 5.15 */
};

struct request {
	struct request_queue *q;
	unsigned int cmd_flags; /* blk_opf_t: op in the low 8 bits */
	__u64 __sector; /* sector_t, whole disk */
};

/* Before 6.0 a request named its disk directly; checked with bpf_core_field_exists. */
struct request___old {
	struct gendisk *rq_disk;
};

#pragma clang attribute pop

#endif /* FERRY_KERNEL_TYPES_H */
