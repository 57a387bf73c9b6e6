//! Golden vectors of the on-disk formats (docs/FORMAT.md): fixed bytes, committed here, for a
//! cache file (header and two sealed records), a segment (header, one sealed blob, sealed index),
//! a manifest, a replica's page map and page delta, a pending-run file and a chunk-map header. Each test decodes the committed bytes
//! to the expected value and encodes that value back to the same bytes. A change here is a format
//! change: it needs a new version (and a migration or a refusal of the old one).
//!
//! The vectors were produced by this code and cross-checked where a plain hash covers them (with
//! Python's `blake3` package): the trailing checksum of the pending file and of the chunk-map
//! header, the 8-byte header checksums of the page map and delta, and the delta's entry trailer.

use ferry_crypto::MasterKey;
use ferry_format::agent::{encode_pending, parse_pending, CvHeader, PendingDisk};
use ferry_format::cache::{
    decode_record, encode_record, CacheEntry, CacheFileHeader, Decoded, CACHE_HEADER_LEN,
};
use ferry_format::manifest::Manifest;
use ferry_format::segment::{verify, Codec, DiskCut, PointKind, PointTag, Record, SegmentBuilder};

fn key() -> MasterKey {
    MasterKey::from_bytes(&[7; 32], "golden.key")
}

fn tag() -> PointTag {
    PointTag {
        run: [0x11; 16],
        time_ns: 1_000_000_000,
        kind: PointKind::Crash,
        disks: vec![DiskCut {
            name: "sda".into(),
            size: 1 << 20,
            blake3: [0x22; 32],
        }],
    }
}

fn check(name: &str, got: &[u8], golden: &str) {
    if std::env::var_os("FERRY_PRINT_GOLDEN").is_some() {
        eprintln!("{name}: {}", hex::encode(got));
    }
    assert_eq!(hex::encode(got), golden, "{name}: the encoding changed");
}

#[test]
fn cache_file() {
    let k = key();
    let header = CacheFileHeader {
        key_id: k.id(),
        salt: [1; 16],
        first_seq: 5,
    };
    let entries = [
        CacheEntry::Zero {
            vm: "v".into(),
            disk: "sda".into(),
            offset: 65536,
            len: 65536,
        },
        CacheEntry::Tag {
            vm: "v".into(),
            tag: tag(),
        },
    ];
    let sealer = k.cache_sealer(&header.salt);
    let mut bytes = header.encode().to_vec();
    for (i, e) in entries.iter().enumerate() {
        encode_record(&sealer, 5 + i as u64, e, &mut bytes);
    }
    check("cache", &bytes, GOLDEN_CACHE);
    let golden = hex::decode(GOLDEN_CACHE).unwrap();
    assert_eq!(CacheFileHeader::decode(&golden, k.id()).unwrap(), header);
    let mut pos = CACHE_HEADER_LEN;
    for (i, e) in entries.iter().enumerate() {
        match decode_record(&sealer, &golden[pos..], pos as u64).unwrap() {
            Decoded::Record(seq, got, n) => {
                assert_eq!((seq, &got), (5 + i as u64, e));
                pos += n;
            }
            Decoded::Incomplete => panic!("record {i} incomplete"),
        }
    }
    assert_eq!(pos, golden.len());
}

#[test]
fn segment() {
    let k = key();
    let path = "journal/v/sda/0000000000000003.seg".to_string();
    let mut b = SegmentBuilder::new(&k, [2; 16], "v", "sda", 3, path.clone());
    b.push_record(Record::Begin {
        run: [0x11; 16],
        time_ns: 1,
        size: 1 << 20,
    });
    let blob = b.reserve_blob();
    let data = vec![0xab; 64];
    let sealed = b.sealer().seal(blob, data.clone());
    let loc = b.push_blob(blob, &sealed, Codec::Raw, data.len() as u32);
    b.push_record(Record::Write {
        offset: 0,
        len: 64,
        digest: k.digest(&data),
        loc,
    });
    b.push_record(Record::Zero {
        offset: 65536,
        len: 65536,
    });
    b.push_record(Record::Tag(tag()));
    let (bytes, records) = b.finish();
    check("segment", &bytes, GOLDEN_SEGMENT);
    let idx = verify(&k, &path, &hex::decode(GOLDEN_SEGMENT).unwrap()).unwrap();
    assert_eq!(
        (idx.vm.as_str(), idx.disk.as_str(), idx.seq),
        ("v", "sda", 3)
    );
    assert_eq!(idx.records, records);
}

