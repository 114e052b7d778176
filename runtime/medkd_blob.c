/* medkd_blob: MKDB container validation. See medkd_blob.h for the layout. */
#include "medkd_blob.h"
#include "medkd_sha256.h"

#include <string.h>

#define HEADER_CRC_OFFSET 44u /* the header CRC covers bytes [0, 44) */

static uint32_t rd_u16(const unsigned char *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }

static uint32_t rd_u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t rd_u64(const unsigned char *p) { return (uint64_t)rd_u32(p) | ((uint64_t)rd_u32(p + 4) << 32); }

/* Reflected CRC-32 (polynomial 0xEDB88320), one nibble at a time: 64-byte table. */
static const uint32_t crc_nibble[16] = {
    0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
    0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu, 0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu,
};

uint32_t medkd_blob_crc32(uint32_t crc, const unsigned char *data, size_t size) {
    size_t i;
    crc = ~crc;
    for (i = 0; i < size; ++i) {
        crc ^= data[i];
        crc = (crc >> 4) ^ crc_nibble[crc & 0xFu];
        crc = (crc >> 4) ^ crc_nibble[crc & 0xFu];
    }
    return ~crc;
}

int medkd_blob_open(const unsigned char *data, size_t size, medkd_blob *out) {
    uint32_t version, kind, header_size, flags, crc;
    uint64_t payload_size;
    size_t end, padding, i;
    unsigned char digest[MEDKD_SHA256_DIGEST_SIZE];

    if (data == NULL || out == NULL) return MEDKD_BLOB_EARG;
    if (size < MEDKD_BLOB_HEADER_SIZE) return MEDKD_BLOB_ETRUNC;
    if (memcmp(data, MEDKD_BLOB_MAGIC, 4) != 0) return MEDKD_BLOB_EMAGIC;
    version = rd_u16(data + 4);
    if (version != MEDKD_BLOB_FORMAT_VERSION) return MEDKD_BLOB_EVERSION;
    /* From here on every header field is trusted only after the header CRC matched. */
    if (medkd_blob_crc32(0, data, HEADER_CRC_OFFSET) != rd_u32(data + HEADER_CRC_OFFSET)) return MEDKD_BLOB_EHCRC;
    kind = rd_u16(data + 6);
    header_size = rd_u32(data + 8);
    flags = rd_u32(data + 12);
    payload_size = rd_u64(data + 16);
    crc = rd_u32(data + 24);
    if (header_size != MEDKD_BLOB_HEADER_SIZE) return MEDKD_BLOB_EHEADER;
    if (flags != 0) return MEDKD_BLOB_EFLAGS;
    if (kind != MEDKD_BLOB_KIND_ONNX && kind != MEDKD_BLOB_KIND_TENSORRT_ENGINE) return MEDKD_BLOB_EKIND;
    if (payload_size == 0 || payload_size > (uint64_t)(size - MEDKD_BLOB_HEADER_SIZE)) return MEDKD_BLOB_ESIZE;
    end = MEDKD_BLOB_HEADER_SIZE + (size_t)payload_size; /* <= size: no overflow */
    padding = (16u - end % 16u) % 16u;
    if (size - end != padding) return MEDKD_BLOB_ETRAIL;
    for (i = end; i < size; ++i)
        if (data[i] != 0) return MEDKD_BLOB_ETRAIL;
    if (medkd_blob_crc32(0, data + MEDKD_BLOB_HEADER_SIZE, (size_t)payload_size) != crc) return MEDKD_BLOB_ECRC;
    medkd_sha256(data + MEDKD_BLOB_HEADER_SIZE, (size_t)payload_size, digest);
    if (memcmp(digest, data + 28, MEDKD_BLOB_SHA256_PREFIX_SIZE) != 0) return MEDKD_BLOB_ESHA256;

    out->kind = kind;
    out->version = version;
    out->payload = data + MEDKD_BLOB_HEADER_SIZE;
    out->payload_size = (size_t)payload_size;
    out->crc32 = crc;
    memcpy(out->sha256_prefix, data + 28, MEDKD_BLOB_SHA256_PREFIX_SIZE);
    return MEDKD_BLOB_OK;
}

const char *medkd_blob_strerror(int code) {
    switch (code) {
    case MEDKD_BLOB_OK: return "ok";
    case MEDKD_BLOB_EARG: return "invalid argument (NULL pointer)";
    case MEDKD_BLOB_ETRUNC: return "truncated: buffer smaller than the MKDB header";
    case MEDKD_BLOB_EMAGIC: return "bad magic: not a medkd MKDB container";
    case MEDKD_BLOB_EVERSION: return "unsupported MKDB format version (this runtime reads version 2)";
    case MEDKD_BLOB_EHEADER: return "invalid MKDB header size (expected 48)";
    case MEDKD_BLOB_ESIZE: return "truncated or empty: payload size is 0 or extends past the end of the buffer";
    case MEDKD_BLOB_EKIND: return "unknown payload kind";
    case MEDKD_BLOB_ECRC: return "payload crc32 mismatch: the blob is corrupt";
    case MEDKD_BLOB_EHCRC: return "header crc32 mismatch: the blob header is corrupt";
    case MEDKD_BLOB_EFLAGS: return "unknown MKDB header flags set";
    case MEDKD_BLOB_ETRAIL: return "trailing bytes or missing padding: the payload must be followed by exactly its zero padding";
    case MEDKD_BLOB_ESHA256: return "payload sha256 mismatch: the blob is corrupt";
    default: return "unknown medkd_blob error";
    }
}

const char *medkd_blob_kind_name(unsigned int kind) {
    switch (kind) {
    case MEDKD_BLOB_KIND_ONNX: return "onnx";
    case MEDKD_BLOB_KIND_TENSORRT_ENGINE: return "tensorrt-engine";
    default: return "unknown";
    }
}
