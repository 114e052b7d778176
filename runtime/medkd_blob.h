/* medkd_blob: validate a medkd "MKDB" firmware container (portable C99, no deps).
 *
 * The container is produced by medkd.export.firmware.write_firmware_blob (Python).
 * Layout, format version 2, all integers little-endian, 48-byte header:
 *
 *   offset size type     field
 *   0      4    char[4]  magic "MKDB"
 *   4      2    u16      format version (= 2)
 *   6      2    u16      kind: 1 = onnx, 2 = tensorrt-engine
 *   8      4    u32      header size (= 48; the payload starts here)
 *   12     4    u32      flags (none defined: must be 0)
 *   16     8    u64      payload size (unpadded, > 0)
 *   24     4    u32      CRC-32 (IEEE, zlib-compatible) of the payload
 *   28     16   u8[16]   first 16 bytes of the payload's SHA-256
 *   44     4    u32      CRC-32 of header bytes 0..43
 *   48     n    u8[n]    payload, then 0..15 zero bytes so the container size is a
 *                        multiple of 16; nothing may follow
 *
 * medkd_blob_open checks, in this order (the Python reader makes the same checks in
 * the same order): size >= 48, magic, version, header CRC, header size, flags, kind,
 * payload size (non-zero, inside the buffer), exact container size and zero padding,
 * payload CRC-32, payload SHA-256 prefix. Magic and version come before the header
 * CRC because they say which layout the rest of the header has.
 *
 * The header is parsed byte by byte, so `data` needs no particular alignment; if
 * `data` is 16-byte aligned (both generated forms, .S and .c, are) so is `payload`.
 */
#ifndef MEDKD_BLOB_H
#define MEDKD_BLOB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MEDKD_BLOB_MAGIC "MKDB"
#define MEDKD_BLOB_FORMAT_VERSION 2u
#define MEDKD_BLOB_HEADER_SIZE 48u
#define MEDKD_BLOB_SHA256_PREFIX_SIZE 16u

#define MEDKD_BLOB_KIND_ONNX 1u
#define MEDKD_BLOB_KIND_TENSORRT_ENGINE 2u

#define MEDKD_BLOB_OK 0
#define MEDKD_BLOB_EARG (-1)       /* NULL data or out */
#define MEDKD_BLOB_ETRUNC (-2)     /* buffer smaller than the header */
#define MEDKD_BLOB_EMAGIC (-3)     /* not an MKDB container */
#define MEDKD_BLOB_EVERSION (-4)   /* format version this reader does not know */
#define MEDKD_BLOB_EHEADER (-5)    /* header size is not 48 */
#define MEDKD_BLOB_ESIZE (-6)      /* payload empty or extends past the buffer */
#define MEDKD_BLOB_EKIND (-7)      /* unknown payload kind */
#define MEDKD_BLOB_ECRC (-8)       /* payload CRC-32 mismatch */
#define MEDKD_BLOB_EHCRC (-9)      /* header CRC-32 mismatch */
#define MEDKD_BLOB_EFLAGS (-10)    /* unknown flag bits set */
#define MEDKD_BLOB_ETRAIL (-11)    /* bytes after the payload other than the zero padding */
#define MEDKD_BLOB_ESHA256 (-12)   /* payload SHA-256 prefix mismatch */

typedef struct medkd_blob {
    unsigned int kind;             /* MEDKD_BLOB_KIND_* */
    unsigned int version;          /* format version */
    const unsigned char *payload;  /* points into the caller's buffer */
    size_t payload_size;
    uint32_t crc32;                /* verified payload CRC-32 */
    unsigned char sha256_prefix[MEDKD_BLOB_SHA256_PREFIX_SIZE]; /* verified */
} medkd_blob;

/* Validate the container in data[0..size) and describe its payload in *out.
 * Returns MEDKD_BLOB_OK (0) or a negative MEDKD_BLOB_E* code; *out is only written on
 * success. No allocation, no copies: out->payload aliases `data`. Reads nothing
 * outside data[0..size). */
int medkd_blob_open(const unsigned char *data, size_t size, medkd_blob *out);

/* Human-readable message for a medkd_blob_open() return code (never NULL). */
const char *medkd_blob_strerror(int code);

/* "onnx", "tensorrt-engine" or "unknown". */
const char *medkd_blob_kind_name(unsigned int kind);

/* zlib-compatible CRC-32: pass 0 to start, the previous result to continue. */
uint32_t medkd_blob_crc32(uint32_t crc, const unsigned char *data, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* MEDKD_BLOB_H */