#[test]
fn manifest() {
    use ferry_format::manifest::{DiskState, JournalPos, Point, PointDisk};
    let mut m = Manifest::new("web01", &key().id().to_string());
    m.disks.insert(
        "sda".into(),
        DiskState {
            size: 1 << 20,
            applied: JournalPos {
                segment: 3,
                record: 4,
            },
        },
    );
    m.points.push(Point {
        id: "0001-20261204T120000Z".into(),
        seq: 1,
        run: "11".repeat(16),
        time: "2026-12-04T12:00:00Z".into(),
        kind: "crash".into(),
        disks: vec![PointDisk {
            name: "sda".into(),
            size: 1 << 20,
            blake3: "22".repeat(32),
            snapshot: None,
        }],
    });
    m.next_seq = 2;
    check("manifest", &m.to_json(), &hex::encode(GOLDEN_MANIFEST));
    assert_eq!(Manifest::from_json(GOLDEN_MANIFEST.as_bytes()).unwrap(), m);
}

#[test]
fn pending_run() {
    let cvs = vec![PendingDisk {
        name: "sda".into(),
        base: [0x33; 16],
        cvs: vec![(2, [0x44; 32])],
    }];
    let bytes = encode_pending(&[0x11; 16], &cvs);
    check("pending", &bytes, GOLDEN_PENDING);
    assert_eq!(
        parse_pending(&hex::decode(GOLDEN_PENDING).unwrap()),
        Some(([0x11; 16], cvs))
    );
}

#[test]
fn chunk_map_header() {
    let h = CvHeader {
        size: 1 << 20,
        chunks: 16,
        base: [0x11; 16],
        store: "00112233445566778899aabbccddeeff".into(),
        vm: "web01".into(),
        disk_id: "serial:ABC".into(),
    };
    let bytes = h.encode();
    // Version 3: the non-zero head, zeros to byte 976, then the base run and the checksum (one
    // sector: what a commit rewrites).
    let head = &bytes[..24 + 2 + 32 + 2 + 5 + 2 + 10];
    check("cv header head", head, GOLDEN_CV_HEAD);
    assert!(bytes[head.len()..976].iter().all(|b| *b == 0));
    check("cv header base and checksum", &bytes[976..], GOLDEN_CV_TAIL);
    let mut golden = hex::decode(GOLDEN_CV_HEAD).unwrap();
    golden.resize(976, 0);
    golden.extend(hex::decode(GOLDEN_CV_TAIL).unwrap());
    assert_eq!(CvHeader::decode(&golden), Some(h.clone()));
    // A commit changes only the header's second sector.
    let mut h2 = h.clone();
    h2.base = [0x22; 16];
    let b2 = h2.encode();
    assert_eq!(bytes[..512], b2[..512]);
    // Version 2 (what the previous agent wrote, base in the first sector) is still read.
    let mut v2 = hex::decode(GOLDEN_CV2_HEAD).unwrap();
    v2.resize(992, 0);
    v2.extend(hex::decode(GOLDEN_CV2_SUM).unwrap());
    assert_eq!(CvHeader::decode(&v2), Some(h));
}

const GOLDEN_CACHE: &str = "46455252594341430100400000000000e6cc65698ee02fe501010101010101010101010101010101050000000000000000000000000000006809b0612f067e7c4643523103000000050000000000000028000000cfbf1cb0ee7670f045597803b225d8b888d807665c020f90f7f872882b4cee4e924a10e56fba7d1a00032bba464352310400000006000000000000005b0000002c3948edfdd8452e9ba80d81608465e57840c85374b33355aef1f08e4775047e84455504d8db46dcd21955b1d406fd31101d224241073ade84078e0ba59c803dd2b2c0905c322bb68297ae89dbaace6634338d31e6eca3a786d0bf9edcc708";
const GOLDEN_SEGMENT: &str = "46455252595345470100400000000000e6cc65698ee02fe502020202020202020202020202020202030000000000000090000000000000009dedc6b3f4c443d4a8aa899648eeaaea79933ce0387263540baf38811fa497bee3f4cfa8aac62dc8b1731fe3e5eade52a7874de55a8048741bdb95c42a7483c7cd30f83501f8dfe009c19c1e8b3e667ce25c93961ea5332ee7330e9bffe5d1cdb5417cb02ca965c29cc37bf46339b47bed62295e920dd2ae62e364c1fc226bc09270f9968be55d29b79fdf738cb94e227999b001ce89623094ffd47c5a103dfe21d358eb88d796a461ddcd8bbb6a6ea1a2cb1669e9b391f6be0d8c375ed123be3a6fa0570037921ac70164d7601880980f072e16704d35f53e2d498037a3a43b819b76e01e6894213041ce90e3d2b6098d7bf6f6df50eaf45815e30ca223a8db78bfc6a2617587e26199a7d421f059869412dca0b76dfce6c8110c47829cb07b84d573d151be5266cca54e29fba2912fc3a4b8a188c36836dcde2440bc48a6d44ac9996e0480e47b2e3f38701746b257c0435edb58f0bddfa94141a7df";
const GOLDEN_MANIFEST: &str = r#"{
  "format": "ferry-manifest",
  "version": 1,
  "vm": "web01",
  "key_id": "e6cc65698ee02fe5",
  "disks": {
    "sda": {
      "size": 1048576,
      "applied": {
        "segment": 3,
        "record": 4
      }
    }
  },
  "points": [
    {
      "id": "0001-20261204T120000Z",
      "seq": 1,
      "run": "11111111111111111111111111111111",
      "time": "2026-12-04T12:00:00Z",
      "kind": "crash",
      "disks": [
        {
          "name": "sda",
          "size": 1048576,
          "blake3": "2222222222222222222222222222222222222222222222222222222222222222"
        }
      ]
    }
  ],
  "next_seq": 2
}
"#;
const GOLDEN_PENDING: &str = "4645525259504e3211111111111111111111111111111111010000000300736461333333333333333333333333333333330100000000000000020000000000000044444444444444444444444444444444444444444444444444444444444444442714612c9439e6746eb2463cf974dfe5370d053dde1801d462e4392f789481e1";
const GOLDEN_CV_HEAD: &str = "46455252594356330000100000000000100000000000000020003030313132323333343435353636373738383939616162626363646465656666050077656230310a0073657269616c3a414243";
const GOLDEN_CV_TAIL: &str = "111111111111111111111111111111112e615d46236aac836e92534ca86ff66bb0133e285814091d476a255677e537e7";
const GOLDEN_CV2_HEAD: &str = "4645525259435632000010000000000010000000000000001111111111111111111111111111111120003030313132323333343435353636373738383939616162626363646465656666050077656230310a0073657269616c3a414243";
const GOLDEN_CV2_SUM: &str = "a9cb36e8515778f6a3f35dad9d7ab2651e1481686f66755e668c458ba28a14e1";

#[test]
fn page_map() {
    use ferry_format::delta::MapHeader;
    // `current.map`: a 64-byte header, then one 32-byte digest per page.
    let h = MapHeader {
        pages: 3,
        generation: 7,
    };
    let mut bytes = h.encode().to_vec();
    for d in [[0x55u8; 32], ferry_crypto::ZERO_DIGEST, [0x66; 32]] {
        bytes.extend_from_slice(&d);
    }
    check("page map", &bytes, GOLDEN_PAGE_MAP);
    let golden = hex::decode(GOLDEN_PAGE_MAP).unwrap();
    assert_eq!(MapHeader::decode(&golden).unwrap(), h);
    assert_eq!(&golden[64 + 64..96 + 64], &[0x66; 32]);
}

#[test]
fn page_delta() {
    use ferry_format::delta::{encode_entry, parse_delta, DeltaHeader};
    // `redo/N.delta`, `undo/N.delta`: a 32-byte header, sorted (page, digest) entries, blake3 of
    // the entries.
    let entries = [(1u64, [0x77u8; 32]), (9, ferry_crypto::ZERO_DIGEST)];
    let mut body = Vec::new();
    for (p, d) in &entries {
        body.extend_from_slice(&encode_entry(*p, d));
    }
    let mut bytes = DeltaHeader { count: 2 }.encode().to_vec();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(blake3::hash(&body).as_bytes());
    check("delta", &bytes, GOLDEN_DELTA);
    assert_eq!(
        parse_delta(&hex::decode(GOLDEN_DELTA).unwrap()).unwrap(),
        entries.to_vec()
    );
}

const GOLDEN_PAGE_MAP: &str = "46455252594d415001004000000000000300000000000000070000000000000000000000000000000000000000000000000000000000000033b56d4d50bb8f10555555555555555555555555555555555555555555555555555555555555555500000000000000000000000000000000000000000000000000000000000000006666666666666666666666666666666666666666666666666666666666666666";
const GOLDEN_DELTA: &str = "4645525259444c5401002000000000000200000000000000fdff5571af1eb62d0100000000000000777777777777777777777777777777777777777777777777777777777777777709000000000000000000000000000000000000000000000000000000000000000000000000000000684b719e5b4f387a4624a37a605bceccef9b4d285872fabb92ffe1f7fdaabbe5";
